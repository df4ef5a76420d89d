"""Training-time augmentation of whole batches with tensor ops on the batch's own device.

On CUDA the decoded training set lives on the GPU (moved there once, uint8) and every random draw
comes from a generator on the GPU, so nothing here waits for the GPU or touches the CPU's cores:
the input pipeline costs a few dozen small kernels per batch.

- `crop_flip`: a random 32x32 crop of the 4-px reflect-padded image and a random horizontal flip;
- `trivial_augment`: TrivialAugment Wide (Müller & Hutter, ICCV 2021; torchvision's
  `TrivialAugmentWide`): each image gets one operation drawn uniformly from 14, at a magnitude
  drawn uniformly from 31 bins, with a random sign where the operation has one. Each operation
  follows torchvision's tensor implementation (nearest-neighbour geometry, the same magnitudes, the
  same uint8 rounding), but per image and for the whole batch at once;
- `cutout`: a square zeroed (the normalised mean) at a random place (DeVries & Taylor, 2017).
"""

import math

import torch
import torch.nn.functional as F

from predictor.cifar import MEAN

NUM_MAGNITUDE_BINS = 31
# TrivialAugment Wide's operations, in torchvision's order. Geometric ones first (one affine map each).
OPS = ("identity", "shear_x", "shear_y", "translate_x", "translate_y", "rotate",
       "brightness", "color", "contrast", "sharpness", "posterize", "solarize", "autocontrast", "equalize")
SIGNED = {"shear_x", "shear_y", "translate_x", "translate_y", "rotate", "brightness", "color", "contrast", "sharpness"}
# Where geometry moves pixels in from outside the image: the training set's mean pixel (0 once normalised, like Cutout).
FILL = tuple(round(m * 255) for m in MEAN)


def magnitudes(num_bins: int = NUM_MAGNITUDE_BINS) -> torch.Tensor:
    """[len(OPS), num_bins] magnitude of each operation at each bin (torchvision's TrivialAugmentWide space)."""
    spans = {
        "shear_x": torch.linspace(0.0, 0.99, num_bins), "shear_y": torch.linspace(0.0, 0.99, num_bins),
        "translate_x": torch.linspace(0.0, 32.0, num_bins), "translate_y": torch.linspace(0.0, 32.0, num_bins),
        "rotate": torch.linspace(0.0, 135.0, num_bins),
        "brightness": torch.linspace(0.0, 0.99, num_bins), "color": torch.linspace(0.0, 0.99, num_bins),
        "contrast": torch.linspace(0.0, 0.99, num_bins), "sharpness": torch.linspace(0.0, 0.99, num_bins),
        "posterize": (8 - (torch.arange(num_bins) / ((num_bins - 1) / 6)).round()).float(),
        "solarize": torch.linspace(255.0, 0.0, num_bins),
    }
    return torch.stack([spans.get(op, torch.zeros(num_bins)) for op in OPS])


_CONSTANTS: dict[torch.device, dict[str, torch.Tensor]] = {}


def _constants(device: torch.device) -> dict[str, torch.Tensor]:
    """The operations' tables on `device`, made once: a tensor made from Python values on a GPU is a
    host-to-device copy, which would make every batch wait for the GPU."""
    if device not in _CONSTANTS:
        _CONSTANTS[device] = {
            "magnitudes": magnitudes().to(device),
            "signed": torch.tensor([name in SIGNED for name in OPS]).to(device),
            "fill": torch.tensor(FILL, dtype=torch.float32).view(1, len(FILL), 1).to(device),
            "last_row": torch.tensor([[0.0, 0.0, 1.0]]).to(device),
        }
    return _CONSTANTS[device]


def crop_flip(batch: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Random 32x32 crop of the 4-px reflect-padded image and a random horizontal flip, per image.

    uint8 NHWC in and out. The random draws come from `generator`, which lives on the batch's device,
    and the flip is a `where`, not boolean indexing: on CUDA nothing here waits for the GPU.
    """
    n, h, w, _ = batch.shape
    device = batch.device
    padded = F.pad(batch.permute(0, 3, 1, 2).float(), (4, 4, 4, 4), mode="reflect")
    dy = torch.randint(0, 9, (n,), generator=generator, device=device)
    dx = torch.randint(0, 9, (n,), generator=generator, device=device)
    flip = torch.rand(n, generator=generator, device=device) < 0.5
    rows = (dy[:, None] + torch.arange(h, device=device)[None, :])[:, None, :, None].expand(n, 3, h, w + 8)
    out = padded.gather(2, rows)
    cols = (dx[:, None] + torch.arange(w, device=device)[None, :])[:, None, None, :].expand(n, 3, h, w)
    out = out.gather(3, cols)
    out = torch.where(flip[:, None, None, None], out.flip(3), out)
    return out.permute(0, 2, 3, 1).to(torch.uint8)


def cutout(batch: torch.Tensor, size: int, generator: torch.Generator) -> torch.Tensor:
    """Zero (the normalised mean) a size x size square centred at a random pixel of each NCHW image.

    The square may hang over the border, as in DeVries & Taylor (2017), so some images lose less.
    """
    if size <= 0:
        return batch
    n, _, h, w = batch.shape
    device = batch.device
    cy = torch.randint(0, h, (n, 1, 1), generator=generator, device=device)
    cx = torch.randint(0, w, (n, 1, 1), generator=generator, device=device)
    ys = torch.arange(h, device=device)[None, :, None] - (cy - size // 2)
    xs = torch.arange(w, device=device)[None, None, :] - (cx - size // 2)
    inside = (ys >= 0) & (ys < size) & (xs >= 0) & (xs < size)
    return batch.masked_fill(inside[:, None], 0.0)


def trivial_augment(batch: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """TrivialAugment Wide on a uint8 NHWC batch: one random operation per image, uint8 NHWC out.

    Every operation is computed for the whole batch and each image keeps its own one's result (a
    `where` per operation, no boolean indexing): a few dozen kernels, none waiting for the GPU.
    """
    n = batch.shape[0]
    device = batch.device
    op = torch.randint(0, len(OPS), (n,), generator=generator, device=device)
    level = torch.randint(0, NUM_MAGNITUDE_BINS, (n,), generator=generator, device=device)
    negative = torch.rand(n, generator=generator, device=device) < 0.5
    tables = _constants(device)
    signed = tables["signed"][op]
    magnitude = tables["magnitudes"][op, level]
    magnitude = torch.where(signed & negative, -magnitude, magnitude)
    return apply_ops(batch, op, magnitude)


def apply_ops(batch: torch.Tensor, op: torch.Tensor, magnitude: torch.Tensor) -> torch.Tensor:
    """Operation OPS[op[i]] at magnitude[i] on image i of a uint8 NHWC batch (uint8 NHWC out)."""
    x = batch.permute(0, 3, 1, 2).float()
    m = magnitude.view(-1, 1, 1, 1)
    out = affine(x, affine_matrices(op, magnitude, x.shape[-2], x.shape[-1]))  # identity where op isn't geometric
    photometric = {
        "brightness": lambda: _blend(x, torch.zeros_like(x), 1.0 + m),
        "color": lambda: _blend(x, _grayscale(x), 1.0 + m),
        "contrast": lambda: _blend(x, _grayscale(x).mean(dim=(-3, -2, -1), keepdim=True), 1.0 + m),
        "sharpness": lambda: _blend(x, _smoothed(x), 1.0 + m),
        "posterize": lambda: _posterize(x, m),
        "solarize": lambda: torch.where(x >= m, 255.0 - x, x),
        "autocontrast": lambda: _autocontrast(x),
        "equalize": lambda: _equalize(x),
    }
    for name, compute in photometric.items():
        out = torch.where((op == OPS.index(name)).view(-1, 1, 1, 1), compute(), out)
    # torchvision's uint8 ops end with a truncating cast: so does this
    return out.clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1)


def affine_matrices(op: torch.Tensor, magnitude: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """[N, 2, 3]: for each image, output pixel (x, y) -> where it is read in the input, in pixel-edge
    coordinates (pixel (i, j) covers [j, j+1) x [i, i+1)); the identity for non-geometric operations.

    As torchvision's inverse affine matrices: shears about the top-left corner (its `center=[0, 0]`),
    translations by whole pixels (`int(magnitude)`), rotations about the image centre.
    """
    n = op.shape[0]
    one, zero = torch.ones_like(magnitude), torch.zeros_like(magnitude)
    is_ = {name: op == OPS.index(name) for name in OPS[:6]}
    shear_x = torch.where(is_["shear_x"], magnitude, zero)
    shear_y = torch.where(is_["shear_y"], magnitude, zero)
    shift_x = torch.where(is_["translate_x"], torch.trunc(magnitude), zero)
    shift_y = torch.where(is_["translate_y"], torch.trunc(magnitude), zero)
    theta = torch.where(is_["rotate"], magnitude * (math.pi / 180.0), zero)
    cos, sin = torch.cos(theta), torch.sin(theta)
    # rotation about the centre (cx, cy): in = R (out - c) + c
    cx, cy = w / 2.0, h / 2.0
    rotation = torch.stack([
        torch.stack([cos, -sin, cx - cos * cx + sin * cy], 1),
        torch.stack([sin, cos, cy - sin * cx - cos * cy], 1),
    ], 1)
    shear_shift = torch.stack([
        torch.stack([one, shear_x, -shift_x], 1),
        torch.stack([shear_y, one, -shift_y], 1),
    ], 1)
    # Only one of the two is not the identity for any image: their product is whichever it is.
    full = torch.cat([rotation, _constants(op.device)["last_row"].expand(n, 1, 3)], 1)
    return shear_shift @ full


def affine(x: torch.Tensor, matrices: torch.Tensor) -> torch.Tensor:
    """Nearest-neighbour resampling of NCHW images: output pixel centre (j + .5, i + .5) reads input
    pixel floor(M @ (j + .5, i + .5, 1)); pixels read from outside the image get FILL."""
    n, c, h, w = x.shape
    device = x.device
    ys, xs = torch.meshgrid(torch.arange(h, device=device, dtype=torch.float32) + 0.5,
                            torch.arange(w, device=device, dtype=torch.float32) + 0.5, indexing="ij")
    points = torch.stack([xs.flatten(), ys.flatten(), torch.ones(h * w, device=device)])  # [3, HW]
    source = torch.floor(matrices @ points).long()  # [N, 2, HW]
    sx, sy = source[:, 0], source[:, 1]
    inside = (sx >= 0) & (sx < w) & (sy >= 0) & (sy < h)
    index = (sy.clamp(0, h - 1) * w + sx.clamp(0, w - 1))[:, None].expand(n, c, h * w)
    out = x.flatten(2).gather(2, index)
    return torch.where(inside[:, None], out, _constants(device)["fill"]).view(n, c, h, w)


def _blend(image: torch.Tensor, other: torch.Tensor, ratio: torch.Tensor) -> torch.Tensor:
    return (ratio * image + (1.0 - ratio) * other).clamp(0, 255).trunc()


def _grayscale(x: torch.Tensor) -> torch.Tensor:
    """torchvision's rgb_to_grayscale of uint8 images (truncated to uint8), [N, 1, H, W]."""
    r, g, b = x.unbind(1)
    return (0.2989 * r + 0.587 * g + 0.114 * b).trunc().unsqueeze(1)


def _smoothed(x: torch.Tensor) -> torch.Tensor:
    """torchvision's sharpness degenerate: 3x3 smoothing (centre weight 5/13) inside, rounded; borders kept."""
    kernel = torch.ones(3, 3, device=x.device)
    kernel[1, 1] = 5.0
    kernel = (kernel / kernel.sum()).expand(x.shape[1], 1, 3, 3)
    inner = torch.round(F.conv2d(x, kernel, groups=x.shape[1]))
    return torch.cat([x[:, :, :1], torch.cat([x[:, :, 1:-1, :1], inner, x[:, :, 1:-1, -1:]], 3), x[:, :, -1:]], 2)


def _posterize(x: torch.Tensor, bits: torch.Tensor) -> torch.Tensor:
    """Keep the top `bits` bits of each uint8 value (x & -2**(8 - bits))."""
    step = torch.pow(2.0, 8.0 - bits)
    return torch.floor(x / step) * step


def _autocontrast(x: torch.Tensor) -> torch.Tensor:
    """Stretch each image's channel to 0..255 (unchanged where the channel is flat)."""
    low = x.amin(dim=(-2, -1), keepdim=True)
    high = x.amax(dim=(-2, -1), keepdim=True)
    flat = high == low
    scale = torch.where(flat, torch.ones_like(high), 255.0 / (high - low).clamp(min=1.0))
    low = torch.where(flat, torch.zeros_like(low), low)
    return ((x - low) * scale).clamp(0, 255).trunc()


def _equalize(x: torch.Tensor) -> torch.Tensor:
    """Histogram equalisation of each image's channel, PIL's algorithm as torchvision implements it."""
    n, c, h, w = x.shape
    values = x.long().flatten(2)  # [N, C, HW], 0..255
    hist = torch.zeros(n, c, 256, dtype=torch.long, device=x.device)
    hist.scatter_add_(2, values, torch.ones_like(values))
    # step = (pixels not in the last non-empty bin) // 255
    last = torch.where(hist > 0, torch.arange(256, device=x.device), 0).amax(2, keepdim=True)
    step = (h * w - hist.gather(2, last)) // 255  # [N, C, 1]
    safe = step.clamp(min=1)
    lut = (hist.cumsum(2) + safe // 2) // safe
    lut = F.pad(lut, (1, 0))[:, :, :-1].clamp(0, 255)
    out = lut.gather(2, values).float().view(n, c, h, w)
    return torch.where((step == 0).view(n, c, 1, 1), x, out)
