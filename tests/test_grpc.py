"""gRPC (Open Inference Protocol v2, `--enable_grpc true`) on real server processes, with a real gRPC client:
the repository API refused, the same gates as HTTP, errors as gRPC status codes, metadata and inference."""

import re
import time

import grpc
import pytest
from kserve.protocol.grpc import grpc_predict_v2_pb2 as pb
from kserve.protocol.grpc.grpc_predict_v2_pb2_grpc import GRPCInferenceServiceStub

from predictor.cifar import CLASSES

from .conftest import MODEL_NAME, Server, free_port, wait_until


def start(*args: str, env: dict | None = None) -> Server:
    grpc_port = free_port()
    srv = Server("--enable_grpc", "true", "--grpc_port", str(grpc_port), *args, env=env)
    srv.grpc_port = grpc_port
    srv.channel = grpc.insecure_channel(f"127.0.0.1:{grpc_port}")
    srv.stub = GRPCInferenceServiceStub(srv.channel)
    return srv


def stop(srv: Server) -> None:
    srv.channel.close()
    srv.stop()


@pytest.fixture(scope="module")
def grpc_server():
    srv = start("--rate_limit_per_minute", "0")
    yield srv
    stop(srv)


def image_request(jpeg: bytes) -> pb.ModelInferRequest:
    return pb.ModelInferRequest(model_name=MODEL_NAME, inputs=[pb.ModelInferRequest.InferInputTensor(
        name="image", datatype="BYTES", shape=[1], contents=pb.InferTensorContents(bytes_contents=[jpeg]))])


def grpc_error(call, *args, **kwargs) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as raised:
        call(*args, **kwargs)
    return raised.value


def first_refusal(srv: Server, request: pb.ModelInferRequest, within_s: float = 20) -> grpc.RpcError:
    """Send `request` until the server refuses it (a state the caller is waiting for); fail after `within_s`."""
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        try:
            srv.stub.ModelInfer(request, timeout=30)
        except grpc.RpcError as error:
            return error
    raise AssertionError(f"no gRPC call was refused within {within_s} s")


# -- the repository API ----------------------------------------------------------------------------
@pytest.mark.parametrize("rpc, request_type", [("RepositoryModelUnload", pb.RepositoryModelUnloadRequest),
                                               ("RepositoryModelLoad", pb.RepositoryModelLoadRequest)])
def test_a_keyless_repository_call_is_refused_and_the_model_keeps_serving(grpc_server, cifar_jpegs, rpc, request_type):
    error = grpc_error(getattr(grpc_server.stub, rpc), request_type(model_name=MODEL_NAME), timeout=30)
    assert error.code() == grpc.StatusCode.UNIMPLEMENTED
    assert error.details() == "The model repository API is not served by this predictor."
    assert grpc_server.client.get("/health").status_code == 200
    assert grpc_server.stub.ModelReady(pb.ModelReadyRequest(name=MODEL_NAME), timeout=30).ready
    reply = grpc_server.stub.ModelInfer(image_request(cifar_jpegs["ship_0000.jpg"]), timeout=30)
    assert [o.name for o in reply.outputs] == ["probabilities", "label"]
    assert grpc_server.client.post("/classify/image", files={"file": cifar_jpegs["ship_0000.jpg"]}).status_code == 200


# -- the HTTP API's gates, on gRPC ------------------------------------------------------------------
KEY, OTHER_KEY = "grpc-key-0123456789", "grpc-other-key-987654"


@pytest.fixture(scope="module")
def keyed_grpc():
    """Keys on, gRPC on (they may be on together), 4 calls/min per key, 300 kB bodies."""
    srv = start("--rate_limit_per_minute", "4", "--max_body_bytes", "300000", env={"API_KEYS": f"{KEY},{OTHER_KEY}"})
    yield srv
    stop(srv)


def large_pngs(count: int, shade: int = 30) -> pb.ModelInferRequest:
    """`count` 4096x4096 PNGs: small on the wire (~60 kB each), ~0.3 s each to decode on this 2-core machine.
    Another `shade`, other bytes: never answered from the result cache."""
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (4096, 4096), (200, shade, 30)).save(buffer, "PNG")
    return pb.ModelInferRequest(model_name=MODEL_NAME, inputs=[pb.ModelInferRequest.InferInputTensor(
        name="image", datatype="BYTES", shape=[count], contents=pb.InferTensorContents(bytes_contents=[buffer.getvalue()] * count))])


@pytest.fixture(scope="module")
def heavy_request():
    """Makes a new heavy request at each call: 40 large PNGs, several seconds of decoding on 2 cores even on a
    quiet machine. Each has other bytes: one computed after its caller's deadline leaves its result in the
    cache, where the same bytes would be answered at once the next time."""
    shades = iter(range(256))
    return lambda: large_pngs(40, next(shades))


def api_requests(srv: Server, code: int) -> float:
    found = re.search(rf'^api_requests_total\{{code="{code}",endpoint="v2_infer",status="\w+"\}} (\S+)$',
                      srv.client.get("/metrics").text, re.M)
    return float(found.group(1)) if found else 0.0


def test_infer_needs_a_key_in_metadata_and_probes_stay_open(keyed_grpc, cifar_jpegs):
    request = image_request(cifar_jpegs["cat_0000.jpg"])
    for metadata in ((), (("authorization", "Bearer wrong-key"),), (("x-api-key", "wrong-key"),),
                     (("authorization", f"Basic {KEY}"),)):
        error = grpc_error(keyed_grpc.stub.ModelInfer, request, metadata=metadata, timeout=30)
        assert error.code() == grpc.StatusCode.UNAUTHENTICATED, metadata
        assert KEY not in error.details() and "wrong-key" not in error.details()
        assert ("www-authenticate", "Bearer") in error.trailing_metadata()
    for metadata in ((("authorization", f"Bearer {KEY}"),), (("x-api-key", KEY),)):
        reply = keyed_grpc.stub.ModelInfer(request, metadata=metadata, timeout=30)
        assert reply.outputs[1].contents.bytes_contents == [b"cat"]
    assert keyed_grpc.stub.ServerReady(pb.ServerReadyRequest(), timeout=30).ready
    assert keyed_grpc.stub.ModelReady(pb.ModelReadyRequest(name=MODEL_NAME), timeout=30).ready
    assert api_requests(keyed_grpc, 401) == 4 and api_requests(keyed_grpc, 200) == 2
    assert KEY not in keyed_grpc.log()


def rss_mib(srv: Server) -> float:
    return int(re.search(r"VmRSS:\s+(\d+)", open(f"/proc/{srv.process.pid}/status").read()).group(1)) / 1024


def test_refused_calls_are_refused_before_their_message_is_read(cifar_jpegs):
    """Keys on, 40 concurrent ~10 MB ModelInfer calls without a key: every one is refused UNAUTHENTICATED,
    and the server's memory never holds their messages (400 MB, read whole before the gates before; with
    gRPC's BDP probing on, 38-150 MB of them were read ahead, the more the busier the machine)."""
    import concurrent.futures
    import os
    import threading

    srv = start("--max_body_bytes", str(12 * 2**20), env={"API_KEYS": KEY})
    try:
        big = pb.ModelInferRequest(model_name=MODEL_NAME, inputs=[pb.ModelInferRequest.InferInputTensor(
            name="image", datatype="BYTES", shape=[1], contents=pb.InferTensorContents(bytes_contents=[os.urandom(10 * 2**20)]))])
        baseline, peak, done = rss_mib(srv), [0.0], threading.Event()

        def sample() -> None:
            while not done.is_set():
                peak[0] = max(peak[0], rss_mib(srv))
                time.sleep(0.02)

        sampler = threading.Thread(target=sample)
        sampler.start()
        with concurrent.futures.ThreadPoolExecutor(40) as pool:
            errors = list(pool.map(lambda _: grpc_error(srv.stub.ModelInfer, big, timeout=60), range(40)))
        done.set()
        sampler.join()
        assert {e.code() for e in errors} == {grpc.StatusCode.UNAUTHENTICATED}, {e.code() for e in errors}
        assert peak[0] - baseline < 20, (baseline, peak[0])
        assert rss_mib(srv) - baseline < 20, (baseline, rss_mib(srv))
        # Admitted calls are read as before.
        reply = srv.stub.ModelInfer(image_request(cifar_jpegs["cat_0000.jpg"]), metadata=(("x-api-key", KEY),), timeout=30)
        assert reply.outputs[1].contents.bytes_contents == [b"cat"]
    finally:
        stop(srv)


def test_one_rate_limit_bucket_per_key_across_http_and_grpc(keyed_grpc, cifar_jpegs):
    jpeg = cifar_jpegs["dog_0000.jpg"]
    metadata = (("x-api-key", OTHER_KEY),)
    for _ in range(2):
        assert keyed_grpc.client.post("/classify/image", files={"file": jpeg},
                                      headers={"X-API-Key": OTHER_KEY}).status_code == 200
    call = keyed_grpc.stub.ModelInfer.with_call(image_request(jpeg), metadata=metadata, timeout=30)
    assert ("x-ratelimit-remaining", "1") in call[1].trailing_metadata()
    keyed_grpc.stub.ModelInfer(image_request(jpeg), metadata=metadata, timeout=30)
    error = grpc_error(keyed_grpc.stub.ModelInfer, image_request(jpeg), metadata=metadata, timeout=30)
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "More than 4 requests per minute" in error.details()
    assert int(dict(error.trailing_metadata())["retry-after"]) >= 1
    assert keyed_grpc.client.post("/classify/image", files={"file": jpeg},
                                  headers={"X-API-Key": OTHER_KEY}).status_code == 429
    assert api_requests(keyed_grpc, 429) == 1


def test_a_message_over_the_body_limit_is_refused(keyed_grpc):
    request = image_request(b"\x89PNG" + bytes(400_000))
    error = grpc_error(keyed_grpc.stub.ModelInfer, request, metadata=(("x-api-key", KEY),), timeout=30)
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


def test_without_keys_the_rate_limit_counts_the_peer_or_the_trusted_hop(cifar_jpegs):
    srv = start("--rate_limit_per_minute", "1", "--trusted_proxy_hops", "1")
    try:
        request = image_request(cifar_jpegs["cat_0000.jpg"])
        srv.stub.ModelInfer(request, timeout=30)
        assert grpc_error(srv.stub.ModelInfer, request, timeout=30).code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        # The proxy appended the address it saw; what the client wrote to its left is not trusted.
        srv.stub.ModelInfer(request, metadata=(("x-forwarded-for", "6.6.6.6, 10.1.1.1"),), timeout=30)
        error = grpc_error(srv.stub.ModelInfer, request, metadata=(("x-forwarded-for", "7.7.7.7, 10.1.1.1"),), timeout=30)
        assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        srv.stub.ModelInfer(request, metadata=(("x-forwarded-for", "10.2.2.2"),), timeout=30)
    finally:
        stop(srv)


@pytest.fixture(scope="module")
def limited_grpc():
    """One call in flight at a time, a 1 s deadline."""
    srv = start("--rate_limit_per_minute", "0", "--max_in_flight", "1", "--request_timeout_s", "1")
    yield srv
    stop(srv)


def test_grpc_and_http_share_the_in_flight_limit(limited_grpc, heavy_request, cifar_jpegs):
    import concurrent.futures
    import socket

    from .test_hardening import multipart_upload

    jpeg = cifar_jpegs["cat_0000.jpg"]
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        for _ in range(10):
            heavy = pool.submit(grpc_error, limited_grpc.stub.ModelInfer, heavy_request(), timeout=30)
            # Until the heavy gRPC call is admitted these probes are served; then HTTP is refused. A
            # probe in flight when the heavy call arrives has it refused instead: send it again.
            while (probe := limited_grpc.client.post("/classify/image", files={"file": jpeg})).status_code == 200:
                if heavy.done():
                    break
            if probe.status_code == 503:
                break
            assert "calls are already in flight" in heavy.result().details()
        assert probe.json()["error"]["code"] == "overloaded", probe.text
        assert heavy.result().code() == grpc.StatusCode.DEADLINE_EXCEEDED
    head, _ = multipart_upload(jpeg, limited_grpc.port)
    with socket.create_connection(("127.0.0.1", limited_grpc.port)) as held:
        held.sendall(head)  # admitted and in flight until its 1 s deadline
        error = first_refusal(limited_grpc, image_request(jpeg), within_s=1)
        assert error.code() == grpc.StatusCode.UNAVAILABLE, error
        assert "calls are already in flight (limit 1)" in error.details()
        assert dict(error.trailing_metadata())["retry-after"] == "1"
    assert api_requests(limited_grpc, 503) >= 1


def test_our_deadline_and_the_callers_both_hold(limited_grpc, grpc_server, heavy_request):
    error = grpc_error(limited_grpc.stub.ModelInfer, heavy_request(), timeout=30)
    assert error.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert error.details() == "The request did not complete within 1 s."
    assert api_requests(limited_grpc, 504) >= 1
    # The caller's own deadline, shorter than the server's 30 s, ends the call on the server too.
    before = api_requests(grpc_server, 504)
    heavier = large_pngs(48)  # ~8 s of decoding
    assert grpc_error(grpc_server.stub.ModelInfer, heavier, timeout=0.5).code() == grpc.StatusCode.DEADLINE_EXCEEDED
    deadline = time.monotonic() + 4  # well before the decoding alone would be done
    while api_requests(grpc_server, 504) == before:
        assert time.monotonic() < deadline, "the server kept computing past the caller's deadline"


def test_sigterm_refuses_new_grpc_calls_while_admitted_calls_drain(cifar_jpegs):
    import signal
    import socket

    from .test_hardening import multipart_upload, read_reply

    srv = start("--rate_limit_per_minute", "0", "--drain_timeout_s", "30", "--max_in_flight", "1")
    try:
        jpeg = cifar_jpegs["cat_0000.jpg"]
        head, rest = multipart_upload(jpeg, srv.port)
        with socket.create_connection(("127.0.0.1", srv.port)) as held:
            held.sendall(head)
            # Served until the held upload is admitted, then refused as over the in-flight limit.
            assert "calls are already in flight" in first_refusal(srv, image_request(jpeg)).details()
            srv.process.send_signal(signal.SIGTERM)
            admitted = wait_until(lambda: re.search(r"draining; readiness is now 503, (\d+) admitted", srv.log()), 30,
                                  "the drain log line")
            assert admitted.group(1) == "1"
            error = grpc_error(srv.stub.ModelInfer, image_request(jpeg), timeout=30)
            assert error.code() == grpc.StatusCode.UNAVAILABLE
            assert error.details() == "This replica is shutting down; retry on another."
            assert not srv.stub.ServerReady(pb.ServerReadyRequest(), timeout=30).ready
            assert not srv.stub.ModelReady(pb.ModelReadyRequest(name=MODEL_NAME), timeout=30).ready
            held.sendall(rest)
            assert read_reply(held).startswith("HTTP/1.1 200")
        srv.process.wait(40)
        assert srv.process.returncode == 0
    finally:
        stop(srv)


# -- Open Inference Protocol conformance -------------------------------------------------------------
def served_version(srv: Server) -> str:
    return srv.client.get("/health").json()["version"]


def test_model_and_server_metadata(grpc_server):
    meta = grpc_server.stub.ModelMetadata(pb.ModelMetadataRequest(name=MODEL_NAME), timeout=30)
    assert (meta.name, list(meta.versions), meta.platform) == (MODEL_NAME, [served_version(grpc_server)], "onnxruntime_onnx")
    assert [(t.name, t.datatype, list(t.shape)) for t in meta.inputs] == [("image", "BYTES", [-1]),
                                                                         ("pixels", "UINT8", [-1, 32, 32, 3])]
    assert [(t.name, t.datatype, list(t.shape)) for t in meta.outputs] == [("probabilities", "FP32", [-1, 10]),
                                                                          ("label", "BYTES", [-1])]
    with_version = pb.ModelMetadataRequest(name=MODEL_NAME, version=served_version(grpc_server))
    assert grpc_server.stub.ModelMetadata(with_version, timeout=30).name == MODEL_NAME
    for request in (pb.ModelMetadataRequest(name="no-such-model"), pb.ModelMetadataRequest(name=MODEL_NAME, version="9")):
        assert grpc_error(grpc_server.stub.ModelMetadata, request, timeout=30).code() == grpc.StatusCode.NOT_FOUND
    server = grpc_server.stub.ServerMetadata(pb.ServerMetadataRequest(), timeout=30)
    assert list(server.extensions) == ["binary_tensor_data"]


def tensor(name: str, datatype: str, shape: list[int], **contents) -> pb.ModelInferRequest.InferInputTensor:
    return pb.ModelInferRequest.InferInputTensor(name=name, datatype=datatype, shape=shape,
                                                 contents=pb.InferTensorContents(**contents) if contents else None)


BAD_REQUESTS = {
    "fp32-input": (dict(inputs=[tensor("x", "FP32", [1, 3], fp32_contents=[1, 2, 3])]),
                   grpc.StatusCode.INVALID_ARGUMENT, "Input datatype FP32 is not accepted"),
    "pixels-16x16": (dict(inputs=[tensor("pixels", "UINT8", [1, 16, 16, 3])], raw_input_contents=[bytes(768)]),
                     grpc.StatusCode.INVALID_ARGUMENT, "UINT8 input must have shape [N, 32, 32, 3]"),
    "pixels-short": (dict(inputs=[tensor("pixels", "UINT8", [1, 32, 32, 3])], raw_input_contents=[bytes(3000)]),
                     grpc.StatusCode.INVALID_ARGUMENT, "UINT8 data of 'pixels' must hold 3072 bytes"),
    "pixels-over-255": (dict(inputs=[tensor("pixels", "UINT8", [1, 32, 32, 3], uint_contents=[999] * 3072)]),
                        grpc.StatusCode.INVALID_ARGUMENT, "must be integers from 0 to 255"),
    "truncated-jpeg": (dict(inputs=[tensor("image", "BYTES", [1], bytes_contents=[b"\xff\xd8\xff\xe0" + bytes(300)])]),
                       grpc.StatusCode.INVALID_ARGUMENT, "corrupt or truncated"),
    "base64-text": (dict(inputs=[tensor("image", "BYTES", [1], bytes_contents=[b"/9j/4AAQSkZJRg=="])]),
                    grpc.StatusCode.INVALID_ARGUMENT, "Only JPEG and PNG images are accepted"),
    "65-images": (dict(inputs=[tensor("image", "BYTES", [65], bytes_contents=[b"x"] * 65)]),
                  grpc.StatusCode.RESOURCE_EXHAUSTED, "65 images exceed the limit of 64"),
    "shape-mismatch": (dict(inputs=[tensor("image", "BYTES", [2], bytes_contents=[b"x"])]),
                       grpc.StatusCode.INVALID_ARGUMENT, "BYTES input must have shape [N]"),
    "no-inputs": (dict(), grpc.StatusCode.INVALID_ARGUMENT, "Expected exactly one input"),
    "raw-bytes-bad-length": (dict(inputs=[tensor("image", "BYTES", [1])], raw_input_contents=[b"\xff\xff\xff\x7fab"]),
                             grpc.StatusCode.INVALID_ARGUMENT, "length prefix runs past the data"),
    "unknown-output": (dict(inputs=[tensor("image", "BYTES", [1], bytes_contents=[b"x"])],
                            outputs=[pb.ModelInferRequest.InferRequestedOutputTensor(name="logits")]),
                       grpc.StatusCode.INVALID_ARGUMENT, "Unknown output 'logits'"),
    "unknown-model": (dict(model_name="no-such-model", inputs=[tensor("image", "BYTES", [1], bytes_contents=[b"x"])]),
                      grpc.StatusCode.NOT_FOUND, "no-such-model"),
    "unknown-version": (dict(model_version="9", inputs=[tensor("image", "BYTES", [1], bytes_contents=[b"x"])]),
                        grpc.StatusCode.NOT_FOUND, "has no version '9'"),
}


@pytest.mark.parametrize("name", BAD_REQUESTS)
def test_bad_requests_get_their_status_code_never_internal(grpc_server, name):
    fields, code, message = BAD_REQUESTS[name]
    error = grpc_error(grpc_server.stub.ModelInfer, pb.ModelInferRequest(**{"model_name": MODEL_NAME, **fields}), timeout=30)
    assert error.code() == code, error
    assert message in error.details()
    assert "Traceback" not in error.details() and "File \"" not in error.details()


def test_bytes_are_the_files_and_requested_outputs_are_honoured(grpc_server, cifar_jpegs):
    request = image_request(cifar_jpegs["ship_0000.jpg"])
    request.id = "call-7"
    request.outputs.append(pb.ModelInferRequest.InferRequestedOutputTensor(name="label"))
    reply = grpc_server.stub.ModelInfer(request, timeout=30)
    assert (reply.id, reply.model_version) == ("call-7", served_version(grpc_server))
    assert [(o.name, o.datatype, list(o.shape)) for o in reply.outputs] == [("label", "BYTES", [1])]
    assert list(reply.outputs[0].contents.bytes_contents) == [b"ship"]
    # The served version may be named; pixels sent raw come back raw (as tritonclient expects).
    pixels = pb.ModelInferRequest(model_name=MODEL_NAME, model_version=served_version(grpc_server),
                                  inputs=[tensor("pixels", "UINT8", [2, 32, 32, 3])], raw_input_contents=[bytes(6144)])
    reply = grpc_server.stub.ModelInfer(pixels, timeout=30)
    assert [o.name for o in reply.outputs] == ["probabilities", "label"] and len(reply.raw_output_contents) == 2
    assert len(reply.raw_output_contents[0]) == 2 * 10 * 4


def test_sigterm_lets_an_admitted_grpc_call_finish(heavy_request, cifar_jpegs):
    import concurrent.futures
    import signal


    srv = start("--rate_limit_per_minute", "0", "--drain_timeout_s", "30", "--max_in_flight", "1")
    try:
        jpeg = cifar_jpegs["cat_0000.jpg"]
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            for _ in range(10):
                request = heavy_request()
                heavy = pool.submit(srv.stub.ModelInfer, request, timeout=60)
                # Served until the heavy call is admitted, then refused as over the in-flight limit.
                while (probe := srv.client.post("/classify/image", files={"file": jpeg})).status_code == 200:
                    if heavy.done():
                        break
                if probe.status_code == 503:
                    break
                heavy.exception()  # refused itself because a probe was in flight: send it again
            assert probe.status_code == 503 and probe.json()["error"]["code"] == "overloaded", "never counted in flight"
            srv.process.send_signal(signal.SIGTERM)
            admitted = wait_until(lambda: re.search(r"draining; readiness is now 503, (\d+) admitted", srv.log()), 30,
                                  "the drain log line")
            assert admitted.group(1) == "1"
            reply = heavy.result()  # the admitted gRPC call completes during the drain
            labels = [label.decode() for label in reply.outputs[1].contents.bytes_contents]
            assert len(labels) == request.inputs[0].shape[0] and set(labels) <= set(CLASSES), labels
        srv.process.wait(40)
        log = srv.log()
        assert log.index("drain: no admitted request left") < log.index("Stopping the grpc server"), log[-3000:]
        assert srv.process.returncode == 0
    finally:
        stop(srv)
