"""`shira inspect` and `shira compare` on small adapters saved in the native format."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from shira_cli.main import app
from shira_core.delta import SparseAdapter, SparseDelta
from shira_core.io import adapter_to_bytes, save_adapter

UP = "model.layers.0.mlp.up_proj.weight"
Q = "model.layers.0.self_attn.q_proj.weight"
K = "model.layers.0.self_attn.k_proj.weight"

runner = CliRunner()


def delta(name: str, dense: torch.Tensor) -> SparseDelta:
    return SparseDelta.from_dense(name, dense)


def adapter_a() -> SparseAdapter:
    up = torch.zeros(8, 4)
    up[0, 0], up[1, 1], up[2, 2], up[3, 3] = 1.0, 2.0, 3.0, 4.0  # rank 4 of 4
    up[7, 0] = 5.0
    q = torch.zeros(4, 4)
    q[0] = torch.tensor([1.0, 1.0, 1.0, 1.0])  # rank 1 of 4
    return SparseAdapter(
        "alpha",
        {UP: delta(UP, up), Q: delta(Q, q)},
        mask="struct",
        base_fingerprint={"id": "feedc0ffee123456", "structure": "s", "dtype": "float32", "probes": {}},
        description="first test adapter",
    )


def adapter_b() -> SparseAdapter:
    up = torch.zeros(8, 4)
    up[0, 1] = 2.0  # shares row 0 with A's (0, 0): product entry (0, 1) = 1 * 2
    up[3, 3] = -1.0  # same index as A's (3, 3): product entry (3, 3) = 4 * -1
    up[5, 2] = 9.0  # row 5 holds nothing in A
    k = torch.ones(2, 4)
    return SparseAdapter("beta", {UP: delta(UP, up), K: delta(K, k)}, mask="rand")


@pytest.fixture()
def files(tmp_path: Path) -> tuple[Path, Path]:
    return save_adapter(adapter_a(), tmp_path / "a.safetensors"), save_adapter(adapter_b(), tmp_path / "b.safetensors")


def table_row(output: str, first: str) -> list[str]:
    rows = [line.split() for line in output.splitlines() if line.split()[:1] == [first]]
    assert len(rows) == 1, output
    return rows[0]


def test_inspect_table(files: tuple[Path, Path]) -> None:
    result = runner.invoke(app, ["inspect", str(files[0])])
    assert result.exit_code == 0, result.output
    out = result.stdout
    assert "adapter:     alpha" in out
    assert "mask:        struct" in out
    assert "base:        feedc0ffee123456" in out
    assert "description: first test adapter" in out
    header = table_row(out, "layer")
    assert header == ["layer", "shape", "nnz", "density", "%", "rank", "rank", "%"]
    assert table_row(out, UP) == [UP, "8x4", "5", "15.625", "4/4", "100.0"]
    assert table_row(out, Q) == [Q, "4x4", "4", "25.000", "1/4", "25.0"]
    # 9 of 48 weights; bytes: int16 indices + fp32 values = 6 per entry; mean of 100 % and 25 %
    assert "total: 2 layers, 9 of 48 weights changed (18.750 %), 54 bytes, mean rank 62.5 % of full" in out
    # columns line up: all but the first are right-aligned, so header, rule and rows end at one offset
    lines = [line for line in out.splitlines() if line.startswith(("layer", "---", UP, Q))]
    assert len(lines) == 4 and len({len(line) for line in lines}) == 1
    assert lines[2].index(" 8x4") + 4 == lines[0].index("shape") + 5


def test_inspect_without_rank(files: tuple[Path, Path]) -> None:
    result = runner.invoke(app, ["inspect", "--no-rank", str(files[0])])
    assert result.exit_code == 0, result.output
    assert table_row(result.stdout, UP) == [UP, "8x4", "5", "15.625", "-", "-"]
    assert "mean rank" not in result.stdout


def test_inspect_json(files: tuple[Path, Path]) -> None:
    result = runner.invoke(app, ["inspect", "--json", str(files[0])])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert set(data) == {"adapter", "layers", "totals"}
    assert data["adapter"]["name"] == "alpha"
    assert data["adapter"]["mask"] == "struct"
    assert data["adapter"]["base_fingerprint_id"] == "feedc0ffee123456"
    assert data["adapter"]["description"] == "first test adapter"
    by_name = {row["name"]: row for row in data["layers"]}
    assert by_name[UP]["shape"] == [8, 4] and by_name[UP]["nnz"] == 5 and by_name[UP]["rank"] == 4
    assert by_name[Q]["rank"] == 1 and by_name[Q]["full_rank"] == 4
    assert by_name[Q]["rank_fraction"] == pytest.approx(0.25)
    assert data["totals"]["nnz"] == 9 and data["totals"]["layers"] == 2
    assert data["totals"]["density"] == pytest.approx(9 / 48)


def test_compare_table(files: tuple[Path, Path]) -> None:
    result = runner.invoke(app, ["compare", str(files[0]), str(files[1])])
    assert result.exit_code == 0, result.output
    out = result.stdout
    assert out.splitlines()[0] == f"A: alpha ({files[0]})"
    # A1ᵀA2 has entries (0, 1) = 2 and (3, 3) = -4 among 16: AWOM sqrt(20), AWOR 14/16; one shared index
    name, shape, awom, awor, overlap, pct_a, pct_b = table_row(out, UP)
    assert (name, shape) == (UP, "8x4")
    assert float(awom) == pytest.approx(20**0.5, rel=1e-5)
    assert float(awor) == pytest.approx(0.875)
    assert (overlap, pct_a, pct_b) == ("1", "20.00", "33.33")
    assert f"only in A (1): {Q}" in out
    assert f"only in B (1): {K}" in out
    assert "common layers: 1" in out
    assert "AWOM mean over layers: 4.47214   total sqrt(sum AWOM^2): 4.47214" in out
    assert "AWOR mean over layers: 0.875000   pooled over all entries: 0.875000" in out
    assert "index overlap: 1 (20.00 % of A's, 33.33 % of B's" in out


def test_compare_json(files: tuple[Path, Path]) -> None:
    result = runner.invoke(app, ["compare", "--json", str(files[0]), str(files[1])])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert {"a", "b", "layers", "only_in_a", "only_in_b", "aggregate", "a_meta", "b_meta"} <= set(data)
    assert (data["a"], data["b"]) == ("alpha", "beta")
    (row,) = data["layers"]
    assert row["name"] == UP
    assert row["awom"] == pytest.approx(20**0.5)
    assert row["awor"] == pytest.approx(0.875)
    assert row["product_nnz"] == 2 and row["product_numel"] == 16
    assert row["overlap"] == 1 and row["nnz_a"] == 5 and row["nnz_b"] == 3
    assert data["only_in_a"] == [Q] and data["only_in_b"] == [K]
    agg = data["aggregate"]
    assert agg["awom_total"] == pytest.approx(20**0.5) and agg["awor_mean"] == pytest.approx(0.875)
    assert data["a_meta"]["base_fingerprint_id"] == "feedc0ffee123456"
    assert data["b_meta"]["base_fingerprint_id"] is None


def test_compare_with_itself_is_fully_overlapping(files: tuple[Path, Path]) -> None:
    result = runner.invoke(app, ["compare", "--json", str(files[0]), str(files[0])])
    assert result.exit_code == 0, result.output
    agg = json.loads(result.stdout)["aggregate"]
    assert agg["common_layers"] == 2
    assert agg["overlap"] == 9 and agg["overlap_fraction_a"] == 1.0


def test_missing_file_exits_2(tmp_path: Path, files: tuple[Path, Path]) -> None:
    missing = tmp_path / "nope.safetensors"
    for args in (["inspect", str(missing)], ["compare", str(files[0]), str(missing)]):
        result = runner.invoke(app, args)
        assert result.exit_code == 2
        assert f"error: adapter not found: {missing} does not exist" in result.stderr
        assert result.stdout == ""


@pytest.mark.parametrize(
    "content",
    [
        b"this is not a safetensors file at all",
        adapter_to_bytes(adapter_a())[:-7],  # truncated: header promises more tensor data
        b"\x00\x01",
    ],
    ids=["garbage", "truncated", "tiny"],
)
def test_corrupt_file_exits_2(tmp_path: Path, content: bytes) -> None:
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(content)
    result = runner.invoke(app, ["inspect", str(bad)])
    assert result.exit_code == 2
    assert result.stderr.startswith("error: ")
    assert "safetensors" in result.stderr
    assert "Traceback" not in result.output


def test_foreign_safetensors_file_exits_2(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    other = tmp_path / "model.safetensors"
    save_file({"w": torch.zeros(2)}, str(other))
    result = runner.invoke(app, ["inspect", str(other)])
    assert result.exit_code == 2
    assert "not a native shira adapter" in result.stderr


def test_compare_shape_mismatch_exits_2(tmp_path: Path, files: tuple[Path, Path]) -> None:
    wrong = SparseAdapter("wide", {UP: delta(UP, torch.ones(4, 8))})
    other = save_adapter(wrong, tmp_path / "wide.safetensors")
    result = runner.invoke(app, ["compare", str(files[0]), str(other)])
    assert result.exit_code == 2
    assert f"layer {UP} has shape [8, 4] in adapter 'alpha' but [4, 8] in adapter 'wide'" in result.stderr


def test_directory_without_adapter_exits_2(tmp_path: Path) -> None:
    empty = tmp_path / "empty_dir"
    empty.mkdir()
    result = runner.invoke(app, ["inspect", str(empty)])
    assert result.exit_code == 2
    assert str(empty) in result.stderr
