"""Uploads the adapters a load test uses, and prints their names for SHIRA_ADAPTERS.

    .venv/bin/python loadtest/setup.py http://127.0.0.1:8000 --count 8            # random 1% adapters
    .venv/bin/python loadtest/setup.py http://127.0.0.1:8000 a.safetensors b.safetensors

Random adapters are built for the server's base model (--model, default the bundled SmolLM2-135M-Instruct),
so they pass its fingerprint check; files are uploaded as they are, named after the file. The admin token
comes from --token or SHIRA_ADMIN_TOKEN. Uploading the same bytes again changes nothing, so rerunning is safe.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import httpx


def upload_files(url: str, token: str, paths: list[Path]) -> list[str]:
    names = []
    for path in paths:
        name = path.stem.lower().replace("_", "-")
        resp = httpx.post(f"{url}/adapters", headers={"Authorization": f"Bearer {token}"}, data={"name": name},
                          files={"file": (path.name, path.read_bytes())}, timeout=300)
        if resp.status_code not in (200, 201):
            sys.exit(f"uploading {path} failed: {resp.status_code} {resp.text[:300]}")
        names.append(name)
    return names


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("url", help="the server or the gateway, e.g. http://127.0.0.1:8000")
    parser.add_argument("files", nargs="*", type=Path, help="native .safetensors adapters to upload instead")
    parser.add_argument("--count", type=int, default=8, help="random adapters to make (default 8)")
    parser.add_argument("--density", type=float, default=0.01, help="their density (default 0.01)")
    parser.add_argument("--model", default=None, help="the server's base model (default: the bundled one)")
    parser.add_argument("--token", default=os.environ.get("SHIRA_ADMIN_TOKEN"), help="admin token")
    args = parser.parse_args()
    if not args.token:
        sys.exit("an admin token is needed: --token or SHIRA_ADMIN_TOKEN")
    url = args.url.rstrip("/")
    if args.files:
        names = upload_files(url, args.token, args.files)
    else:
        from shira_bench.server import upload_random_adapters

        names = upload_random_adapters(url, args.token, args.count, args.density, args.model)
    print(",".join(names))


if __name__ == "__main__":
    main()
