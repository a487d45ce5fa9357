"""The Markdown summary of a load test: Locust's CSV per route, plus switches and cache hits scraped from every
replica's /metrics before and after the run.

    python loadtest/summary.py scrape URL [URL ...] > before.json
    python loadtest/summary.py report OUT_DIR --seconds S URL [URL ...] > OUT_DIR/summary.md   (and totals.json)
"""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

import httpx

COUNTERS = {
    "switches": ("shira_switch_seconds_count", None),
    "cache_hits": ("shira_adapter_cache_hits_total", None),
    "cache_misses": ("shira_adapter_cache_misses_total", None),
    "tokens": ("shira_generated_tokens_total", None),
}


def scrape(url: str) -> dict[str, float]:
    """Totals of the counters above on one replica (a switch of any kind counts)."""
    text = httpx.get(f"{url.rstrip('/')}/metrics", timeout=10).text
    out = dict.fromkeys(COUNTERS, 0.0)
    for line in text.splitlines():
        if line.startswith("#") or " " not in line:
            continue
        series, value = line.rsplit(" ", 1)
        metric = series.split("{", 1)[0]
        for key, (name, _) in COUNTERS.items():
            if metric == name:
                out[key] += float(value)
    return out


def report(out_dir: Path, seconds: float, urls: list[str]) -> str:
    before = json.loads((out_dir / "before.json").read_text())
    after = {url: scrape(url) for url in urls}
    totals: dict = {}
    lines = ["| route | requests | failures | RPS | p50 ms | p95 ms | p99 ms |", "|---|---:|---:|---:|---:|---:|---:|"]
    with (out_dir / "locust_stats.csv").open() as f:
        for row in csv.DictReader(f):
            lines.append(f"| {row['Type']} {row['Name']} | {row['Request Count']} | {row['Failure Count']} | "
                         f"{float(row['Requests/s']):.2f} | {row['50%']} | {row['95%']} | {row['99%']} |")
            if row["Name"] == "Aggregated":
                totals = {"requests": int(row["Request Count"]), "failures": int(row["Failure Count"]),
                          "p50_ms": float(row["50%"]), "p99_ms": float(row["99%"])}
    lines += ["", "| replica | switches/s | cache hit rate | tokens/s |", "|---|---:|---:|---:|"]
    deltas = {url: {k: after[url][k] - before.get(url, {}).get(k, 0.0) for k in COUNTERS} for url in urls}
    deltas["all replicas"] = {k: sum(d[k] for d in deltas.values()) for k in COUNTERS}
    for url, d in deltas.items():
        lookups = d["cache_hits"] + d["cache_misses"]
        hit_rate = f"{d['cache_hits'] / lookups:.3f}" if lookups else "-"
        lines.append(f"| {url} | {d['switches'] / seconds:.2f} | {hit_rate} | {d['tokens'] / seconds:.1f} |")
    d = deltas["all replicas"]
    lookups = d["cache_hits"] + d["cache_misses"]
    totals.update(switches_s=d["switches"] / seconds, tokens_s=d["tokens"] / seconds,
                  cache_hit_rate=d["cache_hits"] / lookups if lookups else None)
    (out_dir / "totals.json").write_text(json.dumps(totals))  # for scripts that compare runs
    failures = out_dir / "locust_failures.csv"
    if failures.exists():
        with failures.open() as f:
            rows = list(csv.DictReader(f))
        if rows:
            lines += ["", "Failures:", ""] + [f"- {r['Occurrences']} x {r['Name']}: {r['Error'][:160]}" for r in rows]
    return "\n".join(lines) + "\n"


def main() -> None:
    command, *args = sys.argv[1:] or ["help"]
    if command == "scrape":
        print(json.dumps({url: scrape(url) for url in args}))
    elif command == "report" and len(args) >= 4 and args[1] == "--seconds":
        print(report(Path(args[0]), float(args[2]), args[3:]), end="")
    else:
        sys.exit(__doc__)


if __name__ == "__main__":
    main()
