"""The forward pass: uint8 images in, fp32 logits out, on the best device available."""

import logging
import threading

import numpy as np
import torch

from .network import normalize

log = logging.getLogger(__name__)


class InferenceEngine:
    """Owns the network on its device. `logits` is blocking: call it from the batcher's worker thread."""

    def __init__(self, model: torch.nn.Module, device: str = "auto"):
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(device)
        # fp16 on CUDA halves memory traffic; CIFAR ResNet18 keeps its accuracy in fp16.
        self.dtype = torch.float16 if self.device.type == "cuda" else torch.float32
        self.model = model.eval().to(self.device, self.dtype).to(memory_format=torch.channels_last)
        self._lock = threading.Lock()  # one forward pass at a time, whatever thread calls

    @property
    def description(self) -> str:
        return f"{self.device.type} {str(self.dtype).removeprefix('torch.')}"

    @torch.inference_mode()
    def logits(self, images: np.ndarray) -> np.ndarray:
        """[N, 32, 32, 3] uint8 -> [N, 10] float32 logits."""
        batch = torch.from_numpy(images)
        if self.device.type == "cuda":
            batch = batch.pin_memory().to(self.device, non_blocking=True)
        with self._lock:
            out = self.model(normalize(batch).to(self.dtype))
            return out.float().cpu().numpy()

    def __getstate__(self) -> dict:
        # KServe pickles the model into each worker process when --workers > 1; locks don't pickle.
        state = self.__dict__.copy()
        del state["_lock"]
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()
