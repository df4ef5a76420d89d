"""Property-based fuzzing (issue 6): the decoder in-process with hypothesis, the HTTP API with schemathesis.

Both are bounded and reproducible: fixed example counts, no deadline, derandomize=True and no example
database, so CI runs the same inputs every time.

(a) `decode_image` must, for any bytes at all, either return a uint8 array [32, 32, 3] or raise
    ApiError with a 4xx status; any other exception would be a 500 in the server.
(b) every fuzzed operation of the running server's own OpenAPI schema (/openapi.json) must answer
    without a 5xx, and every 4xx must be the JSON error {"error": {"code": str, "message": str}}.
"""

import base64
import copy
import io
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import schemathesis
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from PIL import Image
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error, status_code_conformance

from predictor.core.errors import ApiError
from predictor.core.imaging import JPEG_MAGIC, PNG_MAGIC, decode_image
from predictor.serving.http_errors import http_status

from .conftest import Server, error_fields

IMAGES = Path(__file__).resolve().parent / "images"
MODEL = "cifar10-resnet18"


def _encode(image: Image.Image, fmt: str, **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **kwargs)
    return buffer.getvalue()


def _seeds() -> dict[str, bytes]:
    """Real files of every flavour the decoder handles, to mutate."""
    jpeg = (IMAGES / "cat_0000.jpg").read_bytes()
    photo = Image.open(io.BytesIO(jpeg)).convert("RGB")
    big = photo.resize((96, 64))
    rgba = big.convert("RGBA")
    rgba.putalpha(128)
    return {
        "cifar-jpeg": jpeg,
        "progressive-jpeg": _encode(big, "JPEG", progressive=True, quality=80),
        "grayscale-jpeg": _encode(big.convert("L"), "JPEG"),
        "cmyk-jpeg": _encode(big.convert("CMYK"), "JPEG"),
        "exif-rotated-jpeg": _encode(big, "JPEG", exif=_exif_orientation(6)),
        "rgb-png": _encode(photo, "PNG"),
        "optimized-png": _encode(big, "PNG", optimize=True),
        "rgba-png": _encode(rgba, "PNG"),
        "palette-png-transparent": _encode(big.convert("P"), "PNG", transparency=0),
        "16-bit-gray-png": _encode(Image.fromarray(np.arange(96 * 64, dtype=np.uint16).reshape(64, 96) * 10), "PNG"),
        "1-bit-png": _encode(big.convert("1"), "PNG"),
    }


def _exif_orientation(value: int) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = value
    return exif.tobytes()


SEEDS = _seeds()


def assert_decodes_or_4xx(data: bytes) -> None:
    """The property: a 32x32 RGB uint8 array, or ApiError 4xx. Anything else escapes as a test failure."""
    try:
        out = decode_image(data)
    except ApiError as exc:
        assert 400 <= http_status(exc) < 500, (http_status(exc), exc.code, exc.message)
        assert exc.code and exc.message
        event(f"{http_status(exc)} {exc.code}")  # outcome mix: pytest --hypothesis-show-statistics
        return
    event("decoded")
    assert isinstance(out, np.ndarray)
    assert out.shape == (32, 32, 3) and out.dtype == np.uint8


FUZZ = settings(max_examples=250, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def test_seed_files_decode():
    for name, data in SEEDS.items():
        assert decode_image(data).shape == (32, 32, 3), name


# -- (a) decoder fuzzing ---------------------------------------------------------------------------------------
@FUZZ
@given(st.binary(max_size=4096))
def test_decode_arbitrary_bytes(data):
    assert_decodes_or_4xx(data)


@FUZZ
@given(st.sampled_from([JPEG_MAGIC, PNG_MAGIC, SEEDS["cifar-jpeg"][:20], SEEDS["rgb-png"][:33]]), st.binary(max_size=4096))
def test_decode_valid_header_then_arbitrary_bytes(header, tail):
    assert_decodes_or_4xx(header + tail)


@st.composite
def mutated(draw) -> bytes:
    """A real file with a few bytes flipped or overwritten, a slice deleted or duplicated, and/or truncated.

    The first 8 bytes (the magic number) are left alone: changing them only tests the 415 path, which
    test_decode_arbitrary_bytes already covers.
    """
    data = bytearray(SEEDS[draw(st.sampled_from(sorted(SEEDS)))])
    for _ in range(draw(st.integers(0, 6))):
        at = draw(st.integers(8, len(data) - 1))
        if draw(st.booleans()):
            data[at] ^= 1 << draw(st.integers(0, 7))
        else:
            data[at] = draw(st.one_of(st.sampled_from([0x00, 0xFF, 0x7F, 0x80]), st.integers(0, 255)))
    if draw(st.booleans()):
        start = draw(st.integers(8, len(data) - 1))
        end = draw(st.integers(start, min(len(data), start + 512)))
        data[start:end] = data[start:end] * 2 if draw(st.booleans()) else b""
    if draw(st.booleans()):
        data = data[:draw(st.integers(8, len(data)))]
    return bytes(data)


@FUZZ
@given(mutated())
def test_decode_mutated_real_images(data):
    assert_decodes_or_4xx(data)


def _png_chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


SIDES = st.one_of(st.integers(0, 5000), st.sampled_from([4096, 4097, 65535, 2**31 - 1, 2**32 - 1]))


CHANNELS = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}  # PNG colour type -> samples per pixel


@FUZZ
@given(st.data(), st.sampled_from([1, 2, 4, 8, 16, 8, 16, 3, 0, 255]), st.sampled_from([0, 2, 3, 4, 6, 0, 2, 3, 4, 6, 1, 7]),
       st.sampled_from([0, 0, 0, 1]), st.sampled_from([0, 0, 0, 1]), st.sampled_from([0, 0, 0, 1]), st.booleans())
def test_decode_png_with_a_valid_crc_but_lying_header(data, depth, color, compression, filtering, interlace, small):
    """Structure-aware: a rewritten IHDR with a correct CRC, so the decoder really gets past the chunk layer.

    Half the time the image is small and its IDAT is synthesised (random filter bytes and samples, with
    exactly the row length the header implies), so every bit depth / colour type reaches the pixel code;
    otherwise the header declares any size, up to 2**32-1, over a real file's IDAT.
    """
    if small:
        width, height = data.draw(st.integers(1, 48)), data.draw(st.integers(1, 48))
        row = 1 + (width * CHANNELS.get(color, 1) * depth + 7) // 8
        kinds = st.integers(0, 4) if data.draw(st.integers(0, 3)) else st.integers(0, 255)  # mostly valid filters
        filters = data.draw(st.lists(kinds, min_size=height, max_size=height))
        noise = data.draw(st.binary(min_size=row - 1, max_size=row - 1))
        idat = zlib.compress(b"".join(bytes([f]) + noise for f in filters))
        body = _png_chunk(b"IDAT", idat) + _png_chunk(b"IEND", b"")
        if color == 3 and data.draw(st.booleans()):
            body = _png_chunk(b"PLTE", data.draw(st.binary(min_size=3, max_size=768))) + body
    else:
        width, height = data.draw(SIDES), data.draw(SIDES)
        body = SEEDS[data.draw(st.sampled_from(["rgb-png", "rgba-png", "1-bit-png"]))][33:]
    ihdr = struct.pack(">IIBBBBB", width, height, depth, color, compression, filtering, interlace)
    assert_decodes_or_4xx(PNG_MAGIC + _png_chunk(b"IHDR", ihdr) + body)


@FUZZ
@given(st.sampled_from(["cifar-jpeg", "progressive-jpeg", "grayscale-jpeg"]), SIDES, SIDES,
       st.lists(st.tuples(st.integers(0, 400), st.integers(0, 255)), max_size=6))
def test_decode_jpeg_with_a_lying_frame_header(seed, width, height, edits):
    """Structure-aware: the SOF frame's declared size rewritten, plus a few edits in the headers before it."""
    data = bytearray(SEEDS[seed])
    at = max(data.find(b"\xff\xc0"), data.find(b"\xff\xc2"))
    assert at > 0
    data[at + 5:at + 9] = struct.pack(">HH", min(height, 65535), min(width, 65535))
    for offset, value in edits:
        data[min(2 + offset, len(data) - 1)] = value
    assert_decodes_or_4xx(bytes(data))


# -- (b) API fuzzing from the server's OpenAPI schema -----------------------------------------------------------

AUTH_HEADERS = ("authorization", "x-api-key")
POSITIVE, NEGATIVE = GenerationMode.POSITIVE, GenerationMode.NEGATIVE
# (method, path, fixed path parameters, generation modes, examples per mode). Negative mode needs
# something it can make invalid (a typed parameter or a body schema); a free-form string path parameter
# is not enough (hypothesis reports Unsatisfiable), so those operations run positive only. The
# repository load/unload operations are left out on purpose: unloading the model is destructive and is
# already a known bug (test_hostile.test_clients_cannot_unload_the_model).
OPERATIONS = [
    ("POST", "/classify/image", None, (POSITIVE, NEGATIVE), 80),
    ("POST", "/classify/batch", None, (POSITIVE, NEGATIVE), 50),
    ("POST", "/classify/jobs", None, (POSITIVE, NEGATIVE), 40),
    ("GET", "/classify/jobs/{job_id}", None, (POSITIVE,), 20),
    ("DELETE", "/classify/jobs/{job_id}", None, (POSITIVE,), 10),
    ("POST", "/v2/models/{model_name}/infer", {"model_name": MODEL}, (POSITIVE, NEGATIVE), 100),
    ("POST", "/v2/models/{model_name}/infer", None, (POSITIVE, NEGATIVE), 20),
    ("POST", "/v1/models/{model_name}:predict", None, (POSITIVE,), 20),
    ("POST", "/v1/models/{model_name}:predict", {"model_name": MODEL}, (POSITIVE,), 10),
    ("POST", "/v1/models/{model_name}:explain", {"model_name": MODEL}, (POSITIVE,), 5),
    ("GET", "/v2/models/{model_name}", None, (POSITIVE,), 10),
    ("GET", "/v2/models/{model_name}/ready", None, (POSITIVE,), 10),
    ("GET", "/v1/models/{model_name}", None, (POSITIVE,), 10),
    ("GET", "/health", None, (POSITIVE,), 3),
]

# KServe declares an optional `model_version` query parameter on the v2 routes; this single model has no
# versions, so any value is a 404. It is taken out of the schema for the main runs so that they explore
# the other inputs, and fuzzed on its own below.
VERSIONED = [(m, p) for m, p, *_ in OPERATIONS if p.startswith("/v2/models/")]


def error_shape_for_4xx(ctx, response, case):
    """Custom check: a 4xx body is exactly {"error": {"code": str, "message": str}} ({"error": str, "code": str}
    on the Open Inference Protocol's /v2/ routes)."""
    if 400 <= response.status_code < 500:
        error_fields(response.json(), case.path)


def _auth(server) -> dict:
    return {k: v for k, v in server.client.headers.items() if k.lower() in AUTH_HEADERS}


@pytest.fixture(scope="module")
def openapi_document(strict_server) -> dict:
    response = strict_server.client.get("/openapi.json")
    assert response.status_code == 200
    return response.json()


@pytest.fixture(scope="module")
def api_schema(openapi_document):
    document = copy.deepcopy(openapi_document)
    for path_item in document["paths"].values():
        for operation in path_item.values():
            operation["parameters"] = [p for p in operation.get("parameters", []) if p.get("name") != "model_version"]
    return schemathesis.openapi.from_dict(document)


def fuzz_operation(schema, server, method: str, path: str, path_parameters, mode, examples: int) -> list[int]:
    """Runs `examples` generated requests against the server; returns the statuses it got."""
    headers = _auth(server)
    strategy = schema[path][method].as_strategy(generation_mode=mode, path_parameters=path_parameters)
    statuses: list[int] = []

    @settings(max_examples=examples, deadline=None, derandomize=True, database=None,
              suppress_health_check=list(HealthCheck))
    @given(case=strategy)
    def fuzz(case):
        response = case.call(base_url=server.url, headers=headers, timeout=60)
        statuses.append(response.status_code)
        event(f"HTTP {response.status_code}")
        case.validate_response(response, checks=[not_a_server_error, status_code_conformance, error_shape_for_4xx],
                               headers=headers)

    fuzz()
    return statuses


@pytest.fixture(scope="module")
def gated_server():
    """API keys on (the fuzzer sends one) and a small rate limit, so that 401s and 429s are answered too."""
    srv = Server("--max_body_bytes", "200000", "--max_batch_files", "4", "--max_image_side", "512",
                 "--rate_limit_per_minute", "30", "--job_reads_per_minute", "10", env={"API_KEYS": "fuzz-key-0123456789"})
    srv.client.headers["X-API-Key"] = "fuzz-key-0123456789"
    yield srv
    srv.stop()


@pytest.mark.parametrize("method, path, path_parameters, mode, examples", [
    pytest.param(method, path, fixed, mode, examples, id=f"{method} {path}{' (model)' if fixed else ''} {mode.value}")
    for method, path, fixed, modes, examples in OPERATIONS for mode in modes])
@pytest.mark.parametrize("gates", ["open", "keys+rate limit"])
def test_api_operation_never_5xx_and_answers_only_documented_statuses(api_schema, request, gates, method, path,
                                                                       path_parameters, mode, examples):
    """Every operation, with the gates off (strict limits) and on (keys and a rate limit that the run passes):
    never a 5xx, every status one the document lists for it, every 4xx in the error shape."""
    server = request.getfixturevalue("strict_server" if gates == "open" else "gated_server")
    budget = examples if gates == "open" else max(3, examples // 4)
    statuses = fuzz_operation(api_schema, server, method, path, path_parameters, mode, budget)
    assert statuses, "no request was generated"
    assert server.client.get("/health").status_code == 200


@pytest.mark.parametrize("method, path", [pytest.param(m, p, id=f"{m} {p}") for m, p in dict.fromkeys(VERSIONED)])
def test_api_operation_with_model_version_never_5xx(openapi_document, strict_server, method, path):
    """Model versions (KServe's 501 NotImplementedError before) get our 404 not_supported."""
    schema = schemathesis.openapi.from_dict(copy.deepcopy(openapi_document))
    fuzz_operation(schema, strict_server, method, path, {"model_name": MODEL}, POSITIVE, 10)


# -- the v1 body is not described by the schema (KServe reads it raw): fuzz it with hypothesis directly ----------
JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=20)
B64 = st.one_of(st.text(max_size=40), mutated().map(lambda data: base64.b64encode(data).decode()))
INSTANCE = st.one_of(JSON, st.fixed_dictionaries({"b64": B64}), st.fixed_dictionaries({"image": st.fixed_dictionaries({"b64": B64})}))
V1_BODY = st.one_of(JSON, st.fixed_dictionaries({"instances": st.one_of(JSON, st.lists(INSTANCE, max_size=5))}))


@settings(max_examples=120, deadline=None, derandomize=True, database=None, suppress_health_check=list(HealthCheck))
@given(body=V1_BODY)
def test_v1_predict_arbitrary_json_never_5xx(strict_server, body):
    response = strict_server.client.post(f"/v1/models/{MODEL}:predict", json=body)
    event(f"HTTP {response.status_code}")
    assert response.status_code < 500, response.text
    if response.status_code >= 400:
        error = response.json()["error"]
        assert set(error) == {"code", "message"}, response.text
    else:
        assert len(response.json()["predictions"]) == len(body["instances"])
