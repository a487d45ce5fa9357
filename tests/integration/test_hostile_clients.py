"""The reliability issue's defects, as a hostile client sends them to a live server: each answer is a 4xx that
says what to change, nothing is stored, and other clients' requests go on."""

from __future__ import annotations

import json
import struct
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from random_adapters import random_adapter
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from server_support import NEW, attention_weights

from shira_core.delta import SparseAdapter, SparseDelta
from shira_core.io import adapter_to_bytes
from shira_core.peft_export import peft_to_bytes

pytestmark = pytest.mark.integration
DEEP = 100_000


def header(data: bytes) -> dict:
    (size,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8 : 8 + size])


def resave(data: bytes, meta_edit=None, dtype: torch.dtype | None = None, suffix: str = ".values") -> bytes:
    """The same file with its `shira` metadata edited and/or its value tensors cast."""
    meta = header(data)["__metadata__"]
    if meta_edit is not None:
        info = json.loads(meta["shira"])
        meta_edit(info)
        meta = {**meta, "shira": json.dumps(info)}
    tensors = st_load(data)
    if dtype is not None:
        tensors = {k: v.to(dtype) if k.endswith(suffix) else v for k, v in tensors.items()}
    return st_save(tensors, metadata=meta)


def hostile_uploads(good: SparseAdapter) -> dict[str, tuple[dict, int]]:
    """label -> (the upload's files, the status it must get)."""
    native = adapter_to_bytes(good)
    config, weights = peft_to_bytes(good)
    nested = b"[" * DEEP + b"]" * DEEP

    def native_file(data: bytes) -> dict:
        return {"file": ("a.safetensors", data)}

    def peft(cfg: bytes = config, model: bytes = weights) -> dict:
        return {"adapter_model": ("adapter_model.safetensors", model), "adapter_config": ("c.json", cfg)}

    def cfg_with(**fields) -> bytes:
        return json.dumps({**json.loads(config), **fields}).encode()

    def set_(key, value):
        return lambda info: info.__setitem__(key, value)

    def probes(value):
        return lambda info: info["base_fingerprint"].__setitem__("probes", value)

    layer = next(iter(good.deltas))
    return {
        "nested header": (native_file(struct.pack("<Q", len(nested)) + nested), 400),
        "nested PEFT config": (peft(cfg=nested), 400),
        "float8 native": (native_file(resave(native, dtype=torch.float8_e4m3fn)), 422),
        "float8 PEFT": (peft(model=resave(weights, dtype=torch.float8_e4m3fn, suffix=".shira_weight")), 422),
        "probes as a list": (native_file(resave(native, probes([1.0, 2.0]))), 400),
        "probe as a string": (native_file(resave(native, probes({layer: "x"}))), 400),
        "NaN probe": (native_file(resave(native, probes({layer: float("nan")}))), 400),
        "target_modules 5": (peft(cfg=cfg_with(target_modules=5)), 400),
        "target_modules mixed": (peft(cfg=cfg_with(target_modules=[1, "q"])), 400),
        "PEFT base_fingerprint zzz": (peft(model=resave(weights, set_("base_fingerprint", "zzz"))), 400),
        "PEFT extra [1]": (peft(model=resave(weights, set_("extra", [1]))), 400),
        "long description": (native_file(resave(native, set_("description", "d" * 100_000))), 400),
    }


def test_hostile_uploads_are_4xx_and_store_nothing(live):
    model = live.engine.model
    good = random_adapter(model, "good", 7, attention_weights(model), density=0.004, std=0.08, pool=1.0,
                          fingerprint=True, description="random test adapter good")
    before_keys, before_list = live.keys(), live.client.get("/adapters").json()
    for label, (files, status) in hostile_uploads(good).items():
        r = live.upload("hostile", files=files)
        assert r.status_code == status, (label, r.text[:300])
        assert r.json()["error"]["message"], label
    assert live.keys() == before_keys
    assert live.client.get("/adapters").json() == before_list


def test_a_name_with_a_trailing_newline_is_refused(live):
    model = live.engine.model
    good = adapter_to_bytes(random_adapter(model, "good", 7, attention_weights(model), density=0.004, std=0.08,
                                           pool=1.0, fingerprint=True, description="random test adapter good"))
    before = live.keys()
    r = live.upload("evil\n", files={"file": ("a.safetensors", good)})
    assert r.status_code == 400 and "evil" in r.json()["error"]["message"]
    assert live.keys() == before
    assert live.client.post("/generate", params={"adapter": "evil\n"}, json={"prompt": "hi"}).status_code == 400


def test_adapters_the_engine_cannot_serve_are_refused_at_upload_or_request(live):
    model = live.engine.model
    norm = "model.layers.0.input_layernorm.weight"
    width = model.config.hidden_size
    one_d = SparseAdapter("norm", {norm: SparseDelta(norm, (width,), torch.tensor([0, 5]), torch.tensor([0.1, 0.2]))})
    r = live.upload("norm", one_d)
    assert r.status_code == 422 and "input_layernorm" in r.json()["error"]["message"]
    layer = "model.layers.0.mlp.up_proj.weight"
    shape = tuple(dict(model.named_parameters())[layer].shape)
    huge = SparseAdapter("huge", {layer: SparseDelta(layer, shape, torch.tensor([3, 9]), torch.tensor([1e38, -1e38]))},
                         base_fingerprint=live.engine.fingerprint.to_dict([layer]))
    assert live.upload("huge", huge).status_code == 201  # finite on its own
    live.adapters["huge"] = huge

    def one(query: dict):
        return live.client.post("/generate", params=query, json={"prompt": "The capital of France is",
                                                                 "max_new_tokens": NEW})

    with ThreadPoolExecutor(3) as pool:
        overflow, plain, tiny_p = pool.map(one, [{"adapters": "huge:10"}, {}, {}])
    assert overflow.status_code == 422 and "up_proj" in overflow.json()["error"]["message"]
    assert plain.status_code == tiny_p.status_code == 200
    empty = live.client.post("/generate", params={"adapters": ",,,,"}, json={"prompt": "hi"})
    assert empty.status_code == 422
    offset = live.client.get("/adapters", params={"offset": 9223372036854775806})
    assert offset.status_code == 422 and "6379" not in offset.text


def test_a_tiny_top_p_fails_nobody(live):
    def one(body: dict):
        return live.client.post("/generate", json={"messages": [{"role": "user", "content": "hi"}],
                                                   "max_new_tokens": NEW, **body})

    with ThreadPoolExecutor(3) as pool:
        results = list(pool.map(one, [{"temperature": 1, "top_p": 1e-300}, {}, {"temperature": 1, "top_p": 5e-324}]))
    assert [r.status_code for r in results] == [200, 200, 200], [r.text[:200] for r in results]
    assert results[0].json()["text"] == results[1].json()["text"] == results[2].json()["text"]  # only the top token
