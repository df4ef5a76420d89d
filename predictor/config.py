"""Command-line flags (KServe's own plus ours); each of ours also reads an environment variable."""

import argparse
import os
from pathlib import Path

from .model import Settings
from .weights import PACKAGED_DIR

DEFAULT_MODEL_NAME = "cifar10-resnet18"
STORAGE_MOUNT = Path("/mnt/models")  # where KServe's storage initializer puts STORAGE_URI's files


def _env(name: str, default, cast=str):
    value = os.environ.get(name)
    return default if value in (None, "") else cast(value)


def default_model_dir() -> Path:
    """/mnt/models when KServe downloaded weights (STORAGE_URI set), else the weights in the package."""
    return STORAGE_MOUNT if os.environ.get("STORAGE_URI") else PACKAGED_DIR


def build_parser(kserve_parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m predictor", parents=[kserve_parser],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        description="Serve the CIFAR-10 ResNet18 with KServe's ModelServer.",
    )
    parser.set_defaults(model_name=_env("MODEL_NAME", DEFAULT_MODEL_NAME))
    add = parser.add_argument
    add("--model_dir", type=Path, default=_env("MODEL_DIR", None, Path),
        help="directory with the weights and model_card.json [env MODEL_DIR; default /mnt/models when STORAGE_URI is set, "
             "else the weights shipped in the package]")
    add("--random_weights", action="store_true", help="serve an untrained network (tests only; never in production)")
    add("--device", default=_env("DEVICE", "auto"), choices=["auto", "cpu", "cuda"], help="[env DEVICE]")
    add("--max_batch_size", type=int, default=_env("MAX_BATCH_SIZE", 32, int), help="images per forward pass [env MAX_BATCH_SIZE]")
    add("--max_batch_delay_ms", type=float, default=_env("MAX_BATCH_DELAY_MS", 2.0, float),
        help="longest wait for a batch to fill once a request is in [env MAX_BATCH_DELAY_MS]")
    add("--max_batch_files", type=int, default=_env("MAX_BATCH_FILES", 64, int),
        help="images per request on /classify/batch, v1 and v2 [env MAX_BATCH_FILES]")
    add("--max_body_bytes", type=int, default=_env("MAX_BODY_BYTES", 10 * 1024 * 1024, int),
        help="largest request body; larger ones get 413 before they are read [env MAX_BODY_BYTES]")
    add("--max_image_side", type=int, default=_env("MAX_IMAGE_SIDE", 4096, int),
        help="largest width or height accepted, checked before decoding [env MAX_IMAGE_SIDE]")
    add("--decode_threads", type=int, default=_env("DECODE_THREADS", 2, int), help="image decoding threads [env DECODE_THREADS]")
    add("--torch_threads", type=int, default=_env("TORCH_THREADS", 0, int),
        help="intra-op threads for the forward pass; 0 keeps torch's default (one per core) [env TORCH_THREADS]")
    return parser


def settings_from(args: argparse.Namespace) -> Settings:
    for name, minimum in (("max_batch_size", 1), ("max_batch_files", 1), ("max_body_bytes", 1), ("max_image_side", 1), ("decode_threads", 1)):
        if getattr(args, name) < minimum:
            raise SystemExit(f"--{name} must be >= {minimum}")
    return Settings(
        model_dir=args.model_dir or default_model_dir(), random_weights=args.random_weights, device=args.device,
        max_batch_size=args.max_batch_size, max_batch_delay_ms=max(0.0, args.max_batch_delay_ms),
        max_batch_files=args.max_batch_files, max_body_bytes=args.max_body_bytes,
        max_image_side=args.max_image_side, decode_threads=args.decode_threads,
    )
