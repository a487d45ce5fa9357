"""`shira convert`: native .safetensors <-> PEFT SHiRA directory, checked against a base model when given."""

from __future__ import annotations

from pathlib import Path

from shira_core.delta import SparseAdapter
from shira_core.errors import AdapterFormatError, ShiraError
from shira_core.fingerprint import BaseFingerprint, unique_parameters
from shira_core.io import load_adapter, save_adapter
from shira_core.peft_export import peft_rank, save_peft_adapter
from shira_core.peft_interop import CONFIG_FILE, WEIGHTS_FILE, load_peft_adapter, peft_records_shapes

FORMATS = ("native", "peft")


def _peft_directory(source: Path) -> Path | None:
    """The PEFT adapter directory `source` points at (the folder or one of its two files), else None."""
    if source.is_dir():
        if not (source / CONFIG_FILE).is_file():
            raise AdapterFormatError(
                f"{source} is a directory without {CONFIG_FILE}; give a PEFT SHiRA adapter directory "
                "or a native .safetensors file"
            )
        return source
    if source.name in (CONFIG_FILE, WEIGHTS_FILE) and (source.parent / CONFIG_FILE).is_file():
        return source.parent
    return None


def _load_model(spec: str | None, meta: bool):
    """The base model, on CPU in fp32; with meta=True only its structure (no weights read: shapes only)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from shira_core.models import resolve

    source = resolve(spec)
    kwargs = {"gguf_file": source.gguf_file} if source.gguf_file else {}
    if not meta:
        return AutoModelForCausalLM.from_pretrained(source.location, dtype=torch.float32, **kwargs)
    config = AutoConfig.from_pretrained(source.location, **kwargs)
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


def base_shapes(spec: str | None) -> BaseFingerprint:
    """A shapes-only fingerprint (no value probes) built from the model's config, without loading its weights."""
    model = _load_model(spec, meta=True)
    shapes = {name: tuple(p.shape) for name, p in unique_parameters(model).items()}
    return BaseFingerprint(shapes, {}, "meta")


def base_fingerprint(spec: str) -> BaseFingerprint:
    """The full fingerprint (shapes and value probes) of a base model spec, as models.resolve understands it."""
    return BaseFingerprint.of(_load_model(spec, meta=False))


def _read(source: Path, name: str | None, fingerprint: BaseFingerprint | None) -> tuple[str, SparseAdapter]:
    peft_dir = _peft_directory(source)
    if peft_dir is None:
        return "native", load_adapter(source, base=fingerprint, name=name)
    if fingerprint is not None or peft_records_shapes((peft_dir / WEIGHTS_FILE).read_bytes()):
        return "peft", load_peft_adapter(peft_dir, base=fingerprint, name=name)
    try:  # PEFT files do not record shapes: take them from the default base model
        return "peft", load_peft_adapter(peft_dir, base=base_shapes(None), name=name)
    except ShiraError as e:
        hint = "weight shapes came from the default base model; pass --base for the model it was made for"
        raise type(e)(f"{e} ({hint})") from e


def convert_adapter(
    source: Path, dest: Path, to: str = "native", name: str | None = None, base: str | None = None
) -> str:
    """Reads a native or PEFT SHiRA adapter, validates it, and writes it in the `to` format.

    Args:
        source: a native .safetensors file, or a PEFT SHiRA adapter directory (or a file inside it).
        dest: a .safetensors file for --to native, a directory for --to peft.
        to: "native" or "peft".
        name: adapter name to record (default: the stored name, or the PEFT directory's name).
        base: base model spec (see shira_core.models.resolve). When given, the adapter must fit it, and its
            fingerprint is recorded if the adapter has none. PEFT files written by PEFT record no shapes, so
            without it they are read against the default base model's shapes.

    Returns:
        A one-line summary.
    """
    if to not in FORMATS:
        raise ValueError(f"to must be one of {', '.join(FORMATS)}, not {to!r}")
    source, dest = Path(source), Path(dest)
    if not source.exists():
        raise FileNotFoundError(f"{source} does not exist")
    if to == "native" and dest.is_dir():
        raise ValueError(f"{dest} is a directory; --to native writes one file, e.g. {dest / 'adapter.safetensors'}")
    if to == "peft" and dest.is_file():
        raise ValueError(f"{dest} is a file; --to peft writes a directory ({CONFIG_FILE} and {WEIGHTS_FILE})")
    fingerprint = base_fingerprint(base) if base else None
    kind, adapter = _read(source, name, fingerprint)
    if fingerprint is not None and adapter.base_fingerprint is None:
        adapter.base_fingerprint = fingerprint.to_dict(adapter.deltas)

    summary = (
        f"{kind} {source} -> {to} {dest}: adapter {adapter.name!r}, {len(adapter)} layers, "
        f"{adapter.nnz:,} entries (density {adapter.density:.3%})"
    )
    if to == "native":
        dest.parent.mkdir(parents=True, exist_ok=True)
        save_adapter(adapter, dest)
    else:
        origin = base or adapter.extra.get("peft_base_model_name_or_path")
        save_peft_adapter(adapter, dest, base_model_name_or_path=origin)
        r = peft_rank(adapter)
        padding = sum(r * sum(d.shape) - d.nnz for d in adapter)
        summary += f", PEFT r={r}"
        if padding:
            summary += f" ({padding:,} zero entries pad every layer to r*(in+out))"
    if fingerprint is not None:
        summary += f", checked against base {fingerprint.id}"
    return summary
