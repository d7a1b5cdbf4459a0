"""Running a checks script in a fresh TensorFlow process and reading its report, for tests.

Logical devices and collective ops must be set up before TensorFlow initialises,
which a pytest process has long done; the distribution tests therefore measure in
a subprocess that prints one JSON line after a marker.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]


def env(**extra) -> dict:
    """This process's environment for a TensorFlow child: legacy Keras, the repository
    on PYTHONPATH, no inherited TF_CONFIG; `extra` on top."""
    out = dict(os.environ, TF_USE_LEGACY_KERAS="1", TF_CPP_MIN_LOG_LEVEL="2")
    out.pop("TF_CONFIG", None)
    out.update(extra)
    out["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    return out


def run_report(script: Path, *args: str, marker: str, timeout: float) -> dict:
    """Runs `python script args...` from the repository root; returns the JSON after the
    last line of its stdout that starts with `marker` (failing the test otherwise)."""
    proc = subprocess.run(
        [sys.executable, str(script), *args],
        env=env(),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(marker)]
    assert lines, proc.stdout[-2000:] + proc.stderr[-2000:]
    return json.loads(lines[-1][len(marker) :])


def rel_error(a, b) -> float:
    """||a - b|| / ||b|| in float64."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))
