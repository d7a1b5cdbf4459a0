"""Smoke run of benchmarks/distribute_scaling_bench.py at its --quick sizes, in a subprocess
(it splits the CPU into 2 logical devices, which must happen before TensorFlow starts)."""

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
LOOPS = ("default", "mirrored x1", "mirrored x2")


def _finite_positive(x) -> bool:
    return isinstance(x, int | float) and math.isfinite(x) and x > 0


def test_quick_run_prints_and_writes_the_scaling_ratios(tmp_path):
    out = tmp_path / "scaling.json"
    env = dict(os.environ, TF_USE_LEGACY_KERAS="1", TF_CPP_MIN_LOG_LEVEL="3")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "benchmarks.distribute_scaling_bench",
            "--quick",
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

    printed = {}
    for step in ("meta_step", "pt_step"):
        match = re.search(
            rf"^RATIO {step} throughput 2 replicas / 1 device: (\d+\.\d+)$", proc.stdout, re.M
        )
        assert match, proc.stdout
        printed[step] = float(match.group(1))
        row = re.search(rf"^{step}\s+" + r"\s+".join([r"(\d+\.\d+)"] * 5) + "$", proc.stdout, re.M)
        assert row, proc.stdout  # three medians and two ratios, side by side
        medians = [float(x) for x in row.groups()[:3]]
        assert all(_finite_positive(x) for x in medians)
        # The x2 / default column is default / mirrored x2 (of the printed, rounded medians).
        assert abs(float(row.group(4)) - medians[0] / medians[2]) < 0.02

    data = json.loads(out.read_text())
    assert data["replicas"] == {"default": 1, "mirrored x1": 1, "mirrored x2": 2}
    assert data["ratios"].keys() == printed.keys()
    for row in data["rows"]:
        assert set(row["median_ms"]) == set(LOOPS)
        assert all(len(row["times_ms"][name]) == 3 for name in LOOPS)
        assert all(_finite_positive(t) for name in LOOPS for t in row["times_ms"][name])
        ratio = row["median_ms"]["default"] / row["median_ms"]["mirrored x2"]
        assert math.isclose(row["throughput_ratio_x2_vs_default"], ratio)
        assert round(ratio, 2) == printed[row["step"]]
