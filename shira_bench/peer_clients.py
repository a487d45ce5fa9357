"""Closed-loop streaming clients for `shira bench peer`: the same chat requests to either server's
/v1/chat/completions, only the adapter selection differs.

A target is one server and how its requests pick an adapter: shira by the `model` field, llama.cpp by the `lora`
field (every id listed; peer_llama.lora_field). llama.cpp's requests also carry `cache_prompt: false`, so it
prefills every prompt as shira does, and the client checks its timings for a prompt-cache hit.
"""

from __future__ import annotations

import json
import random
import statistics
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import httpx

from .server import closed_loop

# loadtest/locustfile.py's prompts: each runs past 48 tokens on SmolLM2-135M-Instruct (greedy), with or without an
# adapter, so requests run to max_tokens rather than to an early end of sequence.
PROMPTS = [
    "Write a long story about a lighthouse keeper who finds a message in a bottle.",
    "Describe, step by step and at length, how bread is made at home.",
    "Write a detailed travel guide to a city you imagine.",
    "List twenty tips for learning a new language, with an explanation for each.",
    "Describe a long walk through a forest in autumn, with every sound and colour.",
    "Write a letter to a friend about your summer holiday, in detail.",
    "Explain the water cycle to a child, with many examples.",
]


@dataclass(frozen=True)
class Target:
    """One server: `fields(k)` gives the request fields that select adapter k (None: the base model)."""

    name: str
    url: str
    fields: Callable[[int | None], dict]


@dataclass(frozen=True)
class Workload:
    name: str
    clients: int
    adapters: int  # adapters drawn from (ids 0..adapters-1); 0: the base model
    zipf: bool = False


WORKLOADS = (Workload("base", 8, 0), Workload("single", 8, 1), Workload("mixed", 8, 8, zipf=True),
             Workload("one", 1, 1))


def _client(target: Target) -> httpx.Client:
    """One connection per request, for both servers: llama-server drops a kept-alive connection after a streamed
    answer without saying so, and the next request on it fails."""
    return httpx.Client(base_url=target.url, timeout=600, headers={"Connection": "close"})


def stream_one(http: httpx.Client, body: dict) -> dict:
    """Sends one streamed chat completion; returns its completion and prompt tokens (from the usage event, else
    one per content event) and llama.cpp's prompt-cache count when it reports one."""
    tokens = events = prompt = 0
    cached = None
    with http.stream("POST", "/v1/chat/completions", json=body) as resp:
        if resp.status_code != 200:
            raise RuntimeError(f"{resp.status_code} {resp.read().decode()[:300]}")
        for line in resp.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            if any(c.get("delta", {}).get("content") for c in event.get("choices") or []):
                events += 1
            if event.get("usage"):
                tokens, prompt = event["usage"]["completion_tokens"], event["usage"]["prompt_tokens"]
            if "timings" in event:
                cached = event["timings"].get("cache_n", cached)
    return {"tokens": tokens or events, "prompt_tokens": prompt, "cached": cached}


def request_body(target: Target, adapter: int | None, max_tokens: int, prompt: str) -> dict:
    """A streamed greedy chat request for `target`, on adapter id `adapter` (None: the base model). Both servers
    take `ignore_eos`, so every request decodes exactly `max_tokens` even where a prompt would end sooner."""
    return {**target.fields(adapter), "max_tokens": max_tokens, "temperature": 0.0, "ignore_eos": True,
            "stream": True, "stream_options": {"include_usage": True},
            "messages": [{"role": "user", "content": prompt}]}


def warm_up(target: Target, adapters: int, max_tokens: int) -> None:
    """One request on the base model and on each adapter, then one round of 8 clients on each 8-client shape, so
    that the first round meets the steady state (adapters loaded, buffers grown) rather than cold caches."""
    with _client(target) as http:
        for k in [None, *range(adapters)]:
            stream_one(http, request_body(target, k, 8, PROMPTS[0]))
    for work in WORKLOADS[:3]:
        run_workload(target, work, 600.0, max_tokens, seed=0, requests_per_client=1)


def run_workload(target: Target, work: Workload, seconds: float, max_tokens: int, seed: int,
                 requests_per_client: int | None = None) -> dict:
    """Runs `work` closed loop for `seconds` (each client sends its next request when the last one returns; the
    requests in flight at the end finish and count), or until each client sent `requests_per_client`; returns
    tokens/s over the whole wall time."""
    results: list[dict] = []
    errors: list[str] = []
    lock = threading.Lock()
    weights = [1.0 / (k + 1) for k in range(work.adapters)]
    deadline = time.perf_counter() + seconds

    def client(cid: int) -> None:
        rng = random.Random(seed * 1000 + cid)
        with _client(target) as http:
            i = 0
            while (time.perf_counter() < deadline and not errors
                   and (requests_per_client is None or i < requests_per_client)):
                adapter = None
                if work.adapters:
                    adapter = rng.choices(range(work.adapters), weights)[0] if work.zipf else 0
                body = request_body(target, adapter, max_tokens, PROMPTS[(cid + i) % len(PROMPTS)])
                start = time.perf_counter()
                try:
                    got = stream_one(http, body)
                except (RuntimeError, httpx.HTTPError) as e:
                    with lock:
                        errors.append(f"{target.name} {work.name}: {e}")
                    return
                got["latency_s"] = time.perf_counter() - start
                with lock:
                    results.append(got)
                i += 1

    wall = closed_loop(work.clients, client)
    if errors:
        raise RuntimeError(f"{len(errors)} failed requests, first: {errors[0]}")
    hits = sum(1 for r in results if r["cached"])
    if hits:
        raise RuntimeError(f"{target.name} {work.name}: {hits} requests reused a cached prompt; prompt caching must "
                           "be off so that both servers prefill every prompt")
    tokens = sum(r["tokens"] for r in results)
    return {"tokens_per_s": tokens / wall, "requests": len(results), "tokens": tokens,
            "short": sum(1 for r in results if r["tokens"] < max_tokens),
            "prompt_tokens": statistics.mean(r["prompt_tokens"] for r in results) if results else 0.0,
            "p50_ms": 1e3 * statistics.median(r["latency_s"] for r in results) if results else 0.0}
