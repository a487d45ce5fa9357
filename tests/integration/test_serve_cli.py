"""`shira serve` as a user starts it: no SHIRA_REDIS_URL (embedded registry), no admin token (one is printed)."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

pytestmark = pytest.mark.integration


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_shira_serve_with_embedded_registry_and_generated_token(tmp_path):
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("SHIRA_")}
    env.update(SHIRA_DATA_DIR=str(tmp_path / "data"), SHIRA_DEVICE="cpu", PYTHONUNBUFFERED="1")
    log_path = tmp_path / "serve.log"
    cli = Path(sys.executable).with_name("shira")
    with open(log_path, "w") as log:
        proc = subprocess.Popen([str(cli), "serve", "--port", str(port)], cwd=tmp_path, env=env, stdout=log,
                                stderr=subprocess.STDOUT)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 300
        while True:
            assert proc.poll() is None, log_path.read_text()
            assert time.monotonic() < deadline, "server did not become ready:\n" + log_path.read_text()
            try:
                if httpx.get(url + "/ready", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        output = log_path.read_text()
        token = re.search(r"admin token is: (\S+)", output).group(1)
        for needle in ("registry:", "embedded", "model:", "limits:", "max_new_tokens"):
            assert needle in output, needle
        assert (tmp_path / "data" / "registry").is_dir()
        assert [m["id"] for m in httpx.get(url + "/v1/models").json()["data"]] == ["base"]
        refused = httpx.delete(url + "/adapters/x", headers={"Authorization": "Bearer " + "w" * 32})
        assert refused.status_code == 403
        missing = httpx.delete(url + "/adapters/x", headers={"Authorization": f"Bearer {token}"})
        assert missing.status_code == 404  # the generated token is the admin token
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
    assert proc.returncode == 0, log_path.read_text()
    pid_file = tmp_path / "data" / "registry" / "valkey.pid"
    pid = int(pid_file.read_text())
    with pytest.raises(ProcessLookupError):  # the embedded registry server went with the service
        for _ in range(50):
            os.kill(pid, 0)
            time.sleep(0.1)
