"""The forward pass: uint8 images in, fp32 logits out, on the engine and precision chosen for this device.

Engines (`--engine`): `onnx` (ONNX Runtime, the shipped int8 graph; CPU only, see onnx_engine) and
`torch` (CUDA, and every CPU precision). `auto` takes onnx on the CPU when the precision asked is
auto or int8 and the graph ships, else torch.
Torch precisions (`--precision`): CPU fp32 | bf16 | int8, CUDA fp16 | bf16 | fp32. `auto` takes the
fastest this device runs well: on CUDA fp16; on CPU int8 where the CPU has VNNI/AMX int8 instructions,
else bf16 where it has native bf16, else fp32 -- the reduced CPU precisions only when the calibration
images ship, because they are gated at load like the int8 graph: the engine must pick the fp32
network's class on at least 98 % of them, or `auto` serves fp32 (an explicit precision is refused).
So `auto` never changes the numbers a CPU serves without checking them first, whatever its
instruction set. Every shipped precision keeps validation accuracy within 0.3 points of fp32 (README,
`predictor.evaluate --precision`).
Compiled paths are compiled and warmed up at load, before the server reports ready.
"""

import copy
import logging
import os
import shutil
import threading
import time
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch

from .network import normalize
from .weights import WeightsError

log = logging.getLogger("predictor")
CPU_PRECISIONS = ("fp32", "bf16", "int8")
CUDA_PRECISIONS = ("fp16", "bf16", "fp32")
# The CUDA 13 wheels' runtime needs at least this NVIDIA driver (major version).
MIN_CUDA_DRIVER = 580
# Share of the calibration images on which a reduced-precision CPU engine (int8, bf16) must pick the
# fp32 network's class.
MIN_AGREEMENT = 0.98
# CPU precisions whose numbers differ from fp32 enough to need that check before serving.
GATED_CPU_PRECISIONS = ("int8", "bf16")


class EngineError(Exception):
    """The engine asked for cannot run here (no GPU, driver too old, no compiler, no int8 graph)."""


def usable_cores() -> int:
    """CPUs this process may use: its affinity mask, capped by a cgroup CPU quota (a pod's limit)."""
    cores = len(os.sched_getaffinity(0))
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
        if quota != "max":
            cores = min(cores, max(1, int(int(quota) / int(period))))
    except (OSError, ValueError):
        pass
    return cores


def choose_engine(requested: str, device: str, precision: str, onnx_int8_ships: bool) -> str:
    """'onnx' or 'torch' for what was asked; raises EngineError for a combination that cannot run."""
    if requested == "auto":
        return "onnx" if device == "cpu" and precision in ("auto", "int8") and onnx_int8_ships else "torch"
    if requested == "onnx":
        if device != "cpu":
            raise EngineError("--engine onnx runs on the CPU only (use --device cpu, or --engine torch on CUDA)")
        if precision not in ("auto", "int8"):
            raise EngineError(f"--engine onnx serves int8 only (asked for {precision}; use --engine torch)")
        if not onnx_int8_ships:
            raise EngineError("--engine onnx: the model directory has no int8 ONNX graph")
    return requested


def resolve_device(requested: str) -> str:
    """'cpu' or 'cuda'. Asking for cuda where no usable GPU is present stops the process: serving on
    the CPU while holding (and being billed for) a GPU would hide the problem."""
    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if requested == "cuda":
        if not torch.cuda.is_available():
            driver = _nvidia_driver_version()
            if driver is not None and driver < MIN_CUDA_DRIVER:
                raise EngineError(f"--device cuda: NVIDIA driver {driver} is too old for this image's CUDA 13 runtime "
                                  f"(needs >= {MIN_CUDA_DRIVER})")
            raise EngineError("--device cuda: no usable GPU is visible to this process "
                              "(is the NVIDIA device plugin giving the pod a GPU?)")
    return requested


def _nvidia_driver_version() -> int | None:
    try:
        return int(Path("/proc/driver/nvidia/version").read_text().split("Kernel Module")[1].split()[0].split(".")[0])
    except (OSError, IndexError, ValueError):
        return None


def build_engine(network: torch.nn.Module, card: dict, model_dir: Path | None, *, engine: str, device: str,
                 precision: str, max_batch_size: int, threads: int, compile: bool,
                 calibration: np.ndarray | None):
    """The engine that serves: ONNX Runtime int8 or torch, checked against the fp32 network when its
    precision is a reduced CPU one (int8, bf16)."""
    from .onnx_engine import OnnxEngine, onnx_int8_path

    device = resolve_device(device)
    chosen = choose_engine(engine, device, precision, model_dir is not None and "onnx_int8" in card)
    if chosen == "onnx":
        runner = OnnxEngine(onnx_int8_path(model_dir, card), max_batch_size, threads)
    else:
        runner = InferenceEngine(network, device, precision, max_batch_size, calibration, compile, threads)
    if runner.device_type != "cpu" or runner.precision not in GATED_CPU_PRECISIONS:
        return runner
    if calibration is None:
        # Only reachable by asking for bf16 explicitly on weights without a calibration set.
        log.warning("%s asked for explicitly: not checked against fp32 (no calibration images ship with these "
                    "weights)", runner.precision)
        return runner
    try:
        check_agreement(runner, network, calibration)
    except WeightsError as exc:
        if precision != "auto" or runner.precision == "int8":
            raise
        log.warning("%s; serving fp32 instead", exc)
        runner = InferenceEngine(network, device, "fp32", max_batch_size, calibration, compile, threads)
    return runner


def check_agreement(runner, network: torch.nn.Module, calibration: np.ndarray | None) -> float:
    """Share of the calibration images on which `runner` picks the fp32 network's class; raises below the floor."""
    if calibration is None:
        raise WeightsError(f"{runner.precision} needs the calibration images shipped with the weights")
    with torch.inference_mode():
        reference = network.eval()(normalize(torch.from_numpy(calibration))).argmax(1).numpy()
    agreement = float((runner.logits(calibration).argmax(1) == reference).mean())
    if agreement < MIN_AGREEMENT:
        raise WeightsError(f"the {runner.precision} engine agrees with the fp32 network on only {agreement:.1%} of "
                           f"the calibration images (floor {MIN_AGREEMENT:.0%}): refusing to serve it")
    log.info("%s engine agrees with the fp32 network on %.1f%% of %d calibration images", runner.precision,
             100 * agreement, len(calibration))
    return agreement


def cpu_has(feature: str) -> bool:
    """Whether /proc/cpuinfo lists a CPU flag (Linux; False elsewhere)."""
    try:
        with open("/proc/cpuinfo") as fh:
            return any(line.startswith("flags") and feature in line.split() for line in fh)
    except OSError:
        return False


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
        self.startup_seconds = round(time.perf_counter() - started, 1)

    def _build(self, model: torch.nn.Module, calibration: np.ndarray | None,
               compile: bool) -> Callable[[torch.Tensor], torch.Tensor]:
        model = model.to(self.device).to(memory_format=torch.channels_last)
        if self.precision == "int8":
            if calibration is None:
                raise WeightsError("int8 needs the calibration images shipped with the weights")
            from .quantize import quantize_int8

            model = quantize_int8(model, calibration, self.max_batch_size)
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
