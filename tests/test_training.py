"""A tiny real training run: the loop, checkpoint/resume, export, and evaluation in-process and over HTTP."""

import json
import re
import tarfile
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from predictor import evaluate, train
from predictor.network import CLASSES
from predictor.weights import load_model

from .conftest import SHARED_DATA, Server

PER_CLASS = 40  # 30 to train on, 10 held out


@pytest.fixture(scope="module")
def tiny_dataset(tmp_path_factory) -> Path:
    """400 real CIFAR-10 JPEGs (40 per class) from ../shared/data, in ImageFolder layout."""
    root = tmp_path_factory.mktemp("cifar-tiny")
    wanted = {f"train/{c}/{i:04d}.jpg" for c in CLASSES for i in range(PER_CLASS)}
    with tarfile.open(SHARED_DATA) as archive:
        members = [m for m in archive if m.name.removeprefix("./") in wanted]
        archive.extractall(root, members=members, filter="data")
    assert len(list(root.glob("train/*/*.jpg"))) == len(wanted)
    return root / "train"


def run_train(data: Path, work: Path, *extra: str) -> dict | None:
    return train.main(["--data", str(data), "--out", str(work / "out"), "--run-dir", str(work / "run"),
                       "--cache-dir", str(work / "cache"), "--epochs", "2", "--batch-size", "64",
                       "--holdout", "100", "--lr", "0.05", "--cutout", "8", *extra])


def test_train_resume_export_and_evaluate(tiny_dataset, tmp_path, capsys):
    card = run_train(tiny_dataset, tmp_path / "straight")
    assert card["epochs"] == 2 and len(card["history"]) == 2
    assert card["data"]["validation_images"] == 100 and card["temperature"] > 0
    assert set(card["per_class_accuracy"]) == set(CLASSES)
    assert (tmp_path / "straight/out/training_curve.png").stat().st_size > 1000
    assert (tmp_path / "straight/out/reliability.png").stat().st_size > 1000
    assert len((tmp_path / "straight/run/epochs.jsonl").read_text().splitlines()) == 2

    # Stop after one epoch, then resume: the result is the same network as the uninterrupted run.
    assert run_train(tiny_dataset, tmp_path / "resumed", "--stop-after", "1") is None
    with pytest.raises(SystemExit, match="--lr 0.05 -> 0.1"):  # another recipe would not resume the same run
        run_train(tiny_dataset, tmp_path / "resumed", "--resume", "--lr", "0.1")
    resumed = run_train(tiny_dataset, tmp_path / "resumed", "--resume")
    assert resumed["history"][0] == {**card["history"][0], "seconds": resumed["history"][0]["seconds"],
                                     "images_per_second": resumed["history"][0]["images_per_second"]}
    straight = load_file(str(tmp_path / "straight/out/resnet18_cifar10.safetensors"))
    again = load_file(str(tmp_path / "resumed/out/resnet18_cifar10.safetensors"))
    for name, tensor in straight.items():
        assert torch.allclose(tensor.float(), again[name].float(), atol=1e-3), name

    # The exported directory is servable as it is: sha256 verified on load.
    model, loaded_card = load_model(tmp_path / "straight/out")
    assert loaded_card["weights_sha256"] == card["weights_sha256"]

    # Evaluation through the serving pipeline reproduces the accuracy measured at export.
    capsys.readouterr()
    evaluate.main(["--data", str(tiny_dataset), "--model_dir", str(tmp_path / "straight/out"), "--out", str(tmp_path / "eval"),
                   "--no-compile"])
    printed = capsys.readouterr().out
    accuracy = float(re.search(r"accuracy (\S+)", printed).group(1))
    assert abs(accuracy - card["validation_accuracy"]) <= 0.011, printed
    report = json.loads((tmp_path / "eval/evaluation.json").read_text())
    assert report["images"] == 100 and set(report["per_class_accuracy"]) == set(CLASSES)
    assert (tmp_path / "eval/confusion_matrix.png").stat().st_size > 1000

    # ... and so does evaluating a live server over HTTP.
    # (no int8 graph or calibration set in this directory: the torch engine serves it, eager like the evaluation above)
    server = Server("--model_dir", str(tmp_path / "straight/out"), "--compile", "false")
    try:
        evaluate.main(["--data", str(tiny_dataset), "--model_dir", str(tmp_path / "straight/out"),
                       "--url", server.url, "--out", str(tmp_path / "eval-http")])
    finally:
        server.stop()
    over_http = json.loads((tmp_path / "eval-http/evaluation.json").read_text())
    assert over_http["accuracy"] == report["accuracy"]
    assert over_http["per_class_accuracy"] == report["per_class_accuracy"]


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
