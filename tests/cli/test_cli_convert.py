"""`shira convert` through the real CLI: PEFT <-> native on a tiny model saved to disk as the base."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from random_adapters import random_adapter
from typer.testing import CliRunner

from shira_cli.main import app
from shira_core import BaseFingerprint, load_adapter, save_adapter
from shira_core.models import linear_weight_names
from shira_core.peft_export import save_peft_adapter
from shira_core.peft_interop import CONFIG_FILE, load_peft_adapter

peft = pytest.importorskip("peft")
runner = CliRunner()


@pytest.fixture(scope="module")
def base_dir(tiny_llama, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("base")
    tiny_llama(seed=0).save_pretrained(path)
    return path


@pytest.fixture
def peft_dir(base_dir: Path, tmp_path: Path) -> Path:
    from transformers import AutoModelForCausalLM

    config = peft.ShiraConfig(r=2, target_modules=["q_proj", "down_proj"], init_weights=False, random_seed=5)
    peft.get_peft_model(AutoModelForCausalLM.from_pretrained(base_dir), config).save_pretrained(tmp_path / "pft")
    return tmp_path / "pft"


def convert(*args: str):
    return runner.invoke(app, ["convert", *map(str, args)])


def test_peft_to_native_with_base(base_dir: Path, peft_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "native.safetensors"
    result = convert(peft_dir, out, "--base", base_dir, "--name", "mine")
    assert result.exit_code == 0, result.output
    assert "adapter 'mine', 4 layers" in result.output and "checked against base" in result.output

    from transformers import AutoModelForCausalLM

    fp = BaseFingerprint.of(AutoModelForCausalLM.from_pretrained(base_dir))
    native = load_adapter(out, base=fp)
    direct = load_peft_adapter(peft_dir, base=fp)
    assert native.name == "mine" and native.mask == "peft" and native.base_fingerprint["id"] == fp.id
    assert native.extra["peft_r"] == "2"
    for name, delta in direct.deltas.items():
        assert torch.equal(native.deltas[name].indices, delta.indices)
        assert torch.equal(native.deltas[name].values, delta.values)


def test_native_to_peft_and_back(base_dir: Path, tiny_llama, tmp_path: Path) -> None:
    model = tiny_llama(seed=0)
    adapter = random_adapter(model, "nat", seed=2, layers=linear_weight_names(model)[:3], density=0.05)
    src = tmp_path / "a.safetensors"
    save_adapter(adapter, src)
    result = convert(src, tmp_path / "as_peft", "--to", "peft")
    assert result.exit_code == 0, result.output
    assert "PEFT r=1" in result.output and "zero entries pad" in result.output
    assert json.loads((tmp_path / "as_peft" / CONFIG_FILE).read_text())["r"] == 1

    result = convert(tmp_path / "as_peft", tmp_path / "back.safetensors", "--base", base_dir)
    assert result.exit_code == 0, result.output
    back = load_adapter(tmp_path / "back.safetensors")
    assert back.name == "nat" and back.mask == "rand"
    for name, delta in adapter.deltas.items():
        assert torch.equal(back.deltas[name].indices, delta.indices)
        assert torch.equal(back.deltas[name].values, delta.values)


def test_convert_errors(base_dir: Path, peft_dir: Path, tiny_llama, tmp_path: Path) -> None:
    result = convert(peft_dir, tmp_path / "x.safetensors", "--to", "gguf")
    assert result.exit_code == 2 and "--to must be native or peft" in result.output
    result = convert(tmp_path / "missing", tmp_path / "x.safetensors")
    assert result.exit_code == 2 and "does not exist" in result.output
    result = convert(peft_dir, tmp_path)
    assert result.exit_code == 2 and "is a directory" in result.output
    result = convert(tmp_path, tmp_path / "x.safetensors")
    assert result.exit_code == 2 and "without adapter_config.json" in result.output

    other = tiny_llama(seed=1)  # same structure, other values: the fingerprint must refuse it
    adapter = random_adapter(other, "foreign", seed=3, layers=linear_weight_names(other)[:2])
    adapter.base_fingerprint = BaseFingerprint.of(other).to_dict()
    save_peft_adapter(adapter, tmp_path / "foreign")
    result = convert(tmp_path / "foreign", tmp_path / "f.safetensors", "--base", base_dir)
    assert result.exit_code == 2 and "was built for base" in result.output
    assert not (tmp_path / "f.safetensors").exists()


@pytest.mark.integration  # reads the bundled model's config (about 15 s), not its weights
def test_peft_without_base_uses_default_model_shapes(peft_dir: Path, tmp_path: Path) -> None:
    # The tiny adapter's weights are [32, 32] and [32, 64]; the default model's are far larger, so PEFT's
    # r*(in+out) entry count disagrees, and the error says where the shapes came from.
    result = convert(peft_dir, tmp_path / "x.safetensors")
    assert result.exit_code == 2
    assert "but PEFT gives a [576, " in result.output and "pass --base" in result.output
    assert not (tmp_path / "x.safetensors").exists()
