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
What the device offers (GPU, driver, CPU flags, cores) is predictor.engines.devices.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from predictor.engines.devices import EngineError, resolve_device, torch_installed, without_torch
from predictor.weights import WeightsError

if TYPE_CHECKING:
    from torch import nn

    from predictor.engines.reference import ReferenceNetwork

log = logging.getLogger("predictor")
# Share of the calibration images on which a reduced-precision CPU engine (int8, bf16) must pick the
# fp32 network's class.
MIN_AGREEMENT = 0.98
# CPU precisions whose numbers differ from fp32 enough to need that check before serving.
GATED_CPU_PRECISIONS = ("int8", "bf16")


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
