"""Shipped weights and what ships beside them (model card, int8 calibration images, the ONNX graph's
input name): saving, and loading with integrity checks. Serving reads them; building them is
`predictor.training.train` and `predictor.training.quantize`. Reading the weights as arrays needs no torch (the default
engine serves without it); torch is imported only to make a torch network of them."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from safetensors import SafetensorError
from safetensors.numpy import load_file

if TYPE_CHECKING:
    import torch

WEIGHTS_FILE = "resnet18_cifar10.safetensors"
CARD_FILE = "model_card.json"
CALIBRATION_FILE = "calibration.npy"
ONNX_INPUT = "images"  # the int8 ONNX graph's input: [N, 32, 32, 3] uint8, N dynamic
PACKAGED_DIR = Path(__file__).parent / "weights"


class WeightsError(Exception):
    """Weights that must not be served: missing, corrupt, tampered with or for another network."""


def sha256_of(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def save_weights(model: torch.nn.Module, directory: Path) -> Path:
    """Write the state dict as fp16 safetensors (half the size; accuracy is checked on this file)."""
    from safetensors.torch import save_file

    directory.mkdir(parents=True, exist_ok=True)
    path = directory / WEIGHTS_FILE
    state = {k: (v.half() if v.is_floating_point() else v).contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(path))
    return path


def read_card(directory: Path) -> dict:
    path = Path(directory) / CARD_FILE
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise WeightsError(f"{path}: model card is missing") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise WeightsError(f"{path}: model card is not valid JSON ({exc})") from None


def load_model(directory: Path) -> tuple[torch.nn.Module, dict]:
    """(fp32 torch network in eval mode, model card) from a model directory, verifying the card's sha256."""
    path, card = verified_weights(directory)
    return network_from_file(path), card


def verified_weights(directory: Path) -> tuple[Path, dict]:
    """(weights file, model card) from a model directory, the file verified against the card's sha256."""
    directory = Path(directory)
    card = read_card(directory)
    path = directory / card.get("weights_file", WEIGHTS_FILE)
    if not path.is_file():
        raise WeightsError(f"{path}: weights file is missing")
    expected = card.get("weights_sha256")
    actual = sha256_of(path)
    if expected != actual:
        raise WeightsError(f"{path}: sha256 {actual} does not match the model card's {expected}")
    return path, card


def read_state(path: Path) -> dict[str, np.ndarray]:
    """The state dict in a safetensors file (stored fp16 or fp32) as arrays, floating ones in fp32."""
    try:
        state = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise WeightsError(f"{path}: not a readable safetensors file ({exc})") from None
    return {k: v.astype(np.float32) if np.issubdtype(v.dtype, np.floating) else v for k, v in state.items()}


def network_from_file(path: Path) -> torch.nn.Module:
    """fp32 torch network in eval mode from a safetensors file."""
    return network_from_state(read_state(path), str(path))


def network_from_state(state: dict[str, np.ndarray], source: str = "weights") -> torch.nn.Module:
    """fp32 torch network in eval mode from a state dict of arrays."""
    import torch

    from predictor.network import build_resnet18

    model = build_resnet18()
    try:
        model.load_state_dict({k: torch.from_numpy(v) for k, v in state.items()})
    except RuntimeError as exc:
        first = " ".join(str(exc).strip().splitlines()[:2])
        raise WeightsError(f"{source}: weights do not fit the ResNet18 CIFAR-10 network ({first})") from None
    return model.eval()


def calibration_images(directory: Path, card: dict) -> np.ndarray:
    """The calibration set shipped with the weights, verified against the card's sha256."""
    path = Path(directory) / CALIBRATION_FILE
    expected = card.get("int8_calibration", {}).get("sha256")
    if not path.is_file() or expected is None:
        raise WeightsError(f"{path}: no calibration images for int8 (run `python -m predictor.training.quantize --data DIR`)")
    if sha256_of(path) != expected:
        raise WeightsError(f"{path}: sha256 does not match the model card's")
    images = np.load(path, allow_pickle=False)
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[1:] != (32, 32, 3):
        raise WeightsError(f"{path}: expected [N, 32, 32, 3] uint8 images, got {images.dtype} {images.shape}")
    return images
