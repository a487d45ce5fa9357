"""`shira bench startup`: real `shira serve` starts, timed to /ready, with the phases the server logs."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from shira_bench.startup import _phases, report

LOG = """\
2026-12-07 14:22:33,303 INFO shira.service: registry: redis://127.0.0.1:46575/0 (namespace 'shira') [embedded]
2026-12-07 14:22:42,147 INFO shira_core.models: base model m from its converted copy: tokenizer 0.2 s, weights 0.4 s
2026-12-07 14:22:45,057 INFO shira.startup: startup phases (engine): model=0.71s fingerprint=0.05s switcher=0.10s
2026-12-07 14:22:45,071 INFO shira.startup: startup phases (app): registry=0.20s engine_import=1.50s engine_start=1.90s
"""


def test_the_phases_come_from_the_servers_own_log_lines():
    found = _phases(LOG)
    assert found["model_from"] == "converted copy"
    assert found["phases"] == {"model": 0.71, "fingerprint": 0.05, "switcher": 0.1, "registry": 0.2,
                               "engine_import": 1.5, "engine_start": 1.9, "model_tokenizer": 0.2, "model_weights": 0.4}
    text = report({"rounds": 1, "first_start_s": 30.0, "warm_start_s": 4.0, "first_phases": found["phases"],
                   "warm_phases": found["phases"], "warm_model_from": "converted copy"})
    assert "30.00" in text and "4.00" in text and "engine_start" in text


def test_bench_startup_starts_real_servers_and_reports_both_kinds(tmp_path, tiny_llama, tokenizer):
    """A tiny model saved as a checkpoint directory keeps this quick; the bench runs as the CLI runs it."""
    model_dir = tmp_path / "tiny"
    tiny_llama(vocab=len(tokenizer)).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    env = {**os.environ, "SHIRA_BASE_MODEL": str(model_dir), "SHIRA_MIXED_BATCHES": "false"}
    done = subprocess.run([sys.executable, "-m", "shira_cli.main", "bench", "startup", "--rounds", "1", "--json"],
                          env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout)
    assert result["warm_start_s"] > 0 and result["first_start_s"] > 0
    assert result["warm_model_from"] == "checkpoint"  # a checkpoint directory needs no converted copy
    for phases in (result["first_phases"], result["warm_phases"]):
        assert {"registry", "model", "fingerprint", "switcher", "worker", "engine_start"} <= set(phases)
        assert all(seconds >= 0 for seconds in phases.values())
        assert phases["engine_start"] <= result["warm_start_s"] + result["first_start_s"]
