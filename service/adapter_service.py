"""Adapter upload, listing and deletion, kept out of the routes so they read as plain functions.

Uploads are read with a byte limit while they stream in (service.api.uploads), validated against the loaded
base by the engine, and only then written to the registry. Nothing a client sends ever
becomes a file path, and nothing is unpickled: both accepted formats are safetensors.
"""

from __future__ import annotations

import logging
import struct
from typing import Any

from .errors import (
    AdapterConflictError,
    AdapterNotFoundError,
    InvalidAdapterError,
    MalformedUploadError,
)
from .validation import check_description, check_name, check_ref

log = logging.getLogger(__name__)



def _convert_peft(engine: Any, name: str, files: dict[str, bytes]) -> bytes:
    """PEFT SHiRA (adapter_config.json + adapter_model.safetensors) -> native bytes."""
    from shira_core.errors import AdapterFormatError, ShiraError
    from shira_core.io import adapter_to_bytes
    from shira_core.peft_interop import peft_from_bytes

    if "adapter_config" not in files:
        raise MalformedUploadError(
            "a PEFT upload needs both 'adapter_model' and 'adapter_config' (its adapter_config.json)"
        )
    try:
        adapter = peft_from_bytes(files["adapter_config"], files["adapter_model"], base=engine.fingerprint, name=name)
    except AdapterFormatError as e:
        raise MalformedUploadError(f"PEFT adapter {name!r} is malformed: {e}") from e
    except ShiraError as e:
        raise InvalidAdapterError(f"PEFT adapter {name!r} does not fit the loaded base model: {e}") from e
    except Exception as e:  # the parser is fuzzed to raise only its own errors; an upload never gets a 500
        log.exception("parsing PEFT adapter %r raised unexpectedly", name)
        raise MalformedUploadError(f"PEFT adapter {name!r} could not be parsed ({type(e).__name__}: {e})") from e
    return adapter_to_bytes(adapter)


def same_content(a: bytes, b: bytes) -> bool:
    """True when two native files hold the same adapter. Byte equality is too strict: safetensors writes the
    metadata keys in no fixed order, so one adapter serialised twice can differ in its header."""
    from shira_core.io import read_safetensors_header

    if a == b:
        return True
    size_a, size_b = struct.unpack("<Q", a[:8])[0], struct.unpack("<Q", b[:8])[0]
    return a[8 + size_a :] == b[8 + size_b :] and read_safetensors_header(a) == read_safetensors_header(b)


def latest_record(registry: Any, name: str) -> Any | None:
    try:
        return registry.record(name)
    except AdapterNotFoundError:
        return None


def upload_adapter(
    engine: Any, registry: Any, name: str, files: dict[str, bytes], description: str | None = None,
    if_absent: bool = False,
) -> tuple[Any, bool]:
    """Validates an uploaded adapter against the loaded base and stores it as the next version.

    Blocking (tensor checks, Redis); call it from a worker thread.

    Args:
        engine: the running Engine (its validate_upload and fingerprint).
        registry: the RedisRegistry.
        name: the adapter name; it overrides any name inside the file.
        files: {"file": native bytes} or {"adapter_model": safetensors, "adapter_config": json}.
        description: replaces the file's description when given.
        if_absent: refuse (409) when the name already exists.

    Returns:
        (record, created): created is False when identical bytes already were the latest version, in which
        case nothing is written, so a retried upload does not mint a new version.
    """
    from shira_core.io import adapter_to_bytes

    check_name(name)
    check_description(description)
    if "file" in files and ("adapter_model" in files or "adapter_config" in files):
        raise MalformedUploadError("send either 'file' (native) or 'adapter_model' + 'adapter_config' (PEFT), not both")
    if "file" in files:
        data = files["file"]
    elif "adapter_model" in files:
        data = _convert_peft(engine, name, files)
    else:
        raise MalformedUploadError(
            "no adapter in the upload: send 'file' (native .safetensors) or 'adapter_model' + 'adapter_config' (PEFT)"
        )
    adapter = engine.validate_upload(data, name)
    adapter.name = name
    if description is not None:
        adapter.description = description
    if not adapter.base_fingerprint:  # record which base it was checked against
        adapter.base_fingerprint = engine.fingerprint.to_dict(adapter.deltas)
    blob = adapter_to_bytes(adapter)
    existing = latest_record(registry, name)
    # Refused here before any chunk is written; the commit script settles uploads that race past this check.
    if existing is not None and if_absent:
        raise AdapterConflictError(
            f"adapter {name!r} already exists (version {existing.version}); drop if_absent to add a new version"
        )
    if existing is not None and existing.bytes == len(blob) and same_content(registry.read(existing), blob):
        return existing, False
    info = {
        "nnz": adapter.nnz,
        "density": adapter.density,
        "layers": len(adapter),
        "mask": adapter.mask,
        "description": adapter.description,
        "base_fingerprint": engine.fingerprint.id,
    }
    return registry.put(name, blob, info, if_absent=if_absent), True


def list_adapters(registry: Any, offset: int, limit: int) -> tuple[list[Any], int]:
    return registry.list_latest(offset=offset, limit=limit)


def describe_adapter(registry: Any, spec: str) -> tuple[Any, list[Any]]:
    """The record for 'name' (latest) or 'name@3', plus every version of that name."""
    name, version = check_ref(spec)
    record = registry.record(name, version)
    return record, registry.versions(name)


def delete_adapter(registry: Any, name: str) -> list[int]:
    """Removes every version; AdapterNotFoundError when there is none."""
    check_name(name)
    return registry.delete(name)
