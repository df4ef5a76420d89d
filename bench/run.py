"""`make bench`: the predictor vs the seed-style baseline, and the model alone, in one run.

    python bench/run.py --seconds 15 --concurrency 1 8 32 64 256

All servers run at once (an idle one costs nothing); each concurrency level is measured on each
server in turn, so drift of the machine hits all alike:
- predictor: the defaults (on a CPU: ONNX Runtime int8) but rate limit and result cache off, started
  with empty compile caches;
- predictor, torch fp32 eager: the same server with the seed's arithmetic (separates what batching
  and the server gain from what quantization gains);
- seed-style baseline: one fp32 forward per request in FastAPI's thread pool, torch's default threads,
  and the same with one intra-op thread per request thread (no oversubscription of the cores);
- plain ONNX Runtime server: what a user could write instead on the same engine (bench/peers/plain_onnx_server.py:
  Starlette, one int8 ONNX Runtime call per request, the predictor's decoding and answer, no gates).
Each server's idle RSS is read once it is ready.
Then the model alone, per engine and precision, at batch 1 and at the served batch size. Writes
bench/results/bench.json and bench/results/bench.png and prints Markdown tables.
"""

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import httpx
import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.loadgen import run_load  # noqa: E402
from predictor.engines.onnx_int8 import OnnxEngine, onnx_int8_path  # noqa: E402
from predictor.engines.selection import usable_cores  # noqa: E402
from predictor.engines.torch_engine import InferenceEngine  # noqa: E402
from predictor.weights import PACKAGED_DIR, calibration_images, load_model  # noqa: E402


def predictor_command(port: int, *flags: str) -> list[str]:
    """`python -m predictor` as every benchmark runs it: rate limit off, and the result cache off, so
    a benchmark that sends the same images again measures computing them, not the cache
    (bench/jobs.py measures the cache)."""
    return [sys.executable, "-m", "predictor", "--http_port", str(port), "--enable_grpc", "false",
            "--rate_limit_per_minute", "0", "--cache_ttl_s", "0", *flags]


def start(command: list[str], health_url: str, env: dict | None = None,
          deadline_s: float = 900) -> tuple[subprocess.Popen, float]:
    """(process, seconds from exec to /health 200); torch compilation at load takes minutes on 2 cores."""
    started = time.monotonic()
    process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               env={**os.environ, **(env or {})})
    deadline = started + deadline_s
    while time.monotonic() < deadline:
        try:
            if httpx.get(health_url, timeout=2).status_code == 200:
                return process, round(time.monotonic() - started, 1)
        except httpx.TransportError:
            pass
        if process.poll() is not None:
            raise SystemExit(f"{command} exited with {process.returncode}")
        time.sleep(0.5)
    process.kill()
    raise SystemExit(f"{command} not ready")


def model_only(spec: str, batch: int, seconds: float, device: str = "cpu") -> dict:
    """One engine alone (spec `onnx-int8`, or a torch `PRECISION` compiled / `PRECISION:eager`):
    batch-1 latency and full-batch images/s, plus its load time."""
    network, card = load_model(PACKAGED_DIR)
    if spec == "onnx-int8":
        engine = OnnxEngine(onnx_int8_path(PACKAGED_DIR, card), batch, usable_cores())
    else:
        precision = spec.split(":")[0]
        calibration = calibration_images(PACKAGED_DIR, card) if precision == "int8" else None
        engine = InferenceEngine(network, device, precision, batch, calibration, not spec.endswith(":eager"))
    row = {"device": engine.device_type, "engine": engine.name, "precision": engine.precision,
           "compiled": engine.compiled, "load_seconds": engine.startup_seconds}
    for size, key in ((1, "batch1_ms"), (batch, "full_batch_images_per_second")):
        images = np.random.default_rng(0).integers(0, 256, (size, 32, 32, 3), dtype=np.uint8)
        for _ in range(3):
            engine.logits(images)
        done, started = 0, time.perf_counter()
        while time.perf_counter() - started < seconds / 2:
            engine.logits(images)
            done += 1
        elapsed = time.perf_counter() - started
        row[key] = round(elapsed / done * 1000, 2) if size == 1 else round(done * size / elapsed, 1)
    return row


def served_engine(base_url: str) -> dict:
    """What the running predictor chose at start-up (device, precision, compiled), from its v2 metadata."""
    name = httpx.get(f"{base_url}/health", timeout=5).json()["name"]
    return httpx.get(f"{base_url}/v2/models/{name}", timeout=5).json()["parameters"]


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
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32, 64, 256])
    parser.add_argument("--precisions", nargs="+", default=["onnx-int8", "fp32:eager", "fp32", "int8"],
                        help="model-only rows: onnx-int8, or a torch PRECISION (compiled) or PRECISION:eager")
    parser.add_argument("--device", default="cpu", help="device of the model-only rows (the server's: --server-args --device)")
    parser.add_argument("--batch", type=int, default=32, help="full batch of the model-only rows (the server's max_batch_size)")
    parser.add_argument("--server-args", nargs="*", default=[], help="extra predictor flags, e.g. --precision bf16")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    args = parser.parse_args()

    def predictor(port: int, *flags: str, env: dict | None = None) -> tuple[subprocess.Popen, float]:
        return start(predictor_command(port, *flags), f"http://127.0.0.1:{port}/health", env)

    def baseline(port: int, *flags: str) -> tuple[subprocess.Popen, float]:
        return start([sys.executable, "bench/baseline_server.py", "--port", str(port), *flags],
                     f"http://127.0.0.1:{port}/health")

    def plain_onnx(port: int) -> tuple[subprocess.Popen, float]:
        return start([sys.executable, "bench/peers/plain_onnx_server.py", "--port", str(port)], f"http://127.0.0.1:{port}/health")

    caches = tempfile.mkdtemp(prefix="bench-caches-")  # a new pod on a new node: nothing cached
    launch = {
        "predictor": (18180, lambda: predictor(18180, *args.server_args,
                                                env={"TORCHINDUCTOR_CACHE_DIR": caches, "TRITON_CACHE_DIR": caches})),
        "predictor, torch fp32 eager": (18181, lambda: predictor(18181, "--engine", "torch", "--precision", "fp32",
                                                                 "--compile", "false", *args.server_args)),
        "seed-style baseline": (18190, lambda: baseline(18190)),
        "seed-style baseline, 1 torch thread": (18191, lambda: baseline(18191, "--torch-threads", "1")),
        "plain ONNX Runtime server": (18192, lambda: plain_onnx(18192)),
    }
    servers, start_to_ready, idle_rss_mb = {}, {}, {}
    for name, (port, launcher) in launch.items():
        process, start_to_ready[name] = launcher()
        time.sleep(2)  # idle: nothing left of the start-up
        status = Path(f"/proc/{process.pid}/status").read_text()
        idle_rss_mb[name] = round(int(status.split("VmRSS:")[1].split()[0]) / 1024)
        servers[name] = (process, f"http://127.0.0.1:{port}/classify/image")
    served = served_engine("http://127.0.0.1:18180")
    images = load_images(20)
    results = {"machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads, "
                          f"{subprocess.run(['nproc'], capture_output=True, text=True).stdout.strip()} cores",
               "seconds_per_point": args.seconds, "predictor_serves": served,
               "start_to_ready_seconds": start_to_ready, "idle_rss_mb": idle_rss_mb,
               "servers": {name: [] for name in servers}}
    try:
        for concurrency in args.concurrency:
            for name, (_, url) in servers.items():
                result = run_load(url, images, concurrency, args.seconds)
                results["servers"][name].append(asdict(result))
                print(f"{name:>20} c={concurrency:<3} {result.throughput:7.1f} req/s  p50 {result.p50_ms:7.1f} ms  "
                      f"p95 {result.p95_ms:7.1f}  p99 {result.p99_ms:7.1f}  errors {result.errors}  shed {result.shed}  "
                      f"client CPU {result.client_cpu_share:.2f} core", flush=True)
    finally:
        for process, _ in servers.values():
            process.terminate()
            process.wait(30)
    results["model_only"] = [model_only(spec, args.batch, args.seconds, args.device) for spec in args.precisions]
    served_row = next((r for r in results["model_only"] if r["engine"] == served["engine"]
                       and r["precision"] == served["precision"] and r["compiled"] == served["compiled"]), None)
    results["model_only_images_per_second"] = served_row["full_batch_images_per_second"] if served_row else float("nan")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "bench.json").write_text(json.dumps(results, indent=2) + "\n")
    chart(results, args.out / "bench.png")

    print(f"\n| model only ({args.device}) | batch 1 ms | batch {args.batch} img/s | load s |")
    print("|---|---|---|---|")
    for r in results["model_only"]:
        print(f"| {r['engine']} {r['precision']}{' compiled' if r['compiled'] else ''} | {r['batch1_ms']} | "
              f"{r['full_batch_images_per_second']} | {r['load_seconds']} |")
    print(f"\npredictor serves {results['predictor_serves']}")
    print(f"start to /health 200 (s): {start_to_ready}")
    print(f"idle RSS (MB): {idle_rss_mb}\n")
    baseline_rows = {r["concurrency"]: r for r in results["servers"]["seed-style baseline"]}
    plain_rows = {r["concurrency"]: r for r in results["servers"]["plain ONNX Runtime server"]}
    for r in results["servers"]["predictor"]:
        plain = plain_rows[r["concurrency"]]
        print(f"c={r['concurrency']}: predictor / seed-style baseline = {r['throughput'] / baseline_rows[r['concurrency']]['throughput']:.2f}x, "
              f"/ plain ONNX Runtime server = {r['throughput'] / plain['throughput']:.2f}x (p50 {r['p50_ms']} vs {plain['p50_ms']} ms), "
              f"HTTP / model alone = {r['throughput'] / results['model_only_images_per_second']:.0%}")
    print()
    print("| server | clients | req/s | p50 ms | p95 ms | p99 ms | errors | shed (503) |")
    print("|---|---|---|---|---|---|---|---|")
    for name, rows in results["servers"].items():
        for r in rows:
            print(f"| {name} | {r['concurrency']} | {r['throughput']} | {r['p50_ms']} | {r['p95_ms']} | {r['p99_ms']} | "
                  f"{r['errors']} | {r['shed']} |")


if __name__ == "__main__":
    main()
