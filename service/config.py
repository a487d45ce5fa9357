"""All service settings in one place: environment variables with prefix SHIRA_, or a .env file."""

from __future__ import annotations

import secrets
from pathlib import Path
from typing import Literal

from pydantic import AliasChoices, Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

PLACEHOLDER_TOKENS = {"changeme", "change-me", "secret", "admin", "token", "password"}


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="SHIRA_", env_file=".env", extra="ignore", populate_by_name=True)

    environment: Literal["development", "production", "test"] = "development"
    host: str = "127.0.0.1"
    port: int = 8000

    base_model: str = Field("bundled:smollm2-135m-instruct", description="Path, .gguf file or hub id.")
    device: Literal["auto", "cpu", "cuda"] = "auto"
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = "auto"
    threads: int | None = Field(
        None, ge=1, description="CPU threads for torch. Unset: the CPUs this process may use (affinity, cgroup quota)."
    )

    redis_url: str | None = Field(None, description="Unset: start an embedded Redis-compatible server.")
    ready_registry_grace_s: float = Field(
        30.0, ge=0,
        description="/ready stays 200 while the registry has been unreachable for less than this: the base model "
        "and cached adapters still serve, and an outage of the shared Redis must not empty every replica at once. "
        "Past it, this replica reports not ready (a replica cut off alone should leave the rotation).",
    )
    data_dir: Path = Field(Path("data"), description="The embedded registry and converted-model copies live here.")
    model_cache: bool = Field(
        True, description="Keep a safetensors copy of a GGUF base: later starts skip the conversion (~20 s for the "
        "bundled model, ~1 s after).",
    )
    model_cache_dir: Path | None = Field(
        None, description="Where converted copies live. Unset: data_dir/models. An image sets it outside the data "
        "volume, so the copy made at build time is not hidden by a mounted volume.",
    )
    namespace: str = "shira"

    admin_token: str | None = None
    read_token: str | None = None

    cache_bytes: int = Field(512 * 2**20, description="Byte budget of decoded adapters and switch plans.")
    max_upload_bytes: int = 512 * 2**20
    max_prompt_tokens: int = 2048
    max_new_tokens: int = 512
    default_max_new_tokens: int = 64
    max_batch_size: int = 16
    max_queue: int = 256
    max_adapters_per_request: int = 8
    max_groups_waited: int = Field(4, description="A request never waits behind more than this many other groups.")
    batch_wait_ms: float = Field(2.0, description="How long the scheduler lets a batch fill before running it.")
    mixed_batches: bool = Field(
        True, description="Rows of different adapter sets share one batch, each corrected to its own set.",
    )
    # Named "guest" before; the old variables still work.
    correction_kernel: Literal["native", "torch"] = Field(
        "native",
        validation_alias=AliasChoices("SHIRA_CORRECTION_KERNEL", "SHIRA_GUEST_KERNEL", "correction_kernel"),
        description="How mixed batches correct rows on the CPU: the native kernel (built once with the machine's C++ "
        "compiler; PyTorch's products where it cannot build) or PyTorch's sparse products.",
    )
    decode_kernel: Literal["native", "torch"] = Field(
        "native",
        description="How decode steps run the Linear layers on the CPU: the native kernel (AVX-512 or AVX2, built "
        "once like the correction kernel; PyTorch's where it cannot) or PyTorch's linear.",
    )
    correction_plan_bytes: int = Field(
        256 * 2**20, ge=0,
        validation_alias=AliasChoices("SHIRA_CORRECTION_PLAN_BYTES", "SHIRA_GUEST_PLAN_BYTES", "correction_plan_bytes"),
        description="Most bytes a mixed batch's correction plan may hold (a copy of each corrected row's delta); "
        "rows that would exceed it wait for room. PyTorch's products only: the native kernel's plans copy nothing.",
    )

    @field_validator("admin_token", "read_token")
    @classmethod
    def _no_placeholder(cls, value: str | None, info) -> str | None:
        if value is not None and value.strip().lower() in PLACEHOLDER_TOKENS:
            raise ValueError(f"{info.field_name} is a placeholder ({value!r}); set a real secret")
        if value is not None and len(value) < 16:
            raise ValueError(f"{info.field_name} must be at least 16 characters")
        return value

    def converted_models_dir(self) -> Path | None:
        """Where the engine keeps converted copies of the base model; None when the cache is off."""
        if not self.model_cache:
            return None
        return self.model_cache_dir or self.data_dir / "models"

    def ensure_admin_token(self) -> tuple[str, bool]:
        """Returns (token, generated). Without SHIRA_ADMIN_TOKEN a random one is made, never an open door."""
        if self.admin_token:
            return self.admin_token, False
        self.admin_token = secrets.token_urlsafe(24)
        return self.admin_token, True
