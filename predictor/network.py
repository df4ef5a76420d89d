"""The one network definition shared by training, evaluation and serving."""

import torch
from torch import nn
from torchvision.models import resnet18

CLASSES: tuple[str, ...] = (
    "airplane", "automobile", "bird", "cat", "deer",
    "dog", "frog", "horse", "ship", "truck",
)
IMAGE_SIZE = 32
ARCHITECTURE = "torchvision resnet18, CIFAR stem (3x3 stride-1 conv1, no max-pool), 10 classes"

# Per-channel statistics of the CIFAR-10 training set, applied by `normalize`.
_MEAN = torch.tensor([0.4914, 0.4822, 0.4465]).view(1, 3, 1, 1)
_STD = torch.tensor([0.2470, 0.2435, 0.2616]).view(1, 3, 1, 1)


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
