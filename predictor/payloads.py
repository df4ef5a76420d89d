"""Request bodies of every protocol -> image bytes, and probabilities -> each protocol's response."""

import base64
import binascii
import struct
from datetime import datetime, timezone

import numpy as np
import orjson
from kserve.protocol.infer_type import InferInput, InferOutput, InferRequest, InferResponse
from kserve.protocol.rest.v2_datamodels import InferenceRequest
from pydantic import ValidationError

from predictor.cifar import CLASSES, IMAGE_SIZE
from predictor.core.errors import ApiError, InvalidRequest, PayloadTooLarge, UnprocessableRequest

PIXELS_SHAPE = [-1, IMAGE_SIZE, IMAGE_SIZE, 3]
V2_INPUTS = [
    {"name": "image", "datatype": "BYTES", "shape": [-1],
     "parameters": {"content": "a JPEG or PNG file per element: base64 in JSON, the file's bytes over gRPC and the binary-data extension"}},
    {"name": "pixels", "datatype": "UINT8", "shape": PIXELS_SHAPE,
     "parameters": {"content": "RGB images, HWC, already 32x32 (JSON, binary-data extension or gRPC)"}},
]
V2_OUTPUTS = [
    {"name": "probabilities", "datatype": "FP32", "shape": [-1, len(CLASSES)]},
    {"name": "label", "datatype": "BYTES", "shape": [-1]},
]
V2_OUTPUT_NAMES = tuple(o["name"] for o in V2_OUTPUTS)
# What `GET /v2` and gRPC ServerMetadata advertise: the binary-data extension of v2 REST is served; the
# model repository extension is not (a 404 over HTTP, UNIMPLEMENTED over gRPC).
SERVER_EXTENSIONS = ["binary_tensor_data"]


def b64decode(text: object, where: str) -> bytes:
    if not isinstance(text, str):
        raise InvalidRequest("invalid_base64", f"{where}: expected a base64 string.")
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise InvalidRequest("invalid_base64", f"{where}: not valid base64.") from None


def json_object(body: bytes) -> dict:
    """A JSON body sent without a JSON content type (e.g. plain `curl -d`)."""
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise InvalidRequest("invalid_json", f"The body is neither an image nor valid JSON: {exc}") from None


def v2_request(body: bytes, json_length: int | None, model_name: str) -> InferRequest:
    """A v2 REST body -> InferRequest: all JSON, or (the binary-data extension, `json_length` given, its
    framing already checked by the guard) a JSON header followed by the binary inputs' bytes, which stay
    bytes (kserve 0.21's own parser turns them into Python lists, and BYTES elements into text). The
    JSON is held to the OIP schema (KServe's InferenceRequest model): a body that breaks it is a 422."""
    if json_length is None:
        validate = lambda: InferenceRequest.model_validate_json(body)  # noqa: E731
    else:
        try:
            header = orjson.loads(body[:json_length])
        except orjson.JSONDecodeError as exc:
            raise InvalidRequest("invalid_json", f"The JSON header is not valid JSON: {exc}") from None
        inputs = header.get("inputs") if isinstance(header, dict) else None
        for item in inputs if isinstance(inputs, list) else ():
            if isinstance(item, dict) and isinstance(item.get("parameters"), dict) and "binary_data_size" in item["parameters"]:
                item.setdefault("data", [])  # the schema wants data; these inputs carry theirs after the header
        validate = lambda: InferenceRequest.model_validate(header)  # noqa: E731  (the dict, not a second parse)
    try:
        request = InferRequest.from_inference_request(validate(), model_name)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(str(p) for p in ('body', *e['loc']))}: {e['msg']}" for e in exc.errors())
        raise UnprocessableRequest("invalid_request", problems) from None
    at = json_length or 0
    for tensor in request.inputs if json_length is not None else ():
        size = (tensor.parameters or {}).get("binary_data_size")
        if size is not None:
            tensor._raw_data, tensor._data, at = body[at:at + size], None, at + size
    return request


def v1_instances(body: dict, max_images: int) -> list[bytes]:
    """{"instances": [{"image": {"b64": ...}} | {"b64": ...}, ...]} -> image bytes per instance."""
    instances = body.get("instances") if isinstance(body, dict) else None
    if not isinstance(instances, list) or not instances:
        raise InvalidRequest("invalid_request", 'Expected {"instances": [{"image": {"b64": "..."}}, ...]} with at least one instance.')
    if len(instances) > max_images:
        raise PayloadTooLarge("too_many_images", f"{len(instances)} instances exceed the limit of {max_images}.")
    out = []
    for i, instance in enumerate(instances):
        image = instance.get("image", instance) if isinstance(instance, dict) else None
        if not isinstance(image, dict) or "b64" not in image:
            raise InvalidRequest("invalid_request", f'instances[{i}]: expected {{"image": {{"b64": "..."}}}}.')
        out.append(b64decode(image["b64"], f"instances[{i}].image.b64"))
    return out


# The OIP parameters this server reads, with the type each must have (Triton refuses any other type).
_BOOLEAN_PARAMETERS = {"binary_data_output": "the request", "binary_data": "an output"}


def _check_parameters(parameters: object, where: str) -> None:
    for name, value in (parameters or {}).items() if isinstance(parameters, dict) else ():
        if name in _BOOLEAN_PARAMETERS and not isinstance(value, bool):
            raise InvalidRequest("invalid_parameter", f"Parameter {name!r} of {where} must be true or false.")


def _listed_pixels(data: list, name: str, shape: list[int]) -> np.ndarray:
    """UINT8 data given as numbers (JSON, or gRPC's typed contents) -> pixels, refusing what Triton
    refuses: any element that is not an integer from 0 to 255 (floats, strings, booleans, nulls), and a
    count that does not match the shape."""
    try:
        values = np.asarray(data, dtype=object).reshape(-1)
    except ValueError:
        values = None  # ragged nesting
    expected = int(np.prod(shape))
    if values is None or len(values) != expected:
        raise InvalidRequest("invalid_tensor", f"UINT8 data of {name!r} must hold {expected} values for shape {shape}.")
    if set(map(type, values)) - {int}:  # bool is a subclass of int, not int itself
        raise InvalidRequest("invalid_tensor", f"UINT8 data of {name!r} must be integers from 0 to 255.")
    pixels = values.astype(np.int64)
    if len(pixels) and (pixels.min() < 0 or pixels.max() > 255):
        raise InvalidRequest("invalid_tensor", f"UINT8 data of {name!r} must be integers from 0 to 255.")
    return pixels.astype(np.uint8).reshape(shape)


def v2_input(request: InferRequest, max_images: int) -> tuple[list[bytes] | None, np.ndarray | None]:
    """The single v2 input -> (encoded images, None) for BYTES or (None, pixels [N,32,32,3]) for UINT8."""
    unknown = [o.name for o in request.request_outputs or () if o.name not in V2_OUTPUT_NAMES]
    if unknown:
        raise InvalidRequest("unknown_output", f"Unknown output {unknown[0]!r}; the outputs are {', '.join(V2_OUTPUT_NAMES)}.")
    _check_parameters(request.parameters, "the request")
    for output in request.request_outputs or ():
        _check_parameters(output.parameters, f"output {output.name!r}")
    if len(request.inputs) != 1:
        raise InvalidRequest("invalid_request", f"Expected exactly one input ('image' BYTES or 'pixels' UINT8), got {len(request.inputs)}.")
    tensor: InferInput = request.inputs[0]
    shape = list(tensor.shape or [])
    count = shape[0] if shape else 0
    if count > max_images:
        raise PayloadTooLarge("too_many_images", f"{count} images exceed the limit of {max_images}.")
    if tensor.datatype == "BYTES":
        # JSON carries base64 strings; gRPC carries the files themselves as bytes.
        try:
            items = list(tensor.as_numpy().reshape(-1)) if len(shape) == 1 else []
        except (ValueError, TypeError):
            items = []
        except struct.error:  # raw BYTES (gRPC, binary extension): a 4-byte length prefix runs past the data
            raise InvalidRequest("invalid_tensor", f"BYTES data of {tensor.name!r} is malformed: an element's length "
                                                  "prefix runs past the data.") from None
        if len(items) != count or count < 1:
            raise InvalidRequest("invalid_shape", f"BYTES input must have shape [N] with N >= 1 images, got shape {shape}.")
        return [item if isinstance(item, bytes) else b64decode(item, f"{tensor.name}[{i}]")
                for i, item in enumerate(items)], None
    if tensor.datatype == "UINT8":
        if len(shape) != 4 or shape[1:] != PIXELS_SHAPE[1:] or count < 1:
            raise InvalidRequest("invalid_shape", f"UINT8 input must have shape [N, 32, 32, 3], got {shape}.")
        if isinstance(tensor.data, list) and tensor._raw_data is None:  # numbers, not raw bytes
            return None, _listed_pixels(tensor.data, tensor.name, shape)
        try:
            pixels = tensor.as_numpy()
        except (ValueError, TypeError, OverflowError):
            raise InvalidRequest("invalid_tensor", f"UINT8 data of {tensor.name!r} must hold {int(np.prod(shape))} "
                                                   f"bytes for shape {shape}.") from None
        return None, np.ascontiguousarray(pixels, dtype=np.uint8)
    raise InvalidRequest("unsupported_datatype", f"Input datatype {tensor.datatype} is not accepted; use BYTES (JPEG or PNG files; base64 in JSON) or UINT8 [N,32,32,3].")


def classification(probabilities: np.ndarray, top_k: int | None = None) -> dict:
    """One image's result in the seed's shape (plus top_k when asked for)."""
    best = int(probabilities.argmax())
    result = {
        "predicted_class": CLASSES[best],
        "confidence": round(float(probabilities[best]), 6),
        "all_probabilities": {name: round(float(p), 6) for name, p in zip(CLASSES, probabilities)},
    }
    if top_k:
        order = np.argsort(-probabilities)[:top_k]
        result["top_k"] = [{"class": CLASSES[i], "probability": round(float(probabilities[i]), 6)} for i in order]
    return result


def timestamp() -> str:
    return datetime.now(timezone.utc).isoformat()


def v2_response(request: InferRequest, model_name: str, version: str, probabilities: np.ndarray) -> InferResponse:
    """The outputs the request asked for (`outputs`; none named: both), each in binary form over REST when
    its `binary_data` (or the request's `binary_data_output`) says so."""
    labels = np.array([CLASSES[i] for i in probabilities.argmax(1)], dtype=np.object_)
    outputs = [
        InferOutput("probabilities", list(probabilities.shape), "FP32", data=probabilities.astype(np.float32)),
        InferOutput("label", [len(labels)], "BYTES", data=labels),
    ]
    if request.from_grpc:  # gRPC answers carry typed contents (fp32_contents, bytes_contents) unless raw is asked
        outputs[0].set_data_from_numpy(outputs[0].data, binary_data=False)
        outputs[1].set_data_from_numpy(labels, binary_data=False)
    # Over REST the arrays stay: InferResponse.to_rest renders each once, as JSON or binary as asked.
    requested = request.request_outputs or None
    if requested:
        by_name = {o.name: o for o in outputs}
        outputs = [by_name[r.name] for r in requested]
    return InferResponse(response_id=request.id, model_name=model_name, model_version=version, infer_outputs=outputs,
                         requested_outputs=requested, use_binary_outputs=request.use_binary_outputs)


# Bytes per element of the fixed-size v2 datatypes (BYTES elements carry their own lengths).
_V2_ITEM_SIZES = {"BOOL": 1, "UINT8": 1, "INT8": 1, "UINT16": 2, "INT16": 2, "FP16": 2, "BF16": 2,
                  "UINT32": 4, "INT32": 4, "FP32": 4, "UINT64": 8, "INT64": 8, "FP64": 8}


def v2_binary_framing_error(header_length: bytes, body: bytes) -> ApiError | None:
    """Why a v2 binary-data-extension body is inconsistent (KServe would fail on it with a 500), or None.

    The body is a JSON header of `header_length` bytes followed by each binary input's raw bytes;
    sizes must be whole numbers that match the shapes and add up to exactly what was sent.
    """
    def invalid(message: str) -> ApiError:
        return InvalidRequest("invalid_request", message)

    text = header_length.decode("latin-1").strip()
    if not text.isdigit() or not 0 < int(text) <= len(body):
        return invalid(f"Inference-Header-Content-Length {text!r} must be the JSON header's byte length "
                       f"(1..{len(body)}).")
    try:
        inputs = orjson.loads(body[:int(text)]).get("inputs")
    except (orjson.JSONDecodeError, AttributeError):
        return None  # not a JSON object: KServe's parser reports that precisely
    declared = 0
    for item in inputs if isinstance(inputs, list) else []:
        parameters = item.get("parameters") if isinstance(item, dict) else None
        if not isinstance(parameters, dict) or "binary_data_size" not in parameters:
            continue
        name, size, shape = item.get("name"), parameters["binary_data_size"], item.get("shape")
        if type(size) is not int or size < 0:
            return invalid(f"input {name!r}: binary_data_size must be a non-negative integer, got {size!r}.")
        if item.get("datatype") == "BYTES":  # its elements carry their own lengths: checked when inlined
            declared += size
            continue
        item_size = _V2_ITEM_SIZES.get(item.get("datatype"))
        if item_size is None or not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
            return invalid(f"input {name!r}: binary data needs a fixed-size datatype and a shape of non-negative integers.")
        if int(np.prod(shape, dtype=np.int64)) * item_size != size:
            return invalid(f"input {name!r}: shape {shape} of {item['datatype']} is {int(np.prod(shape)) * item_size} "
                           f"bytes, but binary_data_size says {size}.")
        declared += size
    if declared != len(body) - int(text):
        return invalid(f"The binary inputs declare {declared} bytes but {len(body) - int(text)} follow the JSON header.")
    return None

