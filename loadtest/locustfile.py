"""Locust workloads against a shira server or gateway.

    SHIRA_ADAPTERS=boolq,piqa,sst2 locust -f loadtest/locustfile.py --host http://127.0.0.1:8000 \
        --headless -u 8 -r 8 -t 60s

Users pick adapters from SHIRA_ADAPTERS with Zipf weights (p ~ 1/k); an empty list means the base model.
SHIRA_READ_TOKEN is sent as a bearer token when set.
"""

from __future__ import annotations

import os
import random

from locust import HttpUser, between, task

ADAPTERS = [a for a in os.environ.get("SHIRA_ADAPTERS", "").split(",") if a]
WEIGHTS = [1.0 / (k + 1) for k in range(len(ADAPTERS))]
MAX_NEW_TOKENS = int(os.environ.get("SHIRA_MAX_NEW_TOKENS", "32"))
PROMPTS = [
    "Write a short story about a lighthouse keeper.",
    "Explain how a bicycle works to a child.",
    "Describe the water cycle step by step.",
    "Give advice to someone starting to run.",
]


class ShiraUser(HttpUser):
    wait_time = between(0.0, 0.2)

    def on_start(self) -> None:
        token = os.environ.get("SHIRA_READ_TOKEN")
        if token:
            self.client.headers["Authorization"] = f"Bearer {token}"

    def _adapter(self) -> dict[str, str]:
        return {"adapter": random.choices(ADAPTERS, WEIGHTS)[0]} if ADAPTERS else {}

    @task(6)
    def generate(self) -> None:
        body = {"prompt": random.choice(PROMPTS), "max_new_tokens": MAX_NEW_TOKENS}
        params = self._adapter()
        with self.client.post("/generate", params=params, json=body, name="/generate",
                              catch_response=True) as resp:
            if resp.status_code != 200:
                resp.failure(f"{resp.status_code}: {resp.text[:200]}")

    @task(3)
    def chat(self) -> None:
        model = self._adapter().get("adapter", "base")
        body = {"model": model, "max_tokens": MAX_NEW_TOKENS,
                "messages": [{"role": "user", "content": random.choice(PROMPTS)}]}
        self.client.post("/v1/chat/completions", json=body, name="/v1/chat/completions")

    @task(1)
    def list_adapters(self) -> None:
        self.client.get("/adapters", name="/adapters")
