"""Errors at the edge: every rejected request gets a status and a JSON body naming the
problem, in the shape OpenAI clients parse (``{"error": {"message", "type", "param",
"code"}}``), so the ``openai`` SDK raises a typed error with our message."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from pydantic import ValidationError

log = logging.getLogger(__name__)

ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    415: "invalid_request_error",
    422: "invalid_request_error",
    503: "service_unavailable",
}


class ApiError(Exception):
    """A request the server refuses: ``status`` (4xx/5xx), a message naming the problem,
    and the request field it concerns (``param``), if any."""

    def __init__(
        self,
        status: int,
        message: str,
        param: str | None = None,
        headers: Mapping[str, str] | None = None,
    ):
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.headers = dict(headers or {})

    def body(self) -> dict:
        return error_body(self.status, self.message, self.param)


def error_body(status: int, message: str, param: str | None = None) -> dict:
    kind = ERROR_TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
    return {"error": {"message": message, "type": kind, "param": param, "code": status}}


def validation_error(err: ValidationError, prefix: str = "") -> ApiError:
    """422 naming every bad field (``field 'threshold': Input should be ...``)."""
    problems = []
    for item in err.errors():
        field = ".".join(str(part) for part in item["loc"]) or "<body>"
        problems.append(f"field {prefix + field!r}: {item['msg']}")
    first = err.errors()[0]["loc"] if err.errors() else ()
    param = ".".join(str(part) for part in first) or None
    return ApiError(422, "; ".join(problems), param=param)


class JSONServerErrors:
    """ASGI middleware: an exception no handler turned into a response becomes a 500 with
    a JSON body (Starlette's own answer is plain text), logged with its traceback. Once a
    response has started (a stream), the exception goes on up: its status is sent."""

    def __init__(self, app: Any):
        self.app = app

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def tracked_send(message: dict) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, tracked_send)
        except Exception as err:
            if started:
                raise
            log.exception("%s %s failed", scope.get("method"), scope.get("path"))
            from starlette.responses import JSONResponse

            message = f"internal server error ({type(err).__name__})"
            await JSONResponse(error_body(500, message), status_code=500)(scope, receive, send)
