"""BentoML 1.4 with adaptive batching, serving the predictor's engine, decoding and answer at
POST /classify/image, as BentoML's documentation composes a model with its pre-processing.

    bentoml serve bench.peers.bentoml_service:Cifar10 --port 8094   # in BentoML's own environment (make bench-peers)

`Cifar10` takes the multipart upload (field `file`) and decodes it; `Cifar10Model` (a dependency,
its own process) holds the engine behind a batchable API (at most 32 images a batch, the
predictor's default), so concurrent uploads share a forward pass.
"""

import sys
from pathlib import Path

import bentoml
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from bench.peers.common import answers, decode_image, engine  # noqa: E402

MAX_BATCH_SIZE = 32


@bentoml.service(workers=1)
class Cifar10Model:
    def __init__(self) -> None:
        self.engine = engine(MAX_BATCH_SIZE)

    @bentoml.api(batchable=True, batch_dim=0, max_batch_size=MAX_BATCH_SIZE)
    def logits(self, images: np.ndarray) -> np.ndarray:
        return self.engine.logits(images)


@bentoml.service(workers=1)
class Cifar10:
    model = bentoml.depends(Cifar10Model)

    @bentoml.api(route="/classify/image")
    async def classify_image(self, file: Path) -> dict:
        image = decode_image(file.read_bytes())[None]
        return answers(await self.model.to_async.logits(image))[0]
