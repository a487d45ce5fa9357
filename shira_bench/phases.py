"""Where a server's worker spent a workload's time, from the change in its /metrics over the workload.

The worker runs one thing at a time, so its phases add up: decode passes, prefill passes, building mixed
batches' correction plans, and switching the weights. Each is reported in ms per decode step, the unit in
which a workload's tokens/s is paid. Behind a gateway, /metrics answers for one replica only.
"""

from __future__ import annotations

import httpx
from prometheus_client.parser import text_string_to_metric_families

# sample name (and label) on /metrics -> key in a scrape
_SAMPLES = {
    ("shira_step_seconds_sum", "decode"): "decode_s",
    ("shira_step_seconds_count", "decode"): "decode_n",
    ("shira_step_seconds_sum", "prefill"): "prefill_s",
    ("shira_step_seconds_count", "prefill"): "prefill_n",
    ("shira_guest_plan_build_seconds_sum", None): "plan_build_s",
    ("shira_guest_plan_build_seconds_count", None): "plan_build_n",
    ("shira_switch_seconds_sum", None): "switch_s",  # summed over apply, transition and revert
}


def scrape(url: str, headers: dict[str, str] | None = None) -> dict[str, float] | None:
    """The phase sums and counts on the server's /metrics; None when it cannot be read."""
    try:
        resp = httpx.get(f"{url}/metrics", headers=headers, timeout=10)
        resp.raise_for_status()
    except httpx.HTTPError:
        return None
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(resp.text):
        for sample in family.samples:
            key = _SAMPLES.get((sample.name, sample.labels.get("kind"))) or _SAMPLES.get((sample.name, None))
            if key is not None:
                out[key] = out.get(key, 0.0) + sample.value
    return out


def phases(before: dict[str, float] | None, after: dict[str, float] | None) -> dict[str, float] | None:
    """Between two scrapes: ms per decode step in each phase, and how many decode steps, prefills and plan
    builds there were. None when a scrape is missing or no decode step ran."""
    if before is None or after is None:
        return None
    delta = {k: after.get(k, 0.0) - before.get(k, 0.0) for k in _SAMPLES.values()}
    steps = delta["decode_n"]
    if steps <= 0:
        return None
    return {
        "decode_ms": round(1e3 * delta["decode_s"] / steps, 2),
        "prefill_ms": round(1e3 * delta["prefill_s"] / steps, 2),
        "plan_build_ms": round(1e3 * delta["plan_build_s"] / steps, 2),
        "switch_ms": round(1e3 * delta["switch_s"] / steps, 2),
        "decode_steps": int(steps),
        "prefills": int(delta["prefill_n"]),
        "plan_builds": int(delta["plan_build_n"]),
    }
