"""`shira experiment` end to end on a tiny Llama with a character tokenizer, plus its training helpers."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from shira_cli.experiment import FUSIONS, KINDS, ExperimentConfig, ExperimentConfigError, run_experiment
from shira_cli.experiment_report import END, START, update_markdown, write_outputs
from shira_cli.experiment_train import (
    AdapterCache,
    LoraFactors,
    dense_deltas_applied,
    dense_orthogonality,
    lora_ranks,
    train_lora,
    train_masked,
)
from shira_cli.main import app
from shira_core.analysis import awom_awor
from shira_core.delta import SparseAdapter, SparseDelta
from shira_core.demo_data import generate
from shira_core.models import linear_weight_names
from shira_core.training import TrainConfig, masks_for, parse_jsonl, train_adapter
from shira_core.training.data import examples_to_jsonl

from .training_support import char_tokenizer

TASKS = ("sentiment", "capitals")


def tiny_model(seed: int = 0) -> torch.nn.Module:
    """A 2-layer Llama with room for the demo prompts (the shared tiny_llama stops at 64 positions)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         tie_word_embeddings=True)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return LlamaForCausalLM(config).eval()


def small_config(**kw) -> ExperimentConfig:
    opts = {"tasks": TASKS, "steps": 3, "batch_size": 4, "lr": 1e-2, "density": 0.1, "max_len": 64,
            "eval_limit": 4, "n_train": 16, "calib_batches": 2}
    return ExperimentConfig(**{**opts, **kw})


@pytest.fixture(scope="module")
def tok():
    return char_tokenizer()


@pytest.fixture(scope="module")
def run(tok, tmp_path_factory):
    """One experiment run (and its written outputs) shared by the end-to-end tests."""
    model = tiny_model()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    cache = tmp_path_factory.mktemp("cache")
    lines: list[str] = []
    results = run_experiment(model, tok, small_config(), model_label="tiny", cache_dir=cache, progress=False,
                             log=lines.append)
    out = tmp_path_factory.mktemp("docs")
    paths = write_outputs(results, out, small_config().command(out))
    return {"model": model, "before": before, "results": results, "cache": cache, "out": out, "paths": paths,
            "lines": lines}


def test_results_have_every_table_with_valid_numbers(run):
    r = run["results"]
    assert set(r) >= {"setup", "base", "single", "fusion", "orthogonality", "seconds"}
    assert {(row["task"], row["method"]) for row in r["single"]} == {(t, k) for t in TASKS for k in KINDS}
    for row in r["single"]:
        assert 0.0 <= row["accuracy"] <= 1.0 and row["examples"] == 4 and len(row["samples"]) == 3
    for task in TASKS:
        assert 0.0 <= r["base"][task]["accuracy"] <= 1.0
    single = {(row["task"], row["method"]): row for row in r["single"]}
    # Equal trainable counts: every SHiRA kind trains the same nnz; LoRA's ranks give r * (in + out) per layer.
    nnz = {single[(t, k)]["trainable"] for t in TASKS for k in ("wm", "snip", "wm-next")}
    assert len(nnz) == 1
    model = run["model"]
    params = dict(model.named_parameters())
    ranks = lora_ranks(model, linear_weight_names(model), 0.1)
    assert single[(TASKS[0], "lora")]["trainable"] == sum(r * sum(params[n].shape) for n, r in ranks.items())
    # The first task's non-overlapping adapter is its top-1% adapter; the second one is trained afresh.
    assert single[(TASKS[0], "wm-next")]["same_as"] == "wm"
    assert "same_as" not in single[(TASKS[1], "wm-next")]

    kinds = {"overlap": "wm", "nonoverlap": "wm-next", "lora": "lora"}
    assert {(row["fusion"], row["task"]) for row in r["fusion"]} == {(f, t) for f in FUSIONS for t in TASKS}
    for row in r["fusion"]:
        assert 0.0 <= row["fused"] <= 1.0 and row["weight"] == 1.0
        assert row["single"] == single[(row["task"], kinds[row["fusion"]])]["accuracy"]
        assert row["drop"] == pytest.approx(row["single"] - row["fused"], abs=1e-12)
    changed = r["fused_changed_values"]
    assert changed["overlap"]["changed_values"] == next(iter(nnz))  # identical masks: the union is one mask
    assert changed["nonoverlap"]["changed_values"] == 2 * next(iter(nnz))  # disjoint masks
    assert changed["lora"]["changed_values"] == sum(p.numel() for n, p in params.items() if n in ranks)

    ortho = {row["kind"]: row for row in r["orthogonality"]}
    assert set(ortho) == {"wm", "wm-next", "snip", "lora"}
    for row in ortho.values():
        assert 0.0 <= row["awor_mean"] <= 1.0 and 0.0 <= row["awor_pooled"] <= 1.0 and row["awom_total"] > 0
    assert ortho["wm"]["overlap_fraction_a"] == 1.0  # overlapping: the same top-|W| entries for both tasks
    assert ortho["wm-next"]["overlap_fraction_a"] == 0.0  # non-overlapping: "next top 1%"
    assert ortho["lora"]["awor_pooled"] < ortho["wm-next"]["awor_pooled"]  # dense ΔW products are dense


def test_the_base_model_is_left_bit_for_bit(run):
    for name, p in run["model"].named_parameters():
        assert torch.equal(p.detach(), run["before"][name]), f"{name} changed"
        assert p.grad is None


def test_outputs_written_and_markdown_prose_kept(run):
    js, md, png = run["paths"]
    data = json.loads(js.read_text())
    assert data["command"].startswith("shira experiment --tasks sentiment,capitals --steps 3")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    text = md.read_text()
    assert START in text and END in text and "| PEFT LoRA |" in text and "**mean**" in text and "AWOR" in text
    md.write_text("# Title\n\nMy reading.\n\n" + text[text.index(START):] + "\nAfterword.\n")
    update_markdown(md, "new block\n")
    again = md.read_text()
    assert again.startswith("# Title\n\nMy reading.") and again.rstrip().endswith("Afterword.")
    assert "new block" in again and "| PEFT LoRA |" not in again


def test_reuse_loads_every_adapter_from_the_cache_and_repeats_the_numbers(run, tok):
    lines: list[str] = []
    again = run_experiment(tiny_model(), tok, small_config(), model_label="tiny", cache_dir=run["cache"], reuse=True,
                           progress=False, log=lines.append)
    first = {(r["task"], r["method"]): r for r in run["results"]["single"]}
    for row in again["single"]:
        assert row["cached"] or row.get("same_as"), row
        assert row["accuracy"] == first[(row["task"], row["method"])]["accuracy"]
        assert row["samples"] == first[(row["task"], row["method"])]["samples"]
    assert [r["fused"] for r in again["fusion"]] == [r["fused"] for r in run["results"]["fusion"]]
    assert not any(line.startswith("trained") for line in lines)
    # Any changed setting is a different cache entry, so nothing is reused by mistake.
    cache = AdapterCache(run["cache"], True, run["model"], "tiny")
    settings = {"task": "sentiment", "kind": "wm", "train": {"lr": 0.01, "max_steps": 3}}
    assert cache.path("sentiment", "wm", settings) != cache.path("sentiment", "wm", {**settings, "kind": "snip"})
    assert cache.path("sentiment", "wm", settings) != cache.path(
        "sentiment", "wm", {**settings, "train": {"lr": 0.01, "max_steps": 2}})
    assert AdapterCache(run["cache"], True, run["model"], "other").path("sentiment", "wm", settings) != cache.path(
        "sentiment", "wm", settings)


def _data(task: str):
    train, _ = generate(task, seed=0, n_train=16)
    return parse_jsonl(examples_to_jsonl(train))


def test_train_masked_matches_train_adapter_on_the_same_mask(tok):
    model = tiny_model()
    train = _data("sentiment")
    cfg = TrainConfig(method="sparse", mask="wm", density=0.1, epochs=2, lr=1e-2, batch_size=4, max_len=64,
                      max_steps=6)
    reference = train_adapter(model, tok, train, None, cfg, name="ref", progress=False).adapter
    masks = masks_for(model, "wm", 0.1, linear_weight_names(model))
    mine = train_masked(model, tok, train, cfg, masks, "mine")
    assert mine.deltas.keys() == reference.deltas.keys()
    for name, d in reference.deltas.items():
        assert torch.equal(d.indices, mine.deltas[name].indices)
        assert torch.equal(d.values, mine.deltas[name].values), f"{name} trained differently"
    assert mine.extra["steps"] == "6"


def test_lora_fused_densely_and_restored_bit_for_bit(tok):
    model = tiny_model()
    names = linear_weight_names(model)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    cfg = TrainConfig(method="sparse", density=0.1, lr=1e-2, batch_size=4, max_len=64, max_steps=3)
    a = train_lora(model, tok, _data("sentiment"), cfg, names, "a")
    b = train_lora(model, tok, _data("capitals"), cfg, names, "b")
    assert type(model).__name__ == "LlamaForCausalLM" and not any("lora" in n for n, _ in model.named_parameters())
    for n, p in model.named_parameters():
        assert torch.equal(p.detach(), before[n]) and p.requires_grad == flags[n], n
    ranks = lora_ranks(model, names, 0.1)
    assert {w: f[0].shape[0] for w, f in a.factors.items()} == ranks
    assert all(float(f[1].abs().sum()) > 0 for f in a.factors.values())  # B moved off its zero init
    params = dict(model.named_parameters())
    w = names[0]
    with dense_deltas_applied(model, [(a, 1.0), (b, 0.5)]):
        expected = before[w] + a.delta(w) + 0.5 * b.delta(w)
        assert torch.allclose(params[w].detach(), expected, atol=1e-6)
    for n, p in model.named_parameters():
        assert torch.equal(p.detach(), before[n]), f"{n} not restored"
    tensors, meta = a.to_tensors()
    back = LoraFactors.from_tensors(tensors, meta)
    assert back.name == "a" and torch.equal(back.delta(w), a.delta(w))


def test_dense_orthogonality_agrees_with_the_sparse_metrics(tok):
    gen = torch.Generator().manual_seed(0)

    def factors(name: str) -> LoraFactors:
        return LoraFactors(name, {"w": (torch.randn(2, 6, generator=gen), torch.randn(5, 2, generator=gen), 2.0)})

    a, b = factors("a"), factors("b")

    def as_sparse(lora: LoraFactors) -> SparseAdapter:
        dense = lora.delta("w").reshape(-1)
        return SparseAdapter(lora.name, {"w": SparseDelta("w", (5, 6), torch.arange(30), dense)}, "dense")

    reference = awom_awor(as_sparse(a), as_sparse(b))["aggregate"]
    got = dense_orthogonality(a, b)
    assert got["awom_total"] == pytest.approx(reference["awom_total"], rel=1e-5)
    assert got["awor_pooled"] == pytest.approx(reference["awor_pooled"]) and got["awor_pooled"] == 0.0


@pytest.mark.parametrize(("kw", "needle"), [
    ({"tasks": ("sentiment",)}, "two or more distinct tasks"),
    ({"tasks": ("sentiment", "sentiment")}, "two or more distinct tasks"),
    ({"tasks": ("sentiment", "nope")}, "unknown task(s) ['nope']"),
    ({"density": 0.6}, "density must be in (0, 1/2]"),
    ({"steps": 0}, "--steps must be at least 1"),
])
def test_bad_options_are_refused(kw, needle):
    with pytest.raises(ExperimentConfigError) as err:
        small_config(**kw).validate()
    assert needle in str(err.value)


def test_cli_refuses_bad_tasks_before_loading_a_model(tmp_path):
    result = CliRunner().invoke(app, ["experiment", "--tasks", "sentiment", "--base", str(tmp_path / "missing"),
                                      "--out", str(tmp_path / "out")])
    assert result.exit_code == 2 and "two or more distinct tasks" in result.output
    assert not (tmp_path / "out").exists()
