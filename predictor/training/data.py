"""ImageFolder-layout datasets decoded once (with the serving decoder) into cached uint8 arrays."""

import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from predictor.cifar import CLASSES
from predictor.core.imaging import decode_image

log = logging.getLogger(__name__)
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png"}


@dataclass
class Dataset:
    """Decoded images [N, 32, 32, 3] uint8, integer labels in CIFAR-10 order, and their files."""

    images: np.ndarray
    labels: np.ndarray
    files: list[str]
    fingerprint: str  # sha256 over every (relative path, file bytes): which data this was

    def subset(self, indices: np.ndarray) -> "Dataset":
        return Dataset(self.images[indices], self.labels[indices], [self.files[i] for i in indices], self.fingerprint)


def resolve_image_folder(root: str | Path) -> Path:
    """The class-folder directory: `root` itself, or the unpacked archive's `train/` inside it."""
    root = Path(root)
    if (root / "train").is_dir() and not any((root / c).is_dir() for c in CLASSES):
        return root / "train"
    return root


def list_image_folder(root: Path) -> list[tuple[str, int]]:
    """(relative path, label) for every image under root/<class>/, sorted; class names must be CIFAR-10's."""
    found = sorted(p.name for p in root.iterdir() if p.is_dir())
    unknown = set(found) - set(CLASSES)
    if unknown or not found:
        raise SystemExit(f"{root}: expected class folders named from {CLASSES}, found {found}")
    return [
        (str(path.relative_to(root)), CLASSES.index(name))
        for name in found
        for path in sorted((root / name).iterdir())
        if path.suffix.lower() in IMAGE_SUFFIXES
    ]


def load_image_folder(root: str | Path, cache_dir: str | Path | None = None) -> Dataset:
    """Decode every image under root once; reuse the cache when the files' fingerprint matches."""
    root = resolve_image_folder(root)
    entries = list_image_folder(root)
    digest = hashlib.sha256()
    payloads = []
    for rel, _ in entries:
        data = (root / rel).read_bytes()
        digest.update(rel.encode() + b"\0" + hashlib.sha256(data).digest())
        payloads.append(data)
    fingerprint = digest.hexdigest()
    labels = np.array([label for _, label in entries], dtype=np.int64)
    files = [rel for rel, _ in entries]
    cache = Path(cache_dir) / f"decoded-{fingerprint[:16]}.npy" if cache_dir else None
    if cache is not None and cache.exists():
        log.info("using decoded cache %s", cache)
        return Dataset(np.load(cache), labels, files, fingerprint)
    log.info("decoding %d images under %s", len(entries), root)
    images = np.stack([decode_image(data) for data in payloads])
    if cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        np.save(cache, images)
    return Dataset(images, labels, files, fingerprint)


def stratified_split(labels: np.ndarray, holdout: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train indices, validation indices): `holdout` images drawn evenly per class with a fixed seed."""
    rng = np.random.default_rng(seed)
    classes = np.unique(labels)
    per_class = holdout // len(classes)
    val = np.concatenate([
        rng.permutation(np.flatnonzero(labels == c))[:per_class] for c in classes
    ])
    val.sort()
    train = np.setdiff1d(np.arange(len(labels)), val)
    return train, val
