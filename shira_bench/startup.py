"""Time to ready (`shira bench startup`): `shira serve` started as `make run` starts it, /ready polled.

A first start has an empty data directory: the embedded registry is created and the GGUF base is converted
(and its converted copy written). A warm start reuses that directory, as a restarted or rescheduled replica
with a persistent volume, or an image that was built with the copy, does. Each start's phases come from the
server's own INFO lines (service.startup): the registry, the model load (tokenizer and weights), the
fingerprint, the Switcher, the worker (which loads the row-correction kernel); whatever the phases leave of
the total is the interpreter, the imports and the HTTP server starting.
"""

from __future__ import annotations

import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping
from pathlib import Path

import httpx

from .server import free_port

PHASE_LINE = re.compile(r"startup phases \((?P<what>\w+)\): (?P<parts>.*)")
MODEL_LINE = re.compile(r"from its (?P<how>[\w ]+): tokenizer (?P<tok>[\d.]+) s, weights (?P<weights>[\d.]+) s")


def start_once(data_dir: Path, env: Mapping[str, str], timeout_s: float = 600.0) -> dict:
    """Starts `shira serve` with this data directory, waits for /ready, stops it; seconds and phases."""
    port = free_port()
    log_path = data_dir.parent / f"serve-{port}.log"
    env = {**env, "SHIRA_DATA_DIR": str(data_dir), "SHIRA_ADMIN_TOKEN": "bench-startup-" + "x" * 16}
    env.pop("SHIRA_REDIS_URL", None)  # the embedded registry, as `make run` uses
    # The previous start's writes (a first start's 540 MB copy) are flushed first: their write-back would land in
    # this start's time, which a replica restarted later does not pay.
    os.sync()
    with log_path.open("w") as log:
        began = time.perf_counter()
        proc = subprocess.Popen([sys.executable, "-m", "shira_cli.main", "serve", "--host", "127.0.0.1",
                                 "--port", str(port)], env=env, stdout=log, stderr=subprocess.STDOUT)
        try:
            ready = _wait_ready(proc, port, began, timeout_s)
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
    return {"ready_s": round(ready, 2), **_phases(log_path.read_text())}


def _wait_ready(proc: subprocess.Popen, port: int, began: float, timeout_s: float) -> float:
    url = f"http://127.0.0.1:{port}/ready"
    while time.perf_counter() - began < timeout_s:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited with {proc.returncode} before it was ready")
        try:
            if httpx.get(url, timeout=1).status_code == 200:
                return time.perf_counter() - began
        except httpx.HTTPError:
            pass
        time.sleep(0.05)
    raise RuntimeError(f"the server was not ready within {timeout_s:.0f} s")


def _phases(log_text: str) -> dict:
    """The phases the server logged: {phase: seconds}, and how the model was loaded."""
    out: dict = {"phases": {}}
    for match in PHASE_LINE.finditer(log_text):
        for part in match.group("parts").split():
            name, _, value = part.partition("=")
            out["phases"][name] = float(value.rstrip("s"))
    model = MODEL_LINE.search(log_text)
    if model:
        out["model_from"] = model.group("how")
        out["phases"]["model_tokenizer"] = float(model.group("tok"))
        out["phases"]["model_weights"] = float(model.group("weights"))
    return out


def measure(env: Mapping[str, str], rounds: int = 3, log: Callable[[str], None] | None = None) -> dict:
    """First starts (a fresh data directory each) and warm starts (the directory the first start left), one of
    each per round; medians over rounds, and the phases of the median-timed start of each kind."""
    log = log or (lambda line: print(line, file=sys.stderr, flush=True))
    first, warm = [], []
    root = Path(tempfile.mkdtemp(prefix="shira-startup-"))
    try:
        for r in range(rounds):
            data_dir = root / f"round-{r}" / "data"
            data_dir.mkdir(parents=True)
            first.append(start_once(data_dir, env))
            warm.append(start_once(data_dir, env))
            log(f"round {r + 1}/{rounds}: first start {first[-1]['ready_s']} s, warm start {warm[-1]['ready_s']} s")
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return {
        "first_start_s": statistics.median(s["ready_s"] for s in first),
        "warm_start_s": statistics.median(s["ready_s"] for s in warm),
        "first_phases": _median_run(first)["phases"],
        "warm_phases": _median_run(warm)["phases"],
        "warm_model_from": _median_run(warm).get("model_from"),
        "rounds": rounds,
        "first_start_rounds_s": [s["ready_s"] for s in first],
        "warm_start_rounds_s": [s["ready_s"] for s in warm],
    }


def _median_run(runs: list[dict]) -> dict:
    return sorted(runs, key=lambda s: s["ready_s"])[len(runs) // 2]


def report(result: dict) -> str:
    """A table of the two kinds of start and their phases."""
    names = list(dict.fromkeys([*result["first_phases"], *result["warm_phases"]]))
    lines = [f"seconds to /ready, median of {result['rounds']} rounds (`make run`'s way: embedded registry)",
             f"{'':<22}{'first start':>12}{'warm start':>12}",
             f"{'total':<22}{result['first_start_s']:>12.2f}{result['warm_start_s']:>12.2f}"]
    for name in names:
        first, warm = result["first_phases"].get(name), result["warm_phases"].get(name)
        lines.append(f"  {name:<20}{_cell(first):>12}{_cell(warm):>12}")
    lines.append(f"warm start loads the model from its {result['warm_model_from']}")
    return "\n".join(lines)


def _cell(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"
