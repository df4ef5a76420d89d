"""Closed-loop HTTP load: C concurrent clients upload real CIFAR-10 JPEGs for a fixed time.

Each client posts multipart `file` uploads (or raw image bodies) back to back over a keep-alive connection; throughput
and latencies count the successful (200) requests, and 503s (load shedding) are counted apart.
The generator reports its own CPU time so it can be shown not to be the bottleneck.
"""

import asyncio
import itertools
import resource
import time
from dataclasses import dataclass

import aiohttp
import numpy as np


@dataclass
class LoadResult:
    concurrency: int
    seconds: float
    requests: int
    errors: int  # anything but 200 or 503, and transport failures (timeouts included)
    shed: int  # 503 answers: refused at once by a full queue (load shedding), not lost
    throughput: float
    p50_ms: float
    p95_ms: float
    p99_ms: float
    client_cpu_share: float  # load generator CPU seconds per wall second (1.0 = one full core; summed over generators)


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


@dataclass
class Samples:
    """What one load generator saw: latencies (s) of the 200s, the other outcomes, its CPU and wall time."""
    latencies: list[float]
    errors: int
    shed: int
    cpu_seconds: float
    wall_seconds: float


async def _collect(url: str, images: list[bytes], concurrency: int, seconds: float, warmup: float, raw: bool) -> Samples:
    latencies: list[float] = []
    errors = shed = 0
    counter = itertools.count()
    connector = aiohttp.TCPConnector(limit=concurrency)
    timeout = aiohttp.ClientTimeout(total=60)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        started = time.perf_counter()
        measure_from = started + warmup
        stop_at = measure_from + seconds

        async def client() -> None:
            nonlocal errors, shed
            while (now := time.perf_counter()) < stop_at:
                image = images[next(counter) % len(images)]
                if raw:  # the image as the whole body (KServe v1 :predict / :explain)
                    request = {"data": image, "headers": {"content-type": "image/jpeg"}}
                else:
                    form = aiohttp.FormData()
                    form.add_field("file", image, filename="image.jpg", content_type="image/jpeg")
                    request = {"data": form}
                try:
                    async with session.post(url, **request) as response:
                        await response.read()
                        status = response.status
                except (aiohttp.ClientError, asyncio.TimeoutError):
                    status = 0
                if now >= measure_from:
                    if status == 200:
                        latencies.append(time.perf_counter() - now)
                    shed += status == 503
                    errors += status not in (200, 503)

        cpu_before = _cpu_seconds()
        await asyncio.gather(*(client() for _ in range(concurrency)))
        wall = time.perf_counter() - started
        cpu = _cpu_seconds() - cpu_before
    return Samples(latencies, errors, shed, cpu, wall)


def summarize(parts: list[Samples], concurrency: int, seconds: float) -> LoadResult:
    """One result from one or more load generators that ran side by side."""
    values = np.array([x for part in parts for x in part.latencies]) * 1000

    def percentile(q: float) -> float:
        return round(float(np.percentile(values, q)), 1) if len(values) else float("nan")

    return LoadResult(
        concurrency=concurrency, seconds=seconds, requests=len(values), errors=sum(p.errors for p in parts),
        shed=sum(p.shed for p in parts), throughput=round(len(values) / seconds, 1),
        p50_ms=percentile(50), p95_ms=percentile(95), p99_ms=percentile(99),
        client_cpu_share=round(sum(p.cpu_seconds / p.wall_seconds for p in parts), 2),
    )


def collect(url: str, images: list[bytes], concurrency: int, seconds: float, warmup: float = 2.0,
            raw: bool = False) -> Samples:
    """The raw samples of one load generator (for several side by side, in processes of their own)."""
    return asyncio.run(_collect(url, images, concurrency, seconds, warmup, raw))


def run_load(url: str, images: list[bytes], concurrency: int, seconds: float, warmup: float = 2.0,
             raw: bool = False) -> LoadResult:
    """Multipart `file` uploads, or with `raw` each image as the whole request body."""
    return summarize([collect(url, images, concurrency, seconds, warmup, raw)], concurrency, seconds)
