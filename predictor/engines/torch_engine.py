"""The torch engine: the network on CUDA (fp16, bf16, fp32; CUDA graphs) or on the CPU (fp32, bf16, int8).

Imported only when it serves (predictor.engines.selection.build_engine), so the default ONNX Runtime engine
runs without torch. Precisions and the load-time gate are described in predictor.engines.selection.
"""

import copy
import logging
import os
import shutil
import threading
import time
from collections.abc import Callable
from contextlib import nullcontext

import numpy as np
import torch

from predictor.engines.devices import CPU_PRECISIONS, CUDA_PRECISIONS, EngineError, cpu_has, resolve_device
from predictor.network import normalize
from predictor.weights import WeightsError

log = logging.getLogger("predictor")


def native_cpu_precisions() -> frozenset[str]:
    """The reduced precisions this CPU has native instructions for: int8 (VNNI or AMX), bf16 (oneDNN's bf16 kernels)."""
    native = set()
    if cpu_has("avx512_vnni") or cpu_has("amx_int8"):
        native.add("int8")
    if torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported():
        native.add("bf16")
    return frozenset(native)


def resolve_precision(requested: str, device: torch.device, verifiable: bool,
                      native: frozenset[str] | None = None) -> str:
    """The precision to serve. `verifiable`: the calibration images ship, so a reduced CPU precision can be
    gated against fp32 at load; `native`: this CPU's native reduced precisions (read from it by default)."""
    if device.type == "cuda":
        choice = "fp16" if requested == "auto" else requested
        allowed = CUDA_PRECISIONS
    else:
        choice = requested
        if requested == "auto":
            native = native_cpu_precisions() if native is None else native
            choice = next((p for p in ("int8", "bf16") if verifiable and p in native), "fp32")
        allowed = CPU_PRECISIONS
    if choice not in allowed:
        raise EngineError(f"--precision {choice} is not available on {device.type} (choose from {', '.join(allowed)})")
    return choice


def quantize_pt2e_int8(model: torch.nn.Module, calibration: np.ndarray, max_batch_size: int) -> torch.nn.Module:
    """fp32 network -> PT2E int8 graph (x86 inductor backend) (batch dimension dynamic up to max_batch_size), calibrated."""
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e
    from torchao.quantization.pt2e.quantizer import x86_inductor_quantizer as x86

    example = normalize(torch.from_numpy(calibration[:2]))
    batch = torch.export.Dim("batch", min=1, max=max(2, max_batch_size))
    # strict export: the non-strict one fails in the quantizer's annotation pass (torchao 0.18)
    graph = torch.export.export(model, (example,), dynamic_shapes=({0: batch},), strict=True).module()
    quantizer = x86.X86InductorQuantizer().set_global(x86.get_default_x86_inductor_quantization_config())
    prepared = prepare_pt2e(graph, quantizer)
    with torch.no_grad():
        for start in range(0, len(calibration), 32):
            prepared(normalize(torch.from_numpy(calibration[start:start + 32])))
    return convert_pt2e(prepared)


def batch_buckets(max_batch_size: int) -> list[int]:
    """The batch sizes compiled graphs are built for: powers of two, then the maximum.

    A batch is zero-padded up to the next bucket, so no batch pays more than twice its own cost
    (measured on the 2-core CPU, int8: 12 images padded to 16 take 24 ms, padded to 32 they took
    42 ms). Dynamic-shape graphs would avoid the padding but ran the int8 kernels ~100x slower.
    """
    return [1 << i for i in range(max_batch_size.bit_length()) if 1 << i < max_batch_size] + [max_batch_size]


class InferenceEngine:
    """Owns the network on its device. `logits` is blocking: call it from the batcher's worker thread."""

    name = "torch"

    def __init__(self, model: torch.nn.Module, device: str = "auto", precision: str = "auto",
                 max_batch_size: int = 32, calibration: np.ndarray | None = None, compile: bool = True,
                 threads: int | None = None):
        # Set here rather than by the caller: a worker process that unpickles the engine runs this
        # again, and torch's thread count is per process.
        self.threads = threads
        if threads:
            torch.set_num_threads(threads)
        self.device = torch.device(resolve_device(device))
        self.precision = resolve_precision(precision, self.device, verifiable=calibration is not None)
        self.max_batch_size = max_batch_size
        self.compiled = compile
        # Compiled graphs (and CUDA graphs) are specialised to their batch size: batches are padded
        # up to the next bucket, and every bucket is compiled during load.
        self.buckets = batch_buckets(max_batch_size) if compile or self.precision == "int8" else []
        started = time.perf_counter()
        self._sources = {"model": model, "calibration": calibration}
        self._forward = self._build(copy.deepcopy(model).eval(), calibration, compile)
        self._lock = threading.Lock()  # one forward pass at a time, whatever thread calls
        # Compile (and record graphs) now, not on a request; the second pass pays the first-run costs
        # of the compiled graph itself (a ~0.5 s p99 spike on the first busy seconds without it).
        for size in (self.buckets or sorted({1, max_batch_size})) * 2:
            self.logits(np.zeros((size, 32, 32, 3), np.uint8))
        self.startup_seconds = round(time.perf_counter() - started, 3)

    def _build(self, model: torch.nn.Module, calibration: np.ndarray | None,
               compile: bool) -> Callable[[torch.Tensor], torch.Tensor]:
        model = model.to(self.device).to(memory_format=torch.channels_last)
        if self.precision == "int8":
            if calibration is None:
                raise WeightsError("int8 needs the calibration images shipped with the weights")
            model = quantize_pt2e_int8(model, calibration, self.max_batch_size)
            compile = True  # the quantized graph is only fast once inductor fuses it
        input_dtype = torch.float32
        autocast = nullcontext
        if self.device.type == "cuda" and self.precision in ("fp16", "bf16"):
            input_dtype = torch.float16 if self.precision == "fp16" else torch.bfloat16
            model = model.to(input_dtype)
        elif self.device.type == "cpu" and self.precision == "bf16":
            def autocast():
                return torch.autocast("cpu", dtype=torch.bfloat16)
        if compile:
            if shutil.which(os.environ.get("CXX", "g++")) is None:
                raise EngineError("--compile true needs a C++ compiler (inductor builds its kernels at load): install "
                                  "g++, or start with --compile false")
            # Freezing folds the weights into the graph as constants: conv+bn+relu fuse, and int8
            # weights are pre-packed once (4x faster int8 on this code path).
            torch._inductor.config.freezing = True
            # One graph per bucket: keep dynamo from falling back to eager past its default of 8.
            torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 2 * len(self.buckets))
            mode = "reduce-overhead" if self.device.type == "cuda" else None  # CUDA graphs
            model = torch.compile(model, mode=mode, dynamic=False)

        def forward(batch: torch.Tensor) -> torch.Tensor:
            with autocast():
                return model(normalize(batch).to(input_dtype))

        return forward

    @property
    def device_type(self) -> str:
        return self.device.type

    def available(self) -> bool:
        return True  # in this process: there whenever the process is

    def intra_op_threads(self) -> int:
        """Threads of one forward pass in this process (torch's count is per process)."""
        return torch.get_num_threads()

    @property
    def description(self) -> str:
        return f"{self.device.type} {self.precision} torch{' compiled' if self.compiled else ''}"

    @torch.inference_mode()
    def logits(self, images: np.ndarray) -> np.ndarray:
        """[N, 32, 32, 3] uint8 -> [N, 10] float32 logits (N may exceed max_batch_size: done in chunks)."""
        with self._lock:
            return np.concatenate([self._run(images[i:i + self.max_batch_size])
                                   for i in range(0, len(images), self.max_batch_size)])

    def _run(self, images: np.ndarray) -> np.ndarray:
        count = len(images)
        bucket = next((b for b in self.buckets if b >= count), count)
        batch = torch.from_numpy(images)
        if bucket > count:
            batch = torch.cat([batch, batch.new_zeros((bucket - count, *batch.shape[1:]))])
        if self.device.type == "cuda":
            batch = batch.pin_memory().to(self.device, non_blocking=True)
        try:
            return self._forward(batch)[:count].float().cpu().numpy()
        except torch.OutOfMemoryError:
            if count == 1:
                raise
            # A batch that does not fit in memory is retried as two halves instead of failing.
            log.warning("out of memory at batch %d; retrying as two halves", count)
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
            return np.concatenate([self._run(images[:count // 2]), self._run(images[count // 2:])])

    def __getstate__(self) -> dict:
        # KServe pickles the model into each worker process when --workers > 1: compiled graphs and
        # locks don't pickle, so the worker rebuilds (and recompiles) from the fp32 network.
        return {key: self._sources[key] for key in ("model", "calibration")} | {
            "device": str(self.device), "precision": self.precision, "max_batch_size": self.max_batch_size,
            "compile": self.compiled, "threads": self.threads}

    def __setstate__(self, state: dict) -> None:
        self.__init__(**state)
