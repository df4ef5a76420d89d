"""The servers a user would pick instead of the predictor, on the same engine, decoding and answer
(`make bench` measures them beside it): how each is started, in which environment, where it says ready,
and which requests bench/run.py's sweep sends it (`rows`)."""

import re
import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PEER_VENVS = ROOT / ".cache" / "bench-peers"  # made by `make bench-peers`


@dataclass(frozen=True)
class Peer:
    label: str  # the server, as the tables name it; "{version}": its pinned version
    venv: str | None  # its environment under PEER_VENVS; None: the predictor's own
    package: str | None  # the pinned package whose version the tables show
    argv: tuple[str, ...]  # after the environment's bin/ directory; "{port}" is filled in
    ready_path: str  # answers 200 once the model is loaded
    # What bench/run.py's sweep measures on it: (row suffix, path, request kind of bench/v2_requests.py's
    # http_load); one row, multipart /classify/image, unless said.
    rows: tuple[tuple[str, str, str], ...] = (("", "/classify/image", "multipart"),)
    grpc_port_offset: int | None = None  # its gRPC port is the HTTP port + this (None: not measured over gRPC)

    @property
    def name(self) -> str:
        if self.package is None:
            return self.label
        pins = (ROOT / "bench" / "peers" / f"requirements-{self.venv}.txt").read_text()
        version = re.search(rf"^{re.escape(self.package)}(?:\[[^\]]*\])?==(\S+)", pins, re.M)
        return self.label.format(version=version.group(1) if version else "")

    def row_name(self, suffix: str) -> str:
        return f"{self.name}, {suffix}" if suffix else self.name

    def command(self, port: int) -> list[str]:
        bin_dir = Path(sys.executable).parent if self.venv is None else PEER_VENVS / self.venv / "bin"
        if not bin_dir.is_dir():
            raise SystemExit(f"{bin_dir} is missing: run `make bench-peers`")
        first, *rest = self.argv
        return [str(bin_dir / first), *(a.replace("{port}", str(port)) for a in rest)]

    def environment(self) -> dict[str, str]:
        """What its process needs on top of the benchmark's environment."""
        return {"PYTHONPATH": str(ROOT), "BENTOML_HOME": str(PEER_VENVS / "bentoml-home")}


PEERS = [
    Peer("plain ONNX Runtime server", None, None,
         ("python", "bench/peers/plain_onnx_server.py", "--port", "{port}"), "/health"),
    Peer("MLServer {version}, adaptive batching", "mlserver", "mlserver",
         ("python", "bench/peers/mlserver_runtime.py", "--port", "{port}"), "/v2/models/cifar10/ready",
         grpc_port_offset=1000),
    Peer("BentoML {version}, adaptive batching", "bentoml", "bentoml",
         ("bentoml", "serve", "bench.peers.bentoml_service:Cifar10", "--host", "127.0.0.1", "--port", "{port}"),
         "/readyz"),
    Peer("Ray Serve {version}, @serve.batch", "ray", "ray",
         ("python", "bench/peers/ray_serve_app.py", "--port", "{port}"), "/health"),
    # No multipart endpoint: the files as tritonclient sends them, and the predictor's own v2 pixels request.
    Peer("Triton (PyTriton {version}), dynamic batching", "triton", "nvidia-pytriton",
         ("python", "bench/peers/triton_server.py", "--port", "{port}"), "/v2/models/cifar10-resnet18/ready",
         rows=(("JPEG BYTES", "/v2/models/cifar10-resnet18-jpeg/infer", "v2-binary-bytes-batched"),
               ("v2 binary pixels", "/v2/models/cifar10-resnet18/infer", "v2-binary-pixels")),
         grpc_port_offset=1),
]
