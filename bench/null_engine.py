"""A bench-only engine that answers at no cost (Triton's `identity` model, for our graph's output): fixed
zero logits [N, 10], so a benchmark of a server running it measures the server itself: its HTTP or gRPC
stack, its decoding (still done: it is part of the stack), batching, gates, metrics and answer.

Not a user-facing option: the predictor gets it from bench/null_predictor.py (a launcher that patches the
engine selection), the peers from the environment variable NULL_ENGINE_ENV, read only by bench/peers/.
Needs numpy only (it runs in every peer's environment).
"""

import time

import numpy as np

NULL_ENGINE_ENV = "BENCH_NULL_ENGINE"  # "1": bench/peers/common.py's engine() is this one


class NullEngine:
    """predictor.dataplane.Engine's interface; `logits` returns zeros and takes no time."""

    name = "null"
    precision = "none"
    compiled = False
    device_type = "cpu"  # the data plane computes a lone image on the loop, as with the ONNX engine
    description = "the bench's null engine (zero logits, no computation)"

    def __init__(self, max_batch_size: int = 32):
        started = time.perf_counter()
        self.max_batch_size = max_batch_size
        self._zeros = np.zeros((max(1, max_batch_size), 10), np.float32)
        self.startup_seconds = round(time.perf_counter() - started, 3)

    def logits(self, images: np.ndarray) -> np.ndarray:
        n = len(images)
        return self._zeros[:n].copy() if n <= len(self._zeros) else np.zeros((n, 10), np.float32)

    def available(self) -> bool:
        return True  # in this process: there whenever the process is

    def intra_op_threads(self) -> int:
        return 1
