"""Liveness, readiness and Prometheus metrics."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import psutil
from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from ...deps import EngineDep, ReaderDep, RegistryDep, SettingsDep
from ...errors import ServiceError
from ...metrics import (
    GPU_ALLOCATED_BYTES,
    GPU_RESERVED_BYTES,
    PENDING_BYTES,
    PENDING_CHUNKS,
    RESIDENT_BYTES,
    SWITCHER_BYTES,
)

router = APIRouter(tags=["health"])


@router.get("/health")
async def health() -> dict[str, str]:
    """Liveness: the process answers. Needs no token."""
    return {"status": "ok"}


def _registry_ok(registry: Any) -> bool:
    try:
        return bool(registry.ping())
    except (ServiceError, OSError):
        return False


@router.get("/ready", responses={503: {"description": "Model not loaded, or the registry unreachable for longer "
                                                   "than SHIRA_READY_REGISTRY_GRACE_S."}})
async def ready(request: Request, engine: EngineDep, registry: RegistryDep, settings: SettingsDep) -> JSONResponse:
    """Readiness: the model is loaded and the registry answers, or answered within the grace period (the base
    model and cached adapters keep serving through a brief Redis outage); 503 otherwise. Needs no token."""
    model_ok = bool(engine is not None and engine.ready())
    registry_ok = registry is not None and await asyncio.to_thread(_registry_ok, registry)
    now = time.monotonic()
    state = request.app.state
    if registry_ok or not hasattr(state, "registry_seen"):
        state.registry_seen = now  # the grace counts from the last answer (or the first check)
    within_grace = registry_ok or now - state.registry_seen < settings.ready_registry_grace_s
    ok = model_ok and within_grace
    body = {"status": "ready" if ok else "not_ready", "model": model_ok, "registry": registry_ok}
    return JSONResponse(body, status_code=200 if ok else 503)


def _update_memory_gauges(engine: Any) -> None:
    RESIDENT_BYTES.set(psutil.Process().memory_info().rss)
    try:
        import torch

        if torch.cuda.is_available() and torch.cuda.is_initialized():
            GPU_ALLOCATED_BYTES.set(torch.cuda.memory_allocated())
            GPU_RESERVED_BYTES.set(torch.cuda.memory_reserved())
    except ImportError:
        pass
    status = engine.status() if engine is not None else {}
    memory = status.get("switcher_memory") or status.get("switcher") or {}
    if isinstance(memory, dict):
        for part, value in memory.items():
            if isinstance(value, int | float):
                SWITCHER_BYTES.labels(part=str(part)).set(value)


def _update_pending_gauges(registry: Any) -> None:
    """Chunks left by uploads that never committed (a bounded SCAN); unchanged while Redis is unreachable."""
    if registry is None or not hasattr(registry, "pending"):
        return
    try:
        chunks, size, _complete = registry.pending()
    except ServiceError:
        return  # the registry logged the cause; the scrape still answers
    PENDING_CHUNKS.set(chunks)
    PENDING_BYTES.set(size)


@router.get(
    "/metrics", response_class=Response,
    responses={200: {"content": {CONTENT_TYPE_LATEST.split(";")[0]: {"schema": {"type": "string"}}},
                     "description": "Prometheus text format."}},
)
async def metrics(_: ReaderDep, engine: EngineDep, registry: RegistryDep) -> Response:
    """Prometheus text format; memory and pending-upload gauges are refreshed on each scrape."""
    _update_memory_gauges(engine)
    await asyncio.to_thread(_update_pending_gauges, registry)
    return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)
