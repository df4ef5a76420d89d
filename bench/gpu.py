"""The GPU benchmark in one run (`bench/gpu.sh` on a machine with one NVIDIA GPU; not in CI).

    python bench/gpu.py --out DIR [--budget-s 420]

Sections, in order of importance, each written to DIR/gpu.json as soon as it is done (so a run cut
short keeps what it measured), each skipped once the time budget is spent:
1. correctness: each CUDA precision classifies the 2,000 shipped held-out images through the served
   preprocessing like the CPU path does (the CPU default, ONNX Runtime int8, and torch fp32);
2. the model alone per precision (eager, and fp16 compiled with CUDA graphs as served) at batch
   1/32/256/1024: images/s, latency, start-up, GPU memory;
3. HTTP: the predictor as the chart runs it on a GPU node (fp16, compiled), pinned to its own cores,
   against load generators pinned to the others, for workers x concurrency points: req/s, p50/p99,
   errors, sheds, GPU utilisation, images per forward pass; plus one answer per endpoint checked;
4. compiled bf16 and fp32 (start-up, agreement), if time is left.
`--device cpu` dry-runs every code path on a machine without a GPU (CPU precisions instead).
"""

import argparse
import concurrent.futures
import json
import multiprocessing
import os
import platform
import re
import subprocess
import sys
import tarfile
import threading
import time
from dataclasses import asdict
from pathlib import Path

import httpx
import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.loadgen import collect, summarize  # noqa: E402
from bench.run import predictor_command, start  # noqa: E402
from predictor.cifar import CLASSES  # noqa: E402
from predictor.core.imaging import decode_image  # noqa: E402
from predictor.engines.onnx_int8 import OnnxEngine, onnx_int8_path  # noqa: E402
from predictor.engines.torch_engine import InferenceEngine  # noqa: E402
from predictor.weights import PACKAGED_DIR, load_model  # noqa: E402

HOLDOUT = ROOT / "tests" / "data" / "holdout.tar.gz"
STARTED = time.monotonic()


def elapsed() -> float:
    return time.monotonic() - STARTED


def held_out() -> tuple[list[bytes], np.ndarray, np.ndarray]:
    """The 2,000 held-out JPEGs, decoded as the server decodes them, and their labels."""
    with tarfile.open(HOLDOUT) as tar:
        pairs = [(tar.extractfile(m).read(), CLASSES.index(m.name.split("/")[0])) for m in tar.getmembers() if m.isfile()]
    jpegs = [data for data, _ in pairs]
    return jpegs, np.stack([decode_image(data) for data in jpegs]), np.array([label for _, label in pairs])


def softmax(logits: np.ndarray) -> np.ndarray:
    exp = np.exp(logits - logits.max(1, keepdims=True))
    return exp / exp.sum(1, keepdims=True)


def compare(logits: np.ndarray, reference: dict, labels: np.ndarray) -> dict:
    row = {"accuracy": round(float((logits.argmax(1) == labels).mean()), 4)}
    for name, ref in reference.items():
        row[f"argmax_agreement_with_{name}"] = round(float((logits.argmax(1) == ref.argmax(1)).mean()), 4)
        row[f"max_prob_diff_vs_{name}"] = round(float(np.abs(softmax(logits) - softmax(ref)).max()), 4)
    return row


def timed(engine, batch: int, seconds: float) -> dict:
    images = np.random.default_rng(0).integers(0, 256, (batch, 32, 32, 3), dtype=np.uint8)
    for _ in range(3):
        engine.logits(images)
    done, began = 0, time.perf_counter()
    while time.perf_counter() - began < seconds:
        engine.logits(images)
        done += 1
    took = time.perf_counter() - began
    return {"batch": batch, "latency_ms": round(took / done * 1000, 3), "images_per_second": round(done * batch / took, 1)}


def model_alone(network, device: str, precision: str, compile: bool, max_batch: int, images: np.ndarray,
                labels: np.ndarray, reference: dict, batches: list[int], seconds: float) -> tuple[dict, np.ndarray]:
    """(the row, the engine's classes for the images)."""
    if device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    engine = InferenceEngine(network, device, precision, max_batch, compile=compile)
    row = {"precision": engine.precision, "compiled": compile, "max_batch_size": max_batch,
           "startup_seconds": engine.startup_seconds}
    logits = engine.logits(images)
    row |= compare(logits, reference, labels)
    row["speed"] = [timed(engine, batch, seconds) for batch in batches]
    if device == "cuda":
        row["peak_gpu_memory_mib"] = round(torch.cuda.max_memory_allocated() / 2**20)
    del engine
    return row, logits.argmax(1)


class GpuSampler:
    """Mean GPU utilisation and memory in use while a load point runs (NVML; nothing on a CPU)."""

    def __init__(self):
        try:
            import pynvml
            pynvml.nvmlInit()
            self.nvml, self.handle = pynvml, pynvml.nvmlDeviceGetHandleByIndex(0)
        except Exception:  # no NVML here: the CPU dry run
            self.nvml = None
        self.samples: list[tuple[int, int]] = []
        self._stop = threading.Event()

    def __enter__(self):
        def sample():
            while not self._stop.wait(0.2):
                util = self.nvml.nvmlDeviceGetUtilizationRates(self.handle)
                memory = self.nvml.nvmlDeviceGetMemoryInfo(self.handle)
                self.samples.append((util.gpu, memory.used // 2**20))
        if self.nvml:
            self._thread = threading.Thread(target=sample, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()

    def summary(self) -> dict:
        if not self.samples:
            return {}
        return {"gpu_util_mean_pct": round(float(np.mean([s[0] for s in self.samples])), 1),
                "gpu_memory_used_mib": max(s[1] for s in self.samples)}


def metric_sums(base: str) -> tuple[float, float]:
    """(images, forward passes) so far, from the server's batch-size histogram."""
    text = httpx.get(f"{base}/metrics", timeout=10).text
    total = float(re.search(r"^predictor_batch_size_sum (\S+)", text, re.M).group(1))
    count = float(re.search(r"^predictor_batch_size_count (\S+)", text, re.M).group(1))
    return total, count


def _generator(args: tuple) -> object:
    core, url, images, concurrency, seconds = args
    if core is not None:
        os.sched_setaffinity(0, {core})
    return collect(url, images, concurrency, seconds)


def http_point(pool, base: str, jpegs: list[bytes], concurrency: int, seconds: float, client_cores: list[int]) -> dict:
    generators = min(len(client_cores), concurrency)
    shares = [concurrency // generators + (i < concurrency % generators) for i in range(generators)]
    images_before, passes_before = metric_sums(base)
    with GpuSampler() as gpu:
        parts = list(pool.map(_generator, [(client_cores[i], f"{base}/classify/image", jpegs, share, seconds)
                                           for i, share in enumerate(shares)]))
    images_after, passes_after = metric_sums(base)
    passes = passes_after - passes_before
    row = asdict(summarize(parts, concurrency, seconds)) | gpu.summary()
    row["images_per_forward_pass"] = round((images_after - images_before) / passes, 1) if passes else None
    row["forward_passes_per_second"] = round(passes / (seconds + 2), 1)  # the 2 s warm-up is counted too
    return row


def check_endpoints(base: str, jpegs: list[bytes], labels: np.ndarray, expected: np.ndarray) -> dict:
    """One answer per endpoint, compared with the in-process engine's classes on the same images."""
    import base64

    name = httpx.get(f"{base}/health", timeout=10).json()["name"]
    checks = {"health": httpx.get(f"{base}/health", timeout=10).status_code == 200}
    answers = [httpx.post(f"{base}/classify/image", files={"file": ("x.jpg", data, "image/jpeg")}, timeout=30).json()
               for data in jpegs[:20]]
    checks["classify_image_matches_engine"] = [a["predicted_class"] for a in answers] == [CLASSES[i] for i in expected[:20]]
    batch = httpx.post(f"{base}/classify/batch", files=[("files", (f"{i}.jpg", d, "image/jpeg")) for i, d in enumerate(jpegs[:16])],
                       timeout=30)
    checks["classify_batch"] = batch.status_code == 200 and batch.text.count("predicted_class") == 16
    v1 = httpx.post(f"{base}/v1/models/{name}:predict",
                    json={"instances": [{"image": {"b64": base64.b64encode(jpegs[0]).decode()}}]}, timeout=30)
    checks["v1_predict"] = v1.status_code == 200 and CLASSES[expected[0]] in v1.text
    v2 = httpx.post(f"{base}/v2/models/{name}/infer", json={"inputs": [{
        "name": "image", "shape": [1], "datatype": "BYTES", "data": [base64.b64encode(jpegs[1]).decode()]}]}, timeout=30)
    checks["v2_infer"] = v2.status_code == 200 and CLASSES[expected[1]] in v2.text
    checks["v1_status"], checks["v2_status"] = v1.status_code, v2.status_code
    if not (checks["v1_predict"] and checks["v2_infer"]):
        checks["v1_body"], checks["v2_body"] = v1.text[:300], v2.text[:300]
    return checks


def environment(device: str) -> dict:
    info = {"torch": torch.__version__, "python": platform.python_version(), "cpus": os.cpu_count(),
            "cpu": platform.processor() or platform.machine()}
    if device == "cuda":
        smi = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
                             capture_output=True, text=True).stdout.strip()
        info |= {"gpu": smi, "cuda_runtime": torch.version.cuda}
    return info


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    parser.add_argument("--budget-s", type=float, default=420, help="skip what would start after this many seconds")
    parser.add_argument("--seconds", type=float, default=8, help="per model-alone size and per HTTP point")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 32, 256, 1024])
    parser.add_argument("--server-cores", type=int, default=12, help="cores 0..N-1 for the server, the rest for load")
    parser.add_argument("--points", default="1:1,64,256,1024;4:64,256,1024;8:256,1024",
                        help="workers:concurrency list per server configuration")
    parser.add_argument("--max-batch", type=int, default=256)
    parser.add_argument("--http-only", action="store_true", help="skip the model-alone sections (a second run)")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    results: dict = {"environment": environment(args.device), "command": " ".join(sys.argv)}

    def save(section: str, value) -> None:
        results[section] = value
        results["elapsed_seconds"] = round(elapsed(), 1)
        (args.out / "gpu.json").write_text(json.dumps(results, indent=1) + "\n")
        latest = value[-1] if isinstance(value, list) and value else value
        print(f"[{elapsed():6.1f} s] {section}: {json.dumps(latest)[:1200]}", flush=True)

    save("environment", results["environment"])
    network, card = load_model(PACKAGED_DIR)
    jpegs, images, labels = held_out()
    cores = sorted(os.sched_getaffinity(0))
    reference = {"cpu_fp32": InferenceEngine(network, "cpu", "fp32", 250, compile=False).logits(images),
                 "cpu_onnx_int8": OnnxEngine(onnx_int8_path(PACKAGED_DIR, card), 250, len(cores)).logits(images)}
    save("cpu_reference", {name: compare(logits, {}, labels) for name, logits in reference.items()})

    precisions = ["fp16", "bf16", "fp32"] if args.device == "cuda" else ["fp32", "bf16"]
    served = precisions[0]
    eager = []
    for precision in precisions if not args.http_only else []:
        eager.append(model_alone(network, args.device, precision, False, args.max_batch, images, labels, reference,
                                 args.batches, args.seconds / 4)[0])
        save("model_alone_eager", eager)
    compile_flag = "true"
    try:
        if args.http_only:
            raise RuntimeError("skipped (--http-only)")
        row, expected = model_alone(network, args.device, served, True, args.max_batch, images, labels, reference,
                                    args.batches, args.seconds / 4)
    except Exception as exc:  # recorded, and the servers below run eager instead
        row = {"precision": served, "compiled": True, "error": repr(exc)[:500]}
        compile_flag = "true" if args.http_only else "false"
        expected = InferenceEngine(network, args.device, served, args.max_batch, compile=False).logits(images).argmax(1)
    compiled = [row]
    save("model_alone_compiled", compiled)

    server_cores, client_cores = cores[:args.server_cores], cores[args.server_cores:] or cores[-1:]
    http: list[dict] = []
    spawn = multiprocessing.get_context("spawn")  # the load generators never touch CUDA, nor inherit its state
    with concurrent.futures.ProcessPoolExecutor(len(client_cores), mp_context=spawn) as pool:
        for config in args.points.split(";"):
            workers, levels = config.split(":")
            if elapsed() > args.budget_s:
                break
            port = 18280
            flags = ["--device", args.device, "--compile", compile_flag, "--max_batch_size", str(args.max_batch), "--workers", workers,
                     "--decode_threads", str(max(1, 8 // int(workers)))]
            command = ["taskset", "-c", ",".join(map(str, server_cores)), *predictor_command(port, *flags)]
            try:
                process, ready_s = start(command, f"http://127.0.0.1:{port}/health", deadline_s=180)
            except SystemExit as exc:
                http.append({"workers": int(workers), "error": str(exc)})
                save("http", http)
                continue
            base = f"http://127.0.0.1:{port}"
            try:
                entry = {"workers": int(workers), "flags": " ".join(flags), "start_to_ready_s": ready_s,
                         "server_cores": len(server_cores), "client_cores": len(client_cores)}
                entry["points"] = []
                try:
                    if workers == "1":
                        entry["endpoints"] = check_endpoints(base, jpegs, labels, expected)
                    for level in map(int, levels.split(",")):
                        if elapsed() > args.budget_s:
                            break
                        entry["points"].append(http_point(pool, base, jpegs[:500], level, args.seconds, client_cores))
                        save("http", http + [entry])
                except Exception as exc:  # recorded; the next configuration still runs
                    entry["error"] = repr(exc)[:500]
                http.append(entry)
            finally:
                process.terminate()
                process.wait(60)
    save("http", http)
    for precision in precisions[1:]:
        if elapsed() > args.budget_s or args.http_only:
            break
        try:
            compiled.append(model_alone(network, args.device, precision, True, 32, images, labels, reference, [1, 32],
                                        args.seconds / 4)[0])
        except Exception as exc:
            compiled.append({"precision": precision, "compiled": True, "error": repr(exc)[:500]})
        save("model_alone_compiled", compiled)
    print(f"done in {elapsed():.0f} s", flush=True)


if __name__ == "__main__":
    main()
