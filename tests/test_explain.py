"""`POST /v1/models/{name}:explain` (Grad-CAM), against real `python -m predictor` processes."""

import base64
import concurrent.futures
import io
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from predictor.cifar import CLASSES

from .conftest import MODEL_NAME, Server, assert_error, calls_in_flight, encode, scraped_total, wait_until

EXPLAIN = f"/v1/models/{MODEL_NAME}:explain"
KEY = "explain-test-key-9d2e"
PREDICT = f"/v1/models/{MODEL_NAME}:predict"


def instances(*images: bytes) -> dict:
    return {"instances": [{"image": {"b64": base64.b64encode(data).decode()}} for data in images]}


def object_on_one_side(jpeg: bytes, side: str) -> bytes:
    """A 32x32 CIFAR image pasted on the left or right half of a plain grey 64x64 canvas (served as 32x32)."""
    canvas = Image.new("RGB", (64, 64), (128, 128, 128))
    canvas.paste(Image.open(io.BytesIO(jpeg)).convert("RGB"), (0 if side == "left" else 32, 16))
    return encode(canvas)


def left_share(heatmap: list[list[float]]) -> float:
    """The share of the heat-map's mass on the left half of the image."""
    array = np.asarray(heatmap)
    return float(array[:, :16].sum() / array.sum())


@pytest.fixture(scope="module")
def limited_server():
    """One explanation at a time, so a second concurrent one is refused; API keys on (its client sends one)."""
    srv = Server("--max_explain_in_flight", "1", "--rate_limit_per_minute", "0", env={"API_KEYS": KEY})
    srv.client.headers["Authorization"] = f"Bearer {KEY}"
    yield srv
    srv.stop()


def test_explain_answers_every_image_with_a_heatmap_and_overlay(server, cifar_jpegs):
    files = [cifar_jpegs[name] for name in ("cat_0000.jpg", "ship_0000.jpg", "truck_0001.jpg")]
    response = server.client.post(EXPLAIN, json=instances(*files))
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["explained_precision"] == "fp32" and body["served_precision"]
    predictions = server.client.post(PREDICT, json=instances(*files)).json()["predictions"]
    assert len(body["explanations"]) == len(files)
    for explanation, prediction in zip(body["explanations"], predictions):
        # Same weights, fp32 here: the class the served engine picks, about as confident.
        assert explanation["predicted_class"] == prediction["predicted_class"]
        assert explanation["confidence"] == pytest.approx(prediction["confidence"], abs=0.05)
        assert explanation["target_class"] == explanation["predicted_class"]
        heatmap = np.asarray(explanation["heatmap"])
        assert heatmap.shape == (32, 32) and heatmap.min() >= 0 and heatmap.max() == pytest.approx(1.0)
        overlay = Image.open(io.BytesIO(base64.b64decode(explanation["overlay_png"], validate=True)))
        assert overlay.format == "PNG" and overlay.size == (128, 128) and overlay.mode == "RGB"


def test_the_default_server_serves_every_endpoint_without_loading_torch(server, cifar_jpegs):
    """The default CPU engine is ONNX Runtime, and explanations come from the fp32 network on ONNX Runtime
    too: after a call on every route and on gRPC, no torch library is mapped into the process."""
    import grpc
    from kserve.protocol.grpc import grpc_predict_v2_pb2 as pb
    from kserve.protocol.grpc.grpc_predict_v2_pb2_grpc import GRPCInferenceServiceStub

    jpeg = cifar_jpegs["cat_0000.jpg"]
    upload = [("file", ("cat.jpg", jpeg, "image/jpeg"))]
    calls = [
        server.client.post("/classify/image", files=upload),
        server.client.post("/classify/batch", files=[("files", ("cat.jpg", jpeg, "image/jpeg"))]),
        server.client.post(PREDICT, json=instances(jpeg)),
        server.client.post(EXPLAIN, json=instances(jpeg)),
        server.client.post(EXPLAIN + "?target_class=ship", content=jpeg, headers={"content-type": "image/jpeg"}),
        server.client.post(f"/v2/models/{MODEL_NAME}/infer", json={"inputs": [
            {"name": "image", "datatype": "BYTES", "shape": [1], "data": [base64.b64encode(jpeg).decode()]}]}),
    ] + [server.client.get(path) for path in ("/", "/docs", "/openapi.json", "/health", "/metrics",
                                              f"/v2/models/{MODEL_NAME}", f"/v2/models/{MODEL_NAME}/ready")]
    job = server.client.post("/classify/jobs", files=[("files", ("cat.jpg", jpeg, "image/jpeg"))])
    calls.append(server.client.get(job.json()["status_url"]))
    with grpc.insecure_channel(f"127.0.0.1:{server.grpc_port}") as channel:
        reply = GRPCInferenceServiceStub(channel).ModelInfer(pb.ModelInferRequest(
            model_name=MODEL_NAME, inputs=[pb.ModelInferRequest.InferInputTensor(
                name="image", datatype="BYTES", shape=[1], contents=pb.InferTensorContents(bytes_contents=[jpeg]))]),
            timeout=30)
    assert reply.outputs[1].contents.bytes_contents == [b"cat"]
    assert job.status_code == 202 and all(call.status_code == 200 for call in calls), [
        (call.request.url.path, call.status_code) for call in calls]
    mapped = (Path("/proc") / str(server.process.pid) / "maps").read_text()
    assert "libtorch" not in mapped and "/torch/" not in mapped


def test_explain_takes_a_raw_image_body_like_predict(server, cifar_jpegs):
    data = cifar_jpegs["horse_0000.jpg"]
    raw = server.client.post(EXPLAIN, content=data, headers={"content-type": "image/jpeg"})
    assert raw.status_code == 200, raw.text
    assert raw.json()["explanations"] == server.client.post(EXPLAIN, json=instances(data)).json()["explanations"]


def test_target_class_by_name_or_index_explains_that_class(server, cifar_jpegs):
    data = instances(cifar_jpegs["dog_0000.jpg"])
    by_name = server.client.post(f"{EXPLAIN}?target_class=airplane", json=data).json()["explanations"][0]
    by_index = server.client.post(f"{EXPLAIN}?target_class=0", json=data).json()["explanations"][0]
    own = server.client.post(EXPLAIN, json=data).json()["explanations"][0]
    assert by_name == by_index
    assert by_name["target_class"] == "airplane" and by_name["predicted_class"] == own["predicted_class"]
    assert by_name["target_probability"] < own["confidence"]
    assert not np.allclose(by_name["heatmap"], own["heatmap"], atol=0.05)


@pytest.mark.parametrize("value", ["kitten", "10", "-1", "1.5", "cat,dog"])
def test_a_target_class_that_is_not_a_class_is_a_400(server, cifar_jpegs, value):
    response = server.client.post(EXPLAIN, params={"target_class": value}, json=instances(cifar_jpegs["cat_0000.jpg"]))
    assert_error(response, 400, "invalid_target_class")


def test_bad_explain_requests_get_json_errors(server, cifar_jpegs):
    assert_error(server.client.post(EXPLAIN, json={"instances": []}), 400, "invalid_request")
    assert_error(server.client.post(EXPLAIN, content=b"{not json", headers={"content-type": "application/json"}),
                 400, "invalid_json")
    assert_error(server.client.post(EXPLAIN, content=b"plain text", headers={"content-type": "text/plain"}), 415)
    assert_error(server.client.post(EXPLAIN, json=instances(cifar_jpegs["cat_0000.jpg"][:200])), 400, "invalid_image")
    assert_error(server.client.post(EXPLAIN, json={"instances": [{"image": {"b64": "###"}}]}), 400, "invalid_base64")
    assert_error(server.client.post("/v1/models/another-model:explain", json=instances(cifar_jpegs["cat_0000.jpg"])),
                 404, "model_not_found")


def test_heatmap_mass_sits_on_the_side_with_the_object(server, holdout):
    # 20 held-out images from every class, each pasted once on the left and once on the right.
    chosen = holdout[::100]
    assert len({label for _, label in chosen}) == len(CLASSES)
    sides = [side for _ in chosen for side in ("left", "right")]
    images = [object_on_one_side(jpeg, side) for jpeg, _ in chosen for side in ("left", "right")]
    response = server.client.post(EXPLAIN, json=instances(*images))
    assert response.status_code == 200, response.text
    on_object_side = [share if side == "left" else 1 - share
                      for side, share in zip(sides, (left_share(e["heatmap"]) for e in response.json()["explanations"]))]
    # Most of the mass on the object's half for nearly every image, and clearly so on average
    # (measured: 39 of 40 images, 0.62 of the mass on average; a heat-map blind to position gives 0.5).
    assert sum(share > 0.5 for share in on_object_side) >= 0.9 * len(images), on_object_side
    assert np.mean(on_object_side) >= 0.56, on_object_side


def test_explanations_beyond_their_limit_get_503_and_run_off_the_event_loop(limited_server, holdout):
    client = limited_server.client
    heavy = instances(*(jpeg for jpeg, _ in holdout[:64]))  # tens of Grad-CAMs: long enough to overlap
    light = instances(holdout[0][0])
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        first = pool.submit(lambda: (client.post(EXPLAIN, json=heavy), time.monotonic()))
        wait_until(lambda: calls_in_flight(limited_server.url) >= 1, 30, "the heavy explanation to be admitted")
        refused, refused_at = client.post(EXPLAIN, json=light), time.monotonic()
        health_started = time.monotonic()
        health = client.get("/health")
        health_at = time.monotonic()
        heavy_response, heavy_done_at = first.result()
    assert heavy_response.status_code == 200, heavy_response.text
    body = assert_error(refused, 503, "overloaded")
    assert "limit 1" in body["error"]["message"] and refused.headers["retry-after"] == "1"
    # Both were answered while the heavy explanation was still computing: it does not hold the event loop.
    assert health.status_code == 200 and refused_at < heavy_done_at and health_at < heavy_done_at, (
        health_at - health_started, heavy_done_at - health_at)
    # The slot is free again once the computation ends.
    assert client.post(EXPLAIN, json=light).status_code == 200


def test_explain_needs_the_api_key_and_is_counted_as_explain(limited_server, cifar_jpegs):
    body = instances(cifar_jpegs["frog_0000.jpg"])
    before = scraped_total(limited_server.url, "explain")
    assert_error(httpx.post(f"{limited_server.url}{EXPLAIN}", json=body), 401, "unauthorized")
    assert_error(httpx.post(f"{limited_server.url}{EXPLAIN}", json=body, headers={"X-API-Key": "wrong"}), 401, "unauthorized")
    assert limited_server.client.post(EXPLAIN, json=body).status_code == 200
    assert scraped_total(limited_server.url, "explain") == before + 3


def test_an_explanation_cut_off_by_the_deadline_keeps_its_slot_until_it_ends(holdout):
    srv = Server("--max_explain_in_flight", "1", "--request_timeout_s", "0.5", "--rate_limit_per_minute", "0")
    try:
        heavy = instances(*(jpeg for jpeg, _ in holdout[:64]))
        assert_error(srv.client.post(EXPLAIN, json=heavy), 504, "deadline_exceeded")
        # Its Grad-CAM is still computing: the CPU work stays bounded, a new one is refused...
        assert_error(srv.client.post(EXPLAIN, json=instances(holdout[0][0])), 503, "overloaded")
        # ...until it ends; then the slot is free (a single image fits the deadline once it is).
        def served() -> bool:
            status = srv.client.post(EXPLAIN, json=instances(holdout[0][0])).status_code
            assert status in (200, 503, 504), status
            return status == 200

        wait_until(served, 60, "the explanation slot to be free again", interval=0.5)
    finally:
        srv.stop()
