"""`shira train` and `shira demo-data`: train one SHiRA adapter from JSONL, write the bundled demo tasks."""

from __future__ import annotations

import json
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from shira_core.training.data import TrainingDataError


def _read_examples(path: Path, what: str) -> list[Any]:
    from shira_core.training import parse_jsonl

    if not path.is_file():
        raise TrainingDataError(f"{what} file {path} does not exist")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise TrainingDataError(f"{what} file {path} is not UTF-8 text: {e}") from e
    return parse_jsonl(text, path.name)


def run_train(
    *,
    base: str | None,
    data: Path,
    eval_path: Path | None,
    out: Path,
    export_peft: Path | None,
    config: Any,
    device: str = "auto",
    dtype: str = "auto",
    name: str | None = None,
    description: str = "",
    progress: bool = True,
    as_json: bool = False,
) -> dict[str, Any]:
    """Loads data and base, trains, saves the native adapter (and a PEFT copy); returns a summary dict.

    Data errors are raised before the base model is loaded, so a typo costs no loading time.
    """
    import torch

    from shira_core.io import save_adapter
    from shira_core.models import load_base
    from shira_core.training import train_adapter

    config.validate()
    train = _read_examples(data, "training data")
    held = _read_examples(eval_path, "eval data") if eval_path else None
    if out.suffix != ".safetensors":
        raise TrainingDataError(f"--out must name a .safetensors file, got {out}")
    log = (lambda line: print(line, file=sys.stderr)) if as_json else print
    t0 = time.perf_counter()
    model, tokenizer, source = load_base(base, device=device, dtype=dtype, cache_dir=_converted_models_dir())
    load_s = time.perf_counter() - t0
    log(f"base {source.label} on {next(model.parameters()).device} ({load_s:.1f} s); "
        f"{len(train)} train, {len(held or [])} eval examples; {config.method} training, {config.mask} mask "
        f"at density {config.density:g}")
    torch.set_grad_enabled(True)
    result = train_adapter(model, tokenizer, train, held, config, name=name or out.stem,
                           description=description or f"trained on {data.name}", progress=progress, log=log)
    out.parent.mkdir(parents=True, exist_ok=True)
    save_adapter(result.adapter, out)
    summary: dict[str, Any] = {
        "adapter": str(out),
        "name": result.adapter.name,
        "nnz": result.adapter.nnz,
        "density": result.adapter.density,
        "layers": len(result.adapter),
        "steps": result.steps,
        "train_seconds": round(result.seconds, 2),
        "config": asdict(config),
        "epochs": [
            {
                "epoch": s.epoch,
                "train_loss": s.train_loss,
                "tokens_per_s": round(s.tokens_per_s, 1),
                "eval_loss": s.eval.loss if s.eval else None,
                "eval_accuracy": s.eval.accuracy if s.eval else None,
                "samples": s.eval.samples if s.eval else [],
            }
            for s in result.history
        ],
    }
    if export_peft is not None:
        from shira_core.peft_export import save_peft_adapter

        save_peft_adapter(result.adapter, export_peft, base_model_name_or_path=source.label)
        summary["peft_dir"] = str(export_peft)
    log(f"saved {out} ({result.adapter.nnz:,} values in {len(result.adapter)} layers)"
        + (f" and PEFT copy in {export_peft}" if export_peft else ""))
    return summary


def write_demo_data(task: str, out: Path, seed: int = 0, n_train: int | None = None,
                    n_eval: int | None = None) -> list[Path]:
    """Writes train.jsonl and eval.jsonl of one task into `out` (for task "all", one folder per task)."""
    from shira_core.demo_data import TASKS, generate
    from shira_core.training.data import examples_to_jsonl

    tasks = list(TASKS) if task == "all" else [task]
    written = []
    for name in tasks:
        train, held = generate(name, seed=seed, n_train=n_train, n_eval=n_eval)
        folder = out / name if task == "all" else out
        folder.mkdir(parents=True, exist_ok=True)
        for file, records in (("train.jsonl", train), ("eval.jsonl", held)):
            (folder / file).write_text(examples_to_jsonl(records), encoding="utf-8")
            written.append(folder / file)
    return written


def print_summary(summary: dict[str, Any], as_json: bool) -> None:
    if as_json:
        print(json.dumps(summary, indent=2))


def _converted_models_dir() -> Path | None:
    """The server's converted-model cache (SHIRA_DATA_DIR, SHIRA_MODEL_CACHE*), so a GGUF base converts once for
    both `train` and `serve`; None when those settings are invalid or the cache is off."""
    from pydantic import ValidationError

    from service.config import Settings

    try:
        return Settings(admin_token=None).converted_models_dir()
    except ValidationError:
        return None
