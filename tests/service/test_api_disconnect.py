"""A client that goes away stops its generation: the HTTP layer closes the engine's stream or cancels the call.

Uses a live uvicorn server (disconnects cannot be simulated faithfully in-process) and the engine double.
"""

from __future__ import annotations

import contextlib
import time

import httpx
from api_double import EchoEngine, ServerThread

from service.config import Settings
from service.main import create_app


def wait_for(condition, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.05)
    return False


def test_disconnect_closes_the_stream_and_cancels_generate(tiny_llama, registry):
    engine = EchoEngine(tiny_llama(seed=0), registry, delay_s=0.5)  # 3 pieces, 0.5 s apart
    settings = Settings(_env_file=None, admin_token="t" * 32)
    cancelled = []
    real_generate = engine.generate

    async def tracked_generate(request):
        try:
            return await real_generate(request)
        except BaseException:
            cancelled.append(request)
            raise

    engine.generate = tracked_generate
    with ServerThread(create_app(settings, engine=engine, registry=registry)) as server:
        with httpx.Client(base_url=server.url, timeout=10) as client:
            # a stream read to the end is not counted as closed early
            with client.stream("POST", "/generate", json={"prompt": "hi", "stream": True}) as r:
                assert r.status_code == 200
                r.read()
            assert engine.closed_early == 0
            with client.stream("POST", "/generate", json={"prompt": "hi", "stream": True}) as r:
                next(r.iter_lines())  # first delta, then hang up
        assert wait_for(lambda: engine.closed_early == 1), "the engine stream was not closed after the disconnect"

        with httpx.Client(base_url=server.url, timeout=0.2) as client, contextlib.suppress(httpx.ReadTimeout):
            client.post("/generate", json={"prompt": "hi"})
        assert wait_for(lambda: len(cancelled) == 1), "generate kept running after the client left"
