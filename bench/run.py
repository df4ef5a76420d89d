"""`make bench`: the predictor vs the seed-style baseline, and the model alone, in one run.

    python bench/run.py --seconds 15 --concurrency 1 8 32 64

Both servers run at once (an idle one costs nothing); each concurrency level is measured on the
predictor and then on the baseline, so drift of the machine hits both alike. Writes
bench/results/bench.json and bench/results/bench.png and prints a Markdown table.
"""

import argparse
import json
import platform
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path

import httpx
import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.loadgen import run_load  # noqa: E402
from predictor.engine import InferenceEngine  # noqa: E402
from predictor.weights import PACKAGED_DIR, load_model  # noqa: E402


def start(command: list[str], health_url: str) -> subprocess.Popen:
    process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        try:
            if httpx.get(health_url, timeout=2).status_code == 200:
                return process
        except httpx.TransportError:
            pass
        if process.poll() is not None:
            raise SystemExit(f"{command} exited with {process.returncode}")
        time.sleep(0.5)
    process.kill()
    raise SystemExit(f"{command} not ready")


def model_only_throughput(batch: int, seconds: float) -> float:
    """Images/s of the served engine alone (same device and precision), on full batches."""
    network, _ = load_model(PACKAGED_DIR)
    engine = InferenceEngine(network)
    images = np.random.default_rng(0).integers(0, 256, (batch, 32, 32, 3), dtype=np.uint8)
    for _ in range(3):
        engine.logits(images)
    done, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        engine.logits(images)
        done += batch
    return done / (time.perf_counter() - started)


def load_images(count: int) -> list[bytes]:
    files = sorted((ROOT / "tests" / "images").glob("*.jpg"))
    return [f.read_bytes() for f in files][:count]


def chart(results: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (tput, p99) = plt.subplots(1, 2, figsize=(10, 4))
    for name, rows in results["servers"].items():
        levels = [r["concurrency"] for r in rows]
        tput.plot(levels, [r["throughput"] for r in rows], marker="o", label=name)
        p99.plot(levels, [r["p99_ms"] for r in rows], marker="o", label=name)
    tput.axhline(results["model_only_images_per_second"], color="gray", linestyle="--", label="model only")
    tput.set(xlabel="concurrent clients", ylabel="requests/s", title="Throughput", xscale="log", xticks=levels)
    p99.set(xlabel="concurrent clients", ylabel="ms", title="p99 latency", xscale="log", yscale="log", xticks=levels)
    for ax in (tput, p99):
        ax.set_xticklabels([str(x) for x in levels])
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=15)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32, 64])
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    args = parser.parse_args()

    predictor_port, baseline_port = 18180, 18190
    servers = {
        "predictor": (start([sys.executable, "-m", "predictor", "--http_port", str(predictor_port), "--enable_grpc", "false"],
                            f"http://127.0.0.1:{predictor_port}/health"), f"http://127.0.0.1:{predictor_port}/classify/image"),
        "seed-style baseline": (start([sys.executable, "bench/baseline_server.py", "--port", str(baseline_port)],
                                      f"http://127.0.0.1:{baseline_port}/health"), f"http://127.0.0.1:{baseline_port}/classify/image"),
    }
    images = load_images(20)
    results = {"machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads, "
                          f"{subprocess.run(['nproc'], capture_output=True, text=True).stdout.strip()} cores",
               "seconds_per_point": args.seconds, "servers": {name: [] for name in servers}}
    try:
        for concurrency in args.concurrency:
            for name, (_, url) in servers.items():
                result = run_load(url, images, concurrency, args.seconds)
                results["servers"][name].append(asdict(result))
                print(f"{name:>20} c={concurrency:<3} {result.throughput:7.1f} req/s  p50 {result.p50_ms:7.1f} ms  "
                      f"p95 {result.p95_ms:7.1f}  p99 {result.p99_ms:7.1f}  errors {result.errors}  "
                      f"client CPU {result.client_cpu_share:.2f} core", flush=True)
    finally:
        for process, _ in servers.values():
            process.terminate()
            process.wait(30)
    results["model_only_images_per_second"] = round(model_only_throughput(32, args.seconds), 1)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "bench.json").write_text(json.dumps(results, indent=2) + "\n")
    chart(results, args.out / "bench.png")

    print(f"\nmodel only (batch 32, served precision): {results['model_only_images_per_second']} images/s\n")
    print("| server | clients | req/s | p50 ms | p95 ms | p99 ms | errors |")
    print("|---|---|---|---|---|---|---|")
    for name, rows in results["servers"].items():
        for r in rows:
            print(f"| {name} | {r['concurrency']} | {r['throughput']} | {r['p50_ms']} | {r['p95_ms']} | {r['p99_ms']} | {r['errors']} |")


if __name__ == "__main__":
    main()
