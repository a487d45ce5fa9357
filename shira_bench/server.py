"""A server to benchmark: `shira serve` started in a subprocess on a free loopback port, and random adapters
uploaded to it."""

from __future__ import annotations

import secrets
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping

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
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )
    wait_until_up(proc, f"http://127.0.0.1:{port}/ready", "server", interval_s=1.0)
    return proc


def wait_until_up(proc: subprocess.Popen, url: str, what: str, interval_s: float, timeout_s: float = 300.0) -> None:
    """Polls `url` until it answers 200. Raises with the end of `proc`'s stderr (a text pipe) if it exits, and kills
    it after `timeout_s`."""
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode}: {proc.stderr.read()[-2000:]}")
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(interval_s)
    proc.kill()
    raise RuntimeError(f"{what} did not answer {url} within {timeout_s:.0f} s")


def closed_loop(clients: int, client: Callable[[int], None]) -> float:
    """Runs `client(0..clients-1)` on one thread each, closed loop (each sends its next request when the last one
    returns); the wall seconds until all have finished."""
    threads = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return time.perf_counter() - start


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
