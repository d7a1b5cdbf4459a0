"""The per-example weighting demo: the library run, its AUROC, and the absl binary."""

import os
import pathlib
import re
import subprocess
import sys

import numpy as np
import pytest

from configs import hypergrad_demo
from metapt_tf.training import example_weighting_demo, reporting

ROOT = pathlib.Path(__file__).resolve().parents[2]


def _run_binary(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, TF_USE_LEGACY_KERAS="1", TF_CPP_MIN_LOG_LEVEL="3")
    return subprocess.run(
        [sys.executable, "-m", "trainers.hypergrad_demo", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_corrupted_examples_are_down_weighted(tmp_path):
    config = hypergrad_demo.get_config()
    config.num_meta_steps = 40
    lines = []
    result = example_weighting_demo.run(config, workdir=str(tmp_path), log=lines.append)

    assert result.weight_history.shape == (41, config.num_pt_examples)
    np.testing.assert_allclose(result.weight_history[0], 1.0)
    assert result.corrupted.sum() == round(config.corrupt_fraction * config.num_pt_examples)
    assert result.mean_weight_corrupted < 0.5 * result.mean_weight_clean
    assert result.mean_weight_corrupted < 1.0 < result.mean_weight_clean
    assert result.auroc >= 0.9
    assert result.ft_val_loss_end < 0.5 * result.ft_val_loss_start
    assert len(lines) == 40 and lines[-1].startswith("meta-step 40/40")
    assert any(p.name.startswith("events.out.tfevents") for p in tmp_path.iterdir())


def test_weight_auroc_is_rank_based():
    positive = np.array([True, True, False, False])
    assert reporting.auroc([4.0, 3.0, 2.0, 1.0], positive) == 1.0
    assert reporting.auroc([1.0, 2.0, 3.0, 4.0], positive) == 0.0
    # One positive ties with one negative: that pair counts one half.
    assert reporting.auroc([3.0, 2.0, 2.0, 1.0], positive) == 0.875
    with pytest.raises(ValueError, match="both classes"):
        reporting.auroc([1.0, 2.0], [True, True])


def test_bad_config_value_is_named():
    config = hypergrad_demo.get_config()
    config.solver = "lbfgs"
    with pytest.raises(ValueError, match=r"config\.solver .*'lbfgs'"):
        example_weighting_demo.run(config, log=None)


def test_binary_prints_results_table(tmp_path):
    proc = _run_binary("--config.num_meta_steps=10", f"--workdir={tmp_path}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "meta-step 10/10" in proc.stdout
    for row in ("AUROC of the weights", "mean weight, clean", "FT val loss, last meta-step"):
        assert re.search(rf"^\| {re.escape(row)}.* \| +[0-9.]+ \|$", proc.stdout, re.M), row
    assert f"TensorBoard logs: {tmp_path}" in proc.stdout


def test_binary_rejects_unknown_config_field():
    proc = _run_binary("--config.bogus=1", "--workdir=")
    assert proc.returncode != 0
    assert "bogus" in proc.stderr
