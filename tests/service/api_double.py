"""An engine double for HTTP-layer tests (auth, names, size limits, validation, wire formats).

It does no model work: generation echoes the adapter set, which is all the routing tests need. Upload
validation is the real shira_core check against a tiny model's fingerprint. Acceptance tests use the real
Engine (tests/integration).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import torch

from service.errors import AdapterNotFoundError, InvalidAdapterError, InvalidRequestError, MalformedUploadError
from service.types import AdapterSet, GenerationRequest, GenerationResult, ResolvedSet, Timings, resolved_set
from shira_core.delta import SparseAdapter, SparseDelta
from shira_core.errors import AdapterFormatError, ShiraError
from shira_core.fingerprint import BaseFingerprint
from shira_core.io import adapter_from_bytes


class EchoEngine:
    """Answers "<label>|<n prompt ids>" token by token; counts streams that were closed early."""

    model_label = "tiny-llama-double"
    device = torch.device("cpu")

    def __init__(self, model: torch.nn.Module, registry, max_prompt_tokens: int = 64, delay_s: float = 0.0):
        self.model = model
        self.fingerprint = BaseFingerprint.of(model)
        self.registry = registry
        self.max_prompt_tokens = max_prompt_tokens
        self.delay_s = delay_s
        self.started = False
        self.closed_early = 0

    def start(self) -> None:
        self.started = True

    def stop(self) -> None:
        self.started = False

    def ready(self) -> bool:
        return self.started

    def status(self) -> dict:
        return {}

    def encode(self, prompt: str | None = None, messages: list[dict] | None = None) -> list[int]:
        if (prompt is None) == (messages is None):
            raise InvalidRequestError("give exactly one of prompt or messages")
        text = prompt if prompt is not None else "".join(m["role"] + m["content"] for m in messages)
        if len(text) > self.max_prompt_tokens:
            raise InvalidRequestError(f"prompt is {len(text)} tokens, the limit is {self.max_prompt_tokens}")
        return [ord(c) % 64 for c in text]

    def validate_upload(self, data: bytes, name: str) -> SparseAdapter:
        try:
            return adapter_from_bytes(data, base=self.fingerprint, name=name)
        except AdapterFormatError as e:
            raise MalformedUploadError(str(e)) from e
        except ShiraError as e:
            raise InvalidAdapterError(str(e)) from e

    async def resolve_set(self, adapters: AdapterSet) -> ResolvedSet:
        records = []
        for ref in adapters.refs:
            try:
                records.append(await asyncio.to_thread(self.registry.record, ref.name, ref.version))
            except AdapterNotFoundError:
                raise AdapterNotFoundError(f"adapter {ref.name!r} not found") from None
        return resolved_set(adapters, records)

    def _pieces(self, request: GenerationRequest) -> list[str]:
        words = [request.adapters.label(), "|", str(len(request.prompt_ids))]
        return words[: request.params.max_new_tokens]

    def _result(self, request: GenerationRequest) -> GenerationResult:
        pieces = self._pieces(request)
        used = [{"name": r.name, "version": r.version, "weight": r.weight} for r in request.adapters.refs]
        return GenerationResult("".join(pieces), len(request.prompt_ids), len(pieces), "length", used, Timings())

    async def generate(self, request: GenerationRequest) -> GenerationResult:
        await asyncio.sleep(self.delay_s)
        return self._result(request)

    async def stream(self, request: GenerationRequest) -> AsyncIterator[str | GenerationResult]:
        finished = False
        try:
            for piece in self._pieces(request):
                await asyncio.sleep(self.delay_s)
                yield piece
            finished = True
            yield self._result(request)
        finally:
            if not finished:
                self.closed_early += 1


def tiny_adapter(model: torch.nn.Module, name: str = "tiny", scale: float = 0.01, seed: int = 0) -> SparseAdapter:
    """A valid adapter touching q_proj of layer 0, with the model's fingerprint."""
    layer = "model.layers.0.self_attn.q_proj.weight"
    weight = dict(model.named_parameters())[layer]
    gen = torch.Generator().manual_seed(seed)
    idx = torch.randperm(weight.numel(), generator=gen)[:16].sort().values
    values = torch.randn(16, generator=gen) * scale
    fp = BaseFingerprint.of(model).to_dict([layer])
    return SparseAdapter(name, {layer: SparseDelta(layer, tuple(weight.shape), idx, values)}, "rand", fp)


class ServerThread:
    """A real uvicorn server for `app` on a free loopback port, in a daemon thread (lifespan included)."""

    def __init__(self, app) -> None:
        import socket
        import threading

        import uvicorn

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> ServerThread:
        import time

        self.thread.start()
        deadline = time.monotonic() + 120
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the test server did not start")
            time.sleep(0.05)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(30)
