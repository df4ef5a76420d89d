"""`make bench`: the predictor vs the servers a user would pick instead, the seed-style baseline, and the
model alone, in one run.

    python bench/run.py --seconds 15 --concurrency 1 8 32 64 256

The servers run at once (an idle one costs nothing) and each concurrency level is measured on each
server in turn, so drift of the machine hits all alike; Ray Serve alone comes after them, since its
local cluster is not idle when idle:
- predictor: the defaults (on a CPU: ONNX Runtime int8) but rate limit and result cache off, started
  with empty compile caches;
- predictor, torch fp32 eager: the same server with the seed's arithmetic (separates what batching
  and the server gain from what quantization gains);
- seed-style baseline: one fp32 forward per request in FastAPI's thread pool, torch's default threads,
  and the same with one intra-op thread per request thread (no oversubscription of the cores);
- the peers (bench/peers/): what a user could run instead on the same engine, decoding and answer, no gates:
  a plain Starlette server with one int8 ONNX Runtime call per request, MLServer's adaptive batching,
  BentoML's adaptive batching, Ray Serve's @serve.batch, and Triton's dynamic batcher through PyTriton
  (each in its own environment, `make bench-peers`). Triton has no multipart endpoint: it is measured in
  two pairings, the predictor's multipart uploads against Triton's v2 infer with the files as BYTES
  (tritonclient's default binary form), and the predictor's v2 binary UINT8 `pixels` request against the
  identical request to Triton (the row "predictor, v2 binary pixels").
Each server's idle RSS (its process tree's) is read once it is ready. Then the predictor past saturation:
1,024 closed-loop clients and an open-loop offered rate of 4x its best rate of the sweep.
Then the model alone, per engine and precision, at batch 1 and at the served batch size. Writes
bench/results/bench.json and bench/results/bench.png and prints Markdown tables.
"""

import argparse
import asyncio
import contextlib
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
import psutil
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.loadgen import Probe, open_loop, run_load  # noqa: E402
from bench.peers import PEERS  # noqa: E402
from bench.v2_requests import http_load  # noqa: E402
from predictor.engines.devices import usable_cores  # noqa: E402
from predictor.engines.onnx_int8 import OnnxEngine, onnx_int8_path  # noqa: E402
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
    stop(process)
    raise SystemExit(f"{command} not ready")


def tree_rss_mb(pid: int) -> int:
    """Resident memory of a server: the process and every process it started (workers, a local Ray
    cluster), summed; pages they share are counted in each."""
    root = psutil.Process(pid)
    return round(sum(p.memory_info().rss for p in [root, *root.children(recursive=True)]) / 2**20)


def stop(process: subprocess.Popen) -> None:
    """SIGTERM to the server, then to whatever it started that is left; SIGKILL after 30 s."""
    try:
        children = psutil.Process(process.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        children = []
    process.terminate()
    try:
        process.wait(30)
    except subprocess.TimeoutExpired:
        process.kill()
    for child in children:
        with contextlib.suppress(psutil.NoSuchProcess):
            child.terminate()
    for child in psutil.wait_procs(children, timeout=30)[1]:
        child.kill()


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


def overload(server: tuple[subprocess.Popen, str], sweep: list[dict], images: list[bytes], seconds: float) -> dict:
    """The predictor past saturation (its best closed-loop rate in this run): 1,024 closed-loop clients,
    then an open-loop offered rate of 4x saturation. Goodput, the refusals' own latency, and
    anything that was neither answered nor refused (errors: lost); beside each load, a probe caller
    in a process of its own (loadgen.Probe) reports what one caller sees without the load generator's
    saturated event loop in its latencies."""
    process, url = server
    saturation = max(r["throughput"] for r in sweep)
    with Probe(url, images[0]) as closed_probe:
        closed = asdict(run_load(url, images, 1024, seconds))
    with Probe(url, images[0]) as open_probe:
        opened = asyncio.run(open_loop(url, images, 4 * saturation, seconds, process.pid))
    closed["probe"], opened["probe"] = closed_probe.report(), open_probe.report()
    report = {"saturation_rps": saturation, "closed_loop_c1024": closed, "open_loop_4x": opened}
    print(f"overload: saturation {saturation} req/s; c=1024 closed loop {closed['throughput']} req/s "
          f"({closed['throughput'] / saturation:.0%}), p99 {closed['p99_ms']} ms, {closed['shed']} refused "
          f"(p99 {closed['shed_p99_ms']} ms), {closed['errors']} errors, load generator {closed['client_cpu_share']} core; "
          f"open loop at {opened['rate']} req/s: goodput {opened['goodput_rps']} req/s "
          f"({opened['goodput_rps'] / saturation:.0%}), statuses {opened['statuses']}, refusal p99 "
          f"{opened['refusal_p99_ms']} ms, load generator {opened['client_cpu_share']} core; a probe caller in a process "
          f"of its own saw refusal p99 {closed['probe']['refusal_p99_ms']} / {opened['probe']['refusal_p99_ms']} ms "
          f"(closed / open loop)", flush=True)
    return report


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
    parser.add_argument("--only", nargs="+", default=[], help="measure only the servers whose name contains one of these "
                        "(the predictor always), e.g. --only plain MLServer")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    args = parser.parse_args()

    def predictor(port: int, *flags: str, env: dict | None = None) -> tuple[subprocess.Popen, float]:
        return start(predictor_command(port, *flags), f"http://127.0.0.1:{port}/health", env)

    def baseline(port: int, *flags: str) -> tuple[subprocess.Popen, float]:
        return start([sys.executable, "bench/baseline_server.py", "--port", str(port), *flags],
                     f"http://127.0.0.1:{port}/health")

    def peer(port: int, which) -> tuple[subprocess.Popen, float]:
        return start(which.command(port), f"http://127.0.0.1:{port}{which.ready_path}", which.environment())

    caches = tempfile.mkdtemp(prefix="bench-caches-")  # a new pod on a new node: nothing cached
    v2_infer = "/v2/models/cifar10-resnet18/infer"
    launch = {
        "predictor": (18180, lambda: predictor(18180, *args.server_args,
                                                env={"TORCHINDUCTOR_CACHE_DIR": caches, "TRITON_CACHE_DIR": caches})),
        "predictor, torch fp32 eager": (18181, lambda: predictor(18181, "--engine", "torch", "--precision", "fp32",
                                                                 "--compile", "false", *args.server_args)),
        "seed-style baseline": (18190, lambda: baseline(18190)),
        "seed-style baseline, 1 torch thread": (18191, lambda: baseline(18191, "--torch-threads", "1")),
        **{p.name: (18192 + i, lambda p=p, i=i: peer(18192 + i, p)) for i, p in enumerate(PEERS)},
    }
    if args.only:
        launch = {name: how for name, how in launch.items() if name == "predictor" or any(w in name for w in args.only)}
    # What each server is measured with: (row, path, request kind); multipart /classify/image unless its peer
    # says otherwise. The predictor's v2 binary pixels row is the other side of a peer's (Triton's).
    measured = {name: [(name, "/classify/image", "multipart")] for name in launch}
    for p in PEERS:
        if p.name in launch:
            measured[p.name] = [(p.row_name(suffix), path, kind) for suffix, path, kind in p.rows]
    if any(kind == "v2-binary-pixels" for rows in measured.values() for _, _, kind in rows):
        measured["predictor"].append(("predictor, v2 binary pixels", v2_infer, "v2-binary-pixels"))
    # A local Ray cluster keeps ~0.1 core busy while idle: Ray Serve is measured alone, after the others.
    alone = {p.name for p in PEERS if p.venv == "ray"}
    images = load_images(20)
    results = {"machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads, "
                          f"{subprocess.run(['nproc'], capture_output=True, text=True).stdout.strip()} cores",
               "seconds_per_point": args.seconds, "start_to_ready_seconds": {}, "idle_rss_mb": {},
               "servers": {row: [] for rows in measured.values() for row, _, _ in rows}}

    def launched(names) -> dict:
        servers = {}
        for name in names:
            port, launcher = launch[name]
            process, results["start_to_ready_seconds"][name] = launcher()
            time.sleep(2)  # idle: nothing left of the start-up
            results["idle_rss_mb"][name] = tree_rss_mb(process.pid)
            servers[name] = (process, [(row, f"http://127.0.0.1:{port}{path}", *http_load(kind, images))
                                       for row, path, kind in measured[name]])
        return servers

    def sweep(servers: dict) -> None:
        for concurrency in args.concurrency:
            for _, rows in servers.values():
                for row, url, items, options in rows:
                    result = run_load(url, items, concurrency, args.seconds, **options)
                    results["servers"][row].append(asdict(result))
                    print(f"{row:>36} c={concurrency:<4} {result.throughput:7.1f} req/s  p50 {result.p50_ms:7.1f} ms  "
                          f"p95 {result.p95_ms:7.1f}  p99 {result.p99_ms:7.1f}  errors {result.errors}  shed {result.shed}  "
                          f"client CPU {result.client_cpu_share:.2f} core", flush=True)

    for block in ([n for n in launch if n not in alone], [n for n in launch if n in alone]):
        servers = launched(block)
        try:
            if "predictor" in servers:
                results["predictor_serves"] = served_engine("http://127.0.0.1:18180")
            sweep(servers)
            if "predictor" in servers:
                process, rows = servers["predictor"]
                results["overload"] = overload((process, rows[0][1]), results["servers"]["predictor"], images, args.seconds)
        finally:
            for process, _ in servers.values():
                stop(process)
    served = results["predictor_serves"]
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
    print(f"start to ready (s): {results['start_to_ready_seconds']}")
    print(f"idle RSS (MB): {results['idle_rss_mb']}\n")
    rows = {name: {r["concurrency"]: r for r in found} for name, found in results["servers"].items()}
    peers = [p.name for p in PEERS if p.name in rows]  # those that take the same multipart uploads
    for r in results["servers"]["predictor"]:
        level = r["concurrency"]
        line = f"c={level}: predictor {r['throughput']} req/s (p50 {r['p50_ms']} ms)"
        if peers:
            best = max(peers, key=lambda name: rows[name][level]["throughput"])
            line += f", {r['throughput'] / rows[best][level]['throughput']:.2f}x the best peer ({best})"
        for name in peers:
            line += f"; {name} {rows[name][level]['throughput']} req/s (p50 {rows[name][level]['p50_ms']} ms)"
        if "seed-style baseline" in rows:
            line += f"; {r['throughput'] / rows['seed-style baseline'][level]['throughput']:.2f}x the seed-style baseline"
        print(line + f"; {r['throughput'] / results['model_only_images_per_second']:.0%} of the model alone")
    for p in PEERS:  # a peer without multipart (Triton): its own pairings
        for suffix, _, kind in p.rows if p.name in launch and p.name not in rows else ():
            ours = "predictor" if kind.startswith("v2-binary-bytes") else "predictor, v2 binary pixels"
            theirs = p.row_name(suffix)
            for level in rows[ours]:
                a, b = rows[ours][level], rows[theirs][level]
                print(f"c={level}: {ours} {a['throughput']} req/s (p50 {a['p50_ms']} ms, p99 {a['p99_ms']} ms) vs {theirs} "
                      f"{b['throughput']} req/s (p50 {b['p50_ms']} ms, p99 {b['p99_ms']} ms): {a['throughput'] / b['throughput']:.2f}x")
    print()
    print("| server | clients | req/s | p50 ms | p95 ms | p99 ms | errors | shed (503) |")
    print("|---|---|---|---|---|---|---|---|")
    for name, found in results["servers"].items():
        for r in found:
            print(f"| {name} | {r['concurrency']} | {r['throughput']} | {r['p50_ms']} | {r['p95_ms']} | {r['p99_ms']} | "
                  f"{r['errors']} | {r['shed']} |")


if __name__ == "__main__":
    main()
