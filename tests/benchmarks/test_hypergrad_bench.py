"""Smoke run of benchmarks/hypergrad_bench.py at its --quick sizes, in a subprocess."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

EXPECTED_NAMES = {
    "pt_step[hypergrad.Adam]",
    "pt_step[tf_keras.Adam]",
    "gradient",
    "hvp[forward_over_reverse]",
    "hvp[reverse_over_reverse]",
    "meta_gradient[forward_over_reverse]",
    "meta_gradient[reverse_over_reverse]",
    "unroll",
    "implicit[forward_over_reverse]",
    "implicit[reverse_over_reverse]",
}


def _finite_positive(x) -> bool:
    return isinstance(x, int | float) and math.isfinite(x) and x > 0


def test_quick_run_writes_every_measurement(tmp_path):
    out = tmp_path / "bench.json"
    env = dict(os.environ, TF_USE_LEGACY_KERAS="1", TF_CPP_MIN_LOG_LEVEL="3")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "benchmarks.hypergrad_bench",
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
    assert "TARGET [graph] hvp/grad" in proc.stdout
    assert "TARGET [xla] meta/pt_step" in proc.stdout

    data = json.loads(out.read_text())
    rows = data["measurements"]
    seen = {(r["name"], r["mode"]) for r in rows}
    assert seen == {(n, m) for n in EXPECTED_NAMES for m in ("graph", "xla")}
    for r in rows:
        where = f"{r['name']} [{r['mode']}]"
        assert r["times_ms"], where
        assert all(_finite_positive(t) for t in r["times_ms"]), where
        for key in ("median_ms", "min_ms", "ratio_to_pt_step", "ratio_to_gradient"):
            assert _finite_positive(r[key]), (where, key, r[key])
        assert r["peak_rss_mib"] is None  # --no_memory

    assert set(data["pt_step_reference"]) == {"graph", "xla"}
    assert data["pt_step_reference"]["graph"] in EXPECTED_NAMES
    targets = {(t["mode"], t["target"].split(" ")[0]) for t in data["targets"]}
    assert targets == {(m, k) for m in ("graph", "xla") for k in ("hvp/grad", "meta/pt_step")}
    for t in data["targets"]:
        assert _finite_positive(t["value"]) and t["pass"] == (t["value"] <= t["limit"])
    assert set(data["breakdown"]) == {
        f"{m}|{h}"
        for m in ("graph", "xla")
        for h in ("forward_over_reverse", "reverse_over_reverse")
    }
