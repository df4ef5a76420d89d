"""What each container image costs (issue 32's table): size, build time from an empty store and after a
code change, `podman run` to ready, idle RSS, and `podman save` / `podman load` (a registry pull on a
new node, without a registry).

    python bench/images.py [--out bench/results/images.json] [--keep-store]

Builds in a podman store of its own (CONTAINER_STORE=bench-images-<pid>: empty, so the first builds
pay for everything, the Debian base from debootstrap included and reported apart), with .ci/image.sh
as `make image` / `make image-cuda` do. A code change is a comment appended to predictor/__init__.py
(restored afterwards). Each archive is loaded into another empty store (a new node has none of the
layers). Run it with nothing else on the machine.
"""

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
IMAGE_SH = str(ROOT / ".ci" / "image.sh")
TARGETS = {"cpu": "cifar10-kserve-predictor:bench", "cuda": "cifar10-kserve-predictor:bench-cuda"}


def sh(*args: str, timeout: float = 3600, store: str | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "CONTAINER_STORE": store} if store else None
    return subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=timeout, check=True, env=env)


def timed(*args: str, store: str | None = None) -> float:
    started = time.monotonic()
    sh(*args, store=store)
    return round(time.monotonic() - started, 1)


def podman(*args: str, timeout: float = 600, store: str | None = None) -> subprocess.CompletedProcess:
    return sh(IMAGE_SH, "podman", *args, timeout=timeout, store=store)


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_to_ready(image: str) -> tuple[float, int]:
    """Seconds from `podman run` to the first 200 from /health, and the predictor's RSS (KiB) once idle."""
    port = free_port()
    name = f"bench-images-{port}"
    started = time.monotonic()
    podman("run", "--detach", "--name", name, "--network", "host", "--no-healthcheck", image,
           "--http_port", str(port), "--enable_grpc", "false")
    try:
        while True:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() - started > 600:
                raise RuntimeError(podman("logs", name).stderr)
            time.sleep(0.05)
        ready_s = round(time.monotonic() - started, 2)
        time.sleep(5)  # idle: nothing left of the start-up
        status = podman("exec", name, "sh", "-c", "for p in /proc/[0-9]*; do grep -q predictor $p/cmdline 2>/dev/null "
                        "&& ! grep -q tini $p/cmdline && cat $p/status; done; true").stdout
        return ready_s, int(re.search(r"VmRSS:\s+(\d+)", status).group(1))
    finally:
        podman("rm", "--force", name)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "images.json")
    parser.add_argument("--keep-store", action="store_true", help="leave the bench store in place")
    args = parser.parse_args()
    os.environ["CONTAINER_STORE"] = f"bench-images-{os.getpid()}"
    os.environ.setdefault("PYTHON", sys.executable)
    sh(IMAGE_SH, "setup")
    results: dict = {"store": os.environ["CONTAINER_STORE"], "base_from_debootstrap_s": timed(IMAGE_SH, "base")}
    for target, image in TARGETS.items():  # cpu first: the cuda build reuses its deps layer, reported as such
        results[target] = {"image": image, "build_s": timed(IMAGE_SH, "build", image, target)}
    init = ROOT / "predictor" / "__init__.py"
    original = init.read_bytes()
    try:
        init.write_bytes(original + b"# bench/images.py: a code change\n")
        for target, image in TARGETS.items():
            results[target]["rebuild_after_code_change_s"] = timed(IMAGE_SH, "build", image, target)
    finally:
        init.write_bytes(original)
    with tempfile.TemporaryDirectory(dir="/var/tmp") as folder:
        for target, image in TARGETS.items():
            entry = results[target]
            entry["size_bytes"] = int(podman("image", "inspect", "--format", "{{.Size}}", image).stdout)
            entry["run_to_ready_s"], entry["idle_rss_kib"] = run_to_ready(image)
            archive = Path(folder) / f"{target}.tar"
            entry["save_s"] = timed(IMAGE_SH, "podman", "save", "--quiet", "--output", str(archive), image)
            entry["archive_bytes"] = archive.stat().st_size
            # Loaded into an empty store of its own: a new node, which has none of the layers.
            node = f"{os.environ['CONTAINER_STORE']}-node"
            entry["load_s"] = timed(IMAGE_SH, "podman", "load", "--quiet", "--input", str(archive), store=node)
            podman("system", "reset", "--force", timeout=1200, store=node)
            archive.unlink()
    if not args.keep_store:
        podman("system", "reset", "--force", timeout=1200)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
