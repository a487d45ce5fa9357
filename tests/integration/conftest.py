"""The live server that the acceptance tests share: one per module (the model loads from the session's
converted copy), with the real Engine, the real base model and the real Redis."""

from __future__ import annotations

import copy
import uuid

import httpx
import pytest
from server_support import ADMIN, DEVICE, REDIS_URL, UPLOAD_LIMIT, Live, Reference, ServerThread

from service.config import Settings
from service.embedded_redis import connect
from service.main import create_app
from service.registry import RedisRegistry


@pytest.fixture(scope="module")
def live(data_dir):
    namespace = f"test-api-{uuid.uuid4().hex[:12]}"
    settings = Settings(
        _env_file=None, data_dir=data_dir, redis_url=REDIS_URL, namespace=namespace, admin_token=ADMIN, device=DEVICE,
        dtype="float32", max_upload_bytes=UPLOAD_LIMIT, max_new_tokens=256, max_batch_size=16,
        max_adapters_per_request=4,
    )
    app = create_app(settings)  # the lifespan connects Redis and loads the real model
    registry = RedisRegistry(connect(REDIS_URL), namespace=namespace)
    with ServerThread(app) as server:
        engine = app.state.engine
        # Before any adapter: the engine's weights are the base. Copies for the bit-exact check and references.
        snapshot = {k: v.detach().clone() for k, v in engine.model.state_dict().items()}
        reference = Reference(copy.deepcopy(engine.model), engine.tokenizer)
        with httpx.Client(base_url=server.url, timeout=300) as client:
            yield Live(server, app, registry, client, snapshot, reference)
    keys = set(registry.client.scan_iter(match=f"{namespace}:*", count=1000))
    if keys:
        registry.client.delete(*keys)


