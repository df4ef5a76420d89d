"""The data plane: the one object every edge calls to classify (the multipart routes, KServe's v1/v2
handlers through the kserve.Model, gRPC through the same model, the job workers).

Behind it, top-down: the result cache (predictor.core.cache) -> decoding off the event loop
(predictor.core.imaging) -> the dynamic batcher (predictor.core.batcher) -> the engine (an `Engine`:
uint8 pixels in, logits out; in this process, or with `--workers N` in the engine process that every
front-end process feeds: predictor.engines.remote, awaited on the loop through `logits_async`) ->
temperature-scaled probabilities, counted for drift monitoring. It knows no transport: its failures are domain errors (predictor.core.errors).
"""

import asyncio
import concurrent.futures
import time
from dataclasses import dataclass
from typing import Protocol

import numpy as np
from kserve.metrics import POST_HIST_TIME, PRE_HIST_TIME, PREDICT_HIST_TIME

from predictor import payloads
from predictor.cifar import CLASSES
from predictor.core import metrics
from predictor.core.batcher import DynamicBatcher
from predictor.core.cache import ResultCache
from predictor.core.drain import Drain
from predictor.core.errors import ApiError
from predictor.core.imaging import INLINE_MAX_BYTES, decode_image, is_cheap, native_jpeg_pixels, open_image, pixels_of

Slots = list[np.ndarray | ApiError]


def calibrated(logits: np.ndarray, temperature: float) -> np.ndarray:
    """Softmax of logits / T: the calibrated confidence; the argmax (the prediction) is unchanged."""
    scaled = logits.astype(np.float64) / temperature
    scaled -= scaled.max()
    exp = np.exp(scaled)
    return (exp / exp.sum()).astype(np.float32)


class Engine(Protocol):
    """What the data plane needs of an engine (predictor.engines: ONNX Runtime int8, torch). `logits` is
    blocking and thread-safe; the batcher calls it with at most `max_batch_size` images."""

    name: str
    precision: str
    compiled: bool
    startup_seconds: float
    device_type: str
    description: str

    def logits(self, images: np.ndarray) -> np.ndarray:
        """[N, 32, 32, 3] uint8 -> [N, 10] float32 logits."""

    def available(self) -> bool:
        """Whether passes can be asked for now (an engine in another process may be gone or starting)."""

    def intra_op_threads(self) -> int:
        """Threads one forward pass uses in this process."""


@dataclass(frozen=True)
class Limits:
    """The per-call limits and pool sizes the data plane enforces (from predictor.config.Settings)."""

    max_batch_size: int
    max_batch_delay_ms: float
    max_queue_images: int
    max_batch_files: int
    max_image_side: int
    decode_threads: int


class DataPlane:
    """Decode -> batch -> engine -> probabilities for every protocol, with the result cache in front of
    the multipart calls. `version` (the weights' sha256 prefix) and `temperature` come with the engine;
    `model_name` labels KServe's own stage histograms, which the multipart calls record as the kserve.Model
    records them for v1/v2 (request_preprocess/predict/postprocess_seconds: dashboards query them)."""

    def __init__(self, engine: Engine, limits: Limits, drain: Drain, version: str, temperature: float = 1.0,
                 model_name: str = "model"):
        self.engine = engine
        self.model_name = model_name
        self.limits = limits
        self.drain = drain
        self.version = version
        self.temperature = temperature
        # The batcher waits for company only while other calls are admitted; a lone image is computed
        # on the loop by a CPU engine.
        self.batcher = DynamicBatcher(engine.logits, limits.max_batch_size, limits.max_batch_delay_ms,
                                      limits.max_queue_images, drain.calls_in_flight,
                                      inline_lone_calls=engine.device_type == "cpu",
                                      forward_async=getattr(engine, "logits_async", None))
        self.cache: ResultCache | None = None
        self._decoder: concurrent.futures.ThreadPoolExecutor | None = None
        # Job images decode in a lane of their own (one thread): a job of large images queued in the
        # interactive decode threads would hold every interactive call behind it.
        self._job_decoder: concurrent.futures.ThreadPoolExecutor | None = None
        self._step_series: tuple | None = None  # KServe's step histograms' series of this model (record_steps)

    def with_engine(self, engine: Engine, drain: Drain) -> "DataPlane":
        """This data plane's limits, version and calibration on another engine (the engine process's, remote)."""
        return DataPlane(engine, self.limits, drain, self.version, self.temperature, self.model_name)

    def available(self) -> bool:
        return self.engine.available()

    def use_cache(self, cache: ResultCache | None) -> None:
        """Put `cache` in front of `classify` (made per serving process: it holds a Redis connection)."""
        self.cache = cache

    def __getstate__(self) -> dict:
        # Worker processes (--workers N) receive the data plane pickled: pools and the cache are made there.
        return {**self.__dict__, "_decoder": None, "_job_decoder": None, "cache": None, "_step_series": None}

    # -- the multipart calls and the jobs ------------------------------------------------------------
    async def classify(self, files: list[bytes | ApiError], top_k: int | None = None, owner: str | None = None,
                       background: bool = False) -> tuple[list[dict | ApiError], bool]:
        """One result dict (predicted_class, confidence, all_probabilities[, top_k]) or error per file, and
        whether all came from the cache. `owner` (the caller's key id) scopes the cache entries it reads
        and writes; `background`: async job work, which interactive calls overtake in the batcher."""
        keys = [self.cache.key(f, top_k, owner) if self.cache is not None and isinstance(f, bytes) and f else None
                for f in files]
        known = iter(await self.cache.get_many([k for k in keys if k is not None]) if self.cache is not None else ())
        results: list[dict | ApiError | None] = [next(known) if k is not None else None for k in keys]
        for result in results:
            if result is not None:  # answers served count in the prediction metrics, computed or not
                metrics.record_prediction(result["predicted_class"], result["confidence"], self.version)
        missing = [i for i, r in enumerate(results) if r is None]
        if not missing:
            return results, True
        started = time.perf_counter()
        slots = await self.decode([files[i] for i in missing], keep_errors=True, background=background)
        decoded = time.perf_counter()
        probabilities = await self.probabilities_of(slots, background)
        predicted = time.perf_counter()
        fresh = {}
        for i, p in zip(missing, probabilities):
            results[i] = payloads.classification(p, top_k) if isinstance(p, np.ndarray) else p
            if keys[i] is not None and isinstance(p, np.ndarray):
                fresh[keys[i]] = results[i]
        self.record_steps(decoded - started, predicted - decoded, time.perf_counter() - predicted)
        if self.cache is not None:
            await self.cache.put_many(fresh)
        return results, False

    def record_steps(self, preprocess_s: float, predict_s: float, postprocess_s: float) -> None:
        """One call's time in each step, in KServe's own histograms (request_preprocess_seconds, ...)."""
        if self._step_series is None:
            self._step_series = tuple(hist.labels(self.model_name) for hist in (PRE_HIST_TIME, PREDICT_HIST_TIME, POST_HIST_TIME))
        pre, predict, post = self._step_series
        pre.observe(preprocess_s)
        predict.observe(predict_s)
        post.observe(postprocess_s)

    # -- the steps, for the kserve.Model's preprocess / predict / postprocess ------------------------
    async def decode(self, files: list[bytes | ApiError], keep_errors: bool, background: bool = False) -> Slots:
        """Decode files concurrently off the loop (a job's in its own lane, an interactive call's in the
        decode threads, or at once on the loop when the image is small); a bad file is kept as its error
        (`keep_errors`) or raised at once."""
        pool = self._pool(background)
        loop = asyncio.get_running_loop()
        max_side = self.limits.max_image_side

        async def one(item: bytes | ApiError) -> np.ndarray | ApiError:
            if isinstance(item, ApiError):
                return item
            try:
                if background or len(item) > INLINE_MAX_BYTES:
                    return await loop.run_in_executor(pool, decode_image, item, max_side)
                if (pixels := native_jpeg_pixels(item, max_side)) is not None:
                    return pixels
                image = open_image(item, max_side)
                return pixels_of(image) if is_cheap(image) else await loop.run_in_executor(pool, pixels_of, image)
            except ApiError as exc:
                if not keep_errors:
                    raise
                return exc

        if len(files) == 1:  # the common call: no task for gather to make
            return [await one(files[0])]
        return list(await asyncio.gather(*(one(f) for f in files)))

    async def probabilities_of(self, slots: Slots, background: bool = False) -> Slots:
        """Calibrated probabilities for every decoded slot (one pass through the shared batcher), each
        counted for drift monitoring; an error slot stays as it is."""
        images = [slot for slot in slots if isinstance(slot, np.ndarray)]
        logits = iter(await self.batcher.submit(np.stack(images), background=background) if images else ())
        out: Slots = []
        for slot in slots:
            if isinstance(slot, np.ndarray):
                slot = calibrated(next(logits), self.temperature)
                metrics.record_prediction(CLASSES[int(slot.argmax())], float(slot.max()), self.version)
            out.append(slot)
        return out

    def _pool(self, background: bool) -> concurrent.futures.ThreadPoolExecutor:
        if background:
            if self._job_decoder is None:
                self._job_decoder = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="job-decode")
            return self._job_decoder
        if self._decoder is None:
            self._decoder = concurrent.futures.ThreadPoolExecutor(self.limits.decode_threads, thread_name_prefix="decode")
        return self._decoder

    # -- what the edges report ------------------------------------------------------------------------
    @property
    def platform(self) -> str:
        """The OIP `platform` of what serves the forward pass (Triton's names where they apply)."""
        return "onnxruntime_onnx" if self.engine.name == "onnxruntime" else "pytorch"

    def metadata(self) -> dict:
        engine = self.engine
        return {"version": self.version, "classes": list(CLASSES), "device": engine.device_type, "engine": engine.name,
                "precision": engine.precision, "compiled": engine.compiled, "load_seconds": engine.startup_seconds,
                "intra_op_threads": engine.intra_op_threads(), "temperature": self.temperature,
                "max_batch_size": self.limits.max_batch_size}
