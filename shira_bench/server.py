"""A server to benchmark: `shira serve` started in a subprocess on a free loopback port, and random adapters
uploaded to it."""

from __future__ import annotations

import secrets
import socket
import subprocess
import sys
import time
from collections.abc import Mapping

import httpx


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_server(port: int, token: str, redis_url: str | None, env: Mapping[str, str]) -> subprocess.Popen:
    """Starts `shira serve` in a subprocess with `env` (the caller's environment and any settings) and waits until
    /ready answers 200."""
    env = {**env, "SHIRA_ADMIN_TOKEN": token, "SHIRA_NAMESPACE": f"bench-{secrets.token_hex(4)}"}
    if redis_url:
        env["SHIRA_REDIS_URL"] = redis_url
    proc = subprocess.Popen(
        [sys.executable, "-m", "shira_cli.main", "serve", "--host", "127.0.0.1", "--port", str(port)],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )
    deadline = time.time() + 300
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}: {proc.stderr.read().decode()[-2000:]}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/ready", timeout=2).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        time.sleep(1)
    proc.kill()
    raise RuntimeError("server did not become ready within 300 s")


def upload_random_adapters(url: str, token: str, count: int, density: float, model: str | None = None) -> list[str]:
    """Builds rand-mask adapters for the server's base model (`model`; None: the bundled one) and uploads them."""
    from shira_core.fingerprint import BaseFingerprint
    from shira_core.io import adapter_to_bytes
    from shira_core.models import linear_weight_names, load_base

    from .synthetic import random_adapter

    base, _, _ = load_base(model, device="cpu", dtype="float32")
    names = linear_weight_names(base)
    fingerprint = BaseFingerprint.of(base)
    uploaded = []
    for k in range(count):
        adapter = random_adapter(base, names, density, seed=100 + k, name=f"bench-{k}")
        adapter.base_fingerprint = fingerprint.to_dict(names)
        resp = httpx.post(
            f"{url}/adapters", headers={"Authorization": f"Bearer {token}"},
            data={"name": adapter.name}, files={"file": ("a.safetensors", adapter_to_bytes(adapter))}, timeout=120,
        )
        resp.raise_for_status()
        uploaded.append(adapter.name)
    del base
    return uploaded
