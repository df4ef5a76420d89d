"""Cifar10Classifier: the kserve.Model behind KServe's v1/v2 endpoints and gRPC (preprocess -> predict ->
postprocess), and the owner of the data plane every other edge calls.

`load` reads and verifies the weights, builds the engine and the data plane (predictor.dataplane) on it.
The three KServe steps are the data plane's, with the protocol's adapter (predictor.protocols) reading
the body into image slots before and rendering the answer after.
"""

import ctypes
import gc
import logging
import time

import kserve
import numpy as np
from kserve.protocol.infer_type import InferRequest, InferResponse

from predictor import payloads
from predictor.config import Settings
from predictor.core.drain import Drain
from predictor.dataplane import DataPlane, Limits
from predictor.engines.devices import usable_cores
from predictor.engines.reference import ReferenceNetwork, random_state
from predictor.engines.remote import RemoteEngine, RemoteReference
from predictor.engines.selection import build_engine
from predictor.protocols import Prepared, adapter_for
from predictor.weights import (
    WeightsError,
    calibration_images,
    network_from_file,
    network_from_state,
    verified_weights,
)

log = logging.getLogger("predictor")


def release_free_heap() -> None:
    """Hand the heap that loading freed back to the OS (glibc keeps it otherwise): reading the weights
    and building the reference graph pass ~0.25 GB through it, which stayed in the idle RSS."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to do
        pass


class Cifar10Classifier(kserve.Model):
    """ResNet18 CIFAR-10 classifier: KServe's model contract on top of the data plane."""

    def __init__(self, name: str, settings: Settings, drain: Drain | None = None):
        super().__init__(name)
        self.settings = settings
        self.drain = drain or Drain()
        self.reference: ReferenceNetwork | RemoteReference | None = None  # the fp32 network, whatever engine serves (:explain reads it)
        self.card: dict = {}
        self.version = "untrained"
        self.dataplane: DataPlane | None = None
        self.forward_ok = False
        self._loaded = False

    @property
    def ready(self) -> bool:
        """Loaded, and its engine available (with --workers N the engine process may be gone or still
        waiting for the other front ends): what every readiness route and KServe's own check read."""
        return self._loaded and self.dataplane is not None and self.dataplane.available()

    @ready.setter
    def ready(self, value: bool) -> None:  # kserve.Model sets it
        self._loaded = value

    # -- lifecycle -------------------------------------------------------------------------------
    def load(self) -> bool:
        """Read and verify the weights, place the network, and prove it with one forward pass."""
        settings = self.settings
        # One engine per pod whatever --workers is (the front ends feed it): it may use every usable core.
        threads = settings.intra_op_threads or usable_cores()
        if settings.random_weights:
            state = random_state()
            self.card, self.version = {"temperature": 1.0, "note": "random weights (tests only)"}, "random-weights"
            self.reference = ReferenceNetwork(state, threads)
            torch_network = lambda: network_from_state(state)
        else:
            path, self.card = verified_weights(settings.model_dir)
            self.version = self.card.get("weights_sha256", "")[:12]
            self.reference = ReferenceNetwork.from_file(path, threads)
            torch_network = lambda: network_from_file(path)
        engine = build_engine(self.card, None if settings.random_weights else settings.model_dir,
                              reference=self.reference, torch_network=torch_network, engine=settings.engine,
                              device=settings.device, precision=settings.precision,
                              max_batch_size=settings.max_batch_size, threads=threads, compile=settings.compile,
                              calibration=self._calibration_images())
        limits = Limits(settings.max_batch_size, settings.max_batch_delay_ms, settings.max_queue_images,
                        settings.max_batch_files, settings.max_image_side, settings.decode_threads)
        self.dataplane = DataPlane(engine, limits, self.drain, self.version, float(self.card.get("temperature", 1.0)),
                                   model_name=self.name)
        engine.logits(np.zeros((1, 32, 32, 3), np.uint8))  # proves the pass; raises if broken
        self.forward_ok = True
        # Compilation leaves millions of long-lived objects behind; a full garbage collection walking
        # them stalled every request in flight for ~0.5 s. Move them out of the collector's view.
        gc.collect()
        gc.freeze()
        release_free_heap()
        self.ready = True
        log.info("loaded %s (version %s) on %s in %.1f s (precision asked: %s), temperature %.3f", self.name, self.version,
                 engine.description, engine.startup_seconds, settings.precision, self.dataplane.temperature)
        return self.ready

    def use_engine(self, engine: RemoteEngine) -> None:
        """Serve through the engine process: the data plane's passes and :explain's fp32 ones go to `engine`,
        so a front end holds no weights of its own."""
        self.dataplane = self.dataplane.with_engine(engine, self.drain)
        self.reference = RemoteReference(engine)

    def in_forked_process(self) -> None:
        """A front end forked from the engine process (--workers N) starts its own drain, batcher and link:
        the ones it inherited are the engine process's."""
        self.drain = Drain()
        self.use_engine(self.dataplane.engine.unconnected())

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

    # -- KServe handlers -------------------------------------------------------------------------
    def validate(self, payload):
        return payload  # preprocess has already validated every protocol's input

    async def preprocess(self, payload, headers: dict[str, str] | None = None) -> Prepared:
        """A v1 or v2 body -> one decoded 32x32 image per slot (a bad one fails the call: these protocols
        have no per-image error)."""
        adapter = adapter_for(payload)
        return Prepared(adapter, payload, await adapter.slots(payload, self.dataplane.decode, self.settings.max_batch_files))

    async def predict(self, payload: Prepared, headers: dict[str, str] | None = None) -> Prepared:
        """Calibrated probabilities for every slot, through the shared dynamic batcher."""
        payload.probabilities = await self.dataplane.probabilities_of(payload.slots)
        return payload

    async def postprocess(self, result: Prepared, headers: dict[str, str] | None = None,
                          response_headers: dict[str, str] | None = None) -> dict | InferResponse:
        """The answer in the caller's protocol's shape."""
        return result.adapter.render(result.source, result.probabilities, self.name, self.version)

    async def infer(self, request: InferRequest) -> InferResponse:
        """A v2 predict call, as `await model(request)` makes it (preprocess -> predict -> postprocess, each
        timed in KServe's histograms), for the v2 REST route: without the generality of kserve.Model.__call__
        (verbs, optional arguments found by inspection, a timer context and label lookup per step), which
        cost a quarter of what this route spends on a call of its own. With KServe's latency logging on,
        its own __call__ runs, which writes that log."""
        if self.enable_latency_logging:
            return (await self(request, headers=None))[0]
        started = time.perf_counter()
        prepared = await self.preprocess(request)
        preprocessed = time.perf_counter()
        prepared = await self.predict(prepared)
        predicted = time.perf_counter()
        response = await self.postprocess(prepared)
        self.dataplane.record_steps(preprocessed - started, predicted - preprocessed, time.perf_counter() - predicted)
        return response

    def get_input_types(self) -> list[dict]:
        return payloads.V2_INPUTS

    def get_output_types(self) -> list[dict]:
        return payloads.V2_OUTPUTS

    @property
    def platform(self) -> str:
        return self.dataplane.platform if self.dataplane is not None else "onnxruntime_onnx"

    @property
    def metadata(self) -> dict:
        """What /health and the v2 model metadata report of what this replica serves."""
        if self.dataplane is None:
            return {"name": self.name, "version": self.version, "device": None, "engine": None, "precision": None}
        return {"name": self.name, **self.dataplane.metadata()}
