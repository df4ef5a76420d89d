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
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.loadgen import run_load, summarize  # noqa: E402
from bench.run import load_images, predictor_command, start  # noqa: E402
from bench.v2_requests import decoded, grpc_collect, grpc_requests  # noqa: E402
from tests.conftest import MODEL_NAME, free_port  # noqa: E402


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
                requests = (grpc_requests(MODEL_NAME, files=images) if protocol == "grpc BYTES"
                            else grpc_requests(MODEL_NAME, pixels=decoded(images), name="pixels"))
                samples = grpc_collect(f"127.0.0.1:{grpc_port}", requests, args.concurrency, args.seconds)
                result = summarize([samples], args.concurrency, args.seconds)
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
