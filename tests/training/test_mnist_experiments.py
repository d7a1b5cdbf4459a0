"""The augmentation experiment on tiny settings, and config validation."""

import importlib.util
import json
from pathlib import Path

import ml_collections
import numpy as np
import pytest

from metapt_tf.training import mnist_experiments

ROOT = Path(__file__).resolve().parents[2]


def _config(name: str) -> ml_collections.ConfigDict:
    spec = importlib.util.spec_from_file_location(name, ROOT / "configs" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return ml_collections.ConfigDict(module.get_config().to_dict())


def test_augment_experiment_learns_a_distribution_and_reports_it(tmp_path):
    c = _config("mnist_augment")
    c.seeds = (0,)
    c.export = False
    c.data.num_pt, c.data.num_ft_test = 300, 200
    c.model.hidden_units = (32,)
    c.meta.warmup_steps, c.meta.num_meta_steps = 10, 30
    c.meta.log_every = c.meta.checkpoint_every = 10
    c.finetune.epochs = 2
    lines = []
    results = mnist_experiments.run(c, str(tmp_path), log=lines.append)
    p = np.asarray(results["learned_distribution_mean"])
    assert p.shape == (12,) and abs(p.sum() - 1) < 1e-5
    assert not np.allclose(p, 1 / 12)  # it moved from uniform
    assert 0.0 <= results["mass_on_optimal_bins_mean"] <= 1.0
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["bin_angles"] == list(c.augment.bin_angles)
    assert saved["checks"]["mass_on_optimal_bins_at_least_0.8"] == (
        results["mass_on_optimal_bins_mean"] >= 0.8
    )
    assert "meta_pt_beats_baseline_pt_by_more_than_std" in saved["checks"]
    assert "rotation bin" in (tmp_path / "results.md").read_text()
    assert (tmp_path / "distribution.png").read_bytes()[:4] == b"\x89PNG"
    assert any(line.startswith("Data: ") for line in lines)


def _tiny_augment_problem(c):
    digits = mnist_experiments.mnist.load_digits(c.data.source)
    split = mnist_experiments._Split(digits, c, seed=0)
    problem, dist = mnist_experiments._build_problem(c, split, seed=0)
    return split, problem, dist


def test_augment_shift_draws_are_checkpointed_so_a_resumed_run_ends_with_the_same_phi(tmp_path):
    c = _config("mnist_augment")
    c.data.num_pt, c.data.num_ft_val, c.data.num_ft_test = 300, 100, 100
    c.data.meta_pt_batch_size = 64
    c.model.hidden_units = (16,)
    c.meta.warmup_steps, c.meta.pt_steps_per_meta_step = 4, 2
    c.meta.log_every = c.meta.checkpoint_every = 3
    c.meta.meta_lr_decay = "none"  # a schedule over num_meta_steps would change with it
    c.augment.shift_pixels = 2

    split, problem, _ = _tiny_augment_problem(c)
    batch = {"image": split.x["pt"][:8], "label": split.y["pt"][:8]}
    shifted = problem.pt_batch_fn(batch)["image"].numpy()
    assert shifted.shape == batch["image"].shape and not np.array_equal(shifted, batch["image"])
    assert "shift_generator" in problem.checkpoint_extras

    def run(workdir, num_meta_steps):
        c.meta.num_meta_steps = num_meta_steps
        split, problem, dist = _tiny_augment_problem(c)
        meta = ml_collections.ConfigDict(c.meta.to_dict())
        mnist_experiments.online.run(
            problem,
            **mnist_experiments._datasets(split, c, 0),
            config=meta,
            workdir=str(workdir),
            log=None,
        )
        return dist.variables_list[0].numpy()

    straight = run(tmp_path / "straight", 6)
    run(tmp_path / "resumed", 3)
    resumed = run(tmp_path / "resumed", 6)
    np.testing.assert_allclose(resumed, straight, rtol=0, atol=1e-6)


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("experiment", "cifar", "config.experiment must be one of"),
        ("seeds", (), "config.seeds must be a non-empty tuple of ints"),
        ("data.pt_batch_size", 10**6, "config.data.pt_batch_size must be <= data.num_pt"),
        ("augment.ft_angles", (45,), "config.augment.ft_angles must be a non-empty subset"),
        ("augment.shift_pixels", -1, "config.augment.shift_pixels must be an int in [0, 14)"),
        ("finetune.mode", "partial", "config.finetune.mode must be one of"),
        ("meta.head", "shared", "config.meta.head must be one of"),
    ],
)
def test_bad_config_values_are_named(field, value, message):
    c = _config("mnist_augment")
    section, _, key = field.rpartition(".")
    (c[section] if section else c)[key] = value
    escaped = message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")
    with pytest.raises(ValueError, match=escaped):
        mnist_experiments.validate_config(c)


def test_unknown_example_weighting_is_named():
    c = _config("mnist_noisy_labels")
    c.meta_params.weighting = "softmax"
    with pytest.raises(ValueError, match="config.meta_params.weighting must be one of"):
        mnist_experiments.validate_config(c)


def test_auroc_matches_the_pairwise_definition():
    rng = np.random.default_rng(0)
    scores, labels = rng.normal(size=50).round(1), rng.uniform(size=50) < 0.4
    pos, neg = scores[labels], scores[~labels]
    pairwise = np.mean([(p > n) + 0.5 * (p == n) for p in pos for n in neg])
    assert mnist_experiments.auroc(scores, labels) == pytest.approx(pairwise)


@pytest.mark.parametrize("name", ["mnist_noisy_labels", "mnist_augment"])
def test_gpu_variants_are_valid_configs(name):
    spec = importlib.util.spec_from_file_location(name, ROOT / "configs" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    c = module.get_config("gpu")
    mnist_experiments.validate_config(c)
    assert c.data.source == "tfds" and c.data.num_pt == 60000
    with pytest.raises(ValueError, match="the only variant is 'gpu'"):
        module.get_config("tpu")
