"""Decode and validate one uploaded image into the 32x32 RGB array the network expects.

Every rule a client can break is checked here, before any pixel is decoded where possible:
format by magic bytes (415), empty/corrupt/truncated data (400), oversized dimensions (413).
"""

import contextlib
import io
import re
import warnings

import numpy as np
import simplejpeg
from PIL import Image, ImageOps

from predictor.cifar import IMAGE_SIZE
from predictor.core.errors import ApiError, InvalidRequest, PayloadTooLarge, UnsupportedMediaType

JPEG_MAGIC = b"\xff\xd8\xff"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
DEFAULT_MAX_PIXELS_PER_SIDE = 4096
_WHITE = (255, 255, 255)
# PIL names the buffer it read from ('cannot identify image file <_io.BytesIO object at 0x7f...>'):
# a memory address is no business of the client's.
_OBJECT_REPR = re.compile(r"\s*<[^<>]* at 0x[0-9a-fA-F]+>")


def sniff_format(data: bytes) -> str:
    """'JPEG' or 'PNG' from the leading bytes; anything else is refused with 415."""
    if not data:
        raise InvalidRequest("empty_file", "The uploaded file is empty.")
    if data.startswith(JPEG_MAGIC):
        return "JPEG"
    if data.startswith(PNG_MAGIC):
        return "PNG"
    raise UnsupportedMediaType("unsupported_media_type", "Only JPEG and PNG images are accepted (decided by the file's content).")


# An image this small decodes in tens of microseconds, less than handing it to a decode thread and
# waking the event loop when it is done costs; only the header is read to find out (Image.open), and
# only of a file small enough that reading its header is cheap whatever its markers are.
INLINE_MAX_BYTES = 8 * 1024
INLINE_MAX_PIXELS = 64 * 64


@contextlib.contextmanager
def _refusals(expected: str):
    """PIL's many exceptions for bad data, as the client's error (400, or 413 for a bomb)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            yield
    except ApiError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise PayloadTooLarge("image_too_large", f"Image refused as a decompression bomb: {exc}") from None
    except Exception as exc:  # PIL raises many types for corrupt data; all mean "bad image".
        reason = _OBJECT_REPR.sub("", str(exc)).strip()
        raise InvalidRequest("invalid_image", f"The {expected} data is corrupt or truncated: {reason}") from None


def open_image(data: bytes, max_side: int = DEFAULT_MAX_PIXELS_PER_SIDE) -> Image.Image:
    """The image's header read and its dimensions checked; no pixel decoded yet."""
    expected = sniff_format(data)
    with _refusals(expected):
        image = Image.open(io.BytesIO(data), formats=[expected])
        width, height = image.size
        if width < 1 or height < 1:
            raise InvalidRequest("invalid_image", "The image has no pixels.")
        if width > max_side or height > max_side:
            raise PayloadTooLarge(
                "image_too_large",
                f"Image dimensions {width}x{height} exceed the limit of {max_side}x{max_side}.",
            )
    return image


def pixels_of(image: Image.Image) -> np.ndarray:
    """An opened image (open_image) -> uint8 array [32, 32, 3].

    EXIF orientation is applied; grayscale, palette, CMYK and 16-bit images become RGB; alpha is
    composited on white; non-square images are centre-cropped to a square, then resized with
    bilinear (antialiased) resampling.
    """
    with _refusals(image.format):
        if image.format == "JPEG":
            # Let libjpeg decode at a reduced scale: big photos decode several times faster.
            image.draft("RGB", (IMAGE_SIZE * 2, IMAGE_SIZE * 2))
        image.load()
        image = _to_rgb(ImageOps.exif_transpose(image))
    return np.asarray(_square_resize(image), dtype=np.uint8)


def decode_image(data: bytes, max_side: int = DEFAULT_MAX_PIXELS_PER_SIDE) -> np.ndarray:
    """Image file bytes -> uint8 array [32, 32, 3] (native_jpeg_pixels, else open_image then pixels_of)."""
    pixels = native_jpeg_pixels(data, max_side)
    return pixels if pixels is not None else pixels_of(open_image(data, max_side))


# JPEG colour spaces libjpeg turns into RGB exactly as PIL's mode conversion would (CMYK/YCCK: PIL's own
# inversion rules apply, so those take the PIL path).
_NATIVE_COLORSPACES = ("YCbCr", "Gray")
_EXIF = b"Exif\x00\x00"


def native_jpeg_pixels(data: bytes, max_side: int = DEFAULT_MAX_PIXELS_PER_SIDE) -> np.ndarray | None:
    """The pixels of a JPEG already 32x32 (CIFAR's own size, what this model's clients send), decoded
    straight by libjpeg-turbo (simplejpeg: ~8 us against PIL's ~75 us of Python around the same
    library), or None for any other file: another size or format, EXIF (orientation is PIL's to apply),
    CMYK, or data libjpeg so much as warns about (the PIL path then decides, and words the error).
    The same pixels as pixels_of: the same library, integer IDCT and fancy upsampling (tests check)."""
    if not data.startswith(JPEG_MAGIC) or _EXIF in data or max_side < IMAGE_SIZE:
        return None
    try:
        height, width, colorspace, _ = simplejpeg.decode_jpeg_header(data)
        if height != IMAGE_SIZE or width != IMAGE_SIZE or colorspace not in _NATIVE_COLORSPACES:
            return None
        return simplejpeg.decode_jpeg(data, colorspace="RGB")
    except ValueError:
        return None


def is_cheap(image: Image.Image) -> bool:
    """Whether decoding `image` costs less than a hand-off to another thread."""
    width, height = image.size
    return width * height <= INLINE_MAX_PIXELS


def _to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL mode -> RGB, with transparency composited on white and 16-bit scaled to 8-bit."""
    if image.mode == "RGB":
        return image
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        wide = np.asarray(image, dtype=np.uint32 if image.mode == "I" else np.uint16)
        peak = 65535 if image.mode != "I" else max(int(wide.max()), 1)
        image = Image.fromarray((wide.astype(np.float64) * 255.0 / peak).round().astype(np.uint8), "L")
    if image.mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, _WHITE + (255,))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def _square_resize(image: Image.Image) -> Image.Image:
    width, height = image.size
    if (width, height) == (IMAGE_SIZE, IMAGE_SIZE):
        return image
    side = min(width, height)
    left, top = (width - side) // 2, (height - side) // 2
    return image.resize(
        (IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.BILINEAR, box=(left, top, left + side, top + side)
    )
