"""Latency of `:explain` (Grad-CAM, fp32) at 1 and 4 concurrent clients, and the demo page's load size.

    python bench/explain.py --seconds 20

Starts the predictor with its defaults (rate limit off, explanations at once: the concurrency asked
for), drives `:explain` with raw JPEG bodies of CIFAR-10 images, and writes bench/results/explain.json.
"""

import argparse
import gzip
import json
import re
import sys
from dataclasses import asdict
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.loadgen import run_load  # noqa: E402
from bench.run import load_images, predictor_command, served_engine, start  # noqa: E402
from tests.conftest import MODEL_NAME, free_port, stop_process  # noqa: E402


def page_size(base_url: str) -> dict:
    """Bytes of the page and every file it loads, as sent and gzip-compressed (what a proxy could send)."""
    page = httpx.get(f"{base_url}/").content
    assets = re.findall(rb'(?:src|href)="(/ui/[^"]+)"', page)
    bodies = [page] + [httpx.get(f"{base_url}{path.decode()}").content for path in assets]
    return {"files": 1 + len(assets), "bytes": sum(map(len, bodies)),
            "gzip_bytes": sum(len(gzip.compress(body)) for body in bodies)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=20)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4])
    args = parser.parse_args()
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    process, ready_s = start(predictor_command(port, "--max_explain_in_flight", str(max(args.concurrency))),
                             f"{base}/health")
    try:
        results = {"engine": served_engine(base), "start_to_ready_s": ready_s, "page": page_size(base), "explain": [],
                   "predict": []}
        images = load_images(20)
        for concurrency in args.concurrency:
            for kind in ("explain", "predict"):  # :predict beside it, same images and clients, for scale
                result = run_load(f"{base}/v1/models/{MODEL_NAME}:{kind}", images, concurrency, args.seconds, raw=True)
                results[kind].append(asdict(result))
                print(f"{kind:8} c={concurrency}: {result.throughput} req/s, p50 {result.p50_ms} ms, "
                      f"p95 {result.p95_ms} ms, p99 {result.p99_ms} ms, errors {result.errors}, 503 {result.shed}")
        print(f"page: {results['page']}")
        out = ROOT / "bench" / "results" / "explain.json"
        out.write_text(json.dumps(results, indent=2) + "\n")
        print(f"wrote {out}")
    finally:
        stop_process(process)


if __name__ == "__main__":
    main()
