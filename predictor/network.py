"""The network as torch builds it, for training, evaluation and the torch engine (serving on ONNX
Runtime builds the same network from the weights without torch: predictor.engines.reference)."""

import torch
from torch import nn
from torchvision.models import resnet18

from predictor.cifar import CLASSES, MEAN, STD

_MEAN = torch.tensor(MEAN).view(1, 3, 1, 1)
_STD = torch.tensor(STD).view(1, 3, 1, 1)


def build_resnet18() -> nn.Module:
    """torchvision's ResNet18 with the CIFAR stem: 32x32 inputs keep their resolution."""
    model = resnet18(num_classes=len(CLASSES))
    model.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
    model.maxpool = nn.Identity()
    return model


def normalize(images: torch.Tensor) -> torch.Tensor:
    """uint8 NHWC images -> normalised float32 NCHW (channels_last memory) network input."""
    x = images.permute(0, 3, 1, 2).float().div_(255.0)
    x = (x - _MEAN.to(x.device)) / _STD.to(x.device)
    return x.contiguous(memory_format=torch.channels_last)
