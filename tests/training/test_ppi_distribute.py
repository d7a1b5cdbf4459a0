"""The PPI benchmark's GIN under tf.distribute and on the TPU-style compiled path.

MirroredStrategy over 2 logical CPUs runs in a subprocess (`distribute_checks.py
gin`: logical devices must be set before TensorFlow initialises). There, in
float64: two PT steps and one meta-gradient on padded graph batches cut into one
block per replica, against the single-device loop on the same unpadded global
batches (the oracle), with one FT head and with cross-fitted heads; the same on
one device with padded batches and the meta-step compiled with XLA
(`jit_compile=True`, what a TPU program needs);
multi-label fine-tuning and evaluation, and CoTrain steps with and without
PCGrad, on FT batches that do not split evenly over the replicas (uneven and
empty padded blocks), against one device on the unpadded batches; and the
benchmark's smoke variant (meta-PT and CoTrain + PCGrad, each fine-tuned) with
meta.distribute='mirrored'. No TPU exists here: "tpu" is checked for its error.
"""

from pathlib import Path

import benchmark_binary  # same directory (pytest puts it on sys.path)
import numpy as np
import pytest
import subprocess_checks  # same directory

from metapt_tf.training import distribute, online, ppi_benchmark

HERE = Path(__file__).resolve().parent
CHECKS = HERE / "distribute_checks.py"
MARKER = "DISTRIBUTE_CHECK "


_rel = subprocess_checks.rel_error


def _experiment_config(name: str):
    return benchmark_binary.load_config(f"configs/{name}.py", None)


@pytest.fixture(scope="module")
def gin():
    return subprocess_checks.run_report(CHECKS, "gin", marker=MARKER, timeout=600)


def test_gin_meta_gradient_under_mirrored_equals_single_device(gin):
    assert gin["logical_cpus"] == 2
    single = gin["meta_gradient"]["default"]
    dist = gin["meta_gradient"]["mirrored"]
    assert single["dtype"] == dist["dtype"] == "float64"
    assert np.linalg.norm(single["meta_grads"]) > 1e-3  # a non-trivial target
    assert single["codes"] == dist["codes"] == [0, 0]
    # Each replica's loss is its block's real-graph loss over the global count, and
    # the batch norms see the global batch's real nodes: float64 summation order only.
    assert _rel(dist["pt_losses"], single["pt_losses"]) < 1e-12
    assert _rel(dist["theta"], single["theta"]) < 1e-10
    assert _rel(dist["meta_grads"], single["meta_grads"]) < 1e-6
    assert abs(dist["ft_val_loss"] - single["ft_val_loss"]) < 1e-10


def test_gin_cross_fitted_meta_gradient_under_mirrored_equals_single_device(gin):
    single = gin["meta_gradient"]["default_cross_fit"]
    dist = gin["meta_gradient"]["mirrored_cross_fit"]
    one_head = gin["meta_gradient"]["default"]
    assert single["theta"] == one_head["theta"]  # the same PT; the heads differ
    assert _rel(single["meta_grads"], one_head["meta_grads"]) > 1e-3
    assert _rel(dist["theta"], single["theta"]) < 1e-10
    assert _rel(dist["meta_grads"], single["meta_grads"]) < 1e-6
    assert abs(dist["ft_val_loss"] - single["ft_val_loss"]) < 1e-10


def test_gin_meta_step_on_padded_graphs_compiles_with_xla(gin):
    single = gin["meta_gradient"]["default"]
    xla = gin["meta_gradient"]["xla"]
    assert _rel(xla["pt_losses"], single["pt_losses"]) < 1e-12
    assert _rel(xla["meta_grads"], single["meta_grads"]) < 1e-6
    assert abs(xla["ft_val_loss"] - single["ft_val_loss"]) < 1e-10


@pytest.mark.parametrize("mode", ["full", "linear"])
def test_graph_finetuning_under_mirrored_equals_single_device(gin, mode):
    single = gin["finetune"][f"{mode}|default"]
    dist = gin["finetune"][f"{mode}|mirrored"]
    assert single["dtype"] == dist["dtype"] == "float64"
    assert dist["in_scope"]  # the classifier's variables are the strategy's
    frozen = _rel(single["backbone"], single["initial"])
    assert frozen == 0.0 if mode == "linear" else frozen > 1e-3
    # Each replica's loss is its block's real-graph sum over the global batch's count,
    # and the batch norms see the global batch's real nodes: summation order only.
    assert _rel(dist["weights"], single["weights"]) < 1e-6
    # Every test graph's prediction (11 = 4 + 4 + 3), reassembled in order.
    assert np.shape(dist["scores"]) == (11, 3) and dist["labels"] == single["labels"]
    assert _rel(dist["scores"], single["scores"]) < 1e-6
    np.testing.assert_allclose(dist["per_task_auc"], single["per_task_auc"], rtol=1e-6)
    assert dist["test_auc"] == pytest.approx(single["test_auc"], rel=1e-6)
    assert dist["final_train_loss"] == pytest.approx(single["final_train_loss"], rel=1e-6)


@pytest.mark.parametrize("pcgrad", [False, True])
def test_cotrain_steps_under_mirrored_equal_single_device(gin, pcgrad):
    single = gin["cotrain"][f"{pcgrad}|default"]
    dist = gin["cotrain"][f"{pcgrad}|mirrored"]
    assert single["dtype"] == dist["dtype"] == "float64"
    assert _rel(single["shared"], single["initial"]) > 1e-3  # the steps moved the backbone
    # PCGrad projects the global per-task gradients: a step where they conflict.
    assert single["conflicts"] == dist["conflicts"] >= 1
    assert _rel(dist["shared"], single["shared"]) < 1e-6
    assert _rel(dist["heads"], single["heads"]) < 1e-6
    for key in ("pt_loss", "ft_loss"):
        np.testing.assert_allclose(dist[key], single[key], rtol=1e-6)


def test_pcgrad_changes_the_cotrain_steps(gin):
    # So the PCGrad comparison above tests a projection, not a plain sum.
    plain, projected = gin["cotrain"]["False|default"], gin["cotrain"]["True|default"]
    assert _rel(projected["shared"], plain["shared"]) > 1e-6


def test_ppi_smoke_runs_mirrored(gin):
    smoke = gin["ppi_smoke"]
    assert smoke["methods"] == ["cotrain_pcgrad", "meta_pt"]
    assert smoke["meta_steps"] == 2 and smoke["skipped_meta_steps"] == 0
    weights = np.asarray(smoke["task_weights"])
    assert np.all(np.isfinite(weights)) and np.abs(weights - 1.0).max() > 1e-3  # phi moved
    for method in smoke["methods"]:
        assert 0.0 <= smoke["test_auc"][method] <= 1.0
    # CoTrain and both fine-tunings ran under the strategy, on padded blocks.
    assert [c["what"] for c in smoke["calls"]] == ["cotrain", "finetune", "finetune"]
    for call in smoke["calls"]:
        assert call["strategy"] == "mirrored" and call["in_scope"], call
        assert call["mask_key"] == "graph_mask", call


def test_tpu_without_a_tpu_is_a_clear_error():
    c = online.default_config()
    c.distribute = "tpu"
    online.validate_config(c)  # a valid choice; "devices" may name the TPU
    c.devices = "my-tpu"
    online.validate_config(c)
    c.devices = ""
    with pytest.raises(ValueError) as error:
        distribute.make_strategy(c)
    message = str(error.value)
    assert "config.meta.distribute='tpu' needs a reachable TPU" in message
    assert "Received: config.meta.devices=''" in message and "no TPU could be reached" in message


def test_ppi_config_checks_for_strategies():
    c = _experiment_config("ppi_multitask")
    c.meta.distribute, c.meta.devices = "mirrored", "/cpu:0,/cpu:1"
    # The default's AmortizedNeumann takes a fixed alpha under a strategy.
    with pytest.raises(ValueError, match=r"config.meta.neumann_alpha must be a number with "):
        ppi_benchmark.validate_config(c)
    del c.meta.neumann_alpha  # a copy of the config: the field lost its "number or auto" type
    c.meta.neumann_alpha = 1e-3
    ppi_benchmark.validate_config(c)  # runs
    c.meta.hvp_mode = "forward_over_reverse"
    with pytest.raises(ValueError, match=r"config.meta.hvp_mode must be 'reverse_over_reverse'"):
        ppi_benchmark.validate_config(c)
    c = _experiment_config("ppi_multitask")
    c.meta.distribute, c.meta.devices = "mirrored", "/cpu:0,/cpu:1,/cpu:2"
    del c.meta.neumann_alpha
    c.meta.neumann_alpha = 1e-3
    with pytest.raises(ValueError, match=r"data.pt_batch_size must be a multiple of the 3 config"):
        ppi_benchmark.validate_config(c)
    c = _experiment_config("ppi_multitask")
    c.meta.distribute = "tpu"
    del c.meta.neumann_alpha
    c.meta.neumann_alpha = 1e-3
    with pytest.raises(ValueError, match=r"config.meta.distribute must be one of \('default'"):
        ppi_benchmark.validate_config(c)
