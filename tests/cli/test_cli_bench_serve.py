"""`shira bench serve`'s summary: medians over rounds, the target ratios and the per-round ratios."""

from __future__ import annotations

import socket

from prometheus_client import CollectorRegistry, Histogram, start_http_server

from shira_bench.phases import phases, scrape
from shira_bench.serve import report, round_order, summarize


def run(rate: float, p50: float = 1000.0) -> dict:
    return {"tokens_per_s": rate, "p50_ms": p50, "p99_ms": 2 * p50, "tokens": 256}


def test_summary_takes_medians_and_ratios_of_medians_and_keeps_each_rounds_ratio():
    samples = {
        "base": [run(40), run(44), run(30)],
        "single": [run(40), run(42), run(20)],
        "mixed": [run(36), run(30), run(19)],
        "one": [run(10), run(12), run(11)],
    }
    out = summarize(samples)
    assert out["single_tokens_per_s"] == 40 and out["mixed_tokens_per_s"] == 30
    assert out["mixed_vs_single"] == 0.75
    assert out["single_vs_base"] == round(40 / 40, 3)
    assert out["eight_vs_one_client"] == round(40 / 11, 3)
    assert out["mixed_vs_single_by_round"] == [0.9, round(30 / 42, 3), 0.95]
    assert out["mixed_vs_single_round_median"] == 0.9
    assert out["single_vs_base_by_round"] == [1.0, round(42 / 44, 3), round(20 / 30, 3)]
    assert out["single_vs_base_round_median"] == round(42 / 44, 3)
    text = report(out)
    assert "[MISS] mixed / single >= 0.85: 0.750" in text
    assert "[ok] 8 clients / 1 client >= 3: 3.636" in text
    assert "mixed / single by round: 0.900, 0.714, 0.950 (median 0.900)" in text
    assert "single / base by round: 1.000, 0.955, 0.667 (median 0.955)" in text


def test_each_round_starts_at_a_different_workload_and_runs_every_one_once():
    names = ["base", "single", "mixed", "one"]
    orders = [round_order(names, r) for r in range(5)]
    assert [o[0] for o in orders] == ["base", "single", "mixed", "one", "base"]
    assert all(sorted(o) == sorted(names) for o in orders)
    assert orders[1] == ["single", "mixed", "one", "base"]


def test_phases_come_from_the_servers_metrics_per_decode_step():
    registry = CollectorRegistry()
    step = Histogram("shira_step_seconds", "", ["kind"], registry=registry)
    build = Histogram("shira_guest_plan_build_seconds", "", registry=registry)
    switch = Histogram("shira_switch_seconds", "", ["kind"], registry=registry)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server, thread = start_http_server(port, addr="127.0.0.1", registry=registry)
    try:
        url = f"http://127.0.0.1:{port}"
        step.labels("decode").observe(9.0)  # before the workload: not counted
        before = scrape(url)
        for _ in range(4):
            step.labels("decode").observe(0.05)
        step.labels("prefill").observe(0.1)
        build.observe(0.02)
        switch.labels("apply").observe(0.01)
        switch.labels("revert").observe(0.01)
        got = phases(before, scrape(url))
    finally:
        server.shutdown()
        thread.join(timeout=5)
    assert got == {"decode_ms": 50.0, "prefill_ms": 25.0, "plan_build_ms": 5.0, "switch_ms": 5.0,
                   "decode_steps": 4, "prefills": 1, "plan_builds": 1}
    assert scrape(url) is None  # the server is gone: no phases rather than an error
    assert phases(before, None) is None and phases(before, before) is None  # no decode step: nothing to divide


def test_summary_and_report_carry_the_median_phases():
    def with_phases(rate: float, decode: float) -> dict:
        return {**run(rate), "phases": {"decode_ms": decode, "prefill_ms": 10.0, "plan_build_ms": 0.0,
                                        "switch_ms": 0.0, "decode_steps": 128, "prefills": 8, "plan_builds": 0}}

    samples = {name: [with_phases(40, 60), with_phases(40, 64), with_phases(40, 80)]
               for name in ("base", "single", "mixed", "one")}
    out = summarize(samples)
    assert out["mixed_phases"]["decode_ms"] == 64 and out["mixed_phases"]["prefills"] == 8
    assert "mixed          64.0     10.0      0.0      0.0    128" in report(out)
