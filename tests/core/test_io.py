"""Native format: lossless round trips, narrow index dtypes, and one clear error per kind of bad file."""

from __future__ import annotations

import json
import pickle
import struct

import pytest
import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from shira_core import (
    AdapterFormatError,
    BaseFingerprint,
    BaseModelMismatchError,
    IndexOrderError,
    IndexRangeError,
    LengthMismatchError,
    NonFiniteValueError,
    ShapeMismatchError,
    ShiraError,
    SparseAdapter,
    SparseDelta,
    UnknownLayerError,
    adapter_from_bytes,
    adapter_to_bytes,
    load_adapter,
    save_adapter,
)

Q0 = "model.layers.0.self_attn.q_proj.weight"
UP1 = "model.layers.1.mlp.up_proj.weight"


def small_adapter(base: BaseFingerprint | None = None) -> SparseAdapter:
    """Two layers with hand-picked entries; values in two dtypes."""
    q = SparseDelta(Q0, (32, 32), torch.tensor([0, 3, 77, 1023]), torch.tensor([0.5, -1.25, 2.0, 1e-3]))
    up = SparseDelta(UP1, (64, 32), torch.tensor([5, 6, 2047]), torch.tensor([1.0, -2.0, 3.5], dtype=torch.bfloat16))
    fp = base.to_dict([Q0, UP1]) if base is not None else None
    return SparseAdapter("tone", {Q0: q, UP1: up}, "wm", fp, "hand built", {"task": "tone", "rank": "high"})


def rewrite(
    data: bytes, drop: tuple[str, ...] = (), meta: dict[str, str | None] | None = None, **tensors: torch.Tensor
) -> bytes:
    """Re-saves native bytes with some tensors replaced, added or dropped and metadata keys changed.

    Keyword names use '__' for '.', e.g. ``model__x__values=...``; meta values of None remove the key.
    """
    loaded = st_load(data)
    for name in drop:
        del loaded[name]
    loaded.update({k.replace("__", "."): v for k, v in tensors.items()})
    header_len = struct.unpack("<Q", data[:8])[0]
    metadata = json.loads(data[8 : 8 + header_len])["__metadata__"]
    for k, v in (meta or {}).items():
        if v is None:
            metadata.pop(k, None)
        else:
            metadata[k] = v
    return st_save(loaded, metadata=metadata)


def with_layer(data: bytes, layer: str, indices: torch.Tensor, values: torch.Tensor) -> bytes:
    loaded = st_load(data)
    loaded[layer + ".indices"] = indices
    loaded[layer + ".values"] = values
    header_len = struct.unpack("<Q", data[:8])[0]
    return st_save(loaded, metadata=json.loads(data[8 : 8 + header_len])["__metadata__"])


def raw_header(header: object) -> bytes:
    text = json.dumps(header).encode()
    return struct.pack("<Q", len(text)) + text


def assert_same_adapter(got: SparseAdapter, want: SparseAdapter) -> None:
    assert (got.name, got.mask, got.description, got.extra) == (want.name, want.mask, want.description, want.extra)
    assert got.base_fingerprint == want.base_fingerprint
    assert list(got.deltas) == list(want.deltas)
    for name, d in want.deltas.items():
        g = got.deltas[name]
        assert (g.name, g.shape) == (d.name, d.shape)
        assert g.indices.dtype == d.indices.dtype and torch.equal(g.indices, d.indices)
        assert g.values.dtype == d.values.dtype and torch.equal(g.values, d.values)


@pytest.fixture(scope="module")
def base_model(tiny_llama):
    return tiny_llama(seed=0)


@pytest.fixture(scope="module")
def base(base_model) -> BaseFingerprint:
    return BaseFingerprint.of(base_model)


def test_round_trip_bytes_and_file(tmp_path, base):
    adapter = small_adapter(base)
    data = adapter_to_bytes(adapter)
    assert_same_adapter(adapter_from_bytes(data, base=base), adapter)
    path = save_adapter(adapter, tmp_path / "tone.safetensors")
    assert path.read_bytes() == data
    assert not list(tmp_path.glob("*.tmp"))
    assert_same_adapter(load_adapter(path, base=base), adapter)
    assert load_adapter(path, name="renamed").name == "renamed"


def test_equal_adapters_give_equal_bytes():
    """safetensors orders metadata at random; the writer sorts it, so the same adapter always has one encoding."""
    assert len({adapter_to_bytes(small_adapter()) for _ in range(12)}) == 1


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_values_keep_their_dtype(dtype):
    d = SparseDelta(Q0, (32, 32), torch.tensor([1, 2]), torch.tensor([0.1, -0.2]).to(dtype))
    back = adapter_from_bytes(adapter_to_bytes(SparseAdapter("x", {Q0: d})))
    assert back.deltas[Q0].values.dtype == dtype
    assert torch.equal(back.deltas[Q0].values, d.values)


@pytest.mark.parametrize(
    ("shape", "index_dtype"),
    [((64, 32), torch.int16), ((128, 256), torch.int16), ((256, 256), torch.int32), ((1, 2**15 + 1), torch.int32)],
)
def test_indices_stored_in_smallest_dtype(shape, index_dtype):
    numel = shape[0] * shape[1]
    d = SparseDelta("w", shape, torch.tensor([0, 1, numel - 1], dtype=torch.int64), torch.ones(3))
    assert d.indices.dtype == index_dtype
    data = adapter_to_bytes(SparseAdapter("x", {"w": d}))
    assert st_load(data)["w.indices"].dtype == index_dtype  # on disk, not just in memory
    back = adapter_from_bytes(data).deltas["w"]
    assert back.indices.dtype == index_dtype
    assert back.indices.tolist() == [0, 1, numel - 1]


def test_wide_index_dtype_in_file_is_narrowed_on_load():
    good = adapter_to_bytes(small_adapter())
    data = with_layer(good, Q0, torch.tensor([1, 9, 1000], dtype=torch.int64), torch.ones(3))
    assert adapter_from_bytes(data).deltas[Q0].indices.dtype == torch.int16


# Each case: a function of the good bytes, the error class, a regex the message must match.
CORRUPTIONS = [
    ("truncated tail", lambda d: d[:-7], AdapterFormatError, r"corrupt"),
    ("truncated header", lambda d: d[:40], AdapterFormatError, r"header claims [\d,]+ bytes but the file has 40"),
    ("shorter than 8 bytes", lambda d: d[:5], AdapterFormatError, r"5 bytes is shorter than the 8-byte header"),
    ("empty", lambda d: b"", AdapterFormatError, r"0 bytes"),
    ("garbage", lambda d: bytes(range(256)) * 4, AdapterFormatError, r"not a safetensors file"),
    ("header not JSON", lambda d: struct.pack("<Q", 12) + b"{not json!!}", AdapterFormatError, r"not JSON"),
    ("header a list", lambda d: raw_header([1, 2]), AdapterFormatError, r"not a JSON object"),
    ("metadata a list", lambda d: raw_header({"__metadata__": [1]}), AdapterFormatError, r"__metadata__"),
    ("missing format", lambda d: rewrite(d, meta={"format": None}), AdapterFormatError, r"is None.*shira-sparse"),
    ("other format", lambda d: rewrite(d, meta={"format": "pt"}), AdapterFormatError, r"'pt', expected 'shira-sparse'"),
    ("format_version", lambda d: rewrite(d, meta={"format_version": "2"}), AdapterFormatError, r"'2', expected '1'"),
    ("no shira header", lambda d: rewrite(d, meta={"shira": None}), AdapterFormatError, r"'shira'"),
    ("shira not JSON", lambda d: rewrite(d, meta={"shira": "{oops"}), AdapterFormatError, r"'shira'"),
    ("shapes missing", lambda d: rewrite(d, meta={"shira": "{}"}), AdapterFormatError, r"'shira'.*shapes"),
    (
        "extra not an object",
        lambda d: rewrite(d, meta={"shira": json.dumps({"shapes": {}, "extra": [1]})}),
        AdapterFormatError,
        r"'shira'",
    ),
    (
        "fingerprint not an object",
        lambda d: rewrite(d, meta={"shira": json.dumps({"shapes": {}, "base_fingerprint": "abc"})}),
        AdapterFormatError,
        r"base_fingerprint",
    ),
    (
        "missing tensor",
        lambda d: rewrite(d, drop=(UP1 + ".values",)),
        AdapterFormatError,
        r"missing \['model\.layers\.1\.mlp\.up_proj\.weight\.values'\]",
    ),
    (
        "extra tensor",
        lambda d: rewrite(d, stray__values=torch.ones(2)),
        AdapterFormatError,
        r"unexpected \['stray\.values'\]",
    ),
    (
        "length mismatch",
        lambda d: with_layer(d, Q0, torch.tensor([1, 2, 3, 4, 5]), torch.ones(4)),
        LengthMismatchError,
        r"5 vs 4 for layer model\.layers\.0\.self_attn\.q_proj\.weight of adapter 'tone'",
    ),
    (
        "unsorted",
        lambda d: with_layer(d, Q0, torch.tensor([1, 9, 4]), torch.ones(3)),
        IndexOrderError,
        r"position 2 holds 4 after 9 for layer .*q_proj",
    ),
    (
        "duplicate",
        lambda d: with_layer(d, Q0, torch.tensor([1, 4, 4]), torch.ones(3)),
        IndexOrderError,
        r"position 2 holds 4 after 4 for layer .*q_proj",
    ),
    (
        "negative",
        lambda d: with_layer(d, Q0, torch.tensor([-3, 4]), torch.ones(2)),
        IndexRangeError,
        r"\[-3, 4\] .*\[32, 32\] has 1,024 elements for layer .*q_proj",
    ),
    (
        "past the end",
        lambda d: with_layer(d, Q0, torch.tensor([4, 1024]), torch.ones(2)),
        IndexRangeError,
        r"\[4, 1,024\] .*has 1,024 elements .*q_proj",
    ),
    (
        "int64 index that int16 would wrap",  # 65,541 wraps to 5 in int16: must not be narrowed silently
        lambda d: with_layer(d, Q0, torch.tensor([4, 65541], dtype=torch.int64), torch.ones(2)),
        IndexRangeError,
        r"\[4, 65,541\] .*q_proj",
    ),
    (
        "NaN value",
        lambda d: with_layer(d, Q0, torch.tensor([1, 2, 3]), torch.tensor([0.0, float("nan"), 1.0])),
        NonFiniteValueError,
        r"1 values are NaN or infinite for layer .*q_proj",
    ),
    (
        "inf values",
        lambda d: with_layer(d, UP1, torch.tensor([1, 2]), torch.tensor([float("inf"), -float("inf")]).half()),
        NonFiniteValueError,
        r"2 values .*up_proj",
    ),
    (
        "float indices",
        lambda d: with_layer(d, Q0, torch.tensor([1.0, 2.5]), torch.ones(2)),
        AdapterFormatError,
        r"indices of layer .*q_proj.* 1-D int tensor, got torch\.float32",
    ),
    (
        "2-D indices",
        lambda d: with_layer(d, Q0, torch.tensor([[1, 2]]), torch.ones(2)),
        AdapterFormatError,
        r"indices of layer .*q_proj.*\[1, 2\]",
    ),
    (
        "int values",
        lambda d: with_layer(d, Q0, torch.tensor([1, 2]), torch.tensor([1, 2])),
        AdapterFormatError,
        r"values of layer .*q_proj.*torch\.int64",
    ),
]


@pytest.mark.parametrize(("case", "corrupt", "error", "message"), CORRUPTIONS, ids=[c[0] for c in CORRUPTIONS])
def test_malformed_input_raises_its_own_error(case, corrupt, error, message):
    data = corrupt(adapter_to_bytes(small_adapter()))
    with pytest.raises(error, match=message) as info:
        adapter_from_bytes(data)
    assert type(info.value) is error  # the class itself, not a sibling that happens to match


def test_truncated_file_on_disk(tmp_path):
    path = tmp_path / "cut.safetensors"
    path.write_bytes(adapter_to_bytes(small_adapter())[:-100])
    with pytest.raises(AdapterFormatError):
        load_adapter(path)


class _Boom:
    """Unpickling this calls _explode; the test fails if that ever runs."""

    fired = False

    def __reduce__(self):
        return (_explode, ())


def _explode():
    _Boom.fired = True
    return "boom"


@pytest.mark.parametrize("payload", ["pickle", "torch.save"])
def test_pickles_are_format_errors_and_never_unpickled(tmp_path, payload):
    if payload == "pickle":
        data = pickle.dumps({"w.indices": _Boom()})
    else:
        path = tmp_path / "adapter.bin"
        torch.save({"w.indices": torch.tensor([1]), "boom": _Boom()}, path)
        data = path.read_bytes()
    _Boom.fired = False
    with pytest.raises(AdapterFormatError):
        adapter_from_bytes(data)
    assert not _Boom.fired
    assert pickle.loads(pickle.dumps(_Boom())) == "boom" and _Boom.fired  # the payload is live: it would fire


def test_unknown_layer_and_wrong_shape_against_base(base):
    data = adapter_to_bytes(small_adapter())
    ghost = with_layer(data, "model.layers.5.mlp.up_proj.weight", torch.tensor([1]), torch.ones(1))
    ghost = rewrite(ghost, meta={"shira": _shapes_header(data, {"model.layers.5.mlp.up_proj.weight": [64, 32]})})
    with pytest.raises(UnknownLayerError, match=r"'tone' targets model\.layers\.5\.mlp\.up_proj\.weight"):
        adapter_from_bytes(ghost, base=base)
    assert adapter_from_bytes(ghost).nnz == 8  # without a base model the file itself is fine
    wide = rewrite(data, meta={"shira": _shapes_header(data, {UP1: [32, 64]})})
    with pytest.raises(ShapeMismatchError, match=r"up_proj.*'tone'.*\[32, 64\].*\[64, 32\]"):
        adapter_from_bytes(wide, base=base)


def _shapes_header(data: bytes, shapes: dict[str, list[int]]) -> str:
    header_len = struct.unpack("<Q", data[:8])[0]
    info = json.loads(json.loads(data[8 : 8 + header_len])["__metadata__"]["shira"])
    info["shapes"].update(shapes)
    return json.dumps(info)


def test_base_model_fingerprint(tiny_llama, base_model, base):
    data = adapter_to_bytes(small_adapter(base))
    adapter_from_bytes(data, base=base)
    adapter_from_bytes(data, base=BaseFingerprint.of(tiny_llama(seed=0, dtype=torch.bfloat16)))
    adapter_from_bytes(data, base=BaseFingerprint.of(tiny_llama(seed=0, dtype=torch.float16)))
    other = BaseFingerprint.of(tiny_llama(seed=1))
    with pytest.raises(BaseModelMismatchError, match=r"'tone' was built for base \w+, not this one .*mean \|w\|"):
        adapter_from_bytes(data, base=other)
    deeper = BaseFingerprint.of(tiny_llama(seed=0, layers=3))
    with pytest.raises(BaseModelMismatchError, match="different architecture"):
        adapter_from_bytes(data, base=deeper)


def test_every_error_is_a_shira_error():
    for *_, error, _ in CORRUPTIONS:
        assert issubclass(error, ShiraError)
