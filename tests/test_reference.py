"""The fp32 reference network built for ONNX Runtime without torch (predictor.engines.reference) against the torch
network it stands in for, and Grad-CAM computed from it against Grad-CAM by autograd on the torch network."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from predictor.core.imaging import decode_image
from predictor.engines.reference import ReferenceNetwork, check_state
from predictor.engines.selection import fp32_classes
from predictor.network import normalize
from predictor.serving.explain import grad_cam
from predictor.weights import PACKAGED_DIR, WeightsError, calibration_images, load_model, read_state, verified_weights

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def networks() -> tuple[ReferenceNetwork, torch.nn.Module]:
    path, _ = verified_weights(PACKAGED_DIR)
    return ReferenceNetwork(read_state(path), threads=2), load_model(PACKAGED_DIR)[0]


@pytest.fixture(scope="module")
def images(holdout) -> np.ndarray:
    return np.stack([decode_image(data) for data, _ in holdout[::4]])  # 500 held-out images


def torch_layer4(network: torch.nn.Module, images: np.ndarray) -> torch.Tensor:
    x = normalize(torch.from_numpy(images.copy()))
    x = network.maxpool(network.relu(network.bn1(network.conv1(x))))
    return network.layer4(network.layer3(network.layer2(network.layer1(x))))


def autograd_grad_cam(network: torch.nn.Module, images: np.ndarray, target: int | None) -> np.ndarray:
    """Grad-CAM as Selvaraju et al. define it, by differentiating the class score through the torch network."""
    features = torch_layer4(network, images).detach().requires_grad_(True)
    logits = network.fc(torch.flatten(network.avgpool(features), 1))
    targets = logits.argmax(1) if target is None else torch.full((len(images),), target)
    (gradients,) = torch.autograd.grad(logits.gather(1, targets[:, None]).sum(), features)
    with torch.no_grad():
        cam = F.relu((gradients.mean(dim=(2, 3), keepdim=True) * features).sum(1, keepdim=True))
        cam = cam - cam.amin(dim=(2, 3), keepdim=True)
        cam = F.interpolate(cam, size=(32, 32), mode="bilinear", align_corners=False)[:, 0]
        peak = cam.amax(dim=(1, 2), keepdim=True)
        return torch.where(peak > 0, cam / peak.clamp_min(1e-12), torch.zeros_like(cam)).numpy()


def test_the_reference_computes_what_the_torch_network_computes(networks, images):
    reference, network = networks
    logits, features = reference.run(images)
    with torch.no_grad():
        expected_features = torch_layer4(network, images)
        expected_logits = network(normalize(torch.from_numpy(images.copy()))).numpy()
    assert np.abs(logits - expected_logits).max() < 1e-3
    assert np.abs(features - expected_features.numpy()).max() < 1e-3
    assert (logits.argmax(1) == expected_logits.argmax(1)).all()


@pytest.mark.parametrize("target", [None, 3])
def test_grad_cam_without_autograd_is_grad_cam(networks, images, target):
    reference, network = networks
    heatmaps = np.stack([e.heatmap for e in grad_cam(reference, images, target)])
    expected = autograd_grad_cam(network, images, target)
    assert heatmaps.shape == expected.shape == (len(images), 32, 32)
    assert np.abs(heatmaps - expected).max() < 1e-3


def test_weights_for_another_network_are_refused(networks):
    path, _ = verified_weights(PACKAGED_DIR)
    state = read_state(path)
    for broken in ({k: v for k, v in state.items() if k != "layer3.1.bn2.running_var"},
                   state | {"fc.weight": np.zeros((100, 512), np.float32), "fc.bias": np.zeros(100, np.float32)},
                   state | {"layer5.0.conv1.weight": np.zeros((1, 1, 1, 1), np.float32)}):
        with pytest.raises(WeightsError, match="do not fit the ResNet18 CIFAR-10 network"):
            check_state(broken, str(path))


def test_the_cards_recorded_fp32_classes_are_the_fp32_networks(networks):
    """The int8 gate at start-up compares with these instead of running the fp32 network: they must be
    what the shipped fp32 network answers on the shipped calibration images."""
    reference, _ = networks
    _, card = verified_weights(PACKAGED_DIR)
    calibration = calibration_images(PACKAGED_DIR, card)
    assert fp32_classes(card, reference, calibration).tolist() == reference.logits(calibration).argmax(1).tolist()
    assert len(card["int8_calibration"]["fp32_classes"]) == len(calibration)
