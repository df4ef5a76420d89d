"""What the served network is, without the network: its classes, input size and input normalisation.

Torch-free, so the serving path (ONNX Runtime by default) can import it without loading torch.
"""

CLASSES: tuple[str, ...] = (
    "airplane", "automobile", "bird", "cat", "deer",
    "dog", "frog", "horse", "ship", "truck",
)
IMAGE_SIZE = 32
ARCHITECTURE = "torchvision resnet18, CIFAR stem (3x3 stride-1 conv1, no max-pool), 10 classes"

# Per-channel statistics of the CIFAR-10 training set: network input = (pixel / 255 - MEAN) / STD.
MEAN = (0.4914, 0.4822, 0.4465)
STD = (0.2470, 0.2435, 0.2616)
