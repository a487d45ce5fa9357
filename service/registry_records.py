"""What the registry stores about one adapter version, and small helpers for reading it back from Redis."""

from __future__ import annotations

import builtins
from dataclasses import asdict, dataclass, field
from typing import Any

import redis


@dataclass
class AdapterRecord:
    """One stored adapter version. ``sha256`` is of the native safetensors bytes."""

    name: str
    version: int
    sha256: str
    base_fingerprint: str
    nnz: int
    density: float
    bytes: int
    layers: int
    mask: str
    description: str
    created: float
    chunks: tuple[str, ...] = field(default=(), repr=False)

    @property
    def ref(self) -> str:
        return f"{self.name}@{self.version}"

    @property
    def stamp(self) -> str:
        """What RedisRegistry.stamp returns while this is the version asked for."""
        return f"{self.version}:{self.sha256}"

    def to_dict(self) -> dict:
        out = asdict(self)
        del out["chunks"]
        return out

    @classmethod
    def from_hash(cls, raw: dict[builtins.bytes, builtins.bytes]) -> AdapterRecord:
        """From the record's Redis hash as returned by HGETALL."""
        return cls.from_fields({k.decode(): v.decode() for k, v in raw.items()})

    @classmethod
    def from_fields(cls, h: dict[str, Any]) -> AdapterRecord:
        return cls(
            name=h["name"], version=int(h["version"]), sha256=h["sha256"],
            base_fingerprint=h["base_fingerprint"], nnz=int(h["nnz"]), density=float(h["density"]),
            bytes=int(h["bytes"]), layers=int(h["layers"]), mask=h["mask"], description=h["description"],
            created=float(h["created"]), chunks=tuple(str(h["chunks"]).split()),
        )


def describe_client(client: redis.Redis) -> str:
    """The server a client talks to, as a URL without credentials."""
    kw = client.connection_pool.connection_kwargs
    if kw.get("path"):
        return f"unix://{kw['path']}?db={kw.get('db', 0)}"
    return f"redis://{kw.get('host', 'localhost')}:{kw.get('port', 6379)}/{kw.get('db', 0)}"


def pairs(flat: list) -> dict[builtins.bytes, builtins.bytes]:
    """HGETALL as a script returns it (k1, v1, k2, v2, ...) to a dict."""
    return dict(zip(flat[::2], flat[1::2], strict=True))
