"""Adapter upload, listing and deletion, kept out of the routes so they read as plain functions.

Uploads are read with a byte limit while they stream in, parsed as multipart in memory (spooled), validated
against the loaded base by the engine, and only then written to the registry. Nothing a client sends ever
becomes a file path, and nothing is unpickled: both accepted formats are safetensors.
"""

from __future__ import annotations

import logging
import re
import struct
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from starlette.datastructures import UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser

from . import generation
from .errors import (
    AdapterConflictError,
    AdapterNotFoundError,
    InvalidAdapterError,
    InvalidRequestError,
    MalformedUploadError,
    PayloadTooLargeError,
)

log = logging.getLogger(__name__)

BASE_MODEL_ID = "base"  # reserved: names the base model in /v1 and cannot be an adapter name
FILE_FIELDS = ("file", "adapter_model", "adapter_config")
MAX_TEXT_FIELD_BYTES = 64 * 1024
MAX_DESCRIPTION_CHARS = 4096  # = shira_core.metadata.MAX_DESCRIPTION_CHARS (not imported: that imports torch)
MAX_VERSION = 2**31 - 1
_DIGITS = re.compile(r"[0-9]+")  # ASCII only: str.isdigit() also takes "²", which int() refuses


@dataclass
class UploadForm:
    """The parts of an upload request: a name and either a native file or a PEFT pair."""

    name: str
    files: dict[str, bytes]
    description: str | None = None


def check_name(name: str) -> str:
    """generation.check_name, and the base model's reserved name refused too."""
    generation.check_name(name)
    if name == BASE_MODEL_ID:
        raise InvalidRequestError(f"adapter name {BASE_MODEL_ID!r} is reserved for the base model")
    return name


def split_version(spec: str) -> tuple[str, int | None]:
    """'boolq@3' -> ('boolq', 3); 'boolq' -> ('boolq', None). The name is not checked here (check_name)."""
    name, sep, version = spec.partition("@")
    if not sep:
        return name, None
    # The length check comes first: int() of a few thousand digits is slow, then refused with ValueError.
    if not _DIGITS.fullmatch(version) or len(version) > 10 or not 1 <= int(version) <= MAX_VERSION:
        raise InvalidRequestError(
            f"version in {spec[:80]!r} must be an integer from 1 to {MAX_VERSION}, as in {name[:64]}@3"
        )
    return name, int(version)


def check_ref(spec: str) -> tuple[str, int | None]:
    """'boolq' or 'boolq@3' -> (name, version), both checked: every route reads adapter names through this."""
    name, version = split_version(spec)
    return check_name(name), version


def check_description(description: str | None) -> str | None:
    """The description of an upload, refused (422) over MAX_DESCRIPTION_CHARS characters."""
    if description is not None and len(description) > MAX_DESCRIPTION_CHARS:
        raise RequestValidationError([{
            "loc": ("body", "description"), "type": "string_too_long",
            "msg": f"description is {len(description):,} characters, the limit is {MAX_DESCRIPTION_CHARS:,}",
        }])
    return description


async def _limited(request: Request, limit: int) -> AsyncIterator[bytes]:
    total = 0
    async for chunk in request.stream():
        total += len(chunk)
        if total > limit:
            raise PayloadTooLargeError(f"upload body exceeds the limit of {limit:,} bytes (SHIRA_MAX_UPLOAD_BYTES)")
        yield chunk


async def read_upload_form(request: Request, limit: int) -> UploadForm:
    """Reads a multipart upload, refusing bodies over `limit` bytes before or while they arrive.

    Returns:
        The name, the optional description and the bytes of each file field that was sent.
    """
    length = request.headers.get("content-length")
    if length is not None:
        if not _DIGITS.fullmatch(length):
            raise MalformedUploadError(f"Content-Length {length[:40]!r} is not a number of bytes")
        if len(length) > 18 or int(length) > limit:
            shown = f"{int(length):,}" if len(length) <= 18 else f"a {len(length)}-digit number of"
            raise PayloadTooLargeError(
                f"upload body is {shown} bytes, over the limit of {limit:,} (SHIRA_MAX_UPLOAD_BYTES)"
            )
    content_type = request.headers.get("content-type", "")
    if not content_type.lower().startswith("multipart/form-data"):
        raise MalformedUploadError(
            f"send the adapter as multipart/form-data (fields: name, file or adapter_model + adapter_config), "
            f"not {content_type[:60] or 'no content type'}"
        )
    parser = MultiPartParser(
        request.headers, _limited(request, limit), max_files=3, max_fields=3, max_part_size=MAX_TEXT_FIELD_BYTES
    )
    try:
        form = await parser.parse()
    except MultiPartException as e:
        raise MalformedUploadError(f"multipart body is malformed: {e.message}") from e
    try:
        fields: dict[str, Any] = {}
        for key, value in form.multi_items():
            if key in fields:
                raise MalformedUploadError(f"field {key!r} was sent more than once")
            fields[key] = value
        unknown = sorted(set(fields) - {"name", "description", *FILE_FIELDS})
        if unknown:
            expected = ", ".join(("name", "description", *FILE_FIELDS))
            raise MalformedUploadError(f"unknown form fields {unknown}; expected {expected}")
        name = fields.get("name")
        if not isinstance(name, str) or not name:
            raise MalformedUploadError("form field 'name' is missing (the adapter name, e.g. name=boolq)")
        description = fields.get("description")
        if description is not None and not isinstance(description, str):
            raise MalformedUploadError("form field 'description' must be text, not a file")
        check_description(description)
        files = {}
        for key in FILE_FIELDS:
            value = fields.get(key)
            if isinstance(value, UploadFile):
                files[key] = await value.read()
            elif isinstance(value, str):  # a plain field is fine too, e.g. adapter_config=<json text>
                files[key] = value.encode()
        return UploadForm(name=name, files=files, description=description)
    finally:
        await form.close()


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
    return registry.list(offset=offset, limit=limit)


def describe_adapter(registry: Any, spec: str) -> tuple[Any, list[Any]]:
    """The record for 'name' (latest) or 'name@3', plus every version of that name."""
    name, version = check_ref(spec)
    record = registry.record(name, version)
    return record, registry.versions(name)


def delete_adapter(registry: Any, name: str) -> list[int]:
    """Removes every version; AdapterNotFoundError when there is none."""
    check_name(name)
    return registry.delete(name)
