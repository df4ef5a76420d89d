"""Every endpoint and every bad-input rule, against a real `python -m predictor` process."""

import base64
import concurrent.futures
import json
import re
from datetime import datetime

import httpx
import numpy as np
import pytest
from PIL import Image

from predictor.cifar import CLASSES

from .conftest import MODEL_NAME, assert_error, encode

V1 = f"/v1/models/{MODEL_NAME}:predict"
V2 = f"/v2/models/{MODEL_NAME}/infer"


def assert_classification(result: dict) -> None:
    assert result["predicted_class"] in CLASSES
    probabilities = result["all_probabilities"]
    assert list(probabilities) == list(CLASSES)
    assert sum(probabilities.values()) == pytest.approx(1.0, abs=1e-4)
    assert result["confidence"] == max(probabilities.values())
    assert probabilities[result["predicted_class"]] == result["confidence"]


# -- the seed's endpoint ---------------------------------------------------------------------------
def test_classify_image_returns_the_seed_json(server, cifar_jpegs):
    response = server.client.post("/classify/image", files={"file": ("cat.jpg", cifar_jpegs["cat_0000.jpg"], "image/jpeg")})
    assert response.status_code == 200, response.text
    body = response.json()
    assert {"predicted_class", "confidence", "all_probabilities", "timestamp"} <= set(body)
    assert_classification(body)
    assert datetime.fromisoformat(body["timestamp"]).utcoffset().total_seconds() == 0


def test_classify_image_top_k(server, cifar_jpegs):
    body = server.client.post("/classify/image?top_k=3", files={"file": cifar_jpegs["dog_0000.jpg"]}).json()
    assert [k["class"] for k in body["top_k"]][0] == body["predicted_class"] and len(body["top_k"]) == 3
    assert_error(server.client.post("/classify/image?top_k=11", files={"file": cifar_jpegs["dog_0000.jpg"]}), 422)


def test_png_upload_and_filename_does_not_matter(server, cifar_jpegs):
    png = encode(Image.open(__import__("io").BytesIO(cifar_jpegs["ship_0000.jpg"])))
    response = server.client.post("/classify/image", files={"file": ("photo.jpg", png, "image/jpeg")})
    assert response.status_code == 200
    assert_classification(response.json())


def test_same_image_same_answer_on_every_protocol(server, cifar_jpegs):
    data = cifar_jpegs["horse_0000.jpg"]
    seed = server.client.post("/classify/image", files={"file": data}).json()
    batch = server.client.post("/classify/batch", files=[("files", data)]).json()["results"][0]
    v1 = server.client.post(V1, json={"instances": [{"image": {"b64": base64.b64encode(data).decode()}}]}).json()["predictions"][0]
    raw = server.client.post(V1, content=data, headers={"content-type": "image/jpeg"}).json()["predictions"][0]
    v2 = server.client.post(V2, json={"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1],
                                                    "data": [base64.b64encode(data).decode()]}]}).json()
    probs = dict(zip(CLASSES, v2["outputs"][0]["data"]))
    for other in (batch, v1, raw):
        assert other["all_probabilities"] == seed["all_probabilities"]
    assert v2["outputs"][1]["data"] == [seed["predicted_class"]]
    assert probs == pytest.approx(seed["all_probabilities"], abs=1e-5)


# -- batch ------------------------------------------------------------------------------------------
def test_batch_keeps_order_and_isolates_bad_files(server, cifar_jpegs):
    files = [("files", ("a.jpg", cifar_jpegs["cat_0000.jpg"])), ("files", ("b.txt", b"not an image")),
             ("files", ("c.jpg", cifar_jpegs["cat_0000.jpg"][:300])), ("files", ("d.jpg", cifar_jpegs["truck_0000.jpg"]))]
    results = server.client.post("/classify/batch", files=files).json()["results"]
    assert len(results) == 4
    assert_classification(results[0])
    assert results[1]["error"]["code"] == "unsupported_media_type"
    assert results[2]["error"]["code"] == "invalid_image"
    assert_classification(results[3])
    single = server.client.post("/classify/image", files={"file": cifar_jpegs["truck_0000.jpg"]}).json()
    assert results[3]["all_probabilities"] == single["all_probabilities"]


def test_batch_of_64_default_limit(server, cifar_jpegs):
    images = list(cifar_jpegs.values())
    files = [("files", images[i % len(images)]) for i in range(64)]
    results = server.client.post("/classify/batch", files=files).json()["results"]
    assert len(results) == 64 and all("predicted_class" in r for r in results)
    too_many = [("files", images[0])] * 65
    assert_error(server.client.post("/classify/batch", files=too_many), 413, "too_many_files")


# -- KServe v1 ----------------------------------------------------------------------------------------
def test_v1_json_and_raw_bodies(server, cifar_jpegs):
    instances = [{"image": {"b64": base64.b64encode(cifar_jpegs[n]).decode()}} for n in ("cat_0000.jpg", "frog_0000.jpg")]
    body = server.client.post(V1, json={"instances": instances}).json()
    assert len(body["predictions"]) == 2
    for p in body["predictions"]:
        assert_classification(p)
    png = encode(Image.new("RGB", (40, 40), "gray"))
    raw = server.client.post(V1, content=png, headers={"content-type": "image/png"})
    assert raw.status_code == 200 and len(raw.json()["predictions"]) == 1
    # curl -d sends form-urlencoded; a JSON body is still understood.
    plain = server.client.post(V1, content=json.dumps({"instances": instances[:1]}),
                               headers={"content-type": "application/x-www-form-urlencoded"})
    assert plain.status_code == 200


def test_v1_readiness_and_model_list(server):
    assert server.client.get(f"/v1/models/{MODEL_NAME}").json() == {"name": MODEL_NAME, "ready": True}
    assert MODEL_NAME in server.client.get("/v1/models").json()["models"]


# -- KServe v2 ----------------------------------------------------------------------------------------
def test_v2_uint8_json_and_binary(server):
    pixels = np.random.default_rng(0).integers(0, 256, (3, 32, 32, 3), dtype=np.uint8)
    body = server.client.post(V2, json={"id": "req-1", "inputs": [
        {"name": "pixels", "datatype": "UINT8", "shape": [3, 32, 32, 3], "data": pixels.flatten().tolist()}]}).json()
    assert body["id"] == "req-1"
    probs = {o["name"]: o for o in body["outputs"]}
    assert probs["probabilities"]["datatype"] == "FP32" and probs["probabilities"]["shape"] == [3, 10]
    assert probs["label"]["datatype"] == "BYTES" and len(probs["label"]["data"]) == 3
    rows = np.array(probs["probabilities"]["data"]).reshape(3, 10)
    assert np.allclose(rows.sum(1), 1, atol=1e-5)

    header = json.dumps({"inputs": [{"name": "pixels", "datatype": "UINT8", "shape": [3, 32, 32, 3],
                                     "parameters": {"binary_data_size": pixels.nbytes}}]}).encode()
    binary = server.client.post(V2, content=header + pixels.tobytes(), headers={
        "content-type": "application/octet-stream", "inference-header-content-length": str(len(header))})
    assert binary.status_code == 200, binary.text
    out = {o["name"]: o for o in binary.json()["outputs"]}
    assert np.allclose(np.array(out["probabilities"]["data"]).reshape(3, 10), rows, atol=1e-6)


def test_v2_binary_bytes_are_the_files(server, cifar_jpegs):
    """BYTES over the binary-data extension (tritonclient's default for BYTES): each element a 4-byte
    little-endian length and the file's bytes, classified as the file; a length prefix that runs past its
    tensor is a 400 naming the input."""
    files = [cifar_jpegs["cat_0000.jpg"], cifar_jpegs["ship_0000.jpg"]]
    elements = b"".join(len(data).to_bytes(4, "little") + data for data in files)

    def send(tensor: bytes, shape: int) -> httpx.Response:
        header = json.dumps({"inputs": [{"name": "image", "datatype": "BYTES", "shape": [shape],
                                         "parameters": {"binary_data_size": len(tensor)}}]}).encode()
        return server.client.post(V2, content=header + tensor, headers={
            "content-type": "application/octet-stream", "inference-header-content-length": str(len(header))})

    response = send(elements, 2)
    assert response.status_code == 200, response.text
    label = next(o for o in response.json()["outputs"] if o["name"] == "label")
    assert label["data"] == ["cat", "ship"]
    broken = (len(files[0]) + 100).to_bytes(4, "little") + files[0]
    assert "'image'" in assert_error(send(broken, 1), 400, "invalid_tensor")["error"]


def test_v2_metadata_and_health(server):
    meta = server.client.get(f"/v2/models/{MODEL_NAME}").json()
    assert {(i["name"], i["datatype"]) for i in meta["inputs"]} == {("image", "BYTES"), ("pixels", "UINT8")}
    assert {(o["name"], o["datatype"]) for o in meta["outputs"]} == {("probabilities", "FP32"), ("label", "BYTES")}
    assert server.client.get("/v2/health/live").status_code == 200
    assert server.client.get("/v2/health/ready").json() == {"ready": True}
    assert server.client.get(f"/v2/models/{MODEL_NAME}/ready").status_code == 200


def test_v2_over_grpc(server, cifar_jpegs):
    import asyncio

    from kserve import InferenceGRPCClient, InferInput, InferRequest

    async def infer(tensor: InferInput):
        client = InferenceGRPCClient(f"127.0.0.1:{server.grpc_port}")
        try:
            return await client.infer(InferRequest(model_name=MODEL_NAME, infer_inputs=[tensor]))
        finally:
            await client.close()

    image = InferInput("image", [1], "BYTES")
    image.set_data_from_numpy(np.array([cifar_jpegs["ship_0000.jpg"]], dtype=np.object_), binary_data=True)
    outputs = {o.name: o for o in asyncio.run(infer(image)).outputs}
    seed = server.client.post("/classify/image", files={"file": cifar_jpegs["ship_0000.jpg"]}).json()
    # Sent as raw_input_contents, so the answer comes as raw_output_contents (as from Triton).
    assert outputs["label"].as_numpy().tolist() == [seed["predicted_class"].encode()]
    assert outputs["probabilities"].as_numpy()[0].tolist() == pytest.approx(list(seed["all_probabilities"].values()), abs=1e-5)


# -- health, docs, metrics ------------------------------------------------------------------------------
def test_health_and_docs(server):
    health = server.client.get("/health")
    assert health.status_code == 200 and health.json()["model_loaded"] is True
    assert server.client.get("/docs").status_code == 200
    paths = server.client.get("/openapi.json").json()["paths"]
    assert {"/classify/image", "/classify/batch", "/health"} <= set(paths)


def stage_counts(server) -> list[float]:
    """KServe's own request_{preprocess,predict,postprocess}_seconds counts for the served model."""
    text = server.client.get("/metrics").text
    found = [re.search(rf'^request_{stage}_seconds_count\{{model_name="{MODEL_NAME}"\}} (\S+)$', text, re.M)
             for stage in ("preprocess", "predict", "postprocess")]
    return [float(f.group(1)) if f else 0.0 for f in found]


def test_metrics_names_and_seed_queries(server, cifar_jpegs):
    before = stage_counts(server)
    server.client.post("/classify/image", files={"file": cifar_jpegs["cat_0000.jpg"]})
    server.client.post("/classify/image", files={"file": b"nope"})
    text = server.client.get("/metrics").text
    assert re.search(r'api_requests_total\{code="200",endpoint="classify_image",status="success"\} \d', text)
    assert re.search(r'api_requests_total\{code="415",endpoint="classify_image",status="error"\} \d', text)
    assert 'api_request_latency_seconds_bucket{endpoint="classify_image",le="0.001"}' in text
    assert 'api_request_latency_seconds_bucket{endpoint="classify_image",le="10.0"}' in text
    for name in ("request_predict_seconds_bucket", "request_preprocess_seconds_bucket", "predictor_batch_size_bucket",
                 "predictor_queue_depth", "predictor_in_flight_requests", "predictor_forward_failures_total"):
        assert name in text
    # KServe's own stage histograms count the multipart calls too (the chart's dashboard reads them).
    assert all(after >= first + 1 for first, after in zip(before, stage_counts(server))), (before, stage_counts(server))


def test_kserve_stage_histograms_count_v2_calls(server, cifar_jpegs):
    before = stage_counts(server)
    image = base64.b64encode(cifar_jpegs["cat_0000.jpg"]).decode()
    reply = server.client.post(V2, json={"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1], "data": [image]}]})
    assert reply.status_code == 200
    assert all(after >= first + 1 for first, after in zip(before, stage_counts(server))), (before, stage_counts(server))


def test_concurrent_requests_are_batched(server, holdout):
    def batch_histogram() -> tuple[float, float]:
        text = server.client.get("/metrics").text
        count = float(re.search(r"^predictor_batch_size_count (\S+)", text, re.M).group(1))
        total = float(re.search(r"^predictor_batch_size_sum (\S+)", text, re.M).group(1))
        return count, total

    before = batch_histogram()
    # 96 images no other test sends this server: each is computed, none answered by the result cache.
    images = [data for data, _ in holdout[-96:]]

    def call(i: int) -> int:
        with httpx.Client(base_url=server.url, timeout=60) as client:
            return client.post("/classify/image", files={"file": images[i % len(images)]}).status_code

    with concurrent.futures.ThreadPoolExecutor(32) as pool:
        statuses = list(pool.map(call, range(96)))
    after = batch_histogram()
    assert statuses == [200] * 96
    passes, images_done = after[0] - before[0], after[1] - before[1]
    assert images_done == 96
    assert passes < 96, f"96 concurrent requests took {passes} forward passes: no batching"


# -- bad input: a clear 4xx JSON error, and the server carries on -----------------------------------------
def test_bad_inputs_get_clear_4xx(server, cifar_jpegs):
    jpeg = cifar_jpegs["cat_0000.jpg"]
    cases = [
        (server.client.post("/classify/image", files={"file": ("x.jpg", b"%PDF-1.7 ...", "image/jpeg")}), 415, "unsupported_media_type"),
        (server.client.post("/classify/image", files={"file": ("x.jpg", b"", "image/jpeg")}), 400, "empty_file"),
        (server.client.post("/classify/image", files={"file": ("x.jpg", jpeg[:200], "image/jpeg")}), 400, "invalid_image"),
        (server.client.post("/classify/image", files={"image": jpeg}), 422, "invalid_request"),
        (server.client.post("/classify/image", data={"file": "just text"}), 422, "invalid_request"),
        (server.client.post("/classify/image", content=b"raw", headers={"content-type": "image/jpeg"}), 422, "invalid_request"),
        (server.client.post("/classify/image", content=b"--x\r\ngarbage", headers={"content-type": "multipart/form-data; boundary=x"}), 422, None),
        (server.client.get("/classify/image"), 405, "method_not_allowed"),
        (server.client.post("/classify/batch", files={"wrong": jpeg}), 422, "invalid_request"),
        (server.client.post(V1, json={"instances": [{"image": {"b64": "!!notbase64"}}]}), 400, "invalid_base64"),
        (server.client.post(V1, json={"instances": []}), 400, "invalid_request"),
        (server.client.post(V1, json={"rows": [1]}), 400, "invalid_request"),
        (server.client.post(V1, json=[1, 2]), 400, "invalid_request"),
        (server.client.post(V1, content=b"{not json", headers={"content-type": "application/json"}), 400, "invalid_request"),
        (server.client.post(V1, content=b"\x00\x01binary", headers={"content-type": "application/octet-stream"}), 400, "invalid_request"),  # KServe reads octet-stream as JSON
        (server.client.post(V1, content=b"\x00\x01binary", headers={"content-type": "image/gif"}), 415, "unsupported_media_type"),
        (server.client.post(V1, json={"instances": [{"image": {"b64": base64.b64encode(b"GIF89a....").decode()}}]}), 415, None),
        (server.client.post("/v1/models/other:predict", json={"instances": []}), 404, "model_not_found"),
        (server.client.post(V2, json={"inputs": [{"name": "x", "datatype": "FP32", "shape": [1], "data": [1.0]}]}), 400, "unsupported_datatype"),
        (server.client.post(V2, json={"inputs": [{"name": "pixels", "datatype": "UINT8", "shape": [1, 28, 28, 1], "data": [0] * 784}]}), 400, "invalid_shape"),
        (server.client.post(V2, json={"inputs": [{"name": "pixels", "datatype": "UINT8", "shape": [1, 32, 32, 3], "data": [1, 2]}]}), 400, "invalid_tensor"),
        (server.client.post(V2, json={"inputs": [{"name": "pixels", "datatype": "UINT8", "shape": [1, 32, 32, 3], "data": [999] * 3072}]}), 400, None),
        (server.client.post(V2, json={"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1], "data": ["***"]}]}), 400, "invalid_base64"),
        (server.client.post(V2, json={"inputs": [{"name": "image", "datatype": "BYTES", "shape": [2], "data": ["QUJD"]}]}), 400, "invalid_shape"),
        (server.client.post(V2, json={"inputs": []}), 400, "invalid_request"),
        (server.client.post(V2, json={"inputs": "x"}), 422, "invalid_request"),
        (server.client.post(V2, content=b"{bad", headers={"content-type": "application/json"}), 422, "invalid_request"),
        (server.client.post("/v2/models/other/infer", json={"inputs": []}), 404, "model_not_found"),
    ]
    for i, (response, status, code) in enumerate(cases):
        assert 400 <= response.status_code < 500, (i, response.status_code, response.text)
        assert_error(response, status, code)
    assert server.client.get("/health").status_code == 200
    assert server.client.post("/classify/image", files={"file": jpeg}).status_code == 200


def test_oversized_body_rejected_with_413(server):
    big = b"\xff\xd8\xff" + b"\0" * (11 * 1024 * 1024)
    assert_error(server.client.post("/classify/image", files={"file": big}), 413, "payload_too_large")

    def chunked():  # no Content-Length: the limit is enforced while streaming
        yield b"\xff\xd8\xff"
        for _ in range(12):
            yield b"\0" * (1024 * 1024)

    response = server.client.post(V1, content=chunked(), headers={"content-type": "image/jpeg"})
    assert_error(response, 413, "payload_too_large")
    assert server.client.get("/health").status_code == 200


def test_configured_limits(strict_server, cifar_jpegs):
    client = strict_server.client
    jpeg = cifar_jpegs["cat_0000.jpg"]
    assert_error(client.post("/classify/image", files={"file": b"\xff\xd8\xff" + b"\0" * 300_000}), 413, "payload_too_large")
    assert_error(client.post("/classify/batch", files=[("files", jpeg)] * 5), 413, "too_many_files")
    assert_error(client.post(V1, json={"instances": [{"b64": base64.b64encode(jpeg).decode()}] * 5}), 413, "too_many_images")
    big = encode(Image.new("RGB", (600, 100), "red"))
    assert_error(client.post("/classify/image", files={"file": big}), 413, "image_too_large")
    ok = client.post("/classify/batch", files=[("files", jpeg)] * 4)
    assert ok.status_code == 200 and len(ok.json()["results"]) == 4
