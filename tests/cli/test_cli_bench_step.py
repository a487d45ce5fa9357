"""`shira bench step`: the Zipf row draw and one quick run of every variant on a small random model."""

from __future__ import annotations

import json
from collections import Counter

import pytest
from core.kernel_support import needs_kernel
from typer.testing import CliRunner

from shira_bench.step import zipf_rows
from shira_cli.main import app
from shira_core.batched import kernel as correction_kernel


def test_zipf_rows_repeat_for_a_seed_and_favour_the_first_sets():
    assert zipf_rows(8, 8, seed=3) == zipf_rows(8, 8, seed=3)
    counts = Counter(zipf_rows(4000, 4))
    assert counts[0] > counts[1] > counts[2] > counts[3] > 0
    assert abs(counts[0] / counts[1] - 2.0) < 0.3  # p(k) proportional to 1/(k+1)


def bench_step_report(*args: str) -> dict:
    result = CliRunner().invoke(app, ["bench", "step", "--model", "random", "--layers", "2", "--device", "cpu",
                                      "--json", *args])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout[result.stdout.index("{"):])


@needs_kernel
def test_bench_step_times_every_variant_and_hosts_the_most_common_set():
    report = bench_step_report("--steps", "3", "--repeats", "2")
    setup = report["setup"]
    assert len(setup["sets"]) == 8 and setup["corrected_layers"] == 2 * 7
    assert setup["host"] == Counter(setup["sets"]).most_common(1)[0][0]
    assert setup["native_kernel"]  # and the PyTorch products side by side
    assert set(report["ms_per_step"]) == {"base", "single", "mixed", "mixed-host", "mixed-torch", "mixed-host-torch"}
    assert all(len(v) == 2 and min(v) > 0 for v in report["ms_per_step_by_repeat"].values())
    assert report["vs_single"]["single"] == 1.0 and report["vs_single_by_repeat"]["single"] == [1.0, 1.0]
    assert len(report["vs_single_by_repeat"]["mixed"]) == 2


def test_bench_step_without_the_kernel_times_pytorchs_products_only(monkeypatch):
    monkeypatch.setattr(correction_kernel, "load", lambda: None)  # as where no C++ compiler can build it
    report = bench_step_report("--steps", "1", "--repeats", "1")
    assert not report["setup"]["native_kernel"] and report["setup"]["corrected_layers"] == 2 * 7
    assert set(report["ms_per_step"]) == {"base", "single", "mixed-torch", "mixed-host-torch"}
    assert all(len(v) == 1 and min(v) > 0 for v in report["ms_per_step_by_repeat"].values())


@pytest.mark.parametrize("args", [["step", "--model"], ["switch", "--model"], ["train", "--base"],
                                  ["serve", "--model"]])
def test_bench_commands_refuse_a_missing_model_in_one_line(tmp_path, args):
    result = CliRunner().invoke(app, ["bench", *args, str(tmp_path / "nope")])
    assert result.exit_code == 2
    assert "nope is neither a .gguf file nor a model directory" in result.output
    assert "Traceback" not in result.output


def test_bench_step_refuses_an_unknown_decode_path_in_one_line():
    result = CliRunner().invoke(app, ["bench", "step", "--model", "random", "--layers", "2", "--decode", "fast"])
    assert result.exit_code == 2
    assert "--decode must be native or torch, not 'fast'" in result.output
    assert "Traceback" not in result.output
