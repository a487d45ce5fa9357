"""Makes sure Debian's nginx and its njs module are installed for the gateway tests: apt-get installs them if not.

Installs `nginx` and `libnginx-mod-http-js` (as root, or through sudo). Debian's package starts a system nginx on
port 80 as it installs, and fails to install when that port is taken; a policy-rc.d that refuses service starts
is put in place for the install when none exists, so nothing is started. The gateway tests and
deploy/local-cluster.sh run their own nginx with their own config and ports, never the system one.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

NJS_MODULE = Path("/usr/lib/nginx/modules/ngx_http_js_module.so")
PACKAGES = ("nginx", "libnginx-mod-http-js")
POLICY = Path("/usr/sbin/policy-rc.d")
REFUSE_STARTS = "#!/bin/sh\n# written by scripts/ensure_nginx.py (shira) for one apt-get install\nexit 101\n"


def nginx_binary() -> str | None:
    # /usr/sbin is often not on a user's PATH.
    return shutil.which("nginx") or shutil.which("nginx", path="/usr/sbin:/usr/local/sbin")


def missing() -> list[str]:
    wanted = []
    if nginx_binary() is None:
        wanted.append("nginx")
    if not NJS_MODULE.exists():
        wanted.append("libnginx-mod-http-js")
    return wanted


def as_root() -> list[str]:
    if os.geteuid() == 0:
        return []
    if shutil.which("sudo"):
        return ["sudo", "-n"] if not sys.stdin.isatty() else ["sudo"]
    raise SystemExit(f"nginx or its njs module is missing and this is not root and has no sudo: install "
                     f"{' '.join(PACKAGES)} (Debian/Ubuntu) by hand")


def install(packages: list[str]) -> None:
    if shutil.which("apt-get") is None:
        raise SystemExit(f"no apt-get here: install nginx (1.22+) with the njs module by hand (wanted: {packages})")
    root = as_root()
    env = ["env", "DEBIAN_FRONTEND=noninteractive"]
    wrote_policy = not POLICY.exists()
    if wrote_policy:
        subprocess.run([*root, "tee", str(POLICY)], input=REFUSE_STARTS, text=True, stdout=subprocess.DEVNULL,
                       check=True)
        subprocess.run([*root, "chmod", "755", str(POLICY)], check=True)
    try:
        command = [*root, *env, "apt-get", "install", "-y", "-q", "--no-install-recommends", *PACKAGES]
        if subprocess.run(command).returncode != 0:
            # Package lists may be missing (fresh containers) or stale (a security update replaced the version).
            subprocess.run([*root, *env, "apt-get", "update", "-q"], check=True)
            subprocess.run(command, check=True)
    finally:
        if wrote_policy:
            subprocess.run([*root, "rm", "-f", str(POLICY)], check=True)


def main() -> int:
    wanted = missing()
    if wanted:
        print(f"installing {' '.join(PACKAGES)} (missing: {', '.join(wanted)})", flush=True)
        try:
            install(wanted)
        except subprocess.CalledProcessError as e:
            print(f"could not install {' '.join(PACKAGES)}: {e}", file=sys.stderr)
            return 1
    still = missing()
    if still:
        print(f"still missing after the install: {', '.join(still)}", file=sys.stderr)
        return 1
    version = subprocess.run([nginx_binary(), "-v"], capture_output=True, text=True).stderr.strip()
    print(f"nginx ok: {version}, njs module {NJS_MODULE}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
