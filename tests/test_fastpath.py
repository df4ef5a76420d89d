"""The precision / compilation fast paths: selection rules, agreement with fp32, OOM retry, and the
default server (precision auto: compiled at load) reporting what it runs."""

import numpy as np
import pytest
import torch
from torch import nn

from predictor.engine import InferenceEngine, batch_buckets, cpu_has, resolve_precision
from predictor.imaging import decode_image
from predictor.quantize import calibration_images
from predictor.weights import PACKAGED_DIR, load_model

from .conftest import MODEL_NAME, Server


@pytest.fixture(scope="module")
def shipped():
    return load_model(PACKAGED_DIR)


@pytest.fixture(scope="module")
def test_images(cifar_jpegs) -> np.ndarray:
    return np.stack([decode_image(data) for data in cifar_jpegs.values()])


def test_auto_precision_follows_the_device():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert resolve_precision("auto", cuda, int8_ready=True) == "fp16"
    assert resolve_precision("auto", cpu, int8_ready=False) in ("bf16", "fp32")  # int8 needs its calibration set
    if cpu_has("avx512_vnni") or cpu_has("amx_int8"):
        assert resolve_precision("auto", cpu, int8_ready=True) == "int8"
    assert resolve_precision("fp32", cpu, int8_ready=True) == "fp32"
    with pytest.raises(ValueError, match="fp16 is not available on cpu"):
        resolve_precision("fp16", cpu, int8_ready=True)
    with pytest.raises(ValueError, match="int8 is not available on cuda"):
        resolve_precision("int8", cuda, int8_ready=True)


def test_compiled_batch_buckets_cover_every_batch_size():
    assert batch_buckets(32) == [1, 2, 4, 8, 16, 32]
    assert batch_buckets(24) == [1, 2, 4, 8, 16, 24]
    assert batch_buckets(4) == [1, 2, 4]
    assert batch_buckets(1) == [1]


class RunsOutOfMemoryAbove(nn.Module):
    """A network that, like a GPU near its limit, cannot take batches above `limit`."""

    calls: list[int] = []  # on the class: the engine works on its own copy of the module

    def __init__(self, limit: int):
        super().__init__()
        self.limit = limit
        self.head = nn.Linear(3, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls.append(len(x))
        if len(x) > self.limit:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated by the network)")
        return self.head(x.mean(dim=(2, 3)))


def test_out_of_memory_batch_is_retried_as_smaller_batches(test_images):
    network = RunsOutOfMemoryAbove(limit=5)
    engine = InferenceEngine(network, "cpu", "fp32", max_batch_size=32, compile=False)
    network.calls.clear()
    logits = engine.logits(test_images)  # 20 images: 20 -> 10 -> 5 + 5, twice
    assert network.calls == [20, 10, 5, 5, 10, 5, 5]
    one_by_one = np.concatenate([engine.logits(image[None]) for image in test_images])
    np.testing.assert_allclose(logits, one_by_one, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("precision", ["bf16", "int8"])
def test_compiled_precisions_agree_with_fp32(shipped, test_images, precision):
    model, card = shipped
    reference = InferenceEngine(model, "cpu", "fp32", max_batch_size=32, compile=False).logits(test_images)
    calibration = calibration_images(PACKAGED_DIR, card) if precision == "int8" else None
    fast = InferenceEngine(model, "cpu", precision, max_batch_size=32, calibration=calibration, compile=True)
    assert fast.description == f"cpu {precision} compiled"
    logits = np.concatenate([fast.logits(test_images[:1]), fast.logits(test_images[1:7]), fast.logits(test_images[7:])])
    agree = (logits.argmax(1) == reference.argmax(1)).mean()
    assert agree >= 0.95, (precision, agree)
    assert np.abs(logits - reference).max() < 1.5, np.abs(logits - reference).max()


def test_default_server_compiles_at_load_and_reports_its_precision(cifar_jpegs):
    server = Server("--precision", "auto", "--rate_limit_per_minute", "0", timeout=900)
    eager = Server("--rate_limit_per_minute", "0")
    try:
        meta = server.client.get(f"/v2/models/{MODEL_NAME}").json()
        parameters = meta["parameters"]
        assert parameters["compiled"] is True and parameters["device"] == "cpu"
        assert parameters["precision"] in ("int8", "bf16", "fp32")
        assert parameters["load_seconds"] > 0 and meta["versions"] == [parameters["version"]]
        assert f"on cpu {parameters['precision']} compiled" in server.log()
        same = 0
        for name, data in cifar_jpegs.items():
            fast = server.client.post("/classify/image", files={"file": (name, data, "image/jpeg")}).json()
            slow = eager.client.post("/classify/image", files={"file": (name, data, "image/jpeg")}).json()
            same += fast["predicted_class"] == slow["predicted_class"]
        assert same >= len(cifar_jpegs) - 1
    finally:
        server.stop()
        eager.stop()
