"""Smoke run of benchmarks/gin_meta_step_bench.py at its --quick sizes, in a subprocess."""

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

DEFAULT_HVP_MODE = "reverse_over_reverse"  # metapt_tf.hypergrad.DEFAULT_HVP_MODE
GRID = {(n, k) for n in (1, 5) for k in (1, 5)}
CELL_KEYS = {
    "name",
    "neumann_terms",
    "ft_unroll_steps",
    "hvp_mode",
    "median_ms",
    "times_ms",
    "pt_part_median_ms",
    "meta_gradient_median_ms",
    "time_ratio",
    "meta_gradient_in_pt_steps",
    "pt_peak_mib",
    "meta_step_peak_mib",
    "memory_ratio",
    "skipped_meta_steps",
}
TARGET_LINE = re.compile(
    r"^TARGET meta-step / 10 PT steps \(P=10, K=1, N=1, hvp=(\w+)\) <= 1\.6: "
    r"(\d+\.\d+) (PASS|FAIL)$",
    re.MULTILINE,
)


def _finite_positive(x) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x) and x > 0


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

    reference = data["reference"]
    assert reference["pt_steps"] == 10
    assert len(reference["times_ms"]) == data["config"]["repeats"]
    assert all(_finite_positive(t) for t in reference["times_ms"])
    assert _finite_positive(reference["median_ms"])
    assert math.isclose(reference["pt_step_ms"], reference["median_ms"] / 10)

    cells = data["cells"]
    assert {(c["neumann_terms"], c["ft_unroll_steps"]) for c in cells} == GRID
    assert len(cells) == len(GRID)
    for c in cells:
        where = c["name"]
        assert set(c) == CELL_KEYS, where
        assert c["hvp_mode"] == DEFAULT_HVP_MODE, where
        assert len(c["times_ms"]) == data["config"]["repeats"], where
        assert all(_finite_positive(t) for t in c["times_ms"]), where
        for key in (
            "median_ms",
            "pt_part_median_ms",
            "meta_gradient_median_ms",
            "time_ratio",
            "meta_gradient_in_pt_steps",
        ):
            assert _finite_positive(c[key]), (where, key, c[key])
        assert math.isclose(c["time_ratio"], c["median_ms"] / reference["median_ms"]), where
        assert c["pt_peak_mib"] is None and c["memory_ratio"] is None, where
        assert c["skipped_meta_steps"] == 0, where

    target = data["target"]
    cell = next(c for c in cells if (c["neumann_terms"], c["ft_unroll_steps"]) == (1, 1))
    assert target["value"] == cell["time_ratio"]
    assert target["limit"] == 1.6
    assert target["pass"] == (target["value"] <= 1.6)
    assert match.group(3) == ("PASS" if target["pass"] else "FAIL")
    assert match.group(2) == f"{target['value']:.2f}"
