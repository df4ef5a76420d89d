"""HTTP load with real CIFAR-10 JPEGs: closed loop (C concurrent clients for a fixed time) and open loop
(requests started at a fixed rate whatever the answers do).

Closed loop: each client posts multipart `file` uploads (or raw image bodies, or prepared bodies with their
headers: v2 JSON or binary requests, bench/v2_requests.py) back to back over a keep-alive connection;
throughput and latencies count the successful (200, or the status `ok` names) requests, and 503s (load
shedding) are counted apart, with their own latency (a refusal must be fast to be worth anything).
The generator reports its own CPU time so it can be shown not to be the bottleneck. Multipart bodies are
built once per image (`multipart_upload`: the bytes curl sends for `-F file=@image.jpg`), not per request:
aiohttp's FormData per request was a third of the generator's CPU, taken from the server's two cores.
"""

import asyncio
import http.client
import itertools
import multiprocessing
import resource
import time
import urllib.parse
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import numpy as np


MULTIPART_BOUNDARY = "------------------------bench0123456789abcdef"


def multipart_upload(image: bytes, field: str = "file") -> tuple[bytes, dict]:
    """A multipart/form-data body with `image` as the file field `field`, and its headers."""
    head = (f'--{MULTIPART_BOUNDARY}\r\nContent-Disposition: form-data; name="{field}"; filename="image.jpg"\r\n'
            "Content-Type: image/jpeg\r\n\r\n").encode()
    return head + image + f"\r\n--{MULTIPART_BOUNDARY}--\r\n".encode(), {
        "content-type": f"multipart/form-data; boundary={MULTIPART_BOUNDARY}"}


@dataclass
class LoadResult:
    concurrency: int
    seconds: float
    requests: int
    errors: int  # anything but 200 or 503, and transport failures (timeouts included)
    shed: int  # 503 answers: refused at once by a full queue (load shedding), not lost
    shed_p99_ms: float  # how long a refusal took (p99; nan without refusals)
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
    refusals: list[float]  # latencies (s) of the 503s
    errors: int
    cpu_seconds: float
    wall_seconds: float


async def _collect(url: str, images: list, concurrency: int, seconds: float, warmup: float, raw: bool,
                   prepared: bool = False, ok: int = 200) -> Samples:
    latencies: list[float] = []
    refusals: list[float] = []
    errors = 0
    counter = itertools.count()
    if not (prepared or raw):
        images, prepared = [multipart_upload(image) for image in images], True
    connector = aiohttp.TCPConnector(limit=concurrency)
    timeout = aiohttp.ClientTimeout(total=60)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        started = time.perf_counter()
        measure_from = started + warmup
        stop_at = measure_from + seconds

        async def client() -> None:
            nonlocal errors
            while (now := time.perf_counter()) < stop_at:
                image = images[next(counter) % len(images)]
                if prepared:  # (body, headers): built by the caller, or the multipart uploads above
                    request = {"data": image[0], "headers": image[1]}
                else:  # raw: the image as the whole body (KServe v1 :predict / :explain)
                    request = {"data": image, "headers": {"content-type": "image/jpeg"}}
                try:
                    async with session.post(url, **request) as response:
                        await response.read()
                        status = response.status
                except (aiohttp.ClientError, asyncio.TimeoutError):
                    status = 0
                if now >= measure_from:
                    if status in (ok, 503):
                        (latencies if status == ok else refusals).append(time.perf_counter() - now)
                    errors += status not in (ok, 503)

        cpu_before = _cpu_seconds()
        await asyncio.gather(*(client() for _ in range(concurrency)))
        wall = time.perf_counter() - started
        cpu = _cpu_seconds() - cpu_before
    return Samples(latencies, refusals, errors, cpu, wall)


def percentile(values_ms: np.ndarray, q: float) -> float:
    return round(float(np.percentile(values_ms, q)), 1) if len(values_ms) else float("nan")


def summarize(parts: list[Samples], concurrency: int, seconds: float) -> LoadResult:
    """One result from one or more load generators that ran side by side."""
    values = np.array([x for part in parts for x in part.latencies]) * 1000
    refusals = np.array([x for part in parts for x in part.refusals]) * 1000

    return LoadResult(
        concurrency=concurrency, seconds=seconds, requests=len(values), errors=sum(p.errors for p in parts),
        shed=len(refusals), shed_p99_ms=percentile(refusals, 99), throughput=round(len(values) / seconds, 1),
        p50_ms=percentile(values, 50), p95_ms=percentile(values, 95), p99_ms=percentile(values, 99),
        client_cpu_share=round(sum(p.cpu_seconds / p.wall_seconds for p in parts), 2),
    )


def collect(url: str, images: list, concurrency: int, seconds: float, warmup: float = 2.0,
            raw: bool = False, prepared: bool = False, ok: int = 200) -> Samples:
    """The raw samples of one load generator (for several side by side, in processes of their own)."""
    return asyncio.run(_collect(url, images, concurrency, seconds, warmup, raw, prepared, ok))


def run_load(url: str, images: list, concurrency: int, seconds: float, warmup: float = 2.0,
             raw: bool = False, prepared: bool = False, ok: int = 200) -> LoadResult:
    """Multipart `file` uploads; with `raw` each image as the whole request body; with `prepared`, `images`
    are (body, headers) pairs sent as they are. `ok`: the status that counts as answered (200; a refusal
    benchmark counts its 401s)."""
    return summarize([collect(url, images, concurrency, seconds, warmup, raw, prepared, ok)], concurrency, seconds)


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


async def open_loop(url: str, images: list[bytes], rate: float, seconds: float, pid: int | None = None) -> dict:
    """Requests started at `rate` per second whatever the answers do; the server's RSS (`pid`) sampled every 10 s.
    Latencies run from each request's start; the 200s' and the 503s' (refusals) are reported apart."""
    statuses: dict[str, int] = {}
    latencies: list[float] = []
    refusals: list[float] = []
    rss: list[tuple[float, float]] = []
    counter = itertools.count()
    uploads = [multipart_upload(image) for image in images]
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60),
                                     connector=aiohttp.TCPConnector(limit=2048)) as session:
        async def one() -> None:
            body, headers = uploads[next(counter) % len(uploads)]
            started = time.perf_counter()
            try:
                async with session.post(url, data=body, headers=headers) as response:
                    await response.read()
                    key = str(response.status)
            except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
                key = type(exc).__name__
            statuses[key] = statuses.get(key, 0) + 1
            if key in ("200", "503"):
                (latencies if key == "200" else refusals).append(time.perf_counter() - started)

        begin, cpu_before = time.perf_counter(), _cpu_seconds()
        tasks, next_sample = [], begin
        for i in itertools.count():
            due = begin + i / rate
            if due - begin >= seconds:
                break
            if pid is not None and time.perf_counter() >= next_sample:
                rss.append((round(time.perf_counter() - begin, 1), round(rss_mib(pid), 1)))
                next_sample += 10
            await asyncio.sleep(max(0.0, due - time.perf_counter()))
            tasks.append(asyncio.create_task(one()))
        await asyncio.gather(*tasks)
        client_cpu_share = round((_cpu_seconds() - cpu_before) / (time.perf_counter() - begin), 2)
        if pid is not None:
            rss.append((round(time.perf_counter() - begin, 1), round(rss_mib(pid), 1)))
    values, refused = np.array(latencies) * 1000, np.array(refusals) * 1000
    report = {"rate": round(rate, 1), "seconds": seconds, "statuses": statuses,
              "goodput_rps": round(len(values) / seconds, 1), "p50_ms": percentile(values, 50),
              "p99_ms": percentile(values, 99), "refusal_p99_ms": percentile(refused, 99),
              "client_cpu_share": client_cpu_share}
    if pid is not None:
        report.update(rss_mib_samples=rss, rss_growth_mib=round(rss[-1][1] - rss[0][1], 1))
    return report


def _probe(url: str, upload: tuple[bytes, dict], pause_s: float, stop, results) -> None:
    """One caller on a keep-alive connection of its own: a call, its answer, a pause, again until `stop`."""
    target = urllib.parse.urlsplit(url)
    connection = http.client.HTTPConnection(target.hostname, target.port, timeout=60)
    body, headers = upload
    samples = []
    while not stop.is_set():
        started = time.perf_counter()
        try:
            connection.request("POST", target.path, body=body, headers=headers)
            response = connection.getresponse()
            response.read()
            status = response.status
        except (OSError, http.client.HTTPException):
            status, connection = 0, http.client.HTTPConnection(target.hostname, target.port, timeout=60)
        samples.append((status, time.perf_counter() - started))
        time.sleep(pause_s)
    results.send(samples)


class Probe:
    """What one well-behaved caller sees while a load runs beside it: a process of its own (so the load
    generator's own event loop, saturated past a server's capacity, adds nothing to its latencies) making
    one multipart call at a time with `pause_s` between them. `with Probe(url, image) as probe:` around the
    load; then `probe.report()`: the 200s' and the 503s' counts and latency percentiles."""

    def __init__(self, url: str, image: bytes, pause_s: float = 0.02):
        context = multiprocessing.get_context("fork")
        self._stop = context.Event()
        self._receive, send = context.Pipe(duplex=False)
        self._process = context.Process(target=_probe, args=(url, multipart_upload(image), pause_s, self._stop, send),
                                        daemon=True)
        self.samples: list[tuple[int, float]] = []

    def __enter__(self) -> "Probe":
        self._process.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self.samples = self._receive.recv() if self._receive.poll(120) else []
        self._process.join(10)

    def report(self) -> dict:
        def latencies(status: int) -> np.ndarray:
            return np.array([s for code, s in self.samples if code == status]) * 1000

        answered, refused = latencies(200), latencies(503)
        return {"calls": len(self.samples), "answered": len(answered), "refused": len(refused),
                "other": len(self.samples) - len(answered) - len(refused),
                "p50_ms": percentile(answered, 50), "p99_ms": percentile(answered, 99),
                "refusal_p50_ms": percentile(refused, 50), "refusal_p99_ms": percentile(refused, 99)}

