"""The ECG SimCLR benchmark: its smoke variant end to end through the binary (every
method and N, linear and full FT, results, figures, a servable export checked in a
fresh process, resumption), its ptbxl variant on synthetic records written in PTB-XL's
layout, the SimCLR problem's views and meta-gradient, and clear config errors."""

import json
import re
import subprocess
import sys
from pathlib import Path

import benchmark_binary  # same directory (pytest puts it on sys.path)
import numpy as np
import pytest
import tensorflow as tf

from metapt_tf import hypergrad
from metapt_tf.data import ecg
from metapt_tf.training import ecg_benchmark

ROOT = Path(__file__).resolve().parents[2]
CONFIG = "configs/ecg_simclr.py"


def _env():
    return benchmark_binary.env()


def _run(workdir, *extra, config=CONFIG + ":smoke", timeout=900):
    return benchmark_binary.run(config, workdir, *extra, timeout=timeout)


def _config(variant="smoke"):
    return benchmark_binary.load_config(CONFIG, variant)


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("ecg_smoke")
    proc = _run(workdir)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return workdir, proc


def test_smoke_runs_every_method_n_and_ft_mode(smoke_run):
    workdir, proc = smoke_run
    config = _config()
    results = json.loads((workdir / "results.json").read_text())
    for mode in ecg_benchmark.FT_MODES:
        for method in ecg_benchmark.METHODS:
            for n in config.num_labelled:
                cell = results["test_auc"][mode][method][str(n)]
                assert 0.0 <= cell["mean"] <= 1.0 and len(cell["runs"]) == 1
    meta = [r for r in results["runs"] if r["method"] == "simclr_meta"]
    assert len(meta) == len(config.num_labelled)  # one meta-PT run per N
    assert all(r["meta_steps"] == config.meta.num_meta_steps for r in meta)
    # The fixed pipeline stays at its initial value: g = initial_warp_scale.
    initial = results["initial_augmentation"]
    assert initial["augment/warp_scale"] == pytest.approx(config.augment.initial_warp_scale)
    assert initial["augment/noise_scale"] == pytest.approx(config.augment.initial_noise_scale)
    assert initial["augment/mask_strength"] == pytest.approx(0.5)
    learned = results["learned_augmentation"][str(config.num_labelled[0])]
    assert learned["augment/warp_scale"] != pytest.approx(config.augment.initial_warp_scale)
    table = (workdir / "results.md").read_text()
    for name in ecg_benchmark.METHOD_NAMES.values():
        assert f"| {name} (linear FT)" in table and f"| {name} (full FT)" in table
    for png in ("augmentation.png", "augmented_examples.png"):
        assert (workdir / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # The fixed-augmentation PT ran once for the seed and served every N.
    assert (workdir / "seed_0" / "simclr_fixed_pt" / "checkpoints").is_dir()
    assert not (workdir / "seed_0" / "simclr_fixed" / "n_10" / "checkpoints").exists()
    assert "Results:" in proc.stdout and "test AUC linear" in proc.stdout


def test_export_serves_the_evaluated_model_in_a_fresh_process(smoke_run):
    workdir, _ = smoke_run
    config = _config()
    results = json.loads((workdir / "results.json").read_text())
    export = Path(results["export"])
    assert export.parent == workdir / "export" and (export / "saved_model.pb").is_file()
    cli = Path(sys.executable).parent / "saved_model_cli"
    shown = subprocess.run(
        [str(cli), "show", "--all", "--dir", str(export)],
        env=_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert "inputs['ecg']" in shown.stdout and "outputs['probabilities']" in shown.stdout
    assert f"shape: (-1, {config.data.length}, 12)" in shown.stdout
    # Serve the test fold's signals; the per-class AUC of the served probabilities
    # must equal the one recorded for the exported model (seed 0, largest N, full FT).
    d = config.data
    script = (
        "import json, numpy as np, tensorflow as tf\n"
        "from metapt_tf.data import ecg\n"
        "from metapt_tf.training import finetune\n"
        f"data = ecg.make_synthetic_ecg({d.num_records}, length={d.length}, seed={d.seed}, "
        f"duration_s={d.duration_s})\n"
        "idx = data.test_indices\n"
        f"fn = tf.saved_model.load({str(export)!r}).signatures['serving_default']\n"
        "p = fn(ecg=tf.constant(data.signals[idx]))['probabilities'].numpy()\n"
        "auc = finetune.per_task_auc(p, data.labels[idx])\n"
        "print(json.dumps({'shape': list(p.shape), 'auc': [None if np.isnan(a) else a "
        "for a in auc.tolist()]}))\n"
    )
    loaded = benchmark_binary.python("-c", script, timeout=300)
    assert loaded.returncode == 0, loaded.stderr[-3000:]
    served = json.loads(loaded.stdout.strip().splitlines()[-1])
    assert served["shape"][1] == ecg.NUM_CLASSES
    recorded = next(
        r
        for r in results["runs"]
        if r["method"] == "simclr_meta" and r["n"] == max(config.num_labelled)
    )
    served_auc = np.array([np.nan if a is None else a for a in served["auc"]], float)
    recorded_auc = np.array(recorded["per_class_auc"]["full"], float)
    assert np.isfinite(served_auc).any()
    np.testing.assert_allclose(served_auc, recorded_auc, atol=1e-6)


def test_rerun_skips_finished_runs_and_keeps_results(smoke_run):
    workdir, _ = smoke_run
    config = _config()
    before = json.loads((workdir / "results.json").read_text())
    proc = _run(workdir)
    assert proc.returncode == 0, proc.stderr[-3000:]
    expected = len(ecg_benchmark.METHODS) * len(config.num_labelled)
    assert proc.stdout.count("done before") == expected
    after = json.loads((workdir / "results.json").read_text())
    assert after["test_auc"] == before["test_auc"] and after["export"] == before["export"]


def test_bad_config_is_named_before_anything_runs(tmp_path):
    proc = _run(tmp_path, "--config.num_labelled=(1,)")
    assert proc.returncode != 0 and "config.num_labelled" in proc.stderr
    proc = _run(tmp_path, "--config.augment.bogus=1")
    assert proc.returncode == 2 and "Unknown config field 'augment.bogus'" in proc.stderr
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("methods", ("no_pt", "magic"), "config.methods"),
        ("finetune.modes", ("linear", "partial"), "config.finetune.modes"),
        ("model.blocks", (1, 1, 1), "config.model.blocks"),
        ("data.source", "tfds", "config.data.source"),
        ("temperature", 0.0, "config.temperature"),
        ("meta.hvp_mode", "finite_differences", "config.meta.hvp_mode"),
        ("augment.network_meta_lr_scale", 0.0, "config.augment.network_meta_lr_scale"),
        ("finetune.linear.steps", 0, "config.finetune.linear.steps"),
        ("finetune.full.learning_rate", -1e-3, "config.finetune.full.learning_rate"),
    ],
)
def test_validate_config_names_the_field(field, value, message):
    config = _config()
    *parents, leaf = field.split(".")
    node = config
    for p in parents:
        node = node[p]
    node[leaf] = value
    with pytest.raises(ValueError, match=message.replace(".", r"\.")):
        ecg_benchmark.validate_config(config)


def test_ptbxl_without_a_directory_is_named():
    config = _config()
    config.data.source = "ptbxl"
    with pytest.raises(ValueError, match=r"config\.data\.dir"):
        ecg_benchmark.validate_config(config)


def test_ptbxl_variant_runs_end_to_end_on_synthetic_records_in_ptbxl_layout(tmp_path):
    # The variant's data path (load_ptbxl on ptbxl_database.csv, scp_statements.csv and
    # wfdb records) and its paper-size ResNet-18, on 100 synthetic records written by the
    # binary; the schedule is cut to one step of each kind, and the methods to meta-PT,
    # which runs every part (SimCLR PT, meta-steps, both FT modes, export; the other
    # methods are subsets of it, each run by the smoke test): about 1 min on 2 CPU cores.
    data_dir = tmp_path / "ptbxl"
    written = benchmark_binary.python(
        "-m",
        "trainers.write_synthetic_ptbxl",
        f"--output_dir={data_dir}",
        "--num_records=100",
        "--seed=0",
        timeout=300,
    )
    assert written.returncode == 0, written.stderr[-3000:]
    assert f"--config.data.dir={data_dir}" in written.stdout
    workdir = tmp_path / "run"
    proc = _run(
        workdir,
        f"--config.data.dir={data_dir}",
        "--config.seeds=(0,)",
        "--config.methods=('simclr_meta',)",
        "--config.num_labelled=(10,)",
        "--config.data.pt_batch_size=8",
        "--config.data.ft_batch_size=8",
        "--config.meta.warmup_steps=1",
        "--config.meta.num_meta_steps=1",
        "--config.meta.pt_steps_per_meta_step=1",
        "--config.meta.log_every=1",
        "--config.meta.checkpoint_every=1",
        "--config.finetune.linear.steps=2",
        "--config.finetune.full.steps=2",
        config=CONFIG + ":ptbxl",
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert f"Loading PTB-XL from {data_dir}" in proc.stdout
    results = json.loads((workdir / "results.json").read_text())
    assert results["data"].startswith("PTB-XL, 100 records at 100 Hz (10 in test fold 10)")
    for mode in ecg_benchmark.FT_MODES:
        assert set(results["test_auc"][mode]) == {"simclr_meta"}, mode
        cell = results["test_auc"][mode]["simclr_meta"]["10"]
        assert len(cell["runs"]) == 1 and np.isfinite(cell["mean"]), mode
        assert 0.0 <= cell["mean"] <= 1.0
    export = Path(results["export"])
    assert export.parent == workdir / "export" and (export / "saved_model.pb").is_file()


def test_simclr_problem_sees_one_draw_per_batch_and_reaches_every_meta_param():
    config = _config()
    data = ecg.make_synthetic_ecg(
        24, length=config.data.length, seed=1, duration_s=config.data.duration_s
    )
    built = ecg_benchmark.build_problem(config, seed=0, probe=data.signals[:4])
    problem = built.problem
    batch = problem.pt_batch_fn({"signal": tf.constant(data.signals[:8])})
    # The loss is deterministic given the batch's draws: every evaluation in a
    # meta-step (gradient, HVPs, mixed term) sees the same two views.
    assert float(problem.pt_loss_fn(batch)) == float(problem.pt_loss_fn(batch))
    other = problem.pt_batch_fn({"signal": tf.constant(data.signals[:8])})
    assert float(problem.pt_loss_fn(other)) != float(problem.pt_loss_fn(batch))
    # The implicit part of the meta-gradient reaches every augmentation parameter.
    rng = np.random.default_rng(0)
    v = [tf.constant(rng.normal(size=p.shape), p.dtype) for p in problem.pt_params]
    grads = hypergrad.implicit_hypergradient(
        lambda: problem.pt_loss_fn(batch),
        problem.pt_params,
        problem.meta_params,
        v,
        solver=hypergrad.Identity(1.0),
    )
    names = [p.name for p in problem.meta_params]
    for name, g in zip(names, grads, strict=True):
        g = np.asarray(g)
        assert np.all(np.isfinite(g)), name
    scalars = {
        n.split("/")[-1].split(":")[0]: float(np.asarray(g))
        for n, g in zip(names, grads, strict=True)
        if np.asarray(g).ndim == 0
    }
    assert {"s", "rho", "phi"} <= set(scalars) and all(v != 0.0 for v in scalars.values())
    summary = problem.describe_fn()
    assert summary["augment/warp_scale"] == pytest.approx(config.augment.initial_warp_scale)


def test_magnitude_network_takes_its_own_meta_learning_rate():
    config = _config()
    config.augment.network_meta_lr_scale = 0.01
    problem = ecg_benchmark.build_problem(config, seed=0).problem
    by_name = {
        p.name.split(":")[0]: scale
        for p, scale in zip(problem.meta_params, problem.meta_learning_rate_scales, strict=True)
    }
    scalars = {n: s for n, s in by_name.items() if n.split("/")[-1] in ("s", "rho", "phi")}
    network = {n: s for n, s in by_name.items() if n not in scalars}
    assert len(scalars) == 3 and set(scalars.values()) == {1.0}
    assert network and set(network.values()) == {0.01}  # every CNN variable, none else


def test_meta_gradient_noise_binary_samples_each_strength(tmp_path):
    out = tmp_path / "noise.json"
    proc = benchmark_binary.python(
        "-m",
        "trainers.ecg_meta_gradient_noise",
        f"--config={CONFIG}:smoke",
        "--n=10",
        "--at_pt_steps=1,3",
        "--num_samples=3",
        f"--output={out}",
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    rows = json.loads(out.read_text())
    assert [(r["pt_step"], r["parameter"]) for r in rows] == [
        (step, name) for step in (1, 3) for name in ("warp_scale", "noise_scale", "mask_strength")
    ]
    for r in rows:
        assert r["seed"] == 0 and r["n"] == 10
        assert np.isfinite([r["mean"], r["snr"]]).all() and r["sd"] > 0
        assert r["se"] == pytest.approx(r["sd"] / np.sqrt(3))
    assert re.search(r"\| +0 \| +10 \| +3 \| mask_strength +\|", proc.stdout)

    proc = benchmark_binary.python(
        "-m", "trainers.ecg_meta_gradient_noise", f"--config={CONFIG}:smoke", "--n=7", timeout=300
    )
    assert proc.returncode == 1 and "n=7 is not one of config.num_labelled" in proc.stderr
