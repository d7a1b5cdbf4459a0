"""Running `trainers/run_benchmark.py` and loading its configs, for the benchmark tests."""

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import ml_collections

ROOT = Path(__file__).resolve().parents[2]


def env() -> dict:
    return dict(os.environ, TF_USE_LEGACY_KERAS="1", TF_CPP_MIN_LOG_LEVEL="3")


def python(*args: str, timeout: int) -> subprocess.CompletedProcess:
    """`python <args>` in a fresh process from ROOT, Keras 2 pinned, output captured."""
    return subprocess.run(
        [sys.executable, *args],
        cwd=ROOT,
        env=env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def run(config: str, workdir, *extra, timeout: int = 900) -> subprocess.CompletedProcess:
    """`python -m trainers.run_benchmark --config=<config> --workdir=<workdir> <extra>`."""
    return python(
        "-m",
        "trainers.run_benchmark",
        f"--config={config}",
        f"--workdir={workdir}",
        *extra,
        timeout=timeout,
    )


def load_config(path: str, variant: str | None) -> ml_collections.ConfigDict:
    """An unlocked copy of `get_config(variant)` of the config file `path` (from ROOT)."""
    spec = importlib.util.spec_from_file_location("benchmark_config", ROOT / path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return ml_collections.ConfigDict(module.get_config(variant).to_dict())
