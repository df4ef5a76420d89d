"""int8 post-training static quantization (PT2E, x86 inductor backend) and its calibration images.

    python -m predictor.quantize --data /tmp/cifar10/train     # writes weights/calibration.npy

The predictor quantizes at start-up from the fp32 weights and these calibration images: a few
hundred *training-split* images (never validation ones), picked with a fixed seed, stored as uint8
next to the weights with their sha256 in the model card.
"""

import argparse
import json
import logging
from pathlib import Path

import numpy as np
import torch

from .data import load_image_folder, stratified_split
from .network import normalize
from .weights import CARD_FILE, PACKAGED_DIR, WeightsError, sha256_of

log = logging.getLogger("predictor")
CALIBRATION_FILE = "calibration.npy"


def calibration_images(directory: Path, card: dict) -> np.ndarray:
    """The calibration set shipped with the weights, verified against the card's sha256."""
    path = Path(directory) / CALIBRATION_FILE
    expected = card.get("int8_calibration", {}).get("sha256")
    if not path.is_file() or expected is None:
        raise WeightsError(f"{path}: no calibration images for int8 (run `python -m predictor.quantize --data DIR`)")
    if sha256_of(path) != expected:
        raise WeightsError(f"{path}: sha256 does not match the model card's")
    images = np.load(path, allow_pickle=False)
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[1:] != (32, 32, 3):
        raise WeightsError(f"{path}: expected [N, 32, 32, 3] uint8 images, got {images.dtype} {images.shape}")
    return images


def quantize_int8(model: torch.nn.Module, calibration: np.ndarray, max_batch_size: int) -> torch.nn.Module:
    """fp32 network -> PT2E int8 graph (batch dimension dynamic up to max_batch_size), calibrated."""
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e
    from torchao.quantization.pt2e.quantizer import x86_inductor_quantizer as x86

    example = normalize(torch.from_numpy(calibration[:2]))
    batch = torch.export.Dim("batch", min=1, max=max(2, max_batch_size))
    # strict export: the non-strict one fails in the quantizer's annotation pass (torchao 0.18)
    graph = torch.export.export(model, (example,), dynamic_shapes=({0: batch},), strict=True).module()
    quantizer = x86.X86InductorQuantizer().set_global(x86.get_default_x86_inductor_quantization_config())
    prepared = prepare_pt2e(graph, quantizer)
    with torch.no_grad():
        for start in range(0, len(calibration), 32):
            prepared(normalize(torch.from_numpy(calibration[start:start + 32])))
    return convert_pt2e(prepared)


def write_calibration_set(data_dir: str, out: Path, count: int, seed: int, cache_dir: str) -> dict:
    """Pick `count` training-split images (the card's split), save them, and record them in the card."""
    card_path = out / CARD_FILE
    card = json.loads(card_path.read_text())
    split = card["data"]
    data = load_image_folder(data_dir, cache_dir)
    if data.fingerprint != split["fingerprint_sha256"]:
        raise SystemExit(f"{data_dir}: not the data these weights were trained on (fingerprint differs)")
    train_idx, _ = stratified_split(data.labels, split["validation_images"], split["split_seed"])
    chosen = np.sort(np.random.default_rng(seed).choice(train_idx, size=count, replace=False))
    path = out / CALIBRATION_FILE
    np.save(path, data.images[chosen])
    card["int8_calibration"] = {"file": CALIBRATION_FILE, "sha256": sha256_of(path), "images": count, "seed": seed,
                                "source": "training split only (never the validation split), numpy default_rng(seed)"}
    card_path.write_text(json.dumps(card, indent=2) + "\n")
    return card["int8_calibration"]


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, help="the ImageFolder directory the weights were trained on")
    p.add_argument("--out", default=str(PACKAGED_DIR), help="model directory (weights + model card)")
    p.add_argument("--images", type=int, default=256)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cache-dir", default=".cache")
    args = p.parse_args(argv)
    log.info("calibration set: %s", write_calibration_set(args.data, Path(args.out), args.images, args.seed, args.cache_dir))


if __name__ == "__main__":
    main()
