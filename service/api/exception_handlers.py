"""Exception handlers, registered in layers so every error answers as {"error": {"code", "message"}}.

Framework errors first (HTTPException, request validation), then the project's ServiceError with its own
status and code, then everything else as a logged 500. The request metric sees the real status codes.
"""

from __future__ import annotations

import logging
from http import HTTPStatus
from typing import Any

from fastapi import FastAPI, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..errors import QueueFullError, RegistryUnavailableError, ServiceError, UnauthorizedError

log = logging.getLogger("shira.service")


def error_body(code: str, message: str, details: list[Any] | None = None) -> dict[str, Any]:
    """The one error shape. `type` repeats `code` because OpenAI clients read it."""
    error: dict[str, Any] = {"code": code, "message": message, "type": code}
    if details:
        error["details"] = details
    return {"error": error}


def _phrase_code(status: int) -> str:
    try:
        return HTTPStatus(status).phrase.lower().replace(" ", "_").replace("-", "_")
    except ValueError:
        return "http_error"


def _where(loc: tuple[Any, ...]) -> str:
    return ".".join(str(part) for part in loc) or "request"


async def http_exception_handler(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    message = exc.detail if isinstance(exc.detail, str) else str(exc.detail)
    return JSONResponse(error_body(_phrase_code(exc.status_code), message), exc.status_code, headers=exc.headers)


async def validation_handler(request: Request, exc: RequestValidationError) -> JSONResponse:
    errors = exc.errors()
    message = "; ".join(f"{_where(tuple(e.get('loc', ())))}: {e.get('msg', 'invalid')}" for e in errors[:10])
    details = [{"loc": list(e.get("loc", ())), "msg": e.get("msg"), "type": e.get("type")} for e in errors[:50]]
    return JSONResponse(error_body("validation_error", message, jsonable_encoder(details)), 422)


async def service_error_handler(request: Request, exc: ServiceError) -> JSONResponse:
    headers = {}
    if isinstance(exc, UnauthorizedError):
        headers["WWW-Authenticate"] = "Bearer"
    if isinstance(exc, QueueFullError | RegistryUnavailableError):
        headers["Retry-After"] = "1"
    if exc.status >= 500:
        log.warning("%s %s -> %d %s: %s", request.method, request.url.path, exc.status, exc.code, exc.message)
    return JSONResponse(error_body(exc.code, exc.message), exc.status, headers=headers)


async def unhandled_handler(request: Request, exc: Exception) -> JSONResponse:
    log.exception("unhandled error in %s %s", request.method, request.url.path)
    return JSONResponse(error_body("internal_error", "internal server error; the server log has the details"), 500)


def register_handlers(app: FastAPI) -> None:
    app.add_exception_handler(StarletteHTTPException, http_exception_handler)  # type: ignore[arg-type]
    app.add_exception_handler(RequestValidationError, validation_handler)  # type: ignore[arg-type]
    app.add_exception_handler(ServiceError, service_error_handler)  # type: ignore[arg-type]
    app.add_exception_handler(Exception, unhandled_handler)
