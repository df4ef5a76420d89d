"""int8 post-training static quantization: its calibration images, the shipped ONNX int8 graph, and PT2E.

    python -m predictor.training.quantize --data /tmp/cifar10/train     # weights/calibration.npy + the int8 ONNX graph
    python -m predictor.training.quantize --onnx-only                   # the int8 ONNX graph from the shipped calibration set

The calibration images are a few hundred *training-split* images (never validation ones), picked
with a fixed seed, stored as uint8 next to the weights with their sha256 in the model card. From
them and the fp32 weights come two int8 forms of the same network:
- the default CPU engine's graph, made here at export time: `torch.onnx.export` (uint8 NHWC images
  in, normalisation inside the graph), then ONNX Runtime's static QDQ quantization (int8 per-channel
  weights, uint8 activations, min/max calibration), written as `resnet18_cifar10.int8.onnx` with its
  sha256 in the model card (the predictor refuses a file that does not match);
- PT2E for `--engine torch --precision int8` (x86 inductor backend), quantized at start-up by the
  torch engine itself (predictor.engines.torch_engine.quantize_pt2e_int8), since the images ship
  without this package.
"""

import argparse
import json
import logging
from pathlib import Path

import numpy as np
import torch

from predictor.network import normalize
from predictor.training.data import load_image_folder, stratified_split
from predictor.weights import CALIBRATION_FILE, CARD_FILE, ONNX_INPUT, PACKAGED_DIR, calibration_images, sha256_of

log = logging.getLogger("predictor")
ONNX_INT8_FILE = "resnet18_cifar10.int8.onnx"
ONNX_OPSET = 17


class _Normalized(torch.nn.Module):
    """The network with `normalize` in front, so the exported graph takes the served uint8 images."""

    def __init__(self, network: torch.nn.Module):
        super().__init__()
        self.network = network

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.network(normalize(images))


def export_onnx_fp32(model: torch.nn.Module, path: Path) -> None:
    """fp32 ONNX graph of the network: uint8 NHWC images in (batch dynamic), logits out."""
    example = torch.zeros((2, 32, 32, 3), dtype=torch.uint8)
    # The TorchScript exporter (dynamo=False) needs no onnxscript and gives a plain static graph of
    # standard ops, which ORT's quantizer and graph optimiser handle fully.
    torch.onnx.export(_Normalized(model).eval(), (example,), str(path), opset_version=ONNX_OPSET, dynamo=False,
                      input_names=[ONNX_INPUT], output_names=["logits"],
                      dynamic_axes={ONNX_INPUT: {0: "batch"}, "logits": {0: "batch"}})


def write_onnx_int8(model_dir: Path) -> dict:
    """Export the directory's fp32 weights, quantize them with its calibration set, record the file in the card."""
    import tempfile

    import onnxruntime
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    from predictor.weights import load_model

    model, card = load_model(model_dir)
    calibration = calibration_images(model_dir, card)

    class Reader(CalibrationDataReader):
        def __init__(self):
            self._batches = iter([{ONNX_INPUT: calibration[i:i + 32]} for i in range(0, len(calibration), 32)])

        def get_next(self):
            return next(self._batches, None)

    out = Path(model_dir) / ONNX_INT8_FILE
    with tempfile.TemporaryDirectory() as tmp:
        fp32, prepared = Path(tmp) / "fp32.onnx", Path(tmp) / "fp32.prepared.onnx"
        export_onnx_fp32(model, fp32)
        quant_pre_process(str(fp32), str(prepared))  # shape inference + graph clean-up, as ORT recommends
        # reduce_range (7-bit weights): without a VNNI unit ORT's u8s8 kernels (AVX2 vpmaddubsw) saturate their
        # 16-bit sums; with full-range weights that cost 1.4 points on AVX2 (91.74 % vs 93.12 % fp32), with
        # reduce_range the loss is 0.06 points (README "Speed").
        quantize_static(str(prepared), str(out), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                        reduce_range=True, weight_type=QuantType.QInt8, activation_type=QuantType.QUInt8,
                        calibrate_method=CalibrationMethod.MinMax)
    card["onnx_int8"] = {"file": ONNX_INT8_FILE, "sha256": sha256_of(out), "opset": ONNX_OPSET,
                         "onnxruntime": onnxruntime.__version__, "torch": torch.__version__,
                         "quantization": "static QDQ, int8 per-channel weights (7-bit reduce_range), uint8 activations, min/max calibration "
                                         "on the int8 calibration set"}
    # The load-time gate's expected answers (predictor.engines.selection.fp32_classes): recorded here, the server
    # need not run the fp32 network over the calibration set at every start.
    with torch.no_grad():
        fp32 = _Normalized(model).eval()(torch.from_numpy(calibration)).argmax(1)
    card["int8_calibration"]["fp32_classes"] = fp32.tolist()
    (Path(model_dir) / CARD_FILE).write_text(json.dumps(card, indent=2) + "\n")
    return card["onnx_int8"]


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
    p.add_argument("--data", help="the ImageFolder directory the weights were trained on (for the calibration set)")
    p.add_argument("--onnx-only", action="store_true", help="keep the shipped calibration set; only re-export the ONNX graph")
    p.add_argument("--out", default=str(PACKAGED_DIR), help="model directory (weights + model card)")
    p.add_argument("--images", type=int, default=256)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cache-dir", default=".cache")
    args = p.parse_args(argv)
    if not args.onnx_only:
        if not args.data:
            p.error("--data is required unless --onnx-only")
        log.info("calibration set: %s", write_calibration_set(args.data, Path(args.out), args.images, args.seed, args.cache_dir))
    log.info("int8 ONNX graph: %s", write_onnx_int8(Path(args.out)))


if __name__ == "__main__":
    main()
