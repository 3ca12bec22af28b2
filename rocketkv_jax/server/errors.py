"""Errors as OpenAI sends them: a status code and {"error": {"message", "type", "param",
"code"}}, so OpenAI's clients raise their usual exceptions (BadRequestError, ...)."""

from __future__ import annotations

from fastapi.responses import JSONResponse

# status -> OpenAI's error type
ERROR_TYPES = {
    400: "invalid_request_error",
    401: "invalid_request_error",
    404: "invalid_request_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
    500: "server_error",
    503: "server_error",
}


class APIError(Exception):
    """A request that fails with `status`; `param` names the field at fault, `code` is a
    machine-readable reason (e.g. "model_not_found"), `headers` go with the response."""

    def __init__(self, status: int, message: str, *, param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message,
                          "type": ERROR_TYPES.get(self.status, "invalid_request_error"),
                          "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)
