"""`shira train` and `shira demo-data` on a tiny model saved to disk: a loadable adapter, clear data errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from core.training_support import char_tokenizer, records
from typer.testing import CliRunner

from shira_cli.main import app
from shira_core.fingerprint import BaseFingerprint
from shira_core.io import load_adapter
from shira_core.peft_interop import load_peft_adapter
from shira_core.training.data import examples_to_jsonl

runner = CliRunner()


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory, tiny_llama):
    folder = tmp_path_factory.mktemp("tiny-base")
    model = tiny_llama(seed=0, vocab=128)
    model.save_pretrained(folder)
    char_tokenizer().save_pretrained(folder)
    return folder, BaseFingerprint.of(model)


def _write(path: Path, recs) -> Path:
    path.write_text(examples_to_jsonl(recs), encoding="utf-8")
    return path


def test_train_writes_a_loadable_adapter_and_peft_copy(saved_model, tmp_path):
    folder, fingerprint = saved_model
    train = _write(tmp_path / "train.jsonl", records(16, seed=0))
    held = _write(tmp_path / "eval.jsonl", records(4, seed=1))
    out = tmp_path / "a.safetensors"
    args = ["train", "--base", str(folder), "--data", str(train), "--eval", str(held), "--out", str(out),
            "--mask", "rand", "--density", "0.05", "--epochs", "1", "--lr", "1e-2", "--batch-size", "4",
            "--max-len", "48", "--device", "cpu", "--no-progress", "--json", "--export-peft", str(tmp_path / "peft")]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout[result.stdout.index("{"):])
    assert summary["steps"] == 4 and len(summary["epochs"]) == 1
    assert summary["epochs"][0]["eval_loss"] > 0 and 0 <= summary["epochs"][0]["eval_accuracy"] <= 1
    adapter = load_adapter(out, base=fingerprint)
    assert adapter.name == "a" and adapter.mask == "rand" and adapter.nnz == summary["nnz"]
    assert adapter.density == pytest.approx(0.05, rel=0.05)
    assert any(bool((d.values != 0).any()) for d in adapter)
    peft = load_peft_adapter(tmp_path / "peft", base=fingerprint)
    assert peft.nnz == adapter.nnz


def test_bad_jsonl_fails_fast_with_the_line_number(saved_model, tmp_path):
    folder, _ = saved_model
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "completion": "b"}\n{"prompt": "only"}\n', encoding="utf-8")
    out = tmp_path / "x.safetensors"
    result = runner.invoke(app, ["train", "--base", str(folder), "--data", str(bad), "--out", str(out)])
    assert result.exit_code == 2
    assert "bad.jsonl line 2: missing 'completion'" in result.output
    assert not out.exists()
    result = runner.invoke(app, ["train", "--data", str(tmp_path / "nope.jsonl"), "--out", str(out)])
    assert result.exit_code == 2 and "does not exist" in result.output
    result = runner.invoke(app, ["train", "--data", str(bad), "--out", str(out), "--mask", "top"])
    assert result.exit_code == 2 and "unknown mask 'top'" in result.output


def test_demo_data_writes_every_task(tmp_path):
    result = runner.invoke(app, ["demo-data", "--out", str(tmp_path), "--train", "12", "--eval", "8"])
    assert result.exit_code == 0, result.output
    for task in ("kv2json", "sentiment", "capitals"):
        train = (tmp_path / task / "train.jsonl").read_text().splitlines()
        held = (tmp_path / task / "eval.jsonl").read_text().splitlines()
        assert train and held and not set(train) & set(held)
    again = tmp_path / "again"
    runner.invoke(app, ["demo-data", "--out", str(again), "--task", "kv2json", "--train", "12", "--eval", "8"])
    assert (again / "train.jsonl").read_bytes() == (tmp_path / "kv2json" / "train.jsonl").read_bytes()
    result = runner.invoke(app, ["demo-data", "--out", str(tmp_path), "--task", "nope"])
    assert result.exit_code == 2 and "unknown task" in result.output
