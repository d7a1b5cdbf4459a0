"""Fine-tuning, evaluation and the ECG benchmark under tf.distribute, against one device.

MirroredStrategy over 2 logical CPUs runs in a subprocess
(`finetune_distribute_checks.py`): logical devices must be set up before
TensorFlow initialises, which this pytest process has long done. Fine-tuning is
compared in float64 with the same call without a strategy, on sizes that do not
split evenly over the replicas (padded batches, a partial last batch).
"""

import os
from pathlib import Path

import benchmark_binary  # same directory (pytest puts it on sys.path)
import numpy as np
import pytest
import subprocess_checks  # same directory

from metapt_tf.training import ecg_benchmark, finetune

HERE = Path(__file__).resolve().parent
CHECKS = HERE / "finetune_distribute_checks.py"
MARKER = "FINETUNE_DISTRIBUTE_CHECK "


_rel = subprocess_checks.rel_error


@pytest.fixture(scope="module")
def checks(tmp_path_factory):
    """Everything measured on 2 logical CPUs, in one subprocess (about a minute)."""
    workdir = str(tmp_path_factory.mktemp("ecg_mirrored"))
    out = subprocess_checks.run_report(CHECKS, workdir, marker=MARKER, timeout=600)
    assert out["logical_cpus"] == 2
    return out


@pytest.mark.parametrize("mode", finetune.MODES)
def test_single_label_finetuning_under_mirrored_equals_single_device(checks, mode):
    got = checks["single_label"]
    single, mirrored = got[f"{mode}|single"], got[f"{mode}|mirrored"]
    assert single["dtype"] == mirrored["dtype"] == "float64"
    assert _rel(mirrored["weights"], single["weights"]) < 1e-6
    frozen = _rel(single["backbone"], got["initial"])
    assert frozen == 0.0 if mode == "linear" else frozen > 1e-3
    for key in ("test_loss", "test_accuracy", "train_accuracy"):
        assert mirrored[key] == pytest.approx(single[key], rel=1e-6), key
    assert 0.0 < single["test_accuracy"] < 1.0  # a count of 41 examples, not trivially 0 or 1


@pytest.mark.parametrize("mode", finetune.MODES)
def test_multilabel_finetuning_under_mirrored_equals_single_device(checks, mode):
    got = checks["multilabel"]
    single, mirrored = got[f"{mode}|single"], got[f"{mode}|mirrored"]
    frozen = _rel(single["backbone"], got["initial"])
    assert frozen == 0.0 if mode == "linear" else frozen > 1e-3
    assert _rel(mirrored["weights"], single["weights"]) < 1e-6
    # The predictions of every test example (37 = 16 + 16 + 5), reassembled in order.
    assert np.shape(mirrored["scores"]) == (37, 3)
    assert _rel(mirrored["scores"], single["scores"]) < 1e-6
    np.testing.assert_allclose(mirrored["per_task_auc"], single["per_task_auc"], rtol=1e-6)
    assert mirrored["final_train_loss"] == pytest.approx(single["final_train_loss"], rel=1e-6)


def test_multilabel_finetuning_under_mirrored_names_batches_it_cannot_split(checks):
    message = checks["multilabel"]["ragged_error"]
    assert message is not None and "train_data must yield a nest of dense tensors" in message
    assert "RaggedTensorSpec" in message


def test_global_nt_xent_under_mirrored_equals_single_device(checks):
    got = checks["nt_xent"]
    single, mirrored = got["single"], got["mirrored"]
    # Each replica's loss is 1/2 of the global loss: their sum is the one-device loss.
    assert mirrored["loss"] == pytest.approx(single["loss"], rel=1e-12)
    assert single["local_loss"] == pytest.approx(single["loss"], rel=1e-12)
    # Without the gather, the sum of the two shards' losses is another number.
    assert abs(mirrored["local_loss"] - single["loss"]) > 1e-2 * abs(single["loss"])
    for key in ("grad", "mixed", "reverse_over_reverse"):
        assert np.linalg.norm(single[key]) > 1e-3, key
        assert _rel(mirrored[key], single[key]) < 1e-10, key
    # Forward-mode JVPs do not pass through the all-gather: that HVP is wrong, which
    # is why the ECG benchmark refuses hvp_mode='forward_over_reverse' under the strategy.
    assert _rel(single["forward_over_reverse"], single["reverse_over_reverse"]) < 1e-10
    assert _rel(mirrored["forward_over_reverse"], single["forward_over_reverse"]) > 1e-2


def test_ecg_benchmark_runs_under_mirrored(checks):
    run = checks["ecg_run"]
    assert run["strategy_is_mirrored"]
    assert run["meta_steps"] == run["expected_meta_steps"]
    assert set(run["test_auc"]) == {"full"}
    assert 0.0 <= run["test_auc"]["full"] <= 1.0
    assert np.isfinite(run["warp_scale"])
    assert run["export"] and os.path.exists(os.path.join(run["export"], "saved_model.pb"))


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("meta.mixed_precision", "mixed_bfloat16", "config.meta.mixed_precision must be 'none'"),
        ("meta.hvp_mode", "forward_over_reverse", "'reverse_over_reverse' under meta.distribute"),
        ("data.pt_batch_size", 9, "a multiple of the 2 config.meta.devices"),
    ],
)
def test_ecg_config_under_a_strategy_is_checked(field, value, message):
    config = benchmark_binary.load_config("configs/ecg_simclr.py", "smoke")
    config.meta.distribute, config.meta.devices = "mirrored", "/cpu:0,/cpu:1"
    ecg_benchmark.validate_config(config)  # mirrored itself is accepted
    section, name = field.split(".")
    config[section][name] = value
    with pytest.raises(ValueError, match=message):
        ecg_benchmark.validate_config(config)
