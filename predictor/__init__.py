"""KServe predictor serving a CIFAR-10 ResNet18 at /classify/image."""

__version__ = "1.0.0"
