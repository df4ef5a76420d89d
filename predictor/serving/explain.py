"""Grad-CAM explanations and the KServe v1 `:explain` route that serves them.

Grad-CAM (Selvaraju et al., 2017) on the last residual stage (`layer4`) of the fp32 network, on the
same weights as the served engine (which may run them in int8). On this network, whose head is global
average pooling and one linear layer, Grad-CAM is exactly CAM (Zhou et al., 2016): the class score's
gradient with respect to a layer4 cell is that class's linear weight for the cell's channel over the
map's area, the same for every cell, so the channel weights are the class's linear weights up to a
positive factor that the scaling below removes. No autograd, no torch: the fp32 network on ONNX
Runtime (predictor.engines.reference) gives the logits and layer4's maps. The positive part of the weighted
sum (4x4 here), min-max scaled, upsampled bilinearly to the 32x32 input and scaled to 0..1, is the heat-map.
"""

import asyncio
import base64
import concurrent.futures
import io
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from fastapi import APIRouter, Query, Request
from PIL import Image

from predictor import payloads
from predictor.cifar import CLASSES, IMAGE_SIZE
from predictor.core import metrics
from predictor.core.errors import InvalidRequest, NotFound, Overloaded, Unavailable
from predictor.engines.reference import ReferenceNetwork
from predictor.model import Cifar10Classifier

OVERLAY_SCALE = 4  # the 32x32 overlay is upscaled 4x (128x128) so a person can see it
OVERLAY_ALPHA = 0.5  # share of the heat-map's colour in the overlay
LAYER = "layer4"


@dataclass
class Explanation:
    """One image's Grad-CAM: the class explained, the fp32 network's calibrated probabilities, the heat-map."""

    target: int
    probabilities: np.ndarray  # [10], temperature-scaled softmax of the fp32 logits
    heatmap: np.ndarray  # [32, 32] float32 in 0..1

    def body(self, image: np.ndarray) -> dict:
        """The response object for this image (the input `image` is drawn under the heat-map)."""
        best = int(self.probabilities.argmax())
        return {
            "predicted_class": CLASSES[best],
            "confidence": round(float(self.probabilities[best]), 6),
            "target_class": CLASSES[self.target],
            "target_probability": round(float(self.probabilities[self.target]), 6),
            "heatmap": np.round(self.heatmap.astype(np.float64), 4).tolist(),
            "overlay_png": base64.b64encode(overlay_png(image, self.heatmap)).decode("ascii"),
        }


def bilinear_matrix(size_in: int, size_out: int) -> np.ndarray:
    """[size_out, size_in] weights of bilinear upsampling with half-pixel centres, edges clamped (torch's
    `interpolate(mode="bilinear", align_corners=False)`): `m @ x @ m.T` upsamples a square map `x`."""
    source = np.clip((np.arange(size_out) + 0.5) * size_in / size_out - 0.5, 0, None)
    low = np.minimum(np.floor(source).astype(int), size_in - 1)
    high = np.minimum(low + 1, size_in - 1)
    matrix = np.zeros((size_out, size_in))
    np.add.at(matrix, (np.arange(size_out), low), 1 - (source - low))
    np.add.at(matrix, (np.arange(size_out), high), source - low)
    return matrix


def grad_cam(reference: ReferenceNetwork, images: np.ndarray, target: int | None,
             temperature: float = 1.0) -> list[Explanation]:
    """Grad-CAM of uint8 images [N, 32, 32, 3] for `target` (None: each image's predicted class)."""
    logits, features = reference.run(images)
    targets = logits.argmax(1) if target is None else np.full(len(images), target)
    weights = reference.fc_weight[targets].astype(np.float64)  # [N, 512]
    cam = np.maximum(np.einsum("nc,nchw->nhw", weights, features.astype(np.float64)), 0)
    # Min-max scaled, as the common Grad-CAM implementations do: the 4x4 map's least relevant cell is
    # 0, so the picture shows contrast rather than a uniform wash over the image.
    cam -= cam.min(axis=(1, 2), keepdims=True)
    upsample = bilinear_matrix(cam.shape[-1], IMAGE_SIZE)
    cam = upsample @ cam @ upsample.T
    peak = cam.max(axis=(1, 2), keepdims=True)
    cam = np.divide(cam, peak, out=np.zeros_like(cam), where=peak > 0).astype(np.float32)
    scaled = logits.astype(np.float64) / temperature
    probabilities = np.exp(scaled - scaled.max(1, keepdims=True))
    probabilities = (probabilities / probabilities.sum(1, keepdims=True)).astype(np.float32)
    return [Explanation(int(t), p, c) for t, p, c in zip(targets, probabilities, cam)]


def _jet(values: np.ndarray) -> np.ndarray:
    """0..1 -> RGB uint8 on the usual blue-cyan-yellow-red scale (no plotting library at serving time)."""
    v = values[..., None] * 4.0
    rgb = np.clip(1.5 - np.abs(v - np.array([3.0, 2.0, 1.0])), 0.0, 1.0)
    return (rgb * 255).astype(np.uint8)


def overlay_png(image: np.ndarray, heatmap: np.ndarray, scale: int = OVERLAY_SCALE) -> bytes:
    """PNG of the heat-map blended over the 32x32 input, upscaled `scale` times.

    The input is enlarged pixel for pixel (what the network saw); the heat-map smoothly.
    """
    side = IMAGE_SIZE * scale
    base = np.asarray(Image.fromarray(image).resize((side, side), Image.Resampling.NEAREST), np.float32)
    heat = Image.fromarray(heatmap.astype(np.float32), mode="F").resize((side, side), Image.Resampling.BILINEAR)
    colour = _jet(np.clip(np.asarray(heat), 0.0, 1.0)).astype(np.float32)
    blended = ((1 - OVERLAY_ALPHA) * base + OVERLAY_ALPHA * colour).round().astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(blended).save(buffer, "PNG", optimize=True)
    return buffer.getvalue()


def parse_target(value: str | None) -> int | None:
    """?target_class= as a class name or index -> the index; None when absent; 400 when not a class."""
    if value is None or value == "":
        return None
    text = value.strip()
    if text.lower() in CLASSES:
        return CLASSES.index(text.lower())
    # isascii: str.isdigit also accepts superscripts and other digits int() refuses ('²').
    if text.isascii() and text.isdigit() and int(text) < len(CLASSES):
        return int(text)
    raise InvalidRequest("invalid_target_class",
                   f"target_class {value!r} is not a class: use a name ({', '.join(CLASSES)}) or an index 0..{len(CLASSES) - 1}.")


class ExplainPool:
    """The threads explanations run in, and their concurrency limit (503 beyond it).

    A call counts until its computation ends, not until its client goes away: a call cut off by
    the deadline still holds its slot while its thread finishes, so the limit bounds the CPU work.
    """

    def __init__(self, limit: int):
        self.limit = limit
        self.running = 0
        self._executor: concurrent.futures.ThreadPoolExecutor | None = None

    async def run(self, work: Callable[[], list[dict]]) -> list[dict]:
        if self.running >= self.limit:
            metrics.SHED.inc()
            raise Overloaded(f"{self.running} explanations are already running (limit {self.limit})")
        if self._executor is None:  # made on first use, in the process that serves (workers unpickle the model)
            self._executor = concurrent.futures.ThreadPoolExecutor(self.limit, thread_name_prefix="explain")
        loop = asyncio.get_running_loop()
        self.running += 1
        future = self._executor.submit(work)
        # The callback runs in the explaining thread; the count belongs to the event loop's thread.
        future.add_done_callback(lambda _: loop.call_soon_threadsafe(self._release))
        return await asyncio.wrap_future(future)

    def _release(self) -> None:
        self.running -= 1


async def _request_payload(request: Request) -> dict | bytes:
    """The body as `:predict` takes it: a JSON object for a JSON content type, else the raw bytes."""
    body = await request.body()
    if "json" in request.headers.get("content-type", "").lower():
        return payloads.json_object(body)
    return body


def build_explain_router(model: Cifar10Classifier) -> APIRouter:
    """`POST /v1/models/{name}:explain` for `model`, explained by `model.reference` (its fp32 network)."""
    router = APIRouter()
    pool = ExplainPool(model.settings.max_explain_in_flight)

    @router.post("/v1/models/{model_name}:explain", tags=["V1"], summary="Grad-CAM explanation of each image")
    async def explain(model_name: str, request: Request,
                      target_class: str | None = Query(None, description="class to explain (name or 0..9); "
                                                                          "default: each image's predicted class")):
        """The `:predict` request shapes -> {"explanations": [{predicted_class, confidence, heatmap, overlay_png}]}.

        Computed by the fp32 network on the served weights; the served engine may run them in another
        precision (`served_precision`), so its confidence can differ slightly from `:predict`'s.
        """
        if model_name != model.name:
            raise NotFound("model_not_found", f"Model with name {model_name} does not exist.")
        if not model.ready:
            raise Unavailable("model_not_ready", "The model is not loaded yet.")
        target = parse_target(target_class)
        prepared = await model.preprocess(await _request_payload(request))
        images = np.stack(prepared.slots)
        # Grad-CAM and the PNGs off the event loop, outside the prediction batcher.
        explanations = await pool.run(lambda: [e.body(image) for e, image in zip(
            grad_cam(model.reference, images, target, model.dataplane.temperature), images)])
        return {
            "model_name": model.name,
            "model_version": model.version,
            "method": f"grad-cam on {LAYER}",
            "explained_precision": "fp32",
            "served_precision": model.dataplane.engine.precision,
            "explanations": explanations,
        }

    return router
