"""Smoke run of benchmarks/ecg_meta_step_bench.py at its --quick sizes, in a subprocess,
and its command line (the memory child is re-invoked with `size_argv`)."""

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from meta_step_checks import DEFAULT_HVP_MODE, check_timings, finite_positive

ROOT = Path(__file__).resolve().parents[2]

INFORMATIONAL_LINE = "No target is set for the ECG setting; these ratios are informational."


def _run_quick(tmp_path, *flags) -> tuple[subprocess.CompletedProcess, dict]:
    out = tmp_path / "bench.json"
    env = dict(os.environ, TF_USE_LEGACY_KERAS="1", TF_CPP_MIN_LOG_LEVEL="3")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "benchmarks.ecg_meta_step_bench",
            "--quick",
            *flags,
            "--json",
            str(out),
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc, json.loads(out.read_text())


def test_quick_run_reports_every_grid_cell(tmp_path):
    proc, data = _run_quick(tmp_path, "--no_memory")
    assert INFORMATIONAL_LINE in proc.stdout, proc.stdout[-3000:]
    assert not re.search(r"\b(PASS|FAIL)\b", proc.stdout), proc.stdout[-3000:]
    assert "pt_reference (P=10 PT steps)" in proc.stdout

    assert {"config", "environment", "reference", "cells", "target", "memory_method"} <= set(data)
    assert data["target"] is None  # no target for the ECG setting
    assert data["default_hvp_mode"] == DEFAULT_HVP_MODE
    assert data["memory_method"] is None  # --no_memory
    assert finite_positive(data["num_pt_params"]) and finite_positive(data["num_meta_params"])
    config = data["config"]
    assert config["pt_steps"] == 10
    # Every convolution keeps >= 16 channels (oneDNN's CPU 1-D convolutions break below).
    assert min(*config["channels"], config["warp_channels"]) >= 16
    check_timings(data)
    for c in data["cells"]:
        assert c["pt_peak_mib"] is None and c["memory_ratio"] is None, c["name"]


@pytest.mark.slow
def test_quick_run_measures_peak_memory_in_a_child(tmp_path):
    _, data = _run_quick(tmp_path)
    assert "child process" in data["memory_method"]
    check_timings(data)
    for c in data["cells"]:
        for key in ("pt_peak_mib", "meta_step_peak_mib", "memory_ratio"):
            assert finite_positive(c[key]), (c["name"], key, c[key])
        assert math.isclose(c["memory_ratio"], c["meta_step_peak_mib"] / c["pt_peak_mib"])


def test_command_line():
    from benchmarks import ecg_meta_step_bench as bench

    _, full = bench.parse_args([])
    assert full.channels == (32, 64, 128, 256) and full.blocks == (2, 2, 2, 2)
    assert (full.kernel_size, full.length) == (15, 1024)
    assert (full.projection_hidden, full.projection_out) == (256, 128)
    assert full.pt_steps == 10
    # The memory child gets the parent's sizes back from size_argv.
    _, quick = bench.parse_args(["--quick", "--pt_batch=12", "--channels=16,24"])
    _, again = bench.parse_args(bench.size_argv(quick) + ["--quick"])
    assert again == quick and quick.pt_batch == 12 and quick.channels == (16, 24)

    for bad in (["--channels=8,16"], ["--quick", "--warp_channels=8"], ["--blocks=2,2"]):
        with pytest.raises(SystemExit):
            bench.parse_args(bad)
