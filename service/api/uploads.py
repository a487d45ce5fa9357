"""Reading an adapter upload: multipart in memory, with a byte limit enforced before and while the body arrives.

Nothing a client sends becomes a file path: file fields are read as bytes, text fields as text.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from fastapi import Request
from starlette.datastructures import UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser

from ..errors import MalformedUploadError, PayloadTooLargeError
from ..validation import DIGITS, check_description

FILE_FIELDS = ("file", "adapter_model", "adapter_config")
MAX_TEXT_FIELD_BYTES = 64 * 1024


@dataclass
class UploadForm:
    """The parts of an upload request: a name and either a native file or a PEFT pair."""

    name: str
    files: dict[str, bytes]
    description: str | None = None


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
        if not DIGITS.fullmatch(length):
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
