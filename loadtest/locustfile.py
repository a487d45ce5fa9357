"""Locust workloads against a shira server or gateway; `loadtest/run.sh` runs them headless.

    SHIRA_ADAPTERS=$(.venv/bin/python loadtest/setup.py http://127.0.0.1:8000) \
        .venv/bin/locust -f loadtest/locustfile.py --host http://127.0.0.1:8000 --headless -u 8 -r 8 -t 60s

User classes (pick some with Locust's class arguments; all run by default, weighted):
  ZipfUser       POST /generate with chat messages, one adapter drawn Zipf-wise (p ~ 1/k) from SHIRA_ADAPTERS
  SetUser        POST /generate?adapters=a:0.5,b:0.5, a weighted set of two adapters
  StreamingUser  POST /generate with stream=true; the time to the first text is recorded as "TTFT /generate",
                 the whole stream's as "STREAM /generate (to the last event)"
  OpenAIUser     POST /v1/chat/completions in the official client's request shape, half of them streamed
  UploadUser     rare: uploads an adapter file again (SHIRA_UPLOAD_FILE, with SHIRA_ADMIN_TOKEN); the same bytes
                 change nothing, so the registry does not grow

Every generation asks for SHIRA_MAX_NEW_TOKENS (default 32) with `ignore_eos` (vLLM's name), and counts as
failed when it comes back shorter: the test measures decoding, not one-token answers. The prompts run to length
on their own too, but a random adapter now and then ends one early (7 of 32 tokens, once in 221 requests).
SHIRA_READ_TOKEN is sent as a bearer token when set.
"""

from __future__ import annotations

import json
import os
import random
import time

from locust import HttpUser, between, events, task

ADAPTERS = [a for a in os.environ.get("SHIRA_ADAPTERS", "").split(",") if a]
WEIGHTS = [1.0 / (k + 1) for k in range(len(ADAPTERS))]
MAX_NEW_TOKENS = int(os.environ.get("SHIRA_MAX_NEW_TOKENS", "32"))
# Each runs to 48 tokens and more on SmolLM2-135M-Instruct, with or without a 1% adapter (greedy).
PROMPTS = [  # shira_bench/peer_clients.py sends the same (a test keeps them equal); this file imports no project code
    "Write a long story about a lighthouse keeper who finds a message in a bottle.",
    "Describe, step by step and at length, how bread is made at home.",
    "Write a detailed travel guide to a city you imagine.",
    "List twenty tips for learning a new language, with an explanation for each.",
    "Describe a long walk through a forest in autumn, with every sound and colour.",
    "Write a letter to a friend about your summer holiday, in detail.",
    "Explain the water cycle to a child, with many examples.",
]


def messages() -> list[dict[str, str]]:
    return [{"role": "user", "content": random.choice(PROMPTS)}]


def zipf_adapter() -> str | None:
    return random.choices(ADAPTERS, WEIGHTS)[0] if ADAPTERS else None


class _Base(HttpUser):
    abstract = True
    wait_time = between(0.0, 0.2)

    def on_start(self) -> None:
        token = os.environ.get("SHIRA_READ_TOKEN")
        if token:
            self.client.headers["Authorization"] = f"Bearer {token}"

    def _generate(self, name: str, params: dict[str, str]) -> None:
        body = {"messages": messages(), "max_new_tokens": MAX_NEW_TOKENS, "ignore_eos": True}
        with self.client.post("/generate", params=params, json=body, name=name, catch_response=True) as resp:
            if resp.status_code != 200:
                resp.failure(f"{resp.status_code}: {resp.text[:200]}")
            elif resp.json()["completion_tokens"] != MAX_NEW_TOKENS:
                resp.failure(f"short completion: {resp.json()['completion_tokens']} of {MAX_NEW_TOKENS} tokens")


class ZipfUser(_Base):
    weight = 6

    @task
    def generate(self) -> None:
        adapter = zipf_adapter()
        self._generate("/generate", {"adapter": adapter} if adapter else {})


class SetUser(_Base):
    weight = 1

    @task
    def weighted_set(self) -> None:
        pair = random.sample(ADAPTERS, 2) if len(ADAPTERS) >= 2 else ADAPTERS
        params = {"adapters": ",".join(f"{a}:{1 / len(pair):g}" for a in pair)} if pair else {}
        self._generate("/generate?adapters", params)


class StreamingUser(_Base):
    weight = 2

    @task
    def stream(self) -> None:
        adapter = zipf_adapter()
        body = {"messages": messages(), "max_new_tokens": MAX_NEW_TOKENS, "ignore_eos": True, "stream": True}
        began = time.perf_counter()
        first = None
        result: dict = {}
        with self.client.post("/generate", params={"adapter": adapter} if adapter else {}, json=body, stream=True,
                              name="/generate stream", catch_response=True) as resp:
            if resp.status_code != 200:
                resp.failure(f"{resp.status_code}: {resp.text[:200]}")
                return
            for line in resp.iter_lines():
                if not line or not line.startswith(b"data: ") or line == b"data: [DONE]":
                    continue
                event = json.loads(line[6:])
                if event.get("type") == "delta" and first is None:
                    first = time.perf_counter() - began
                elif event.get("type") == "result":
                    result = event
                elif "error" in event:
                    resp.failure(f"stream error: {event['error']}")
                    return
            if result.get("completion_tokens") != MAX_NEW_TOKENS:
                resp.failure(f"short completion: {result.get('completion_tokens')} of {MAX_NEW_TOKENS} tokens")
        if first is not None:  # Locust times a stream to its headers; these two time its text
            events.request.fire(request_type="TTFT", name="/generate", response_time=first * 1000,
                                response_length=0, exception=None, context={})
            events.request.fire(request_type="STREAM", name="/generate (to the last event)",
                                response_time=(time.perf_counter() - began) * 1000, response_length=0,
                                exception=None, context={})


class OpenAIUser(_Base):
    """The request the official `openai` client sends for chat.completions.create(...)."""

    weight = 2

    @task
    def chat(self) -> None:
        stream = random.random() < 0.5
        body = {"model": zipf_adapter() or "base", "messages": messages(), "max_tokens": MAX_NEW_TOKENS,
                "ignore_eos": True,  # the official client sends it through extra_body, as for vLLM
                "stream": stream, **({"stream_options": {"include_usage": True}} if stream else {})}
        name = "/v1/chat/completions" + (" stream" if stream else "")
        with self.client.post("/v1/chat/completions", json=body, name=name, stream=stream,
                              headers={"User-Agent": "OpenAI/Python locust"}, catch_response=True) as resp:
            if resp.status_code != 200:
                resp.failure(f"{resp.status_code}: {resp.text[:200]}")
                return
            usage = resp.json()["usage"] if not stream else _stream_usage(resp)
            if usage.get("completion_tokens") != MAX_NEW_TOKENS:
                resp.failure(f"short completion: {usage.get('completion_tokens')} of {MAX_NEW_TOKENS} tokens")


def _stream_usage(resp) -> dict:
    usage: dict = {}
    for line in resp.iter_lines():
        if line.startswith(b"data: {"):
            usage = json.loads(line[6:]).get("usage") or usage
    return usage


class UploadUser(_Base):
    """Rare uploads of an adapter file that is already stored: the registry answers 200 and adds nothing."""

    weight = 1
    wait_time = between(20, 40)

    @task
    def upload(self) -> None:
        path, token = os.environ.get("SHIRA_UPLOAD_FILE"), os.environ.get("SHIRA_ADMIN_TOKEN")
        if not path or not token:
            return
        with open(path, "rb") as f:
            data = f.read()
        name = os.path.basename(path).split(".")[0].lower().replace("_", "-")
        with self.client.post("/adapters", data={"name": name}, files={"file": ("a.safetensors", data)},
                              headers={"Authorization": f"Bearer {token}"}, name="/adapters upload",
                              catch_response=True) as resp:
            if resp.status_code not in (200, 201):
                resp.failure(f"{resp.status_code}: {resp.text[:200]}")
