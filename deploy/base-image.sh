#!/usr/bin/env bash
# Builds a stand-in for the `python:3.11-slim` image from Debian's own packages, for machines that reach Debian's
# mirrors but no image registry (Docker Hub). The Dockerfile starts FROM python:3.11-slim; this image is tagged
# that way so the Dockerfile builds unchanged here and against the real image elsewhere.
#
# What it is: Debian bookworm (minbase) with Debian's python3 (3.11.2), venv, pip, the Python headers (the
# native kernel's build includes Python.h, which the official image also ships) and ca-certificates. Like the
# official image, `python` and `pip` are on PATH in /usr/local/bin and pip installs without PEP 668's
# EXTERNALLY-MANAGED refusal: the official image's Python is not Debian's, so it has no such marker either.
#
#   deploy/base-image.sh            # skips the build when python:3.11-slim already exists
#   deploy/base-image.sh --force    # rebuilds it
# Needs root (debootstrap), docker and debootstrap (apt-get install docker.io debootstrap).
set -euo pipefail

TAG="python:3.11-slim"
SUITE="bookworm"
MIRROR="${DEBIAN_MIRROR:-http://deb.debian.org/debian}"
DOCKER="${DOCKER:-docker}"

if [[ "${1:-}" != "--force" ]] && "$DOCKER" image inspect "$TAG" >/dev/null 2>&1; then
    echo "base image: $TAG exists (--force rebuilds it)"
    exit 0
fi

rootfs="$(mktemp -d /var/tmp/shira-base.XXXXXX)"
trap 'rm -rf "$rootfs"' EXIT

echo "base image: debootstrap $SUITE from $MIRROR into $rootfs"
debootstrap --variant=minbase \
    --include=python3,python3-venv,python3-pip,libpython3.11-dev,ca-certificates \
    "$SUITE" "$rootfs" "$MIRROR" >/dev/null

# Security updates too, as the official image has them.
echo "deb http://deb.debian.org/debian-security $SUITE-security main" >>"$rootfs/etc/apt/sources.list"

ln -s /usr/bin/python3 "$rootfs/usr/local/bin/python"
ln -s /usr/bin/pip3 "$rootfs/usr/local/bin/pip"
rm -f "$rootfs"/usr/lib/python3.*/EXTERNALLY-MANAGED

# Not needed in an image: package lists, caches, docs, and the static libpython (only headers are used).
rm -rf "$rootfs"/var/lib/apt/lists/* "$rootfs"/var/cache/apt/* "$rootfs"/usr/share/doc/* \
    "$rootfs"/usr/share/man/* "$rootfs"/usr/share/locale/* "$rootfs"/usr/share/info/*
find "$rootfs/usr/lib" -name 'libpython3*.a' -delete

tar -C "$rootfs" --numeric-owner -c . | "$DOCKER" import \
    --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'ENV LANG=C.UTF-8' \
    --change 'LABEL org.opencontainers.image.description="stand-in for python:3.11-slim (deploy/base-image.sh)"' \
    --change 'CMD ["python3"]' \
    - "$TAG" >/dev/null
echo "base image: $TAG built ($("$DOCKER" image inspect -f '{{.Size}}' "$TAG" | awk '{printf "%.0f MB", $1/1e6}'))"
