"""The `shira` command. Each subcommand imports its module lazily so `shira --help` stays instant."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Annotated

import typer

from .bench import bench_app
from .failures import fail

app = typer.Typer(
    help="Sparse high-rank adapters: inspect, compare, convert, train, benchmark and serve.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
app.add_typer(bench_app, name="bench")


@app.command()
def serve(
    host: Annotated[str | None, typer.Option(help="Bind address (default from SHIRA_HOST or 127.0.0.1).")] = None,
    port: Annotated[int | None, typer.Option(help="Port (default from SHIRA_PORT or 8000).")] = None,
) -> None:
    """Start the adapter server (FastAPI + uvicorn) with the configured base model and registry."""
    from service.main import run

    run(host=host, port=port)


@app.command()
def inspect(
    adapter: Annotated[Path, typer.Argument(help="A native .safetensors adapter or a PEFT SHiRA directory.")],
    rank: Annotated[bool, typer.Option(help="Also compute each layer's numerical rank (slower).")] = True,
    json_out: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
) -> None:
    """Print a per-layer table: shape, nnz, density, numerical rank."""
    from shira_core.errors import ShiraError

    from .reports import inspect_report

    try:
        typer.echo(inspect_report(adapter, rank=rank, as_json=json_out))
    except (ShiraError, FileNotFoundError) as e:
        fail(str(e))


@app.command()
def compare(
    a: Annotated[Path, typer.Argument(help="First adapter.")],
    b: Annotated[Path, typer.Argument(help="Second adapter.")],
    json_out: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
) -> None:
    """Print AWOM, AWOR and index overlap between two adapters, per layer and overall."""
    from shira_core.errors import ShiraError

    from .reports import compare_report

    try:
        typer.echo(compare_report(a, b, as_json=json_out))
    except (ShiraError, FileNotFoundError) as e:
        fail(str(e))


@app.command()
def convert(
    source: Annotated[Path, typer.Argument(help="Native .safetensors file or PEFT SHiRA adapter directory.")],
    dest: Annotated[Path, typer.Argument(help="Output: a directory (--to peft) or a .safetensors file.")],
    to: Annotated[str, typer.Option(help="Target format: native or peft.")] = "native",
    name: Annotated[str | None, typer.Option(help="Adapter name to record.")] = None,
    base: Annotated[str | None, typer.Option(help="Base model to validate against and fingerprint (optional).")] = None,
) -> None:
    """Convert between the native format and PEFT's SHiRA format."""
    from shira_core.errors import ShiraError

    from .convert import convert_adapter

    if to not in ("native", "peft"):
        fail(f"--to must be native or peft, not {to!r}")
    try:
        typer.echo(convert_adapter(source, dest, to=to, name=name, base=base))
    except (ShiraError, FileNotFoundError, ValueError) as e:
        fail(str(e))


@app.command()
def train(
    data: Annotated[Path, typer.Option(help="Training JSONL: prompt/completion or chat messages per line.")],
    out: Annotated[Path, typer.Option(help="Where to write the native adapter (.safetensors).")],
    base: Annotated[str | None, typer.Option(help="Base model (default: bundled SmolLM2-135M-Instruct).")] = None,
    eval_data: Annotated[Path | None, typer.Option("--eval", help="Held-out JSONL, evaluated every epoch.")] = None,
    mask: Annotated[str, typer.Option(help="Mask: wm, snip, grad, rand or struct.")] = "wm",
    density: Annotated[float, typer.Option(help="Fraction of each linear weight to train.")] = 0.01,
    epochs: Annotated[int, typer.Option(help="Passes over the training data.")] = 1,
    lr: Annotated[float, typer.Option(help="AdamW learning rate (no weight decay).")] = 5e-4,
    batch_size: Annotated[int, typer.Option(help="Examples per step.")] = 8,
    max_len: Annotated[int, typer.Option(help="Max tokens per example (the prompt's start is cut first).")] = 256,
    method: Annotated[str, typer.Option(help="sparse (only nnz values trained) or gradmask (masked gradients).")]
    = "sparse",
    seed: Annotated[int, typer.Option(help="Seeds the mask, the data order and torch.")] = 0,
    calib_batches: Annotated[int, typer.Option(help="Calibration batches for the grad and snip masks.")] = 8,
    eval_limit: Annotated[int, typer.Option(help="Evaluate on at most this many examples (0: all).")] = 64,
    eval_before: Annotated[bool, typer.Option(help="Also evaluate the base model before training.")] = False,
    max_steps: Annotated[int | None, typer.Option(help="Stop after this many steps.")] = None,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda.")] = "auto",
    dtype: Annotated[str, typer.Option(help="auto, float32, bfloat16 or float16.")] = "auto",
    name: Annotated[str | None, typer.Option(help="Adapter name (default: the --out file name).")] = None,
    export_peft: Annotated[Path | None, typer.Option(help="Also write a PEFT SHiRA adapter directory here.")] = None,
    progress: Annotated[bool, typer.Option(help="Show the progress bar.")] = True,
    json_out: Annotated[bool, typer.Option("--json", help="Print a JSON summary (logs go to stderr).")] = False,
) -> None:
    """Train a SHiRA adapter on JSONL data, evaluating loss and exact-match accuracy per epoch."""
    from shira_core.errors import ShiraError
    from shira_core.training import TrainConfig

    from .train import print_summary, run_train

    config = TrainConfig(method=method, mask=mask, density=density, epochs=epochs, lr=lr, batch_size=batch_size,
                         max_len=max_len, seed=seed, calib_batches=calib_batches, eval_limit=eval_limit,
                         eval_before=eval_before, max_steps=max_steps)
    try:
        summary = run_train(base=base, data=data, eval_path=eval_data, out=out, export_peft=export_peft,
                            config=config, device=device, dtype=dtype, name=name, progress=progress,
                            as_json=json_out)
    except (ShiraError, FileNotFoundError, ValueError) as e:
        fail(str(e))
    print_summary(summary, json_out)


@app.command("demo-data")
def demo_data(
    out: Annotated[Path, typer.Option(help="Folder for train.jsonl and eval.jsonl (one subfolder per task for all).")],
    task: Annotated[str, typer.Option(help="kv2json, sentiment, capitals or all.")] = "all",
    seed: Annotated[int, typer.Option(help="Generator seed; the same seed writes the same files.")] = 0,
    n_train: Annotated[int | None, typer.Option("--train", help="Training examples (default per task).")] = None,
    n_eval: Annotated[int | None, typer.Option("--eval", help="Held-out examples (default per task).")] = None,
) -> None:
    """Write the bundled demo tasks (no downloads) as JSONL for `shira train`."""
    from shira_core.demo_data import TASKS

    from .train import write_demo_data

    if task != "all" and task not in TASKS:
        fail(f"unknown task {task!r}; use one of {', '.join(TASKS)} or all")
    try:
        for path in write_demo_data(task, out, seed=seed, n_train=n_train, n_eval=n_eval):
            typer.echo(path)
    except ValueError as e:
        fail(str(e))


@app.command()
def experiment(
    tasks: Annotated[str, typer.Option(help="Comma-separated demo tasks, two or more: kv2json, sentiment, capitals.")]
    = "sentiment,kv2json",
    steps: Annotated[int, typer.Option(help="Optimizer steps per adapter.")] = 16,
    eval_limit: Annotated[int, typer.Option(help="Held-out examples per task.")] = 24,
    seed: Annotated[int, typer.Option(help="Seeds the data, masks, LoRA init and batch order.")] = 0,
    out: Annotated[Path, typer.Option(help="Folder for experiment.json, .md and .png.")] = Path("docs"),
    lr: Annotated[float, typer.Option(help="AdamW learning rate for SHiRA (and LoRA unless --lora-lr).")] = 3e-3,
    lora_lr: Annotated[float | None, typer.Option(help="AdamW learning rate for LoRA.")] = None,
    batch_size: Annotated[int, typer.Option(help="Examples per step.")] = 4,
    max_len: Annotated[int, typer.Option(help="Max tokens per example.")] = 96,
    density: Annotated[float, typer.Option(help="SHiRA density; LoRA ranks match its count per layer.")] = 0.01,
    calib_batches: Annotated[int, typer.Option(help="Calibration batches for the SNIP mask.")] = 4,
    fusion_weight: Annotated[float, typer.Option(help="Weight of every adapter in the fused sum.")] = 1.0,
    n_train: Annotated[int | None, typer.Option(help="Training examples per task (default per task).")] = None,
    base: Annotated[str | None, typer.Option(help="Base model (default: bundled SmolLM2-135M-Instruct).")] = None,
    cache: Annotated[Path, typer.Option(help="Folder caching the trained adapters.")] = Path("data/experiment-cache"),
    reuse: Annotated[bool, typer.Option(help="Load adapters from --cache where present instead of training.")] = False,
    threads: Annotated[int | None, typer.Option(help="torch CPU threads (default: torch's).")] = None,
    progress: Annotated[bool, typer.Option(help="Show progress bars.")] = True,
) -> None:
    """Single-adapter, fusion (Table 4) and orthogonality results for SHiRA-WM/SNIP vs LoRA, on CPU, into --out."""
    from shira_core.errors import ShiraError

    from .experiment_config import ExperimentConfig
    from .experiment_report import run_experiment_command

    cfg = ExperimentConfig(tasks=tuple(t.strip() for t in tasks.split(",") if t.strip()), steps=steps,
                           batch_size=batch_size, lr=lr, lora_lr=lora_lr, density=density, max_len=max_len,
                           eval_limit=eval_limit, n_train=n_train, seed=seed, calib_batches=calib_batches,
                           fusion_weight=fusion_weight)
    try:
        run_experiment_command(cfg, out=out, base=base, cache_dir=cache, reuse=reuse, threads=threads,
                               progress=progress)
    except (ShiraError, FileNotFoundError, ValueError) as e:
        fail(str(e))


def main() -> None:
    _venv_tools_on_path()
    app()


def _venv_tools_on_path() -> None:
    """Puts this Python's bin directory on PATH: a venv that is not activated (`.venv/bin/shira serve`) keeps
    ninja there, which building or loading the row-correction kernel runs."""
    bindir = str(Path(sys.executable).parent)
    if bindir not in os.environ.get("PATH", "").split(os.pathsep):
        os.environ["PATH"] = bindir + os.pathsep + os.environ.get("PATH", "")


if __name__ == "__main__":
    main()
