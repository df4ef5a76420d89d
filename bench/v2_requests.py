"""Open Inference Protocol (KServe v2) requests for the load generator, built once before a run: JSON
with the files as base64 BYTES, the binary-data extension with UINT8 pixels or with the files as BYTES
(as tritonclient sends them by default), and gRPC ModelInfer; plus a closed-loop gRPC load whose samples
bench/loadgen.py summarizes like its HTTP ones.

The HTTP builders return (body, headers) pairs for `run_load(..., prepared=True)`.
"""

import asyncio
import base64
import itertools
import json
import struct
import time

from bench.loadgen import Samples, _cpu_seconds

BINARY_HEADER = "inference-header-content-length"


def json_bytes(files: list[bytes], name: str = "image") -> list[tuple[bytes, dict]]:
    """One file per request as a base64 BYTES element in JSON (the predictor's v2 JSON form)."""
    return [(json.dumps({"inputs": [{"name": name, "datatype": "BYTES", "shape": [1],
                                     "data": [base64.b64encode(f).decode()]}]}).encode(),
             {"content-type": "application/json"}) for f in files]


def _binary(header: dict, payload: bytes) -> tuple[bytes, dict]:
    head = json.dumps(header, separators=(",", ":")).encode()
    return head + payload, {"content-type": "application/octet-stream", BINARY_HEADER: str(len(head))}


def binary_pixels(pixels: list, name: str = "pixels") -> list[tuple[bytes, dict]]:
    """One decoded image ([32, 32, 3] uint8) per request as UINT8 [1, 32, 32, 3] over the binary-data
    extension: the same bytes for the predictor and for Triton."""
    return [_binary({"inputs": [{"name": name, "datatype": "UINT8", "shape": [1, *p.shape],
                                 "parameters": {"binary_data_size": p.nbytes}}]}, p.tobytes()) for p in pixels]


def binary_bytes(files: list[bytes], name: str = "image", shape: tuple[int, ...] = (1,)) -> list[tuple[bytes, dict]]:
    """One file per request as a BYTES element over the binary-data extension (a 4-byte little-endian
    length, then the file), tritonclient's default for BYTES; `shape` [1] for the predictor, [1, 1] for
    a Triton model that batches."""
    out = []
    for f in files:
        payload = struct.pack("<I", len(f)) + f
        out.append(_binary({"inputs": [{"name": name, "datatype": "BYTES", "shape": list(shape),
                                        "parameters": {"binary_data_size": len(payload)}}]}, payload))
    return out


def grpc_requests(model: str, files: list[bytes] | None = None, pixels: list | None = None, name: str = "image",
                  shape: tuple[int, ...] = (1,)) -> list:
    """ModelInferRequests: the files as a BYTES tensor (`bytes_contents`), or pixels as UINT8
    [1, 32, 32, 3] in raw_input_contents (as tritonclient sends them)."""
    from kserve.protocol.grpc import grpc_predict_v2_pb2 as pb

    tensor = pb.ModelInferRequest.InferInputTensor
    if files is not None:
        return [pb.ModelInferRequest(model_name=model, inputs=[tensor(
            name=name, datatype="BYTES", shape=list(shape), contents=pb.InferTensorContents(bytes_contents=[f]))])
            for f in files]
    return [pb.ModelInferRequest(model_name=model, inputs=[tensor(name=name, datatype="UINT8", shape=[1, *p.shape])],
                                 raw_input_contents=[p.tobytes()]) for p in pixels]


async def _grpc_collect(target: str, requests: list, concurrency: int, seconds: float, warmup: float) -> Samples:
    import grpc
    from kserve.protocol.grpc.grpc_predict_v2_pb2_grpc import GRPCInferenceServiceStub

    latencies, refusals, errors, counter = [], [], 0, itertools.count()
    async with grpc.aio.insecure_channel(target) as channel:
        stub = GRPCInferenceServiceStub(channel)
        started = time.perf_counter()
        measure_from, stop_at = started + warmup, started + warmup + seconds
        cpu_before = _cpu_seconds()

        async def client() -> None:
            nonlocal errors
            while (now := time.perf_counter()) < stop_at:
                try:
                    await stub.ModelInfer(requests[next(counter) % len(requests)], timeout=60)
                    code = grpc.StatusCode.OK
                except grpc.aio.AioRpcError as exc:
                    code = exc.code()
                if now >= measure_from:
                    if code in (grpc.StatusCode.OK, grpc.StatusCode.UNAVAILABLE):
                        (latencies if code == grpc.StatusCode.OK else refusals).append(time.perf_counter() - now)
                    else:
                        errors += 1

        await asyncio.gather(*(client() for _ in range(concurrency)))
        wall, cpu = time.perf_counter() - started, _cpu_seconds() - cpu_before
    return Samples(latencies, refusals, errors, cpu, wall)


def grpc_collect(target: str, requests: list, concurrency: int, seconds: float, warmup: float = 2.0) -> Samples:
    """C closed-loop gRPC clients on one channel sending `requests` in turn; OK answers are the latencies,
    UNAVAILABLE (the gRPC 503) the refusals, anything else an error."""
    return asyncio.run(_grpc_collect(target, requests, concurrency, seconds, warmup))


def decoded(files: list[bytes]) -> list:
    """The files decoded as the predictor decodes them ([32, 32, 3] uint8 each)."""
    from predictor.core.imaging import decode_image

    return [decode_image(f) for f in files]


# Request kinds over HTTP, by name (bench/peers' `rows`, bench/stack_cost.py):
HTTP_KINDS = ("multipart", "v2-json-bytes", "v2-binary-pixels", "v2-binary-bytes", "v2-binary-bytes-batched")


def http_load(kind: str, files: list[bytes]) -> tuple[list, dict]:
    """(items, keyword arguments) for bench/loadgen.py's run_load / collect: multipart uploads of the files,
    or prepared v2 requests (`-batched`: BYTES shaped [1, 1], for a Triton model with a batch dimension)."""
    if kind == "multipart":
        return files, {}
    if kind == "v2-json-bytes":
        return json_bytes(files), {"prepared": True}
    if kind == "v2-binary-pixels":
        return binary_pixels(decoded(files)), {"prepared": True}
    if kind == "v2-binary-bytes":
        return binary_bytes(files), {"prepared": True}
    if kind == "v2-binary-bytes-batched":
        return binary_bytes(files, shape=(1, 1)), {"prepared": True}
    raise ValueError(f"unknown request kind {kind!r}; one of {HTTP_KINDS}")
