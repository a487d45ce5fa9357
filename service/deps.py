"""Dependencies as Annotated aliases, so each route signature reads like a sentence.

Tokens: admin routes need SHIRA_ADMIN_TOKEN. When SHIRA_READ_TOKEN is set, reading and generation need it
or the admin token; otherwise they are open. A missing token is 401, a wrong one 403.
"""

from __future__ import annotations

import hmac
from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from .api.serving import GenerationHandler
from .config import Settings
from .errors import ForbiddenError, UnauthorizedError
from .registry import RedisRegistry
from .types import EngineAPI

_bearer = HTTPBearer(auto_error=False, description="Authorization: Bearer <token>")
Credentials = Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]


def get_settings(request: Request) -> Settings:
    return request.app.state.settings


def get_engine(request: Request) -> EngineAPI:
    return request.app.state.engine


def get_generation(request: Request) -> GenerationHandler:
    """The handler every generation route goes through (made with the engine at start-up)."""
    return request.app.state.generation


def get_registry(request: Request) -> RedisRegistry:
    return request.app.state.registry


def _matches(given: str, expected: str | None) -> bool:
    # compare_digest on bytes: constant time, and no TypeError for non-ASCII input
    return expected is not None and hmac.compare_digest(given.encode(), expected.encode())


def require_admin(request: Request, credentials: Credentials) -> None:
    settings: Settings = request.app.state.settings
    if credentials is None:
        raise UnauthorizedError("this route needs the admin token: send 'Authorization: Bearer <SHIRA_ADMIN_TOKEN>'")
    if not _matches(credentials.credentials, settings.admin_token):
        raise ForbiddenError("the bearer token is not the admin token (SHIRA_ADMIN_TOKEN)")


def require_reader(request: Request, credentials: Credentials) -> None:
    settings: Settings = request.app.state.settings
    if not settings.read_token:
        return
    if credentials is None:
        raise UnauthorizedError(
            "this server needs a token: send 'Authorization: Bearer <SHIRA_READ_TOKEN or SHIRA_ADMIN_TOKEN>'"
        )
    token = credentials.credentials
    if not (_matches(token, settings.read_token) or _matches(token, settings.admin_token)):
        raise ForbiddenError("the bearer token is neither the read token nor the admin token")


SettingsDep = Annotated[Settings, Depends(get_settings)]
EngineDep = Annotated[EngineAPI, Depends(get_engine)]
RegistryDep = Annotated[RedisRegistry, Depends(get_registry)]
GenerationDep = Annotated[GenerationHandler, Depends(get_generation)]
AdminDep = Annotated[None, Depends(require_admin)]
ReaderDep = Annotated[None, Depends(require_reader)]
