"""Errors in OpenAI's shape: `{"error": {"message", "type", "param", "code"}}` with an HTTP status."""

from __future__ import annotations

from starlette.responses import JSONResponse

from ..errors import AdapterError, EdgeftError, InputError


class ApiError(Exception):
    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def _from_edgeft(e: EdgeftError, param: str | None = None) -> ApiError:
    msg = str(e)
    if isinstance(e, AdapterError) and e.message.startswith(("unknown adapter", "adapter not found")):
        return ApiError(404, msg, param=param or "model", code="model_not_found")
    if isinstance(e, (InputError, AdapterError)):
        return ApiError(400, msg, param=param)
    return ApiError(500, msg, type="server_error", code="internal_error")


def _internal(e: Exception) -> ApiError:
    """A bug's 500: the exception's type only, never a traceback to the client."""
    return ApiError(500, f"internal error: {type(e).__name__}", type="server_error", code="internal_error")


def _shutting_down() -> ApiError:
    return ApiError(503, "the server is shutting down", type="server_error", code="shutting_down")


def _bad(message: str, param: str | None = None, code: str | None = None) -> ApiError:
    return ApiError(400, message, param=param, code=code)


def _utf8(text: str, param: str) -> str:
    """JSON may carry lone surrogates ("\\ud800"), which no tokenizer can take."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise _bad("text must be valid Unicode (no lone surrogates)", param) from None
    return text
