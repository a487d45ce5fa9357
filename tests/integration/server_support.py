"""Helpers for the live-server acceptance tests: a uvicorn thread, adapters on the real model, references.

References are computed in-process with shira_core (Switcher, fusion) or PEFT on a separate copy of the base
model, and greedy-decoded with transformers' own generate(), so the server is checked against code that
shares nothing with its engine but the weights.
"""

from __future__ import annotations

import os
import socket
import threading
import time
import uuid
from collections.abc import Sequence

import httpx
import torch

from shira_core.delta import SparseAdapter
from shira_core.fusion import fuse
from shira_core.io import adapter_to_bytes
from shira_core.switcher import Switcher

REDIS_URL = os.environ.get("SHIRA_TEST_REDIS_URL", "redis://127.0.0.1:6379/15")
# CPU unless told otherwise (SHIRA_TEST_DEVICE=cuda on a GPU machine). Always fp32: these tests compare texts
# bit for bit with in-process references, and bf16 rounding varies with batch shape (test_engine_devices covers it).
DEVICE = os.environ.get("SHIRA_TEST_DEVICE", "cpu")
ADMIN = "integration-admin-" + uuid.uuid4().hex
UPLOAD_LIMIT = 4 * 2**20
PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time", "Water boils at"]
NEW = 12


class Live:
    """What the tests share: the server, its engine, a registry view, pristine weights and references."""

    def __init__(self, server, app, registry, client, snapshot, reference) -> None:
        self.server, self.app, self.registry, self.client = server, app, registry, client
        self.engine = app.state.engine
        self.snapshot, self.reference = snapshot, reference
        self.adapters: dict[str, SparseAdapter] = {}

    def keys(self) -> set[bytes]:
        return set(self.registry.client.scan_iter(match=f"{self.registry.namespace}:*", count=1000))

    def upload(self, name: str, adapter: SparseAdapter | None = None, **kwargs) -> httpx.Response:
        files = kwargs.pop("files", None) or {"file": ("a.safetensors", adapter_to_bytes(adapter))}
        headers = kwargs.pop("headers", {"Authorization": f"Bearer {ADMIN}"})
        return self.client.post("/adapters", data={"name": name}, files=files, headers=headers, **kwargs)

    def generate(self, prompt: str, **query) -> dict:
        r = self.client.post("/generate", params=query, json={"prompt": prompt, "max_new_tokens": NEW})
        assert r.status_code == 200, r.text
        return r.json()

    def ids(self, prompt: str) -> list[int]:
        return self.engine.encode(prompt=prompt)


class ServerThread:
    """A real uvicorn server for `app` on a free loopback port, in a daemon thread (lifespan included)."""

    def __init__(self, app, start_timeout: float = 600.0) -> None:
        import uvicorn

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        self.start_timeout = start_timeout
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, name="uvicorn-test", daemon=True)

    def __enter__(self) -> ServerThread:
        self.thread.start()
        deadline = time.monotonic() + self.start_timeout
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                self.server.should_exit = True
                raise RuntimeError("the test server did not start (see the log above)")
            time.sleep(0.1)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(60)


def attention_weights(model: torch.nn.Module, targets: Sequence[str] = ("q_proj", "v_proj", "o_proj")) -> list[str]:
    """The weight names of the given projections, in model order: what the random test adapters adapt."""
    suffixes = tuple(f"{t}.weight" for t in targets)
    return [name for name, _ in model.named_parameters() if name.endswith(suffixes)]


@torch.inference_mode()
def greedy_text(model: torch.nn.Module, tokenizer, prompt_ids: list[int], max_new_tokens: int) -> str:
    """transformers' greedy generate, cut at the first end-of-sequence token and detokenised."""
    ids = torch.tensor([prompt_ids])
    out = model.generate(
        input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens, do_sample=False,
        temperature=None, top_p=None, top_k=None, pad_token_id=tokenizer.pad_token_id,
    )[0, len(prompt_ids):].tolist()
    eos = model.generation_config.eos_token_id
    eos_ids = set(eos if isinstance(eos, list) else [eos]) | {tokenizer.eos_token_id}
    for i, token in enumerate(out):
        if token in eos_ids:
            out = out[:i]
            break
    return tokenizer.decode(out, skip_special_tokens=True)


class Reference:
    """Greedy outputs of a private copy of the base with an adapter set applied by shira_core."""

    def __init__(self, model: torch.nn.Module, tokenizer) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.switcher = Switcher(model)

    def text(self, prompt_ids: list[int], max_new_tokens: int,
             items: Sequence[tuple[SparseAdapter, float]] = (), merge: str = "linear") -> str:
        if not items:
            return greedy_text(self.model, self.tokenizer, prompt_ids, max_new_tokens)
        target = [(fuse(items, merge), 1.0)] if merge == "ties" else list(items)
        self.switcher.apply(target)
        try:
            return greedy_text(self.model, self.tokenizer, prompt_ids, max_new_tokens)
        finally:
            self.switcher.revert()
