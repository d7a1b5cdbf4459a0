"""The online loop under tf.distribute, against the single-device loop as the oracle.

MirroredStrategy over 2 logical CPUs and MultiWorkerMirroredStrategy over 2
worker processes on 127.0.0.1 run in subprocesses (`distribute_checks.py`):
logical devices and collective ops must be set up before TensorFlow initialises,
which this pytest process has long done. Every comparison is in float64 against
the same computation on one device.
"""

import hashlib
import importlib.util
import json
import re
import sys
from pathlib import Path

import ml_collections
import multi_worker  # same directory (pytest puts it on sys.path)
import numpy as np
import pytest
import subprocess_checks  # same directory
import tensorflow as tf

from metapt_tf.training import distribute, mnist_experiments, online, ppi_benchmark

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
CHECKS = HERE / "distribute_checks.py"
MARKER = "DISTRIBUTE_CHECK "
CASES = [
    "forward_over_reverse|neumann",
    "reverse_over_reverse|neumann",
    "reverse_over_reverse|cg",
    "forward_over_reverse|amortized_neumann",
]


_env = subprocess_checks.env
_rel = subprocess_checks.rel_error


@pytest.fixture(scope="module")
def mirrored():
    """Everything measured on 2 logical CPUs, in one subprocess (about a minute)."""
    return subprocess_checks.run_report(CHECKS, "mirrored", marker=MARKER, timeout=300)


def test_each_replica_gets_its_contiguous_half_of_the_global_batch(mirrored):
    assert mirrored["logical_cpus"] == 2
    assert mirrored["shards"] == [list(range(8)), list(range(8, 16))]
    for case in CASES:
        got = mirrored[f"meta_gradient|{case}"]
        assert got["default"]["pt_batch_sizes"] == [16]
        assert got["mirrored"]["pt_batch_sizes"] == [8]  # every traced PT loss saw 8 rows


@pytest.mark.parametrize("case", CASES)
def test_meta_gradient_under_mirrored_equals_single_device(mirrored, case):
    single = mirrored[f"meta_gradient|{case}"]["default"]
    dist = mirrored[f"meta_gradient|{case}"]["mirrored"]
    assert np.linalg.norm(single["meta_grads"]) > 1e-4  # a non-trivial target
    # Three PT steps (gradients all-reduced), then one meta-gradient (HVPs and the
    # mixed term all-reduced) and its update; twice for AmortizedNeumann, whose
    # iterate and power-iteration vector must stay equal on both replicas.
    assert _rel(dist["pt_losses"], single["pt_losses"]) < 1e-12
    assert _rel(dist["theta"], single["theta"]) < 1e-12
    assert _rel(dist["meta_grads"], single["meta_grads"]) < 1e-6
    assert abs(dist["ft_val_loss"] - single["ft_val_loss"]) < 1e-12
    assert _rel(dist["phi"], single["phi"]) < 1e-6
    assert dist["replica_spread"] == 0.0  # theta, phi and the head equal on both replicas


def test_meta_pt_run_under_mirrored_matches_single_device(mirrored):
    # The problem's pt_batch_fn draws input noise from a generator in checkpoint_extras:
    # applied once to the global batch, so both runs see the same draws.
    single, dist = mirrored["run"]["default"], mirrored["run"]["mirrored"]
    assert dist["meta_steps"] == single["meta_steps"] == 6
    assert dist["skipped_meta_steps"] == 0
    assert np.linalg.norm(single["phi"]) > 0.1  # phi moved
    assert _rel(dist["phi"], single["phi"]) < 1e-6
    np.testing.assert_allclose(dist["ft_val_loss"], single["ft_val_loss"], rtol=1e-9)
    assert dist["replica_spread"] == 0.0


def test_mixed_precision_keeps_the_meta_gradient_in_float32_and_close(mirrored):
    # One meta-gradient under MirroredStrategy with 16-bit compute, against float32.
    grads = mirrored["meta_gradient|mixed"]
    reference = grads["none"]["meta_grads"]
    assert _rel(grads["mixed_bfloat16"]["meta_grads"], reference) < 0.05
    assert _rel(grads["mixed_float16"]["meta_grads"], reference) < 0.01
    for precision in ("mixed_bfloat16", "mixed_float16"):
        assert np.all(np.isfinite(grads[precision]["meta_grads"]))
        assert grads[precision]["replica_spread"] == 0.0
    for key, compute in (("run_bfloat16", "bfloat16"), ("run_float16", "float16")):
        run = mirrored[key]
        assert run["compute_dtype"] == compute and run["phi_dtype"] == "float32"
        assert run["meta_steps"] == 6 and run["skipped_meta_steps"] == 0
        assert np.all(np.isfinite(run["phi"])) and np.linalg.norm(run["phi"]) > 0.1
        assert np.all(np.isfinite(run["ft_val_loss"] + run["meta_grad_norm"]))


def test_mnist_binary_runs_mirrored_in_mixed_bfloat16(mirrored):
    run = mirrored["mnist_binary"]
    assert run["meta_steps"] == 3
    assert run["phi_finite"] and run["phi_moved"] > 0
    assert 0.0 <= run["accuracy"] <= 1.0


def test_xla_compiled_meta_step(mirrored):
    # On one device the per-replica meta-step compiles with XLA and gives the same run.
    assert _rel(mirrored["run_jit"]["phi"], mirrored["run"]["default"]["phi"]) < 1e-6
    # Across CPU replicas TensorFlow cannot compile the all-reduces: a clear refusal.
    assert (
        "jit_compile=True under a mirrored strategy needs GPU replicas"
        in (mirrored["jit_mirrored_error"])
    )


def test_problem_built_outside_the_strategy_scope_is_refused(mirrored):
    message = mirrored["wrong_scope_error"]
    assert "was not created under the strategy's scope (mirrored)" in message
    assert "distribute.scope(strategy" in message


def _run_workers(tmp_path: Path, workdir: Path, launch: str, **env) -> list[dict]:
    """Two MultiWorkerMirrored workers on 127.0.0.1; their reports (killed after 240 s)."""
    reports = [tmp_path / f"{launch}_worker{i}.json" for i in range(2)]
    procs = multi_worker.run_workers(
        [[sys.executable, str(CHECKS), "worker", str(report)] for report in reports],
        [
            _env(TF_CONFIG=tf_config, METAPT_WORKDIR=str(workdir), **env)
            for tf_config in multi_worker.tf_configs(2)
        ],
        cwd=ROOT,
        timeout=240,
        what=launch,
    )
    for i, p in enumerate(procs):
        assert p.returncode == 0, f"{launch}, worker {i}:\n{p.stderr[-4000:]}"
    return [json.loads(r.read_text()) for r in reports]


def test_two_workers_on_loopback_resume_and_end_with_the_same_phi(tmp_path):
    workdir = tmp_path / "run"
    # Stopped after 3 of 6 meta-steps, then resumed by two fresh worker processes.
    first = _run_workers(tmp_path, workdir, "first", METAPT_STOP_AFTER="3")
    assert [r["meta_steps"] for r in first] == [3, 3]
    np.testing.assert_array_equal(first[0]["phi"], first[1]["phi"])
    chief, other = _run_workers(tmp_path, workdir, "resumed")
    assert chief["chief"] and not other["chief"]
    assert chief["num_replicas"] == other["num_replicas"] == 2
    # Both resumed from the chief's checkpoint (the other worker's own went to a
    # temporary directory), noise generator of pt_batch_fn included, and ran to the end.
    assert chief["resumed_from"] == other["resumed_from"] == 3
    assert chief["meta_steps"] == other["meta_steps"] == 6
    np.testing.assert_array_equal(chief["phi"], other["phi"])
    # Each worker reads the global batch and keeps its half: the single-device run.
    assert np.linalg.norm(chief["single_device_phi"]) > 0.1
    assert _rel(chief["phi"], chief["single_device_phi"]) < 1e-6
    assert tf.train.latest_checkpoint(str(workdir / "checkpoints")).endswith("ckpt-16")
    assert (workdir / "history.json").exists()
    assert sorted(p.name for p in workdir.iterdir() if p.is_dir()) == ["checkpoints"]


MNIST_TINY = [
    "--config.seeds=(0,)",
    "--config.ground_truth_weights=False",  # meta-PT and the baseline only
    "--config.data.num_pt=200",
    "--config.data.num_ft_train=40",
    "--config.data.num_ft_val=40",
    "--config.data.num_ft_test=200",
    "--config.data.pt_batch_size=32",
    "--config.data.meta_pt_batch_size=64",
    "--config.data.ft_batch_size=20",
    "--config.model.architecture=mlp",
    "--config.model.hidden_units=(16,)",
    "--config.meta.warmup_steps=4",
    "--config.meta.num_meta_steps=4",
    "--config.meta.pt_steps_per_meta_step=2",
    "--config.meta.log_every=2",
    "--config.meta.checkpoint_every=2",
    "--config.finetune.epochs=2",
]


def _binary_on_two_workers(command: list[str], launch: str) -> list[str]:
    """`command` on 2 workers of one multi_worker_mirrored cluster on 127.0.0.1; both must
    exit 0. Returns their stdouts (the chief's first)."""
    procs = multi_worker.run_workers(
        [command, command],
        [_env(TF_CONFIG=c) for c in multi_worker.tf_configs(2)],
        cwd=ROOT,
        timeout=240,
        what=launch,
    )
    for i, p in enumerate(procs):
        assert p.returncode == 0, f"{launch}, worker {i}:\n{p.stderr[-4000:]}"
    return [p.stdout for p in procs]


def _mnist_binary_on_two_workers(workdir: Path, launch: str) -> list[str]:
    """`trainers.meta_pretrain` under multi_worker_mirrored on 2 workers; their stdouts."""
    command = [
        sys.executable,
        "-m",
        "trainers.meta_pretrain",
        "--config=configs/mnist_noisy_labels.py",
        f"--workdir={workdir}",
        "--config.meta.distribute=multi_worker_mirrored",
        *MNIST_TINY,
    ]
    return _binary_on_two_workers(command, launch)


def _logged(stdout: str, pattern: str) -> list[str]:
    return re.findall(pattern, stdout, flags=re.MULTILINE)


def test_mnist_binary_on_two_workers_chief_writes_and_workers_agree(tmp_path):
    workdir = tmp_path / "run"
    chief, other = _mnist_binary_on_two_workers(workdir, "mnist")
    finetuned = r"^\[seed 0\] (\w+): FT test accuracy ([\d.]+), loss ([\d.]+)$"
    digest = r"^\[seed 0\] meta_pt: phi sha256 ([0-9a-f]{64})$"
    # The same fine-tuning results (meta-PT and baseline) and the same phi on both.
    assert len(_logged(chief, finetuned)) == 2
    assert _logged(other, finetuned) == _logged(chief, finetuned)
    assert len(_logged(chief, digest)) == 1 and _logged(other, digest) == _logged(chief, digest)

    # Only the chief wrote results, figures, phi.npy and the export.
    assert "Results:" in chief and "Results:" not in other
    assert "This is worker 1, not the chief: the chief writes the results, figures and " in other
    results = json.loads((workdir / "results.json").read_text())
    entry = results["per_seed"][0]["meta_pt"]
    phi = np.load(workdir / "seed_0" / "meta_pt" / "phi.npy")
    assert entry["phi_sha256"] == hashlib.sha256(phi.tobytes()).hexdigest()
    assert entry["phi_sha256"] == _logged(other, digest)[0]
    accuracies = dict((m, float(a)) for m, a, _ in _logged(other, finetuned))
    for method in ("meta_pt", "baseline_pt"):
        assert f"{results['per_seed'][0][method]['ft_test_accuracy']:.4f}" == (
            f"{accuracies[method]:.4f}"
        )
    assert results["export"] == str(workdir / "export" / "1")
    assert (workdir / "export" / "1" / "saved_model.pb").is_file()
    assert sorted(p.name for p in (workdir / "export").iterdir()) == ["1"]  # one writer
    assert sorted(p.name for p in workdir.iterdir()) == [
        "export",
        "ft_val_loss.png",
        "results.json",
        "results.md",
        "seed_0",
        "weights.png",
    ]

    # Run again in the same workdir: both workers resume from the chief's final
    # checkpoints, fine-tune alike, and the chief exports a second version.
    chief2, other2 = _mnist_binary_on_two_workers(workdir, "mnist again")
    for out in (chief2, other2):
        assert out.count("Resuming from") == 2  # meta-PT and the baseline
        assert _logged(out, digest) == _logged(chief, digest)
        assert _logged(out, finetuned) == _logged(chief, finetuned)
    assert sorted(p.name for p in (workdir / "export").iterdir()) == ["1", "2"]


def test_config_fields_and_strategy_mismatches_are_named(monkeypatch):
    c = online.default_config()
    c.distribute = "parameter_server"
    with pytest.raises(ValueError, match=r"config.meta.distribute must be one of \('default', "):
        online.validate_config(c)
    c = online.default_config()
    c.mixed_precision = "float16"
    with pytest.raises(ValueError, match=r"config.meta.mixed_precision must be one of .*'none'"):
        online.validate_config(c)
    c = online.default_config()
    c.devices = "/gpu:0,/gpu:1"
    with pytest.raises(ValueError, match=r"config.meta.devices must be .* unless .*'mirrored'"):
        online.validate_config(c)
    c = online.default_config()
    c.solver, c.neumann_alpha, c.distribute = "amortized_neumann", "auto", "mirrored"
    with pytest.raises(ValueError, match=r"config.meta.neumann_alpha must be a number with .*"):
        online.validate_config(c)
    c.neumann_alpha = 1e-3
    online.validate_config(c)
    monkeypatch.delenv("TF_CONFIG", raising=False)
    c = online.default_config()
    c.distribute = "multi_worker_mirrored"
    with pytest.raises(ValueError, match="needs the cluster in the TF_CONFIG environment"):
        distribute.make_strategy(c)
    with pytest.raises(ValueError, match=r"config.meta.distribute='multi_worker_mirrored' but "):
        distribute.check_strategy(tf.distribute.get_strategy(), c.distribute)
    with pytest.raises(ValueError, match="runs under the strategies .* Received a OneDevice"):
        distribute.check_strategy(tf.distribute.OneDeviceStrategy("/cpu:0"), "default")


def _experiment_config(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "configs" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return ml_collections.ConfigDict(module.get_config().to_dict())


def test_binaries_name_the_strategies_they_cannot_run():
    c = _experiment_config("mnist_noisy_labels")
    c.meta.distribute = "multi_worker_mirrored"
    mnist_experiments.validate_config(c)  # accepted: every worker runs the binary
    c = _experiment_config("mnist_noisy_labels")
    c.meta.distribute, c.meta.devices = "mirrored", "/cpu:0,/cpu:1,/cpu:2"
    with pytest.raises(ValueError, match=r"data.pt_batch_size must be a multiple of the 3 config"):
        mnist_experiments.validate_config(c)
    c = _experiment_config("ppi_multitask")
    c.meta.distribute = "multi_worker_mirrored"
    with pytest.raises(ValueError, match=r"config.meta.neumann_alpha must be a number with "):
        ppi_benchmark.validate_config(c)  # AmortizedNeumann takes a fixed alpha under a strategy
    del c.meta.neumann_alpha  # a copy of the config: the field lost its "number or auto" type
    c.meta.neumann_alpha = 1e-3
    ppi_benchmark.validate_config(c)  # accepted: the chief generates the data, all read it
    c.meta.hvp_mode = "forward_over_reverse"
    with pytest.raises(
        ValueError,
        match=r"config.meta.hvp_mode must be 'reverse_over_reverse' with "
        r"meta.distribute='multi_worker_mirrored'",
    ):
        ppi_benchmark.validate_config(c)
    c = _experiment_config("ppi_multitask")
    c.meta.distribute = "tpu"
    del c.meta.neumann_alpha
    c.meta.neumann_alpha = 1e-3
    with pytest.raises(
        ValueError, match=r"config.meta.distribute must be one of .* here \(this benchmark's Co"
    ):
        ppi_benchmark.validate_config(c)


def _only_the_chief_wrote(workdir: Path, other: str) -> None:
    """Worker 1 said it is not the chief and wrote no results; one export, by the chief."""
    assert "This is worker 1, not the chief" in other and "Results:" not in other
    results = json.loads((workdir / "results.json").read_text())
    assert results["export"] == str(workdir / "export" / "1")
    assert sorted(p.name for p in (workdir / "export").iterdir()) == ["1"]  # one writer


def test_ecg_benchmark_on_two_workers_chief_writes_and_both_skip_finished_parts(tmp_path):
    workdir = tmp_path / "ecg"
    command = [
        sys.executable,
        "-m",
        "trainers.run_benchmark",
        "--config=configs/ecg_simclr.py:smoke",
        f"--workdir={workdir}",
        "--config.meta.distribute=multi_worker_mirrored",
        "--config.num_labelled=(10,)",
        "--config.finetune.modes=('full',)",
    ]

    auc = r"^  test AUC full ([\d.]+)$"
    chief, other = _binary_on_two_workers(command, "ecg")
    # No PT, fixed and meta-learned augmentation: the same test AUCs on both workers.
    assert len(_logged(chief, auc)) == 3 and _logged(other, auc) == _logged(chief, auc)
    _only_the_chief_wrote(workdir, other)
    meta = json.loads((workdir / "seed_0" / "simclr_meta" / "n_10" / "result.json").read_text())
    assert f"{meta['test_auc']['full']:.4f}" == _logged(other, auc)[2]

    # Restarted: every worker skips the same three finished parts (the chief's
    # reading of the workdir), so no collective is left waiting, and nothing is redone.
    chief2, other2 = _binary_on_two_workers(command, "ecg again")
    for out in (chief2, other2):
        assert out.count("done before: test AUC full") == 3
        assert "warm-up PT step" not in out
    assert sorted(p.name for p in (workdir / "export").iterdir()) == ["1"]


def test_ppi_benchmark_on_two_workers_chief_writes_and_both_skip_finished_parts(tmp_path):
    workdir = tmp_path / "ppi"
    command = [
        sys.executable,
        "-m",
        "trainers.run_benchmark",
        "--config=configs/ppi_multitask.py:smoke",
        f"--workdir={workdir}",
        "--config.meta.distribute=multi_worker_mirrored",
        "--config.meta.neumann_alpha=0.001",  # AmortizedNeumann: a fixed alpha under a strategy
        "--config.methods=('meta_pt',)",
        "--config.settings=('full',)",
    ]

    generating = "Generating the synthetic PPI-like benchmark"
    auc = r"^  test AUC ([\d.]+)$"
    chief, other = _binary_on_two_workers(command, "ppi")
    # The chief alone generated the dataset; both read it and fine-tuned alike.
    assert generating in chief and generating not in other
    assert len(_logged(chief, auc)) == 1 and _logged(other, auc) == _logged(chief, auc)
    _only_the_chief_wrote(workdir, other)
    meta = json.loads((workdir / "seed_0" / "full" / "meta_pt" / "result.json").read_text())
    assert f"{meta['test_auc']:.4f}" == _logged(other, auc)[0]
    assert sorted(p.name for p in workdir.iterdir()) == [
        "data",
        "export",
        "results.json",
        "results.md",
        "seed_0",
        "task_weights.png",
    ]
    data_files = {p.name: p.stat().st_mtime_ns for p in (workdir / "data").iterdir()}

    # Restarted: the dataset is there (no worker generates it, and both still pass the
    # same barrier), and every worker skips the finished run (the chief's reading).
    chief2, other2 = _binary_on_two_workers(command, "ppi again")
    for out in (chief2, other2):
        assert generating not in out
        assert _logged(out, r"^  done before: test AUC ([\d.]+)$") == _logged(chief, auc)
        assert "warm-up PT step" not in out
    assert {p.name: p.stat().st_mtime_ns for p in (workdir / "data").iterdir()} == data_files
    assert sorted(p.name for p in (workdir / "export").iterdir()) == ["1"]
