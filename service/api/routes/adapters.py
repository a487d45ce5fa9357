"""Adapter upload, listing, inspection and deletion. Logic lives in service.adapter_service."""

from __future__ import annotations

import asyncio
from typing import Annotated

from fastapi import APIRouter, Path, Query, Request, Response

from ... import adapter_service, validation
from ...deps import AdminDep, EngineDep, ReaderDep, RegistryDep, SettingsDep
from ...protocol import ADAPTER_ERRORS, AdapterDeleted, AdapterDetail, AdapterInfo, AdapterList, AdapterUploaded
from ...registry import MAX_LIST_OFFSET
from ...torch_thread import run_torch
from ...validation import NAME_RE
from ..uploads import read_upload_form

router = APIRouter(prefix="/adapters", tags=["adapters"])

_UPLOAD_BODY = {
    "required": True,
    "content": {
        "multipart/form-data": {
            "schema": {
                "type": "object",
                "required": ["name"],
                "properties": {
                    "name": {"type": "string", "pattern": f"^{NAME_RE.pattern}$",
                             "description": f"The adapter name; {validation.BASE_MODEL_ID!r} is reserved."},
                    "description": {"type": "string", "maxLength": validation.MAX_DESCRIPTION_CHARS,
                                    "description": "Replaces the description inside the file."},
                    "file": {"type": "string", "format": "binary", "description": "Native shira .safetensors."},
                    "adapter_model": {"type": "string", "format": "binary",
                                      "description": "PEFT SHiRA adapter_model.safetensors."},
                    "adapter_config": {"type": "string", "format": "binary",
                                       "description": "PEFT adapter_config.json (with adapter_model)."},
                },
            }
        }
    },
}


@router.post(
    "", status_code=201, response_model=AdapterUploaded, responses=ADAPTER_ERRORS,
    openapi_extra={"requestBody": _UPLOAD_BODY},
)
async def upload_adapter(
    request: Request, response: Response, _: AdminDep, engine: EngineDep, registry: RegistryDep,
    settings: SettingsDep,
    if_absent: Annotated[bool, Query(description="409 instead of a new version when the name exists.")] = False,
) -> AdapterUploaded:
    """Upload a native or PEFT SHiRA adapter; it is checked against the loaded base before it is stored.

    Each upload of a name adds a version. Uploading the bytes of the current version again changes nothing
    and answers 200.
    """
    form = await read_upload_form(request, settings.max_upload_bytes)
    validation.check_name(form.name)
    record, created = await run_torch(
        adapter_service.upload_adapter, engine, registry, form.name, form.files, form.description, if_absent
    )
    if not created:
        response.status_code = 200
    response.headers["Location"] = f"/adapters/{record.name}@{record.version}"
    return AdapterUploaded(**record.to_dict(), created_version=created)


@router.get("", response_model=AdapterList, responses=ADAPTER_ERRORS)
async def list_adapters(
    _: ReaderDep, registry: RegistryDep,
    offset: Annotated[int, Query(ge=0, le=MAX_LIST_OFFSET)] = 0,
    limit: Annotated[int, Query(ge=1, le=500)] = 50,
) -> AdapterList:
    """The latest version of every adapter, sorted by name, one page at a time."""
    records, total = await asyncio.to_thread(adapter_service.list_adapters, registry, offset, limit)
    return AdapterList(adapters=[AdapterInfo(**r.to_dict()) for r in records], total=total, offset=offset, limit=limit)


@router.get("/{name}", response_model=AdapterDetail, responses=ADAPTER_ERRORS)
async def get_adapter(
    _: ReaderDep, registry: RegistryDep,
    name: Annotated[str, Path(min_length=1, description="An adapter name (latest version) or name@version.")],
) -> AdapterDetail:
    """One adapter version's metadata plus the list of all its versions."""
    record, versions = await asyncio.to_thread(adapter_service.describe_adapter, registry, name)
    return AdapterDetail(**record.to_dict(), versions=[AdapterInfo(**v.to_dict()) for v in versions])


@router.delete("/{name}", response_model=AdapterDeleted, responses=ADAPTER_ERRORS)
async def delete_adapter(
    _: AdminDep, registry: RegistryDep, name: Annotated[str, Path(min_length=1, description="An adapter name.")]
) -> AdapterDeleted:
    """Delete every version of an adapter."""
    deleted = await asyncio.to_thread(adapter_service.delete_adapter, registry, name)
    return AdapterDeleted(name=name, deleted_versions=deleted)
