"""The fp32 network on ONNX Runtime, built from the weights' arrays without torch.

What a reduced-precision engine is checked against at load (int8, bf16) and what `:explain` reads
(logits and layer4's feature maps), whatever engine serves, so that serving on ONNX Runtime never
imports torch. The graph is torchvision's ResNet18 with the CIFAR stem (predictor.network), with
each batch norm folded into the convolution before it (eval mode); tests/test_reference.py holds it
to the torch network's numbers.
"""

import threading
from pathlib import Path

import numpy as np
import onnx
import onnxruntime
from onnx import TensorProto, helper, numpy_helper

from predictor.cifar import CLASSES, IMAGE_SIZE, MEAN, STD
from predictor.weights import WeightsError, read_state

# (channels, stride of the first block) of layer1..layer4; two basic blocks each.
STAGES = ((64, 1), (128, 2), (256, 2), (512, 2))
BN_EPS = 1e-5  # torch.nn.BatchNorm2d's default, which the network trains with
OPSET = 17
INPUT, LOGITS, FEATURES = "images", "logits", "features"


def expected_shapes() -> dict[str, tuple[int, ...]]:
    """Every floating tensor of the network's state dict and its shape (torch's names)."""
    shapes: dict[str, tuple[int, ...]] = {"conv1.weight": (64, 3, 3, 3)}

    def batch_norm(prefix: str, channels: int) -> None:
        for field in ("weight", "bias", "running_mean", "running_var"):
            shapes[f"{prefix}.{field}"] = (channels,)

    batch_norm("bn1", 64)
    previous = 64
    for stage, (channels, stride) in enumerate(STAGES, start=1):
        for block in range(2):
            prefix = f"layer{stage}.{block}"
            shapes[f"{prefix}.conv1.weight"] = (channels, previous if block == 0 else channels, 3, 3)
            batch_norm(f"{prefix}.bn1", channels)
            shapes[f"{prefix}.conv2.weight"] = (channels, channels, 3, 3)
            batch_norm(f"{prefix}.bn2", channels)
            if block == 0 and (stride != 1 or previous != channels):
                shapes[f"{prefix}.downsample.0.weight"] = (channels, previous, 1, 1)
                batch_norm(f"{prefix}.downsample.1", channels)
        previous = channels
    shapes["fc.weight"] = (len(CLASSES), previous)
    shapes["fc.bias"] = (len(CLASSES),)
    return shapes


def check_state(state: dict[str, np.ndarray], source: str) -> None:
    """Refuse a state dict that is not this network's, as torch's strict loading would."""
    expected = expected_shapes()
    floating = {k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}
    missing = sorted(expected.keys() - floating.keys())
    unexpected = sorted(floating.keys() - expected.keys())
    wrong = sorted(k for k in expected.keys() & floating.keys() if tuple(floating[k].shape) != expected[k])
    if missing or unexpected or wrong:
        detail = "; ".join(f"{label}: {', '.join(keys[:3])}{' …' if len(keys) > 3 else ''}"
                           for label, keys in (("missing", missing), ("unexpected", unexpected),
                                               ("wrong shape", wrong)) if keys)
        raise WeightsError(f"{source}: weights do not fit the ResNet18 CIFAR-10 network ({detail})")


def random_state(seed: int = 0) -> dict[str, np.ndarray]:
    """An untrained network's weights (tests only: --random_weights): He-initialised convolutions,
    identity batch norms, a small random head."""
    rng = np.random.default_rng(seed)
    state = {}
    for name, shape in expected_shapes().items():
        if name.endswith("running_var") or (name.endswith(".weight") and len(shape) == 1):
            state[name] = np.ones(shape, np.float32)
        elif name.endswith(("running_mean", ".bias")):
            state[name] = np.zeros(shape, np.float32)
        else:
            fan_in = int(np.prod(shape[1:]))
            state[name] = (rng.standard_normal(shape) * np.sqrt(2.0 / fan_in)).astype(np.float32)
    return state


class _GraphBuilder:
    """Appends nodes and initializers; each op returns its output's name."""

    def __init__(self, state: dict[str, np.ndarray]):
        self.state = state
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []

    def constant(self, name: str, value: np.ndarray) -> str:
        self.initializers.append(numpy_helper.from_array(np.ascontiguousarray(value, np.float32), name))
        return name

    def op(self, kind: str, inputs: list[str], output: str, **attributes) -> str:
        self.nodes.append(helper.make_node(kind, inputs, [output], name=output, **attributes))
        return output

    def conv_bn(self, x: str, conv: str, bn: str, stride: int, relu: bool) -> str:
        """Convolution `conv` followed by batch norm `bn` (folded into the convolution's weights)."""
        s = self.state
        scale = s[f"{bn}.weight"].astype(np.float64) / np.sqrt(s[f"{bn}.running_var"].astype(np.float64) + BN_EPS)
        weight = s[f"{conv}.weight"].astype(np.float64) * scale[:, None, None, None]
        bias = s[f"{bn}.bias"] - s[f"{bn}.running_mean"] * scale
        kernel = weight.shape[-1]
        y = self.op("Conv", [x, self.constant(f"{conv}.w", weight), self.constant(f"{conv}.b", bias)], f"{conv}.out",
                    strides=[stride, stride], pads=[kernel // 2] * 4, kernel_shape=[kernel, kernel])
        return self.op("Relu", [y], f"{conv}.relu") if relu else y

    def basic_block(self, x: str, prefix: str, stride: int) -> str:
        y = self.conv_bn(x, f"{prefix}.conv1", f"{prefix}.bn1", stride, relu=True)
        y = self.conv_bn(y, f"{prefix}.conv2", f"{prefix}.bn2", 1, relu=False)
        identity = x
        if f"{prefix}.downsample.0.weight" in self.state:
            identity = self.conv_bn(x, f"{prefix}.downsample.0", f"{prefix}.downsample.1", stride, relu=False)
        return self.op("Relu", [self.op("Add", [y, identity], f"{prefix}.sum")], f"{prefix}.out")


def resnet18_graph(state: dict[str, np.ndarray]) -> bytes:
    """The serialized ONNX model: uint8 images [N, 32, 32, 3] -> fp32 logits [N, 10] and layer4 [N, 512, 4, 4]."""
    g = _GraphBuilder(state)
    x = g.op("Cast", [INPUT], "pixels", to=TensorProto.FLOAT)
    x = g.op("Transpose", [x], "nchw", perm=[0, 3, 1, 2])
    x = g.op("Div", [x, g.constant("full_scale", np.array(255.0))], "unit")
    x = g.op("Sub", [x, g.constant("mean", np.reshape(MEAN, (1, 3, 1, 1)))], "centred")
    x = g.op("Div", [x, g.constant("std", np.reshape(STD, (1, 3, 1, 1)))], "normalized")
    x = g.conv_bn(x, "conv1", "bn1", 1, relu=True)
    for stage, (_, stride) in enumerate(STAGES, start=1):
        x = g.basic_block(x, f"layer{stage}.0", stride)
        x = g.basic_block(x, f"layer{stage}.1", 1)
    g.nodes.append(helper.make_node("Identity", [x], [FEATURES], name=FEATURES))
    pooled = g.op("Flatten", [g.op("GlobalAveragePool", [x], "pooled")], "flat")
    g.op("Gemm", [pooled, g.constant("fc.w", state["fc.weight"]), g.constant("fc.b", state["fc.bias"])], LOGITS, transB=1)
    graph = helper.make_graph(
        g.nodes, "resnet18_cifar10_fp32",
        [helper.make_tensor_value_info(INPUT, TensorProto.UINT8, ["N", IMAGE_SIZE, IMAGE_SIZE, 3])],
        [helper.make_tensor_value_info(LOGITS, TensorProto.FLOAT, ["N", len(CLASSES)]),
         helper.make_tensor_value_info(FEATURES, TensorProto.FLOAT, ["N", STAGES[-1][0], "H", "W"])],
        g.initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="predictor.engines.reference")
    model.ir_version = 8  # what ONNX Runtime reads for opset 17
    onnx.checker.check_model(model)
    return model.SerializeToString()


class ReferenceNetwork:
    """The fp32 network for checks and explanations. `run` is blocking and thread-safe (one ORT session).

    The weights are checked at construction; the ONNX Runtime session is built on the first `run`
    (~0.5 s): a server whose gate reads the card's recorded fp32 classes needs it only for `:explain`,
    so neither its start-up nor its idle memory pays for it."""

    def __init__(self, state: dict[str, np.ndarray], threads: int = 1, path: Path | None = None):
        check_state(state, str(path or "weights"))
        self.threads, self.path = threads, path
        self._state = None if path else state  # what the session is built from when no file holds it
        self.fc_weight = np.asarray(state["fc.weight"], np.float32)  # [10, 512]: CAM's class weights
        self._session: onnxruntime.InferenceSession | None = None
        self._building = threading.Lock()

    @classmethod
    def from_file(cls, path: Path, threads: int = 1) -> "ReferenceNetwork":
        """From a (verified) safetensors file: predictor.weights.verified_weights."""
        return cls(read_state(path), threads, path)

    def __getstate__(self) -> dict:
        # ONNX Runtime sessions and locks don't pickle: a worker process (--workers > 1) builds its own.
        return {"path": self.path, "threads": self.threads, "state": self._state}

    def __setstate__(self, pickled: dict) -> None:
        path = pickled["path"]
        self.__init__(read_state(path) if path else pickled["state"], pickled["threads"], path)

    def _built_session(self) -> onnxruntime.InferenceSession:
        with self._building:
            if self._session is None:
                options = onnxruntime.SessionOptions()
                options.intra_op_num_threads = self.threads
                options.inter_op_num_threads = 1
                options.add_session_config_entry("session.intra_op.allow_spinning", "0")
                # Used by :explain (and a gate without recorded classes), not per request: memory goes
                # back after each run rather than staying in an arena sized for the largest batch seen.
                options.enable_cpu_mem_arena = False
                state = self._state if self._state is not None else read_state(self.path)
                self._session = onnxruntime.InferenceSession(resnet18_graph(state), options,
                                                             providers=["CPUExecutionProvider"])
            return self._session

    def run(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """uint8 images [N, 32, 32, 3] -> (fp32 logits [N, 10], layer4 feature maps [N, 512, 4, 4])."""
        session = self._session or self._built_session()
        logits, features = session.run([LOGITS, FEATURES], {INPUT: np.ascontiguousarray(images, np.uint8)})
        return logits, features

    def logits(self, images: np.ndarray) -> np.ndarray:
        return self.run(images)[0]
