"""The `shira` command. Each subcommand imports its module lazily so `shira --help` stays instant."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

app = typer.Typer(
    help="Sparse high-rank adapters: inspect, compare, convert, train, benchmark and serve.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
bench_app = typer.Typer(help="Side-by-side benchmarks; each prints ratios measured in one process.", no_args_is_help=True)
app.add_typer(bench_app, name="bench")


def _fail(message: str) -> None:
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    raise typer.Exit(2)


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
        _fail(str(e))


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
        _fail(str(e))


@app.command()
def convert(
    source: Annotated[Path, typer.Argument(help="Native .safetensors file or PEFT SHiRA adapter directory.")],
    dest: Annotated[Path, typer.Argument(help="Output: a directory for --to peft, a .safetensors file for --to native.")],
    to: Annotated[str, typer.Option(help="Target format: native or peft.")] = "native",
    name: Annotated[str | None, typer.Option(help="Adapter name to record.")] = None,
    base: Annotated[str | None, typer.Option(help="Base model to validate against and fingerprint (optional).")] = None,
) -> None:
    """Convert between the native format and PEFT's SHiRA format."""
    from shira_core.errors import ShiraError

    from .convert import convert_adapter

    if to not in ("native", "peft"):
        _fail(f"--to must be native or peft, not {to!r}")
    try:
        typer.echo(convert_adapter(source, dest, to=to, name=name, base=base))
    except (ShiraError, FileNotFoundError, ValueError) as e:
        _fail(str(e))


@bench_app.command("switch")
def bench_switch(
    density: Annotated[float, typer.Option(help="Fraction of each linear weight the adapter touches.")] = 0.01,
    repeats: Annotated[int, typer.Option(help="Timed runs per method; the median is reported.")] = 15,
    model: Annotated[str | None, typer.Option(help="Base model (default: bundled SmolLM2-135M-Instruct).")] = None,
    json_out: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
) -> None:
    """Apply/revert and transition vs raw LoRA fuse/unfuse, PEFT SHiRA merge/unmerge and the scatter bound."""
    from .bench_switch import run_switch_bench

    run_switch_bench(density=density, repeats=repeats, model=model, as_json=json_out)


@bench_app.command("serve")
def bench_serve(
    url: Annotated[str | None, typer.Option(help="Target a running server instead of starting one.")] = None,
    admin_token: Annotated[str | None, typer.Option(help="Admin token of --url (to upload the adapters).")] = None,
    redis_url: Annotated[str | None, typer.Option(help="Redis for the started server (default: embedded).")] = None,
    rounds: Annotated[int, typer.Option(help="Rounds over all workloads; medians are reported.")] = 3,
    requests: Annotated[int, typer.Option(help="Requests per client per round.")] = 4,
    max_new_tokens: Annotated[int, typer.Option(help="Tokens per request.")] = 32,
    density: Annotated[float, typer.Option(help="Density of the 8 random adapters.")] = 0.01,
    json_out: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
) -> None:
    """Tokens/s and p50/p99 for 8 clients on one adapter, 8 adapters under Zipf traffic, and the base model."""
    from .bench_serve import run_serve_bench

    run_serve_bench(url, admin_token, redis_url, rounds, requests, max_new_tokens, density, json_out)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
