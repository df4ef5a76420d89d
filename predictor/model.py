"""Cifar10Classifier: the kserve.Model behind every endpoint (preprocess -> predict -> postprocess).

The classification core: decode images off the event loop, batch them with concurrent requests
through one DynamicBatcher, and turn logits into temperature-scaled probabilities. Which images a
request carries and what its answer looks like is its protocol adapter's business (predictor.serving.protocols).
"""

import asyncio
import concurrent.futures
import ctypes
import gc
import logging

import kserve
import numpy as np
from kserve.protocol.infer_type import InferResponse

from predictor.cifar import CLASSES, IMAGE_SIZE
from predictor.config import Settings
from predictor.engines.reference import ReferenceNetwork, random_state
from predictor.engines.selection import build_engine, usable_cores
from predictor.serving import metrics, payloads
from predictor.serving.batcher import DynamicBatcher
from predictor.serving.drain import Drain
from predictor.serving.errors import ApiError
from predictor.serving.imaging import INLINE_MAX_BYTES, decode_image, is_cheap, open_image, pixels_of
from predictor.serving.protocols import ClassifyRequest, Prepared, Slots, adapter_for
from predictor.weights import WeightsError, calibration_images, network_from_file, network_from_state, verified_weights

log = logging.getLogger("predictor")


def release_free_heap() -> None:
    """Hand the heap that loading freed back to the OS (glibc keeps it otherwise): reading the weights
    and building the reference graph pass ~0.25 GB through it, which stayed in the idle RSS."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to do
        pass


class Cifar10Classifier(kserve.Model):
    """ResNet18 CIFAR-10 classifier with decoding off the event loop and dynamic batching."""

    def __init__(self, name: str, settings: Settings, drain: Drain | None = None):
        super().__init__(name)
        self.settings = settings
        self.drain = drain or Drain()  # the batcher waits for company only while other calls are admitted
        self.reference: ReferenceNetwork | None = None  # the fp32 network, whatever engine serves (:explain reads it)
        self.card: dict = {}
        self.temperature = 1.0
        self.version = "untrained"
        self.runner = None  # an InferenceEngine or OnnxEngine (predictor.engines.selection.build_engine)
        self.batcher: DynamicBatcher | None = None
        self.forward_ok = False
        self._decoder: concurrent.futures.ThreadPoolExecutor | None = None
        # Job images decode in a lane of their own (one thread): a job of large images queued in the
        # interactive decode threads would hold every interactive call behind it.
        self._job_decoder: concurrent.futures.ThreadPoolExecutor | None = None

    # -- lifecycle -------------------------------------------------------------------------------
    def load(self) -> bool:
        """Read and verify the weights, place the network, and prove it with one forward pass."""
        threads = self.settings.intra_op_threads or max(1, usable_cores() // self.settings.workers)
        if self.settings.random_weights:
            state = random_state()
            self.card, self.version = {"temperature": 1.0, "note": "random weights (tests only)"}, "random-weights"
            self.reference = ReferenceNetwork(state, threads)
            torch_network = lambda: network_from_state(state)  # noqa: E731
        else:
            path, self.card = verified_weights(self.settings.model_dir)
            self.version = self.card.get("weights_sha256", "")[:12]
            self.reference = ReferenceNetwork.from_file(path, threads)
            torch_network = lambda: network_from_file(path)  # noqa: E731
        self.temperature = float(self.card.get("temperature", 1.0))
        self.runner = build_engine(self.card, None if self.settings.random_weights else self.settings.model_dir,
                                   reference=self.reference, torch_network=torch_network,
                                   engine=self.settings.engine, device=self.settings.device,
                                   precision=self.settings.precision, max_batch_size=self.settings.max_batch_size,
                                   threads=threads, compile=self.settings.compile,
                                   calibration=self._calibration_images())
        self.batcher = DynamicBatcher(self.runner.logits, self.settings.max_batch_size, self.settings.max_batch_delay_ms,
                                     self.settings.max_queue_images, self.drain.calls_in_flight,
                                     inline_lone_calls=self.runner.device_type == "cpu")
        self.runner.logits(np.zeros((1, IMAGE_SIZE, IMAGE_SIZE, 3), np.uint8))  # proves the pass; raises if broken
        self.forward_ok = True
        # Compilation leaves millions of long-lived objects behind; a full garbage collection walking
        # them stalled every request in flight for ~0.5 s. Move them out of the collector's view.
        gc.collect()
        gc.freeze()
        release_free_heap()
        self.ready = True
        log.info("loaded %s (version %s) on %s in %.1f s (precision asked: %s), temperature %.3f", self.name, self.version,
                 self.runner.description, self.runner.startup_seconds, self.settings.precision, self.temperature)
        return self.ready

    def _calibration_images(self) -> np.ndarray | None:
        """The calibration set when a gated precision (int8, bf16) may be used (asked for, or auto) and it
        ships; else None. It is what int8 is quantized with and what int8 and bf16 are checked against."""
        if self.settings.precision not in ("int8", "bf16", "auto") or self.settings.random_weights:
            return None
        try:
            return calibration_images(self.settings.model_dir, self.card)
        except WeightsError:
            if self.settings.precision == "int8":
                raise
            return None

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_decoder"] = state["_job_decoder"] = None  # thread pools don't pickle; each worker process makes its own
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)

    # -- KServe handlers -------------------------------------------------------------------------
    def validate(self, payload):
        return payload  # preprocess has already validated every protocol's input

    async def preprocess(self, payload, headers: dict[str, str] | None = None) -> Prepared:
        """Any accepted body -> one decoded 32x32 image (or error) per slot, decoded off the event loop."""
        adapter = adapter_for(payload)
        background = isinstance(payload, ClassifyRequest) and payload.background
        decode = self._decode_job if background else self._decode_all
        return Prepared(adapter, payload, await adapter.slots(payload, decode, self.settings.max_batch_files))

    async def predict(self, payload: Prepared, headers: dict[str, str] | None = None) -> Prepared:
        """Logits for every decoded slot, through the shared dynamic batcher."""
        images = [slot for slot in payload.slots if isinstance(slot, np.ndarray)]
        background = isinstance(payload.source, ClassifyRequest) and payload.source.background
        logits = iter(await self.batcher.submit(np.stack(images), background=background) if images else [])
        payload.logits = [next(logits) if isinstance(slot, np.ndarray) else slot for slot in payload.slots]
        return payload

    async def postprocess(self, result: Prepared, headers: dict[str, str] | None = None,
                          response_headers: dict[str, str] | None = None) -> dict | InferResponse:
        """Temperature-scaled probabilities, counted for drift monitoring, in the caller's protocol's shape."""
        probabilities = [self.probabilities(x) if isinstance(x, np.ndarray) else x for x in result.logits]
        for p in probabilities:
            if isinstance(p, np.ndarray):
                metrics.record_prediction(CLASSES[int(p.argmax())], float(p.max()), self.version)
        return result.adapter.render(result.source, probabilities, self.name, self.version)

    async def classify(self, files: list[bytes | ApiError], top_k: int | None = None, background: bool = False) -> Slots:
        """The multipart core: one result dict (the seed's fields, no timestamp) or ApiError per file.
        `background`: async job work, which interactive calls overtake in the batcher."""
        response, _ = await self(ClassifyRequest(files, top_k, background))
        return response["results"]

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

    async def _decode_job(self, files: list[bytes | ApiError], keep_errors: bool) -> Slots:
        if self._job_decoder is None:
            self._job_decoder = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="job-decode")
        return await self._decode_all(files, keep_errors, self._job_decoder)

    async def _decode_all(self, files: list[bytes | ApiError], keep_errors: bool,
                          pool: concurrent.futures.ThreadPoolExecutor | None = None) -> Slots:
        """Decode files concurrently off the loop (in `pool`, else the interactive decode threads, or at
        once on the loop when the image is small); a bad file is kept as its error or raised at once."""
        inline_small = pool is None  # a job's images all go to its own lane, however small
        if pool is None:
            if self._decoder is None:
                self._decoder = concurrent.futures.ThreadPoolExecutor(self.settings.decode_threads,
                                                                      thread_name_prefix="decode")
            pool = self._decoder
        loop = asyncio.get_running_loop()

        async def one(item: bytes | ApiError) -> np.ndarray | ApiError:
            if isinstance(item, ApiError):
                return item
            try:
                if not inline_small or len(item) > INLINE_MAX_BYTES:
                    return await loop.run_in_executor(pool, decode_image, item, self.settings.max_image_side)
                image = open_image(item, self.settings.max_image_side)
                return pixels_of(image) if is_cheap(image) else await loop.run_in_executor(pool, pixels_of, image)
            except ApiError as exc:
                if not keep_errors:
                    raise
                return exc

        if len(files) == 1:  # the common call: no task for gather to make
            return [await one(files[0])]
        return list(await asyncio.gather(*(one(f) for f in files)))

    @property
    def platform(self) -> str:
        """The OIP `platform` of what serves the forward pass (Triton's names where they apply)."""
        return "onnxruntime_onnx" if self.runner is not None and self.runner.name == "onnxruntime" else "pytorch"

    @property
    def metadata(self) -> dict:
        runner = self.runner
        return {"name": self.name, "version": self.version, "classes": list(CLASSES),
                "device": runner.device_type if runner else None, "engine": runner.name if runner else None,
                "precision": runner.precision if runner else None,
                "compiled": runner.compiled if runner else None,
                "load_seconds": runner.startup_seconds if runner else None,
                "intra_op_threads": runner.intra_op_threads() if runner else None,
                "temperature": self.temperature, "max_batch_size": self.settings.max_batch_size}

