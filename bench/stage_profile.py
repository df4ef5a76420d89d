"""Where the predictor's time goes under load: py-spy samples of the server at c=32, by stage.

    python bench/stage_profile.py --seconds 15          # needs py-spy (pip install py-spy) and ptrace rights

Starts the predictor (default settings, rate limit off), drives it with the benchmark's load
generator, records the server with `py-spy record --format raw --threads` (idle threads excluded), and
prints the share of samples per stage (forward pass, image decoding, multipart parsing, ...).
"""

import argparse
import collections
import subprocess
import sys
import threading
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.loadgen import run_load  # noqa: E402
from bench.run import load_images, predictor_command, start  # noqa: E402

# First matching marker in a stack (innermost frame first) names its stage.
STAGES = [
    ("forward pass (ONNX Runtime or torch)", ("engines/", "onnxruntime", "torch/", "_inductor", "torchao")),
    ("image decode + resize (PIL)", ("imaging.py", "PIL/")),
    ("multipart / form parsing", ("multipart", "formparsers", "python_multipart")),
    ("batching, pre/postprocess", ("batcher.py", "model.py", "payloads.py")),
    ("guard, routing, FastAPI/Starlette", ("guard.py", "routes.py", "starlette/", "fastapi/", "kserve/")),
    ("HTTP server (uvicorn, h11/httptools)", ("uvicorn/", "h11", "httptools")),
    ("metrics", ("prometheus_client",)),
    ("asyncio event loop", ("asyncio/",)),
]


def stage_of(stack: str) -> str:
    frames = stack.split(";")[::-1]  # innermost first
    for frame in frames:
        for name, markers in STAGES:
            if any(marker in frame for marker in markers):
                return name
    return "other"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=15)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--server-args", nargs="*", default=[])
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "profile.md",
                        help="the table; py-spy's raw samples go next to it as profile-c<N>.raw")
    args = parser.parse_args()
    port = 18380
    server, _ = start(predictor_command(port, *args.server_args), f"http://127.0.0.1:{port}/health")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    raw = args.out.with_name(f"profile-c{args.concurrency}.raw")
    try:
        load = threading.Thread(target=run_load, args=(f"http://127.0.0.1:{port}/classify/image", load_images(20),
                                                       args.concurrency, args.seconds + 4, 1.0))
        load.start()
        subprocess.run([str(Path(sys.executable).with_name("py-spy")), "record", "--pid", str(server.pid), "--duration", str(int(args.seconds)),
                        "--format", "raw", "--threads", "--nonblocking", "--output", str(raw)],
                       check=True, capture_output=True)
        load.join()
    finally:
        server.terminate()
        server.wait(60)
    samples: collections.Counter[str] = collections.Counter()
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if stack and count.isdigit():
            samples[stage_of(stack)] += int(count)
    total = sum(samples.values())
    table = [f"| stage (c={args.concurrency}, {total} samples over all threads) | share |", "|---|---|",
             *(f"| {name} | {100 * count / total:.1f} % |" for name, count in samples.most_common())]
    print("\n".join(table))
    args.out.write_text("\n".join(table) + "\n")


if __name__ == "__main__":
    main()
