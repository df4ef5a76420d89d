"""One engine process fed by N front ends (`--workers N`) against the one-process default, and what clients
see when each process kind dies under load.

    python bench/engine_process.py --seconds 10 --concurrency 1 32 64 256 --rounds 2

Rates: each configuration runs in turn (one server at a time, the rate limit and result cache off),
alternating over `rounds`, medians kept; idle memory as the sum of the processes' RSS (shared pages
counted in each) and of their PSS (shared pages divided among their sharers: what the pod uses). With
N front ends, `/metrics` gives the engine's images per pass and the share of passes that held more
than one front end's calls. Deaths (N = 2, 16 clients): SIGKILL one front end, then the engine
process, with each call's outcome recorded; recovery = until a replacement front end is connected,
and for the engine (the pod restarts) a fresh server's start to ready. Writes
bench/results/engine_process.json and prints the targets of the engine-process issue with their values.
"""

import argparse
import concurrent.futures
import json
import re
import signal
import statistics
import sys
import threading
import time
from collections import Counter
from dataclasses import asdict
from pathlib import Path

import httpx
import psutil

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.loadgen import run_load  # noqa: E402
from bench.run import load_images, predictor_command, start, stop  # noqa: E402
from predictor.engines.devices import usable_cores  # noqa: E402

PORT = 18390


class CallRecorder:
    """`clients` threads sending /classify/image back to back, each on its own keep-alive connection,
    recording every call as (sent, answered, HTTP status or None, error code or exception name)."""

    def __init__(self, url: str, images: list[bytes], clients: int = 16, timeout_s: float = 20):
        self.url, self.images, self.timeout_s = url, images, timeout_s
        self.calls: list[tuple] = []
        self._stop = threading.Event()
        self._pool = concurrent.futures.ThreadPoolExecutor(clients)
        self._clients = [self._pool.submit(self._client, i) for i in range(clients)]

    def _client(self, i: int) -> None:
        with httpx.Client(base_url=self.url, timeout=self.timeout_s) as client:
            while not self._stop.is_set():
                sent = time.monotonic()
                try:
                    answer = client.post("/classify/image", files={"file": self.images[i % len(self.images)]})
                    code = answer.json().get("error", {}).get("code") if answer.status_code != 200 else None
                    self.calls.append((sent, time.monotonic(), answer.status_code, code))
                except httpx.TransportError as exc:  # timeouts included: a call left hanging shows as one
                    self.calls.append((sent, time.monotonic(), None, type(exc).__name__))
                    time.sleep(0.05)

    def stop(self) -> list[tuple]:
        self._stop.set()
        for client in self._clients:
            client.result(timeout=120)
        self._pool.shutdown()
        return self.calls


def memory_mb(pid: int) -> dict:
    """RSS and PSS of a server's process tree, summed."""
    processes = [psutil.Process(pid), *psutil.Process(pid).children(recursive=True)]
    full = [p.memory_full_info() for p in processes]
    return {"rss_mb": round(sum(m.rss for m in full) / 2**20), "pss_mb": round(sum(m.pss for m in full) / 2**20),
            "processes": len(processes)}


def engine_passes(url: str) -> dict:
    """Images per pass of the engine process and the share of its passes that mixed front ends."""
    text = httpx.get(f"{url}/metrics", timeout=30).text

    def value(pattern: str) -> float:
        found = re.search(pattern, text, re.M)
        return float(found.group(1)) if found else 0.0

    passes = value(r"^predictor_engine_pass_images_count (\S+)$")
    return {"passes": passes, "images_per_pass": round(value(r"^predictor_engine_pass_images_sum (\S+)$") / passes, 1)
            if passes else None, "mixed_share": round(value(r'^predictor_engine_passes_total\{front_ends="several"\} (\S+)$')
                                                      / passes, 3) if passes else None}


def rates(configs: dict[str, list[str]], concurrency: list[int], seconds: float, rounds: int, images: list) -> dict:
    runs: dict[str, list] = {name: [] for name in configs}
    for round_ in range(rounds):
        for name, flags in configs.items():
            process, ready_s = start(predictor_command(PORT, *flags), f"http://127.0.0.1:{PORT}/health")
            try:
                time.sleep(2)
                row = {"ready_s": round(ready_s, 2), **memory_mb(process.pid), "points": {}}
                for c in concurrency:
                    result = asdict(run_load(f"http://127.0.0.1:{PORT}/classify/image", images, c, seconds))
                    row["points"][c] = result
                    print(f"round {round_} {name} c={c}: {result['throughput']} req/s p50 {result['p50_ms']} "
                          f"p99 {result['p99_ms']} errors {result['errors']}", flush=True)
                if len(flags) > 1:
                    row["engine"] = engine_passes(f"http://127.0.0.1:{PORT}")
                runs[name].append(row)
            finally:
                stop(process)
    return {name: median_row(rows, concurrency) for name, rows in runs.items()}


def median_row(rows: list[dict], concurrency: list[int]) -> dict:
    def med(values):
        return round(statistics.median(values), 2)

    out = {key: med([r[key] for r in rows]) for key in ("ready_s", "rss_mb", "pss_mb")}
    out["points"] = {c: {key: med([r["points"][c][key] for r in rows])
                         for key in ("throughput", "p50_ms", "p99_ms", "errors", "shed")} for c in concurrency}
    if "engine" in rows[0]:
        out["engine"] = rows[-1]["engine"]
    return out


def outcomes(calls: list[tuple], since: float) -> dict:
    after = [c for c in calls if c[1] >= since]
    return {"calls_answered_after": len(after), "outcomes": dict(Counter(f"{c[2]} {c[3] or ''}".strip() for c in after)),
            "longest_call_s": round(max((c[1] - c[0] for c in calls), default=0), 2)}


def front_end_pids(pid: int) -> set[int]:
    """The live front ends of server `pid` (its children, bar multiprocessing's resource tracker)."""
    pids = set()
    for child in psutil.Process(pid).children():
        try:
            if "resource_tracker" not in " ".join(child.cmdline()):
                pids.add(child.pid)
        except psutil.Error:  # gone, or a zombie not yet reaped
            pass
    return pids


def running(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def deaths(images: list) -> dict:
    """Kill a front end, then the engine process, each under 16 clients' load."""
    url = f"http://127.0.0.1:{PORT}"
    process, _ = start(predictor_command(PORT, "--workers", "2"), f"{url}/health")
    report = {}
    try:
        recorder = CallRecorder(url, images)
        time.sleep(3)
        victim = min(front_end_pids(process.pid))
        psutil.Process(victim).kill()
        killed = time.monotonic()
        while len(front_end_pids(process.pid) - {victim}) < 2:
            time.sleep(0.02)
        replaced = time.monotonic()
        time.sleep(3)
        calls = recorder.stop()
        served_after = [c for c in calls if c[2] == 200 and c[0] > killed]
        report["front_end"] = {**outcomes(calls, killed), "replacement_started_s": round(replaced - killed, 2),
                               "first_200_after_kill_s": round(min(c[1] for c in served_after) - killed, 3)}
        recorder = CallRecorder(url, images)
        time.sleep(3)
        children = front_end_pids(process.pid)
        process.send_signal(signal.SIGKILL)
        killed = time.monotonic()
        while any(running(p) for p in children):
            time.sleep(0.02)
        stopped = time.monotonic()
        time.sleep(1)
        calls = recorder.stop()
        report["engine"] = {**outcomes(calls, killed), "front_ends_stopped_s": round(stopped - killed, 2)}
    finally:
        stop(process)
    process, ready_s = start(predictor_command(PORT, "--workers", "2"), f"{url}/health")
    stop(process)
    report["engine"]["restart_to_ready_s"] = round(ready_s, 2)
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=10)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 32, 64, 256])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "engine_process.json")
    args = parser.parse_args()
    images = load_images(100)
    configs = {"one process (--workers 1)": ["--workers", "1"], "2 front ends + engine (--workers 2)": ["--workers", "2"]}
    results = {"cores": usable_cores(), "rates": rates(configs, args.concurrency, args.seconds, args.rounds, images),
               "deaths": deaths(images)}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    one, two = results["rates"].values()
    print(f"\n{usable_cores()} usable cores, medians of {args.rounds} rounds\n")
    print("| configuration | ready s | idle RSS / PSS MB | " + " | ".join(f"c = {c} req/s (p50 / p99 ms)" for c in args.concurrency) + " |")
    print("|---|---|---|" + "---|" * len(args.concurrency))
    for name, row in results["rates"].items():
        print(f"| {name} | {row['ready_s']} | {row['rss_mb']} / {row['pss_mb']} | " + " | ".join(
            f"{p['throughput']} ({p['p50_ms']} / {p['p99_ms']})" for p in row["points"].values()) + " |")
    ratios = {c: two["points"][c]["throughput"] / one["points"][c]["throughput"] for c in args.concurrency}
    slower = [str(c) for c, ratio in ratios.items() if ratio < 1]
    print("\ntargets:")
    print(f"- no point slower than one process: {'missed at c = ' + ', '.join(slower) if slower else 'met'} ("
          + ", ".join(f"c={c}: {ratio:.2f}x" for c, ratio in ratios.items()) + ")")
    print(f"- idle memory of N = 2 <= 300 MB: PSS {two['pss_mb']} MB, RSS summed {two['rss_mb']} MB")
    print(f"- c = 1 p50 within 0.2 ms of one process: {two['points'][1]['p50_ms']} vs {one['points'][1]['p50_ms']} ms"
          if 1 in args.concurrency else "")
    print(f"- engine passes (last run): {two['engine']}")
    print(f"- deaths: {json.dumps(results['deaths'])}")


if __name__ == "__main__":
    main()
