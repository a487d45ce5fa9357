"""The FastAPI app: settings, registry, engine, routers, handlers and middleware put together.

`create_app` is the factory the tests use; `run` is what `shira serve` calls. The lifespan connects the
registry (SHIRA_REDIS_URL, or an embedded Redis-compatible server under data_dir), builds and starts the
engine (loading the base model), and stops both on shutdown.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI

from .api.exception_handlers import register_handlers
from .api.middleware import BodyLimitMiddleware, RequestMetricsMiddleware
from .api.routes import adapters, generate, health, openai
from .api.serving import GenerationHandler
from .config import Settings
from .startup import StartupPhases, pause_gc, resume_gc
from .torch_thread import run_torch

log = logging.getLogger("shira.service")
MAX_JSON_BYTES = 8 * 2**20  # every body except an adapter upload is small JSON


def _describe_limits(settings: Settings) -> str:
    return (
        f"upload {settings.max_upload_bytes:,} B, prompt {settings.max_prompt_tokens} tokens, "
        f"max_new_tokens {settings.max_new_tokens}, adapters/request {settings.max_adapters_per_request}, "
        f"batch {settings.max_batch_size}, queue {settings.max_queue}, cache {settings.cache_bytes:,} B, "
        f"mixed batches {f'on, plan {settings.correction_plan_bytes:,} B' if settings.mixed_batches else 'off'}, "
        f"read token {'on' if settings.read_token else 'off'}"
    )


def _connect_registry(settings: Settings) -> tuple[Any, Any, str]:
    """(registry, embedded server or None, url for the log)."""
    from .embedded_redis import connect, start_embedded
    from .registry import RedisRegistry

    embedded = None
    url = settings.redis_url
    if not url:
        embedded = start_embedded(settings.data_dir)
        url = embedded.url
    registry = RedisRegistry(connect(url), namespace=settings.namespace)
    return registry, embedded, url


def _redact(url: str) -> str:
    scheme, sep, rest = url.partition("://")
    if sep and "@" in rest:
        rest = "***@" + rest.rsplit("@", 1)[1]
    return f"{scheme}{sep}{rest}"


def create_app(settings: Settings | None = None, engine: Any = None, registry: Any = None) -> FastAPI:
    """Builds the app. Pass `engine`/`registry` to reuse ones built elsewhere (tests); otherwise the
    lifespan makes them from `settings`. Either way the lifespan starts the engine and stops it at shutdown.

    Args:
        settings: defaults to Settings() (environment and .env). An admin token is generated when unset.
        engine: a service.engine.Engine, or None to build one.
        registry: a service.registry.RedisRegistry, or None to connect one.

    Returns:
        The FastAPI app; its state holds settings, engine and registry once started.
    """
    settings = settings or Settings()
    settings.ensure_admin_token()  # never an open door, even when the caller forgot

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        embedded = None
        reg, eng = registry, engine
        phases = StartupPhases()
        if reg is None:
            reg, embedded, url = await asyncio.to_thread(_connect_registry, settings)
            log.info("registry: %s (namespace %r)%s", _redact(url), settings.namespace,
                     " [embedded]" if embedded else "")
            phases.done("registry")
        if eng is None:
            from .engine import Engine

            eng = Engine(settings, reg)
            phases.done("engine_import")
        app.state.registry, app.state.engine = reg, eng
        app.state.generation = GenerationHandler(eng, settings)
        try:
            await run_torch(eng.start)  # the model loads on a thread that exits: see service.torch_thread
            phases.done("engine_start")
            resume_gc()
            phases.log("app")
            log.info("model: %s on %s, %s CPU threads", getattr(eng, "model_label", "?"), getattr(eng, "device", "?"),
                     getattr(eng, "threads", "?"))
            log.info("limits: %s", _describe_limits(settings))
            yield
        finally:
            await asyncio.to_thread(eng.stop)
            if embedded is not None:
                await asyncio.to_thread(embedded.stop)

    app = FastAPI(
        title="shira",
        summary="Serve many sparse high-rank adapters (SHiRA) on one base model.",
        version="0.1.0",
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.engine = engine
    app.state.registry = registry
    app.state.generation = GenerationHandler(engine, settings) if engine is not None else None
    app.state.started = time.time()
    register_handlers(app)
    # The last one added runs first: the request metric also counts the body limit's 413s.
    app.add_middleware(BodyLimitMiddleware, limit=MAX_JSON_BYTES, exempt=frozenset({"/adapters"}))
    app.add_middleware(RequestMetricsMiddleware)
    for module in (adapters, generate, openai, health):
        app.include_router(module.router)
    _document_stream_events(app)
    return app


def _document_stream_events(app: FastAPI) -> None:
    """Adds the models of the server-sent events (protocol.sse_content) to the OpenAPI components: FastAPI
    only collects the models of JSON answers."""
    from pydantic.json_schema import models_json_schema

    from .protocol import STREAM_EVENT_MODELS

    build = app.openapi

    def openapi() -> dict[str, Any]:
        document = build()
        schemas = document.setdefault("components", {}).setdefault("schemas", {})
        if not all(m.__name__ in schemas for m in STREAM_EVENT_MODELS):
            _, defs = models_json_schema([(m, "serialization") for m in STREAM_EVENT_MODELS],
                                         ref_template="#/components/schemas/{model}")
            for name, schema in defs.get("$defs", {}).items():
                schemas.setdefault(name, schema)
        return document

    app.openapi = openapi  # type: ignore[method-assign]


def run(host: str | None = None, port: int | None = None) -> None:
    """Starts the server with uvicorn (what `shira serve` calls).

    Args:
        host: bind address; default SHIRA_HOST.
        port: port; default SHIRA_PORT.
    """
    pause_gc()  # until the lifespan has started the engine
    import uvicorn

    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    log.setLevel(logging.INFO)
    settings = Settings()
    token, generated = settings.ensure_admin_token()
    if generated:
        # printed, not logged, so it does not end up in log aggregation by accident
        print(f"SHIRA_ADMIN_TOKEN is unset; this run's admin token is: {token}", flush=True)
    host = host or settings.host
    port = port or settings.port
    from .metrics import REPLICA

    REPLICA.info({"replica": f"{socket.gethostname()}:{port}"})  # a container's host name is its id
    log.info("base model: %s (device %s, dtype %s)", settings.base_model, settings.device, settings.dtype)
    where = _redact(settings.redis_url) if settings.redis_url else f"embedded under {settings.data_dir}"
    log.info("registry: %s", where)
    uvicorn.run(create_app(settings), host=host, port=port, log_level="info")
