"""`shira bench serve`: throughput and latency of a live server on loopback, side by side in one run.

Workloads (closed loop: each client sends its next request when the previous one returns):
  base      8 clients, no adapter
  single    8 clients, all on one adapter
  mixed     8 clients, 8 adapters drawn from a Zipf distribution
  one       1 client on one adapter (the scaling reference)
Rounds interleave the workloads so machine noise hits each alike; figures are medians over rounds.
"""

from __future__ import annotations

import json
import os
import random
import secrets
import socket
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass

import httpx
import typer

from .serve_phases import phases, scrape

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


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_server(port: int, token: str, redis_url: str | None, extra_env: dict[str, str]) -> subprocess.Popen:
    """Starts `shira serve` in a subprocess and waits until /ready answers 200."""
    env = dict(os.environ, SHIRA_ADMIN_TOKEN=token, SHIRA_NAMESPACE=f"bench-{secrets.token_hex(4)}", **extra_env)
    if redis_url:
        env["SHIRA_REDIS_URL"] = redis_url
    proc = subprocess.Popen(
        [sys.executable, "-m", "shira_cli.main", "serve", "--host", "127.0.0.1", "--port", str(port)],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )
    deadline = time.time() + 300
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}: {proc.stderr.read().decode()[-2000:]}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/ready", timeout=2).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        time.sleep(1)
    proc.kill()
    raise RuntimeError("server did not become ready within 300 s")


def upload_random_adapters(url: str, token: str, count: int, density: float, model: str | None = None) -> list[str]:
    """Builds rand-mask adapters for the server's base model (`model`; None: the bundled one) and uploads them."""
    from shira_core.fingerprint import BaseFingerprint
    from shira_core.io import adapter_to_bytes
    from shira_core.models import linear_weight_names, load_base

    from .bench_switch import random_adapter

    base, _, _ = load_base(model, device="cpu", dtype="float32")
    names = linear_weight_names(base)
    fingerprint = BaseFingerprint.of(base)
    uploaded = []
    for k in range(count):
        adapter = random_adapter(base, names, density, seed=100 + k, name=f"bench-{k}")
        adapter.base_fingerprint = fingerprint.to_dict(names)
        resp = httpx.post(
            f"{url}/adapters", headers={"Authorization": f"Bearer {token}"},
            data={"name": adapter.name}, files={"file": ("a.safetensors", adapter_to_bytes(adapter))}, timeout=120,
        )
        resp.raise_for_status()
        uploaded.append(adapter.name)
    del base
    return uploaded


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

    threads = [threading.Thread(target=client, args=(c,)) for c in range(work.clients)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
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
            token: str | None = None) -> dict:
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
            typer.echo(f"round {r + 1}/{rounds} {work.name}: {rate:.1f} tok/s", err=True)
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


def _report(result: dict) -> str:
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


def run_serve_bench(url: str | None, token: str | None, redis_url: str | None, rounds: int, requests: int,
                    max_new_tokens: int, density: float, as_json: bool, model: str | None = None) -> None:
    """Entry point of `shira bench serve`: starts a server unless --url is given, uploads 8 adapters, measures.

    `model` is the server's base model: the started server loads it, and the adapters are built for it. None
    reads SHIRA_BASE_MODEL, else the bundled model.
    """
    from shira_core.models import resolve

    model = model or os.environ.get("SHIRA_BASE_MODEL")
    resolve(model)  # a model that is not there fails here, in one line, not in the server's start-up log
    proc = None
    if url is None:
        token = token or secrets.token_urlsafe(24)
        port = _free_port()
        url = f"http://127.0.0.1:{port}"
        typer.echo(f"starting a server on {url} ...", err=True)
        proc = start_server(port, token, redis_url, {"SHIRA_BASE_MODEL": model} if model else {})
    elif not token:
        raise typer.BadParameter("--admin-token is needed with --url (to upload the benchmark adapters)")
    try:
        adapters = upload_random_adapters(url, token, 8, density, model)
        result = measure(url, adapters, rounds, requests, max_new_tokens, token)
        result.update(rounds=rounds, requests_per_client=requests, max_new_tokens=max_new_tokens, density=density)
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(timeout=60)
    typer.echo(json.dumps(result) if as_json else _report(result))
