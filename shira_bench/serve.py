"""Throughput and latency of a live server on loopback (`shira bench serve`), side by side in one run.

Workloads (closed loop: each client sends its next request when the previous one returns):
  base      8 clients, no adapter
  single    8 clients, all on one adapter
  mixed     8 clients, 8 adapters drawn from a Zipf distribution
  one       1 client on one adapter (the scaling reference)
Rounds interleave the workloads so machine noise hits each alike; figures are medians over rounds.
"""

from __future__ import annotations

import random
import secrets
import statistics
import sys
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import httpx

from .phases import phases, scrape
from .server import closed_loop, free_port, start_server, upload_random_adapters

PROMPTS = [
    "Write a short story about a lighthouse keeper.",
    "Explain how a bicycle works to a child.",
    "List some tips for learning a new language.",
    "Describe a walk through a forest in autumn.",
    "What makes a good cup of tea? Explain in detail.",
    "Write a letter to a friend about your holiday.",
    "Describe the water cycle step by step.",
    "Give advice to someone starting to run.",
]


@dataclass
class Workload:
    name: str
    clients: int
    adapters: list[str]  # empty: base model
    zipf: bool = False


def _to_stderr(line: str) -> None:
    print(line, file=sys.stderr)


def run_workload(url: str, work: Workload, requests_per_client: int, max_new_tokens: int, seed: int) -> dict:
    """Runs one closed-loop workload; returns tokens/s and latency percentiles."""
    latencies: list[float] = []
    tokens = [0]
    errors: list[str] = []
    lock = threading.Lock()
    weights = [1.0 / (k + 1) for k in range(len(work.adapters))]

    def client(cid: int) -> None:
        rng = random.Random(seed * 1000 + cid)
        with httpx.Client(base_url=url, timeout=600) as http:
            for i in range(requests_per_client):
                params = {}
                if work.adapters:
                    params["adapter"] = rng.choices(work.adapters, weights)[0] if work.zipf else work.adapters[0]
                # Chat prompts asking for long answers, so requests run to max_new_tokens rather than to an early EOS.
                prompt = PROMPTS[(cid + i) % len(PROMPTS)]
                body = {"messages": [{"role": "user", "content": prompt}], "max_new_tokens": max_new_tokens}
                start = time.perf_counter()
                resp = http.post("/generate", params=params, json=body)
                elapsed = time.perf_counter() - start
                with lock:
                    if resp.status_code != 200:
                        errors.append(f"{resp.status_code} {resp.text[:200]}")
                        continue
                    latencies.append(elapsed)
                    tokens[0] += resp.json()["completion_tokens"]

    wall = closed_loop(work.clients, client)
    if errors:
        raise RuntimeError(f"{work.name}: {len(errors)} failed requests, first: {errors[0]}")
    lat = sorted(latencies)
    return {
        "tokens_per_s": tokens[0] / wall,
        "p50_ms": 1e3 * lat[len(lat) // 2],
        "p99_ms": 1e3 * lat[min(len(lat) - 1, int(0.99 * len(lat)))],
        "tokens": tokens[0],
    }


def measure(url: str, adapters: list[str], rounds: int, requests_per_client: int, max_new_tokens: int,
            token: str | None = None, log: Callable[[str], None] | None = None) -> dict:
    """Warms the server up, then runs every workload once per round; `log` (None: stderr) gets one line per
    workload run."""
    log = log or _to_stderr
    workloads = [
        Workload("base", 8, []),
        Workload("single", 8, adapters[:1]),
        Workload("mixed", 8, adapters, zipf=True),
        Workload("one", 1, adapters[:1]),
    ]
    # Warm-up: load every adapter once (registry read, switch plan, guest delta), so that round 1 measures the
    # same steady state as the others rather than cold caches.
    for name in adapters:
        run_workload(url, Workload("warm-up", 1, [name]), 1, 8, seed=0)
    # And one full batch of each shape, so first-use costs (allocator growth, kernel selection on CUDA) land here:
    # on an H200, without this, the first 8-client workload of round 1 ran at half the speed of later rounds.
    run_workload(url, Workload("warm-up", 8, []), 1, 8, seed=0)
    run_workload(url, Workload("warm-up", 8, adapters, zipf=True), 1, 8, seed=0)
    samples: dict[str, list[dict]] = {w.name: [] for w in workloads}
    headers = {"Authorization": f"Bearer {token}"} if token else None
    for r in range(rounds):
        for work in round_order(workloads, r):
            n = requests_per_client * (2 if work.clients == 1 else 1)
            before = scrape(url, headers)
            samples[work.name].append(run_workload(url, work, n, max_new_tokens, seed=r))
            samples[work.name][-1]["phases"] = phases(before, scrape(url, headers))
            rate = samples[work.name][-1]["tokens_per_s"]
            log(f"round {r + 1}/{rounds} {work.name}: {rate:.1f} tok/s")
    return summarize(samples)


def round_order(workloads: list, r: int) -> list:
    """Round r starts at workload r (mod their number), so drift in the machine's speed over a run does not
    always favour the workload that runs first."""
    k = r % len(workloads)
    return workloads[k:] + workloads[:k]


def summarize(samples: dict[str, list[dict]]) -> dict:
    """Medians over rounds per workload, the three target ratios, and each round's mixed/single ratio."""
    out: dict = {}
    for name, runs in samples.items():
        for key in ("tokens_per_s", "p50_ms", "p99_ms"):
            out[f"{name}_{key}"] = round(statistics.median(r[key] for r in runs), 2)
    out["mixed_vs_single"] = round(out["mixed_tokens_per_s"] / out["single_tokens_per_s"], 3)
    out["single_vs_base"] = round(out["single_tokens_per_s"] / out["base_tokens_per_s"], 3)
    out["eight_vs_one_client"] = round(out["single_tokens_per_s"] / out["one_tokens_per_s"], 3)
    # Each round's own ratios too: a round's workloads run back to back, so pairing them cancels slow drift in
    # the machine's speed, and their spread shows the noise that is left.
    for ratio, (top, bottom) in {"mixed_vs_single": ("mixed", "single"), "single_vs_base": ("single", "base")}.items():
        pairs = zip(samples[top], samples[bottom], strict=True)
        rounds = [round(t["tokens_per_s"] / b["tokens_per_s"], 3) for t, b in pairs]
        out[f"{ratio}_by_round"] = rounds
        out[f"{ratio}_round_median"] = round(statistics.median(rounds), 3)
    # The worker's time by phase (server /metrics), medians over rounds: where the ratios come from.
    for name, runs in samples.items():
        found = [r["phases"] for r in runs if r.get("phases")]
        if found:
            out[f"{name}_phases"] = {k: statistics.median(p[k] for p in found) for k in found[0]}
    return out


def report(result: dict) -> str:
    """Each workload's tokens/s and latencies, the target ratios met or missed, and the worker's phases."""
    lines = [f"{'workload':10s} {'tok/s':>8s} {'p50 ms':>9s} {'p99 ms':>9s}"]
    for name in ("base", "single", "mixed", "one"):
        lines.append(f"{name:10s} {result[f'{name}_tokens_per_s']:8.1f} {result[f'{name}_p50_ms']:9.0f} "
                     f"{result[f'{name}_p99_ms']:9.0f}")
    checks = [("mixed / single >= 0.85", result["mixed_vs_single"], 0.85),
              ("single / base >= 0.97", result["single_vs_base"], 0.97),
              ("8 clients / 1 client >= 3", result["eight_vs_one_client"], 3.0)]
    lines.append("")
    lines += [f"[{'ok' if value >= target else 'MISS'}] {label}: {value:.3f}" for label, value, target in checks]
    for ratio, label in (("mixed_vs_single", "mixed / single"), ("single_vs_base", "single / base")):
        rounds = ", ".join(f"{r:.3f}" for r in result[f"{ratio}_by_round"])
        lines.append(f"{label} by round: {rounds} (median {result[f'{ratio}_round_median']:.3f})")
    if all(f"{name}_phases" in result for name in ("base", "single", "mixed", "one")):
        lines += ["", "worker time, ms per decode step (median of rounds):",
                  f"{'workload':10s} {'decode':>8s} {'prefill':>8s} {'plans':>8s} {'switch':>8s} {'steps':>6s}"]
        for name in ("base", "single", "mixed", "one"):
            p = result[f"{name}_phases"]
            lines.append(f"{name:10s} {p['decode_ms']:8.1f} {p['prefill_ms']:8.1f} {p['plan_build_ms']:8.1f} "
                         f"{p['switch_ms']:8.1f} {p['decode_steps']:6.0f}")
    return "\n".join(lines)


def run(*, url: str | None, token: str | None, redis_url: str | None, rounds: int, requests: int,
        max_new_tokens: int, density: float, model: str | None = None,
        log: Callable[[str], None] | None = None, env: Mapping[str, str] | None = None) -> dict:
    """Starts a server unless `url` is given, uploads 8 random adapters, measures; returns the summary.

    Args:
        url, token: a running server and its admin token (to upload the adapters); url None starts one.
        redis_url: the started server's registry (None: embedded).
        model: the server's base model: the started server loads it, and the adapters are built for it
            (None: the bundled model).
        log: progress lines (None: stderr).
        env: the started server's environment (the CLI passes its own).
    """
    log = log or _to_stderr
    if url is not None and not token:
        raise ValueError("a running server needs its admin token, to upload the benchmark adapters")
    proc = None
    if url is None:
        token = token or secrets.token_urlsafe(24)
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        log(f"starting a server on {url} ...")
        proc = start_server(port, token, redis_url, {**(env or {}), **({"SHIRA_BASE_MODEL": model} if model else {})})
    try:
        adapters = upload_random_adapters(url, token, 8, density, model)
        result = measure(url, adapters, rounds, requests, max_new_tokens, token, log)
        result.update(rounds=rounds, requests_per_client=requests, max_new_tokens=max_new_tokens, density=density)
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(timeout=60)
    return result
