"""Train the CIFAR-10 ResNet18, then export the weights, fit the temperature and write the model card.

    python -m predictor.training.train --data /tmp/cifar10/train        # the CPU recipe (40 epochs, 91.68 %)
    python -m predictor.training.train --data DIR --recipe ta-ema-200 --device cuda --compile   # the 95 % attempt
    python -m predictor.training.train --data DIR --from-result DIR --out runs/x/export          # export a device run

Two recipes (`--recipe`; any of its flags given on the command line wins):
- `baseline` (the default): one-cycle SGD (nesterov, momentum 0.9, weight decay 5e-4), 40 epochs, batch
  128, peak LR 0.1, label smoothing 0.1, random 4-px crop + horizontal flip + Cutout 12. The shipped
  weights are this recipe on CUDA, `--device cuda --epochs 80`, then 80 more epochs with `--init-from`
  the first run's export (`make train-gpu`).
- `ta-ema-200`: 200 epochs, batch 512, peak LR 0.4 (5 warm-up epochs), label smoothing 0.1, crop +
  flip + TrivialAugment Wide + Cutout 16, and an EMA of the weights (decay 0.999 per step), which is
  what gets exported. Written for one GPU call (predictor/training/device_run.sh); README "Training".

Augmentation runs on whole batches in torch on the training device (predictor.training.augment), the
decoded training set is moved there once; bf16 autocast and channels_last on CPUs that support bf16
and on CUDA; `--compile` compiles the network's training step. A checkpoint is written every
--checkpoint-every epochs; --resume continues it (refused if the recipe on the command line differs
from the checkpoint's); --time-limit ends a run cleanly before a deadline so it can be resumed;
--result-dir writes the small result a device machine hands back (predictor.training.result).
"""

import argparse
import hashlib
import json
import logging
import os
import platform
import shlex
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from predictor.cifar import ARCHITECTURE, CLASSES
from predictor.network import build_resnet18, normalize
from predictor.training import reports
from predictor.training.augment import crop_flip as augment
from predictor.training.augment import cutout, trivial_augment
from predictor.training.calibration import expected_calibration_error, fit_temperature
from predictor.training.data import Dataset, load_image_folder, stratified_split
from predictor.training.ema import WeightEMA
from predictor.training.result import read_result, write_result
from predictor.weights import (
    CARD_FILE,
    PACKAGED_DIR,
    WEIGHTS_FILE,
    load_model,
    network_from_file,
    network_from_state,
    save_weights,
    sha256_of,
)

log = logging.getLogger("predictor.training.train")
MIN_SCHEDULE_STEPS = 8
AUGMENTATIONS = ("crop-flip", "trivialaugment")

# What each recipe sets; a flag given on the command line overrides it (and is recorded as given).
RECIPES = {
    "baseline": {"epochs": 40, "batch_size": 128, "lr": 0.1, "weight_decay": 5e-4, "label_smoothing": 0.1,
                 "cutout": 12, "augment": "crop-flip", "ema": 0.0, "warmup": 0.25},
    # README "Training and evaluation" gives the reason for each value.
    "ta-ema-200": {"epochs": 200, "batch_size": 512, "lr": 0.4, "weight_decay": 5e-4, "label_smoothing": 0.1,
                   "cutout": 16, "augment": "trivialaugment", "ema": 0.999, "warmup": 0.025},
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, help="ImageFolder-layout directory (class sub-folders)")
    p.add_argument("--out", default=str(PACKAGED_DIR), help="where the weights, model card and plots go")
    p.add_argument("--run-dir", default="runs/train", help="checkpoint and epoch log directory")
    p.add_argument("--cache-dir", default=".cache", help="decoded-dataset cache directory")
    p.add_argument("--recipe", choices=sorted(RECIPES), default="baseline",
                   help="defaults for the flags below marked (recipe); a flag given here wins")
    p.add_argument("--epochs", type=int, help="(recipe)")
    p.add_argument("--batch-size", type=int, help="(recipe)")
    p.add_argument("--lr", type=float, help="peak learning rate of the one-cycle schedule (recipe)")
    p.add_argument("--warmup", type=float, help="fraction of the schedule spent raising the learning rate (recipe)")
    p.add_argument("--weight-decay", type=float, help="(recipe)")
    p.add_argument("--label-smoothing", type=float, help="(recipe)")
    p.add_argument("--cutout", type=int,
                   help="side of the square zeroed at a random place in every training image (0: off) (recipe)")
    p.add_argument("--augment", choices=AUGMENTATIONS,
                   help="crop-flip: random 4-px crop + flip; trivialaugment: then TrivialAugment Wide (recipe)")
    p.add_argument("--ema", type=float,
                   help="decay per step of an EMA of the weights, exported instead of the last weights (0: off) (recipe)")
    p.add_argument("--holdout", type=int, default=5000, help="stratified validation images, never trained on")
    p.add_argument("--split-seed", type=int, default=0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--limit", type=int, default=0, help="train on only this many images (smoke tests)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda")
    p.add_argument("--threads", type=int, default=0, help="intra-op threads on CPU (0: torch's default)")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=False,
                   help="torch.compile the network's training step (forward and backward)")
    p.add_argument("--resume", action="store_true", help="continue from RUN_DIR/last.pt (if there is one)")
    p.add_argument("--init-from", default="",
                   help="start from exported weights (a model directory with its card) instead of random ones; "
                        "the card must show the same data and split, so no validation image was ever trained on")
    p.add_argument("--stop-after", type=int, default=0,
                   help="end this run once this many epochs are done (the schedule still spans --epochs); "
                        "continue later with --resume")
    p.add_argument("--time-limit", type=float, default=0,
                   help="seconds this run may take: it stops after the last epoch that ends in time, with a "
                        "checkpoint, to be continued with --resume (0: no limit)")
    p.add_argument("--checkpoint-every", type=int, default=1,
                   help="write RUN_DIR/last.pt (and the --result-dir result) every this many epochs, and at the end")
    p.add_argument("--result-dir", default="",
                   help="also write the run's small result here (the weights to export as fp16 parts of <= 15 MiB, "
                        "result.json): what a device machine hands back (predictor.training.result)")
    p.add_argument("--export", action=argparse.BooleanOptionalAction, default=True,
                   help="export to --out when the schedule ends (--no-export: leave it to --from-result)")
    p.add_argument("--from-result", default="",
                   help="train nothing: export the finished run whose --result-dir this is, with the data under "
                        "--data (same fingerprint) for the validation split")
    args = p.parse_args(argv)
    for key, value in RECIPES[args.recipe].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    return args


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def bf16_supported(device: torch.device) -> bool:
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()


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


def train(args: argparse.Namespace, command: str = "") -> dict | None:
    run_started = time.monotonic()
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
    images = torch.from_numpy(train_set.images).to(device)  # the decoded training set, on the device once
    labels = torch.from_numpy(train_set.labels).to(device)
    steps_per_epoch = max(1, len(images) // args.batch_size)  # drop the ragged last batch
    # torch's one-cycle schedule divides by the length of its warm-up (pct_start x steps, less one) and of
    # the rest: with the baseline's 25 % warm-up, under 8 steps the warm-up has none.
    total_steps = args.epochs * steps_per_epoch
    if total_steps < MIN_SCHEDULE_STEPS:
        raise SystemExit(f"{args.epochs} epoch(s) x {steps_per_epoch} step(s) of {args.batch_size} images is under the "
                         f"{MIN_SCHEDULE_STEPS} optimizer steps the one-cycle schedule needs: use more images or epochs, "
                         "or a smaller --batch-size")
    if not 0 < args.warmup < 1 or float(args.warmup * total_steps) - 1 == 0:
        raise SystemExit(f"--warmup {args.warmup} of {total_steps} steps leaves a phase of the one-cycle schedule "
                         "with no length: use another --warmup (0 < warmup < 1) or another number of steps")
    autocast = bf16_supported(device)
    log.info("recipe %s on %s, bf16 autocast %s, compile %s, %d train / %d validation images, %d steps/epoch",
             args.recipe, device, autocast, args.compile, len(images), len(val_set.labels), steps_per_epoch)

    parent = warm_start_card(args, data.fingerprint) if args.init_from else None
    model = (load_model(Path(args.init_from))[0].train() if parent else build_resnet18())
    model = model.to(device).to(memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9, nesterov=True,
                                weight_decay=args.weight_decay)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=args.lr, epochs=args.epochs, steps_per_epoch=steps_per_epoch,
        pct_start=args.warmup, div_factor=10.0, final_div_factor=100.0)
    ema = WeightEMA(model, args.ema) if args.ema else None
    step_model = torch.compile(model) if args.compile else model  # same parameters: eval and export use `model`
    history: list[dict] = []
    commands: list[str] = []
    start_epoch = 0
    checkpoint_path = run_dir / "last.pt"
    if args.resume and checkpoint_path.exists():
        state = torch.load(checkpoint_path, map_location=device, weights_only=False)
        refuse_changed_recipe(args, state["args"])
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        if ema is not None:
            ema.load_state_dict(state["ema"])
        history, start_epoch = state["history"], state["epoch"]
        commands = state.get("commands", [])
        log.info("resumed from %s after epoch %d", checkpoint_path, start_epoch)
    commands = [*commands, command]
    provenance = run_provenance(args, data, train_set, device, autocast, parent)

    def save(epoch: int, finished: bool) -> None:
        torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(), "epoch": epoch, "history": history,
                    "ema": None if ema is None else ema.state_dict(), "commands": commands,
                    "args": vars(args)}, checkpoint_path)
        if args.result_dir:
            write_result(args.result_dir, model if ema is None else ema.module,
                         {**provenance, "epoch": epoch, "finished": finished, "history": history, "commands": commands,
                          "seconds_this_call": round(time.monotonic() - run_started, 1)})

    epoch_walls: list[float] = []
    for epoch in range(start_epoch, args.epochs):
        epoch_started = time.perf_counter()
        # Same batches on resume. On CUDA the generator lives on the GPU, so drawing never waits for it.
        generator = torch.Generator(device=device).manual_seed(args.seed * 1000 + epoch)
        order = torch.randperm(len(images), generator=generator, device=device)
        model.train()
        seen = 0
        correct = torch.zeros((), dtype=torch.long, device=device)  # summed on the device: no sync per step
        loss_sum = torch.zeros((), device=device)
        bar = tqdm(range(steps_per_epoch), desc=f"epoch {epoch + 1}/{args.epochs}", file=sys.stderr,
                   mininterval=5.0, disable=None)
        for step in bar:
            batch = order[step * args.batch_size:(step + 1) * args.batch_size]
            pixels = augment(images[batch], generator)
            if args.augment == "trivialaugment":
                pixels = trivial_augment(pixels, generator)
            x = cutout(normalize(pixels), args.cutout, generator)
            y = labels[batch]
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
                logits = step_model(x)
                loss = F.cross_entropy(logits.float(), y, label_smoothing=args.label_smoothing)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            if ema is not None:
                ema.update()
            seen += len(y)
            correct += (logits.argmax(1) == y).sum()
            loss_sum += loss.detach() * len(y)
            if not bar.disable and step % 50 == 0:  # reading the sums waits for the GPU: not every step
                bar.set_postfix(loss=f"{float(loss_sum) / seen:.3f}", acc=f"{int(correct) / seen:.3f}")
        correct, loss_sum = int(correct), float(loss_sum)  # waits for the GPU's last step
        seconds = time.perf_counter() - epoch_started
        val_labels = torch.from_numpy(val_set.labels)
        record = {
            "epoch": epoch + 1,
            "train_loss": round(loss_sum / seen, 4),
            "train_accuracy": round(correct / seen, 4),
            **validation_record(model, val_set.images, val_labels, device, autocast),
            "lr": round(scheduler.get_last_lr()[0], 6),
            "seconds": round(seconds, 1),
            "images_per_second": round(seen / seconds, 1),
        }
        if ema is not None:  # recorded, never used to choose: the EMA is exported whatever these say
            record.update({f"ema_{k}": v for k, v in
                           validation_record(ema.module, val_set.images, val_labels, device, autocast).items()})
        history.append(record)
        log.info("epoch %s", json.dumps(record))
        with open(run_dir / "epochs.jsonl", "a") as fh:
            fh.write(json.dumps(record) + "\n")
        done = epoch + 1
        finished = done == args.epochs
        stop = ""
        if args.stop_after and done >= args.stop_after and not finished:
            stop = "as asked (--stop-after)"
        epoch_walls.append(time.perf_counter() - epoch_started)
        if args.time_limit and not finished and not stop:
            # The next epoch is assumed to take 1.2x as long as this one (the first includes compilation) + its save.
            projected = time.monotonic() - run_started + 1.2 * epoch_walls[-1] + 10.0
            if projected > args.time_limit:
                stop = f"the next would end past --time-limit {args.time_limit:.0f} s ({projected:.0f} s projected)"
        if finished or stop or done % args.checkpoint_every == 0:
            save(done, finished)
        if stop:
            log.info("stopping after epoch %d of %d: %s; continue with --resume", done, args.epochs, stop)
            return None
    if len(history) == args.epochs and start_epoch == args.epochs:  # resumed a finished run: nothing trained
        save(args.epochs, True)
    if not args.export:
        log.info("schedule finished (%d epochs); not exported (--no-export)", args.epochs)
        return None
    exported = model if ema is None else ema.module
    return export(exported, data, val_set, history, args, parent_summary(parent), command=commands[0],
                  training_run=None if len(commands) == 1 else {"commands": commands}, autocast=autocast)


@torch.no_grad()
def validation_record(model: torch.nn.Module, images: np.ndarray, labels: torch.Tensor, device: torch.device,
                      autocast: bool) -> dict:
    logits = predict_logits(model, images, device, autocast)
    return {"val_loss": round(float(F.cross_entropy(logits, labels)), 4),
            "val_accuracy": round(float((logits.argmax(1) == labels).float().mean()), 4)}


def run_provenance(args: argparse.Namespace, data: Dataset, train_set: Dataset, device: torch.device,
                   autocast: bool, parent: dict | None) -> dict:
    """What a result must carry so the export, made elsewhere, can say what was trained, on what and where."""
    return {
        "args": vars(args),
        "data": {"fingerprint_sha256": data.fingerprint, "images": len(data.labels),
                 "train_images": len(train_set.labels), "validation_images": args.holdout,
                 "split_seed": args.split_seed,
                 # the pixels as this machine's decoder made them: the export compares them with its own
                 "decoded_sha256": hashlib.sha256(np.ascontiguousarray(data.images).data).hexdigest()},
        "machine": {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor()
                    or platform.machine(), "torch": torch.__version__, "python": platform.python_version(),
                    "bf16_autocast": autocast, "compile": args.compile,
                    "launcher": os.environ.get("TRAIN_LAUNCHER", "")},
        "init_from": parent_summary(parent),
    }


# Arguments that define what is trained: resuming with any of them changed would silently mix two recipes.
RECIPE_ARGS = ("recipe", "epochs", "batch_size", "lr", "warmup", "weight_decay", "label_smoothing", "cutout",
               "augment", "ema", "holdout", "split_seed", "seed", "limit", "init_from")


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


def parent_summary(parent: dict | None) -> dict | None:
    return None if parent is None else {
        key: parent.get(key) for key in ("weights_sha256", "epochs", "validation_accuracy", "date",
                                         "command", "recipe", "init_from")}


def recipe_card(args: argparse.Namespace, autocast: bool = True) -> dict:
    augmentation = "4-px reflect-pad random crop, horizontal flip"
    if args.augment == "trivialaugment":
        augmentation += ", TrivialAugment Wide (one of 14 operations per image, 31 magnitude bins)"
    if args.cutout:
        augmentation += f", Cutout {args.cutout}x{args.cutout}"
    recipe = {"name": args.recipe, "optimizer": "SGD momentum 0.9 nesterov",
              "schedule": f"one-cycle (pct_start {args.warmup:g})", "epochs": args.epochs,
              "peak_lr": args.lr, "weight_decay": args.weight_decay, "batch_size": args.batch_size,
              "label_smoothing": args.label_smoothing, "augmentation": augmentation,
              "precision": ("bf16 autocast" if autocast else "fp32") + ", channels_last"
                            + (", torch.compile" if getattr(args, "compile", False) else ""),
              "seed": args.seed, "limit": args.limit}
    recipe["exported_weights"] = (f"EMA of the weights (decay {args.ema:g} per step, batch-norm statistics averaged too)"
                                  if args.ema else "the last step's weights")
    return recipe


def export(model: torch.nn.Module, data: Dataset, val_set: Dataset, history: list[dict],
           args: argparse.Namespace, parent: dict | None = None, command: str = "",
           training_run: dict | None = None, autocast: bool = True) -> dict:
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
        "recipe": recipe_card(args, autocast),
        "epochs": len(history),
        "validation_accuracy": round(float((predicted == labels).float().mean()), 4),
        "per_class_accuracy": per_class,
        "temperature": round(temperature, 4),
        "ece_15_bins": {"before": round(ece_before, 4), "after": round(ece_after, 4),
                        "note": "temperature fitted and ECE measured on the same validation split"},
        "history": history,
        "init_from": parent,
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "command": command,
    }
    if training_run:
        card["training_run"] = training_run
    (out / CARD_FILE).write_text(json.dumps(card, indent=2) + "\n")
    reports.training_curve(history, out / "training_curve.png")
    reports.reliability_diagram(logits, labels, temperature, out / "reliability.png")
    log.info("exported %s: val accuracy %.4f, T %.3f, ECE %.4f -> %.4f", weights_path,
             card["validation_accuracy"], temperature, ece_before, ece_after)
    return card


def export_result(args: argparse.Namespace, command: str) -> dict:
    """Export a finished run's result (`--result-dir` of a run elsewhere) with the data here: the model card
    holds the run's recipe, history, machine and commands, and this export's command."""
    meta, state = read_result(args.from_result)
    trained = argparse.Namespace(**meta["args"])
    if not meta.get("finished"):
        raise SystemExit(f"{args.from_result}: the run stopped after epoch {meta['epoch']} of {trained.epochs}; "
                         "continue it with --resume where its checkpoint is, then export its result")
    data = load_image_folder(args.data, args.cache_dir)
    if data.fingerprint != meta["data"]["fingerprint_sha256"]:
        raise SystemExit(f"{args.from_result}: trained on other data than {args.data} (data fingerprint differs)")
    decoded_here = hashlib.sha256(np.ascontiguousarray(data.images).data).hexdigest()
    if decoded_here != meta["data"]["decoded_sha256"]:
        log.warning("the training machine decoded the JPEGs to other pixels than this one (another Pillow or "
                    "libjpeg); the export measures the network on the pixels decoded here, as serving does")
    _, val_idx = stratified_split(data.labels, trained.holdout, trained.split_seed)
    model = network_from_state(state, f"{args.from_result} weights")
    trained.out = args.out
    training_run = {"commands": meta["commands"], "machine": meta["machine"],
                    "train_images": meta["data"]["train_images"], "seconds_last_call": meta["seconds_this_call"],
                    "decoded_pixels_match_export": decoded_here == meta["data"]["decoded_sha256"],
                    "export_command": command}
    card = export(model, data, data.subset(val_idx), meta["history"], trained, meta.get("init_from"),
                  command=meta["commands"][0], training_run=training_run, autocast=meta["machine"]["bf16_autocast"])
    return card


def main(argv: list[str] | None = None) -> dict | None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    args = parse_args(argv)
    command = "python -m predictor.training.train " + shlex.join(sys.argv[1:] if argv is None else argv)
    if args.from_result:
        return export_result(args, command)
    return train(args, command)


if __name__ == "__main__":
    main()
