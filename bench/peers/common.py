"""What every peer server in `make bench` shares with the predictor: the shipped int8 graph on ONNX
Runtime with the predictor's session settings, the predictor's decoding, and its JSON answer.

The peers run in virtual environments of their own (`make bench-peers`), with the repository on
PYTHONPATH; this module needs only numpy, Pillow, ONNX Runtime, safetensors and Starlette (for the
decoder's error types), all of which each peer's environment pins to the predictor's versions.

With BENCH_NULL_ENGINE=1 in its environment (bench/stack_cost.py sets it) a peer serves the bench's null
engine instead (bench/null_engine.py: zero logits, no computation; the decoding stays), so its stack's
own cost can be measured beside the predictor's on the same null model.
"""

import os
from datetime import datetime, timezone

import numpy as np

from bench.null_engine import NULL_ENGINE_ENV, NullEngine
from predictor.cifar import CLASSES
from predictor.core.imaging import decode_image
from predictor.engines.devices import usable_cores
from predictor.engines.onnx_int8 import OnnxEngine, onnx_int8_path
from predictor.weights import PACKAGED_DIR, read_card

__all__ = ["answers", "decode_image", "engine", "labels", "probabilities"]

_card = read_card(PACKAGED_DIR)
_temperature = float(_card.get("temperature", 1.0))


def engine(max_batch_size: int) -> OnnxEngine | NullEngine:
    """The predictor's default CPU engine: the shipped int8 graph, the usable cores as intra-op threads
    (with BENCH_NULL_ENGINE=1: the bench's null engine)."""
    if os.environ.get(NULL_ENGINE_ENV) == "1":
        return NullEngine(max_batch_size)
    return OnnxEngine(onnx_int8_path(PACKAGED_DIR, _card), max_batch_size=max_batch_size, threads=usable_cores())


def probabilities(logits: np.ndarray) -> np.ndarray:
    """[N, 10] logits -> the predictor's temperature-scaled softmax, float64."""
    scaled = logits.astype(np.float64) / _temperature
    out = np.exp(scaled - scaled.max(axis=1, keepdims=True))
    return out / out.sum(axis=1, keepdims=True)


def labels(probabilities: np.ndarray) -> list[str]:
    """The most probable class of each row, by name (the predictor's v2 `label` output)."""
    return [CLASSES[int(i)] for i in probabilities.argmax(axis=1)]


def answers(logits: np.ndarray) -> list[dict]:
    """[N, 10] logits -> the predictor's /classify/image answer for each image (temperature-scaled softmax)."""
    now = datetime.now(timezone.utc).isoformat()
    out = []
    for row in probabilities(logits):
        best = int(row.argmax())
        out.append({"predicted_class": CLASSES[best], "confidence": round(float(row[best]), 6),
                    "all_probabilities": {c: round(float(p), 6) for c, p in zip(CLASSES, row)}, "timestamp": now})
    return out
