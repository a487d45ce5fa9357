"""`make deploy-check`: the deployment files against the schemas their tools use, offline.

- Kubernetes: deploy/kustomization.yaml rendered as `kubectl apply -k deploy/` would (its resources plus the
  gateway ConfigMap from deploy/gateway), then kubernetes-validate --strict for the oldest and newest
  supported Kubernetes. Custom resources (the ServiceMonitor) have no schema there and are reported as such.
- compose: the Compose Specification's schema (check-jsonschema's vendored copy).
- Dockerfile: hadolint.

Exits non-zero on the first failing check.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

DEPLOY = Path(__file__).resolve().parent
ROOT = DEPLOY.parent
KUBERNETES = ("1.30.0", "1.37.0")


def render_kustomization() -> list[dict]:
    """The objects `kubectl apply -k deploy/` creates (without the ConfigMap's hash suffix)."""
    spec = yaml.safe_load((DEPLOY / "kustomization.yaml").read_text())
    objects = []
    for resource in spec["resources"]:
        objects += [doc for doc in yaml.safe_load_all((DEPLOY / resource).read_text()) if doc]
    for generator in spec.get("configMapGenerator", []):
        data = {}
        for item in generator["files"]:
            key, _, path = item.partition("=")
            data[key] = (DEPLOY / path).read_text()
        objects.append({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": generator["name"]},
                        "data": data})
    return objects


def check_references(objects: list[dict]) -> None:
    """Every ConfigMap a pod mounts is one the kustomization makes."""
    config_maps = {o["metadata"]["name"] for o in objects if o["kind"] == "ConfigMap"}
    for o in objects:
        volumes = o.get("spec", {}).get("template", {}).get("spec", {}).get("volumes", [])
        for volume in volumes:
            name = volume.get("configMap", {}).get("name")
            if name and name not in config_maps:
                sys.exit(f"{o['kind']}/{o['metadata']['name']} mounts ConfigMap {name}, which nothing creates")


def run(*command: str) -> None:
    print("$", " ".join(command), flush=True)
    if subprocess.call(command) != 0:
        sys.exit(f"deploy-check failed: {command[0]}")


def main() -> None:
    objects = render_kustomization()
    check_references(objects)
    bin_dir = Path(sys.executable).parent
    with tempfile.TemporaryDirectory() as tmp:
        rendered = Path(tmp) / "rendered.yaml"
        rendered.write_text(yaml.safe_dump_all(objects, sort_keys=False))
        for version in KUBERNETES:
            run(str(bin_dir / "kubernetes-validate"), "--strict", "-k", version, str(rendered))
    run(str(bin_dir / "check-jsonschema"), "--builtin-schema", "vendor.compose-spec", str(DEPLOY / "compose.yaml"))
    run(str(bin_dir / "hadolint"), str(ROOT / "Dockerfile"))
    print(f"deploy-check: {len(objects)} Kubernetes objects, compose and the Dockerfile pass")


if __name__ == "__main__":
    main()
