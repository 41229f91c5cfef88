"""OpenAI-style errors: `{"error": {"message", "type", "param", "code"}}` with a matching HTTP status."""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException
from starlette.middleware.body_limit import MAX_BODY_SIZE_SCOPE_KEY

from f5_triton.errors import InvalidInputError

INVALID_REQUEST = "invalid_request_error"
AUTHENTICATION = "authentication_error"
NOT_FOUND = "not_found_error"
SERVER = "server_error"
UNAVAILABLE = "service_unavailable_error"
RETRY_AFTER_SECONDS = 2  # a busy server's streams end within seconds; a restarting model takes longer, and says so

log = logging.getLogger("f5_triton.gateway")


class APIError(Exception):
    """An error the gateway answers with; `param` names the request field at fault (or None)."""

    def __init__(self, status: int, message: str, type: str = INVALID_REQUEST, param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code

    def response(self) -> JSONResponse:
        body = {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}
        headers = {"WWW-Authenticate": "Bearer"} if self.status == 401 else {}
        if self.status == 503:  # the same request may succeed later: say when to try (RFC 9110, 10.2.3)
            headers["Retry-After"] = str(RETRY_AFTER_SECONDS)
        return JSONResponse(body, status_code=self.status, headers=headers or None)


def too_large(limit: int) -> APIError:
    """413 for a request body over the gateway's `limit` (bytes), naming it."""
    return APIError(413, f"request body is larger than the gateway's limit of {limit} bytes ({limit / 2**20:.1f} MiB)",
                    code="too_large")


def from_invalid_input(exc: InvalidInputError, fields: dict[str, str]) -> APIError:
    """Our InvalidInputError -> 400, its field renamed to the API's name (`fields`)."""
    message = str(exc)
    prefix = f"{exc.field}: "
    param = fields.get(exc.field, exc.field)
    if message.startswith(prefix):
        message = f"{param}: {message[len(prefix):]}"
    return APIError(400, message, param=param, code=exc.reason)


def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    first = exc.errors()[0] if exc.errors() else {"loc": (), "msg": "invalid request"}
    if first.get("type") == "json_invalid":  # its location is a character offset, not a field
        offset = first["loc"][-1]  # from 0; users count from 1
        detail = first.get("ctx", {}).get("error", first["msg"])
        return APIError(400, f"the request body is not valid JSON: {detail} at character {offset + 1}",
                        code="invalid_json").response()
    location = [str(part) for part in first.get("loc", ()) if part not in ("body", "form", "query", "path")]
    param = ".".join(location) or None
    message = f"{param}: {first['msg']}" if param else str(first["msg"])
    return APIError(400, message, param=param, code="invalid_value").response()


def _http_error(request: Request, exc: HTTPException) -> JSONResponse:
    limit = request.scope.get(MAX_BODY_SIZE_SCOPE_KEY)
    if exc.status_code == 413 and limit is not None:  # Starlette's body limit, passed while the body streamed in
        return too_large(limit).response()
    kind = {401: AUTHENTICATION, 404: NOT_FOUND}.get(exc.status_code, INVALID_REQUEST)
    return APIError(exc.status_code, str(exc.detail), type=kind).response()


def _unexpected(request: Request, exc: Exception) -> JSONResponse:
    log.error("%s %s failed", request.method, request.url.path, exc_info=exc)
    return APIError(500, f"internal error: {type(exc).__name__}", type=SERVER).response()


def install(app: FastAPI) -> None:
    """Answer every error of `app` in the OpenAI shape."""
    app.add_exception_handler(APIError, lambda request, exc: exc.response())
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(HTTPException, _http_error)
    app.add_exception_handler(Exception, _unexpected)
