"""The one error type every request path raises, rendered as {"error": {"code", "message"}}."""

from starlette.exceptions import HTTPException
from starlette.responses import JSONResponse


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


def error_response(status: int, code: str, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    """The error format as a response (an ASGI app too, for middleware that answers before routing)."""
    return JSONResponse({"error": {"code": code, "message": message}}, status_code=status, headers=headers)
