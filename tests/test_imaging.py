"""Decoding and normalisation rules, on real encoded files generated with PIL."""

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from predictor.core.errors import ApiError
from predictor.core.imaging import decode_image, native_jpeg_pixels, open_image, pixels_of, sniff_format
from predictor.serving.http_errors import http_status

from .conftest import encode


def solid(mode: str, size, color) -> Image.Image:
    return Image.new(mode, size, color)


def png_header_only(width: int, height: int) -> bytes:
    """A tiny PNG whose IHDR declares huge dimensions (a decompression-bomb shape)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def test_cifar_jpeg_decodes_to_32x32_rgb(cifar_jpegs):
    out = decode_image(next(iter(cifar_jpegs.values())))
    assert out.shape == (32, 32, 3) and out.dtype == np.uint8
    assert out.std() > 10  # real picture content, not a blank


@pytest.mark.parametrize("data, status", [
    (b"", 400),
    (b"GIF89a" + b"\0" * 100, 415),
    (b"BM" + b"\0" * 100, 415),
    (b"hello, I am text named cat.jpg", 415),
    (b"%PDF-1.4\n", 415),
])
def test_format_is_decided_by_magic_bytes(data, status):
    with pytest.raises(ApiError) as err:
        decode_image(data)
    assert http_status(err.value) == status


def test_gif_content_refused_even_though_pil_reads_it():
    with pytest.raises(ApiError) as err:
        decode_image(encode(solid("RGB", (32, 32), "red"), "GIF"))
    assert http_status(err.value) == 415 and err.value.code == "unsupported_media_type"


def test_truncated_jpeg_is_400(cifar_jpegs):
    data = next(iter(cifar_jpegs.values()))
    with pytest.raises(ApiError) as err:
        decode_image(data[: len(data) // 2])
    assert http_status(err.value) == 400 and err.value.code == "invalid_image"


def test_garbage_after_magic_is_400():
    with pytest.raises(ApiError) as err:
        decode_image(b"\x89PNG\r\n\x1a\n" + b"\x00garbage" * 20)
    assert http_status(err.value) == 400


def test_huge_declared_dimensions_refused_before_decoding():
    for width, height in ((100_000, 100_000), (5000, 10)):
        bomb = png_header_only(width, height)
        assert len(bomb) < 200
        with pytest.raises(ApiError) as err:
            decode_image(bomb)
        assert http_status(err.value) == 413 and err.value.code == "image_too_large"
    assert "5000x10" in err.value.message


def test_dimension_limit_is_configurable():
    data = encode(solid("RGB", (300, 200), "blue"))
    assert decode_image(data, max_side=300).shape == (32, 32, 3)
    with pytest.raises(ApiError):
        decode_image(data, max_side=299)


def test_rgba_is_composited_on_white():
    image = Image.new("RGBA", (32, 32), (255, 0, 0, 0))  # fully transparent red
    image.putpixel((0, 0), (255, 0, 0, 255))
    out = decode_image(encode(image))
    assert tuple(out[31, 31]) == (255, 255, 255)
    assert tuple(out[0, 0]) == (255, 0, 0)


def test_la_and_palette_transparency_on_white():
    la = Image.new("LA", (32, 32), (0, 0))
    assert tuple(decode_image(encode(la))[5, 5]) == (255, 255, 255)
    palette = Image.new("P", (32, 32), 0)
    palette.putpalette([0, 0, 0] * 256)
    assert tuple(decode_image(encode(palette, transparency=0))[5, 5]) == (255, 255, 255)


def test_grayscale_palette_cmyk_become_rgb():
    gray = decode_image(encode(solid("L", (32, 32), 128)))
    assert gray.shape == (32, 32, 3) and np.all(gray == 128)
    palette = solid("RGB", (32, 32), (10, 200, 30)).convert("P", palette=Image.Palette.ADAPTIVE)
    assert np.abs(decode_image(encode(palette)).astype(int) - [10, 200, 30]).max() <= 8
    cmyk = decode_image(encode(solid("CMYK", (32, 32), (0, 255, 255, 0)), "JPEG", quality=95))
    assert cmyk[..., 0].mean() > 200 and cmyk[..., 1].mean() < 60  # CMYK (0,255,255,0) is red


def test_16_bit_png_scaled_to_8_bit():
    wide = Image.fromarray(np.full((32, 32), 65535, dtype=np.uint16))
    assert wide.mode.startswith("I;16")
    assert np.all(decode_image(encode(wide)) == 255)


def test_exif_orientation_is_applied():
    # Left half red, right half blue, stored with "rotate 90 CW to display" (orientation 6).
    image = Image.new("RGB", (64, 32), "blue")
    image.paste((255, 0, 0), (0, 0, 32, 32))
    exif = Image.Exif()
    exif[0x0112] = 6
    out = decode_image(encode(image, "JPEG", exif=exif.tobytes(), quality=95))
    # Displayed: 32 wide, 64 tall, red on top; the centre crop is the middle of that.
    upright = decode_image(encode(image.transpose(Image.Transpose.ROTATE_270), "JPEG", quality=95))
    assert np.abs(out.astype(int) - upright.astype(int)).max() <= 12


def test_non_square_is_centre_cropped():
    image = Image.new("RGB", (96, 32), "black")
    image.paste((0, 255, 0), (32, 0, 64, 32))  # the centre square is green
    out = decode_image(encode(image))
    assert out[..., 1].min() > 200 and out[..., 0].max() < 50


def test_large_jpeg_downscaled(cifar_jpegs):
    big = Image.open(io.BytesIO(next(iter(cifar_jpegs.values())))).resize((2048, 2048))
    assert decode_image(encode(big, "JPEG")).shape == (32, 32, 3)


def test_sniff_format():
    assert sniff_format(b"\xff\xd8\xff\xe0rest") == "JPEG"
    assert sniff_format(b"\x89PNG\r\n\x1a\nrest") == "PNG"


def _jpeg_variants(cifar_jpegs) -> list[bytes]:
    """32x32 JPEGs as clients make them: the shipped CIFAR files, and re-encodings of them at every
    quality band, each chroma subsampling, progressive, optimized, grayscale."""
    variants = list(cifar_jpegs.values())
    for i, data in enumerate(list(cifar_jpegs.values())[:6]):
        picture = Image.open(io.BytesIO(data)).convert("RGB")
        for quality in (5, 50, 75, 95, 100):
            variants.append(encode(picture, "JPEG", quality=quality, subsampling=i % 3))
        variants.append(encode(picture, "JPEG", progressive=True, optimize=True))
        variants.append(encode(picture.convert("L"), "JPEG"))
    return variants


def test_native_jpeg_path_gives_pils_pixels(cifar_jpegs):
    # The clients' common file decoded without PIL must be exactly what the PIL path gives it.
    for data in _jpeg_variants(cifar_jpegs):
        native = native_jpeg_pixels(data)
        assert native is not None
        assert native.shape == (32, 32, 3) and native.dtype == np.uint8
        assert np.array_equal(native, pixels_of(open_image(data)))


def test_native_jpeg_path_leaves_the_rest_to_pil(cifar_jpegs):
    data = next(iter(cifar_jpegs.values()))
    picture = Image.open(io.BytesIO(data))
    exif = Image.Exif()
    exif[0x0112] = 6
    for other in (encode(picture, "JPEG", exif=exif.tobytes()),  # orientation: PIL applies it
                  encode(solid("CMYK", (32, 32), (0, 255, 255, 0)), "JPEG"),
                  encode(picture.resize((64, 64)), "JPEG"), encode(picture), data[: len(data) // 2]):
        assert native_jpeg_pixels(other) is None
    assert native_jpeg_pixels(data, max_side=31) is None
    with pytest.raises(ApiError) as err:
        decode_image(data, max_side=31)
    assert http_status(err.value) == 413
