"""The shipped weights: integrity, accuracy on held-out images, and refusal of bad weights at start-up."""

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

from predictor.cifar import CLASSES
from predictor.core.imaging import decode_image
from predictor.network import build_resnet18, normalize
from predictor.weights import CARD_FILE, PACKAGED_DIR, WEIGHTS_FILE, WeightsError, load_model, sha256_of

from .conftest import ROOT


@pytest.fixture
def model_dir(tmp_path):
    """A writable copy of the shipped model directory."""
    target = tmp_path / "model"
    target.mkdir()
    for name in (WEIGHTS_FILE, CARD_FILE):
        shutil.copy(PACKAGED_DIR / name, target / name)
    return target


def rewrite_card(directory, **changes):
    card = json.loads((directory / CARD_FILE).read_text())
    card.update(changes)
    (directory / CARD_FILE).write_text(json.dumps(card))


def test_shipped_weights_match_their_card():
    card = json.loads((PACKAGED_DIR / CARD_FILE).read_text())
    assert sha256_of(PACKAGED_DIR / WEIGHTS_FILE) == card["weights_sha256"]
    assert card["classes"] == list(CLASSES)
    assert (PACKAGED_DIR / WEIGHTS_FILE).stat().st_size < 50 * 1024 * 1024


def test_shipped_weights_classify_held_out_images(holdout):
    """Measured here, on 2,000 validation-split images no decision was made on (92.9 % when written).

    The floors are what the README's figures allow on this sample, not what the card says about itself:
    a network at the documented 93.1 % scores at least 92 % on 2,000 images (95 % binomial interval,
    ±1.1 points), and its weakest class (cat, 87.2 %) at least 80 % on 200 (3 standard deviations).
    """
    model, _ = load_model(PACKAGED_DIR)
    images = torch.from_numpy(np.stack([decode_image(data) for data, _ in holdout]))
    labels = np.array([label for _, label in holdout])
    with torch.inference_mode():
        predicted = torch.cat([model(normalize(chunk)).argmax(1) for chunk in images.split(250)]).numpy()
    assert (predicted == labels).mean() >= 0.92, (predicted == labels).mean()
    per_class = {name: (predicted[labels == i] == i).mean() for i, name in enumerate(CLASSES)}
    assert min(per_class.values()) >= 0.80, per_class


def test_tampered_weights_refused(model_dir):
    data = bytearray((model_dir / WEIGHTS_FILE).read_bytes())
    data[-100] ^= 0xFF
    (model_dir / WEIGHTS_FILE).write_bytes(bytes(data))
    with pytest.raises(WeightsError, match="sha256"):
        load_model(model_dir)


def test_missing_files_refused(model_dir):
    (model_dir / WEIGHTS_FILE).unlink()
    with pytest.raises(WeightsError, match="weights file is missing"):
        load_model(model_dir)
    (model_dir / CARD_FILE).unlink()
    with pytest.raises(WeightsError, match="model card is missing"):
        load_model(model_dir)


def test_corrupt_file_with_matching_card_refused(model_dir):
    (model_dir / WEIGHTS_FILE).write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not safetensors")
    rewrite_card(model_dir, weights_sha256=sha256_of(model_dir / WEIGHTS_FILE))
    with pytest.raises(WeightsError, match="not a readable safetensors"):
        load_model(model_dir)


def test_weights_of_another_network_refused(model_dir):
    from safetensors.torch import save_file

    other = build_resnet18()
    other.fc = torch.nn.Linear(512, 100)  # a CIFAR-100 head
    save_file({k: v.contiguous() for k, v in other.state_dict().items()}, str(model_dir / WEIGHTS_FILE))
    rewrite_card(model_dir, weights_sha256=sha256_of(model_dir / WEIGHTS_FILE))
    with pytest.raises(WeightsError, match="do not fit"):
        load_model(model_dir)


@pytest.mark.slow
def test_server_exits_with_one_clear_line_on_bad_weights(model_dir):
    data = bytearray((model_dir / WEIGHTS_FILE).read_bytes())
    data[-100] ^= 0xFF
    (model_dir / WEIGHTS_FILE).write_bytes(bytes(data))
    result = subprocess.run([sys.executable, "-m", "predictor", "--model_dir", str(model_dir), "--enable_grpc", "false"],
                            cwd=ROOT, capture_output=True, text=True, timeout=180)
    assert result.returncode != 0
    output = result.stdout + result.stderr
    assert "Traceback" not in output
    error_lines = [line for line in output.splitlines() if "cannot serve" in line]
    assert len(error_lines) == 1 and str(model_dir / WEIGHTS_FILE) in error_lines[0] and "sha256" in error_lines[0]
