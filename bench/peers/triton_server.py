"""NVIDIA Triton Inference Server through PyTriton 0.7, with Triton's dynamic batcher in front of a Python
callable that does the predictor's own decoding and runs its int8 graph on ONNX Runtime
(bench/peers/common.py). Two models on one server, as a Triton user would deploy the classifier:

- `cifar10-resnet18-jpeg`: input `image` BYTES [N, 1], the JPEG or PNG files (tritonclient's default for
  BYTES: the binary-data extension, a 4-byte length and the file per element), decoded in the callable;
- `cifar10-resnet18`: input `pixels` UINT8 [N, 32, 32, 3], the very v2 request the predictor serves at
  /v2/models/cifar10-resnet18/infer with input `pixels` (same path, same header, same bytes).

Both answer `probabilities` FP32 [N, 10] (the predictor's temperature-scaled softmax) and `label` BYTES
[N, 1], as the predictor's v2 outputs. The batcher as the predictor's defaults: 32 images, 2 ms.

    .cache/bench-peers/triton/bin/python bench/peers/triton_server.py --port 8095   # gRPC on port + 1
                                                                                    # (make bench-peers)

Its environment is made with Debian's python3.11: Triton's Python-backend stub, which PyTriton starts
for each model, links the system's libpython3.11.
"""

import argparse
import logging
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
from pytriton.decorators import batch  # noqa: E402
from pytriton.model_config import DynamicBatcher, ModelConfig, Tensor  # noqa: E402
from pytriton.triton import Triton, TritonConfig  # noqa: E402

from bench.peers.common import decode_image, engine, labels, probabilities  # noqa: E402

MAX_BATCH_SIZE = 32
MAX_BATCH_DELAY_US = 2000
JPEG_MODEL = "cifar10-resnet18-jpeg"
PIXELS_MODEL = "cifar10-resnet18"

onnx = engine(MAX_BATCH_SIZE)


def outputs(pixels: np.ndarray) -> dict[str, np.ndarray]:
    rows = probabilities(onnx.logits(pixels))
    return {"probabilities": rows.astype(np.float32),
            "label": np.array([[name.encode()] for name in labels(rows)], dtype=np.bytes_)}


@batch
def classify_files(image: np.ndarray) -> dict[str, np.ndarray]:
    return outputs(np.stack([decode_image(bytes(item)) for item in image.reshape(-1)]))


@batch
def classify_pixels(pixels: np.ndarray) -> dict[str, np.ndarray]:
    return outputs(np.ascontiguousarray(pixels, dtype=np.uint8))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, default=8095, help="HTTP; gRPC is port + 1, metrics port + 2")
    port = parser.parse_args().port
    logging.basicConfig(level=logging.WARNING)
    config = TritonConfig(http_address="127.0.0.1", http_port=port, grpc_address="127.0.0.1", grpc_port=port + 1,
                          metrics_port=port + 2, allow_metrics=False, log_verbose=0,
                          exit_timeout_secs=5)
    model_config = ModelConfig(max_batch_size=MAX_BATCH_SIZE,
                               batcher=DynamicBatcher(max_queue_delay_microseconds=MAX_BATCH_DELAY_US))
    answer = [Tensor(name="probabilities", dtype=np.float32, shape=(10,)),
              Tensor(name="label", dtype=np.bytes_, shape=(1,))]
    with Triton(config=config, workspace=os.environ.get("PYTRITON_WORKSPACE")) as triton:
        triton.bind(model_name=JPEG_MODEL, infer_func=classify_files,
                    inputs=[Tensor(name="image", dtype=np.bytes_, shape=(1,))], outputs=answer, config=model_config)
        triton.bind(model_name=PIXELS_MODEL, infer_func=classify_pixels,
                    inputs=[Tensor(name="pixels", dtype=np.uint8, shape=(32, 32, 3))], outputs=answer,
                    config=model_config)
        triton.serve()


if __name__ == "__main__":
    main()
