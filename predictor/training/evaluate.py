"""Measure the served pipeline on the held-out validation split: accuracy, per-class accuracy, ECE.

    python -m predictor.training.evaluate --data /tmp/cifar10/train                  # in-process, shipped weights, fp32
    python -m predictor.training.evaluate --data /tmp/cifar10/train --precision int8 # ... as the int8 path serves them
    python -m predictor.training.evaluate --data /tmp/cifar10/train --url http://host:8080   # a running server

Both modes send the JPEG files through exactly what serving runs (the same data plane:
decode -> batcher -> probabilities, or the live /classify/batch endpoint), so what is measured is
what is served. The validation split is re-derived from the model card's split seed and size.
"""

import argparse
import asyncio
import json
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from predictor.cifar import CLASSES
from predictor.config import Settings
from predictor.model import Cifar10Classifier
from predictor.core.errors import ApiError
from predictor.training.calibration import expected_calibration_error
from predictor.training.data import list_image_folder, resolve_image_folder, stratified_split
from predictor.weights import PACKAGED_DIR, WeightsError, read_card

CHUNK = 64  # files per request: /classify/batch's default limit


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, help="ImageFolder-layout directory the model was trained from")
    p.add_argument("--model_dir", type=Path, default=PACKAGED_DIR, help="weights + model card (also gives the split)")
    p.add_argument("--split", choices=["validation", "all"], default="validation",
                   help="the model card's held-out split, or every image under --data")
    p.add_argument("--url", help="evaluate a running server (its /classify/batch) instead of in-process")
    p.add_argument("--device", default="auto")
    p.add_argument("--precision", default="fp32", choices=["auto", "fp32", "bf16", "int8", "fp16"],
                   help="in-process precision to measure (each served precision must stay within 0.3 points of fp32)")
    p.add_argument("--engine", default="auto", choices=["auto", "onnx", "torch"], help="as the server's --engine")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True,
                   help="compile the forward pass as serving does")
    p.add_argument("--out", type=Path, default=Path("reports"), help="where metrics JSON and the confusion-matrix PNG go")
    return p.parse_args(argv)


def select_files(data: Path, card: dict, split: str) -> list[tuple[str, int]]:
    data = resolve_image_folder(data)
    entries = [(str(data / rel), label) for rel, label in list_image_folder(data)]
    if split == "all":
        return entries
    info = card["data"]
    _, val = stratified_split(np.array([label for _, label in entries]), info["validation_images"], info["split_seed"])
    return [entries[i] for i in val]


def chunks(files: list[tuple[str, int]]) -> Iterator[list[tuple[str, int]]]:
    for start in range(0, len(files), CHUNK):
        yield files[start:start + CHUNK]


async def classify_in_process(files: list[tuple[str, int]], args: argparse.Namespace) -> list[dict]:
    model = Cifar10Classifier("evaluate", Settings(model_dir=args.model_dir, device=args.device, max_batch_size=CHUNK,
                                                   max_queue_images=CHUNK, engine=args.engine, precision=args.precision,
                                                   compile=args.compile))
    model.load()
    results = []
    for chunk in chunks(files):
        answers, _ = await model.dataplane.classify([Path(path).read_bytes() for path, _ in chunk])
        results.extend(r.body() if isinstance(r, ApiError) else r for r in answers)
    return results


def classify_over_http(files: list[tuple[str, int]], url: str) -> list[dict]:
    import httpx

    results = []
    with httpx.Client(base_url=url, timeout=120) as client:
        for chunk in chunks(files):
            uploads = [("files", (Path(p).name, Path(p).read_bytes(), "image/jpeg")) for p, _ in chunk]
            response = client.post("/classify/batch", files=uploads)
            response.raise_for_status()
            results.extend(response.json()["results"])
    return results


def summarize(results: list[dict], labels: np.ndarray) -> dict:
    failed = [i for i, r in enumerate(results) if "error" in r]
    if failed:
        raise SystemExit(f"{len(failed)} images failed to classify, e.g. {results[failed[0]]}")
    probabilities = torch.tensor([[r["all_probabilities"][c] for c in CLASSES] for r in results])
    probabilities = probabilities / probabilities.sum(1, keepdim=True)  # undo 6-digit rounding
    predicted = np.array([CLASSES.index(r["predicted_class"]) for r in results])  # the served answer
    return {
        "images": len(labels),
        "accuracy": round(float((predicted == labels).mean()), 4),
        "per_class_accuracy": {c: round(float((predicted[labels == i] == i).mean()), 4) for i, c in enumerate(CLASSES)},
        "ece_15_bins": round(expected_calibration_error(probabilities, torch.from_numpy(labels)), 4),
        "predicted": predicted,
    }


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    try:
        card = read_card(args.model_dir)
    except WeightsError as exc:
        raise SystemExit(str(exc)) from None
    files = select_files(Path(args.data), card, args.split)
    if args.url:
        results = classify_over_http(files, args.url)
    else:
        results = asyncio.run(classify_in_process(files, args))
    labels = np.array([label for _, label in files])
    summary = summarize(results, labels)
    predicted = summary.pop("predicted")
    summary["source"] = args.url or f"in-process, {args.model_dir}, engine {args.engine}, precision {args.precision}"
    args.out.mkdir(parents=True, exist_ok=True)
    from predictor.training import reports
    reports.confusion_matrix(predicted, labels, args.out / "confusion_matrix.png")
    (args.out / "evaluation.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(f"images {summary['images']}  accuracy {summary['accuracy']:.4f}  ECE(15 bins) {summary['ece_15_bins']:.4f}")
    for name, accuracy in summary["per_class_accuracy"].items():
        print(f"  {name:<11} {accuracy:.4f}")
    print(f"wrote {args.out / 'evaluation.json'} and {args.out / 'confusion_matrix.png'}", file=sys.stderr)


if __name__ == "__main__":
    main()
