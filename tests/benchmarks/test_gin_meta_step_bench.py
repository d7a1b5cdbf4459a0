"""Smoke run of benchmarks/gin_meta_step_bench.py at its --quick sizes, in a subprocess."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

from meta_step_checks import DEFAULT_HVP_MODE, check_timings

ROOT = Path(__file__).resolve().parents[2]

TARGET_LINE = re.compile(
    r"^TARGET meta-step / 10 PT steps \(P=10, K=1, N=1, hvp=(\w+)\) <= 1\.6: "
    r"(\d+\.\d+) (PASS|FAIL)$",
    re.MULTILINE,
)


def test_quick_run_reports_every_grid_cell(tmp_path):
    out = tmp_path / "bench.json"
    env = dict(os.environ, TF_USE_LEGACY_KERAS="1", TF_CPP_MIN_LOG_LEVEL="3")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "benchmarks.gin_meta_step_bench",
            "--quick",
            "--no_memory",
            "--json",
            str(out),
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    match = TARGET_LINE.search(proc.stdout)
    assert match, proc.stdout[-3000:]
    assert match.group(1) == DEFAULT_HVP_MODE

    data = json.loads(out.read_text())
    assert {"config", "environment", "reference", "cells", "target", "memory_method"} <= set(data)
    assert data["default_hvp_mode"] == DEFAULT_HVP_MODE
    assert data["config"]["pt_steps"] == 10
    assert data["memory_method"] is None  # --no_memory

    check_timings(data)
    cells = data["cells"]
    for c in cells:
        assert c["pt_peak_mib"] is None and c["memory_ratio"] is None, c["name"]

    target = data["target"]
    cell = next(c for c in cells if (c["neumann_terms"], c["ft_unroll_steps"]) == (1, 1))
    assert target["value"] == cell["time_ratio"]
    assert target["limit"] == 1.6
    assert target["pass"] == (target["value"] <= 1.6)
    assert match.group(3) == ("PASS" if target["pass"] else "FAIL")
    assert match.group(2) == f"{target['value']:.2f}"
