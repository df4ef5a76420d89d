"""The error format for every failure on the app, ours and KServe's: {"error": {"code", "message"}}."""

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from kserve import errors as kserve_errors
from starlette.exceptions import HTTPException

from predictor.serving.errors import ApiError, error_response

log = logging.getLogger("predictor")
_CODES = {400: "bad_request", 401: "unauthorized", 404: "not_found", 405: "method_not_allowed", 413: "payload_too_large",
          415: "unsupported_media_type", 422: "invalid_request", 429: "rate_limited", 503: "unavailable"}


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
    # (model versions): the client asked for something that is not here.
    return error_response(404, "not_supported", str(exc) or "Not supported by this predictor.")


async def _internal_error(request: Request, exc: Exception):
    # A bug, not the client's doing: the details go to the log; the client learns nothing of the internals.
    log.error("%s %s: unexpected %s", request.method, request.url.path, type(exc).__name__, exc_info=exc)
    return error_response(500, "internal_error", "Internal server error.")


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


def install_error_handlers(app: FastAPI) -> None:
    """Ours for every exception type, replacing KServe's plain-string ones where both exist."""
    for exc_type, handler in _HANDLERS.items():
        app.add_exception_handler(exc_type, handler)
