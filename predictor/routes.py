"""The seed's routes on KServe's own FastAPI app, plus the error format and HTTP guards for all routes.

Importing this module registers everything on `kserve.model_server.app`, so the routes are served by
KServe's ModelServer and by every worker process it spawns.
"""

import time
import warnings
from contextlib import asynccontextmanager

import orjson

from fastapi import File, Query, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from kserve import errors as kserve_errors
from kserve.model_server import app
from starlette.exceptions import HTTPException

from . import metrics
from .errors import ApiError
from .model import ClassifyRequest, active_model
from .payloads import timestamp

# KServe's app uses ORJSONResponse, which FastAPI now flags on every response; nothing to act on.
warnings.filterwarnings("ignore", message=".*ORJSONResponse is deprecated.*")

# Routes whose calls count in api_requests_total / api_request_latency_seconds.
PREDICTION_ROUTES = {"/classify/image", "/classify/batch", "/v1/models/{model_name}:predict", "/v2/models/{model_name}/infer"}
_CODES = {400: "bad_request", 401: "unauthorized", 404: "not_found", 405: "method_not_allowed", 413: "payload_too_large",
          415: "unsupported_media_type", 422: "invalid_request", 429: "rate_limited", 503: "unavailable"}


def _error(status: int, code: str, message: str, headers: dict | None = None) -> JSONResponse:
    return JSONResponse({"error": {"code": code, "message": message}}, status_code=status, headers=headers)


def _serving_model():
    model = active_model()
    if model is None or not model.ready:
        raise ApiError(503, "model_not_ready", "The model is not loaded yet.")
    return model


# -- routes ------------------------------------------------------------------------------------
@app.post("/classify/image", tags=["classify"], summary="Classify one uploaded image")
async def classify_image(request: Request, file: UploadFile = File(..., description="JPEG or PNG image"),
                         top_k: int | None = Query(None, ge=1, le=10, description="also return the k best classes")):
    """Multipart field `file` -> the seed's JSON: predicted_class, confidence, all_probabilities, timestamp."""
    model = _serving_model()
    response, _ = await model(ClassifyRequest([await file.read()], top_k), dict(request.headers))
    result = response["results"][0]
    if isinstance(result, ApiError):
        raise result
    return {**result, "timestamp": timestamp(), "model_version": model.version}


@app.post("/classify/batch", tags=["classify"], summary="Classify several uploaded images")
async def classify_batch(request: Request, files: list[UploadFile] = File(..., description="JPEG or PNG images"),
                         top_k: int | None = Query(None, ge=1, le=10)):
    """Multipart fields `files` -> {"results": [...]} in input order; a bad file gets an error object in its slot."""
    model = _serving_model()
    limit = model.settings.max_batch_files
    if len(files) > limit:
        raise ApiError(413, "too_many_files", f"{len(files)} files exceed the limit of {limit} per request.")
    response, _ = await model(ClassifyRequest([await f.read() for f in files], top_k), dict(request.headers))
    results = [r.body() if isinstance(r, ApiError) else r for r in response["results"]]
    return {"results": results, "timestamp": timestamp(), "model_version": model.version}


@app.get("/health", tags=["health"], summary="Model loaded and a forward pass succeeded")
async def health():
    model = active_model()
    if model is None or not (model.ready and model.forward_ok):
        return _error(503, "model_not_ready", "The model is not loaded yet.")
    return {"status": "healthy", "model_loaded": True, **model.metadata}


# -- error format: every failure is {"error": {"code", "message"}} ----------------------------------
async def _api_error(_: Request, exc: ApiError):
    return _error(exc.status, exc.code, exc.message, exc.headers)


async def _http_error(_: Request, exc: HTTPException):
    return _error(exc.status_code, _CODES.get(exc.status_code, "http_error"), str(exc.detail), exc.headers)


async def _validation_error(_: Request, exc: RequestValidationError):
    problems = "; ".join(f"{'.'.join(str(p) for p in e.get('loc', ()))}: {e.get('msg')}" for e in exc.errors())
    return _error(422, "invalid_request", problems or "The request does not match the API.")


async def _kserve_invalid_input(_: Request, exc: Exception):
    return _error(400, "invalid_request", str(exc))


async def _kserve_model_not_found(_: Request, exc: Exception):
    return _error(404, "model_not_found", str(exc))


async def _kserve_model_not_ready(_: Request, exc: Exception):
    return _error(503, "model_not_ready", str(exc))


async def _kserve_inference_error(_: Request, exc: Exception):
    return _error(500, "inference_error", str(exc))


async def _internal_error(_: Request, exc: Exception):
    return _error(500, "internal_error", f"{type(exc).__name__}: {exc}")


_HANDLERS = {
    ApiError: _api_error,
    HTTPException: _http_error,
    RequestValidationError: _validation_error,
    kserve_errors.InvalidInput: _kserve_invalid_input,
    kserve_errors.ModelNotFound: _kserve_model_not_found,
    kserve_errors.ModelNotReady: _kserve_model_not_ready,
    kserve_errors.InferenceError: _kserve_inference_error,
    Exception: _internal_error,
}


def install_error_handlers() -> None:
    for exc_type, handler in _HANDLERS.items():
        app.add_exception_handler(exc_type, handler)


@asynccontextmanager
async def _lifespan(_app):
    # KServe registers its own handlers (plain-string errors) just before the server starts; put ours
    # back on top and have Starlette rebuild its middleware stack with them on the next request.
    install_error_handlers()
    app.middleware_stack = None
    yield


install_error_handlers()
app.router.lifespan_context = _lifespan


# -- HTTP guards: body size limit and the seed's request metrics ----------------------------------
class RequestGuard:
    """Pure-ASGI middleware: refuses oversized bodies early and records the api_* metrics."""

    def __init__(self, asgi_app):
        self.app = asgi_app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        model = active_model()
        limit = model.settings.max_body_bytes if model else None
        started = time.perf_counter()
        status = {"code": 500}

        async def send_and_record(message):
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        if limit is not None and scope["method"] in ("POST", "PUT", "PATCH"):
            declared = dict(scope["headers"]).get(b"content-length")
            if declared is not None and declared.isdigit() and int(declared) > limit:
                await _error(413, "payload_too_large", f"Request body of {int(declared)} bytes exceeds the limit of {limit} bytes.")(
                    scope, receive, send_and_record)
                return self._record(scope, status["code"], started)
            receive = self._counting(receive, limit)
            if dict(scope["headers"]).get(b"inference-header-content-length") is not None:
                receive, refusal = await self._screen_v2_binary(scope, receive)
                if refusal is not None:
                    await refusal(scope, receive, send_and_record)
                    return self._record(scope, status["code"], started)
        try:
            await self.app(scope, receive, send_and_record)
        finally:
            self._record(scope, status["code"], started)

    @staticmethod
    def _counting(receive, limit: int):
        """A receive that stops a body (e.g. chunked, without Content-Length) once it passes the limit."""
        seen = 0

        async def counted():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    raise ApiError(413, "payload_too_large", f"Request body exceeds the limit of {limit} bytes.")
            return message

        return counted

    @staticmethod
    async def _screen_v2_binary(scope, receive):
        """Refuse BYTES inputs sent over the v2 binary-data extension, which kserve 0.21 garbles.

        Reads the (already size-limited) body, looks at the JSON header's inputs, and otherwise
        hands the body on unchanged. Returns (receive for the app, error response or None).
        """
        chunks, more = [], True
        while more:
            message = await receive()
            chunks.append(message.get("body", b""))
            more = message.get("more_body", False)
        body = b"".join(chunks)

        async def replay():
            nonlocal body
            message, body = {"type": "http.request", "body": body, "more_body": False}, b""
            return message

        declared = dict(scope["headers"]).get(b"inference-header-content-length", b"")
        try:
            header = orjson.loads(body[: int(declared)])
            binary_bytes = [i.get("name") for i in header.get("inputs", []) if i.get("datatype") == "BYTES"
                            and "binary_data_size" in (i.get("parameters") or {})]
        except (ValueError, TypeError, AttributeError):
            return replay, None  # malformed: KServe's parser gives the precise error
        if not binary_bytes:
            return replay, None
        return replay, _error(400, "unsupported_binary_bytes",
                              f"BYTES input(s) {binary_bytes} over the binary-data extension are not supported (kserve 0.21 "
                              "re-encodes them as text); send base64 strings in JSON, or a UINT8 'pixels' tensor as binary.")

    @staticmethod
    def _record(scope, code: int, started: float) -> None:
        route = scope.get("route")
        endpoint = getattr(route, "path", None) or scope["path"]
        if endpoint not in PREDICTION_ROUTES:
            return
        metrics.REQUESTS.labels(endpoint, "success" if code < 400 else "error", str(code)).inc()
        metrics.LATENCY.labels(endpoint).observe(time.perf_counter() - started)


app.add_middleware(RequestGuard)
