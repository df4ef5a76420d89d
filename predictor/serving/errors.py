"""The one error type every request path raises, rendered as {"error": {"code", "message"}}; on the
Open Inference Protocol's routes (/v2/...) as the protocol's {"error": "<message>"}, the code beside it."""

from contextvars import ContextVar

from starlette.exceptions import HTTPException
from starlette.responses import JSONResponse

from predictor.serving import metrics


class ApiError(HTTPException):
    """A client-visible failure with its HTTP status and a stable machine-readable code.

    It is an HTTPException so that FastAPI re-raises it untouched when it surfaces while a request
    body is being parsed (otherwise FastAPI turns any parsing failure into a generic 400).
    """

    def __init__(self, status: int, code: str, message: str, headers: dict[str, str] | None = None):
        super().__init__(status_code=status, detail=message, headers=headers)
        self.status = status
        self.code = code
        self.message = message

    def body(self) -> dict:
        return {"error": {"code": self.code, "message": self.message}}

    def response(self) -> JSONResponse:
        return error_response(self.status, self.code, self.message, self.headers)


def overloaded(reason: str) -> ApiError:
    """The 503 for a call shed because the replica is saturated (counted in predictor_shed_requests_total)."""
    metrics.SHED.inc()
    return ApiError(503, "overloaded", f"{reason}; retry shortly.", {"Retry-After": "1"})


# Set by the guard for each request: True on the OIP routes, whose clients (tritonclient, KServe's
# InferenceRESTClient) read `error` as a string.
OIP_ERRORS: ContextVar[bool] = ContextVar("oip_errors", default=False)


def error_response(status: int, code: str, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    """The error format as a response (an ASGI app too, for middleware that answers before routing)."""
    body = {"error": message, "code": code} if OIP_ERRORS.get() else {"error": {"code": code, "message": message}}
    return JSONResponse(body, status_code=status, headers=headers)
