"""SimCLR pre-training on 12-lead ECG with a meta-learned augmentation pipeline.

The paper's ECG experiment, on PTB-XL (`data.source = "ptbxl"`, the 100 Hz
records in `data.dir`) or on the synthetic 12-lead benchmark of
`metapt_tf.data.ecg` (the offline default). PT is SimCLR on the unlabelled
records of folds 1-9: two views of every signal from
`meta_params.AugmentationPipeline` (learned time warp with a per-example
magnitude CNN, base mask and noise, learned mask strength and noise scale), a
1-D ResNet and a projection head, the NT-Xent loss. Fine-tuning uses N labelled
records drawn from folds 1-9 (`ecg.ft_split`: 10 -> 5/5, 25 -> 15/10, else 80/20
FT-train/FT-val); the test set is fold 10; the metric is the ROC-AUC of the five
diagnostic superclasses, averaged.

Methods:
* `no_pt`: fine-tuning a freshly initialised ResNet;
* `simclr_fixed`: SimCLR with the augmentation pipeline frozen at its initial
  value (one PT run per seed, shared by every N);
* `simclr_meta`: online meta-PT (`online.run`) with the pipeline's parameters
  as phi, learned through the FT-val loss of a multi-label head after K
  unrolled FT steps on FT-train (one run per seed and N: the meta-objective
  uses that N's labelled records).

Both SimCLR methods run the same PT schedule (warm-up plus T x P steps) from the
same initialisation. The random draws of each PT batch's two views come from a
checkpointed generator through `MetaPretrainProblem.pt_batch_fn`, so all
evaluations of the SimCLR loss in one meta-step see the same views and a
resumed run draws what the uninterrupted one would have.

Every PT backbone is then fine-tuned on all N labelled records with a fresh
sigmoid head, `linear` (frozen backbone) and/or `full`, for about
`finetune.<mode>.steps` updates at `finetune.<mode>.learning_rate`. Everything
lands in `workdir`: one directory per seed/method/N (checkpoints, TensorBoard,
`result.json`; finished parts are skipped on a restart), `results.json`,
`results.md`, `augmentation.png` (the learned strengths over meta-training),
`augmented_examples.png` and a SavedModel of the first seed's meta-PT model (full
FT at the largest N), `export/<version>/`.

Under `meta.distribute="mirrored"` (R replicas) every part runs under the
strategy: the online loop splits each PT batch over the replicas after drawing
its views once for the global batch (`distribute`), and fine-tuning and
evaluation split their batches the same way (`finetune`). The NT-Xent loss is
not a mean over examples, so the loss of a shard is not its share of the loss of
the batch: the projections are gathered across replicas
(`contrastive.global_nt_xent_loss`, as SimCLR gathers them across TPU cores), and
every replica computes the loss of the whole global batch, with negatives from
all of it. Its gradient, HVPs (reverse over reverse) and mixed term then equal
the single-device ones; forward-mode JVPs do not pass through TensorFlow's
cross-replica all-gather, so `meta.hvp_mode="forward_over_reverse"` is refused
under the strategy. What differs from one device is batch norm in training mode
(the ResNet's and the augmentation pipeline's magnitude CNN's): each replica
normalises its shard by that shard's moments. `data.pt_batch_size` must be a
multiple of R. Mixed precision is refused.

Under "multi_worker_mirrored" every worker runs this same program; the
projections are gathered across all workers' replicas as above. Which parts a
previous run finished is read once, before any work, and the chief's reading is
used by every worker (`distribute.chief_flags`), so all skip the same parts. The
chief writes everything listed above; the other workers save their checkpoints
and SavedModel copies to temporary directories (`distribute.output_dir`), write
nothing else, and end with a line naming the chief's workdir.
"""

import dataclasses
import json
import math
import os
import time
from collections.abc import Callable, Sequence

import ml_collections
import numpy as np
import tensorflow as tf

import export
from metapt_tf.data import ecg
from metapt_tf.meta_params import AugmentationPipeline
from metapt_tf.models import projection_head, resnet1d_backbone
from metapt_tf.training import contrastive, distribute, finetune, interfaces, online, reporting
from metapt_tf.training.config_checks import config_error, require_int, require_positive

METHODS = ("no_pt", "simclr_fixed", "simclr_meta")
METHOD_NAMES = {
    "no_pt": "No PT",
    "simclr_fixed": "SimCLR, fixed augmentation",
    "simclr_meta": "SimCLR, meta-learned augmentation",
}
SOURCES = ("synthetic", "ptbxl")
FT_MODES = ("linear", "full")
INPUT_NAME = "ecg"


def validate_config(config: ml_collections.ConfigDict) -> None:
    """Raises ValueError naming the first bad field (before any training starts)."""
    if config.experiment != "ecg_simclr":
        raise config_error("experiment", config.experiment, "'ecg_simclr'")
    if not isinstance(config.seeds, tuple | list) or not config.seeds:
        raise config_error("seeds", config.seeds, "a non-empty tuple of ints")
    for name, allowed in (("methods", METHODS), ("finetune.modes", FT_MODES)):
        value = config.methods if name == "methods" else config.finetune.modes
        if not isinstance(value, tuple | list) or not value or any(v not in allowed for v in value):
            raise config_error(name, value, f"a non-empty tuple drawn from {allowed}")
    ns = config.num_labelled
    if (
        not isinstance(ns, tuple | list)
        or not ns
        or any(isinstance(n, bool) or not isinstance(n, int) or n < 2 for n in ns)
    ):
        raise config_error(
            "num_labelled", ns, "a non-empty tuple of ints >= 2 (labelled FT records)"
        )
    d = config.data
    if d.source not in SOURCES:
        raise config_error("data.source", d.source, f"one of {SOURCES}")
    if d.source == "ptbxl" and not d.dir:
        raise config_error(
            "data.dir", d.dir, "the PTB-XL directory (ptbxl_database.csv, records100/)"
        )
    for field in ("data.num_records", "data.pt_batch_size", "data.ft_batch_size"):
        require_int(config, field, 1)
    require_int(config, "data.length", 8)
    if not float(d.duration_s) > 0:
        raise config_error("data.duration_s", d.duration_s, "> 0 (seconds)")
    if d.max_test_records < 0 or not isinstance(d.max_test_records, int):
        raise config_error("data.max_test_records", d.max_test_records, "an int >= 0 (0: all)")
    m = config.model
    for field in ("channels", "blocks"):
        value = m[field]
        if (
            not isinstance(value, tuple | list)
            or not value
            or any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in value)
        ):
            raise config_error(f"model.{field}", value, "a non-empty tuple of ints >= 1")
    if len(m.channels) != len(m.blocks):
        raise config_error(
            "model.blocks", m.blocks, f"as long as model.channels ({len(m.channels)})"
        )
    for field in ("model.kernel_size", "model.projection_hidden", "model.projection_out"):
        require_int(config, field, 1)
    if not float(config.temperature) > 0:
        raise config_error("temperature", config.temperature, "> 0")
    a = config.augment
    for field in ("max_mask_fraction", "max_noise_scale", "initial_noise_scale"):
        if not 0.0 <= float(a[field]) <= 1.0:
            raise config_error(f"augment.{field}", a[field], "in [0, 1]")
    for field in ("augment.warp_channels", "augment.warp_conv_layers"):
        require_int(config, field, 1)
    if not float(a.initial_warp_scale) >= 0:
        raise config_error("augment.initial_warp_scale", a.initial_warp_scale, ">= 0")
    require_positive(config, "augment.network_meta_lr_scale")
    for mode in FT_MODES:
        require_int(config, f"finetune.{mode}.steps", 1)
        require_positive(config, f"finetune.{mode}.learning_rate")
    online.validate_config(config.meta)
    meta = config.meta
    if meta.mixed_precision != "none":
        raise config_error("meta.mixed_precision", meta.mixed_precision, "'none' here")
    if meta.distribute in ("mirrored", "multi_worker_mirrored"):
        if meta.hvp_mode == "forward_over_reverse":
            raise config_error(
                "meta.hvp_mode",
                meta.hvp_mode,
                f"'reverse_over_reverse' under meta.distribute={meta.distribute!r} (forward-mode "
                "JVPs do not pass through the cross-replica all-gather of the SimCLR projections)",
            )
        replicas = len([x for x in meta.devices.split(",") if x.strip()])
        if replicas and d.pt_batch_size % replicas:
            raise config_error(
                "data.pt_batch_size",
                d.pt_batch_size,
                f"a multiple of the {replicas} config.meta.devices",
            )


# ---------------------------------------------------------------------------
# Data


def prepare_data(config: ml_collections.ConfigDict, say) -> ecg.EcgData:
    d = config.data
    if d.source == "ptbxl":
        say(f"Loading PTB-XL from {d.dir} ...")
        return ecg.load_ptbxl(d.dir, length=d.length)
    return ecg.make_synthetic_ecg(
        d.num_records, length=d.length, seed=d.seed, duration_s=d.duration_s
    )


@dataclasses.dataclass
class _Splits:
    """Positions into the data's arrays."""

    pt: np.ndarray  # the SimCLR pool (folds 1-9), labels unused
    test: np.ndarray  # fold 10 (at most data.max_test_records of it)
    labelled: dict  # N -> (ft_train, ft_val), drawn from the PT pool


def make_splits(data: ecg.EcgData, config, seed: int) -> _Splits:
    pt = data.pt_indices
    test = data.test_indices
    cap = config.data.max_test_records
    if cap and test.size > cap:
        test = np.sort(np.random.default_rng(1234).choice(test, cap, replace=False))
    if test.size == 0:
        raise ValueError(f"{data.description}: the test fold {ecg.TEST_FOLD} is empty.")
    labelled = {}
    for n in config.num_labelled:
        if n > pt.size:
            raise ValueError(
                f"config.num_labelled has N={n}, more than the {pt.size} records of folds 1-9."
            )
        train, val = ecg.ft_split(data.labels[pt], n, seed=seed * 1000 + n)
        labelled[n] = (pt[train], pt[val])
    return _Splits(pt=pt, test=test, labelled=labelled)


def _labelled_dataset(data: ecg.EcgData, idx: np.ndarray, batch: int, seed: int) -> tf.data.Dataset:
    """Every labelled record each epoch (the last batch may be smaller), reshuffled per epoch."""
    ds = tf.data.Dataset.from_tensor_slices(
        {"signal": data.signals[idx], "label": data.labels[idx]}
    )
    return ds.shuffle(idx.size, seed=seed, reshuffle_each_iteration=True).batch(batch)


def _test_dataset(data: ecg.EcgData, idx: np.ndarray) -> tf.data.Dataset:
    return tf.data.Dataset.from_tensor_slices(
        {"signal": data.signals[idx], "label": data.labels[idx]}
    ).batch(256)


# ---------------------------------------------------------------------------
# Models and the SimCLR problem


def make_backbone(config) -> tf.keras.Model:
    m = config.model
    return resnet1d_backbone(
        num_leads=ecg.NUM_LEADS,
        length=config.data.length,
        channels=tuple(m.channels),
        blocks=tuple(m.blocks),
        kernel_size=m.kernel_size,
    )


def make_pipeline(config) -> AugmentationPipeline:
    a = config.augment
    return AugmentationPipeline(
        length=config.data.length,
        num_leads=ecg.NUM_LEADS,
        max_mask_fraction=a.max_mask_fraction,
        max_noise_scale=a.max_noise_scale,
        initial_noise_scale=a.initial_noise_scale,
        initial_s=math.sqrt(a.initial_warp_scale),
        channels=a.warp_channels,
        num_conv=a.warp_conv_layers,
    )


@dataclasses.dataclass
class SimclrProblem:
    """A SimCLR `MetaPretrainProblem` and its parts (for reports and export)."""

    problem: interfaces.MetaPretrainProblem
    backbone: tf.keras.Model
    head: tf.keras.Model
    pipeline: AugmentationPipeline
    generator: tf.random.Generator


def augmentation_summary(pipeline: AugmentationPipeline, probe: tf.Tensor) -> dict[str, float]:
    """The pipeline's strengths: warp scale g, mean per-example warp magnitude m(x) g on
    `probe`, learned noise scale and mask strength."""
    warp = pipeline.time_warp
    g = float(warp.global_scale())
    out = {
        "augment/warp_scale": g,
        "augment/warp_amplitude": g * float(tf.reduce_mean(warp.magnitude(probe))),
    }
    if pipeline.learned_noise is not None:
        out["augment/noise_scale"] = float(pipeline.learned_noise.scale())
    if pipeline.learned_mask is not None:
        out["augment/mask_strength"] = float(pipeline.learned_mask.strength())
    return out


def build_problem(config, seed: int, probe: np.ndarray | None = None) -> SimclrProblem:
    """A fresh ResNet, projection head and augmentation pipeline as a meta-PT problem.

    PT loss: NT-Xent of the projections of two views of the batch, both drawn
    by the pipeline with the draws made once per batch (`pt_batch_fn`); inside
    `strategy.run` the projections of every replica are gathered, so each
    replica's loss is that of the global batch (`contrastive.global_nt_xent_loss`).
    phi: the pipeline's variables. The FT task is the 5-label diagnosis on
    "signal". Build it in `distribute.scope(strategy)` to run it under a strategy.
    """
    tf.keras.utils.set_random_seed(seed)
    backbone = make_backbone(config)
    feature_dim = int(backbone.output_shape[-1])
    head = projection_head(feature_dim, config.model.projection_hidden, config.model.projection_out)
    pipeline = make_pipeline(config)
    generator = tf.random.Generator.from_seed(seed + 17)
    temperature = float(config.temperature)

    def pt_batch_fn(batch):
        # Static where the batch size is, so that the views split over replicas.
        size = batch["signal"].shape[0] or tf.shape(batch["signal"])[0]
        return {
            "signal": batch["signal"],
            "view_1": pipeline.sample_draws(size, generator),
            "view_2": pipeline.sample_draws(size, generator),
        }

    def pt_loss_fn(batch):
        x = batch["signal"]
        views = tf.concat(
            [
                pipeline.apply(x, batch["view_1"], training=True),
                pipeline.apply(x, batch["view_2"], training=True),
            ],
            axis=0,
        )
        z = head(backbone(views, training=True), training=True)
        z1, z2 = tf.split(z, 2, axis=0)
        return contrastive.global_nt_xent_loss(z1, z2, temperature)

    describe_fn = None
    if probe is not None:
        probe_tensor = tf.constant(probe)

        def describe_fn():
            return augmentation_summary(pipeline, probe_tensor)

    # The magnitude network at its own meta learning rate, the scalars at the configured one.
    network = {id(v) for v in pipeline.time_warp.network_variables}
    scales = [
        float(config.augment.network_meta_lr_scale) if id(v) in network else 1.0
        for v in pipeline.variables_list
    ]
    problem = interfaces.MetaPretrainProblem(
        backbone=backbone,
        pt_params=backbone.trainable_variables + head.trainable_variables,
        meta_params=pipeline.variables_list,
        meta_learning_rate_scales=scales,
        pt_loss_fn=pt_loss_fn,
        num_ft_classes=ecg.NUM_CLASSES,
        ft_input_key="signal",
        ft_label_key="label",
        ft_multilabel=True,
        describe_fn=describe_fn,
        pt_batch_fn=pt_batch_fn,
        checkpoint_extras={
            "view_generator": generator,
            # The magnitude CNN's batch-norm statistics.
            "pipeline_state": [v for v in pipeline.variables if not v.trainable],
            "projection_head": head.variables,
        },
    )
    return SimclrProblem(problem, backbone, head, pipeline, generator)


# ---------------------------------------------------------------------------
# One seed


def _json_load(path):
    with open(path) as f:
        return json.load(f)


class _Runner:
    def __init__(self, config, data: ecg.EcgData, workdir: str, seed: int, say, strategy=None):
        self.config, self.data, self.workdir, self.seed, self.say = config, data, workdir, seed, say
        self.strategy = strategy if strategy is not None else tf.distribute.get_strategy()
        self.splits = make_splits(data, config, seed)
        d = config.data
        pt = self.splits.pt
        self.pt_data = ecg.make_dataset(
            data.signals[pt], data.labels[pt], d.pt_batch_size, seed=seed
        )
        self.probe = data.signals[pt[:64]]

    def _ft_stream(self, idx: np.ndarray, offset: int) -> tf.data.Dataset:
        batch = min(self.config.data.ft_batch_size, idx.size)
        return ecg.make_dataset(
            self.data.signals[idx], self.data.labels[idx], batch, seed=self.seed + offset
        )

    def online_data(self, n: int) -> dict:
        """`online.run`'s pt_data, ft_train_data and ft_val_data for N=n (meta-PT's split)."""
        train, val = self.splits.labelled[n]
        return {
            "pt_data": self.pt_data,
            "ft_train_data": self._ft_stream(train, 1),
            "ft_val_data": self._ft_stream(val, 2),
        }

    def pretrain(self, run_dir: str, n: int, meta: bool) -> tuple[tf.keras.Model, dict]:
        c = self.config
        with distribute.scope(self.strategy):
            built = build_problem(c, self.seed, probe=self.probe if meta else None)
        meta_config = ml_collections.ConfigDict(c.meta.to_dict())
        meta_config.seed = self.seed
        meta_config.meta_enabled = meta
        if not meta:
            meta_config.head_steps_during_pt = False  # the FT head is not used
        result = online.run(
            built.problem,
            **self.online_data(n),
            config=meta_config,
            workdir=run_dir,
            log=self.say,
            strategy=self.strategy,
        )
        extra = {"pt_steps": result.pt_steps, "meta_steps": result.meta_steps}
        extra.update(augmentation_summary(built.pipeline, tf.constant(self.probe)))
        if meta:
            extra["skipped_meta_steps"] = result.skipped_meta_steps
            extra["history"] = {
                k: v
                for k, v in result.history.items()
                if k.startswith("augment/") or k in ("meta_step", "ft_val_loss")
            }
        self.last_pipeline = built.pipeline
        return built.backbone, extra

    def finetune(self, backbone, n: int, mode: str) -> finetune.MultilabelResult:
        c = self.config
        train, val = self.splits.labelled[n]
        idx = np.sort(np.concatenate([train, val]))
        batch = min(c.data.ft_batch_size, idx.size)
        return finetune.finetune_multilabel(
            backbone,
            lambda: make_backbone(c),
            _labelled_dataset(self.data, idx, batch, self.seed + 5),
            _test_dataset(self.data, self.splits.test),
            num_tasks=ecg.NUM_CLASSES,
            input_key="signal",
            label_key="label",
            mode=mode,
            epochs=finetune.epochs_for_steps(c.finetune[mode].steps, idx.size, batch),
            learning_rate=c.finetune[mode].learning_rate,
            seed=self.seed,
            strategy=self.strategy,
        )


def _export(model: tf.keras.Model, length: int, export_base: str) -> str:
    def serve(inputs):
        return {"probabilities": tf.sigmoid(model(inputs[INPUT_NAME], training=False))}

    return export.export_for_serving(
        model,
        serve,
        export_base,
        inputs={INPUT_NAME: tf.TensorSpec([None, length, ecg.NUM_LEADS], tf.float32)},
    )


# ---------------------------------------------------------------------------
# The benchmark


def run(
    config: ml_collections.ConfigDict,
    workdir: str,
    *,
    log: Callable[[str], None] | None = print,
) -> dict:
    """Runs every method, N and FT mode over `config.seeds`; returns the results."""
    validate_config(config)
    strategy = distribute.make_strategy(config.meta)  # before any other op runs
    chief = distribute.is_chief(strategy)
    say = log or (lambda _: None)
    start = time.perf_counter()
    os.makedirs(workdir, exist_ok=True)
    data = prepare_data(config, say)
    say(f"Data: {data.description}")
    ns = sorted(config.num_labelled)
    modes = list(config.finetune.modes)
    export_base = os.path.join(workdir, "export")
    # What a previous run finished, the same on every worker (`distribute.previous_run`).
    result_paths = {
        (seed, method, n): os.path.join(workdir, f"seed_{seed}", method, f"n_{n}", "result.json")
        for seed in config.seeds
        for method in config.methods
        for n in ns
    }
    finished, exported = distribute.previous_run(strategy, result_paths, export_base)
    export_key = (
        config.seeds[0],
        ns[-1],
        "full" if "full" in modes else modes[0],
    )
    per_run: list[dict] = []
    total = len(config.seeds) * len(config.methods) * len(ns)
    done = 0
    for seed in config.seeds:
        runner = _Runner(config, data, workdir, seed, say, strategy)
        say(
            f"Seed {seed}: {runner.splits.pt.size} PT records, {runner.splits.test.size} test "
            f"records."
        )
        fixed = None  # the fixed-augmentation PT: once per seed, for every N
        for method in config.methods:
            for n in ns:
                done += 1
                run_dir = os.path.join(workdir, f"seed_{seed}", method, f"n_{n}")
                result_path = result_paths[(seed, method, n)]
                say(
                    f"[{done}/{total}] seed {seed}, {METHOD_NAMES[method]}, N={n} "
                    f"({(time.perf_counter() - start) / 60:.1f} min so far)"
                )
                if (seed, method, n) in finished:
                    per_run.append(_json_load(result_path))
                    say("  done before: " + _auc_text(per_run[-1]))
                    continue
                os.makedirs(run_dir, exist_ok=True)
                extra: dict = {}
                if method == "no_pt":
                    backbone = None
                elif method == "simclr_fixed":
                    if fixed is None:
                        pt_dir = os.path.join(workdir, f"seed_{seed}", "simclr_fixed_pt")
                        fixed = runner.pretrain(pt_dir, ns[-1], meta=False)
                    backbone, extra = fixed
                else:
                    backbone, extra = runner.pretrain(run_dir, n, meta=True)
                entry = {"seed": seed, "method": method, "n": n, "test_auc": {}, **extra}
                for mode in modes:
                    tuned = runner.finetune(backbone, n, mode)
                    entry["test_auc"][mode] = tuned.test_auc
                    entry.setdefault("per_class_auc", {})[mode] = tuned.per_task_auc
                    if (
                        method == "simclr_meta"
                        and (seed, n, mode) == export_key
                        and config.export
                        and exported is None
                    ):
                        # Every worker saves (saving distributed variables can involve
                        # collectives); the others' copies go to a directory deleted after.
                        with distribute.output_dir(export_base, strategy) as base:
                            exported = _export(tuned.model, config.data.length, base)
                        if chief:
                            say(f"  SavedModel: {exported}")
                say("  " + _auc_text(entry))
                if chief:
                    reporting.write_json(result_path, entry)
                    per_run.append(_json_load(result_path))
                else:
                    per_run.append(reporting.to_jsonable(entry))

    if not chief:
        say(
            f"This is {distribute.worker_name(strategy)}, not the chief: the chief writes the "
            f"results, figures and SavedModel to {workdir}."
        )
        return _aggregate(config, data, per_run, None, time.perf_counter() - start)

    results = _aggregate(config, data, per_run, exported, time.perf_counter() - start)
    table = _table(config, results)
    paths = reporting.write_results(workdir, results, table)
    figures = _figures(config, data, per_run, workdir)
    say("\n" + table)
    say(f"\nResults:     {paths['json']}, {paths['markdown']}")
    for figure in figures:
        say(f"Figure:      {figure}")
    say(f"SavedModel:  {exported or 'not exported (config.export=False)'}")
    say(f"TensorBoard: tensorboard --logdir {workdir}")
    return results


def meta_gradient_noise(
    config: ml_collections.ConfigDict,
    *,
    n: int,
    at_pt_steps: Sequence[int],
    num_samples: int,
    seeds: Sequence[int] | None = None,
    log: Callable[[str], None] | None = print,
) -> list[dict]:
    """The meta-gradient's noise for the pipeline's three strengths, per seed and state.

    For each seed, the meta-PT run of `simclr_meta` at N = `n` up to its choice of
    phi: the same data, splits, model, pipeline at its initial value and loop
    settings; then PT with phi fixed, and at each of `at_pt_steps` PT steps
    `num_samples` meta-gradients from fresh batches and views
    (`online.sample_meta_gradients`). One row per seed, state and strength:
    "warp_scale" (the meta-gradient w.r.t. s, g = s^2), "noise_scale" (w.r.t.
    rho, scale = softplus(rho)) and "mask_strength" (w.r.t. phi, strength =
    sigmoid(phi)); each map is increasing, so a positive mean says the FT-val loss
    falls with a weaker augmentation. Each row holds the mean, standard deviation,
    standard error, signal-to-noise ratio (mean / sd) and fraction of positive
    samples (`online.MetaGradientSamples.summary`).
    """
    validate_config(config)
    if n not in tuple(config.num_labelled):
        raise ValueError(f"n={n} is not one of config.num_labelled {tuple(config.num_labelled)}.")
    say = log or (lambda _: None)
    data = prepare_data(config, say)
    rows = []
    for seed in config.seeds if seeds is None else seeds:
        runner = _Runner(config, data, "", int(seed), say)
        built = build_problem(config, int(seed))
        pipeline = built.pipeline
        parameters = {"warp_scale": pipeline.time_warp.s}
        if pipeline.learned_noise is not None:
            parameters["noise_scale"] = pipeline.learned_noise.rho
        if pipeline.learned_mask is not None:
            parameters["mask_strength"] = pipeline.learned_mask.phi
        meta_params = built.problem.meta_params
        index = {
            name: next(i for i, v in enumerate(meta_params) if v is var)
            for name, var in parameters.items()
        }
        meta_config = ml_collections.ConfigDict(config.meta.to_dict())
        meta_config.seed = int(seed)
        train, val = runner.splits.labelled[n]
        say(f"Seed {seed}, N={n}: {train.size} FT-train and {val.size} FT-val records.")
        for samples in online.sample_meta_gradients(
            built.problem,
            **runner.online_data(n),
            config=meta_config,
            at_pt_steps=at_pt_steps,
            num_samples=num_samples,
            log=say,
        ):
            for name, i in index.items():
                rows.append(
                    {
                        "seed": int(seed),
                        "n": n,
                        "pt_step": samples.pt_step,
                        "parameter": name,
                        **samples.summary(i),
                    }
                )
    return rows


def _auc_text(entry: dict) -> str:
    return "test AUC " + ", ".join(f"{m} {v:.4f}" for m, v in entry["test_auc"].items())


def _aggregate(config, data, per_run, exported, seconds) -> dict:
    summary: dict = {}
    for mode in config.finetune.modes:
        for method in config.methods:
            for n in sorted(config.num_labelled):
                aucs = [
                    r["test_auc"][mode]
                    for r in per_run
                    if r["method"] == method and r["n"] == n and mode in r["test_auc"]
                ]
                if aucs:
                    mean, std = reporting.mean_std(aucs)
                    cell = {"mean": mean, "std": std, "runs": aucs}
                    summary.setdefault(mode, {}).setdefault(method, {})[str(n)] = cell
    checks: dict = {}
    for mode, by_method in summary.items():
        if "simclr_meta" in by_method and "simclr_fixed" in by_method:
            for n, a in by_method["simclr_meta"].items():
                b = by_method["simclr_fixed"].get(n)
                if b is not None and int(n) <= 100:
                    checks.setdefault(mode, {})[f"n_{n}_meta_beats_fixed_by_more_than_std"] = bool(
                        a["mean"] - b["mean"] > max(a["std"], b["std"])
                    )
    learned: dict = {}
    for n in sorted(config.num_labelled):
        runs = [r for r in per_run if r["method"] == "simclr_meta" and r["n"] == n]
        keys = sorted({k for r in runs for k in r if k.startswith("augment/")})
        if runs:
            learned[str(n)] = {k: float(np.mean([r[k] for r in runs if k in r])) for k in keys}
    initial = [r for r in per_run if r["method"] == "simclr_fixed"]
    return {
        "experiment": config.experiment,
        "data": data.description,
        "seeds": list(config.seeds),
        "num_labelled": sorted(config.num_labelled),
        "test_auc": summary,
        "checks": checks,
        "learned_augmentation": learned,
        "initial_augmentation": (
            {k: v for k, v in initial[0].items() if k.startswith("augment/")} if initial else {}
        ),
        "runs": [{k: v for k, v in r.items() if k != "history"} for r in per_run],
        "export": exported,
        "seconds": seconds,
    }


def _table(config, results) -> str:
    ns = [str(n) for n in results["num_labelled"]]
    rows = []
    for mode in config.finetune.modes:
        for method in config.methods:
            cells = results["test_auc"].get(mode, {}).get(method, {})
            row = [f"{METHOD_NAMES[method]} ({mode} FT)"]
            for n in ns:
                cell = cells.get(n)
                row.append(f"{100 * cell['mean']:.1f} +- {100 * cell['std']:.1f}" if cell else "-")
            rows.append(row)
    n_seeds = len(results["seeds"])
    headers = [f"method: test AUROC ({n_seeds} seeds)"] + [f"N={n}" for n in ns]
    text = reporting.markdown_table(headers, rows)
    if results["learned_augmentation"]:
        keys = sorted({k for v in results["learned_augmentation"].values() for k in v})
        initial = results["initial_augmentation"]
        a_rows = []
        if initial:
            a_rows.append(
                ["initial (fixed)"] + [f"{initial.get(k, float('nan')):.3f}" for k in keys]
            )
        for n, stats in results["learned_augmentation"].items():
            a_rows.append([f"learned, N={n}"] + [f"{stats.get(k, float('nan')):.3f}" for k in keys])
        text += "\n\n" + reporting.markdown_table(
            ["augmentation"] + [k.split("/", 1)[1] for k in keys], a_rows
        )
    text += f"\n\nData: {results['data']}."
    return text


def _figures(config, data, per_run, workdir) -> list[str]:
    out = []
    runs = [r for r in per_run if r["method"] == "simclr_meta" and r.get("history")]
    if runs:
        out.append(_plot_augmentation(runs, os.path.join(workdir, "augmentation.png")))
    out.append(
        _plot_examples(config, data, per_run, os.path.join(workdir, "augmented_examples.png"))
    )
    return out


def _plot_augmentation(runs: list[dict], path: str) -> str:
    """One panel per learned strength: its value over meta-steps, a line per (N, seed)."""
    keys = sorted({k for r in runs for k in r["history"] if k.startswith("augment/")})
    fig = reporting._new_figure((3.2 * len(keys), 3.0))
    for i, key in enumerate(keys):
        ax = fig.add_subplot(1, len(keys), i + 1)
        for r in runs:
            h = r["history"]
            pairs = [
                (s, v)
                for s, v in zip(h.get("meta_step", []), h.get(key, []), strict=False)
                if v is not None and s is not None
            ]
            if pairs:
                steps, values = zip(*pairs, strict=True)
                ax.plot(steps, values, label=f"N={r['n']}, seed {r['seed']}", lw=1)
        ax.set_title(key.split("/", 1)[1])
        ax.set_xlabel("meta-step")
        ax.grid(alpha=0.3)
    fig.axes[0].legend(fontsize=6)
    fig.suptitle("Learned augmentation strengths during meta-PT")
    return reporting._save_png(fig, path)


def _plot_examples(config, data: ecg.EcgData, per_run: list[dict], path: str) -> str:
    """Lead II of one PT record and three views of it from the initial pipeline."""
    pipeline = make_pipeline(config)
    generator = tf.random.Generator.from_seed(0)
    x = tf.constant(data.signals[data.pt_indices[:1]])
    fig = reporting._new_figure((8.0, 6.0))
    signals = [("original", x.numpy()[0])]
    signals += [
        (f"view {i + 1}, initial pipeline", pipeline(x, generator).numpy()[0]) for i in range(3)
    ]
    for i, (title, signal) in enumerate(signals):
        ax = fig.add_subplot(len(signals), 1, i + 1)
        ax.plot(signal[: data.num_samples, 1], lw=0.8)
        ax.set_title(f"lead II: {title}", fontsize=8)
        ax.tick_params(labelsize=6)
    return reporting._save_png(fig, path)
