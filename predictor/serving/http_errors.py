"""The HTTP edge's errors: every failure, ours and KServe's, as the response a client gets.

`as_api_error` maps any exception to its domain error once (the gRPC edge uses it too); `HTTP_STATUS`
maps each domain kind to its status; `error_response` renders it: {"error": {"code", "message"}} on
our routes, the Open Inference Protocol's {"error": "<message>"} (the code beside it) on /v2.
"""

import logging
from contextvars import ContextVar

import orjson
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from kserve import errors as kserve_errors
from starlette.exceptions import HTTPException
from starlette.responses import Response

from predictor.core.errors import (
    ApiError,
    Conflict,
    DeadlineExceeded,
    InferenceFailed,
    InternalError,
    InvalidRequest,
    MethodNotAllowed,
    NotFound,
    PayloadTooLarge,
    RateLimited,
    Unauthorized,
    Unavailable,
    Unimplemented,
    UnprocessableRequest,
    UnsupportedMediaType,
)

log = logging.getLogger("predictor")

# Each kind's status (a subclass, such as Overloaded, answers as its kind).
HTTP_STATUS: dict[type[ApiError], int] = {
    InvalidRequest: 400, Unauthorized: 401, NotFound: 404, MethodNotAllowed: 405, Conflict: 409, PayloadTooLarge: 413,
    UnsupportedMediaType: 415, UnprocessableRequest: 422, RateLimited: 429, InternalError: 500, InferenceFailed: 500,
    Unimplemented: 501, Unavailable: 503, DeadlineExceeded: 504,
}
# The framework's own HTTP errors (routing: 404, 405; FastAPI's body parsing: 400) by status, with our
# codes; any other status gets OTHER_HTTP_ERROR.
OTHER_HTTP_ERROR = "http_error"
STARLETTE_CODES = {400: "bad_request", 401: "unauthorized", 404: "not_found", 405: "method_not_allowed",
                    413: "payload_too_large", 415: "unsupported_media_type", 422: "invalid_request", 429: "rate_limited",
                    503: "unavailable"}

# Set by the guard for each request: True on the OIP routes, whose clients (tritonclient, KServe's
# InferenceRESTClient) read `error` as a string.
OIP_ERRORS: ContextVar[bool] = ContextVar("oip_errors", default=False)


def http_status(error: ApiError) -> int:
    """The HTTP status of a domain error's kind."""
    for kind in type(error).__mro__:
        if kind in HTTP_STATUS:
            return HTTP_STATUS[kind]
    return 500


def _body(code: str, message: str, oip: bool) -> bytes:
    return orjson.dumps({"error": message, "code": code} if oip else {"error": {"code": code, "message": message}})


def _response(status: int, code: str, message: str, headers: dict[str, str] | None = None) -> Response:
    return Response(_body(code, message, OIP_ERRORS.get()), status_code=status, headers=headers, media_type="application/json")


def error_response(error: ApiError) -> Response:
    """The domain error as a response (an ASGI app too, for middleware that answers before routing)."""
    return _response(http_status(error), error.code, error.message, error.headers)


def error_parts(error: ApiError, oip: bool) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
    """The same answer as raw (status, headers, body), for a writer below ASGI (the front door); `oip`:
    the OIP shape, as on the v2 routes."""
    body = _body(error.code, error.message, oip)
    headers = [(b"content-length", str(len(body)).encode()), (b"content-type", b"application/json"),
               *((name.lower().encode("latin-1"), value.encode("latin-1")) for name, value in (error.headers or {}).items())]
    return http_status(error), headers, body


class BodyRefused(HTTPException):
    """A domain error raised while FastAPI reads a body (the guard's size limit): FastAPI re-raises only
    HTTPExceptions from its body parsing (anything else becomes a generic 400), so it travels in one."""

    def __init__(self, error: ApiError):
        super().__init__(http_status(error), error.message, error.headers)
        self.error = error


def as_api_error(exc: Exception, where: str) -> ApiError:
    """Whatever a request raised, as the error its client gets, over HTTP and gRPC alike; an unexpected
    one is a bug: logged with `where` and its traceback, the client learns nothing of the internals."""
    if isinstance(exc, ApiError):
        return exc
    if isinstance(exc, BodyRefused):
        return exc.error
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


async def _http_error(_: Request, exc: HTTPException):
    if isinstance(exc, BodyRefused):
        return error_response(exc.error)
    return _response(exc.status_code, STARLETTE_CODES.get(exc.status_code, OTHER_HTTP_ERROR), str(exc.detail), exc.headers)


async def _validation_error(_: Request, exc: RequestValidationError):
    problems = "; ".join(f"{'.'.join(str(p) for p in e.get('loc', ()))}: {e.get('msg')}" for e in exc.errors())
    return error_response(UnprocessableRequest("invalid_request", problems or "The request does not match the API."))


async def _mapped(request: Request, exc: Exception):
    return error_response(as_api_error(exc, f"{request.method} {request.url.path}"))


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


async def handled(request: Request, exc: Exception) -> Response:
    """The answer the app's handlers give to `exc` (the most specific handler for its type, as Starlette
    picks it), for a caller that runs an endpoint without the app's exception middleware."""
    handler = next(_HANDLERS[kind] for kind in type(exc).__mro__ if kind in _HANDLERS)
    return await handler(request, exc)


def install_error_handlers(app: FastAPI) -> None:
    """Ours for every exception type, replacing KServe's plain-string ones where both exist."""
    for exc_type, handler in _HANDLERS.items():
        app.add_exception_handler(exc_type, handler)
