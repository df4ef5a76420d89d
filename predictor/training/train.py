"""Train the CIFAR-10 ResNet18, then export the weights, fit the temperature and write the model card.

    python -m predictor.training.train --data /tmp/cifar10/train        # the CPU recipe (40 epochs, 91.68 %)

The shipped weights are this recipe on CUDA, `--device cuda --epochs 80`, then 80 more epochs with
`--init-from` the first run's export (`make train-gpu`).

One-cycle SGD (nesterov, momentum 0.9, weight decay 5e-4), label smoothing 0.1, random 4-px crop +
horizontal flip + Cutout applied to whole batches in torch, bf16 autocast and channels_last on CPUs
that support bf16 (and on CUDA). A checkpoint is written after every epoch; --resume continues it
(refused if the recipe on the command line differs from the checkpoint's).
"""

import argparse
import json
import logging
import shlex
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from predictor.cifar import ARCHITECTURE, CLASSES
from predictor.network import build_resnet18, normalize
from predictor.training import reports
from predictor.training.calibration import expected_calibration_error, fit_temperature
from predictor.training.data import Dataset, load_image_folder, stratified_split
from predictor.weights import (
    CARD_FILE,
    PACKAGED_DIR,
    WEIGHTS_FILE,
    load_model,
    network_from_file,
    save_weights,
    sha256_of,
)

log = logging.getLogger("predictor.training.train")
MIN_SCHEDULE_STEPS = 8


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, help="ImageFolder-layout directory (class sub-folders)")
    p.add_argument("--out", default=str(PACKAGED_DIR), help="where the weights, model card and plots go")
    p.add_argument("--run-dir", default="runs/train", help="checkpoint and epoch log directory")
    p.add_argument("--cache-dir", default=".cache", help="decoded-dataset cache directory")
    p.add_argument("--epochs", type=int, default=40)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=0.1, help="peak learning rate of the one-cycle schedule")
    p.add_argument("--weight-decay", type=float, default=5e-4)
    p.add_argument("--label-smoothing", type=float, default=0.1)
    p.add_argument("--cutout", type=int, default=12,
                   help="side of the square zeroed at a random place in every training image (0: off)")
    p.add_argument("--holdout", type=int, default=5000, help="stratified validation images, never trained on")
    p.add_argument("--split-seed", type=int, default=0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--limit", type=int, default=0, help="train on only this many images (smoke tests)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda")
    p.add_argument("--threads", type=int, default=0, help="intra-op threads on CPU (0: torch's default)")
    p.add_argument("--resume", action="store_true", help="continue from RUN_DIR/last.pt")
    p.add_argument("--init-from", default="",
                   help="start from exported weights (a model directory with its card) instead of random ones; "
                        "the card must show the same data and split, so no validation image was ever trained on")
    p.add_argument("--stop-after", type=int, default=0,
                   help="end this run once this many epochs are done (the schedule still spans --epochs); "
                        "continue later with --resume")
    return p.parse_args(argv)


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def bf16_supported(device: torch.device) -> bool:
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()


def augment(batch: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Random 32x32 crop of the 4-px reflect-padded image and a random horizontal flip, per image.

    The random draws come from `generator`, which lives on the batch's device, and the flip is a
    `where`, not boolean indexing: on CUDA nothing here waits for the GPU.
    """
    n, h, w, _ = batch.shape
    device = batch.device
    padded = F.pad(batch.permute(0, 3, 1, 2).float(), (4, 4, 4, 4), mode="reflect")
    dy = torch.randint(0, 9, (n,), generator=generator, device=device)
    dx = torch.randint(0, 9, (n,), generator=generator, device=device)
    flip = torch.rand(n, generator=generator, device=device) < 0.5
    rows = (dy[:, None] + torch.arange(h, device=device)[None, :])[:, None, :, None].expand(n, 3, h, w + 8)
    out = padded.gather(2, rows)
    cols = (dx[:, None] + torch.arange(w, device=device)[None, :])[:, None, None, :].expand(n, 3, h, w)
    out = out.gather(3, cols)
    out = torch.where(flip[:, None, None, None], out.flip(3), out)
    return out.permute(0, 2, 3, 1).to(torch.uint8)


def cutout(batch: torch.Tensor, size: int, generator: torch.Generator) -> torch.Tensor:
    """Zero (the normalised mean) a size x size square centred at a random pixel of each NCHW image.

    The square may hang over the border, as in DeVries & Taylor (2017), so some images lose less.
    """
    if size <= 0:
        return batch
    n, _, h, w = batch.shape
    device = batch.device
    cy = torch.randint(0, h, (n, 1, 1), generator=generator, device=device)
    cx = torch.randint(0, w, (n, 1, 1), generator=generator, device=device)
    ys = torch.arange(h, device=device)[None, :, None] - (cy - size // 2)
    xs = torch.arange(w, device=device)[None, None, :] - (cx - size // 2)
    inside = (ys >= 0) & (ys < size) & (xs >= 0) & (xs < size)
    return batch.masked_fill(inside[:, None], 0.0)


@torch.no_grad()
def predict_logits(model: torch.nn.Module, images: np.ndarray, device: torch.device, autocast: bool,
                   batch_size: int = 500) -> torch.Tensor:
    model.eval()
    chunks = []
    for start in range(0, len(images), batch_size):
        x = normalize(torch.from_numpy(images[start:start + batch_size]).to(device))
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
            chunks.append(model(x).float().cpu())
    return torch.cat(chunks)


def train(args: argparse.Namespace) -> dict | None:
    device = pick_device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed input shapes: let cuDNN pick its fastest kernels once
    run_dir = Path(args.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)

    data = load_image_folder(args.data, args.cache_dir)
    train_idx, val_idx = stratified_split(data.labels, args.holdout, args.split_seed)
    if args.limit:
        train_idx = np.random.default_rng(args.seed).permutation(train_idx)[: args.limit]
    train_set, val_set = data.subset(train_idx), data.subset(val_idx)
    images = torch.from_numpy(train_set.images).to(device)
    labels = torch.from_numpy(train_set.labels).to(device)
    steps_per_epoch = max(1, len(images) // args.batch_size)  # drop the ragged last batch
    # The one-cycle schedule's warm-up is a quarter of the steps; under 8 steps it has none, and torch
    # divides by its length.
    if args.epochs * steps_per_epoch < MIN_SCHEDULE_STEPS:
        raise SystemExit(f"{args.epochs} epoch(s) x {steps_per_epoch} step(s) of {args.batch_size} images is under the "
                         f"{MIN_SCHEDULE_STEPS} optimizer steps the one-cycle schedule needs: use more images or epochs, "
                         "or a smaller --batch-size")
    autocast = bf16_supported(device)
    log.info("device %s, bf16 autocast %s, %d train / %d validation images, %d steps/epoch",
             device, autocast, len(images), len(val_set.labels), steps_per_epoch)

    parent = warm_start_card(args, data.fingerprint) if args.init_from else None
    model = (load_model(Path(args.init_from))[0].train() if parent else build_resnet18())
    model = model.to(device).to(memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9, nesterov=True,
                                weight_decay=args.weight_decay)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=args.lr, epochs=args.epochs, steps_per_epoch=steps_per_epoch,
        pct_start=0.25, div_factor=10.0, final_div_factor=100.0)
    history: list[dict] = []
    start_epoch = 0
    checkpoint_path = run_dir / "last.pt"
    if args.resume and checkpoint_path.exists():
        state = torch.load(checkpoint_path, map_location=device, weights_only=False)
        refuse_changed_recipe(args, state["args"])
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        history, start_epoch = state["history"], state["epoch"]
        log.info("resumed from %s after epoch %d", checkpoint_path, start_epoch)

    for epoch in range(start_epoch, args.epochs):
        # Same batches on resume. On CUDA the generator lives on the GPU, so drawing never waits for it.
        generator = torch.Generator(device=device).manual_seed(args.seed * 1000 + epoch)
        order = torch.randperm(len(images), generator=generator, device=device)
        model.train()
        seen = 0
        correct = torch.zeros((), dtype=torch.long, device=device)  # summed on the device: no sync per step
        loss_sum = torch.zeros((), device=device)
        started = time.perf_counter()
        bar = tqdm(range(steps_per_epoch), desc=f"epoch {epoch + 1}/{args.epochs}", file=sys.stderr,
                   mininterval=5.0, disable=None)
        for step in bar:
            batch = order[step * args.batch_size:(step + 1) * args.batch_size]
            x = cutout(normalize(augment(images[batch], generator)), args.cutout, generator)
            y = labels[batch]
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
                logits = model(x)
                loss = F.cross_entropy(logits.float(), y, label_smoothing=args.label_smoothing)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            seen += len(y)
            correct += (logits.argmax(1) == y).sum()
            loss_sum += loss.detach() * len(y)
            if not bar.disable and step % 50 == 0:  # reading the sums waits for the GPU: not every step
                bar.set_postfix(loss=f"{float(loss_sum) / seen:.3f}", acc=f"{int(correct) / seen:.3f}")
        correct, loss_sum = int(correct), float(loss_sum)  # waits for the GPU's last step
        seconds = time.perf_counter() - started
        val_logits = predict_logits(model, val_set.images, device, autocast)
        val_labels = torch.from_numpy(val_set.labels)
        record = {
            "epoch": epoch + 1,
            "train_loss": round(loss_sum / seen, 4),
            "train_accuracy": round(correct / seen, 4),
            "val_loss": round(float(F.cross_entropy(val_logits, val_labels)), 4),
            "val_accuracy": round(float((val_logits.argmax(1) == val_labels).float().mean()), 4),
            "seconds": round(seconds, 1),
            "images_per_second": round(seen / seconds, 1),
        }
        history.append(record)
        log.info("epoch %s", json.dumps(record))
        with open(run_dir / "epochs.jsonl", "a") as fh:
            fh.write(json.dumps(record) + "\n")
        torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(), "epoch": epoch + 1, "history": history,
                    "args": vars(args)}, checkpoint_path)
        if args.stop_after and epoch + 1 >= args.stop_after and epoch + 1 < args.epochs:
            log.info("stopping after epoch %d as asked; continue with --resume", epoch + 1)
            return None
    return export(model, data, val_set, history, args, parent)


# Arguments that define what is trained: resuming with any of them changed would silently mix two recipes.
RECIPE_ARGS = ("epochs", "batch_size", "lr", "weight_decay", "label_smoothing", "cutout", "holdout",
               "split_seed", "seed", "limit", "init_from")


def refuse_changed_recipe(args: argparse.Namespace, saved: dict) -> None:
    changed = [f"--{name.replace('_', '-')} {saved.get(name)!r} -> {getattr(args, name)!r}"
               for name in RECIPE_ARGS if name in saved and saved[name] != getattr(args, name)]
    if changed:
        raise SystemExit(f"--resume: the checkpoint was made with another recipe ({'; '.join(changed)}); "
                         "use the same arguments, or another --run-dir")


def warm_start_card(args: argparse.Namespace, fingerprint: str) -> dict:
    """The parent model card, refused unless it was trained on the same data with the same held-out split."""
    card = json.loads((Path(args.init_from) / CARD_FILE).read_text())
    data = card.get("data", {})
    same_split = (data.get("fingerprint_sha256") == fingerprint and data.get("split_seed") == args.split_seed
                  and data.get("validation_images") == args.holdout)
    if not same_split:
        raise SystemExit(f"--init-from {args.init_from}: its model card shows other data or another validation "
                         "split; warm-starting from it would leak validation images into training")
    return card


def export(model: torch.nn.Module, data: Dataset, val_set: Dataset, history: list[dict],
           args: argparse.Namespace, parent: dict | None = None) -> dict:
    """Save fp16 weights, then measure the *saved* file in fp32 on CPU: accuracy, temperature, ECE."""
    out = Path(args.out)
    weights_path = save_weights(model.float().cpu(), out)
    shipped = network_from_file(weights_path)
    logits = predict_logits(shipped, val_set.images, torch.device("cpu"), autocast=False)
    labels = torch.from_numpy(val_set.labels)
    predicted = logits.argmax(1)
    temperature = fit_temperature(logits, labels)
    ece_before = expected_calibration_error(logits.softmax(1), labels)
    ece_after = expected_calibration_error((logits / temperature).softmax(1), labels)
    per_class = {name: round(float((predicted[labels == i] == i).float().mean()), 4) for i, name in enumerate(CLASSES)}
    card = {
        "name": "cifar10-resnet18",
        "architecture": ARCHITECTURE,
        "classes": list(CLASSES),
        "weights_file": WEIGHTS_FILE,
        "weights_sha256": sha256_of(weights_path),
        "weights_dtype": "float16",
        "data": {"fingerprint_sha256": data.fingerprint, "images": len(data.labels),
                 "fingerprint": "sha256 over sorted (relative path, sha256 of file) pairs",
                 "validation_images": len(val_set.labels), "split_seed": args.split_seed,
                 "split": "stratified, equal count per class, numpy default_rng(split_seed)"},
        "recipe": {"optimizer": "SGD momentum 0.9 nesterov", "schedule": "one-cycle (pct_start 0.25)",
                   "peak_lr": args.lr, "weight_decay": args.weight_decay, "batch_size": args.batch_size,
                   "label_smoothing": args.label_smoothing, "augmentation": "4-px reflect-pad random crop, horizontal flip"
                   + (f", Cutout {args.cutout}x{args.cutout}" if args.cutout else ""),
                   "precision": "bf16 autocast, channels_last", "seed": args.seed, "limit": args.limit},
        "epochs": len(history),
        "validation_accuracy": round(float((predicted == labels).float().mean()), 4),
        "per_class_accuracy": per_class,
        "temperature": round(temperature, 4),
        "ece_15_bins": {"before": round(ece_before, 4), "after": round(ece_after, 4),
                        "note": "temperature fitted and ECE measured on the same validation split"},
        "history": history,
        "init_from": None if parent is None else {
            key: parent.get(key) for key in ("weights_sha256", "epochs", "validation_accuracy", "date",
                                             "command", "recipe", "init_from")},
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": "python -m predictor.training.train " + shlex.join(sys.argv[1:]),
    }
    (out / CARD_FILE).write_text(json.dumps(card, indent=2) + "\n")
    reports.training_curve(history, out / "training_curve.png")
    reports.reliability_diagram(logits, labels, temperature, out / "reliability.png")
    log.info("exported %s: val accuracy %.4f, T %.3f, ECE %.4f -> %.4f", weights_path,
             card["validation_accuracy"], temperature, ece_before, ece_after)
    return card


def main(argv: list[str] | None = None) -> dict | None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    return train(parse_args(argv))


if __name__ == "__main__":
    main()
