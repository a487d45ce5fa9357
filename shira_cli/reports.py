"""Text and JSON reports behind `shira inspect` and `shira compare`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from shira_core.analysis import adapter_stats, awom_awor, stats_totals
from shira_core.delta import SparseAdapter
from shira_core.errors import AdapterFormatError, ShiraError
from shira_core.fingerprint import BaseFingerprint
from shira_core.io import load_adapter


def load_any(path: Path, base: BaseFingerprint | None = None) -> SparseAdapter:
    """Loads a native .safetensors adapter file, or a PEFT SHiRA adapter directory.

    Args:
        path: the file or directory.
        base: for a PEFT directory, the base model to take weight shapes from. Directories PEFT wrote
            record no shapes, so with None the default base model is loaded for them (15-40 s);
            directories shira exported, and native files, carry their own shapes.

    Raises:
        FileNotFoundError: nothing at `path`.
        AdapterFormatError: the file is not a valid adapter, or PEFT support is unavailable.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"adapter not found: {path} does not exist")
    if not path.is_dir():
        try:
            return load_adapter(path)
        except ShiraError as e:
            raise type(e)(f"{path}: {e}") from e  # the core's message names the layer, not the file
    try:
        from shira_core.peft_interop import WEIGHTS_FILE, load_peft_adapter, peft_records_shapes
    except ImportError as e:
        raise AdapterFormatError(
            f"{path} is a directory, read as a PEFT SHiRA adapter, but PEFT support "
            f"(shira_core.peft_interop) cannot be imported: {e}. Pass a native .safetensors file instead."
        ) from e
    weights = path / WEIGHTS_FILE
    # files PEFT itself wrote carry no weight shapes; those exported by shira do
    if base is None and weights.is_file() and not peft_records_shapes(weights.read_bytes()):
        from shira_core.models import load_base

        model, _, _ = load_base()
        base = BaseFingerprint.of(model)
    return load_peft_adapter(path, base=base)


def _table(headers: list[str], rows: list[list[str]], left: int = 1) -> list[str]:
    """Aligned plain-text table: the first `left` columns left-aligned, the rest right-aligned."""
    widths = [max(len(str(cell)) for cell in column) for column in zip(headers, *rows, strict=True)]

    def line(cells: list[str]) -> str:
        parts = [c.ljust(w) if i < left else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths, strict=True))]
        return "  ".join(parts).rstrip()

    return [line(headers), line(["-" * w for w in widths]), *(line(r) for r in rows)]


def _shape(shape: list[int]) -> str:
    return "x".join(str(s) for s in shape)


def _base_id(adapter: SparseAdapter) -> str | None:
    fingerprint = adapter.base_fingerprint or {}
    return str(fingerprint["id"]) if fingerprint.get("id") else None


def _metadata(adapter: SparseAdapter, path: Path) -> dict[str, Any]:
    return {
        "path": str(path),
        "name": adapter.name,
        "mask": adapter.mask,
        "base_fingerprint_id": _base_id(adapter),
        "description": adapter.description,
        "extra": adapter.extra,
    }


def inspect_report(path: Path, rank: bool = True, as_json: bool = False) -> str:
    """Per-layer shape, nnz, density and numerical rank of one adapter, with totals and metadata.

    Args:
        path: native adapter file or PEFT directory (see load_any).
        rank: compute each layer's numerical rank (one SVD per layer).
        as_json: return JSON {"adapter": metadata, "layers": [...], "totals": {...}} instead of a table.
    """
    path = Path(path)
    adapter = load_any(path)
    rows = adapter_stats(adapter, rank=rank)
    totals = stats_totals(rows)
    meta = _metadata(adapter, path)
    if as_json:
        return json.dumps({"adapter": meta, "layers": rows, "totals": totals}, indent=2)
    lines = [
        f"adapter:     {adapter.name}",
        f"file:        {path}",
        f"mask:        {adapter.mask}",
        f"base:        {meta['base_fingerprint_id'] or 'unknown'}",
        f"description: {adapter.description or '-'}",
        "",
    ]
    body = []
    for r in rows:
        ranked = r["rank"] is not None
        body.append(
            [
                r["name"],
                _shape(r["shape"]),
                f"{r['nnz']:,}",
                f"{100 * r['density']:.3f}",
                f"{r['rank']}/{r['full_rank']}" if ranked else "-",
                f"{100 * r['rank_fraction']:.1f}" if ranked else "-",
            ]
        )
    lines += _table(["layer", "shape", "nnz", "density %", "rank", "rank %"], body)
    mean_rank = totals["rank_fraction_mean"]
    lines += [
        "",
        f"total: {totals['layers']} layers, {totals['nnz']:,} of {totals['numel']:,} weights changed "
        f"({100 * totals['density']:.3f} %), {totals['bytes']:,} bytes"
        + (f", mean rank {100 * mean_rank:.1f} % of full" if mean_rank is not None else ""),
    ]
    return "\n".join(lines)


def compare_report(a: Path, b: Path, as_json: bool = False) -> str:
    """AWOM, AWOR and index overlap of two adapters, per common layer and aggregated.

    Args:
        a, b: native adapter files or PEFT directories (see load_any).
        as_json: return the awom_awor() dict plus {"a_meta", "b_meta"} as JSON instead of a table.
    """
    a, b = Path(a), Path(b)
    first, second = load_any(a), load_any(b)
    result = awom_awor(first, second)
    ids = _base_id(first), _base_id(second)
    note = None
    if ids[0] and ids[1] and ids[0] != ids[1]:
        note = f"note: the adapters were built on different base models ({ids[0]} vs {ids[1]})"
    if as_json:
        result = {**result, "a_meta": _metadata(first, a), "b_meta": _metadata(second, b), "note": note}
        return json.dumps(result, indent=2)
    lines = [f"A: {first.name} ({a})", f"B: {second.name} ({b})"]
    if note:
        lines.append(note)
    lines.append("")
    body = [
        [
            r["name"],
            _shape(r["shape"]),
            f"{r['awom']:.6g}",
            f"{r['awor']:.6f}",
            f"{r['overlap']:,}",
            f"{100 * r['overlap_fraction_a']:.2f}",
            f"{100 * r['overlap_fraction_b']:.2f}",
        ]
        for r in result["layers"]
    ]
    lines += _table(["layer", "shape", "AWOM", "AWOR", "overlap", "% of A", "% of B"], body)
    for label, names in (("A", result["only_in_a"]), ("B", result["only_in_b"])):
        if names:
            lines.append(f"only in {label} ({len(names)}): {', '.join(names)}")
    agg = result["aggregate"]
    lines.append("")
    if not agg["common_layers"]:
        lines.append("no common layers: AWOM and AWOR are undefined")
        return "\n".join(lines)
    lines += [
        f"common layers: {agg['common_layers']}",
        f"AWOM mean over layers: {agg['awom_mean']:.6g}   total sqrt(sum AWOM^2): {agg['awom_total']:.6g}",
        f"AWOR mean over layers: {agg['awor_mean']:.6f}   pooled over all entries: {agg['awor_pooled']:.6f}",
        f"index overlap: {agg['overlap']:,} ({100 * agg['overlap_fraction_a']:.2f} % of A's, "
        f"{100 * agg['overlap_fraction_b']:.2f} % of B's changed weights in common layers)",
    ]
    return "\n".join(lines)
