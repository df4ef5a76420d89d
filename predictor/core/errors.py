"""The domain's errors: one class per kind of failure, each with a stable machine-readable `code` and a
message a client may read. They know no transport: each edge maps the kind (the class) to its protocol
once (HTTP statuses and the JSON shapes: predictor.serving.http_errors; gRPC codes:
predictor.serving.grpc_server)."""


class ApiError(Exception):
    """A failure a client sees: raised by whatever finds the problem, rendered only at the edges.
    `headers` are hints for the response (Retry-After, WWW-Authenticate) that each edge carries in its
    own way (HTTP headers, gRPC trailing metadata)."""

    def __init__(self, code: str, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.code = code
        self.message = message
        self.headers = headers

    def body(self) -> dict:
        """The error as our routes answer it, and as a failed image's slot in a batch or job result."""
        return {"error": {"code": self.code, "message": self.message}}


class InvalidRequest(ApiError):
    """The input breaks a rule: malformed body, bad image, wrong tensor, unknown parameter."""


class UnprocessableRequest(ApiError):
    """A well-formed body without a required field (FastAPI's own status for its validation errors)."""


class Unauthorized(ApiError):
    """No API key, or not a valid one."""


class NotFound(ApiError):
    """No such route, model, version, job or asset (or not one the caller may see)."""


class MethodNotAllowed(ApiError):
    """The path exists, but not for this method (`allowed`: the methods it has)."""

    def __init__(self, method: str, allowed: str):
        super().__init__("method_not_allowed", f"{method} is not allowed here; use {allowed}.", {"Allow": allowed})


class Conflict(ApiError):
    """The resource's state forbids the call (cancelling a finished job)."""


class PayloadTooLarge(ApiError):
    """Too many bytes, files, pixels or images."""


class UnsupportedMediaType(ApiError):
    """Not JPEG/PNG, or a body encoding the server does not decode."""


class RateLimited(ApiError):
    """The caller's token bucket is empty."""


class InternalError(ApiError):
    """A bug: the message names no internals (the log has the traceback)."""


class InferenceFailed(ApiError):
    """The forward pass failed; retrying may succeed (the engine's own error is in the log only)."""


class Unimplemented(ApiError):
    """A protocol operation this predictor refuses (the model repository API)."""


class Unavailable(ApiError):
    """This replica cannot serve the call now: not ready, shutting down, a dependency down, saturated."""


class DeadlineExceeded(ApiError):
    """The call did not complete within its deadline (`timeout_s`, when the caller knows it)."""

    def __init__(self, timeout_s: float | None = None):
        within = "its deadline" if timeout_s is None else f"{timeout_s:g} s"
        super().__init__("deadline_exceeded", f"The request did not complete within {within}.")


class Overloaded(Unavailable):
    """A call shed because the replica is saturated; whoever sheds counts it (predictor_shed_requests_total)."""

    def __init__(self, reason: str):
        super().__init__("overloaded", f"{reason}; retry shortly.", {"Retry-After": "1"})
