"""`shira experiment` end to end on a tiny Llama with a character tokenizer."""

from __future__ import annotations

import json

import pytest
import torch
from core.training_support import char_tokenizer, demo_llama
from typer.testing import CliRunner

from shira_cli.experiment import FUSIONS, KINDS, ExperimentConfig, ExperimentConfigError, run_experiment
from shira_cli.experiment_report import END, START, update_markdown, write_outputs
from shira_cli.experiment_train import TrainedAdapters
from shira_cli.main import app
from shira_core.baselines import lora_ranks
from shira_core.models import linear_weight_names

TASKS = ("sentiment", "capitals")


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
    model = demo_llama()
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
    again = run_experiment(demo_llama(), tok, small_config(), model_label="tiny", cache_dir=run["cache"], reuse=True,
                           progress=False, log=lines.append)
    first = {(r["task"], r["method"]): r for r in run["results"]["single"]}
    for row in again["single"]:
        assert row["cached"] or row.get("same_as"), row
        assert row["accuracy"] == first[(row["task"], row["method"])]["accuracy"]
        assert row["samples"] == first[(row["task"], row["method"])]["samples"]
    assert [r["fused"] for r in again["fusion"]] == [r["fused"] for r in run["results"]["fusion"]]
    assert not any(line.startswith("trained") for line in lines)
    # Any changed setting is a different cache entry, so nothing is reused by mistake.
    cache = TrainedAdapters(run["cache"], True, run["model"], "tiny")
    settings = {"task": "sentiment", "kind": "wm", "train": {"lr": 0.01, "max_steps": 3}}
    assert cache.path("sentiment", "wm", settings) != cache.path("sentiment", "wm", {**settings, "kind": "snip"})
    assert cache.path("sentiment", "wm", settings) != cache.path(
        "sentiment", "wm", {**settings, "train": {"lr": 0.01, "max_steps": 2}})
    assert TrainedAdapters(run["cache"], True, run["model"], "other").path("sentiment", "wm", settings) != cache.path(
        "sentiment", "wm", settings)


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
