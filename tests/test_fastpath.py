"""The engines and precisions: selection rules, the int8 graphs' agreement with fp32 on held-out
images, the load-time checks that refuse a bad engine, OOM retry, and the default server reporting
what it runs."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from predictor.core.imaging import decode_image
from predictor.engines import devices, torch_engine
from predictor.engines import selection as engine_module
from predictor.engines.devices import EngineError, cpu_has, resolve_device
from predictor.engines.onnx_int8 import OnnxEngine, onnx_int8_path
from predictor.engines.reference import ReferenceNetwork
from predictor.engines.selection import build_engine, check_agreement, choose_engine
from predictor.engines.torch_engine import InferenceEngine, batch_buckets, native_cpu_precisions, resolve_precision
from predictor.weights import PACKAGED_DIR, WeightsError, calibration_images, load_model, verified_weights

from .conftest import MODEL_NAME, ROOT, Server


@pytest.fixture(scope="module")
def shipped():
    return load_model(PACKAGED_DIR)


@pytest.fixture(scope="module")
def reference() -> ReferenceNetwork:
    return ReferenceNetwork.from_file(verified_weights(PACKAGED_DIR)[0], threads=2)


@pytest.fixture(scope="module")
def test_images(cifar_jpegs) -> np.ndarray:
    return np.stack([decode_image(data) for data in cifar_jpegs.values()])


@pytest.fixture(scope="module")
def held_out(holdout) -> tuple[np.ndarray, np.ndarray]:
    return np.stack([decode_image(data) for data, _ in holdout]), np.array([label for _, label in holdout])


@pytest.fixture(scope="module")
def fp32_logits(shipped, held_out) -> np.ndarray:
    model, _ = shipped
    return InferenceEngine(model, "cpu", "fp32", max_batch_size=250, compile=False).logits(held_out[0])


def softmax(logits: np.ndarray) -> np.ndarray:
    exp = np.exp(logits - logits.max(1, keepdims=True))
    return exp / exp.sum(1, keepdims=True)


def test_engine_choice():
    assert choose_engine("auto", "cpu", "auto", onnx_int8_ships=True) == "onnx"
    assert choose_engine("auto", "cpu", "int8", onnx_int8_ships=True) == "onnx"
    assert choose_engine("auto", "cpu", "fp32", onnx_int8_ships=True) == "torch"
    assert choose_engine("auto", "cpu", "auto", onnx_int8_ships=False) == "torch"
    assert choose_engine("auto", "cuda", "auto", onnx_int8_ships=True) == "torch"
    assert choose_engine("torch", "cpu", "int8", onnx_int8_ships=True) == "torch"
    for device, precision, ships, message in (("cuda", "auto", True, "CPU only"), ("cpu", "bf16", True, "int8 only"),
                                              ("cpu", "int8", False, "no int8 ONNX graph")):
        with pytest.raises(EngineError, match=message):
            choose_engine("onnx", device, precision, ships)


# The CPUs the suite must pass on, as the flags `native_cpu_precisions` reads from them: forced here so
# every branch runs whatever CPU is at hand.
AVX2_ONLY, AVX512_VNNI, AVX512_BF16, AMX = frozenset(), frozenset({"int8"}), frozenset({"bf16"}), frozenset({"int8", "bf16"})


def test_auto_precision_for_every_cpu_kind():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert resolve_precision("auto", cuda, verifiable=True) == "fp16"
    for native, with_calibration in ((AVX2_ONLY, "fp32"), (AVX512_VNNI, "int8"), (AVX512_BF16, "bf16"), (AMX, "int8")):
        assert resolve_precision("auto", cpu, verifiable=True, native=native) == with_calibration, native
        # Without the calibration images nothing can be checked against fp32: auto serves fp32 itself.
        assert resolve_precision("auto", cpu, verifiable=False, native=native) == "fp32", native
        assert resolve_precision("fp32", cpu, verifiable=True, native=native) == "fp32"
        assert resolve_precision("bf16", cpu, verifiable=False, native=native) == "bf16"  # asked for explicitly
    with pytest.raises(EngineError, match="fp16 is not available on cpu"):
        resolve_precision("fp16", cpu, verifiable=True)
    with pytest.raises(EngineError, match="int8 is not available on cuda"):
        resolve_precision("int8", cuda, verifiable=True)


def test_native_precisions_are_read_from_the_cpu():
    """Checked against the CPU's flags read here, not through the code's own helpers."""
    flags = set()
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("flags"):
            flags |= set(line.split(":", 1)[1].split())
    native = native_cpu_precisions()
    assert ("int8" in native) == bool({"avx512_vnni", "amx_int8"} & flags), (native, flags)
    if {"avx512_bf16", "amx_bf16"} & flags:
        assert "bf16" in native, native
    if "avx512f" not in flags:  # oneDNN's bf16 kernels need AVX-512 at least
        assert "bf16" not in native, native


def build_auto(network, reference, card, precision: str, calibration):
    return build_engine(card, None, reference=reference, torch_network=lambda: network, engine="torch", device="cpu",
                        precision=precision, max_batch_size=32, threads=2, compile=False, calibration=calibration)


@pytest.mark.slow
def test_bf16_is_checked_against_fp32_before_it_serves(shipped, reference, monkeypatch, caplog):
    """On a bf16 CPU (forced here), auto's bf16 passes the same load-time gate as int8; when it fails,
    auto serves fp32 and an explicit bf16 is refused."""
    model, card = shipped
    calibration = calibration_images(PACKAGED_DIR, card)
    monkeypatch.setattr(torch_engine, "native_cpu_precisions", lambda: AVX512_BF16)
    with caplog.at_level("INFO", logger="predictor"):
        assert build_auto(model, reference, card, "auto", calibration).precision == "bf16"
    assert "bf16 engine agrees with the fp32 network" in caplog.text
    assert build_auto(model, reference, card, "auto", None).precision == "fp32"  # nothing to check it with
    # A user's export has no recorded fp32 classes: the gate computes them with the reference network.
    unrecorded = card | {"int8_calibration": {k: v for k, v in card["int8_calibration"].items() if k != "fp32_classes"}}
    assert build_auto(model, reference, unrecorded, "auto", calibration).precision == "bf16"

    monkeypatch.setattr(engine_module, "MIN_AGREEMENT", 1.01)  # a gate no engine passes
    assert build_auto(model, reference, card, "auto", calibration).precision == "fp32"
    with pytest.raises(WeightsError, match="bf16 engine agrees .* refusing to serve it"):
        build_auto(model, reference, card, "bf16", calibration)


def test_compiled_batch_buckets_cover_every_batch_size():
    assert batch_buckets(32) == [1, 2, 4, 8, 16, 32]
    assert batch_buckets(24) == [1, 2, 4, 8, 16, 24]
    assert batch_buckets(4) == [1, 2, 4]
    assert batch_buckets(1) == [1]


def test_onnx_int8_matches_fp32_on_held_out_images(shipped, held_out, fp32_logits):
    _, card = shipped
    images, labels = held_out
    engine = OnnxEngine(onnx_int8_path(PACKAGED_DIR, card), max_batch_size=32, threads=2)
    logits = np.concatenate([engine.logits(images[:1]), engine.logits(images[1:700]), engine.logits(images[700:])])
    fp32_accuracy = (fp32_logits.argmax(1) == labels).mean()
    int8_accuracy = (logits.argmax(1) == labels).mean()
    assert fp32_accuracy >= 0.92, fp32_accuracy  # the shipped weights on images they never saw
    assert abs(int8_accuracy - fp32_accuracy) <= 0.003, (int8_accuracy, fp32_accuracy)
    assert (logits.argmax(1) == fp32_logits.argmax(1)).mean() >= 0.99
    # The probabilities, not only the argmax: the served confidence must be the fp32 network's, on
    # average and on every image (a mean hides a few images gone badly wrong; measured on AVX2: mean
    # 0.001, 99th percentile of the per-image max 0.064, largest 0.135).
    shift = np.abs(softmax(logits) - softmax(fp32_logits))
    assert shift.mean() < 0.005 and shift.max() < 0.25, (shift.mean(), shift.max())


def test_onnx_graph_that_does_not_match_the_card_is_refused(tmp_path, shipped):
    _, card = shipped
    model_dir = tmp_path / "model"
    shutil.copytree(PACKAGED_DIR, model_dir)
    graph = model_dir / card["onnx_int8"]["file"]
    data = bytearray(graph.read_bytes())
    data[len(data) // 2] ^= 0xFF
    graph.write_bytes(bytes(data))
    with pytest.raises(WeightsError, match="sha256 does not match"):
        onnx_int8_path(model_dir, card)


def test_agreement_check_refuses_an_engine_that_disagrees_with_fp32(shipped, reference):
    _, card = shipped
    calibration = calibration_images(PACKAGED_DIR, card)
    engine = OnnxEngine(onnx_int8_path(PACKAGED_DIR, card), max_batch_size=32, threads=2)
    fp32 = reference.logits(calibration).argmax(1)
    assert check_agreement(engine, fp32, calibration) >= 0.98

    class ShiftedClasses:  # the real int8 graph with its outputs off by one class: a broken export
        precision = "int8"

        def logits(self, images):
            return np.roll(engine.logits(images), 1, axis=1)

    with pytest.raises(WeightsError, match="refusing to serve it"):
        check_agreement(ShiftedClasses(), fp32, calibration)


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


@pytest.mark.slow
@pytest.mark.parametrize("precision", ["bf16", "int8"])
def test_torch_compiled_precisions_match_fp32_on_held_out_images(shipped, held_out, fp32_logits, precision):
    model, card = shipped
    images = held_out[0][:500]
    calibration = calibration_images(PACKAGED_DIR, card) if precision == "int8" else None
    fast = InferenceEngine(model, "cpu", precision, max_batch_size=32, calibration=calibration, compile=True)
    assert fast.description == f"cpu {precision} torch compiled"
    logits = np.concatenate([fast.logits(images[:1]), fast.logits(images[1:7]), fast.logits(images[7:])])
    # Without VNNI, oneDNN's u8s8 int8 kernels saturate (as ORT's do with full-range weights): measured
    # 97.0 % agreement on an AVX2-only CPU, which is why `auto` picks torch int8 only on VNNI/AMX CPUs.
    floor = 0.96 if precision == "int8" and not (cpu_has("avx512_vnni") or cpu_has("amx_int8")) else 0.98
    assert (logits.argmax(1) == fp32_logits[:500].argmax(1)).mean() >= floor, precision
    assert np.abs(softmax(logits) - softmax(fp32_logits[:500])).mean() < 0.01, precision


@pytest.mark.slow
def test_cuda_without_a_usable_gpu_stops_with_one_clear_line():
    if torch.cuda.is_available():
        assert resolve_device("cuda") == "cuda"
        return
    with pytest.raises(EngineError, match="no usable GPU"):
        resolve_device("cuda")
    result = subprocess.run([sys.executable, "-m", "predictor", "--device", "cuda", "--enable_grpc", "false"], cwd=ROOT,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    errors = [line for line in (result.stdout + result.stderr).splitlines() if "cannot serve" in line]
    assert len(errors) == 1 and "--device cuda: no usable GPU" in errors[0], result.stdout + result.stderr
    assert "Uvicorn running" not in result.stdout + result.stderr


def test_without_torch_the_torch_engine_and_cuda_are_refused_and_auto_serves_onnx(shipped, reference, monkeypatch):
    """The CPU image has no torch (tests/test_image.py runs it); here its absence is simulated."""
    _, card = shipped
    for module in (engine_module, devices):  # the device check and the engine choice each ask
        monkeypatch.setattr(module, "torch_installed", lambda: False)
    assert resolve_device("auto") == "cpu"
    with pytest.raises(EngineError, match="--device cuda needs torch.*use the CUDA image"):
        resolve_device("cuda")

    def build(engine: str, precision: str):
        return build_engine(card, PACKAGED_DIR, reference=reference, torch_network=lambda: pytest.fail("torch used"),
                            engine=engine, device="auto", precision=precision, max_batch_size=8, threads=1,
                            compile=False, calibration=calibration_images(PACKAGED_DIR, card))

    for engine, precision in (("torch", "auto"), ("auto", "fp32")):
        with pytest.raises(EngineError, match="needs torch.*use the CUDA image"):
            build(engine, precision)
    assert build("auto", "auto").name == "onnxruntime"


@pytest.mark.slow
def test_compile_without_a_compiler_stops_with_one_clear_line(tmp_path):
    # A PATH with no C++ compiler on it, as in an image without one.
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    result = subprocess.run([sys.executable, "-m", "predictor", "--engine", "torch", "--precision", "fp32",
                             "--compile", "true", "--enable_grpc", "false"], cwd=ROOT, capture_output=True, text=True,
                            timeout=120, env={**os.environ, "PATH": str(bin_dir), "CXX": "g++"})
    assert result.returncode == 2, result.stdout + result.stderr
    assert "cannot serve: --compile true needs a C++ compiler" in result.stdout + result.stderr


@pytest.mark.slow
def test_default_server_serves_onnx_int8_without_compiling(holdout):
    server = Server("--rate_limit_per_minute", "0")
    eager = Server("--engine", "torch", "--precision", "fp32", "--compile", "false", "--rate_limit_per_minute", "0")
    try:
        meta = server.client.get(f"/v2/models/{MODEL_NAME}").json()
        parameters = meta["parameters"]
        assert parameters["device"] == "cpu" and parameters["engine"] == "onnxruntime"
        assert parameters["precision"] == "int8" and parameters["compiled"] is False
        assert 0 < parameters["load_seconds"] < 10 and meta["versions"] == [parameters["version"]]
        assert "on cpu int8 onnxruntime" in server.log()
        assert "agrees with the fp32 network" in server.log()
        for i, (data, _) in enumerate(holdout[::100]):  # 20 held-out images, 2 per class
            fast = server.client.post("/classify/image", files={"file": ("x.jpg", data, "image/jpeg")}).json()
            slow = eager.client.post("/classify/image", files={"file": ("x.jpg", data, "image/jpeg")}).json()
            assert fast["predicted_class"] == slow["predicted_class"], i
            assert abs(fast["confidence"] - slow["confidence"]) < 0.05, i
    finally:
        server.stop()
        eager.stop()


@pytest.mark.slow
def test_a_gpu_precision_on_a_cpu_stops_with_one_clear_line():
    result = subprocess.run([sys.executable, "-m", "predictor", "--precision", "fp16", "--device", "cpu",
                             "--enable_grpc", "false"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    output = result.stdout + result.stderr
    errors = [line for line in output.splitlines() if " ERROR " in line or "Traceback" in line]
    assert result.returncode == 2, output
    assert len(errors) == 1 and "cannot serve: --precision fp16 is not available on cpu" in errors[0], output
