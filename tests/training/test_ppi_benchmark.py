"""The PPI multitask benchmark: its smoke variant end to end through the binary (every
method and setting, results, figure, a servable export checked in a fresh process,
resumption), the settings' splits, and clear config errors."""

import json
import subprocess
import sys
import types
from pathlib import Path

import benchmark_binary  # same directory (pytest puts it on sys.path)
import numpy as np
import pytest

from metapt_tf.data import synthetic_ppi
from metapt_tf.training import ppi_benchmark

ROOT = Path(__file__).resolve().parents[2]
CONFIG = "configs/ppi_multitask.py"


def _env():
    return benchmark_binary.env()


def _run(workdir, *extra, config=CONFIG + ":smoke", timeout=900):
    return benchmark_binary.run(config, workdir, *extra, timeout=timeout)


def _config(variant="smoke"):
    return benchmark_binary.load_config(CONFIG, variant)


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("ppi_smoke")
    proc = _run(workdir)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return workdir, proc


def test_smoke_runs_every_method_and_setting(smoke_run):
    workdir, proc = smoke_run
    results = json.loads((workdir / "results.json").read_text())
    for setting in ppi_benchmark.SETTINGS:
        for method in ppi_benchmark.METHODS:
            cell = results["test_auc"][setting][method]
            assert 0.0 <= cell["mean"] <= 1.0 and len(cell["runs"]) == 1
    # The held-out setting fine-tunes and tests on the FT tasks meta-PT never saw.
    held_out = [r for r in results["runs"] if r["setting"] == "held_out"]
    full = [r for r in results["runs"] if r["setting"] == "full"]
    assert len(held_out[0]["per_task_auc"]) == 1 and len(full[0]["per_task_auc"]) == 4
    weights = results["task_weights"]["full"]
    assert 0.0 <= weights["auroc_relevant_vs_harmful"]["mean"] <= 1.0
    table = (workdir / "results.md").read_text()
    for name in ppi_benchmark.METHOD_NAMES.values():
        assert f"| {name}" in table
    assert (workdir / "task_weights.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "Results:" in proc.stdout and "test AUC" in proc.stdout
    # Supervised PT ran once for the seed and served every setting.
    assert (workdir / "seed_0" / "supervised_pt" / "checkpoints").is_dir()
    assert set(results["checks"]) == set(ppi_benchmark.SETTINGS)


def test_export_serves_the_evaluated_model_in_a_fresh_process(smoke_run):
    workdir, _ = smoke_run
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
    assert "inputs['examples']" in shown.stdout and "outputs['probabilities']" in shown.stdout
    # Serve the raw tf.Examples of the test file; the per-task AUC of the served
    # probabilities must equal the one the benchmark recorded for that model.
    script = (
        "import json, sys, numpy as np, tensorflow as tf\n"
        "from metapt_tf.training import finetune\n"
        f"fn = tf.saved_model.load({str(export)!r}).signatures['serving_default']\n"
        f"path = {str(workdir / 'data' / 'test.tfrecord')!r}\n"
        "records = [r.numpy() for r in tf.data.TFRecordDataset(path)]\n"
        "p = fn(examples=tf.constant(records))['probabilities'].numpy()\n"
        "labels = np.stack([np.asarray(tf.train.Example.FromString(r).features"
        ".feature['context/ft_labels'].float_list.value) for r in records])\n"
        "stripped = []\n"
        "for r in records:\n"
        "    e = tf.train.Example.FromString(r)\n"
        "    del e.features.feature['context/ft_labels'], e.features.feature['context/pt_labels']\n"
        "    stripped.append(e.SerializeToString())\n"
        "q = fn(examples=tf.constant(stripped))['probabilities'].numpy()\n"
        "auc = finetune.per_task_auc(p, labels).tolist()\n"
        "diff = float(np.abs(p - q).max())\n"
        "print(json.dumps({'shape': list(p.shape), 'auc': auc, 'unlabelled_diff': diff}))\n"
    )
    loaded = benchmark_binary.python("-c", script, timeout=300)
    assert loaded.returncode == 0, loaded.stderr[-3000:]
    served = json.loads(loaded.stdout.strip().splitlines()[-1])
    assert served["shape"] == [40, 4]
    assert served["unlabelled_diff"] < 1e-6  # clients need not send labels
    recorded = next(
        r for r in results["runs"] if r["method"] == "meta_pt" and r["setting"] == "full"
    )
    np.testing.assert_allclose(
        np.array(served["auc"], float), np.array(recorded["per_task_auc"], float), atol=1e-6
    )


def test_rerun_skips_finished_runs_and_keeps_results(smoke_run, tmp_path):
    workdir, _ = smoke_run
    before = json.loads((workdir / "results.json").read_text())
    proc = _run(workdir)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("done before") == len(ppi_benchmark.SETTINGS) * len(
        ppi_benchmark.METHODS
    )
    after = json.loads((workdir / "results.json").read_text())
    assert after["test_auc"] == before["test_auc"] and after["export"] == before["export"]


def test_bad_config_is_named_before_anything_runs(tmp_path):
    proc = _run(tmp_path, "--config.methods=('no_pt','magic')")
    assert proc.returncode != 0
    assert "config.methods" in proc.stderr and "magic" in proc.stderr
    proc = _run(tmp_path, "--config.model.bogus=1")
    assert proc.returncode == 2 and "Unknown config field 'model.bogus'" in proc.stderr
    assert not (tmp_path / "data").exists()


def test_settings_split_graphs_and_tasks():
    config = _config()
    config.data.meta_folds = 2  # FT-train / FT-val
    data = ppi_benchmark._Data(
        directory="",
        schema=None,
        description="",
        num_pt_tasks=12,
        num_ft_tasks=8,
        num_ft_graphs=100,
        task_kinds=None,
    )
    full = ppi_benchmark.make_setting("full", data, config, seed=0)
    assert len(full.ft_graphs) == 100
    assert not set(full.meta_train) & set(full.meta_val)
    assert set(full.meta_train) | set(full.meta_val) == set(full.ft_graphs)
    assert len(full.meta_val) == 50  # the default 50/50 split
    config.data.meta_val_fraction = 0.15  # the paper's
    assert len(ppi_benchmark.make_setting("full", data, config, seed=0).meta_val) == 15
    partial = ppi_benchmark.make_setting("partial", data, config, seed=0)
    assert len(partial.ft_graphs) == 50 and set(partial.ft_graphs) <= set(full.ft_graphs)
    held = ppi_benchmark.make_setting("held_out", data, config, seed=0)
    assert list(held.meta_tasks) == list(range(6)) and list(held.eval_tasks) == [6, 7]
    again = ppi_benchmark.make_setting("partial", data, config, seed=0)
    np.testing.assert_array_equal(again.ft_graphs, partial.ft_graphs)
    assert full.meta_folds == [] and partial.meta_folds == []  # two folds: the split above
    # k folds for k cross-fitted heads: disjoint, the setting's graphs, sizes within 1.
    config.data.meta_folds = 3
    for name in ("full", "partial"):
        setting = ppi_benchmark.make_setting(name, data, config, seed=0)
        folds = setting.meta_folds
        assert len(folds) == 3 and sorted(np.concatenate(folds)) == sorted(setting.ft_graphs)
        assert max(map(len, folds)) - min(map(len, folds)) <= 1
    config.data.meta_folds = 51  # the 50% setting has 50 graphs
    assert len(ppi_benchmark.make_setting("full", data, config, seed=0).meta_folds) == 51
    with pytest.raises(ValueError, match=r"meta_folds=51 is more folds than the 50 labelled"):
        ppi_benchmark.make_setting("partial", data, config, seed=0)


def test_meta_pt_heads_train_on_the_other_folds_and_validate_on_their_own():
    config = _config()
    data = ppi_benchmark._Data("", None, "", 12, 8, num_ft_graphs=100, task_kinds=None)
    config.data.meta_folds = 4
    setting = ppi_benchmark.make_setting("partial", data, config, seed=0)
    # online_data's streams, each recorded as the graph indices it would read.
    runner = types.SimpleNamespace(
        pt_data=lambda: "pt",
        meta_pt_data=lambda: "meta_pt",
        ft_data=lambda setting, which, tasks, **kw: which,
    )
    out = ppi_benchmark._Runner.online_data(runner, setting, setting.meta_tasks)
    train, val = out["ft_train_data"], out["ft_val_data"]
    assert len(train) == len(val) == 4
    for i, fold in enumerate(setting.meta_folds):
        np.testing.assert_array_equal(val[i], fold)
        assert not set(train[i]) & set(fold)
        assert set(train[i]) | set(fold) == set(setting.ft_graphs)
    # The noise tool's test graphs as FT-val: one stream each, the FT-train split.
    out = ppi_benchmark._Runner.online_data(runner, setting, setting.meta_tasks, "test")
    assert out["ft_val_data"] == "test" and out["ft_train_data"] == "meta_train"


def test_validate_config_names_the_field():
    config = _config()
    config.data.partial_fraction = 1.5
    with pytest.raises(ValueError, match=r"config.data.partial_fraction must be in \(0, 1\)"):
        ppi_benchmark.validate_config(config)
    config = _config()
    config.data.source = "tfrecord"
    with pytest.raises(ValueError, match="config.data.dir"):
        ppi_benchmark.validate_config(config)
    config = _config()
    config.meta.solver = "magic"
    with pytest.raises(ValueError, match="solver"):
        ppi_benchmark.validate_config(config)
    config = _config()
    config.data.meta_folds = 1
    with pytest.raises(ValueError, match=r"config.data.meta_folds must be an int >= 2"):
        ppi_benchmark.validate_config(config)
    config = _config()
    config.data.meta_folds, config.meta.ft_cross_fit = 4, False
    with pytest.raises(ValueError, match=r"meta_folds must be 2 unless .*ft_cross_fit"):
        ppi_benchmark.validate_config(config)


def test_finetune_budget_is_updates_or_epochs():
    config = _config("")
    assert config.finetune.steps == 700 and config.data.ft_batch_size == 32
    # 200 graphs: 7 batches an epoch; 100 (the partial setting): 4, so more epochs.
    assert ppi_benchmark.finetune_epochs(config, 200) == 100
    assert ppi_benchmark.finetune_epochs(config, 100) == 175
    assert ppi_benchmark.finetune_epochs(config, 10_000) == 3  # at least 700 updates
    config.finetune.steps, config.finetune.epochs = None, 50
    assert ppi_benchmark.finetune_epochs(config, 100) == 50
    ppi_benchmark.validate_config(config)
    for steps, epochs in ((None, None), (700, 50)):
        config.finetune.steps, config.finetune.epochs = steps, epochs
        with pytest.raises(ValueError, match="exactly one of config.finetune.steps"):
            ppi_benchmark.validate_config(config)
    config.finetune.steps, config.finetune.epochs = 0, None
    with pytest.raises(ValueError, match="config.finetune.steps must be an int >= 1"):
        ppi_benchmark.validate_config(config)


def test_missing_dataset_files_are_named(tmp_path):
    config = _config()
    config.data.source = "tfrecord"
    config.data.dir = str(tmp_path)
    with pytest.raises(FileNotFoundError, match="schema.pbtxt"):
        ppi_benchmark.prepare_data(config, str(tmp_path / "work"), lambda _: None)


@pytest.mark.parametrize("variant", ["", "smoke", "wide", "paper", "bio"])
def test_every_config_variant_is_valid(variant):
    config = _config(variant)
    if variant == "bio":  # everything but the converted dataset's directory, to be given
        with pytest.raises(ValueError, match="config.data.dir must be a directory with"):
            ppi_benchmark.validate_config(config)
    else:
        ppi_benchmark.validate_config(config)
    # The task design: the wide variant keeps the former one it was measured on, and
    # the generator accepts every variant's arguments.
    s = config.data.synthetic
    design = (
        ("ft_factors", "random_labels") if variant == "wide" else ("ft_related", "nuisance_scores")
    )
    assert (s.relevant_tasks, s.harmful_tasks) == design
    splits = ("num_pt_graphs", "num_ft_graphs", "num_test_graphs")  # write_synthetic_benchmark's
    args = {k: v for k, v in s.to_dict().items() if k not in splits}
    _, info = synthetic_ppi.make_synthetic_ppi(num_graphs=3, **args)
    assert info.params["relevant_tasks"] == design[0]
    # Four cross-fitted FT heads in the default and smoke runs; one head where the paper
    # has one and where the wide variant was measured with one.
    assert config.meta.ft_cross_fit == (variant in ("", "smoke"))
    assert config.data.meta_folds == (4 if variant in ("", "smoke") else 2)
    # Every PT run takes warmup + T * P steps: 2,200 in the default (a meta-step every 2
    # PT steps) and in the wide variant (every 5, as it was measured).
    m = config.meta
    if variant in ("", "wide"):
        steps = m.warmup_steps + m.num_meta_steps * m.pt_steps_per_meta_step
        assert (steps, m.pt_steps_per_meta_step) == (2200, 2 if variant == "" else 5)
    if variant in ("paper", "bio"):  # the paper's split, FT and constant meta rate
        assert config.data.meta_val_fraction == 0.15
        assert config.finetune.mode == "full" and config.meta.meta_lr_decay == "none"
        assert config.meta.meta_optimizer == "adam" and config.meta.meta_learning_rate == 1.0


def test_every_pt_run_reads_the_same_pt_batches(tmp_path):
    """A method's PT batches depend on the seed only, not on what ran before it in the
    process (or was skipped on a restart): each run gets a new dataset."""
    config = _config()
    data = ppi_benchmark.prepare_data(config, str(tmp_path), lambda _: None)
    runner = ppi_benchmark._Runner(config, data, str(tmp_path), seed=0, say=lambda _: None)

    def first_labels(make):
        return np.asarray(next(iter(make()))["pt_labels"])

    for make in (runner.pt_data, runner.meta_pt_data):
        first = first_labels(make)
        for _ in range(3):  # methods before this one read batches
            next(iter(make()))
        np.testing.assert_array_equal(first_labels(make), first)
    # A shared dataset would not do: its second iterator starts elsewhere.
    shared = runner.pt_data()
    orders = [np.asarray(next(iter(shared))["pt_labels"]) for _ in range(4)]
    assert any(not np.array_equal(orders[0], o) for o in orders[1:])


def test_meta_gradient_ranking_binary_scores_the_task_kinds(tmp_path):
    out = tmp_path / "ranking.json"
    proc = benchmark_binary.python(
        "-m",
        "trainers.ppi_meta_gradient_noise",
        f"--config={CONFIG}:smoke",
        f"--workdir={tmp_path}",
        "--setting=partial",
        "--at_pt_steps=1,3",
        "--num_samples=3",
        "--test_as_ft_val",
        f"--output={out}",
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    rows = json.loads(out.read_text())
    assert [(r["seed"], r["setting"], r["pt_step"]) for r in rows] == [
        (0, "partial", 1),
        (0, "partial", 3),
    ]
    for r in rows:
        for kind in ("relevant", "irrelevant", "harmful"):
            assert 0 <= r[f"{kind}_up"] + r[f"{kind}_down"] <= 1
        for key in ("auroc_harmful_mean", "auroc_irrelevant_one_sample"):
            assert 0 <= r[key] <= 1
    assert "AUROC rel-harm, mean" in proc.stdout

    proc = benchmark_binary.python(
        "-m", "trainers.ppi_meta_gradient_noise", f"--config={CONFIG}:smoke", timeout=300
    )
    assert proc.returncode != 0 and "--workdir is required" in proc.stderr


def test_meta_gradient_ranking_with_test_graphs_as_ft_val_uses_one_head(tmp_path, monkeypatch):
    # Cross-fitted, a second FT head would train on the FT-val batches: the test graphs.
    config = _config()
    assert config.meta.ft_cross_fit
    seen = []

    def sample(problem, *, config, **kwargs):
        seen.append(config.ft_cross_fit)
        return []

    monkeypatch.setattr(ppi_benchmark.online, "sample_meta_gradients", sample)
    for test_as_ft_val in (False, True):
        ppi_benchmark.meta_gradient_ranking(
            config,
            str(tmp_path),
            setting="full",
            at_pt_steps=[1],
            num_samples=2,
            test_as_ft_val=test_as_ft_val,
            log=None,
        )
    assert seen == [True, False]


def test_meta_gradient_ranking_needs_every_task_kind(tmp_path):
    config = _config()
    config.data.synthetic.task_mix = (0.5, 0.5, 0.0)
    with pytest.raises(ValueError, match="needs PT tasks of every kind.*'harmful': 0"):
        ppi_benchmark.meta_gradient_ranking(
            config, str(tmp_path), setting="full", at_pt_steps=[1], num_samples=2, log=None
        )
