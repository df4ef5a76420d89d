"""Issue 17's numbers, one run: the result cache on a repeated-image workload (with vs without it), and a
10,000-image async job against the same images sent as /classify/batch calls (cache off for both, so
each image is computed), plus an interactive call's latency alone and while the job runs.

    python bench/jobs.py [--seconds 12] [--concurrency 8] [--distinct 50] [--job_images 10000]

Starts its own redis-server and predictors (defaults, rate limit off). Waits while /tmp/bench.lock
exists and holds it while running. Writes bench/results/jobs.json.
"""

import argparse
import asyncio
import json
import os
import sys
import tarfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.loadgen import run_load  # noqa: E402
from tests.conftest import HOLDOUT, Server  # noqa: E402
from tests.redis_server import RedisServer  # noqa: E402

LOCK = Path("/tmp/bench.lock")


def hold_lock() -> None:
    while True:
        try:
            os.close(os.open(LOCK, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
            return
        except FileExistsError:
            print("waiting for /tmp/bench.lock ...", flush=True)
            time.sleep(10)


def holdout_images() -> list[bytes]:
    with tarfile.open(HOLDOUT) as tar:
        return [tar.extractfile(m).read() for m in tar.getmembers() if m.isfile()]


def cache_workload(redis_url: str, images: list[bytes], seconds: float, concurrency: int, cache: bool) -> dict:
    server = Server("--redis_url", redis_url, "--rate_limit_per_minute", "0", *([] if cache else ["--cache_ttl_s", "0"]))
    try:
        result = run_load(f"{server.url}/classify/image", images, concurrency, seconds)
        hits = sum(float(line.split()[-1]) for line in server.client.get("/metrics").text.splitlines()
                   if line.startswith('predictor_cache_requests_total{result="hit"}'))
        return {"cache": cache, "req_s": round(result.throughput, 1), "p50_ms": round(result.p50_ms, 1),
                "p99_ms": round(result.p99_ms, 1), "errors": result.errors, "cache_hits": int(hits)}
    finally:
        server.stop()


async def batch_calls(url: str, files: list[bytes], concurrency: int) -> float:
    """Seconds to classify `files` as /classify/batch calls of 64, `concurrency` calls at a time."""
    chunks = [files[i:i + 64] for i in range(0, len(files), 64)]
    queue = asyncio.Queue()
    for chunk in chunks:
        queue.put_nowait(chunk)

    async def client(http: httpx.AsyncClient) -> None:
        while not queue.empty():
            chunk = queue.get_nowait()
            response = await http.post(f"{url}/classify/batch", files=[("files", ("i.jpg", f, "image/jpeg")) for f in chunk])
            response.raise_for_status()

    started = time.perf_counter()
    async with httpx.AsyncClient(timeout=120) as http:
        await asyncio.gather(*(client(http) for _ in range(concurrency)))
    return time.perf_counter() - started


def job_vs_batch(redis_url: str, images: list[bytes], job_images: int, seconds: float) -> dict:
    files = [images[i % len(images)] for i in range(job_images)]
    server = Server("--redis_url", redis_url, "--rate_limit_per_minute", "0", "--cache_ttl_s", "0")
    try:
        idle = run_load(f"{server.url}/classify/image", images[:50], 1, seconds)
        started = time.perf_counter()
        response = server.client.post("/classify/jobs", files=[("files", ("i.jpg", f, "image/jpeg")) for f in files],
                                      timeout=300)
        response.raise_for_status()
        accepted = time.perf_counter() - started
        job_url = response.headers["location"]
        busy = run_load(f"{server.url}/classify/image", images[:50], 1, seconds, warmup=1.0)
        while (body := server.client.get(job_url, params={"limit": 1}).json())["status"] != "succeeded":
            assert body["status"] in ("queued", "running"), body
            time.sleep(0.2)
        job_s = time.perf_counter() - started
        batch_s = asyncio.run(batch_calls(server.url, files, 4))
        return {"images": job_images, "job_upload_s": round(accepted, 2), "job_total_s": round(job_s, 1),
                "job_img_s": round(job_images / job_s, 1), "batch_calls_s": round(batch_s, 1),
                "batch_img_s": round(job_images / batch_s, 1), "batch_concurrency": 4,
                "interactive_idle_p50_ms": round(idle.p50_ms, 1), "interactive_idle_p99_ms": round(idle.p99_ms, 1),
                "interactive_during_job_p50_ms": round(busy.p50_ms, 1),
                "interactive_during_job_p99_ms": round(busy.p99_ms, 1),
                "interactive_during_job_req_s": round(busy.throughput, 1)}
    finally:
        server.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=12)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--distinct", type=int, default=50, help="distinct images in the repeated workload")
    parser.add_argument("--job_images", type=int, default=10_000)
    args = parser.parse_args()
    hold_lock()
    redis = RedisServer()
    try:
        images = holdout_images()
        repeated = images[:args.distinct]
        results = {"command": " ".join(["python", "bench/jobs.py", *sys.argv[1:]]),
                   "repeated_workload": [cache_workload(redis.url, repeated, args.seconds, args.concurrency, cache)
                                         for cache in (False, True)],
                   "job_vs_batch": job_vs_batch(redis.url, images, args.job_images, args.seconds)}
    finally:
        redis.stop()
        LOCK.unlink(missing_ok=True)
    out = ROOT / "bench" / "results" / "jobs.json"
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
