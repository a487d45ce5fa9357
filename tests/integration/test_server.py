"""Acceptance tests: a live uvicorn server with the real Engine, the real base model and the real Redis.

One server per module (the model loads once). References come from shira_core or PEFT in-process on a
private copy of the base weights; see server_support.py.
"""

from __future__ import annotations

import copy
import json
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from random_adapters import random_adapter
from server_support import ADMIN, NEW, PROMPTS, UPLOAD_LIMIT, attention_weights, greedy_text

from shira_core.delta import SparseAdapter, SparseDelta
from shira_core.io import adapter_to_bytes

pytestmark = pytest.mark.integration

def test_upload_then_generate_matches_shira_core(live):
    assert live.client.get("/ready").json() == {"status": "ready", "model": True, "registry": True}
    model = live.engine.model
    for name, seed in (("alpha", 1), ("beta", 2), ("gamma", 3)):
        live.adapters[name] = random_adapter(model, name, seed, attention_weights(model), density=0.004, std=0.08,
                                             pool=1.0, fingerprint=True, description=f"random test adapter {name}")
        r = live.upload(name, live.adapters[name])
        assert r.status_code == 201, r.text
        assert r.json()["nnz"] == live.adapters[name].nnz and r.json()["version"] == 1
    prompt = PROMPTS[0]
    base = live.generate(prompt)
    assert base["text"] == live.reference.text(live.ids(prompt), NEW) and base["adapters"] == []
    for name in ("alpha", "beta"):
        got = live.generate(prompt, adapter=name)
        want = live.reference.text(live.ids(prompt), NEW, [(live.adapters[name], 1.0)])
        assert got["text"] == want, name
        assert got["text"] != base["text"], f"adapter {name} should change the greedy output"
        assert got["adapters"] == [{"name": name, "version": 1, "weight": 1.0}]
        assert set(got["timings"]) == {"queue_ms", "switch_ms", "generate_ms"}


def test_fusion_and_openai_client(live):
    import openai

    prompt = PROMPTS[1]
    ids = live.ids(prompt)
    items = [(live.adapters["alpha"], 0.6), (live.adapters["beta"], 0.4)]
    linear = live.generate(prompt, adapters="alpha:0.6,beta:0.4")
    assert linear["text"] == live.reference.text(ids, NEW, items)
    ties = live.generate(prompt, adapters="alpha:0.6,beta:0.4", merge="ties")
    assert ties["text"] == live.reference.text(ids, NEW, items, merge="ties") and ties["merge"] == "ties"

    oai = openai.OpenAI(base_url=live.server.url + "/v1", api_key=ADMIN)
    assert {"base", "alpha", "beta", "gamma"} <= {m.id for m in oai.models.list()}
    done = oai.completions.create(model="alpha:0.6+beta:0.4", prompt=prompt, max_tokens=NEW, temperature=0)
    assert done.choices[0].text == linear["text"] and done.usage.prompt_tokens == len(ids)
    streamed = oai.completions.create(model="alpha:0.6+beta:0.4", prompt=prompt, max_tokens=NEW, temperature=0,
                                      stream=True)
    assert "".join(c.choices[0].text for c in streamed if c.choices) == linear["text"]

    messages = [{"role": "user", "content": "Name a colour."}]
    chat_ids = live.engine.encode(messages=messages)
    want = live.reference.text(chat_ids, NEW, [(live.adapters["gamma"], 1.0)])
    chat = oai.chat.completions.create(model="gamma", messages=messages, max_tokens=NEW, temperature=0)
    assert chat.choices[0].message.content == want
    pieces = oai.chat.completions.create(model="gamma", messages=messages, max_tokens=NEW, temperature=0, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in pieces if c.choices) == want

    with pytest.raises(openai.NotFoundError, match="nosuch"):
        oai.chat.completions.create(model="nosuch", messages=messages)
    r = live.client.post("/generate", params={"adapter": "nosuch"}, json={"prompt": prompt})
    assert r.status_code == 404 and "nosuch" in r.json()["error"]["message"]


def test_peft_upload_reproduces_peft_merge(live, tmp_path):
    from peft import ShiraConfig, get_peft_model

    torch.manual_seed(0)
    model = copy.deepcopy(live.reference.model)  # base weights: the reference reverts after every use
    config = ShiraConfig(r=4, target_modules=["q_proj", "v_proj"], init_weights=False, random_seed=7)
    peft_model = get_peft_model(model, config)
    with torch.no_grad():  # PEFT's random init is N(0, 1); halve it so the model still writes text
        for name, param in peft_model.named_parameters():
            if "shira_weight" in name:
                param.mul_(0.5)
    peft_model.save_pretrained(tmp_path)
    merged = peft_model.merge_and_unload()

    prompt = PROMPTS[2]
    want = greedy_text(merged, live.engine.tokenizer, live.ids(prompt), NEW)
    assert want != live.generate(prompt)["text"], "the PEFT adapter should change the greedy output"
    files = {
        "adapter_model": ("adapter_model.safetensors", (tmp_path / "adapter_model.safetensors").read_bytes()),
        "adapter_config": ("adapter_config.json", (tmp_path / "adapter_config.json").read_bytes()),
    }
    r = live.upload("peft-shira", files=files)
    assert r.status_code == 201, r.text
    assert live.generate(prompt, adapter="peft-shira")["text"] == want


def _bad_adapters(live) -> dict[str, tuple[bytes, int]]:
    good = live.adapters["alpha"]
    layer, delta = next(iter(good.deltas.items()))

    def variant(**changes) -> bytes:
        d = SparseDelta(layer, changes.get("shape", delta.shape), changes.get("indices", delta.indices.clone()),
                        changes.get("values", delta.values.clone()))
        fp = changes.get("fingerprint", good.base_fingerprint)
        return adapter_to_bytes(SparseAdapter("bad", {layer: d}, "rand", fp))

    nan_values = delta.values.clone()
    nan_values[0] = float("nan")
    wide = delta.indices.long().clone()
    wide[-1] = delta.numel + 5
    other_base = json.loads(json.dumps(good.base_fingerprint))
    other_base["probes"] = {k: v * 3 + 0.1 for k, v in other_base["probes"].items()}
    return {
        "malformed": (b"not a safetensors file at all", 400),
        "truncated": (adapter_to_bytes(good)[:200], 400),
        "wrong shape": (variant(shape=(delta.shape[0] + 1, delta.shape[1])), 422),
        "out of range": (variant(indices=wide), 422),
        "nan": (variant(values=nan_values), 422),
        "other base": (variant(fingerprint=other_base), 422),
    }


def test_bad_uploads_are_refused_and_change_nothing(live):
    before_keys, before_list = live.keys(), live.client.get("/adapters").json()
    for label, (data, status) in _bad_adapters(live).items():
        r = live.upload("bad", files={"file": ("x.safetensors", data)})
        assert r.status_code == status, (label, r.text)
        assert r.json()["error"]["message"], label
    good = adapter_to_bytes(live.adapters["alpha"])
    refusals = {
        "bad name": (live.upload("Bad/Name", files={"file": ("a", good)}), 400),
        "no token": (live.upload("ok", files={"file": ("a", good)}, headers={}), 401),
        "wrong token": (live.upload("ok", files={"file": ("a", good)}, headers={"Authorization": "Bearer " + "n" * 40}),
                        403),
        "too big": (live.upload("ok", files={"file": ("a", b"\0" * (UPLOAD_LIMIT + 1))}), 413),
        "bad peft config": (live.upload("ok", files={"adapter_model": ("m", good), "adapter_config": ("c", b"{")}),
                            400),
        "exists": (live.upload("alpha", live.adapters["gamma"], params={"if_absent": "true"}), 409),
    }
    for label, (r, status) in refusals.items():
        assert r.status_code == status, (label, r.text)
    assert live.keys() == before_keys
    assert live.client.get("/adapters").json() == before_list


def test_client_disconnect_stops_generation(live):
    from service import metrics

    produced_before = metrics.GENERATED_TOKENS._value.get()
    body = {"prompt": "Once upon a time, in a land far away,", "max_new_tokens": 256, "stream": True}
    with live.client.stream("POST", "/generate", json=body) as r:
        assert r.status_code == 200
        next(r.iter_lines())  # the first delta arrived: generation runs; now hang up
    follow_up = live.generate(PROMPTS[3])  # waits behind (or joins) the abandoned request
    abandoned = metrics.GENERATED_TOKENS._value.get() - produced_before - follow_up["completion_tokens"]
    assert abandoned < 128, f"the abandoned stream went on for {abandoned} tokens"
    full = live.client.post("/generate", json={**body, "stream": False}).json()
    assert full["completion_tokens"] >= 128, "the prompt must run long for this test to mean anything"


def test_concurrent_mixed_requests_match_isolation_and_base_is_restored(live):
    sets = [{}, {"adapter": "alpha"}, {"adapter": "beta"}, {"adapter": "gamma"},
            {"adapters": "alpha:0.5,gamma:0.5"}, {"adapters": "beta:0.7,gamma:0.3", "merge": "ties"}]
    jobs = [(PROMPTS[i % len(PROMPTS)], sets[(i * 5 + i // 6) % len(sets)]) for i in range(30)]
    distinct = {(p, json.dumps(q, sort_keys=True)) for p, q in jobs}
    alone = {key: live.generate(key[0], **json.loads(key[1]))["text"] for key in sorted(distinct)}
    with ThreadPoolExecutor(max_workers=30) as pool:
        results = list(pool.map(lambda job: live.generate(job[0], **job[1]), jobs))
    for (prompt, query), got in zip(jobs, results, strict=True):
        assert got["text"] == alone[(prompt, json.dumps(query, sort_keys=True))], (prompt, query)
    live.generate(PROMPTS[0])  # a base request last: the engine is back on the base weights
    current = live.engine.model.state_dict()
    changed = [k for k, v in live.snapshot.items() if not torch.equal(v, current[k])]
    assert not changed, f"base weights differ after the storm: {changed[:5]}"
    metrics = live.client.get("/metrics").text
    assert 'shira_requests_total{adapter="alpha",status="200"}' in metrics
    assert "shira_process_resident_memory_bytes" in metrics
