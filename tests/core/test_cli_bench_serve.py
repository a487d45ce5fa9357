"""`shira bench serve`'s summary: medians over rounds, the target ratios and the per-round ratios."""

from __future__ import annotations

from shira_cli.bench_serve import _report, round_order, summarize


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
    text = _report(out)
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
