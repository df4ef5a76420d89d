"""Every failure, ours and KServe's, as the error a client gets: `as_api_error` maps an exception once, for
HTTP (the app's handlers: {"error": {"code", "message"}}) and for gRPC (its status code)."""

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from kserve import errors as kserve_errors
from starlette.exceptions import HTTPException

from predictor.serving.errors import (
    ApiError,
    DeadlineExceeded,
    InferenceFailed,
    InternalError,
    InvalidRequest,
    NotFound,
    Unavailable,
    error_response,
)

log = logging.getLogger("predictor")
_CODES = {400: "bad_request", 401: "unauthorized", 404: "not_found", 405: "method_not_allowed", 413: "payload_too_large",
          415: "unsupported_media_type", 422: "invalid_request", 429: "rate_limited", 503: "unavailable"}


async def _http_error(_: Request, exc: HTTPException):
    return error_response(exc.status_code, _CODES.get(exc.status_code, "http_error"), str(exc.detail), exc.headers)


async def _validation_error(_: Request, exc: RequestValidationError):
    problems = "; ".join(f"{'.'.join(str(p) for p in e.get('loc', ()))}: {e.get('msg')}" for e in exc.errors())
    return error_response(422, "invalid_request", problems or "The request does not match the API.")


def as_api_error(exc: Exception, where: str) -> ApiError:
    """Whatever a request raised, as the error its client gets, over HTTP and gRPC alike; an unexpected
    one is a bug: logged with `where` and its traceback, the client learns nothing of the internals."""
    if isinstance(exc, ApiError):
        return exc
    if isinstance(exc, TimeoutError):
        return DeadlineExceeded()
    if isinstance(exc, kserve_errors.InvalidInput):
        return InvalidRequest("invalid_request", str(exc))
    if isinstance(exc, kserve_errors.ModelNotFound):
        return NotFound("model_not_found", str(exc))
    if isinstance(exc, (kserve_errors.ModelNotReady, kserve_errors.ServerNotReady, kserve_errors.ServerNotLive)):
        return Unavailable("model_not_ready", str(exc))
    if isinstance(exc, kserve_errors.InferenceError):
        return InferenceFailed("inference_error", str(exc))
    if isinstance(exc, NotImplementedError):
        # KServe raises it for what this single, unversioned model does not offer (model versions):
        # the client asked for something that is not here.
        return NotFound("not_supported", str(exc) or "Not supported by this predictor.")
    log.error("%s: unexpected %s", where, type(exc).__name__, exc_info=exc)
    return InternalError("internal_error", "Internal server error.")


async def _mapped(request: Request, exc: Exception):
    return as_api_error(exc, f"{request.method} {request.url.path}").response()


_HANDLERS = {
    ApiError: _mapped,
    HTTPException: _http_error,
    RequestValidationError: _validation_error,
    kserve_errors.InvalidInput: _mapped,
    kserve_errors.ModelNotFound: _mapped,
    kserve_errors.ModelNotReady: _mapped,
    kserve_errors.InferenceError: _mapped,
    NotImplementedError: _mapped,
    Exception: _mapped,
}


def install_error_handlers(app: FastAPI) -> None:
    """Ours for every exception type, replacing KServe's plain-string ones where both exist."""
    for exc_type, handler in _HANDLERS.items():
        app.add_exception_handler(exc_type, handler)
