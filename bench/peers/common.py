"""What every peer server in `make bench` shares with the predictor: the shipped int8 graph on ONNX
Runtime with the predictor's session settings, the predictor's decoding, and its JSON answer.

The peers run in virtual environments of their own (`make bench-peers`), with the repository on
PYTHONPATH; this module needs only numpy, Pillow, ONNX Runtime, safetensors and Starlette (for the
decoder's error types), all of which each peer's environment pins to the predictor's versions.
"""

from datetime import datetime, timezone

import numpy as np

from predictor.cifar import CLASSES
from predictor.core.imaging import decode_image
from predictor.engines.devices import usable_cores
from predictor.engines.onnx_int8 import OnnxEngine, onnx_int8_path
from predictor.weights import PACKAGED_DIR, read_card

__all__ = ["answers", "decode_image", "engine"]

_card = read_card(PACKAGED_DIR)
_temperature = float(_card.get("temperature", 1.0))


def engine(max_batch_size: int) -> OnnxEngine:
    """The predictor's default CPU engine: the shipped int8 graph, the usable cores as intra-op threads."""
    return OnnxEngine(onnx_int8_path(PACKAGED_DIR, _card), max_batch_size=max_batch_size, threads=usable_cores())


def answers(logits: np.ndarray) -> list[dict]:
    """[N, 10] logits -> the predictor's /classify/image answer for each image (temperature-scaled softmax)."""
    scaled = logits.astype(np.float64) / _temperature
    probabilities = np.exp(scaled - scaled.max(axis=1, keepdims=True))
    probabilities /= probabilities.sum(axis=1, keepdims=True)
    now = datetime.now(timezone.utc).isoformat()
    out = []
    for row in probabilities:
        best = int(row.argmax())
        out.append({"predicted_class": CLASSES[best], "confidence": round(float(row[best]), 6),
                    "all_probabilities": {c: round(float(p), 6) for c, p in zip(CLASSES, row)}, "timestamp": now})
    return out
