"""Short real training runs on images shipped in the repository: the network learns, the export is
servable, checkpoint/resume reproduces the uninterrupted run, and evaluation agrees in-process and over HTTP."""

import json
import re
import tarfile
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from predictor.cifar import CLASSES
from predictor.network import normalize
from predictor.training import evaluate, train
from predictor.training.data import load_image_folder, stratified_split
from predictor.weights import load_model

from .conftest import Server

# 300 training-split CIFAR-10 JPEGs, 30 per class (tests/data/README.md): never validation-split images.
TRAIN_SAMPLE = Path(__file__).resolve().parent / "data" / "train-sample.tar.gz"
HOLDOUT = 50  # the tiny runs' own validation images; the other 250 are trained on
CHANCE = 1 / len(CLASSES)


@pytest.fixture(scope="module")
def sample(tmp_path_factory) -> Path:
    """The shipped training sample, unpacked in ImageFolder layout."""
    root = tmp_path_factory.mktemp("train-sample")
    with tarfile.open(TRAIN_SAMPLE) as archive:
        archive.extractall(root, filter="data")
    assert len(list(root.glob("*/*.jpg"))) == 300
    return root


def run_train(data: Path, work: Path, *extra: str) -> dict | None:
    """`python -m predictor.training.train` in-process. No Cutout and a gentle peak LR: with only 10 steps an
    epoch, this is what lets three epochs fit the training images clearly better than chance."""
    return train.main(["--data", str(data), "--out", str(work / "out"), "--run-dir", str(work / "run"),
                       "--cache-dir", str(work / "cache"), "--batch-size", "25", "--holdout", str(HOLDOUT),
                       "--lr", "0.02", "--cutout", "0", *extra])


def accuracy_on_own_training_images(data: Path, model_dir: Path) -> float:
    """The exported network's top-1 accuracy on the images it was trained on, measured here from the file."""
    dataset = load_image_folder(data)
    train_idx, _ = stratified_split(dataset.labels, HOLDOUT, seed=0)
    model, _ = load_model(model_dir)
    with torch.inference_mode():
        predicted = model(normalize(torch.from_numpy(dataset.images[train_idx]))).argmax(1).numpy()
    return float((predicted == dataset.labels[train_idx]).mean())


def test_train_learns_exports_and_evaluates(sample, tmp_path, capsys):
    card = run_train(sample, tmp_path, "--epochs", "3")
    assert card["epochs"] == 3 and len(card["history"]) == 3
    assert card["data"]["validation_images"] == HOLDOUT and card["temperature"] > 0
    assert set(card["per_class_accuracy"]) == set(CLASSES)
    assert (tmp_path / "out/training_curve.png").stat().st_size > 1000
    assert (tmp_path / "out/reliability.png").stat().st_size > 1000
    assert len((tmp_path / "run/epochs.jsonl").read_text().splitlines()) == 3

    # It learned: the exported file (loaded with its sha256 checked) fits its 250 training images well
    # above chance (0.42 measured; an untrained network stays near 0.10).
    assert accuracy_on_own_training_images(sample, tmp_path / "out") >= 2 * CHANCE

    # Evaluation through the serving pipeline reproduces the accuracy measured at export.
    capsys.readouterr()
    evaluate.main(["--data", str(sample), "--model_dir", str(tmp_path / "out"), "--out", str(tmp_path / "eval"),
                   "--no-compile"])
    printed = capsys.readouterr().out
    accuracy = float(re.search(r"accuracy (\S+)", printed).group(1))
    assert abs(accuracy - card["validation_accuracy"]) <= 1 / HOLDOUT, printed
    report = json.loads((tmp_path / "eval/evaluation.json").read_text())
    assert report["images"] == HOLDOUT and set(report["per_class_accuracy"]) == set(CLASSES)
    assert (tmp_path / "eval/confusion_matrix.png").stat().st_size > 1000

    # ... and so does evaluating a live server over HTTP.
    # Like with like: fp32 eager on both sides, whatever precision `auto` would pick on this CPU.
    server = Server("--model_dir", str(tmp_path / "out"), "--compile", "false", "--precision", "fp32")
    try:
        evaluate.main(["--data", str(sample), "--model_dir", str(tmp_path / "out"),
                       "--url", server.url, "--out", str(tmp_path / "eval-http")])
    finally:
        server.stop()
    over_http = json.loads((tmp_path / "eval-http/evaluation.json").read_text())
    assert over_http["accuracy"] == report["accuracy"]
    assert over_http["per_class_accuracy"] == report["per_class_accuracy"]


def test_too_short_a_schedule_is_refused_with_a_clear_message(sample, tmp_path):
    """2 epochs of 2 batches: the one-cycle schedule has no warm-up step (torch would divide by zero)."""
    with pytest.raises(SystemExit, match="optimizer steps the one-cycle schedule needs"):
        run_train(sample, tmp_path, "--epochs", "2", "--limit", "50")


def test_resumed_run_is_the_uninterrupted_run(sample, tmp_path):
    """Stop after one epoch, then resume: the same network as the run that was never stopped (50 images,
    batches of 10: the one-cycle schedule needs more than a handful of steps)."""
    recipe = ("--epochs", "2", "--limit", "50", "--batch-size", "10")
    card = run_train(sample, tmp_path / "straight", *recipe)
    assert run_train(sample, tmp_path / "resumed", *recipe, "--stop-after", "1") is None
    with pytest.raises(SystemExit, match="--lr 0.02 -> 0.1"):  # another recipe would not resume the same run
        run_train(sample, tmp_path / "resumed", *recipe, "--resume", "--lr", "0.1")
    resumed = run_train(sample, tmp_path / "resumed", *recipe, "--resume")
    assert resumed["history"][0] == {**card["history"][0], "seconds": resumed["history"][0]["seconds"],
                                     "images_per_second": resumed["history"][0]["images_per_second"]}
    straight = load_file(str(tmp_path / "straight/out/resnet18_cifar10.safetensors"))
    again = load_file(str(tmp_path / "resumed/out/resnet18_cifar10.safetensors"))
    for name, tensor in straight.items():
        assert torch.allclose(tensor.float(), again[name].float(), atol=1e-3), name


def test_cutout_zeroes_one_square_per_image_and_nothing_else():
    images = torch.ones(500, 3, 32, 32)
    out = train.cutout(images, 12, torch.Generator().manual_seed(1))
    for image in out:
        rows, cols = (image[0] == 0).nonzero(as_tuple=True)
        assert (image == 0).all(0).equal(image[0] == 0)  # the same square in every channel
        assert rows.max() - rows.min() < 12 and cols.max() - cols.min() < 12
        assert len(rows) == (rows.max() - rows.min() + 1) * (cols.max() - cols.min() + 1)  # a full rectangle
    inside = (out == 0).all(1).flatten(1).sum(1)
    assert inside.max() == 144 and inside.min() >= 36  # whole square when inside, clipped at the border
    assert train.cutout(images, 0, torch.Generator()).equal(images)
