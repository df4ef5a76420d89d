"""Hostile input against a real `python -m predictor` process (issue 6).

Every case in HOSTILE is sent to the strict server (conftest: 200 000-byte bodies, 4 files per
batch, 512-pixel sides) and must get its 4xx with the JSON error body
{"error": {"code": str, "message": str}}; afterwards the server must still answer /health with 200
and still classify a real CIFAR-10 JPEG exactly as it did before the attack.

Cases that go through httpx use a fresh connection each; cases whose bytes httpx cannot produce
(malformed multipart, chunked bodies, lying Content-Length, bad framing) are written to a raw socket.
The last section holds the real bugs this suite found (500s from KServe on inconsistent v2 binary
framing, 501 on model versions, the unauthenticated model-repository API): fixed, kept as regressions.
"""

import base64
import io
import json
import socket
import struct
import time
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import httpx
import pytest
from PIL import Image

from .conftest import encode, error_fields, read_http_response

MODEL = "cifar10-resnet18"
V1 = f"/v1/models/{MODEL}:predict"
V2 = f"/v2/models/{MODEL}/infer"
IMAGES = Path(__file__).resolve().parent / "images"
CLEAN_NAME = "cat_0000.jpg"
JPEG = (IMAGES / CLEAN_NAME).read_bytes()
STRICT_BODY_LIMIT = 200_000  # conftest's strict_server --max_body_bytes
OVER_LIMIT = STRICT_BODY_LIMIT + 100_000
AUTH_HEADERS = ("authorization", "x-api-key")  # copied onto raw requests if the fixture's client sets them


# -- building hostile files ---------------------------------------------------------------------------
def clean_png() -> bytes:
    return encode(Image.open(io.BytesIO(JPEG)))


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_file(width: int, height: int, idat: bytes, *, depth: int = 8, color: int = 2) -> bytes:
    ihdr = struct.pack(">IIBBBBB", width, height, depth, color, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", idat) + png_chunk(b"IEND", b"")


def one_bit_png(side: int) -> bytes:
    """A complete, valid 1-bit black square: 20000x20000 (400 Mpixel) is ~50 KB on the wire."""
    compressor, row = zlib.compressobj(9), b"\0" * (1 + (side + 7) // 8)
    idat = b"".join(compressor.compress(row) for _ in range(side)) + compressor.flush()
    return png_file(side, side, idat, depth=1, color=0)


def png_with_chunk(kind: bytes, payload: bytes) -> bytes:
    """The clean PNG with one extra chunk inserted right after IHDR."""
    png = clean_png()
    return png[:33] + png_chunk(kind, payload) + png[33:]


def inflates_to_50mb() -> bytes:
    return zlib.compress(b"A" * 50 * 2**20, 9)  # ~50 KB


def jpeg_with_size(width: int, height: int) -> bytes:
    """The clean JPEG with its SOF0 frame header rewritten to declare another size."""
    at = JPEG.find(b"\xff\xc0")
    assert at > 0, "test image is not a baseline JPEG"
    data = bytearray(JPEG)
    data[at + 5:at + 9] = struct.pack(">HH", height, width)
    return bytes(data)


def xor_every(data: bytes, start: int, step: int) -> bytes:
    out = bytearray(data)
    for i in range(start, len(out), step):
        out[i] ^= 0x55
    return bytes(out)


def flip_byte(data: bytes, at: int) -> bytes:
    out = bytearray(data)
    out[at] ^= 0xFF
    return bytes(out)


ZIP_TAIL = b"PK\x03\x04\x14\0\0\0\0\0" + b"\0" * 20 + b"evil.sh" + b"#!/bin/sh\nrm -rf /\n" + b"PK\x05\x06" + b"\0" * 18
HTML_TAIL = b"<html><body><script>alert(document.cookie)</script></body></html>"
SVG = (b'<?xml version="1.0"?><svg xmlns="http://www.w3.org/2000/svg" width="32" height="32">'
       b'<script>alert(1)</script><rect width="32" height="32"/></svg>')
PDF = b"%PDF-1.4\n1 0 obj<</Type/Catalog/OpenAction<</S/JavaScript/JS(app.alert(1))>>>>endobj\ntrailer<</Root 1 0 R>>\n%%EOF"


# -- talking to the server --------------------------------------------------------------------------------
@dataclass
class Reply:
    status: int
    body: bytes

    def json(self):
        return json.loads(self.body)


class Target:
    """Sends one request on its own connection, through httpx or as raw bytes on a socket."""

    def __init__(self, server):
        self.url, self.port = server.url, server.port
        self.headers = {k: v for k, v in server.client.headers.items() if k.lower() in AUTH_HEADERS}

    def http(self, method: str, path: str, **kwargs) -> Reply:
        with httpx.Client(base_url=self.url, timeout=60, headers=self.headers) as client:
            response = client.request(method, path, **kwargs)
            return Reply(response.status_code, response.content)

    def raw(self, request: bytes, timeout: float = 60) -> Reply:
        """Write `request` as is and read the response until the server closes (Connection: close)."""
        head, _, rest = request.partition(b"\r\n")
        extra = b"".join(f"{k}: {v}\r\n".encode() for k, v in self.headers.items())
        request = head + b"\r\n" + extra + rest
        received = b""
        with socket.create_connection(("127.0.0.1", self.port), timeout=timeout) as sock:
            try:
                sock.sendall(request)
            except (BrokenPipeError, ConnectionResetError):
                pass  # the server may answer 413 and close before reading all of an oversized body
            try:
                while chunk := sock.recv(65536):
                    received += chunk
            except ConnectionResetError:
                pass  # the response, if any, has already been read
        status_line, _, after = received.partition(b"\r\n")
        assert status_line.startswith(b"HTTP/1.1 "), f"no HTTP response: {received[:200]!r}"
        _, _, body = after.partition(b"\r\n\r\n")
        return Reply(int(status_line.split()[1]), body)


Send = Callable[[Target], Reply]


def upload(data, filename: str = "image.jpg", content_type: str = "image/jpeg", *,
           field: str = "file", path: str = "/classify/image") -> Send:
    """One multipart file upload; `data` may be a zero-argument function (built when the case runs)."""
    return lambda t: t.http("POST", path, files={field: (filename, data() if callable(data) else data, content_type)})


def post(path: str, **kwargs) -> Send:
    return lambda t: t.http("POST", path, **kwargs)


def call(method: str, path: str, **kwargs) -> Send:
    return lambda t: t.http(method, path, **kwargs)


def raw_post(path: str, body, content_type: str | None, *, length="auto", chunked: bool = False,
             extra: tuple[str, ...] = ()) -> Send:
    """A hand-written POST: `length` is "auto" (the true Content-Length), None (no header) or a literal value;
    `extra`: more header lines."""
    def send(t: Target) -> Reply:
        payload = body() if callable(body) else body
        lines = [f"POST {path} HTTP/1.1", "Host: predictor", "Connection: close", *extra]
        if content_type is not None:
            lines.append(f"Content-Type: {content_type}")
        if chunked:
            lines.append("Transfer-Encoding: chunked")
            payload = b"".join(b"%x\r\n%s\r\n" % (len(payload[i:i + 65536]), payload[i:i + 65536])
                               for i in range(0, len(payload), 65536)) + b"0\r\n\r\n"
        if length == "auto" and not chunked:
            lines.append(f"Content-Length: {len(payload)}")
        elif length not in ("auto", None):
            lines.append(f"Content-Length: {length}")
        return t.raw("\r\n".join(lines).encode() + b"\r\n\r\n" + payload)
    return send


def part(name: str, data: bytes, filename: str | None = "image.jpg", boundary: bytes = b"B") -> bytes:
    disposition = f'form-data; name="{name}"' + (f'; filename="{filename}"' if filename is not None else "")
    return (b"--" + boundary + b"\r\nContent-Disposition: " + disposition.encode()
            + b"\r\nContent-Type: image/jpeg\r\n\r\n" + data + b"\r\n")


WELL_FORMED = part("file", JPEG) + b"--B--\r\n"
OVERSIZED_UPLOAD = part("file", b"\xff\xd8\xff" + b"\0" * OVER_LIMIT) + b"--B--\r\n"
DISPOSITION = b'Content-Disposition: form-data; name="file"; filename="a.jpg"'
TINY_FILE_PART = b'--B\r\nContent-Disposition: form-data; name="files"; filename="a"\r\n\r\nx\r\n'  # 2000 fit in the limit
TINY_TEXT_PART = b'--B\r\nContent-Disposition: form-data; name="f"\r\n\r\nv\r\n'
MULTIPART = "multipart/form-data; boundary=B"


def with_part_headers(headers: bytes) -> bytes:
    """One part with these raw header lines and the clean JPEG as content."""
    return b"--B\r\n" + headers + b"\r\n\r\n" + JPEG + b"\r\n--B--\r\n"


def v2_json(*inputs: dict, **extra) -> Send:
    return post(V2, json={"inputs": list(inputs), **extra})


def pixels(shape, data, datatype: str = "UINT8") -> dict:
    return {"name": "pixels", "datatype": datatype, "shape": shape, "data": data}


def image_input(data, shape=(1,)) -> dict:
    return {"name": "image", "datatype": "BYTES", "shape": list(shape), "data": data}


def v1_b64(value) -> Send:
    return post(V1, json={"instances": [{"image": {"b64": value}}]})


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def v2_binary(inputs: list[dict], tail: bytes, header_length: str | None = None) -> Send:
    """The KServe v2 binary-data extension: JSON header, then raw tensor bytes."""
    def send(t: Target) -> Reply:
        header = json.dumps({"inputs": inputs}).encode()
        declared = str(len(header)) if header_length is None else header_length
        return t.http("POST", V2, content=header + tail, headers={
            "content-type": "application/octet-stream", "inference-header-content-length": declared})
    return send


def binary_pixels(shape, size) -> list[dict]:
    return [{"name": "pixels", "datatype": "UINT8", "shape": shape, "parameters": {"binary_data_size": size}}]


# A v2 binary-extension body with a fixed 200-byte JSON header (padded), so the header line is a constant.
V2_BINARY_HEADER_BYTES = 200
V2_BINARY_HEADERS = ("Inference-Header-Content-Length: 200",)


def v2_binary_body(data_bytes: int, shape: list[int] | None = None) -> bytes:
    """Consistent v2 binary framing: a UINT8 tensor of `data_bytes` bytes (of `shape`) after the JSON header."""
    header = json.dumps({"inputs": binary_pixels(shape or [data_bytes], data_bytes)}).encode()
    return header.ljust(V2_BINARY_HEADER_BYTES) + b"\0" * data_bytes


# -- the table: (send, expected status, expected error code or None) ---------------------------------------
def case(case_id: str, send: Send, status: int, code: str | None = None):
    return pytest.param(send, status, code, id=case_id)


HOSTILE = [
    # empty, truncated and corrupt files
    case("zero-byte-file", upload(b""), 400, "empty_file"),
    case("jpeg-truncated-half", upload(JPEG[:len(JPEG) // 2]), 400, "invalid_image"),
    case("jpeg-magic-bytes-only", upload(JPEG[:3]), 400, "invalid_image"),
    case("jpeg-without-end-marker", upload(JPEG[:-2]), 400, "invalid_image"),
    case("png-truncated-half", upload(lambda: clean_png()[:len(clean_png()) // 2], "a.png", "image/png"), 400, "invalid_image"),
    case("png-signature-only", upload(lambda: clean_png()[:8], "a.png", "image/png"), 400, "invalid_image"),
    case("jpeg-header-then-random-bytes", upload(JPEG[:100] + bytes(range(256)) * 8), 400, "invalid_image"),
    case("jpeg-corrupted-entropy-data", upload(xor_every(JPEG, 200, 7)), 400, "invalid_image"),
    case("png-ihdr-then-garbage", upload(lambda: clean_png()[:33] + b"\xde\xad\xbe\xef" * 200, "a.png"), 400, "invalid_image"),
    case("png-bad-chunk-crc", upload(lambda: flip_byte(clean_png(), 40), "a.png"), 400, "invalid_image"),
    case("png-zero-width-and-height", upload(png_file(0, 0, zlib.compress(b"")), "a.png"), 400, "invalid_image"),
    case("png-invalid-colour-type", upload(png_file(32, 32, zlib.compress(b"\0" * 32 * 97), color=7), "a.png"), 400, "invalid_image"),
    case("jpeg-frame-height-zero", upload(lambda: jpeg_with_size(32, 0)), 400, "invalid_image"),
    # other formats and polyglots behind an image name and type
    case("gif-named-jpg", upload(lambda: encode(Image.new("RGB", (32, 32), "red"), "GIF")), 415, "unsupported_media_type"),
    case("bmp-image", upload(lambda: encode(Image.new("RGB", (32, 32), "red"), "BMP"), "a.bmp", "image/bmp"), 415, "unsupported_media_type"),
    case("webp-image", upload(lambda: encode(Image.new("RGB", (32, 32), "red"), "WEBP"), "a.webp", "image/webp"), 415, "unsupported_media_type"),
    case("tiff-image", upload(lambda: encode(Image.new("RGB", (32, 32), "red"), "TIFF"), "a.tif", "image/tiff"), 415, "unsupported_media_type"),
    case("pdf-with-javascript-named-png", upload(PDF, "a.png", "image/png"), 415, "unsupported_media_type"),
    case("svg-with-script-named-png", upload(SVG, "a.png", "image/png"), 415, "unsupported_media_type"),
    case("html-named-jpg", upload(b"<!doctype html>" + HTML_TAIL), 415, "unsupported_media_type"),
    case("zip-named-jpg", upload(ZIP_TAIL), 415, "unsupported_media_type"),
    case("gifar-gif-plus-zip", upload(b"GIF89a\x20\0\x20\0\0\0\0" + ZIP_TAIL), 415, "unsupported_media_type"),
    case("windows-exe-named-jpg", upload(b"MZ\x90\0\x03\0\0\0" + b"\0" * 120 + b"PE\0\0"), 415, "unsupported_media_type"),
    case("elf-named-png", upload(b"\x7fELF\x02\x01\x01" + b"\0" * 57, "a.png", "image/png"), 415, "unsupported_media_type"),
    # decompression bombs and huge dimensions in small files
    case("png-20000x20000-one-colour-48KB", upload(lambda: one_bit_png(20000), "bomb.png", "image/png"), 413, "image_too_large"),
    case("png-600x600-above-side-limit", upload(lambda: one_bit_png(600), "big.png", "image/png"), 413, "image_too_large"),
    case("png-ihdr-100000x100000-tiny-idat", upload(png_file(100_000, 100_000, zlib.compress(b"\0" * 64)), "a.png"), 413, "image_too_large"),
    case("png-ihdr-max-uint32-sides", upload(png_file(2**32 - 1, 2**32 - 1, zlib.compress(b"\0" * 64)), "a.png"), 413, "image_too_large"),
    case("jpeg-frame-declares-65500x65500", upload(lambda: jpeg_with_size(65500, 65500)), 413, "image_too_large"),
    case("jpeg-frame-declares-513x32", upload(lambda: jpeg_with_size(513, 32)), 413, "image_too_large"),
    case("png-ztxt-chunk-inflating-to-50MB", upload(lambda: png_with_chunk(b"zTXt", b"k\0\0" + inflates_to_50mb()), "a.png"), 400, "invalid_image"),
    case("png-iccp-profile-inflating-to-50MB", upload(lambda: png_with_chunk(b"iCCP", b"p\0\0" + inflates_to_50mb()), "a.png"), 400, "invalid_image"),
    # bodies that are not a multipart upload at all
    case("urlencoded-form-body", post("/classify/image", data={"file": "cat.jpg"}), 422, "invalid_request"),
    case("json-body", post("/classify/image", json={"file": b64(JPEG)}), 422, "invalid_request"),
    case("raw-jpeg-without-content-type", raw_post("/classify/image", JPEG, None), 422, "invalid_request"),
    case("xml-body", post("/classify/image", content=b"<file>cat</file>", headers={"content-type": "application/xml"}), 422, "invalid_request"),
    # oversized bodies (the strict server allows 200 000 bytes)
    case("oversized-multipart-content-length", raw_post("/classify/image", OVERSIZED_UPLOAD, MULTIPART), 413, "payload_too_large"),
    case("content-length-100GB-no-body", raw_post("/classify/image", b"", MULTIPART, length="100000000000"), 413, "payload_too_large"),
    case("oversized-multipart-chunked", raw_post("/classify/image", OVERSIZED_UPLOAD, MULTIPART, chunked=True), 413, "payload_too_large"),
    case("oversized-batch-chunked", raw_post("/classify/batch", OVERSIZED_UPLOAD.replace(b'"file"', b'"files"'), MULTIPART, chunked=True),
         413, "payload_too_large"),
    case("oversized-v1-json-content-length", raw_post(V1, b'{"instances": [' + b" " * OVER_LIMIT + b"]}", "application/json"), 413, "payload_too_large"),
    case("oversized-v2-json-chunked", raw_post(V2, b'{"inputs": [' + b" " * OVER_LIMIT + b"]}", "application/json", chunked=True), 413, "payload_too_large"),
    case("oversized-v1-raw-image-chunked", raw_post(V1, b"\xff\xd8\xff" + b"\0" * OVER_LIMIT, "image/jpeg", chunked=True), 413, "payload_too_large"),
    case("oversized-v2-binary-content-length", raw_post(V2, lambda: v2_binary_body(OVER_LIMIT), "application/octet-stream",
                                                        extra=V2_BINARY_HEADERS), 413, "payload_too_large"),
    case("oversized-v2-binary-chunked", raw_post(V2, lambda: v2_binary_body(OVER_LIMIT), "application/octet-stream", chunked=True,
                                                 extra=V2_BINARY_HEADERS), 413, "payload_too_large"),
    # malformed multipart
    case("multipart-without-boundary", raw_post("/classify/image", WELL_FORMED, "multipart/form-data"), 400, "bad_request"),
    case("multipart-wrong-boundary", raw_post("/classify/image", WELL_FORMED, "multipart/form-data; boundary=ZZZ"), 400, "bad_request"),
    case("multipart-empty-boundary", raw_post("/classify/image", WELL_FORMED, "multipart/form-data; boundary="), 400, "bad_request"),
    case("multipart-300-char-boundary", raw_post("/classify/image", WELL_FORMED, "multipart/form-data; boundary=" + "x" * 300), 400, "bad_request"),
    case("multipart-unterminated-part", raw_post("/classify/image", part("file", JPEG)[:-2], MULTIPART), 422, "invalid_request"),
    case("multipart-truncated-by-content-length", raw_post("/classify/image", WELL_FORMED, MULTIPART, length="120"), 422, "invalid_request"),
    case("multipart-part-without-disposition", raw_post("/classify/image", with_part_headers(b"Content-Type: image/jpeg"), MULTIPART), 400, "bad_request"),
    case("multipart-binary-garbage-part-headers", raw_post("/classify/image", with_part_headers(b"\xff\xfe\0garbage"), MULTIPART), 400, "bad_request"),
    case("multipart-100KB-part-header", raw_post("/classify/image", with_part_headers(DISPOSITION + b"\r\nX-Pad: " + b"a" * 100_000), MULTIPART),
         400, "bad_request"),
    case("multipart-preamble-only", raw_post("/classify/image", b"no parts in here", MULTIPART), 400, "bad_request"),
    case("multipart-no-parts", raw_post("/classify/image", b"--B--\r\n", MULTIPART), 422, "invalid_request"),
    case("multipart-wrong-field-name", upload(JPEG, field="image"), 422, "invalid_request"),
    case("multipart-file-sent-as-text-field", raw_post("/classify/image", part("file", b"text", filename=None) + b"--B--\r\n", MULTIPART),
         422, "invalid_request"),
    case("multipart-2000-file-parts", raw_post("/classify/batch", TINY_FILE_PART * 2000 + b"--B--\r\n", MULTIPART), 400, "bad_request"),
    case("multipart-2000-text-fields", raw_post("/classify/batch", TINY_TEXT_PART * 2000 + b"--B--\r\n", MULTIPART), 400, "bad_request"),
    # /classify/batch
    case("batch-5-files-over-limit-4", post("/classify/batch", files=[("files", ("a.jpg", JPEG, "image/jpeg"))] * 5), 413, "too_many_files"),
    case("batch-500-empty-files", post("/classify/batch", files=[("files", ("a.jpg", b"", "image/jpeg"))] * 500), 413, "too_many_files"),
    case("batch-field-named-file", upload(JPEG, path="/classify/batch"), 422, "invalid_request"),
    case("batch-top_k-zero", post("/classify/batch?top_k=0", files={"files": JPEG}), 422, "invalid_request"),
    # odd file names on files that are not images: the name changes nothing
    case("filename-unicode", upload(b"not an image", "ünïcødé-猫-🐱.jpg"), 415, "unsupported_media_type"),
    case("filename-path-traversal", upload(b"not an image", "../../../../etc/passwd"), 415, "unsupported_media_type"),
    case("filename-nul-byte", upload(b"not an image", "cat.jpg\0.exe"), 415, "unsupported_media_type"),
    case("filename-crlf-header-injection", upload(b"not an image", "a.jpg\r\nX-Injected: 1"), 415, "unsupported_media_type"),
    case("filename-5000-chars", upload(JPEG, "a" * 5000 + ".jpg"), 400, "bad_request"),
    case("filename-empty", upload(JPEG, ""), 422, "invalid_request"),
    # bad base64 and bad instances on v1
    case("v1-b64-urlsafe-alphabet", v1_b64(base64.urlsafe_b64encode(b"\xfb\xff" * 30).decode()), 400, "invalid_base64"),
    case("v1-b64-bad-padding", v1_b64("QUJ"), 400, "invalid_base64"),
    case("v1-b64-with-whitespace", v1_b64(" " + b64(JPEG)[:40] + "\n"), 400, "invalid_base64"),
    case("v1-b64-non-ascii", v1_b64("ÿÿÿÿ"), 400, "invalid_base64"),
    case("v1-b64-is-a-number", v1_b64(12345), 400, "invalid_base64"),
    case("v1-b64-is-a-list", v1_b64(["QUJD"]), 400, "invalid_base64"),
    case("v1-b64-empty-string", v1_b64(""), 400, "empty_file"),
    case("v1-b64-of-a-truncated-jpeg", v1_b64(b64(JPEG[:300])), 400, "invalid_image"),
    case("v1-b64-of-an-svg", v1_b64(b64(SVG)), 415, "unsupported_media_type"),
    case("v1-instance-is-a-string", post(V1, json={"instances": ["cat.jpg"]}), 400, "invalid_request"),
    case("v1-instances-null", post(V1, json={"instances": None}), 400, "invalid_request"),
    case("v1-5-instances-over-limit-4", post(V1, json={"instances": [{"b64": "QUJD"}] * 5}), 413, "too_many_images"),
    case("v1-json-nested-100000-deep", post(V1, content=b"[" * 100_000, headers={"content-type": "application/json"}), 400, "invalid_request"),
    case("v1-json-invalid-utf8", post(V1, content=b'{"instances": "\xff\xfe"}', headers={"content-type": "application/json"}), 400, "invalid_request"),
    case("v1-json-nan", post(V1, content=b'{"instances": [NaN]}', headers={"content-type": "application/json"}), 400, "invalid_request"),
    case("v1-text-plain-body", post(V1, content=b"hello", headers={"content-type": "text/plain"}), 415, "unsupported_media_type"),
    case("v1-multipart-upload", post(V1, files={"file": JPEG}), 415, "unsupported_media_type"),
    # wrong v2 datatypes and shapes
    case("v2-fp32-pixels", v2_json(pixels([1, 32, 32, 3], [0.5] * 3072, "FP32")), 400, "unsupported_datatype"),
    case("v2-unknown-datatype", v2_json(pixels([1], [0], "NOPE")), 400, "unsupported_datatype"),
    case("v2-uint8-channels-first", v2_json(pixels([1, 3, 32, 32], [0] * 3072)), 400, "invalid_shape"),
    case("v2-uint8-negative-batch", v2_json(pixels([-1, 32, 32, 3], [0] * 3072)), 400, "invalid_shape"),
    case("v2-uint8-negative-values", v2_json(pixels([1, 32, 32, 3], [-1] * 3072)), 400, "invalid_tensor"),
    case("v2-uint8-null-values", v2_json(pixels([1, 32, 32, 3], [None] * 3072)), 400, "invalid_tensor"),
    case("v2-uint8-string-values", v2_json(pixels([1, 32, 32, 3], ["a"] * 3072)), 400, "invalid_tensor"),
    case("v2-uint8-too-much-data", v2_json(pixels([1, 32, 32, 3], [0] * 4000)), 400, "invalid_tensor"),
    case("v2-uint8-ragged-data", v2_json(pixels([1, 32, 32, 3], [[1, 2], [3]])), 400, "invalid_tensor"),
    case("v2-uint8-float-values", v2_json(pixels([1, 32, 32, 3], [1.7] * 3072)), 400, "invalid_tensor"),
    case("v2-uint8-numeric-strings", v2_json(pixels([1, 32, 32, 3], ["1"] * 3072)), 400, "invalid_tensor"),
    case("v2-uint8-booleans", v2_json(pixels([1, 32, 32, 3], [True] * 3072)), 400, "invalid_tensor"),
    case("v2-uint8-some-booleans", v2_json(pixels([1, 32, 32, 3], [True] + [1] * 3071)), 400, "invalid_tensor"),
    case("v2-uint8-over-255", v2_json(pixels([1, 32, 32, 3], [999] * 3072)), 400, "invalid_tensor"),
    case("v2-binary-data-output-a-string", v2_json(pixels([1, 32, 32, 3], [0] * 3072), parameters={"binary_data_output": "yes"}),
         400, "invalid_parameter"),
    case("v2-output-binary-data-a-number", v2_json(pixels([1, 32, 32, 3], [0] * 3072),
                                                   outputs=[{"name": "label", "parameters": {"binary_data": 1}}]),
         400, "invalid_parameter"),
    case("v2-bytes-two-dimensional", v2_json(image_input([["QUJD"]], (1, 1))), 400, "invalid_shape"),
    case("v2-bytes-shape-zero", v2_json(image_input([], (0,))), 400, "invalid_shape"),
    case("v2-bytes-shape-10e12", v2_json(image_input(["QUJD"], (10**12,))), 413, "too_many_images"),
    case("v2-bytes-integers", v2_json(image_input([123])), 400, "invalid_base64"),
    case("v2-bytes-objects", v2_json(image_input([{"b64": "QUJD"}])), 400, "invalid_base64"),
    case("v2-bytes-empty-string", v2_json(image_input([""])), 400, "empty_file"),
    case("v2-bytes-bad-base64", v2_json(image_input(["QU!D"])), 400, "invalid_base64"),
    case("v2-bytes-base64-of-a-gif", v2_json(image_input([b64(b"GIF89a\x01\0\x01\0")])), 415, "unsupported_media_type"),
    case("v2-shape-string", v2_json(image_input(["QUJD"], ("a",))), 422, "invalid_request"),
    case("v2-shape-fraction", v2_json(image_input(["QUJD"], (1.5,))), 422, "invalid_request"),
    case("v2-input-without-data", v2_json({"name": "pixels", "datatype": "UINT8", "shape": [1, 32, 32, 3]}), 422, "invalid_request"),
    case("v2-two-inputs", v2_json(image_input(["QUJD"]), image_input(["QUJD"])), 400, "invalid_request"),
    case("v2-body-is-a-list", post(V2, json=[{"inputs": []}]), 422, "invalid_request"),
    case("v2-binary-header-length-zero", v2_binary(binary_pixels([1, 32, 32, 3], 3072), b"\0" * 3072, "0"), 400, "invalid_request"),
    case("v2-binary-header-length-past-the-end", v2_binary(binary_pixels([1, 32, 32, 3], 3072), b"\0" * 3072, "99999999"), 400, "invalid_request"),
    # wrong methods
    case("get-classify-image", call("GET", "/classify/image"), 405, "method_not_allowed"),
    case("put-classify-image", call("PUT", "/classify/image", content=JPEG), 405, "method_not_allowed"),
    case("delete-classify-batch", call("DELETE", "/classify/batch"), 405, "method_not_allowed"),
    case("patch-v2-infer", call("PATCH", V2, json={"inputs": []}), 405, "method_not_allowed"),
    case("get-v2-infer", call("GET", V2), 405, "method_not_allowed"),
    case("trace-classify-image", call("TRACE", "/classify/image"), 405, "method_not_allowed"),
    case("post-health", call("POST", "/health", content=b"x"), 405, "method_not_allowed"),
    # query parameter abuse
    case("top_k-zero", post("/classify/image?top_k=0", files={"file": JPEG}), 422, "invalid_request"),
    case("top_k-abc", post("/classify/image?top_k=abc", files={"file": JPEG}), 422, "invalid_request"),
    case("top_k-negative", post("/classify/image?top_k=-1", files={"file": JPEG}), 422, "invalid_request"),
    case("top_k-exponent", post("/classify/image?top_k=1e3", files={"file": JPEG}), 422, "invalid_request"),
    case("top_k-400-digits", post("/classify/image?top_k=" + "9" * 400, files={"file": JPEG}), 422, "invalid_request"),
    case("top_k-empty", post("/classify/image?top_k=", files={"file": JPEG}), 422, "invalid_request"),
    case("unknown-model-name-with-traversal", post("/v1/models/..%2F..%2Fetc%2Fpasswd:predict", json={"instances": []}), 404, None),
]


# -- fixtures and checks --------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def target(strict_server) -> Target:
    return Target(strict_server)


@pytest.fixture(scope="module")
def reference(strict_server) -> dict:
    """What the clean image gets before any attack: afterwards it must get exactly the same."""
    response = strict_server.client.post("/classify/image", files={"file": (CLEAN_NAME, JPEG, "image/jpeg")})
    assert response.status_code == 200, response.text
    assert response.json()["predicted_class"] == "cat"
    return response.json()


def assert_json_error(reply: Reply, status: int | None, code: str | None) -> None:
    """A 4xx (exactly `status` unless None) with the body {"error": {"code": str, "message": str}}."""
    assert 400 <= reply.status < 500, f"{reply.status}: {reply.body[:300]!r}"
    assert status is None or reply.status == status, f"{reply.status}: {reply.body[:300]!r}"
    body = reply.json()
    found, _ = error_fields(body)
    if code is not None:
        assert found == code, body


def assert_still_serving(server, reference: dict) -> None:
    assert server.client.get("/health").status_code == 200
    response = server.client.post("/classify/image", files={"file": (CLEAN_NAME, JPEG, "image/jpeg")})
    assert response.status_code == 200, response.text
    result = response.json()
    assert result["predicted_class"] == reference["predicted_class"] == "cat"
    assert result["all_probabilities"] == reference["all_probabilities"]


@pytest.mark.parametrize("send, status, code", HOSTILE)
def test_hostile_input_gets_its_4xx_json_error(target, strict_server, reference, send, status, code):
    assert_json_error(send(target), status, code)
    assert_still_serving(strict_server, reference)


def test_errors_say_it_in_the_apis_words_and_echo_little(target, strict_server):
    """No library's wording reaches the client (numpy's "Python integer 999 out of bounds for uint8"), and a
    job id of 5,000 characters is not echoed back whole."""
    reply = v2_json(pixels([1, 32, 32, 3], [999] * 3072))(target)
    assert reply.status == 400 and "Python integer" not in reply.body.decode() and "uint8" not in reply.body.decode()
    long_id = "a" * 5000
    missing = strict_server.client.get(f"/classify/jobs/{long_id}")
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "job_not_found", missing.text
    assert len(missing.text) < 300 and "5000 characters" in missing.text, missing.text


# -- hostile-looking input that is nonetheless a valid image: served, and the extra bytes ignored -------
HARMLESS = [
    pytest.param(upload(JPEG + ZIP_TAIL), id="jpeg-with-zip-appended"),
    pytest.param(upload(JPEG + HTML_TAIL), id="jpeg-with-html-appended"),
    pytest.param(upload(JPEG + PDF), id="jpeg-with-pdf-appended"),
    pytest.param(upload(JPEG, "ünïcødé-猫-🐱.jpg"), id="filename-unicode"),
    pytest.param(upload(JPEG, "../../../../etc/passwd"), id="filename-path-traversal"),
    pytest.param(upload(JPEG, "cat.jpg\0.exe"), id="filename-nul-byte"),
    pytest.param(upload(JPEG, "cat.exe", "application/x-msdownload"), id="lying-content-type"),
    pytest.param(upload(JPEG[:2] + b"\xff\xe1" + struct.pack(">H", 200) + b"Exif\0\0" + b"\xff" * 192 + JPEG[2:]),
                 id="jpeg-with-garbage-exif-segment"),
]


@pytest.mark.parametrize("send", HARMLESS)
def test_valid_image_in_odd_wrapping_is_classified_like_the_clean_one(target, strict_server, reference, send):
    reply = send(target)
    assert reply.status == 200, reply.body[:300]
    assert reply.json()["all_probabilities"] == reference["all_probabilities"]
    assert_still_serving(strict_server, reference)


# -- broken HTTP framing: refused by the HTTP server itself, before the application sees a request ---------
# Uvicorn answers these with a plain-text 400 ("Invalid HTTP request received.") and closes the
# connection; no application code runs, so the JSON error format cannot apply. What matters is the 400
# and that nothing else is disturbed.
FRAMING = [
    pytest.param(raw_post("/classify/image", WELL_FORMED, MULTIPART, length="abc"), id="content-length-not-a-number"),
    pytest.param(raw_post("/classify/image", WELL_FORMED, MULTIPART, length="-1"), id="content-length-negative"),
    pytest.param(lambda t: t.raw(b"POST /classify/image HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Type: " + MULTIPART.encode()
                                 + b"\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nabc\r\n0\r\n\r\n"), id="chunk-size-not-hex"),
    pytest.param(lambda t: t.raw(b"POST /classify/image HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Length: 5\r\n"
                                 b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\nGET /health HTTP/1.1\r\n\r\n"), id="request-smuggling-cl-and-te"),
    pytest.param(lambda t: t.raw(b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\nX-Bad: a\rb\r\n\r\n"), id="bare-cr-in-header"),
]  # an 80 KB request line is over --max_header_bytes: 414, in tests/test_connections.py


@pytest.mark.parametrize("send", FRAMING)
def test_broken_http_framing_is_a_400(target, strict_server, reference, send):
    assert send(target).status == 400
    assert_still_serving(strict_server, reference)


# -- bugs this suite found, fixed in the predictor: regressions --------------------------------------------------------
V2_BINARY_BUGS = [
    pytest.param(v2_binary(binary_pixels([1, 32, 32, 3], 3072), b"\0" * 3072, "abc"), id="header-length-not-a-number"),
    pytest.param(v2_binary(binary_pixels([1, 32, 32, 3], 3072), b"\0" * 3072, ""), id="header-length-empty"),
    pytest.param(v2_binary(binary_pixels([1, 32, 32, 3], 3072), b"\0" * 10), id="binary-data-shorter-than-declared"),
    pytest.param(v2_binary(binary_pixels([1, 32, 32, 3], 3072), b""), id="binary-data-missing"),
    pytest.param(v2_binary(binary_pixels([2, 32, 32, 3], 3072), b"\0" * 3072), id="binary-size-smaller-than-shape"),
    pytest.param(v2_binary(binary_pixels([1, 32, 32, 3], -5), b"\0" * 3072), id="binary-size-negative"),
    pytest.param(v2_binary(binary_pixels([1, 32, 32, 3], "big"), b"\0" * 3072), id="binary-size-a-string"),
    pytest.param(v2_binary(binary_pixels([1, 32, 32, 3], 1.5), b"\0" * 3072), id="binary-size-a-fraction"),
]


@pytest.mark.parametrize("send", V2_BINARY_BUGS)
def test_inconsistent_v2_binary_framing_is_a_400(target, strict_server, reference, send):
    """Framing KServe itself would answer with a 500 is refused by the guard before KServe parses it."""
    reply = send(target)
    assert_still_serving(strict_server, reference)
    assert_json_error(reply, 400, "invalid_request")


def test_loading_an_unknown_model_is_a_4xx(target, strict_server, reference):
    """KServe's model-repository API is not served (it answered 503 here, and its unload was a DoS)."""
    reply = target.http("POST", "/v2/repository/models/no-such-model/load")
    assert_still_serving(strict_server, reference)
    assert_json_error(reply, 404, "not_found")


@pytest.mark.parametrize("send", [
    pytest.param(call("GET", f"/v2/models/{MODEL}/versions/1/ready"), id="versions-route"),
    pytest.param(call("GET", f"/v2/models/{MODEL}?model_version=1"), id="metadata-model_version"),
    pytest.param(call("GET", f"/v2/models/{MODEL}/ready?model_version=1"), id="ready-model_version"),
    pytest.param(post(f"{V2}?model_version=1", json={"inputs": [image_input([b64(JPEG)])]}), id="infer-model_version"),
])
def test_model_version_gives_a_json_4xx(target, strict_server, reference, send):
    """KServe raises NotImplementedError for model versions (its own 501 body); ours is a 404 in our shape."""
    reply = send(target)
    assert_still_serving(strict_server, reference)
    assert_json_error(reply, 404, "not_supported")


@pytest.fixture(scope="module")
def disposable_server():
    """A server of its own for the one attack that, today, takes the model out of service."""
    from .conftest import Server

    server = Server("--max_batch_size", "8")
    yield server
    server.stop()


def test_clients_cannot_unload_the_model(disposable_server):
    unload = disposable_server.client.post(f"/v2/repository/models/{MODEL}/unload")
    still_healthy = disposable_server.client.get("/health").status_code == 200
    classified = disposable_server.client.post("/classify/image", files={"file": (CLEAN_NAME, JPEG, "image/jpeg")})
    assert unload.status_code == 404 and error_fields(unload.json(), "/v2/")[0] == "not_found", unload.text
    assert still_healthy and classified.status_code == 200, classified.text


# -- every protocol passes the same gates: deadline, in-flight limit, body limit (issue 16) ------------------
# A server of its own: a 2 s deadline, 2 calls in flight at most, the default 10 MiB body limit.
DEADLINE_S = 2


@pytest.fixture(scope="module")
def gated_server():
    from .conftest import Server

    server = Server("--request_timeout_s", str(DEADLINE_S), "--max_in_flight", "2", "--rate_limit_per_minute", "0")
    yield server
    server.stop()


def request_head(path: str, content_type: str, length: int | None, *extra: str) -> bytes:
    """The head of a POST: Content-Length `length`, or chunked when None."""
    framing = "Transfer-Encoding: chunked" if length is None else f"Content-Length: {length}"
    return "\r\n".join([f"POST {path} HTTP/1.1", "Host: predictor", f"Content-Type: {content_type}", framing, *extra,
                        "", ""]).encode()


def held_upload(port: int, head: bytes, first_bytes: bytes) -> socket.socket:
    """A connection that sent a request head and the start of its body; the rest never comes."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=30)
    sock.sendall(head + first_bytes)
    return sock


def reply_on(sock: socket.socket) -> Reply:
    """One whole response read from a raw socket."""
    status, _, body = read_http_response(sock)
    return Reply(status, body)


V2_PIXELS = v2_binary_body(3072, [1, 32, 32, 3])  # one 32x32 RGB image, as binary data
V1_JSON = json.dumps({"instances": [{"image": {"b64": b64(JPEG)}}]}).encode()
V2_JSON = json.dumps({"inputs": [image_input([b64(JPEG)])]}).encode()
TRICKLED = [
    pytest.param(V2, "application/octet-stream", V2_PIXELS, V2_BINARY_HEADERS, id="v2-binary"),
    pytest.param(V1, "application/json", V1_JSON, (), id="v1-json"),
    pytest.param(V2, "application/json", V2_JSON, (), id="v2-json"),
]


def test_the_v2_binary_body_used_here_is_served(gated_server):
    """The body the held-upload tests trickle is a valid call when sent whole."""
    reply = Target(gated_server).raw(request_head(V2, "application/octet-stream", len(V2_PIXELS), *V2_BINARY_HEADERS,
                                                  "Connection: close") + V2_PIXELS)
    assert reply.status == 200, reply.body[:300]
    assert reply.json()["outputs"][0]["shape"][0] == 1


@pytest.mark.parametrize("path, content_type, body, extra", TRICKLED)
def test_a_trickled_body_gets_504_at_the_deadline(gated_server, path, content_type, body, extra):
    """A client that sends the head and a few bytes of its body, then nothing, is answered 504 at the
    deadline, whatever the protocol (the v2 binary body was read before the deadline started: no answer
    for as long as the client held it)."""
    started = time.monotonic()
    with held_upload(gated_server.port, request_head(path, content_type, len(body), *extra), body[:50]) as sock:
        reply = reply_on(sock)
    assert_json_error_5xx(reply, 504, "deadline_exceeded")
    assert DEADLINE_S - 0.1 < time.monotonic() - started < DEADLINE_S + 4
    assert gated_server.client.get("/health").status_code == 200


def test_v2_binary_uploads_count_in_flight(gated_server):
    """Two v2 binary uploads still sending fill --max_in_flight 2: a third v2 call is refused with 503
    (it was served while the binary bodies were read outside the count); once the held two are cut off
    at their deadline, calls are served again."""
    head = request_head(V2, "application/octet-stream", len(V2_PIXELS), *V2_BINARY_HEADERS)
    third = request_head(V2, "application/octet-stream", len(V2_PIXELS), *V2_BINARY_HEADERS, "Connection: close") + V2_PIXELS
    target = Target(gated_server)
    held = [held_upload(gated_server.port, head, V2_PIXELS[:50]) for _ in range(2)]
    sent = time.monotonic()
    try:
        # The held calls are admitted as soon as the server has read their heads; poll for that, well
        # inside their deadline (after it they are cut off and leave the count).
        replies = [target.raw(third)]
        while replies[-1].status != 503 and time.monotonic() - sent < DEADLINE_S / 2:
            replies.append(target.raw(third))
        assert_json_error_5xx(replies[-1], 503, "overloaded")
        assert all(r.status == 200 for r in replies[:-1]), [r.status for r in replies]
        for sock in held:
            assert_json_error_5xx(reply_on(sock), 504, "deadline_exceeded")
    finally:
        for sock in held:
            sock.close()
    assert target.raw(third).status == 200


def test_a_12mb_chunked_v2_binary_body_is_413(gated_server):
    """Over the default 10 MiB limit without a Content-Length: cut off at the limit with 413 (was a 500)."""
    send = raw_post(V2, lambda: v2_binary_body(12 * 2**20), "application/octet-stream", chunked=True, extra=V2_BINARY_HEADERS)
    reply = send(Target(gated_server))
    assert_json_error(reply, 413, "payload_too_large")
    assert gated_server.client.get("/health").status_code == 200


def assert_json_error_5xx(reply: Reply, status: int, code: str) -> None:
    """Like assert_json_error, for the 5xx answers (deadline, overload)."""
    assert reply.status == status, f"{reply.status}: {reply.body[:300]!r}"
    body = reply.json()
    assert error_fields(body)[0] == code, body


# -- who the rate limit counts: X-Forwarded-For spoofing from both sides (issue 16) ---------------------------
# Bodiless calls (422) spend a token like any other; 5 per minute refill one token per 12 s, far
# slower than these tests send.
RATE = 5


def spend(server, count: int, *forwarded_for: str) -> list[int]:
    """Statuses of `count` bodiless prediction calls, each with these X-Forwarded-For lines."""
    headers = [("x-forwarded-for", value) for value in forwarded_for]
    return [server.client.post("/classify/image", headers=headers).status_code for _ in range(count)]


@pytest.fixture
def rate_limited_server(request):
    from .conftest import Server

    server = Server("--rate_limit_per_minute", str(RATE), "--trusted_proxy_hops", str(request.param))
    yield server
    server.stop()


@pytest.mark.parametrize("rate_limited_server", [0], indirect=True)
def test_without_trusted_proxies_x_forwarded_for_does_not_pick_the_bucket(rate_limited_server):
    """0 hops (the default): the peer address is the client; a caller writing X-Forwarded-For, even
    from 127.0.0.1 (which uvicorn would have trusted), stays in its own bucket and gets 429."""
    assert spend(rate_limited_server, 2) + spend(rate_limited_server, 3, "10.1.1.1") == [422] * RATE
    for n in range(2, 7):
        limited = rate_limited_server.client.post("/classify/image", headers={"X-Forwarded-For": f"10.1.1.{n}"})
        assert_json_error(Reply(limited.status_code, limited.content), 429, "rate_limited")
    assert spend(rate_limited_server, 1) == [429]
    assert "client = peer address" in rate_limited_server.log()


@pytest.mark.parametrize("rate_limited_server", [1], indirect=True)
def test_one_trusted_proxy_hop_counts_the_right_most_entry(rate_limited_server):
    """1 hop: the right-most X-Forwarded-For entry (the one the proxy appended) is the client; what a
    caller writes to its left changes nothing; another right-most entry is another client."""
    statuses = [spend(rate_limited_server, 1, f"6.6.6.{n}, 10.0.0.1")[0] for n in range(RATE + 3)]
    assert statuses == [422] * RATE + [429] * 3, statuses
    assert spend(rate_limited_server, 1, "10.0.0.1") == [429]
    assert spend(rate_limited_server, 1, "6.6.6.6", "10.0.0.1") == [429]  # header lines count in order
    assert spend(rate_limited_server, 1, "10.0.0.1, 10.0.0.2") == [422]  # another client
    assert spend(rate_limited_server, 1) == [422]  # no header: the peer, a bucket of its own
    assert "client = X-Forwarded-For entry 1 from the right" in rate_limited_server.log()

