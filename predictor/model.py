"""Cifar10Classifier: the kserve.Model behind every endpoint (preprocess -> predict -> postprocess)."""

import asyncio
import concurrent.futures
import gc
import logging
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import kserve
import numpy as np
from kserve.protocol.infer_type import InferRequest, InferResponse

from . import payloads
from .batcher import DynamicBatcher
from .drain import Drain
from .engine import build_engine, usable_cores
from .errors import ApiError
from .imaging import decode_image
from .network import CLASSES, IMAGE_SIZE, build_resnet18
from .security import ApiKeys
from .quantize import calibration_images
from .weights import WeightsError, load_model

log = logging.getLogger("predictor")
_active: "Cifar10Classifier | None" = None


def active_model() -> "Cifar10Classifier | None":
    """The classifier this process serves (set at load, and when a worker process unpickles it)."""
    return _active


@dataclass
class Settings:
    """Serving limits and knobs; every one is a flag and an env var (see predictor.config)."""

    model_dir: Path | None = None
    random_weights: bool = False
    device: str = "auto"
    max_batch_size: int = 32
    max_batch_delay_ms: float = 2.0
    max_batch_files: int = 64
    max_body_bytes: int = 10 * 1024 * 1024
    max_image_side: int = 4096
    decode_threads: int = 2
    max_queue_images: int = 256
    max_in_flight: int = 256
    request_timeout_s: float = 30.0
    drain_timeout_s: int = 20
    api_keys: ApiKeys = field(default_factory=lambda: ApiKeys([]))
    rate_limit_per_minute: int = 100
    trusted_proxy_hops: int = 0  # proxies in front appending to X-Forwarded-For (predictor.security.client_address)
    engine: str = "auto"
    precision: str = "auto"
    compile: bool = True
    intra_op_threads: int = 0  # 0: the usable cores shared out among the worker processes
    workers: int = 1


@dataclass
class ClassifyRequest:
    """A /classify/* call: uploaded files (or the error reading one) and the optional top_k."""

    files: list[bytes | ApiError]
    top_k: int | None = None


@dataclass
class Prepared:
    """What preprocess hands predict: one decoded image or one error per input slot."""

    protocol: str  # "classify" | "v1" | "v2"
    slots: list[np.ndarray | ApiError]
    source: object = None  # the v2 InferRequest, or the ClassifyRequest
    logits: list[np.ndarray | ApiError] = field(default_factory=list)


class Cifar10Classifier(kserve.Model):
    """ResNet18 CIFAR-10 classifier with decoding off the event loop and dynamic batching."""

    def __init__(self, name: str, settings: Settings):
        super().__init__(name)
        self.settings = settings
        self.card: dict = {}
        self.temperature = 1.0
        self.version = "untrained"
        self.runner = None  # an InferenceEngine or OnnxEngine (predictor.engine.build_engine)
        self.batcher: DynamicBatcher | None = None
        self.forward_ok = False
        self._decoder: concurrent.futures.ThreadPoolExecutor | None = None

    # -- lifecycle -------------------------------------------------------------------------------
    def load(self) -> bool:
        """Read and verify the weights, place the network, and prove it with one forward pass."""
        global _active
        if self.settings.random_weights:
            network, self.card = build_resnet18().eval(), {"temperature": 1.0, "note": "random weights (tests only)"}
            self.version = "random-weights"
        else:
            network, self.card = load_model(self.settings.model_dir)
            self.version = self.card.get("weights_sha256", "")[:12]
        self.temperature = float(self.card.get("temperature", 1.0))
        self.runner = build_engine(network, self.card, None if self.settings.random_weights else self.settings.model_dir,
                                   engine=self.settings.engine, device=self.settings.device,
                                   precision=self.settings.precision, max_batch_size=self.settings.max_batch_size,
                                   threads=self.settings.intra_op_threads or max(1, usable_cores() // self.settings.workers),
                                   compile=self.settings.compile, calibration=self._calibration_images())
        self.batcher = DynamicBatcher(self.runner.logits, self.settings.max_batch_size, self.settings.max_batch_delay_ms,
                                     self.settings.max_queue_images, Drain.calls_in_flight)
        self.runner.logits(np.zeros((1, IMAGE_SIZE, IMAGE_SIZE, 3), np.uint8))  # proves the pass; raises if broken
        self.forward_ok = True
        # Compilation leaves millions of long-lived objects behind; a full garbage collection walking
        # them stalled every request in flight for ~0.5 s. Move them out of the collector's view.
        gc.collect()
        gc.freeze()
        self.ready = True
        _active = self
        log.info("loaded %s (version %s) on %s in %.1f s (precision asked: %s), temperature %.3f", self.name, self.version,
                 self.runner.description, self.runner.startup_seconds, self.settings.precision, self.temperature)
        return self.ready

    def _calibration_images(self) -> np.ndarray | None:
        """The int8 calibration set when int8 may be used (asked for, or auto) and it ships; else None."""
        if self.settings.precision not in ("int8", "auto") or self.settings.random_weights:
            return None
        try:
            return calibration_images(self.settings.model_dir, self.card)
        except WeightsError:
            if self.settings.precision == "int8":
                raise
            return None

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_decoder"] = None  # thread pools don't pickle; each worker process makes its own
        return state

    def __setstate__(self, state: dict) -> None:
        global _active
        self.__dict__.update(state)
        _active = self

    # -- KServe handlers -------------------------------------------------------------------------
    def validate(self, payload):
        return payload  # preprocess has already validated every protocol's input

    async def preprocess(self, payload, headers: dict[str, str] | None = None) -> Prepared:
        """Any accepted body -> decoded 32x32 images, decoded in a thread pool, never on the loop."""
        limit = self.settings.max_batch_files
        if isinstance(payload, ClassifyRequest):
            return Prepared("classify", await self._decode_all(payload.files, keep_errors=True), payload)
        if isinstance(payload, InferRequest):
            encoded, pixels = payloads.v2_input(payload, limit)
            slots = list(pixels) if pixels is not None else await self._decode_all(encoded, keep_errors=False)
            return Prepared("v2", slots, payload)
        if isinstance(payload, (bytes, bytearray)):  # v1 with a non-JSON content type
            payload = bytes(payload)
            if not payload.lstrip().startswith(b"{"):  # an image body; decode_image sniffs its real format
                return Prepared("v1", await self._decode_all([payload], keep_errors=False))
            payload = payloads.json_object(payload)
        return Prepared("v1", await self._decode_all(payloads.v1_instances(payload, limit), keep_errors=False))

    async def predict(self, payload: Prepared, headers: dict[str, str] | None = None) -> Prepared:
        """Logits for every decoded slot, through the shared dynamic batcher."""
        images = [slot for slot in payload.slots if isinstance(slot, np.ndarray)]
        logits = iter(await self.batcher.submit(np.stack(images)) if images else [])
        payload.logits = [next(logits) if isinstance(slot, np.ndarray) else slot for slot in payload.slots]
        return payload

    async def postprocess(self, result: Prepared, headers: dict[str, str] | None = None,
                          response_headers: dict[str, str] | None = None) -> dict | InferResponse:
        """Temperature-scaled probabilities in the shape the caller's protocol expects."""
        probabilities = [self.probabilities(x) if isinstance(x, np.ndarray) else x for x in result.logits]
        if result.protocol == "v2":
            request: InferRequest = result.source
            request.id = request.id or str(uuid.uuid4())
            return payloads.v2_response(request, self.name, self.version, np.stack(probabilities))
        if result.protocol == "v1":
            return {"predictions": [payloads.classification(p) for p in probabilities]}
        # Failed slots stay ApiError objects: /classify/image raises its one, /classify/batch renders them.
        top_k = result.source.top_k
        return {"results": [payloads.classification(p, top_k) if isinstance(p, np.ndarray) else p for p in probabilities]}

    def get_input_types(self) -> list[dict]:
        return payloads.V2_INPUTS

    def get_output_types(self) -> list[dict]:
        return payloads.V2_OUTPUTS

    # -- helpers ---------------------------------------------------------------------------------
    def probabilities(self, logits: np.ndarray) -> np.ndarray:
        """Softmax of logits / T: the calibrated confidence; the argmax (the prediction) is unchanged."""
        scaled = logits.astype(np.float64) / self.temperature
        scaled -= scaled.max()
        exp = np.exp(scaled)
        return (exp / exp.sum()).astype(np.float32)

    async def _decode_all(self, files: list[bytes | ApiError], keep_errors: bool) -> list[np.ndarray | ApiError]:
        """Decode files concurrently off the loop; a bad file is kept as its error or raised at once."""
        if self._decoder is None:
            self._decoder = concurrent.futures.ThreadPoolExecutor(self.settings.decode_threads, thread_name_prefix="decode")
        loop = asyncio.get_running_loop()

        async def one(item: bytes | ApiError) -> np.ndarray | ApiError:
            if isinstance(item, ApiError):
                return item
            try:
                return await loop.run_in_executor(self._decoder, decode_image, item, self.settings.max_image_side)
            except ApiError as exc:
                if not keep_errors:
                    raise
                return exc

        return list(await asyncio.gather(*(one(f) for f in files)))

    @property
    def metadata(self) -> dict:
        runner = self.runner
        return {"name": self.name, "version": self.version, "classes": list(CLASSES),
                "device": runner.device_type if runner else None, "engine": runner.name if runner else None,
                "precision": runner.precision if runner else None,
                "compiled": runner.compiled if runner else None,
                "load_seconds": runner.startup_seconds if runner else None,
                "temperature": self.temperature, "max_batch_size": self.settings.max_batch_size}


# The HTTP routes belong with the model: importing them here (not only from __main__) means every
# process that has the model has its routes, including the worker processes that KServe spawns
# for --workers > 1, which unpickle the model but never run predictor.__main__.
from . import routes  # noqa: E402,F401
