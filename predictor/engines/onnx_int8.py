"""The default CPU engine: the shipped int8 ONNX graph on ONNX Runtime.

Why this and not torch on the CPU (measured, README "Speed"): ONNX Runtime releases the GIL for the
whole forward pass, so the event loop keeps parsing and decoding while a batch computes; it needs no
compiler and nothing is compiled at start-up (load < 1 s instead of 20-40 s of inductor work); and
its int8 kernels were the fastest measured at batch 1 and at the served batch. The graph is made at
export time from the same weights (`python -m predictor.training.quantize`), its sha256 is in the model card,
and at load its answers are compared with the fp32 network's on the calibration images.
"""

import logging
import time
from pathlib import Path

import numpy as np
import onnxruntime

from predictor.weights import ONNX_INPUT, WeightsError, sha256_of

log = logging.getLogger("predictor")


def onnx_int8_path(directory: Path, card: dict) -> Path:
    """The int8 ONNX graph shipped with the weights, verified against the card's sha256."""
    entry = card.get("onnx_int8") or {}
    path = Path(directory) / entry.get("file", "")
    if not entry or not path.is_file():
        raise WeightsError(f"{directory}: no int8 ONNX graph (run `python -m predictor.training.quantize --onnx-only`)")
    if sha256_of(path) != entry.get("sha256"):
        raise WeightsError(f"{path}: sha256 does not match the model card's")
    return path


class OnnxEngine:
    """int8 forward pass on ONNX Runtime's CPU provider. `logits` is blocking and holds no GIL while it computes."""

    device_type = "cpu"
    precision = "int8"
    compiled = False
    name = "onnxruntime"

    def __init__(self, path: Path, max_batch_size: int = 32, threads: int = 1):
        started = time.perf_counter()
        self.path = Path(path)
        self.max_batch_size = max_batch_size
        self.threads = threads
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.execution_mode = onnxruntime.ExecutionMode.ORT_SEQUENTIAL
        options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL
        # Spinning intra-op threads keep a core busy after each pass; on a pod sharing its cores with
        # the event loop and the decoders that steals the time they need.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self._session = onnxruntime.InferenceSession(str(self.path), options, providers=["CPUExecutionProvider"])
        self.logits(np.zeros((max_batch_size, 32, 32, 3), np.uint8))  # first-run allocations, before ready
        self.startup_seconds = round(time.perf_counter() - started, 3)

    def available(self) -> bool:
        return True  # in this process: there whenever the process is

    def intra_op_threads(self) -> int:
        return self.threads

    @property
    def description(self) -> str:
        return f"cpu int8 onnxruntime {onnxruntime.__version__} ({self.threads} intra-op thread(s))"

    def logits(self, images: np.ndarray) -> np.ndarray:
        """[N, 32, 32, 3] uint8 -> [N, 10] float32 logits (N may exceed max_batch_size: done in chunks)."""
        return np.concatenate([self._session.run(None, {ONNX_INPUT: np.ascontiguousarray(images[i:i + self.max_batch_size])})[0]
                               for i in range(0, len(images), self.max_batch_size)])

    def __getstate__(self) -> dict:
        # KServe pickles the model into each worker process (--workers > 1); sessions don't pickle.
        return {"path": self.path, "max_batch_size": self.max_batch_size, "threads": self.threads}

    def __setstate__(self, state: dict) -> None:
        self.__init__(**state)
