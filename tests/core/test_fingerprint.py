"""BaseFingerprint: same checkpoint in any float dtype matches, another checkpoint or architecture does not."""

from __future__ import annotations

import pytest
import torch

from shira_core import (
    BaseFingerprint,
    BaseModelMismatchError,
    ShapeMismatchError,
    SparseAdapter,
    SparseDelta,
    UnknownLayerError,
)
from shira_core.fingerprint import unique_parameters

EMBED = "model.embed_tokens.weight"
HEAD = "lm_head.weight"
Q0 = "model.layers.0.self_attn.q_proj.weight"


def adapter_for(fp: BaseFingerprint | None, layers: dict[str, tuple[int, ...]], name: str = "a") -> SparseAdapter:
    deltas = {k: SparseDelta(k, shape, torch.tensor([0, 1]), torch.tensor([0.1, 0.2])) for k, shape in layers.items()}
    return SparseAdapter(name, deltas, base_fingerprint=None if fp is None else fp.to_dict(layers))


@pytest.fixture(scope="module")
def model(tiny_llama):
    return tiny_llama(seed=0)


@pytest.fixture(scope="module")
def fp(model) -> BaseFingerprint:
    return BaseFingerprint.of(model)


def test_tied_weights_listed_once_with_alias(model, fp):
    params = unique_parameters(model)
    assert EMBED in params and HEAD not in params
    assert len(params) == len(list(model.parameters()))
    assert HEAD not in fp.shapes and fp.aliases == {HEAD: EMBED}
    assert fp.dtype == "float32"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_same_checkpoint_in_any_dtype_matches(tiny_llama, fp, dtype):
    adapter = adapter_for(fp, {Q0: (32, 32), EMBED: (64, 32)})
    other = BaseFingerprint.of(tiny_llama(seed=0, dtype=dtype))
    assert other.structure_hash == fp.structure_hash
    other.check(adapter)
    full = SparseAdapter("full", {}, base_fingerprint=fp.to_dict())  # every probe, norms included
    other.check(full)


def test_other_seed_is_another_base(tiny_llama, fp):
    other = BaseFingerprint.of(tiny_llama(seed=1))
    assert other.structure_hash == fp.structure_hash
    with pytest.raises(BaseModelMismatchError, match=r"'full' was built for base \w+, not this one .*mean \|w\|"):
        other.check(SparseAdapter("full", {}, base_fingerprint=fp.to_dict()))


def test_other_architecture(tiny_llama, fp):
    other = BaseFingerprint.of(tiny_llama(seed=0, hidden=48))
    with pytest.raises(BaseModelMismatchError, match=r"different architecture \(structure \w+ vs \w+\)"):
        other.check(SparseAdapter("x", {}, base_fingerprint=fp.to_dict()))


def test_to_dict_keeps_only_named_probes(fp):
    d = fp.to_dict([Q0, HEAD, "not.a.weight"])
    assert set(d) == {"id", "structure", "dtype", "probes"}
    assert set(d["probes"]) == {Q0}
    assert d["structure"] == fp.structure_hash and d["id"] == fp.id
    assert len(fp.to_dict()["probes"]) == len(fp.shapes)


def test_tiny_magnitude_weights_survive_rounding(tiny_llama):
    """Probes are rounded to significant digits; rounding to decimals turned a 1.6e-6 probe into 2e-6."""
    model = tiny_llama(seed=0)
    with torch.no_grad():
        model.get_parameter(Q0).mul_(1e-4)
    fp = BaseFingerprint.of(model)
    assert 0 < fp.probes[Q0] < 1e-5
    stored = fp.to_dict([Q0])["probes"][Q0]
    assert stored == pytest.approx(fp.probes[Q0], rel=1e-5)  # six significant digits, not six decimals
    adapter = adapter_for(fp, {Q0: (32, 32)})
    fp.check(adapter)
    with torch.no_grad():  # 10% larger, still tiny: another base, which the rounded probe can tell apart
        model.get_parameter(Q0).mul_(1.1)
    with pytest.raises(BaseModelMismatchError, match=r"weight model\.layers\.0\.self_attn\.q_proj\.weight"):
        BaseFingerprint.of(model).check(adapter)


def test_unknown_layer_and_shape(fp):
    with pytest.raises(UnknownLayerError, match=r"'a' targets model\.layers\.4\.mlp\.up_proj\.weight"):
        fp.check(adapter_for(None, {"model.layers.4.mlp.up_proj.weight": (64, 32)}))
    with pytest.raises(ShapeMismatchError, match=r"q_proj.*'a'.*\[16, 64\].*\[32, 32\]"):
        fp.check(adapter_for(None, {Q0: (16, 64)}))


def test_tied_alias_name_is_a_known_layer(fp):
    fp.check(adapter_for(fp, {HEAD: (64, 32)}))
    with pytest.raises(ShapeMismatchError, match=r"lm_head\.weight.*\[32, 64\].*\[64, 32\]"):
        fp.check(adapter_for(None, {HEAD: (32, 64)}))


def test_shapes_only_fingerprint_checks_structure_not_values(tiny_llama, fp):
    shapes_only = BaseFingerprint(dict(fp.shapes), {}, "meta")
    shapes_only.check(adapter_for(fp, {Q0: (32, 32)}))
    with pytest.raises(ShapeMismatchError):
        shapes_only.check(adapter_for(fp, {Q0: (32, 16)}))
    deeper = BaseFingerprint.of(tiny_llama(seed=0, layers=3))
    with pytest.raises(BaseModelMismatchError):
        BaseFingerprint(dict(deeper.shapes), {}, "meta").check(adapter_for(fp, {Q0: (32, 32)}))


def test_adapter_without_fingerprint_checks_names_and_shapes_only(tiny_llama, fp):
    other = BaseFingerprint.of(tiny_llama(seed=3))
    with pytest.raises(BaseModelMismatchError):  # with seed 0's fingerprint, the values are compared and differ
        other.check(adapter_for(fp, {Q0: (32, 32)}))
    other.check(adapter_for(None, {Q0: (32, 32)}))  # without one, there are no values to compare
    with pytest.raises(ShapeMismatchError, match=r"q_proj.*\[32, 16\].*\[32, 32\]"):
        other.check(adapter_for(None, {Q0: (32, 16)}))
    with pytest.raises(UnknownLayerError, match=r"model\.layers\.9\.mlp\.up_proj\.weight"):
        other.check(adapter_for(None, {"model.layers.9.mlp.up_proj.weight": (64, 32)}))
