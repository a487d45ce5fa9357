"""`shira bench train` workers: equal trainable counts across methods, sane times and memory."""

from __future__ import annotations

import pytest

from shira_bench.train import run_worker


@pytest.mark.parametrize("method", ["sparse", "gradmask", "lora", "peft_shira"])
def test_every_method_trains_the_same_number_of_entries(method):
    spec = {"method": method, "rank": 2, "layers": 1, "batch_size": 1, "seq_len": 8, "steps": 1,
            "device": "cpu", "dtype": "float32"}
    got = run_worker(spec)  # in a fresh process, as the benchmark runs it: in this one, freed memory is reused
    # One decoder layer of SmolLM2's shape: r * (in + out) summed over q, k, v, o, gate, up, down.
    in_out = (576 + 576) * 2 + (576 + 192) * 2 + (576 + 1536) * 3
    assert got["trainable"] == 2 * in_out
    assert got["step_s"] > 0 and got["memory"] == "rss"
    # The steps allocate at least the trainable values' fp32 gradients and AdamW's two moments; and, measured
    # above what the process held before them, less than the model itself (31.9M fp32 values, 121.5 MiB).
    model_mb = (49152 * 576 + 576 * 3 + (576 * 576 * 2 + 576 * 192 * 2 + 576 * 1536 * 3)) * 4 / 2**20
    assert 3 * 4 * got["trainable"] / 2**20 <= got["peak_mb"] < model_mb
