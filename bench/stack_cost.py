"""The stack's own cost: CPU time per request of each server when the model costs nothing.

Every server runs the bench's null engine (bench/null_engine.py: zero logits, no computation, like
Triton's `identity` model): the predictor through bench/null_predictor.py (its flags and code as served,
only the engine swapped; not a user-facing option), the peers with BENCH_NULL_ENGINE=1 (read by
bench/peers/common.py only). Decoding stays: it is part of each stack. C closed-loop clients
(bench/loadgen.py, one process) send one kind of request for a few seconds; the cost is

    core-ms per request = CPU time of the server's process tree (user + system, psutil) / requests answered

over the same run, after a short warm-up. The load generator's own CPU time per request is reported
beside it: it shares the machine's cores with the server.

Request kinds (a real CIFAR-10 JPEG from tests/images per request, decoded by the server):
- multipart: POST /classify/image with the file;
- v2 JSON: /v2/models/M/infer, the file as a base64 BYTES element;
- v2 binary UINT8: the decoded pixels [1, 32, 32, 3] over the binary-data extension (the same bytes for
  the predictor and Triton);
- v2 binary BYTES: the file over the binary-data extension (tritonclient's default for BYTES);
- gRPC BYTES / gRPC UINT8: ModelInfer with the file in bytes_contents / the pixels in raw_input_contents;
- refusal: the predictor with API keys configured, called without a key: 401 before the body is read.
  Chosen over the 503 at --max_in_flight because every call is refused the same way at any load, with
  no admitted work sharing the CPU being measured, so the CPU per refusal is unambiguous; the key gate
  comes right before the in-flight gate on the same path (drain -> key -> rate -> in-flight), so the
  two cost the same but for one check. The peers have no gates: nothing to refuse.
Which server takes which kind: the predictor all; the plain Starlette server multipart; MLServer
multipart, v2 JSON and gRPC BYTES (it has no binary-data extension); Triton v2 binary UINT8 and BYTES
and gRPC BYTES and UINT8 (its JSON BYTES are text, not base64 files; no multipart).

    .venv/bin/python bench/stack_cost.py --seconds 5 --concurrency 32 [--only predictor Triton]

Writes bench/results/stack_cost.json and prints a Markdown table.
"""

import argparse
import json
import os
import platform
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.loadgen import Samples, collect, summarize  # noqa: E402
from bench.null_engine import NULL_ENGINE_ENV  # noqa: E402
from bench.peers import PEER_VENVS, PEERS, Peer  # noqa: E402
from bench.run import load_images, predictor_command, start, stop  # noqa: E402
from bench.v2_requests import decoded, grpc_collect, grpc_requests, http_load  # noqa: E402
from tests.conftest import MODEL_NAME, free_port  # noqa: E402

KIND_LABELS = {"multipart": "multipart", "v2-json-bytes": "v2 JSON (base64 BYTES)", "v2-binary-pixels": "v2 binary UINT8",
               "v2-binary-bytes": "v2 binary BYTES", "v2-binary-bytes-batched": "v2 binary BYTES",
               "grpc-bytes": "gRPC BYTES", "grpc-bytes-batched": "gRPC BYTES", "grpc-pixels": "gRPC UINT8",
               "refusal-401": "refusal (401, no key)"}
REFUSAL_KEY = "stack-cost-bench-key-0123456789abcdef"


@dataclass
class Server:
    """A server to measure: how to start it, where it says ready, and (kind, HTTP path or gRPC model) pairs."""
    name: str
    command: Callable[[int], list[str]]  # HTTP port -> argv
    env: dict
    ready_path: str
    kinds: list[tuple[str, str]]
    grpc_port_offset: int | None = None  # gRPC port = HTTP port + this


def tree_cpu_seconds(root: psutil.Process) -> float:
    """User + system CPU time of a process and all its descendants alive now."""
    total = 0.0
    for process in [root, *root.children(recursive=True)]:
        try:
            times = process.cpu_times()
        except psutil.NoSuchProcess:
            continue
        total += times.user + times.system
    return total


def null_predictor(port: int) -> list[str]:
    """bench/run.py's predictor command (rate limit and result cache off), gRPC on port + 1, the null engine."""
    flags = predictor_command(port)[3:]  # after `python -m predictor`
    return [sys.executable, "bench/null_predictor.py", *flags, "--enable_grpc", "true", "--grpc_port", str(port + 1)]


def servers(only: list[str]) -> list[Server]:
    null_env = {NULL_ENGINE_ENV: "1"}
    v2 = f"/v2/models/{MODEL_NAME}/infer"
    found = [
        Server("predictor (null engine)", null_predictor, {}, "/health",
               [("multipart", "/classify/image"), ("v2-json-bytes", v2), ("v2-binary-pixels", v2), ("v2-binary-bytes", v2),
                ("grpc-bytes", MODEL_NAME), ("grpc-pixels", MODEL_NAME)], grpc_port_offset=1),
        Server("predictor (null engine), API keys on", null_predictor, {"API_KEYS": REFUSAL_KEY}, "/health",
               [("refusal-401", "/classify/image")]),
    ]
    peer_kinds: dict[str | None, list[tuple[str, str]]] = {
        None: [("multipart", "/classify/image")],
        "mlserver": [("multipart", "/classify/image"), ("v2-json-bytes", "/v2/models/cifar10/infer"),
                     ("grpc-bytes", "cifar10")],
        "triton": [("v2-binary-pixels", "/v2/models/cifar10-resnet18/infer"),
                   ("v2-binary-bytes-batched", "/v2/models/cifar10-resnet18-jpeg/infer"),
                   ("grpc-bytes-batched", "cifar10-resnet18-jpeg"), ("grpc-pixels", "cifar10-resnet18")],
    }
    peer: Peer
    for peer in PEERS:
        if peer.venv in peer_kinds and peer.venv is not None and not (PEER_VENVS / peer.venv / "bin").is_dir():
            print(f"{peer.name}: {PEER_VENVS / peer.venv} is missing (make bench-peers); not measured", flush=True)
        elif peer.venv in peer_kinds:
            found.append(Server(f"{peer.name} (null engine)", peer.command, {**peer.environment(), **null_env},
                                peer.ready_path, peer_kinds[peer.venv], peer.grpc_port_offset))
    if only:
        found = [s for s in found if any(word in s.name for word in only)]
    return found


def measure(server: Server, port: int, files: list[bytes], concurrency: int, seconds: float, warmup: float) -> list[dict]:
    process, ready_s = start(server.command(port), f"http://127.0.0.1:{port}{server.ready_path}", server.env, deadline_s=180)
    rows = []
    try:
        time.sleep(1)
        root = psutil.Process(process.pid)
        for kind, where in server.kinds:
            if kind.startswith("grpc"):
                target = f"127.0.0.1:{port + server.grpc_port_offset}"
                requests = (grpc_requests(where, pixels=decoded(files), name="pixels") if kind == "grpc-pixels" else
                            grpc_requests(where, files=files, shape=(1, 1) if kind.endswith("-batched") else (1,)))

                def run(duration: float, requests=requests, target=target) -> Samples:
                    return grpc_collect(target, requests, concurrency, duration, warmup=0)
            else:
                items, options = http_load("multipart" if kind == "refusal-401" else kind, files)
                ok = 401 if kind == "refusal-401" else 200
                url = f"http://127.0.0.1:{port}{where}"

                def run(duration: float, items=items, options=options, url=url, ok=ok) -> Samples:
                    return collect(url, items, concurrency, duration, warmup=0, ok=ok, **options)
            run(warmup)
            cpu_before = tree_cpu_seconds(root)
            samples = run(seconds)
            server_cpu = tree_cpu_seconds(root) - cpu_before
            answered = len(samples.latencies)
            load = summarize([samples], concurrency, samples.wall_seconds)
            row = {"server": server.name, "kind": kind, "request": KIND_LABELS[kind], "concurrency": concurrency,
                   "seconds": round(samples.wall_seconds, 2), "answered": answered, "refused_503": len(samples.refusals),
                   "errors": samples.errors, "throughput": round(answered / samples.wall_seconds, 1),
                   "p50_ms": load.p50_ms, "p99_ms": load.p99_ms,
                   "server_core_ms_per_request": round(server_cpu * 1000 / answered, 3) if answered else None,
                   "server_cores_busy": round(server_cpu / samples.wall_seconds, 2),
                   "loadgen_core_ms_per_request": round(samples.cpu_seconds * 1000 / answered, 3) if answered else None,
                   "loadgen_cores_busy": round(samples.cpu_seconds / samples.wall_seconds, 2),
                   "start_to_ready_seconds": ready_s}
            rows.append(row)
            print(f"{server.name:>50} {row['request']:>24}: {row['server_core_ms_per_request']} core-ms/req "
                  f"({row['throughput']} req/s, server {row['server_cores_busy']} cores, load generator "
                  f"{row['loadgen_core_ms_per_request']} core-ms/req), errors {row['errors']}", flush=True)
    finally:
        stop(process)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=8, help="measured seconds per request kind")
    parser.add_argument("--warmup", type=float, default=2, help="unmeasured seconds of the same load before each")
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--only", nargs="+", default=[], help="servers whose name contains one of these, e.g. predictor Triton")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "stack_cost.json")
    args = parser.parse_args()
    files = load_images(20)
    rows = []
    for server in servers(args.only):
        rows += measure(server, free_port(), files, args.concurrency, args.seconds, args.warmup)
    report = {"what": "server CPU time per request answered with the bench's null engine (the stack's own cost)",
              "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
              "concurrency": args.concurrency, "seconds_per_point": args.seconds, "rows": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nThe stack's own cost, null engine, {args.concurrency} closed-loop clients, {args.seconds:g} s per point:\n")
    print("| server | request | server core-ms / request | req/s | server cores busy | load generator core-ms / request | p99 ms | errors |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['server']} | {r['request']} | **{r['server_core_ms_per_request']}** | {r['throughput']} | "
              f"{r['server_cores_busy']} | {r['loadgen_core_ms_per_request']} | {r['p99_ms']} | {r['errors']} |")


if __name__ == "__main__":
    main()
