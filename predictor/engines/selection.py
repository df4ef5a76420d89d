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
`predictor.training.evaluate --precision`).
Compiled paths are compiled and warmed up at load, before the server reports ready.
This module imports no torch: the torch engine (predictor.engines.torch_engine) is imported only when it serves.
"""

from __future__ import annotations

import importlib.util
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from predictor.weights import WeightsError

if TYPE_CHECKING:
    from torch import nn

    from predictor.engines.reference import ReferenceNetwork

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


def nvidia_gpu_visible() -> bool:
    """Whether the NVIDIA driver exposes a device to this process (the device plugin mounts these)."""
    return Path("/dev/nvidiactl").exists() or Path("/proc/driver/nvidia/gpus").is_dir()


def torch_installed() -> bool:
    """Whether torch can be imported here (the CPU image has none), without importing it."""
    return importlib.util.find_spec("torch") is not None


def without_torch(what: str) -> EngineError:
    return EngineError(f"{what} needs torch, which this installation does not have (the CPU image serves ONNX Runtime "
                       "int8 only): use the CUDA image, or the defaults (--engine auto --precision auto --device auto)")


def cuda_available() -> bool:
    """torch sees a usable GPU; torch is imported only when the driver shows one, so that a CPU node's
    `auto` never loads it (and without torch, as in the CPU image, `auto` serves on the CPU)."""
    if not nvidia_gpu_visible() or not torch_installed():
        return False
    import torch

    return torch.cuda.is_available()


def resolve_device(requested: str) -> str:
    """'cpu' or 'cuda'. Asking for cuda where no usable GPU is present stops the process: serving on
    the CPU while holding (and being billed for) a GPU would hide the problem."""
    if requested == "auto":
        return "cuda" if cuda_available() else "cpu"
    if requested == "cuda":
        if not torch_installed():
            raise without_torch("--device cuda")
        if not cuda_available():
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


def build_engine(card: dict, model_dir: Path | None, *, reference: ReferenceNetwork,
                 torch_network: Callable[[], nn.Module], engine: str, device: str, precision: str,
                 max_batch_size: int, threads: int, compile: bool, calibration: np.ndarray | None):
    """The engine that serves: ONNX Runtime int8 or torch (`torch_network` is called only then), checked
    against the fp32 `reference` when its precision is a reduced CPU one (int8, bf16)."""
    device = resolve_device(device)
    chosen = choose_engine(engine, device, precision, model_dir is not None and "onnx_int8" in card)
    if chosen == "onnx":
        from predictor.engines.onnx_int8 import OnnxEngine, onnx_int8_path

        runner = OnnxEngine(onnx_int8_path(model_dir, card), max_batch_size, threads)
    else:
        if not torch_installed():
            raise without_torch(f"--engine {engine} --precision {precision}" if engine == "auto" else f"--engine {engine}")
        from predictor.engines.torch_engine import InferenceEngine

        network = torch_network()
        runner = InferenceEngine(network, device, precision, max_batch_size, calibration, compile, threads)
    if runner.device_type != "cpu" or runner.precision not in GATED_CPU_PRECISIONS:
        return runner
    if calibration is None:
        # Only reachable by asking for bf16 explicitly on weights without a calibration set.
        log.warning("%s asked for explicitly: not checked against fp32 (no calibration images ship with these "
                    "weights)", runner.precision)
        return runner
    try:
        check_agreement(runner, fp32_classes(card, reference, calibration), calibration)
    except WeightsError as exc:
        if precision != "auto" or runner.precision == "int8":
            raise
        log.warning("%s; serving fp32 instead", exc)
        runner = InferenceEngine(network, device, "fp32", max_batch_size, calibration, compile, threads)
    return runner


def fp32_classes(card: dict, reference: ReferenceNetwork, calibration: np.ndarray) -> np.ndarray:
    """The fp32 network's class for each calibration image: as quantization recorded them in the card
    (bound to the weights' and the images' sha256, so the gate costs one reduced-precision pass at
    start-up), else computed by `reference` (a user's export without the record)."""
    recorded = card.get("int8_calibration", {}).get("fp32_classes")
    if recorded is not None and len(recorded) == len(calibration):
        return np.asarray(recorded, np.int64)
    return reference.logits(calibration).argmax(1)


def check_agreement(runner, expected: np.ndarray, calibration: np.ndarray) -> float:
    """Share of the calibration images on which `runner` picks the fp32 network's class (`expected`);
    raises below the floor."""
    agreement = float((runner.logits(calibration).argmax(1) == expected).mean())
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
