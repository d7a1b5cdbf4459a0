"""The two synthetic-MNIST experiments of the paper, end to end.

* `mnist_noisy_labels`: PT on digits of which `noise_rate` carry a wrong label,
  with one weight per PT example as the meta-parameter (w = 2 sigmoid(phi));
  FT on a small clean labelled set. Reported: the AUROC of the learned weights
  at telling clean from noisy examples, and the FT test accuracy of meta-PT
  against PT with uniform weights (mean and std over seeds).
* `mnist_augment`: PT classifies upright digits under a random rotation whose
  distribution over angle bins is the meta-parameter (p = softmax(phi), used as
  an exact expectation over bins, so it is differentiable); FT digits are rotated
  by the angles of `ft_angles`. The optimal PT augmentation is known by
  construction: the FT angles. Reported: the learned distribution next to the
  optimal one and the mass it puts on the optimal bins, and FT test accuracy
  against PT with the uniform (initial) distribution.

For each seed: meta-PT, the baseline (the same PT schedule without meta-steps),
final fine-tuning of each backbone with a fresh head on all labelled FT data,
and evaluation on a held-out FT test set. The meta-PT model of the first seed
is exported as a SavedModel for TF Serving. Everything lands in `workdir`:
`results.json`, `results.md`, PNG figures, TensorBoard logs and checkpoints
(per run), and `export/<version>/`. Re-running with the same workdir resumes.

Under `meta.distribute="multi_worker_mirrored"` every worker runs this same
program (the same data, seeds, online runs and fine-tuning: their steps are
collectives). The chief writes everything above; the other workers keep their
checkpoints and SavedModel copies in temporary directories (`distribute`), write
nothing else, and end with a line naming the chief's workdir. Each worker logs
the SHA-256 of the learned phi and its FT test accuracy (phi's digest is also in
`results.json`), so the workers' logs can be compared.
"""

import hashlib
import os
import time
from collections.abc import Callable

import ml_collections
import numpy as np
import tensorflow as tf

from export import export_for_serving
from metapt_tf.data import mnist
from metapt_tf.meta_params import CategoricalDistribution, ExampleWeights
from metapt_tf.meta_params.weights import WEIGHTINGS
from metapt_tf.models import digit_backbone
from metapt_tf.training import distribute, finetune, interfaces, online, reporting
from metapt_tf.training.config_checks import config_error

EXPERIMENTS = ("mnist_noisy_labels", "mnist_augment")
NUM_CLASSES = 10


def auroc(scores: np.ndarray, positive: np.ndarray) -> float:
    """`reporting.auroc`, but NaN rather than an error when a class is absent."""
    positive = np.asarray(positive, bool)
    if positive.all() or not positive.any():
        return float("nan")
    return reporting.auroc(scores, positive)


def validate_config(config: ml_collections.ConfigDict) -> None:
    """Raises ValueError naming the first bad field (before any training starts)."""
    if config.experiment not in EXPERIMENTS:
        raise config_error("experiment", config.experiment, f"one of {EXPERIMENTS}")
    seeds = config.seeds
    if (
        not isinstance(seeds, tuple | list)
        or not seeds
        or not all(isinstance(s, int) and not isinstance(s, bool) for s in seeds)
    ):
        raise config_error("seeds", seeds, "a non-empty tuple of ints")
    d = config.data
    for field in (
        "num_pt",
        "num_ft_train",
        "num_ft_val",
        "num_ft_test",
        "pt_batch_size",
        "meta_pt_batch_size",
        "ft_batch_size",
    ):
        v = d[field]
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise config_error(f"data.{field}", v, "an int >= 1")
    if d.source not in mnist.SOURCES:
        raise config_error("data.source", d.source, f"one of {mnist.SOURCES}")
    for field in ("pt_batch_size", "meta_pt_batch_size"):
        if d[field] > d.num_pt:
            raise config_error(f"data.{field}", d[field], f"<= data.num_pt ({d.num_pt})")
    if d.ft_batch_size > d.num_ft_train:
        raise config_error(
            "data.ft_batch_size", d.ft_batch_size, f"<= data.num_ft_train ({d.num_ft_train})"
        )
    if config.experiment == "mnist_noisy_labels":
        if not 0.0 < d.noise_rate < 1.0:
            raise config_error("data.noise_rate", d.noise_rate, "in (0, 1)")
        if d.noise_kind not in mnist.NOISE_KINDS:
            raise config_error("data.noise_kind", d.noise_kind, f"one of {mnist.NOISE_KINDS}")
        if not isinstance(config.ground_truth_weights, bool):
            raise config_error("ground_truth_weights", config.ground_truth_weights, "a bool")
        weighting = config.meta_params.weighting
        if weighting not in WEIGHTINGS:
            raise config_error("meta_params.weighting", weighting, f"one of {WEIGHTINGS}")
    else:
        a = config.augment
        if not a.bin_angles or len(set(a.bin_angles)) != len(a.bin_angles):
            raise config_error("augment.bin_angles", a.bin_angles, "distinct angles in degrees")
        missing = [x for x in a.ft_angles if x not in a.bin_angles]
        if not a.ft_angles or missing:
            raise config_error(
                "augment.ft_angles", a.ft_angles, "a non-empty subset of augment.bin_angles"
            )
        shift = a.shift_pixels
        if isinstance(shift, bool) or not isinstance(shift, int) or not 0 <= shift < 14:
            raise config_error("augment.shift_pixels", shift, "an int in [0, 14)")
    if config.model.architecture not in ("mlp", "cnn"):
        raise config_error("model.architecture", config.model.architecture, "one of ('mlp', 'cnn')")
    if config.finetune.mode not in finetune.MODES:
        raise config_error("finetune.mode", config.finetune.mode, f"one of {finetune.MODES}")
    for field in ("epochs", "batch_size"):
        v = config.finetune[field]
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise config_error(f"finetune.{field}", v, "an int >= 1")
    online.validate_config(config.meta)
    for field in ("pt_batch_size", "meta_pt_batch_size"):
        replicas = len([x for x in config.meta.devices.split(",") if x.strip()])
        if config.meta.distribute == "mirrored" and replicas and d[field] % replicas:
            raise config_error(
                f"data.{field}", d[field], f"a multiple of the {replicas} config.meta.devices"
            )


class _Split:
    """The digits of one seed: PT set, labelled FT sets and the FT test set."""

    def __init__(self, digits: mnist.Digits, config: ml_collections.ConfigDict, seed: int):
        d = config.data
        sizes = {
            "pt": d.num_pt,
            "ft_train": d.num_ft_train,
            "ft_val": d.num_ft_val,
            "ft_test": d.num_ft_test,
        }
        idx = mnist.split_indices(len(digits.labels), sizes, seed=seed)
        self.x = {k: digits.images[v] for k, v in idx.items()}
        self.y = {k: digits.labels[v] for k, v in idx.items()}
        self.noisy = np.zeros(d.num_pt, bool)
        if config.experiment == "mnist_noisy_labels":
            self.y["pt"], self.noisy = mnist.inject_label_noise(
                self.y["pt"], d.noise_rate, kind=d.noise_kind, num_classes=NUM_CLASSES, seed=seed
            )
        else:  # FT digits are rotated by the FT angles, each equally often
            angles = np.asarray(config.augment.ft_angles, np.float32)
            rng = np.random.default_rng(seed + 1)
            for k in ("ft_train", "ft_val", "ft_test"):
                pick = angles[rng.integers(0, len(angles), size=len(self.y[k]))]
                self.x[k] = mnist.rotate_images(self.x[k], pick).numpy()


def _datasets(split: _Split, config, seed):
    d = config.data
    pt = {"image": split.x["pt"], "label": split.y["pt"], "index": np.arange(d.num_pt)}
    return dict(
        pt_data=mnist.make_dataset(pt, d.pt_batch_size, seed=seed),
        meta_pt_data=mnist.make_dataset(pt, d.meta_pt_batch_size, seed=seed + 3),
        ft_train_data=mnist.make_dataset(
            {"image": split.x["ft_train"], "label": split.y["ft_train"]}, d.ft_batch_size, seed + 1
        ),
        # The meta-objective's FT val loss on the whole FT val set: its gradient v is
        # the signal the meta-parameters follow, and a small batch makes it noisy.
        ft_val_data=mnist.make_dataset(
            {"image": split.x["ft_val"], "label": split.y["ft_val"]}, d.num_ft_val, seed + 2
        ),
    )


def _build_problem(config, split: _Split, seed: int):
    """The backbone, the PT head and the meta-parameters for one run."""
    tf.keras.utils.set_random_seed(seed)
    m = config.model
    backbone = digit_backbone(m.architecture, hidden_units=tuple(m.hidden_units))
    pt_head = tf.keras.layers.Dense(NUM_CLASSES, name="pt_head")
    pt_head.build((None, int(backbone.output_shape[-1])))
    pt_params = backbone.trainable_variables + pt_head.trainable_variables
    extra = {}

    if config.experiment == "mnist_noisy_labels":
        weights = ExampleWeights(
            config.data.num_pt, weighting=config.meta_params.weighting, num_classes=NUM_CLASSES
        )

        def pt_loss_fn(batch):
            # float32 logits: the loss stays float32 under a mixed-precision policy.
            logits = tf.cast(pt_head(backbone(batch["image"], training=True)), tf.float32)
            ce = tf.nn.sparse_softmax_cross_entropy_with_logits(
                tf.cast(batch["label"], tf.int32), logits
            )
            return tf.reduce_mean(weights.weights(batch["index"], batch["label"]) * ce)

        def describe():
            w = weights.all_weights().numpy()
            stats = _weight_stats(w, split.noisy)
            return {
                "weights/auroc_clean_vs_noisy": stats["weights_auroc"],
                "weights/mean_clean": stats["mean_weight_clean"],
                "weights/mean_noisy": stats["mean_weight_noisy"],
                "weights/all": w,
            }

        meta = weights
    else:
        angles = tf.constant(config.augment.bin_angles, tf.float32)
        num_bins = len(config.augment.bin_angles)
        dist = CategoricalDistribution(num_bins, name="rotation_distribution")
        history: list[np.ndarray] = []

        shift = config.augment.shift_pixels
        generator = tf.random.Generator.from_seed(seed + 29)

        def pt_batch_fn(batch):
            # A fixed augmentation under every bin: each PT digit moved by whole
            # pixels, (dx, dy) uniform in [-shift, shift], drawn once per batch.
            b = tf.shape(batch["image"])[0]
            offsets = generator.uniform([b, 2], -shift, shift + 1, dtype=tf.int32)
            return dict(batch, image=mnist.shift_images(batch["image"], offsets))

        def pt_loss_fn(batch):
            images = batch["image"]
            b = tf.shape(images)[0]
            # Every image under every bin's rotation: the exact expectation over bins.
            tiled = tf.tile(images, [num_bins, 1, 1, 1])
            rotated = mnist.rotate_images(tiled, tf.repeat(angles, b))
            logits = tf.cast(pt_head(backbone(rotated, training=True)), tf.float32)
            labels = tf.tile(tf.cast(batch["label"], tf.int32), [num_bins])
            ce = tf.nn.sparse_softmax_cross_entropy_with_logits(labels, logits)
            per_bin = tf.reduce_mean(tf.reshape(ce, [num_bins, b]), axis=1)
            return dist.expectation(per_bin)

        optimal = _optimal_distribution(config)

        def describe():
            p = dist.probs().numpy()
            history.append(p)
            out = {
                "augment/optimal_mass": float(p[optimal > 0].sum()),
                "augment/probs": p,
                "augment/distribution": reporting.distribution_image(np.stack(history)),
            }
            for angle, prob in zip(config.augment.bin_angles, p, strict=True):
                out[f"augment/p_{angle}deg"] = float(prob)
            return out

        meta = dist
        if shift:
            extra = dict(pt_batch_fn=pt_batch_fn, checkpoint_extras={"shift_generator": generator})
    problem = interfaces.MetaPretrainProblem(
        backbone=backbone,
        pt_params=pt_params,
        meta_params=meta.variables_list,
        pt_loss_fn=pt_loss_fn,
        num_ft_classes=NUM_CLASSES,
        pt_head_params=pt_head.trainable_variables,
        describe_fn=describe,
        **extra,
    )
    return problem, meta


def _optimal_distribution(config) -> np.ndarray:
    bins = list(config.augment.bin_angles)
    optimal = np.zeros(len(bins))
    for angle in config.augment.ft_angles:
        optimal[bins.index(angle)] += 1.0 / len(config.augment.ft_angles)
    return optimal


def run(
    config: ml_collections.ConfigDict,
    workdir: str,
    *,
    log: Callable[[str], None] | None = print,
) -> dict:
    """Runs the experiment over `config.seeds`; returns the results dict (also on disk)."""
    validate_config(config)
    say = log or (lambda _: None)
    start = time.perf_counter()
    strategy = distribute.make_strategy(config.meta)  # before any other op runs
    chief = distribute.is_chief(strategy)
    tf.config.experimental.enable_op_determinism()
    os.makedirs(workdir, exist_ok=True)
    digits = mnist.load_digits(config.data.source)
    say(f"Data: {digits.description}.")
    needed = sum(config.data[k] for k in ("num_pt", "num_ft_train", "num_ft_val", "num_ft_test"))
    if needed > len(digits.labels):
        raise ValueError(
            f"The splits need {needed} digits but the {digits.source} source has "
            f"{len(digits.labels)}; lower config.data.num_pt or config.data.num_ft_test."
        )

    per_seed = []
    exported = None
    for seed in config.seeds:
        split = _Split(digits, config, seed)
        ft_train = (
            np.concatenate([split.x["ft_train"], split.x["ft_val"]]),
            np.concatenate([split.y["ft_train"], split.y["ft_val"]]),
        )
        ft_test = (split.x["ft_test"], split.y["ft_test"])
        seed_result = {"seed": seed}
        for method in _methods(config):
            run_dir = os.path.join(workdir, f"seed_{seed}", method)
            meta_config = ml_collections.ConfigDict(config.meta.to_dict())
            meta_config.seed = seed
            meta_config.meta_enabled = method == "meta_pt"
            with distribute.scope(strategy, config.meta.mixed_precision):
                problem, meta = _build_problem(config, split, seed)
                if method == "ground_truth_pt":
                    # The diagnostic: PT with the weights a perfect method would
                    # learn, 0 on every noisy example (phi = -30: w < 1e-12).
                    meta.phi.assign(np.where(split.noisy, -30.0, 0.0).astype(np.float32))
            say(f"[seed {seed}] {method}: {run_dir}")
            result = online.run(
                problem,
                **_datasets(split, config, seed),
                config=meta_config,
                workdir=run_dir,
                log=say,
                strategy=strategy,
            )
            f = config.finetune
            tuned = finetune.finetune_and_evaluate(
                problem.backbone,
                ft_train,
                ft_test,
                num_classes=NUM_CLASSES,
                mode=f.mode,
                epochs=f.epochs,
                batch_size=f.batch_size,
                learning_rate=f.learning_rate,
                seed=seed,
                strategy=strategy,
            )
            say(
                f"[seed {seed}] {method}: FT test accuracy {tuned.test_accuracy:.4f}, "
                f"loss {tuned.test_loss:.6f}"
            )
            entry = {
                "ft_test_accuracy": tuned.test_accuracy,
                "ft_test_loss": tuned.test_loss,
                "pt_steps": result.pt_steps,
                "meta_steps": result.meta_steps,
                "skipped_meta_steps": result.skipped_meta_steps,
            }
            if method == "meta_pt":
                entry["history"] = result.history
                entry.update(_meta_summary(config, meta, split))
                phi = meta.variables_list[0].numpy()
                entry["phi_sha256"] = hashlib.sha256(phi.tobytes()).hexdigest()
                say(f"[seed {seed}] {method}: phi sha256 {entry['phi_sha256']}")
                if chief:
                    np.save(os.path.join(run_dir, "phi.npy"), phi)
                if exported is None and config.export:
                    # Every worker saves (saving distributed variables can involve
                    # collectives); the others' copies go to a directory deleted after.
                    with distribute.output_dir(os.path.join(workdir, "export"), strategy) as base:
                        exported = _export(tuned.model, base)
                    if chief:
                        say(f"SavedModel: {exported}")
            seed_result[method] = entry
        per_seed.append(seed_result)

    if not chief:
        results = _aggregate(config, per_seed, digits, None, time.perf_counter() - start)
        say(
            f"This is {distribute.worker_name(strategy)}, not the chief: the chief writes the "
            f"results, figures and SavedModel to {workdir}."
        )
        return results
    results = _aggregate(config, per_seed, digits, exported, time.perf_counter() - start)
    table = _table(config, results)
    paths = reporting.write_results(workdir, _strip_history(results), table)
    _figures(config, per_seed, workdir, results)
    say("\n" + table)
    say(f"\nResults:     {paths['json']}, {paths['markdown']} (figures: {workdir}/*.png)")
    say(f"SavedModel:  {exported or 'not exported (config.export=False)'}")
    say(f"TensorBoard: tensorboard --logdir {workdir}")
    return results


def _methods(config) -> tuple[str, ...]:
    if config.experiment == "mnist_noisy_labels" and config.ground_truth_weights:
        return ("meta_pt", "baseline_pt", "ground_truth_pt")
    return ("meta_pt", "baseline_pt")


def _weight_stats(w: np.ndarray, noisy: np.ndarray) -> dict:
    """How well per-example weights `w` tell clean examples from `noisy` ones."""
    return {
        "weights_auroc": auroc(w, ~noisy),
        "mean_weight_clean": float(w[~noisy].mean()),
        "mean_weight_noisy": float(w[noisy].mean()),
    }


def _meta_summary(config, meta, split) -> dict:
    if config.experiment == "mnist_noisy_labels":
        w = meta.all_weights().numpy()
        return {**_weight_stats(w, split.noisy), "weights": w, "noisy_mask": split.noisy}
    p = meta.probs().numpy()
    optimal = _optimal_distribution(config)
    return {
        "learned_distribution": p,
        "optimal_distribution": optimal,
        "mass_on_optimal_bins": float(p[optimal > 0].sum()),
    }


def _export(model: tf.keras.Model, export_base: str) -> str:
    def serve(features):
        return {"probabilities": tf.nn.softmax(model(features["image"], training=False))}

    return export_for_serving(
        model, serve, export_base, inputs={"image": tf.TensorSpec([None, 28, 28, 1], tf.float32)}
    )


def _aggregate(config, per_seed, digits, exported, seconds) -> dict:
    out = {
        "experiment": config.experiment,
        "data_source": digits.source,
        "data_description": digits.description,
        "seeds": list(config.seeds),
        "per_seed": per_seed,
        "export": exported,
        "seconds": seconds,
    }
    for method in _methods(config):
        mean, std = reporting.mean_std([s[method]["ft_test_accuracy"] for s in per_seed])
        out[f"{method}_ft_test_accuracy_mean"], out[f"{method}_ft_test_accuracy_std"] = mean, std
    meta, base = (
        (out[f"{m}_ft_test_accuracy_mean"], out[f"{m}_ft_test_accuracy_std"])
        for m in ("meta_pt", "baseline_pt")
    )
    out["checks"] = {
        "meta_pt_beats_baseline_pt_by_more_than_std": bool(
            meta[0] - base[0] > max(meta[1], base[1])
        )
    }
    if config.experiment == "mnist_noisy_labels":
        out["weights_auroc_mean"], out["weights_auroc_std"] = reporting.mean_std(
            [s["meta_pt"]["weights_auroc"] for s in per_seed]
        )
        out["checks"]["weights_auroc_at_least_0.9"] = bool(out["weights_auroc_mean"] >= 0.9)
    else:
        out["mass_on_optimal_bins_mean"], out["mass_on_optimal_bins_std"] = reporting.mean_std(
            [s["meta_pt"]["mass_on_optimal_bins"] for s in per_seed]
        )
        out["checks"]["mass_on_optimal_bins_at_least_0.8"] = bool(
            out["mass_on_optimal_bins_mean"] >= 0.8
        )
        out["learned_distribution_mean"] = np.mean(
            [s["meta_pt"]["learned_distribution"] for s in per_seed], axis=0
        )
        out["optimal_distribution"] = _optimal_distribution(config)
        out["bin_angles"] = list(config.augment.bin_angles)
    return out


def _strip_history(results: dict) -> dict:
    """results.json keeps the figures, not the per-log-step histories and weight vectors."""
    out = dict(results)
    out["per_seed"] = []
    for s in results["per_seed"]:
        s = {k: dict(v) if isinstance(v, dict) else v for k, v in s.items()}
        for key in ("history", "weights", "noisy_mask"):
            s["meta_pt"].pop(key, None)
        out["per_seed"].append(s)
    return out


def _table(config, results) -> str:
    n = len(results["seeds"])
    rows = [
        ["Meta-parameterized PT", _pm(results, "meta_pt_ft_test_accuracy")],
        [
            "PT, uniform "
            + ("weights" if config.experiment == "mnist_noisy_labels" else "rotation distribution"),
            _pm(results, "baseline_pt_ft_test_accuracy"),
        ],
    ]
    if "ground_truth_pt" in _methods(config):
        rows.append(
            [
                "PT, ground-truth weights (noisy 0; diagnostic)",
                _pm(results, "ground_truth_pt_ft_test_accuracy"),
            ]
        )
    table = reporting.markdown_table(
        [f"method ({config.finetune.mode} FT, {n} seeds)", "FT test accuracy"], rows
    )
    if config.experiment == "mnist_noisy_labels":
        extra = reporting.markdown_table(
            ["learned example weights", "value"],
            [
                ["AUROC clean vs noisy", _pm(results, "weights_auroc")],
                [
                    "mean weight, clean (seed 0)",
                    f"{results['per_seed'][0]['meta_pt']['mean_weight_clean']:.3f}",
                ],
                [
                    "mean weight, noisy (seed 0)",
                    f"{results['per_seed'][0]['meta_pt']['mean_weight_noisy']:.3f}",
                ],
            ],
        )
    else:
        learned = results["learned_distribution_mean"]
        optimal = results["optimal_distribution"]
        extra = (
            reporting.markdown_table(
                ["rotation bin", "learned p (mean over seeds)", "optimal p"],
                [
                    [f"{a} deg", f"{p:.3f}", f"{o:.3f}"]
                    for a, p, o in zip(results["bin_angles"], learned, optimal, strict=True)
                ],
            )
            + f"\n\nMass on the optimal bins: {_pm(results, 'mass_on_optimal_bins')}"
        )
    source = f"Data: {results['data_description']}."
    return f"{table}\n\n{extra}\n\n{source}"


def _pm(results, key) -> str:
    return f"{results[key + '_mean']:.4f} +- {results[key + '_std']:.4f}"


def _figures(config, per_seed, workdir, results) -> None:
    first = per_seed[0]["meta_pt"]
    history = first["history"]
    steps = [
        s
        for s, v in zip(history["meta_step"], history.get("ft_val_loss", []), strict=False)
        if v is not None
    ]
    vals = [v for v in history.get("ft_val_loss", []) if v is not None]
    if vals:
        reporting.plot_curves(
            os.path.join(workdir, "ft_val_loss.png"),
            {f"FT val loss (meta-PT, seed {per_seed[0]['seed']})": (steps, vals)},
            "FT validation loss during meta-PT",
            "loss",
        )
    if config.experiment == "mnist_noisy_labels":
        reporting.plot_weight_histograms(
            os.path.join(workdir, "weights.png"),
            first["weights"],
            first["noisy_mask"],
            f"Learned PT example weights (seed {per_seed[0]['seed']})",
        )
    else:
        reporting.plot_distribution(
            os.path.join(workdir, "distribution.png"),
            results["learned_distribution_mean"],
            results["optimal_distribution"],
            [f"{a}" for a in config.augment.bin_angles],
            "Learned PT rotation distribution vs optimal (degrees)",
        )
