"""What this machine offers an engine: a usable GPU (driver, torch), the CPU's instruction set, the cores
this process may use; the precisions each device type serves; the error for an engine that cannot run.
Imports no torch unless the NVIDIA driver shows a GPU."""

import importlib.util
import os
from pathlib import Path

CPU_PRECISIONS = ("fp32", "bf16", "int8")
CUDA_PRECISIONS = ("fp16", "bf16", "fp32")
# The CUDA 13 wheels' runtime needs at least this NVIDIA driver (major version).
MIN_CUDA_DRIVER = 580


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


def default_front_ends(cores: int | None = None) -> int:
    """`--workers` when not given: one front-end process (an event loop and its decode threads, about a
    core at full load) per 4 usable cores, the rest left to the one engine process's threads; 1 up to 7
    cores. Measured on 2 cores only (bench/engine_process.py: 2 front ends there gained nothing over one
    and cost 55 MB); the GPU round measures the rest."""
    return max(1, (cores or usable_cores()) // 4)


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


def cpu_has(feature: str) -> bool:
    """Whether /proc/cpuinfo lists a CPU flag (Linux; False elsewhere)."""
    try:
        with open("/proc/cpuinfo") as fh:
            return any(line.startswith("flags") and feature in line.split() for line in fh)
    except OSError:
        return False
