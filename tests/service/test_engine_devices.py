"""The engine in half precision on every device this machine has: CPU always, CUDA too where one is present.

bf16 is what `dtype=auto` serves on CUDA, and what a user may pick on a CPU. The other engine tests run in
fp32 on the CPU, where texts can be compared bit for bit; here the checks are the ones rounding cannot move:
every row gets its own set, rows of several sets share batches, and the base comes back bit-exact.
"""

from __future__ import annotations

import asyncio

import pytest
import torch
from random_adapters import random_adapter
from support import request, tiny_model, upload

from service.config import Settings
from service.engine import Engine

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mixed", [True, False])
def test_bf16_engine_serves_every_set_and_restores_the_base(tokenizer, registry, device, mixed):
    model = tiny_model(len(tokenizer)).to(device=device, dtype=torch.bfloat16)
    snapshot = {k: v.detach().clone() for k, v in model.state_dict().items()}
    engine = Engine(Settings(max_queue=64, batch_wait_ms=20.0, mixed_batches=mixed), registry, model=model,
                    tokenizer=tokenizer)
    engine.start()
    try:
        for seed, name in enumerate(["a1", "a2", "a3"], start=1):
            adapter = random_adapter(model, name, seed, density=0.1, std=0.5, mask_seed_step=1000, fingerprint=True)
            upload(registry, adapter, engine.fingerprint)
        ids = engine.encode(prompt="Hello there")
        sets = [(), ("a1",), ("a2",), ("a3",), ("a1", "a2"), ("a1",)]

        async def run():
            await engine.generate(request(ids, "a1", n=2))
            before = engine.status()["batches"]
            results = await asyncio.gather(*(engine.generate(request(ids, *s, n=6)) for s in sets))
            return results, engine.status()["batches"] - before

        results, batches = asyncio.run(run())
    finally:
        engine.stop()
    assert [[a["name"] for a in r.adapters] for r in results] == [list(s) for s in sets]
    assert all(r.completion_tokens == 6 for r in results)
    assert len({r.text for r in results}) >= 4  # the sets really change the output
    if mixed:
        assert batches <= 2  # rows of several sets shared a batch
    engine.switcher.revert()
    state = engine.model.state_dict()
    assert all(torch.equal(state[k], v) for k, v in snapshot.items())
