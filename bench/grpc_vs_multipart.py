"""gRPC ModelInfer (OIP v2) beside multipart /classify/image, on one server, same run: the `image`
input as BYTES (the JPEG files, decoded by the server) and the `pixels` input as UINT8 (the same
images decoded by the client to [1, 32, 32, 3], sent as raw_input_contents, as tritonclient sends them).

One `python -m predictor` with gRPC on (rate limit and result cache off, as bench/run.py runs it);
C closed-loop clients send the test JPEGs, first over multipart, then over gRPC BYTES, gRPC UINT8,
then multipart again (the two multipart rounds show how much the machine drifted). Prints one JSON
line per round, and writes them to bench/results/grpc_vs_multipart.json.

    .venv/bin/python bench/grpc_vs_multipart.py --seconds 12 --concurrency 32
"""

import argparse
import asyncio
import itertools
import json
import resource
import sys
import time
from pathlib import Path

import grpc
import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.loadgen import run_load  # noqa: E402
from bench.run import load_images, predictor_command, start  # noqa: E402
from predictor.core.imaging import decode_image  # noqa: E402
from tests.conftest import MODEL_NAME, free_port  # noqa: E402


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def _grpc_load(target: str, images: list[bytes], datatype: str, concurrency: int, seconds: float,
                     warmup: float) -> dict:
    from kserve.protocol.grpc import grpc_predict_v2_pb2 as pb
    from kserve.protocol.grpc.grpc_predict_v2_pb2_grpc import GRPCInferenceServiceStub

    if datatype == "BYTES":
        requests = [pb.ModelInferRequest(model_name=MODEL_NAME, inputs=[pb.ModelInferRequest.InferInputTensor(
            name="image", datatype="BYTES", shape=[1], contents=pb.InferTensorContents(bytes_contents=[image]))])
            for image in images]
    else:
        requests = [pb.ModelInferRequest(model_name=MODEL_NAME, inputs=[pb.ModelInferRequest.InferInputTensor(
            name="pixels", datatype="UINT8", shape=[1, 32, 32, 3])], raw_input_contents=[decode_image(image).tobytes()])
            for image in images]
    latencies, errors, counter = [], 0, itertools.count()
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
                    ok = True
                except grpc.RpcError:
                    ok = False
                if now >= measure_from:
                    if ok:
                        latencies.append(time.perf_counter() - now)
                    else:
                        errors += 1

        await asyncio.gather(*(client() for _ in range(concurrency)))
        wall, cpu = time.perf_counter() - started, _cpu_seconds() - cpu_before
    values = np.array(latencies) * 1000
    return {"concurrency": concurrency, "seconds": seconds, "requests": len(latencies), "errors": errors,
            "throughput": round(len(latencies) / seconds, 1), "p50_ms": round(float(np.percentile(values, 50)), 1),
            "p99_ms": round(float(np.percentile(values, 99)), 1), "client_cpu_share": round(cpu / wall, 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=12)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "grpc_vs_multipart.json")
    args = parser.parse_args()
    rows = []
    http_port, grpc_port = free_port(), free_port()
    command = predictor_command(http_port, "--enable_grpc", "true", "--grpc_port", str(grpc_port))
    process, _ = start(command, f"http://127.0.0.1:{http_port}/health")
    try:
        images = load_images(40)
        url = f"http://127.0.0.1:{http_port}/classify/image"
        for protocol in ("multipart", "grpc BYTES", "grpc UINT8", "multipart"):
            if protocol.startswith("grpc"):
                row = asyncio.run(_grpc_load(f"127.0.0.1:{grpc_port}", images, protocol.split()[1], args.concurrency,
                                             args.seconds, 2.0))
            else:
                result = run_load(url, images, args.concurrency, args.seconds)
                row = {k: getattr(result, k) for k in ("concurrency", "seconds", "requests", "errors", "throughput",
                                                       "p50_ms", "p99_ms", "client_cpu_share")}
            rows.append({"protocol": protocol, **row})
            print(json.dumps(rows[-1]), flush=True)
    finally:
        process.terminate()
        process.wait(60)
    args.out.write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
