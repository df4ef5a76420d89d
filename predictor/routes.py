"""The seed's routes on KServe's own FastAPI app, plus the error format and HTTP guards for all routes.

Importing this module registers everything on `kserve.model_server.app`, so the routes are served by
KServe's ModelServer and by every worker process it spawns.
"""

import logging
import warnings
from contextlib import asynccontextmanager

from fastapi import File, Query, Request, Response, UploadFile
from fastapi.exceptions import RequestValidationError
from kserve import errors as kserve_errors
from kserve.model_server import app
from starlette.exceptions import HTTPException

from . import metrics
from .errors import ApiError, error_response
from .drain import Drain
from .guard import RequestGuard
from .model import ClassifyRequest, active_model
from .payloads import timestamp

# KServe's app uses ORJSONResponse, which FastAPI now flags on every response; nothing to act on.
warnings.filterwarnings("ignore", message=".*ORJSONResponse is deprecated.*")

log = logging.getLogger("predictor")
_CODES = {400: "bad_request", 401: "unauthorized", 404: "not_found", 405: "method_not_allowed", 413: "payload_too_large",
          415: "unsupported_media_type", 422: "invalid_request", 429: "rate_limited", 503: "unavailable"}


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


@app.get("/v2/models/{model_name}", tags=["V2"], summary="Model metadata (v2), with how it is being served")
async def v2_model_metadata(model_name: str, model_version: str | None = None):
    """KServe's v2 metadata, plus `versions` (the weights' sha256 prefix) and `parameters`: device,
    precision, compilation and load time, so an operator can see what a replica actually runs."""
    model = active_model()
    if model is None or model.name != model_name:
        raise ApiError(404, "model_not_found", f"Model with name {model_name} does not exist.")
    if model_version:
        raise ApiError(404, "not_supported", "Model versions are not served: this predictor serves one unversioned model.")
    return {"name": model.name, "versions": [model.version], "platform": "pytorch",
            "inputs": model.get_input_types(), "outputs": model.get_output_types(), "parameters": model.metadata}


@app.get("/health", tags=["health"], summary="Model loaded and a forward pass succeeded")
async def health():
    model = active_model()
    if model is None or not (model.ready and model.forward_ok):
        return error_response(503, "model_not_ready", "The model is not loaded yet.")
    return {"status": "healthy", "model_loaded": True, **model.metadata}


@app.get("/metrics", tags=["metrics"], summary="Prometheus metrics of this replica (every worker process)",
         include_in_schema=False)
async def prometheus_metrics(request: Request):
    # Registered before KServe adds its own /metrics (which reads only the answering worker), so it wins.
    body, content_type = metrics.exposition_of(request.headers.get("accept"))
    return Response(content=body, headers={"content-type": content_type})


# -- error format: every failure is {"error": {"code", "message"}} ----------------------------------
async def _api_error(_: Request, exc: ApiError):
    return exc.response()


async def _http_error(_: Request, exc: HTTPException):
    return error_response(exc.status_code, _CODES.get(exc.status_code, "http_error"), str(exc.detail), exc.headers)


async def _validation_error(_: Request, exc: RequestValidationError):
    problems = "; ".join(f"{'.'.join(str(p) for p in e.get('loc', ()))}: {e.get('msg')}" for e in exc.errors())
    return error_response(422, "invalid_request", problems or "The request does not match the API.")


async def _kserve_invalid_input(_: Request, exc: Exception):
    return error_response(400, "invalid_request", str(exc))


async def _kserve_model_not_found(_: Request, exc: Exception):
    return error_response(404, "model_not_found", str(exc))


async def _kserve_model_not_ready(_: Request, exc: Exception):
    return error_response(503, "model_not_ready", str(exc))


async def _kserve_inference_error(_: Request, exc: Exception):
    return error_response(500, "inference_error", str(exc))


async def _not_supported(_: Request, exc: Exception):
    # KServe raises NotImplementedError for features this single, unversioned model does not offer
    # (model versions, explain): the client asked for something that is not here.
    return error_response(404, "not_supported", str(exc) or "Not supported by this predictor.")


async def _internal_error(_: Request, exc: Exception):
    return error_response(500, "internal_error", f"{type(exc).__name__}: {exc}")


_HANDLERS = {
    ApiError: _api_error,
    HTTPException: _http_error,
    RequestValidationError: _validation_error,
    kserve_errors.InvalidInput: _kserve_invalid_input,
    kserve_errors.ModelNotFound: _kserve_model_not_found,
    kserve_errors.ModelNotReady: _kserve_model_not_ready,
    kserve_errors.InferenceError: _kserve_inference_error,
    NotImplementedError: _not_supported,
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
    # The server's own SIGTERM handler is in place by now; it runs once the admitted calls are done.
    model = active_model()
    Drain.chain_signal_handler(timeout_s=model.settings.drain_timeout_s if model is not None else 20)
    yield
    log.info("drained: %d admitted request(s) still in flight at exit", Drain.in_flight)


install_error_handlers()
app.router.lifespan_context = _lifespan


app.add_middleware(RequestGuard)
