"""Workers x threads: how the predictor's throughput scales with processes and threads on this machine.

    python bench/scaling.py --seconds 15 --concurrency 32 --configs 1x2x2 1x1x1 1x1x2 2x1x1

Each config is WORKERSxINTRA_OP_THREADSxDECODE_THREADS; the server runs with its other defaults and
the rate limit off, one config at a time, and gets `concurrency` closed-loop clients. The chart's
defaults (model.workers, threads.intraOp, threads.decode) come from this table. Writes
bench/results/scaling.json and prints a Markdown table.
"""

import argparse
import json
import sys
from dataclasses import asdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.loadgen import run_load  # noqa: E402
from bench.run import load_images, predictor_command, start  # noqa: E402
from predictor.engines.devices import usable_cores  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=15)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--configs", nargs="+", default=["1x2x2", "1x1x1", "1x1x2", "1x2x1", "2x1x1"])
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "scaling.json")
    args = parser.parse_args()
    images, port, rows = load_images(20), 18380, []
    for config in args.configs:
        workers, threads, decode = (int(x) for x in config.split("x"))
        process, ready_s = start(predictor_command(port, "--workers", str(workers), "--intra_op_threads", str(threads),
                                                    "--decode_threads", str(decode)), f"http://127.0.0.1:{port}/health")
        try:
            for concurrency in args.concurrency:
                result = asdict(run_load(f"http://127.0.0.1:{port}/classify/image", images, concurrency, args.seconds))
                rows.append({"workers": workers, "intra_op_threads": threads, "decode_threads": decode,
                             "start_to_ready_s": ready_s, **result})
                print(f"{config} c={concurrency}: {result['throughput']} req/s p50 {result['p50_ms']} "
                      f"p99 {result['p99_ms']} errors {result['errors']}", flush=True)
        finally:
            process.terminate()
            process.wait(60)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"cores": usable_cores(), "rows": rows}, indent=2) + "\n")
    print(f"\n{usable_cores()} usable cores\n\n| workers | intra-op threads | decode threads | clients | req/s | p50 ms | p99 ms | errors |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['workers']} | {r['intra_op_threads']} | {r['decode_threads']} | {r['concurrency']} | {r['throughput']} | "
              f"{r['p50_ms']} | {r['p99_ms']} | {r['errors']} |")


if __name__ == "__main__":
    main()
