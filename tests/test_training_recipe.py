"""The ta-ema-200 recipe's parts: TrivialAugment on whole batches (each operation held to torchvision's),
the EMA of the weights, and the device run end to end on the shipped training sample: the device script
(predictor/training/device_run.sh, as the device call runs it but on the CPU, uncompiled), its small
result, the export made from that result here, and a resume that refuses another recipe and otherwise
reproduces the run that was never stopped."""

import json
import math
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import torch
import torchvision.transforms.functional as TF
from safetensors.torch import load_file
from torchvision.transforms import InterpolationMode

from predictor.training import augment, quantize, train
from predictor.training.data import load_image_folder
from predictor.training.ema import WeightEMA
from predictor.training.result import PART_BYTES, RESULT_FILE, read_result
from predictor.weights import load_model

ROOT = Path(__file__).resolve().parent.parent
# 300 training-split CIFAR-10 JPEGs, 30 per class (tests/data/README.md): never validation-split images.
TRAIN_SAMPLE = Path(__file__).resolve().parent / "data" / "train-sample.tar.gz"
HOLDOUT = 50
# Tiny runs: 50 images in batches of 10 (the one-cycle schedule needs 8 steps), a gentle peak LR, the
# recipe's augmentation and EMA otherwise.
TINY = ("--recipe", "ta-ema-200", "--epochs", "2", "--limit", "50", "--batch-size", "10", "--lr", "0.02",
        "--holdout", str(HOLDOUT), "--device", "cpu")


@pytest.fixture(scope="module")
def sample(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("train-sample")
    with tarfile.open(TRAIN_SAMPLE) as archive:
        archive.extractall(root, filter="data")
    return root


@pytest.fixture(scope="module")
def images(sample) -> torch.Tensor:
    """48 real CIFAR-10 images, uint8 NHWC, decoded as serving decodes them."""
    return torch.from_numpy(load_image_folder(sample).images[::6][:48].copy())


# -- TrivialAugment ------------------------------------------------------------------------------------

def torchvision_op(image: torch.Tensor, name: str, m: float) -> torch.Tensor:
    """torchvision's own TrivialAugmentWide._apply_op for one CHW uint8 image (fill: the mean pixel)."""
    fill = [float(v) for v in augment.FILL]
    nearest = InterpolationMode.NEAREST
    geometric = {
        "shear_x": lambda: TF.affine(image, angle=0.0, translate=[0, 0], scale=1.0, shear=[math.degrees(math.atan(m)), 0.0],
                                     interpolation=nearest, fill=fill, center=[0, 0]),
        "shear_y": lambda: TF.affine(image, angle=0.0, translate=[0, 0], scale=1.0, shear=[0.0, math.degrees(math.atan(m))],
                                     interpolation=nearest, fill=fill, center=[0, 0]),
        "translate_x": lambda: TF.affine(image, angle=0.0, translate=[int(m), 0], scale=1.0, shear=[0.0, 0.0],
                                         interpolation=nearest, fill=fill),
        "translate_y": lambda: TF.affine(image, angle=0.0, translate=[0, int(m)], scale=1.0, shear=[0.0, 0.0],
                                         interpolation=nearest, fill=fill),
        "rotate": lambda: TF.rotate(image, m, interpolation=nearest, fill=fill),
    }
    photometric = {
        "identity": lambda: image,
        "brightness": lambda: TF.adjust_brightness(image, 1.0 + m),
        "color": lambda: TF.adjust_saturation(image, 1.0 + m),
        "contrast": lambda: TF.adjust_contrast(image, 1.0 + m),
        "sharpness": lambda: TF.adjust_sharpness(image, 1.0 + m),
        "posterize": lambda: TF.posterize(image, int(m)),
        "solarize": lambda: TF.solarize(image, m),
        "autocontrast": lambda: TF.autocontrast(image),
        "equalize": lambda: TF.equalize(image),
    }
    return {**geometric, **photometric}[name]()


@pytest.mark.parametrize("name", augment.OPS)
def test_each_operation_is_torchvisions_on_every_image_of_the_batch(images, name):
    """Every magnitude bin (both signs where signed) of each operation, applied to a whole batch at once,
    gives what torchvision's TrivialAugmentWide gives image by image."""
    k = augment.OPS.index(name)
    table = augment.magnitudes()
    assert table.shape == (len(augment.OPS), augment.NUM_MAGNITUDE_BINS)
    differing = total = worst = 0
    for level in range(augment.NUM_MAGNITUDE_BINS):
        for sign in (1.0, -1.0) if name in augment.SIGNED else (1.0,):
            m = float(table[k, level]) * sign
            ours = augment.apply_ops(images, torch.full((len(images),), k), torch.full((len(images),), m))
            assert ours.dtype == torch.uint8 and ours.shape == images.shape
            theirs = torch.stack([torchvision_op(image, name, m) for image in images.permute(0, 3, 1, 2)])
            diff = (ours.permute(0, 3, 1, 2).int() - theirs.int()).abs()
            differing, total, worst = differing + int((diff > 0).sum()), total + diff.numel(), max(worst, int(diff.max()))
    if name == "rotate":  # nearest-neighbour ties land on either pixel (measured: 6 in 100,000 values)
        assert differing / total < 1e-3
    elif name in ("color", "sharpness"):  # float rounding before torchvision's truncating cast (measured <= 1.8 %)
        assert worst <= 1 and differing / total < 0.03
    else:
        assert differing == 0, f"{name}: {differing} of {total} values differ (max {worst})"


def test_trivial_augment_draws_one_operation_and_magnitude_per_image(monkeypatch):
    """Uniform over the 14 operations and 31 bins, signs random where signed; the same seed, the same batch."""
    seen = {}

    def capture(batch, op, magnitude):
        seen.update(op=op, magnitude=magnitude)
        return batch

    monkeypatch.setattr(augment, "apply_ops", capture)
    n = 14_000
    augment.trivial_augment(torch.zeros(n, 1, 1, 3, dtype=torch.uint8), torch.Generator().manual_seed(0))
    op, magnitude = seen["op"], seen["magnitude"]
    counts = torch.bincount(op, minlength=len(augment.OPS))
    assert counts.min() > 0.8 * n / 14 and counts.max() < 1.2 * n / 14
    table = augment.magnitudes()
    for k, name in enumerate(augment.OPS):
        mine = magnitude[op == k]
        allowed = table[k] if name not in augment.SIGNED else torch.cat([table[k], -table[k]])
        assert set(mine.unique().tolist()) == set(allowed.unique().tolist()), name  # every bin, both signs, drawn
    monkeypatch.undo()
    batch = torch.randint(0, 256, (64, 32, 32, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    first = augment.trivial_augment(batch, torch.Generator().manual_seed(7))
    assert first.equal(augment.trivial_augment(batch, torch.Generator().manual_seed(7)))
    assert not first.equal(augment.trivial_augment(batch, torch.Generator().manual_seed(8)))


# -- EMA -------------------------------------------------------------------------------------------------

def test_ema_averages_weights_and_batch_norm_statistics():
    live = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3))
    ema = WeightEMA(live, decay=0.9)
    start = {k: v.clone() for k, v in ema.module.state_dict().items()}
    with torch.no_grad():
        for t in live.state_dict().values():
            if t.is_floating_point():
                t.add_(1.0)
    live.train()(torch.randn(8, 4))  # running statistics and the step counter move too
    ema.update()
    assert ema.decay_at(1) == pytest.approx(2 / 11) and ema.decay_at(10_000) == 0.9  # warm-up, then the decay
    weight = 1 - 2 / 11
    for name, value in ema.module.state_dict().items():
        expected = live.state_dict()[name]
        if value.is_floating_point():
            assert torch.allclose(value, start[name] + weight * (expected - start[name]), atol=1e-6), name
        else:
            assert value.equal(expected), name  # num_batches_tracked is copied
    assert not any(p.requires_grad for p in ema.module.parameters())
    restored = WeightEMA(live, decay=0.9)
    restored.load_state_dict(ema.state_dict())
    assert restored.updates == 1 and all(a.equal(b) for a, b in zip(restored.module.state_dict().values(),
                                                                     ema.module.state_dict().values()))


# -- the device run, on the CPU ----------------------------------------------------------------------------

def run_device_script(tmp: Path, *args: str) -> subprocess.CompletedProcess:
    """predictor/training/device_run.sh as the device call runs it, with the sample as its archive."""
    env = {**os.environ, "PY": sys.executable, "OUT": str(tmp / "out"), "RUN_DIR": str(tmp / "run"),
           "WORK": str(tmp / "work"), "ARCHIVE": str(TRAIN_SAMPLE)}
    return subprocess.run(["bash", str(ROOT / "predictor/training/device_run.sh"), *args], env=env, cwd=tmp,
                          capture_output=True, text=True, timeout=900, check=False)


@pytest.mark.slow
def test_device_script_result_exports_here_as_the_ema_network(sample, tmp_path):
    """The device script trains (2 epochs, the recipe's TrivialAugment, Cutout 16 and EMA; 100 images, uncompiled on
    the CPU), hands back a result a device call can return (<= 8 files of <= 16 MiB), and that result exports here:
    the EMA network's fp16 weights, a model card with the data fingerprint, recipe, history and commands, then the
    int8 calibration set and graph."""
    done = run_device_script(tmp_path, "--device", "cpu", "--no-compile", "--holdout", str(HOLDOUT), "--limit", "100",
                             "--batch-size", "25", "--lr", "0.02", "--epochs", "2")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "device_run: epoch 2 of 2, finished True" in done.stdout
    out = tmp_path / "out"
    files = sorted(p.name for p in out.iterdir())
    assert files == ["result.json", "run.log", "weights-0.safetensors", "weights-1.safetensors"]
    assert all((out / f).stat().st_size <= PART_BYTES for f in files)
    meta = json.loads((out / RESULT_FILE).read_text())
    assert meta["finished"] and meta["epoch"] == 2 and len(meta["history"]) == 2
    assert meta["args"]["recipe"] == "ta-ema-200" and meta["args"]["augment"] == "trivialaugment"
    assert meta["args"]["cutout"] == 16 and meta["args"]["ema"] == 0.999 and meta["args"]["compile"] is False
    assert {"ema_val_accuracy", "ema_val_loss", "lr"} <= set(meta["history"][-1])
    assert meta["commands"][0].startswith("python -m predictor.training.train --recipe ta-ema-200 ")
    assert meta["machine"]["launcher"].startswith("bash predictor/training/device_run.sh --device cpu")

    export = tmp_path / "export"
    card = train.main(["--data", str(sample), "--cache-dir", str(tmp_path / "cache"), "--from-result", str(out),
                       "--out", str(export)])
    data = load_image_folder(sample)
    assert card["data"]["fingerprint_sha256"] == data.fingerprint == meta["data"]["fingerprint_sha256"]
    assert card["data"]["validation_images"] == HOLDOUT and card["history"] == meta["history"]
    assert card["recipe"]["name"] == "ta-ema-200" and "TrivialAugment" in card["recipe"]["augmentation"]
    assert card["recipe"]["exported_weights"].startswith("EMA")
    assert card["command"] == meta["commands"][0]
    assert card["training_run"]["decoded_pixels_match_export"] is True
    assert card["training_run"]["export_command"].startswith("python -m predictor.training.train --data ")
    # What was exported is the EMA network (as the checkpoint holds it, rounded to fp16), not the last weights.
    model, _ = load_model(export)
    checkpoint = torch.load(tmp_path / "run/last.pt", weights_only=False)
    exported = model.state_dict()
    for name, value in checkpoint["ema"]["module"].items():
        if value.is_floating_point():
            assert torch.equal(exported[name], value.half().float()), name
    assert any(not torch.allclose(exported[k], v.float(), atol=1e-3) for k, v in checkpoint["model"].items()
               if v.is_floating_point())
    # The int8 path follows from the export as from any other.
    quantize.main(["--data", str(sample), "--out", str(export), "--images", "32", "--cache-dir", str(tmp_path / "cache")])
    card = json.loads((export / "model_card.json").read_text())
    assert card["int8_calibration"]["images"] == 32 and (export / card["onnx_int8"]["file"]).is_file()

    # A result of other data, or a part that is not the one result.json names, is refused.
    other = tmp_path / "other-data"
    other.mkdir()
    with tarfile.open(TRAIN_SAMPLE) as archive:
        archive.extractall(other, filter="data")
    next(other.glob("cat/*.jpg")).unlink()
    with pytest.raises(SystemExit, match="trained on other data"):
        train.main(["--data", str(other), "--from-result", str(out), "--out", str(tmp_path / "x")])
    part = out / "weights-1.safetensors"
    part.write_bytes(part.read_bytes()[:-8] + bytes(8))
    with pytest.raises(SystemExit, match="cut off while being written"):
        read_result(out)


def tiny_run(data: Path, work: Path, *extra: str) -> dict | None:
    return train.main(["--data", str(data), "--out", str(work / "export"), "--run-dir", str(work / "run"),
                       "--cache-dir", str(work / "cache"), "--result-dir", str(work / "result"), *TINY, *extra])


@pytest.mark.slow
def test_stopped_run_refuses_another_recipe_and_resumes_to_the_uninterrupted_run(sample, tmp_path, monkeypatch):
    """A run stopped by --time-limit after epoch 1 hands back an unfinished result (not exportable); resuming it with
    another augmentation, EMA or recipe is refused; resumed as it was, it ends as the run never stopped (TrivialAugment's
    draws and the EMA are in the checkpoint)."""
    calls = []
    real = train.trivial_augment
    monkeypatch.setattr(train, "trivial_augment", lambda *a: calls.append(1) or real(*a))
    straight = tiny_run(sample, tmp_path / "straight")
    assert len(calls) == 2 * 5  # the recipe's TrivialAugment ran on every batch: 2 epochs x 5 steps
    assert straight["recipe"]["exported_weights"].startswith("EMA")

    work = tmp_path / "resumed"
    assert tiny_run(sample, work, "--time-limit", "0.001") is None  # the next epoch cannot end in time: stop after 1
    stopped = json.loads((work / "result" / RESULT_FILE).read_text())
    assert stopped["finished"] is False and stopped["epoch"] == 1
    with pytest.raises(SystemExit, match="stopped after epoch 1 of 2"):
        train.main(["--data", str(sample), "--from-result", str(work / "result"), "--out", str(work / "x")])
    for flags, change in ((("--augment", "crop-flip"), "--augment 'trivialaugment' -> 'crop-flip'"),
                          (("--ema", "0.99"), "--ema 0.999 -> 0.99"),
                          (("--cutout", "12"), "--cutout 16 -> 12"),
                          (("--recipe", "baseline"), "--recipe 'ta-ema-200' -> 'baseline'")):
        with pytest.raises(SystemExit, match=f"another recipe .*{change}"):
            tiny_run(sample, work, "--resume", *flags)
    resumed = tiny_run(sample, work, "--resume")
    assert resumed["training_run"]["commands"][1].endswith("--resume")
    timing = ("seconds", "images_per_second")
    assert [{k: v for k, v in r.items() if k not in timing} for r in resumed["history"]] == \
           [{k: v for k, v in r.items() if k not in timing} for r in straight["history"]]
    a = load_file(str(tmp_path / "straight/export/resnet18_cifar10.safetensors"))
    b = load_file(str(work / "export/resnet18_cifar10.safetensors"))
    for name, tensor in a.items():
        assert torch.allclose(tensor.float(), b[name].float(), atol=1e-3), name


def test_a_warm_up_of_no_length_is_refused_with_a_clear_message(sample, tmp_path):
    """10 steps with 10 % warm-up: torch's one-cycle schedule would divide by a phase of zero steps."""
    with pytest.raises(SystemExit, match="--warmup 0.1 of 10 steps leaves a phase of the one-cycle schedule"):
        tiny_run(sample, tmp_path, "--warmup", "0.1")
