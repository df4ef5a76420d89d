"""A training run's result as a device machine can hand it back: the network to export and its record.

A device call returns at most 8 files of at most 16 MiB each (64 MiB in all), so the result is
small and split: the weights to export as fp16 safetensors in parts of at most 15 MiB (ResNet18:
two files, 21.3 MiB together; fp16 is what the export stores anyway, so nothing is lost), and
`result.json` with everything else: the arguments (the recipe), the per-epoch history, whether the
schedule finished, the data fingerprint, the machine and the commands that ran. Each part's sha256 is
in `result.json`, which is written last, so a part that does not match (a call killed while writing)
is refused on reading rather than exported.

    python -m predictor.training.train --data .cache/cifar10/train --from-result DIR --out runs/x/export

exports it here (fp16 weights, temperature, ECE, model card with the fingerprint, recipe, history
and the exact commands). The full resumable checkpoint (fp32 weights, momentum, the EMA, the
schedule: 128 MiB) stays in the run directory on the machine that trained.
"""

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import torch

RESULT_FILE = "result.json"
PART_BYTES = 15 * 2**20


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _write_atomic(path: Path, write) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    write(tmp)
    os.replace(tmp, path)


def write_result(directory: str | Path, model: torch.nn.Module, meta: dict) -> dict:
    """Write the network (fp16 safetensors parts) and `meta` + the parts' names and sha256 as result.json."""
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {k: (v.detach().half() if v.is_floating_point() else v.detach()).cpu().contiguous()
             for k, v in model.state_dict().items()}
    parts: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, tensor in state.items():
        nbytes = tensor.numel() * tensor.element_size()
        if parts[-1] and size + nbytes > PART_BYTES:
            parts.append({})
            size = 0
        parts[-1][name] = tensor
        size += nbytes
    files = []
    for i, part in enumerate(parts):
        path = directory / f"weights-{i}.safetensors"
        _write_atomic(path, lambda tmp, part=part: save_file(part, str(tmp)))
        files.append({"file": path.name, "sha256": _sha256(path), "tensors": len(part)})
    for stale in sorted(directory.glob("weights-*.safetensors"))[len(parts):]:
        stale.unlink()
    record = {**meta, "weights": files, "weights_dtype": "float16"}
    _write_atomic(directory / RESULT_FILE, lambda tmp: tmp.write_text(json.dumps(record, indent=2) + "\n"))
    return record


def read_result(directory: str | Path) -> tuple[dict, dict[str, np.ndarray]]:
    """(result.json, the network's state dict as fp32 arrays), each part checked against its sha256."""
    from safetensors.numpy import load_file

    directory = Path(directory)
    path = directory / RESULT_FILE
    if not path.is_file():
        raise SystemExit(f"{directory}: no {RESULT_FILE} (not a training run's result)")
    meta = json.loads(path.read_text())
    state: dict[str, np.ndarray] = {}
    for part in meta["weights"]:
        file = directory / part["file"]
        if not file.is_file() or _sha256(file) != part["sha256"]:
            raise SystemExit(f"{file}: missing, or not the file {RESULT_FILE} names (sha256 differs): "
                             "the result was cut off while being written")
        state.update(load_file(str(file)))
    state = {k: v.astype(np.float32) if np.issubdtype(v.dtype, np.floating) else v for k, v in state.items()}
    return meta, state
