"""`make soak` (not in CI): 10 minutes at 80 % of saturation; reports RSS growth and errors.

    python bench/soak.py --minutes 10 --fraction 0.8
    python bench/soak.py --minutes 10 --rate 200                                     # a fixed offered rate
    python bench/soak.py --minutes 1 --fraction 4 --out bench/results/overload.json   # 4x saturation

Finds the saturation with an open-loop probe (the highest offered rate, in 10 % steps of 10 s each,
that the server still answers in full: under 1 % refused or failed, p99 under a second), then holds
an open-loop arrival rate of `fraction` x that for `minutes`, sampling the server's resident memory
every 10 s. A closed-loop client slows down with the server, so its rate overstates what an
open-loop client (the Internet) can be given: 80 % of that was above saturation.
"""

import argparse
import asyncio
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.loadgen import open_loop, run_load  # noqa: E402
from bench.run import load_images, predictor_command, start  # noqa: E402


def sustained(step: dict) -> bool:
    answered = step["statuses"].get("200", 0)
    offered = sum(step["statuses"].values())
    return answered >= 0.99 * offered and step["p99_ms"] < 1000


def find_saturation(url: str, images: list[bytes], pid: int) -> tuple[float, list[dict]]:
    """The highest open-loop rate answered in full, from half the closed-loop rate up in 10 % steps."""
    rate = run_load(url, images, 64, 10).throughput * 0.5
    steps, best = [], 0.0
    while True:
        step = asyncio.run(open_loop(url, images, rate, 10, pid))
        steps.append({k: v for k, v in step.items() if k != "rss_mib_samples"})
        print(f"  probe {rate:.1f} req/s: {step['statuses']} p99 {step['p99_ms']} ms", flush=True)
        if not sustained(step):
            return best, steps
        best, rate = rate, rate * 1.1


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=10)
    parser.add_argument("--fraction", type=float, default=0.8)
    parser.add_argument("--rate", type=float, default=0,
                        help="offered requests/s instead of fraction x saturation (a short closed-loop run can "
                             "overstate what the server sustains against an open-loop client)")
    parser.add_argument("--server-args", nargs="*", default=[])
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "soak.json")
    args = parser.parse_args()
    port = 18280
    server, _ = start(predictor_command(port, *args.server_args), f"http://127.0.0.1:{port}/health")
    url = f"http://127.0.0.1:{port}/classify/image"
    try:
        images = load_images(20)
        saturation, probe = find_saturation(url, images, server.pid)
        rate = args.rate or saturation * args.fraction
        print(f"saturation (open loop): {saturation:.1f} req/s; offering {rate:.1f} req/s for {args.minutes} min", flush=True)
        report = asyncio.run(open_loop(url, images, rate, args.minutes * 60, server.pid))
        report["saturation_probe"] = probe
    finally:
        server.terminate()
        server.wait(60)
    report["saturation_rps"] = round(saturation, 1)
    report["goodput_rps"] = round(report["statuses"].get("200", 0) / report["seconds"], 1)
    # Above saturation a 503 is the load shedding doing its job, not an error.
    shed = report["statuses"].get("503", 0) if rate > saturation else 0
    errors = sum(n for status, n in report["statuses"].items() if status != "200") - shed
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps({k: v for k, v in report.items() if k != "rss_mib_samples"}, indent=2))
    print(f"errors: {errors}; shed (503): {shed}; RSS {report['rss_mib_samples'][0][1]} -> {report['rss_mib_samples'][-1][1]} MiB")
    sys.exit(1 if errors else 0)


if __name__ == "__main__":
    main()
