"""The speed targets, each with the value `make bench` measured and whether it was met.

Reads what the run wrote (bench/results/bench.json from bench/run.py, stack_cost.json from
bench/stack_cost.py) and prints one line per target; `make bench` runs it last. The engine-process
targets are printed by bench/engine_process.py itself.

    .venv/bin/python bench/targets.py [--results bench/results]
"""

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.peers import PEERS  # noqa: E402

# The request kinds both the predictor and Triton serve in stack_cost.py, and Triton's name for each
# (it batches BYTES as a [1, 1] tensor).
_SAME_REQUEST = {"v2-binary-pixels": "v2-binary-pixels", "v2-binary-bytes": "v2-binary-bytes-batched",
                 "grpc-pixels": "grpc-pixels", "grpc-bytes": "grpc-bytes-batched"}


def verdict(met: bool) -> str:
    return "met" if met else "MISSED"


def by_concurrency(rows: list[dict]) -> dict[int, dict]:
    return {r["concurrency"]: r for r in rows}


def speed_lines(bench: dict) -> list[str]:
    """The real-engine and overload targets, from bench/run.py's results."""
    servers = {name: by_concurrency(rows) for name, rows in bench["servers"].items()}
    ours, pixels = servers["predictor"], servers.get("predictor, v2 binary pixels", {})
    lines = []
    triton = next((p for p in PEERS if p.venv == "triton"), None)
    for suffix, _, kind in triton.rows if triton is not None else ():
        theirs = servers.get(triton.row_name(suffix))
        mine = pixels if kind == "v2-binary-pixels" else ours
        if not theirs or not mine:
            continue
        ratios = {c: mine[c]["throughput"] / theirs[c]["throughput"] for c in (32, 64, 256) if c in mine and c in theirs}
        shown = ", ".join(f"c={c}: {r:.2f}x" for c, r in ratios.items())
        lines.append(f">= 1.1x Triton ({suffix} pairing) at 32, 64, 256 clients: {shown} -> "
                     f"{verdict(all(r >= 1.1 for r in ratios.values()))}")
    graph = bench["model_only_images_per_second"]
    share = ours[32]["throughput"] / graph
    lines.append(f">= 88 % of the graph-alone batch-32 rate ({graph} img/s) at 32 clients: {share:.0%} -> {verdict(share >= 0.88)}")
    lines.append(f"p99 <= 100 ms at 32 clients: {ours[32]['p99_ms']} ms -> {verdict(ours[32]['p99_ms'] <= 100)}")
    errors = sum(ours[c]["errors"] for c in ours if c <= 64)
    lines.append(f"no errors up to 64 clients: {errors} -> {verdict(errors == 0)}")
    plain = servers.get("plain ONNX Runtime server", {}).get(1)
    if plain:
        lines.append(f"c = 1 p50 <= the plain server's: {ours[1]['p50_ms']} vs {plain['p50_ms']} ms -> "
                     f"{verdict(ours[1]['p50_ms'] <= plain['p50_ms'])}")
    if 32 in pixels:
        ratio = pixels[32]["throughput"] / ours[32]["throughput"]
        lines.append(f"the v2 path not slower than multipart at 32 clients: {ratio:.2f}x -> {verdict(ratio >= 1)}")
    overload = bench.get("overload")
    if overload:
        saturation = overload["saturation_rps"]
        closed, opened = overload["closed_loop_c1024"], overload["open_loop_4x"]
        shares = (closed["throughput"] / saturation, opened["goodput_rps"] / saturation)
        lines.append(f"overload goodput >= 90 % of {saturation} req/s: c=1024 closed loop {shares[0]:.0%}, "
                     f"4x open loop {shares[1]:.0%} -> {verdict(min(shares) >= 0.9)}")
        seen = f"as the load generator saw them {closed['shed_p99_ms']} / {opened['refusal_p99_ms']} ms"
        refusal_p99 = max(closed["shed_p99_ms"], opened["refusal_p99_ms"])
        if "probe" in closed and "probe" in opened:  # one caller in its own process: the server's part alone
            probed = (closed["probe"]["refusal_p99_ms"], opened["probe"]["refusal_p99_ms"])
            seen = f"as a probe caller saw them {probed[0]} / {probed[1]} ms ({seen})"
            refusal_p99 = max(probed)
        lines.append(f"overload refusal p99 <= 50 ms (closed / open loop): {seen} -> {verdict(refusal_p99 <= 50)}")
        lost = closed["errors"] + sum(n for status, n in opened["statuses"].items() if status not in ("200", "503"))
        lines.append(f"overload: nothing lost (answers other than 200/503, transport errors): {lost} -> {verdict(lost == 0)}")
    return lines


def stack_lines(stack: dict) -> list[str]:
    """The stack-cost targets, from bench/stack_cost.py's results."""
    cost = {(r["server"], r["kind"]): r["server_core_ms_per_request"] for r in stack["rows"]}
    ours = {kind: value for (server, kind), value in cost.items() if server.startswith("predictor")}
    lines = []
    if "multipart" in ours:
        lines.append(f"stack cost <= 0.3 core-ms per multipart call: {ours['multipart']} -> {verdict(ours['multipart'] <= 0.3)}")
    if "refusal-401" in ours:
        lines.append(f"stack cost <= 0.05 core-ms per refusal: {ours['refusal-401']} -> {verdict(ours['refusal-401'] <= 0.05)}")
    triton = {kind: value for (server, kind), value in cost.items() if server.startswith("Triton")}
    for kind, theirs in _SAME_REQUEST.items():
        if kind in ours and theirs in triton:
            lines.append(f"stack cost no more than Triton's, {kind}: {ours[kind]} vs {triton[theirs]} -> "
                         f"{verdict(ours[kind] <= triton[theirs])}")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--results", type=Path, default=ROOT / "bench" / "results")
    args = parser.parse_args()
    lines = []
    for name, read in (("stack_cost.json", stack_lines), ("bench.json", speed_lines)):
        path = args.results / name
        lines += read(json.loads(path.read_text())) if path.is_file() else [f"{name}: not measured in this run"]
    print("\ntargets:")
    for line in lines:
        print(f"- {line}")


if __name__ == "__main__":
    main()
