"""PEFT SHiRA interop: import PEFT adapters, export native ones, and check logits against PEFT itself."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from random_adapters import random_adapter
from safetensors.torch import load_file, save_file

from shira_core import (
    AdapterFormatError,
    BaseFingerprint,
    BaseModelMismatchError,
    IndexRangeError,
    LengthMismatchError,
    ShapeMismatchError,
    SparseAdapter,
    SparseDelta,
    Switcher,
    UnknownLayerError,
)
from shira_core.models import linear_weight_names
from shira_core.peft_export import peft_rank, save_peft_adapter
from shira_core.peft_interop import CONFIG_FILE, WEIGHTS_FILE, load_peft_adapter, peft_from_bytes, peft_records_shapes

peft = pytest.importorskip("peft")

TARGETS = ["q_proj", "v_proj", "up_proj", "down_proj"]
Q0 = "base_model.model.model.layers.0.self_attn.q_proj."
TOKENS = torch.arange(1, 33).view(2, 16) % 64


def logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=TOKENS).logits


@pytest.fixture
def peft_dir(tiny_llama, tmp_path: Path) -> Path:
    """A PEFT SHiRA adapter (r=2, random non-zero weights) saved by PEFT itself from tiny_llama(seed=0)."""
    config = peft.ShiraConfig(r=2, target_modules=TARGETS, init_weights=False, random_seed=7)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(3)
        model = peft.get_peft_model(tiny_llama(seed=0), config)
    model.save_pretrained(tmp_path / "peft")
    return tmp_path / "peft"


def peft_merged_logits(tiny_llama, directory: Path) -> torch.Tensor:
    model = peft.PeftModel.from_pretrained(tiny_llama(seed=0), directory).eval()
    unmerged = logits(model)
    merged = logits(model.merge_and_unload())
    torch.testing.assert_close(unmerged, merged, atol=1e-5, rtol=0)
    return merged


def switched_logits(model: torch.nn.Module, adapter: SparseAdapter) -> torch.Tensor:
    Switcher(model).apply([(adapter, 1.0)])
    return logits(model)


def rewrite(directory: Path, config: dict | None = None, **tensors: torch.Tensor | None) -> None:
    """Edits a saved PEFT adapter in place: config keys, and tensors by key suffix after Q0 (None drops)."""
    if config:
        data = json.loads((directory / CONFIG_FILE).read_text())
        data.update(config)
        (directory / CONFIG_FILE).write_text(json.dumps(data))
    state = load_file(directory / WEIGHTS_FILE)
    for key, value in tensors.items():
        if value is None:
            state.pop(Q0 + key)
        else:
            state[Q0 + key] = value.contiguous()
    save_file(state, directory / WEIGHTS_FILE, metadata={"format": "pt"})


def test_peft_key_names_are_as_documented(peft_dir: Path) -> None:
    state = load_file(peft_dir / WEIGHTS_FILE)
    assert Q0 + "shira_indices" in state and Q0 + "shira_weight" in state
    assert state[Q0 + "shira_indices"].dtype == torch.int32
    assert list(state[Q0 + "shira_indices"].shape) == [2, 2 * (32 + 32)]
    assert len(state) == 2 * 2 * len(TARGETS)
    assert json.loads((peft_dir / CONFIG_FILE).read_text())["peft_type"] == "SHIRA"


def test_import_matches_peft_merge(tiny_llama, peft_dir: Path) -> None:
    expected = peft_merged_logits(tiny_llama, peft_dir)
    fresh = tiny_llama(seed=0)
    adapter = load_peft_adapter(peft_dir, base=BaseFingerprint.of(fresh))
    assert adapter.name == "peft" and adapter.mask == "peft"
    assert adapter.extra["peft_r"] == "2"
    assert json.loads(adapter.extra["peft_target_modules"]) == sorted(TARGETS)
    assert len(adapter) == 2 * len(TARGETS)
    assert all(d.nnz == 2 * sum(d.shape) for d in adapter)
    assert not torch.allclose(expected, logits(fresh), atol=1e-3)  # the adapter changes something
    torch.testing.assert_close(switched_logits(fresh, adapter), expected, atol=1e-5, rtol=0)


def test_unsorted_and_duplicate_pairs_match_peft(tiny_llama, peft_dir: Path) -> None:
    state = load_file(peft_dir / WEIGHTS_FILE)
    idx, w = state[Q0 + "shira_indices"], state[Q0 + "shira_weight"]
    order = torch.randperm(idx.shape[1], generator=torch.Generator().manual_seed(0))
    idx, w = idx[:, order].clone(), w[order].clone()
    idx[:, 5] = idx[:, 9]  # PEFT sums duplicate pairs; so must we
    rewrite(peft_dir, shira_indices=idx, shira_weight=w)

    expected = peft_merged_logits(tiny_llama, peft_dir)
    fresh = tiny_llama(seed=0)
    adapter = load_peft_adapter(peft_dir, base=BaseFingerprint.of(fresh))
    delta = adapter.deltas["model.layers.0.self_attn.q_proj.weight"]
    assert delta.nnz == idx.shape[1] - 1
    flat = int(idx[0, 9]) * 32 + int(idx[1, 9])
    assert float(delta.to_dense().view(-1)[flat]) == pytest.approx(float(w[5] + w[9]))
    torch.testing.assert_close(switched_logits(fresh, adapter), expected, atol=1e-5, rtol=0)


def uneven_adapter(model: torch.nn.Module) -> SparseAdapter:
    """Different densities per layer, so the export needs zero padding to reach one r*(in+out) everywhere."""
    names = linear_weight_names(model)
    adapter = random_adapter(model, "native", seed=11, layers=names[:4], density=0.1, pool=1.0, std=0.5)
    sparse = random_adapter(model, "b", seed=12, layers=names[4:], density=0.02, pool=1.0, std=0.5)
    adapter.deltas.update(sparse.deltas)
    adapter.base_fingerprint = BaseFingerprint.of(model).to_dict(names)
    adapter.extra = {"note": "kept"}
    return adapter


def test_export_loads_in_peft_with_same_logits(tiny_llama, tmp_path: Path) -> None:
    model = tiny_llama(seed=0)
    adapter = uneven_adapter(model)
    r = peft_rank(adapter)
    assert r > 1 and any(d.nnz < r * sum(d.shape) for d in adapter)
    out = save_peft_adapter(adapter, tmp_path / "exported", base_model_name_or_path="tiny")

    config = json.loads((out / CONFIG_FILE).read_text())
    assert config["r"] == r and config["peft_type"] == "SHIRA" and config["base_model_name_or_path"] == "tiny"
    state = load_file(out / WEIGHTS_FILE)
    for d in adapter:
        assert state["base_model.model." + d.name.removesuffix("weight") + "shira_weight"].numel() == r * sum(d.shape)

    expected = switched_logits(model, adapter)
    torch.testing.assert_close(peft_merged_logits(tiny_llama, out), expected, atol=1e-5, rtol=0)

    back = load_peft_adapter(out)  # no base needed: the file records shapes, and the padding is dropped
    assert peft_records_shapes((out / WEIGHTS_FILE).read_bytes())
    assert (back.name, back.mask, back.base_fingerprint) == (adapter.name, adapter.mask, adapter.base_fingerprint)
    assert back.extra["note"] == "kept" and back.extra["peft_r"] == str(r)
    assert back.deltas.keys() == adapter.deltas.keys()
    for name, d in adapter.deltas.items():
        assert torch.equal(back.deltas[name].indices.long(), d.indices.long()), name
        assert torch.equal(back.deltas[name].values, d.values), name


def test_export_refuses_what_peft_cannot_hold(tiny_llama, tmp_path: Path) -> None:
    model = tiny_llama(seed=0)
    norm = random_adapter(model, "norm", seed=1, layers=["model.layers.0.input_layernorm.weight"])
    with pytest.raises(ShapeMismatchError, match=r"2-D nn.Linear.*input_layernorm.*\[32\]"):
        save_peft_adapter(norm, tmp_path / "a")
    k = "model.layers.0.self_attn.k_proj.weight"  # [16, 32]: 512 entries need r=11, 11*48 = 528 > 512
    dense = random_adapter(model, "dense", seed=1, layers=[k], density=1.0, pool=1.0)
    with pytest.raises(ShapeMismatchError, match=r"r=11.*would need 528 entries but has only 512"):
        save_peft_adapter(dense, tmp_path / "b")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_import_from_bytes_and_name(tiny_llama, peft_dir: Path) -> None:
    fp = BaseFingerprint.of(tiny_llama(seed=0))
    config, weights = (peft_dir / CONFIG_FILE).read_bytes(), (peft_dir / WEIGHTS_FILE).read_bytes()
    adapter = peft_from_bytes(config, weights, base=fp, name="upload")
    assert adapter.name == "upload" and not peft_records_shapes(weights)
    with pytest.raises(AdapterFormatError, match="not JSON"):
        peft_from_bytes(b"{nope", weights, base=fp)
    with pytest.raises(AdapterFormatError, match="safetensors"):
        peft_from_bytes(config, b"\x10\x00\x00\x00\x00\x00\x00\x00{}", base=fp)


@pytest.mark.parametrize(
    ("edit", "error", "message"),
    [
        (lambda d: rewrite(d, {"peft_type": "LORA"}), AdapterFormatError, "peft_type 'LORA'"),
        (lambda d: rewrite(d, {"fan_in_fan_out": True}), AdapterFormatError, "fan_in_fan_out"),
        (lambda d: rewrite(d, {"r": 0}), AdapterFormatError, "positive integer"),
        (lambda d: (d / CONFIG_FILE).unlink(), AdapterFormatError, "has no adapter_config.json"),
        (lambda d: (d / WEIGHTS_FILE).rename(d / "adapter_model.bin"), AdapterFormatError, "never loaded"),
        (lambda d: rewrite(d, shira_weight=torch.zeros(100)), LengthMismatchError, r"128 vs 100 .*q_proj"),
        (lambda d: rewrite(d, shira_indices=None), AdapterFormatError, "no shira_indices for module"),
        (lambda d: rewrite(d, shira_indices=torch.zeros(3, 128, dtype=torch.int32)), AdapterFormatError, r"\[2, n\]"),
        (
            lambda d: rewrite(d, shira_indices=torch.tensor([[0] * 128, [0] * 127 + [32]], dtype=torch.int32)),
            IndexRangeError,
            r"column index out of range: \[0, 32\] .* 32 columns for layer model.layers.0.self_attn.q_proj",
        ),
        (
            lambda d: rewrite(d, shira_indices=torch.tensor([[-1] * 128, [0] * 128], dtype=torch.int32)),
            IndexRangeError,
            "row index out of range",
        ),
        (
            lambda d: rewrite(d, shira_weight=torch.zeros(64), shira_indices=torch.zeros(2, 64, dtype=torch.int32)),
            ShapeMismatchError,
            r"64 entries, but PEFT gives a \[32, 32\] weight r\*\(in\+out\) = 2\*64 = 128",
        ),
        (
            lambda d: rewrite(d, **{"lm_head.modules_to_save.weight": torch.zeros(2)}),
            AdapterFormatError,
            "not a SHiRA tensor",
        ),
    ],
)
def test_bad_peft_inputs(tiny_llama, peft_dir: Path, edit, error, message) -> None:
    edit(peft_dir)
    with pytest.raises(error, match=message):
        load_peft_adapter(peft_dir, base=BaseFingerprint.of(tiny_llama(seed=0)))


def test_import_needs_a_matching_base(tiny_llama, peft_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(AdapterFormatError, match="do not record weight shapes.*--base"):
        load_peft_adapter(peft_dir)
    with pytest.raises(ShapeMismatchError, match="the adapter was made for a weight of another shape"):
        load_peft_adapter(peft_dir, base=BaseFingerprint.of(tiny_llama(hidden=48)))
    with pytest.raises(UnknownLayerError, match="model.layers.1.* which the base model does not have"):
        load_peft_adapter(peft_dir, base=BaseFingerprint.of(tiny_llama(layers=1)))
    with pytest.raises(AdapterFormatError, match="not a directory"):
        load_peft_adapter(peft_dir / CONFIG_FILE)

    model = tiny_llama(seed=0)
    adapter = uneven_adapter(model)
    out = save_peft_adapter(adapter, tmp_path / "exported")
    with pytest.raises(BaseModelMismatchError, match="was built for base"):
        load_peft_adapter(out, base=BaseFingerprint.of(tiny_llama(seed=1)))
    with pytest.raises(ShapeMismatchError, match="shape differs"):
        load_peft_adapter(out, base=BaseFingerprint.of(tiny_llama(hidden=48)))


def test_empty_and_zero_layer_export(tiny_llama, tmp_path: Path) -> None:
    with pytest.raises(AdapterFormatError, match="no layers"):
        save_peft_adapter(SparseAdapter("empty", {}), tmp_path / "e")
    q = "model.layers.0.self_attn.q_proj.weight"
    empty_layer = SparseDelta(q, (32, 32), torch.zeros(0, dtype=torch.int64), torch.zeros(0))
    out = save_peft_adapter(SparseAdapter("zero", {q: empty_layer}), tmp_path / "z")
    model = tiny_llama(seed=0)
    torch.testing.assert_close(peft_merged_logits(tiny_llama, out), logits(model), atol=1e-6, rtol=0)
    assert load_peft_adapter(out).deltas[q].nnz == 0
