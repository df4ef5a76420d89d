"""The error types every request path raises (one per kind of failure, each with its HTTP status),
rendered as {"error": {"code", "message"}}; on the Open Inference Protocol's routes (/v2/...) as the
protocol's {"error": "<message>"}, the code beside it."""

from contextvars import ContextVar

from starlette.exceptions import HTTPException
from starlette.responses import JSONResponse


class ApiError(HTTPException):
    """A failure a client sees: a stable machine-readable `code` and a message; its kind (the subclass)
    decides the HTTP status, and the gRPC edge maps that status to a gRPC code
    (predictor.serving.grpc_server.status_code). Raised by whatever finds the problem, rendered only at
    the edges.

    It is an HTTPException so that FastAPI re-raises it untouched when it surfaces while a request
    body is being parsed (otherwise FastAPI turns any parsing failure into a generic 400).
    """

    status = 500

    def __init__(self, code: str, message: str, headers: dict[str, str] | None = None):
        super().__init__(status_code=self.status, detail=message, headers=headers)
        self.code = code
        self.message = message

    def body(self) -> dict:
        return {"error": {"code": self.code, "message": self.message}}

    def response(self) -> JSONResponse:
        return error_response(self.status, self.code, self.message, self.headers)


class InvalidRequest(ApiError):
    """The input breaks a rule: malformed body, bad image, wrong tensor, unknown parameter."""
    status = 400


class UnprocessableRequest(ApiError):
    """A well-formed body without a required field (FastAPI's own status for its validation errors)."""
    status = 422


class Unauthorized(ApiError):
    """No API key, or not a valid one."""
    status = 401


class NotFound(ApiError):
    """No such route, model, version, job or asset (or not one the caller may see)."""
    status = 404


class Conflict(ApiError):
    """The resource's state forbids the call (cancelling a finished job)."""
    status = 409


class PayloadTooLarge(ApiError):
    """Too many bytes, files, pixels or images."""
    status = 413


class UnsupportedMediaType(ApiError):
    """Not JPEG/PNG, or a body encoding the server does not decode."""
    status = 415


class RateLimited(ApiError):
    """The caller's token bucket is empty."""
    status = 429


class InternalError(ApiError):
    """A bug: the message names no internals (the log has the traceback)."""
    status = 500


class InferenceFailed(ApiError):
    """The forward pass failed; retrying may succeed (the engine's own error is in the log only)."""
    status = 500


class Unimplemented(ApiError):
    """A protocol operation this predictor refuses (the model repository API)."""
    status = 501


class Unavailable(ApiError):
    """This replica cannot serve the call now: not ready, shutting down, a dependency down, saturated."""
    status = 503


class DeadlineExceeded(ApiError):
    """The call did not complete within its deadline (`timeout_s`, when the caller knows it)."""
    status = 504

    def __init__(self, timeout_s: float | None = None):
        within = "its deadline" if timeout_s is None else f"{timeout_s:g} s"
        super().__init__("deadline_exceeded", f"The request did not complete within {within}.")


class Overloaded(Unavailable):
    """A call shed because the replica is saturated; whoever sheds counts it (predictor_shed_requests_total)."""

    def __init__(self, reason: str):
        super().__init__("overloaded", f"{reason}; retry shortly.", {"Retry-After": "1"})


# Set by the guard for each request: True on the OIP routes, whose clients (tritonclient, KServe's
# InferenceRESTClient) read `error` as a string.
OIP_ERRORS: ContextVar[bool] = ContextVar("oip_errors", default=False)


def error_response(status: int, code: str, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    """The error format as a response (an ASGI app too, for middleware that answers before routing)."""
    body = {"error": message, "code": code} if OIP_ERRORS.get() else {"error": {"code": code, "message": message}}
    return JSONResponse(body, status_code=status, headers=headers)
