"""Redis fixtures for service tests: the real Redis at SHIRA_TEST_REDIS_URL, one random namespace per test."""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable, Iterator

import pytest
import redis

from service.embedded_redis import connect
from service.registry import RedisRegistry

TEST_REDIS_URL = os.environ.get("SHIRA_TEST_REDIS_URL", "redis://127.0.0.1:6379/15")


def namespace_keys(client: redis.Redis, namespace: str) -> set[bytes]:
    """Every key under ``namespace:``."""
    return set(client.scan_iter(match=f"{namespace}:*", count=1000))


@pytest.fixture(scope="session")
def redis_url() -> str:
    return TEST_REDIS_URL


@pytest.fixture
def redis_client(redis_url: str) -> Iterator[redis.Redis]:
    client = connect(redis_url)
    try:
        client.ping()
    except redis.RedisError as e:
        pytest.fail(f"no Redis at {redis_url} ({e}); run `make redis-test` or set SHIRA_TEST_REDIS_URL")
    yield client
    client.close()


@pytest.fixture
def namespace(redis_client: redis.Redis) -> Iterator[str]:
    """A fresh key prefix; every key under it is deleted after the test."""
    ns = f"test-{uuid.uuid4().hex[:12]}"
    yield ns
    keys = namespace_keys(redis_client, ns)
    if keys:
        redis_client.delete(*keys)


@pytest.fixture
def ns_keys(redis_client: redis.Redis, namespace: str) -> Callable[[], set[bytes]]:
    """Call it to get every key currently under this test's namespace."""
    return lambda: namespace_keys(redis_client, namespace)


@pytest.fixture
def registry(redis_client: redis.Redis, namespace: str) -> RedisRegistry:
    return RedisRegistry(redis_client, namespace=namespace)
