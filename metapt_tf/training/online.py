"""The online meta-PT loop: the paper's Algorithm 1, resumable and observable.

    warm-up: `warmup_steps` plain PT steps (phi fixed)
    for each of T meta-steps:
        P PT steps with the current phi (optionally one plain FT-head step each)
        K differentiable FT-head steps, FT val loss, v = dL_val/dtheta
        meta-gradient -(d2L_PT/dphi dtheta) H^{-1} v on a fresh PT batch
        a meta-optimizer step on phi (skipped and counted if non-finite)

The FT head is a linear layer on the shared backbone. It is persistent (the
unrolled head and its optimizer state are kept, as in the released code),
re-initialised before every meta-step, or, when the FT task is the PT task
(same classes, e.g. clean labels for noisy PT labels), the PT head itself:
FT then starts from the PT model and v covers the PT head too. A persistent or
re-initialised head can be cross-fitted (`ft_cross_fit`): two heads, each trained
on one of FT-train and FT-val and validated on the other, or, given k folds (FT
data as sequences of k datasets), k heads, head i trained on the other folds and
validated on fold i; either way every labelled FT example is FT-val data. With
`meta_enabled=False` the same schedule runs without meta-steps: the plain-PT
baseline.

Everything a resumed run needs is checkpointed with `tf.train.CheckpointManager`:
theta, phi, the FT head and its optimizer state, the PT and meta optimizers, the
step counters, the random generator, the data iterators, and the host-side
history. A run killed at any point and restarted with the same arguments ends
with the same phi when its ops are deterministic
(`tf.config.experimental.enable_op_determinism()`, as the tests run it). The
ECG benchmark's meta-PT is not reproducible bit for bit between processes on
CPU even so (the README's ECG section).

Faults, and what the loop does about each:

* A NaN/Inf in a PT step's batch, loss or gradient (warm-up or meta-PT) stops
  the run with `NonFiniteLossError` naming the PT step, the meta-step and which
  of the three it was; nothing is saved after it, so the last checkpoint is
  from before. A PT step is not skipped: PT data or a learning rate that
  produce NaN need a person.
* A non-finite meta-gradient -- from a NaN/Inf in the meta-step's FT-train,
  FT-val or PT batch, or from the solver -- skips that meta-update: phi, its
  optimizer and the persistent FT head keep their values; it is counted
  (`skipped_meta_steps`, in the result and the history) and logged, naming the
  batch. Batches are checked themselves, not only what is computed from them:
  oneDNN's fused MatMul+ReLU can turn a NaN input into a zero activation.
* A plain FT-head step during PT with a NaN/Inf in its FT-train batch or
  update is skipped the same way (the head keeps its value), counted
  (`skipped_head_steps`) and logged.
* On resume, the newest checkpoint that restores is used: one that fails to
  restore (truncated, corrupted, unreadable) is logged as a warning naming it
  and the error, moved aside (`<name>.corrupt`), and the one before it is
  tried. If none restores, `CheckpointRestoreError` names the directory; the
  run never starts from scratch over existing checkpoints. History records
  past the restored step are dropped.

TensorBoard scalars, histograms and images go to `workdir`, and a progress line
with rate and ETA to `log` at every logging step.

The loop runs under the `tf.distribute` strategy `config.meta.distribute` names
(one device by default, `MirroredStrategy`, `MultiWorkerMirroredStrategy`,
`TPUStrategy`),
optionally in mixed precision (`config.meta.mixed_precision`); `distribute`
says how each step is split over the replicas. The compiled steps read batches
and update the loop's variables in cross-replica context and leave the
arithmetic to per-replica functions (`_replica_*`), which are what
`config.meta.jit_compile` compiles with XLA.
"""

import dataclasses
import glob
import json
import os
import re
import time
from collections.abc import Callable, Sequence

import ml_collections
import numpy as np
import tensorflow as tf
from absl import logging

from metapt_tf import hypergrad
from metapt_tf.training import distribute, interfaces, reporting, tracing

FT_OPTIMIZERS = ("adam", "sgd", "momentum")
HEAD_MODES = ("persistent", "reinit", "pt_head")
SOLVERS = ("neumann", "amortized_neumann", "cg", "identity")
OPTIMIZERS = ("adam", "sgd")
META_OPTIMIZERS = ("adam", "sgd", "normalized_sgd")
META_LR_DECAYS = ("none", "linear", "cosine")


class NonFiniteLossError(FloatingPointError):
    """A PT batch, the PT loss or its gradient was NaN or Inf; the message names the step."""


class CheckpointRestoreError(RuntimeError):
    """No checkpoint of a run's directory could be restored; the message names it."""


def default_config() -> ml_collections.ConfigDict:
    """The online loop's settings (an experiment's `config.meta`)."""
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.warmup_steps = 100  # plain PT steps before the first meta-step
    c.pt_steps_per_meta_step = 10  # P
    c.num_meta_steps = 100  # T
    c.meta_enabled = True  # False: the same PT schedule without meta-steps (baseline)
    c.pt_optimizer = "adam"
    c.pt_learning_rate = 1e-3
    c.ft_unroll_steps = 1  # K
    c.ft_optimizer = "adam"
    c.ft_learning_rate = 1e-3
    c.head = "persistent"  # "reinit", or "pt_head" (FT starts from the PT head itself)
    c.head_steps_during_pt = True  # one plain FT-head step per PT step (persistent head)
    # Cross-fitted FT heads: two heads, one trained on FT-train and validated on FT-val,
    # the other the other way round, or with FT data given as k folds (`run`), k heads;
    # v is the gradient of their mean val loss. Every labelled FT example then serves
    # as FT-val, and no head is validated on its own training data. One implicit solve
    # for all (v is linear in the val losses); the FT unroll and the plain FT-head
    # steps cost once per head. "persistent" or "reinit" heads.
    c.ft_cross_fit = False
    c.solver = "neumann"
    c.neumann_terms = 1
    # A number > 0, or "auto" (power iteration for the top eigenvalue; typed `object` so
    # that configs and --config.meta.neumann_alpha=auto on the command line can set it).
    c.neumann_alpha = ml_collections.FieldReference(1e-3, field_type=object)
    # "amortized_neumann": one Neumann step per meta-step on an iterate kept across
    # meta-steps, x <- alpha v + neumann_decay (I - alpha H) x, a damped series of about
    # 1 / (1 - neumann_decay) terms for one HVP (two with alpha "auto").
    c.neumann_decay = 0.95
    c.cg_max_iters = 20
    c.cg_damping = 1e-3
    c.hvp_mode = hypergrad.DEFAULT_HVP_MODE
    # "normalized_sgd": SGD on g / ||g||. Adam's per-coordinate scaling turns sparse
    # per-example meta-gradients into sign votes and loses their relative sizes.
    c.meta_optimizer = "adam"
    c.meta_learning_rate = 1e-2
    # "linear" / "cosine": the meta learning rate decays to 0 over the meta-steps, so
    # late meta-gradients (noisier once PT has converged) move phi less.
    c.meta_lr_decay = "none"
    # Meta-steps over which it decays (0: all of them). Past them the meta learning rate
    # is 0: the remaining PT steps run with phi fixed and no meta-gradient is computed.
    c.meta_lr_decay_steps = 0
    c.meta_grad_clip_norm = 0.0  # > 0: clip the meta-gradient's global norm to this first
    c.log_every = 10  # meta-steps (warm-up logs every log_every * P PT steps)
    c.checkpoint_every = 25  # meta-steps
    c.max_checkpoints = 2
    c.jit_compile = False  # XLA-compile the per-replica meta-step (GPU replicas if R > 1)
    c.distribute = "default"  # one of distribute.STRATEGIES
    c.devices = ""  # "mirrored": comma-separated devices, e.g. "/gpu:0,/gpu:1"; "": all GPUs
    # ("tpu": the TPU's name or grpc:// address; "": the TPU VM's own or TPU_NAME)
    c.mixed_precision = "none"  # or "mixed_bfloat16", "mixed_float16" (distribute.PRECISIONS)
    return c


def _fail(field: str, value, expected: str) -> ValueError:
    return ValueError(
        f"config.meta.{field} must be {expected}. Received: config.meta.{field}={value!r}."
    )


def _check_ft_data(ft_train_data, ft_val_data, cross_fit: bool) -> int:
    """The number of cross-fitting folds given as sequences of datasets (0: datasets).

    Raises ValueError for sequences without `ft_cross_fit`, of other lengths, of
    fewer than 2 folds, or a sequence next to a single dataset.
    """
    seqs = [isinstance(d, list | tuple) for d in (ft_train_data, ft_val_data)]
    if not any(seqs):
        return 0
    if not all(seqs) or len(ft_train_data) != len(ft_val_data) or len(ft_val_data) < 2:
        lengths = [
            len(d) if s else "a dataset"
            for d, s in zip((ft_train_data, ft_val_data), seqs, strict=True)
        ]
        raise ValueError(
            "Cross-fitted folds need ft_train_data and ft_val_data as sequences of the "
            "same length k >= 2 (head i trains on ft_train_data[i] and is validated on "
            f"ft_val_data[i]). Received: {lengths[0]} and {lengths[1]}."
        )
    if not cross_fit:
        raise ValueError(
            f"ft_train_data and ft_val_data are {len(ft_val_data)} folds, which need "
            "config.meta.ft_cross_fit=True. Received: config.meta.ft_cross_fit=False."
        )
    return len(ft_val_data)


def validate_config(c: ml_collections.ConfigDict) -> None:
    """Raises ValueError naming the first bad field of the loop's config."""
    known = set(default_config().keys())
    unknown = sorted(set(c.keys()) - known)
    if unknown:
        raise ValueError(
            f"Unknown field(s) config.meta.{', config.meta.'.join(unknown)}. "
            f"Valid fields: {', '.join(sorted(known))}."
        )

    def integer(field, minimum):
        v = c[field]
        if isinstance(v, bool) or not isinstance(v, int) or v < minimum:
            raise _fail(field, v, f"an int >= {minimum}")

    def positive(field):
        v = c[field]
        if isinstance(v, bool) or not isinstance(v, int | float) or not v > 0:
            raise _fail(field, v, "a number > 0")

    def choice(field, options):
        if c[field] not in options:
            raise _fail(field, c[field], f"one of {options}")

    for field in ("seed", "warmup_steps", "num_meta_steps", "neumann_terms", "meta_lr_decay_steps"):
        integer(field, 0)
    for field in (
        "pt_steps_per_meta_step",
        "ft_unroll_steps",
        "cg_max_iters",
        "log_every",
        "checkpoint_every",
        "max_checkpoints",
    ):
        integer(field, 1)
    for field in ("pt_learning_rate", "ft_learning_rate", "meta_learning_rate"):
        positive(field)
    decay = c.neumann_decay
    if isinstance(decay, bool) or not isinstance(decay, int | float) or not 0 <= decay < 1:
        raise _fail("neumann_decay", decay, "a number in [0, 1)")
    for field in ("cg_damping", "meta_grad_clip_norm"):
        v = c[field]
        if isinstance(v, bool) or not isinstance(v, int | float) or v < 0:
            raise _fail(field, v, "a number >= 0")
    alpha = c.neumann_alpha
    if alpha != "auto" and (
        isinstance(alpha, bool) or not isinstance(alpha, int | float) or not alpha > 0
    ):
        raise _fail("neumann_alpha", alpha, "a number > 0 or 'auto'")
    choice("pt_optimizer", OPTIMIZERS)
    choice("meta_optimizer", META_OPTIMIZERS)
    choice("meta_lr_decay", META_LR_DECAYS)
    if c.meta_lr_decay == "none" and c.meta_lr_decay_steps:
        raise _fail(
            "meta_lr_decay_steps",
            c.meta_lr_decay_steps,
            "0 unless config.meta.meta_lr_decay is 'linear' or 'cosine' (it sets their horizon)",
        )
    choice("ft_optimizer", FT_OPTIMIZERS)
    choice("head", HEAD_MODES)
    choice("solver", SOLVERS)
    choice("hvp_mode", hypergrad.HVP_MODES)
    choice("distribute", distribute.STRATEGIES)
    choice("mixed_precision", distribute.PRECISIONS)
    if not isinstance(c.devices, str):
        raise _fail("devices", c.devices, 'a string of comma-separated devices (or "")')
    if c.devices.strip() and c.distribute not in ("mirrored", "tpu"):
        raise _fail(
            "devices",
            c.devices,
            "\"\" unless config.meta.distribute is 'mirrored' (devices) or 'tpu' (its name)",
        )
    if c.solver == "amortized_neumann" and alpha == "auto" and c.distribute != "default":
        raise _fail(
            "neumann_alpha",
            alpha,
            f"a number with config.meta.solver='amortized_neumann' under "
            f"config.meta.distribute={c.distribute!r}: its power iteration runs in a tf.cond, "
            "where the replicas' all-reduces cannot run",
        )
    for field in ("meta_enabled", "head_steps_during_pt", "ft_cross_fit", "jit_compile"):
        if not isinstance(c[field], bool):
            raise _fail(field, c[field], "a bool")
    if c.ft_cross_fit and c.head == "pt_head":
        raise _fail(
            "ft_cross_fit",
            c.ft_cross_fit,
            "False with config.meta.head='pt_head' (the PT head is one head, trained by PT)",
        )


def make_solver(
    c: ml_collections.ConfigDict, unroll_cg: bool = False
) -> hypergrad.InverseHvpSolver:
    """The config's solver; `unroll_cg` runs CG as a Python loop (see `distribute`)."""
    if c.solver == "neumann":
        return hypergrad.Neumann(num_terms=c.neumann_terms, alpha=c.neumann_alpha)
    if c.solver == "amortized_neumann":
        return hypergrad.AmortizedNeumann(alpha=c.neumann_alpha, decay=c.neumann_decay)
    if c.solver == "cg":
        return hypergrad.ConjugateGradient(
            max_iters=c.cg_max_iters, damping=c.cg_damping, unroll=unroll_cg
        )
    alpha = 1.0 if c.neumann_alpha == "auto" else c.neumann_alpha
    return hypergrad.Identity(alpha=alpha)


def make_ft_update_rule(c: ml_collections.ConfigDict) -> hypergrad.UpdateRule:
    if c.ft_optimizer == "adam":
        return hypergrad.Adam(c.ft_learning_rate)
    if c.ft_optimizer == "momentum":
        return hypergrad.Momentum(c.ft_learning_rate)
    return hypergrad.SGD(c.ft_learning_rate)


def _keras_optimizer(name: str, learning_rate: float):
    if name == "adam":
        return tf.keras.optimizers.Adam(learning_rate)
    return tf.keras.optimizers.SGD(learning_rate)


def total_pt_steps(c: ml_collections.ConfigDict) -> int:
    """PT steps of a run: the warm-up, then P per meta-step (also with meta-steps off)."""
    return c.warmup_steps + c.num_meta_steps * c.pt_steps_per_meta_step


def meta_lr_decay_steps(c: ml_collections.ConfigDict) -> int | None:
    """Meta-steps after which the meta learning rate is 0; None if it never is."""
    if c.meta_lr_decay == "none":
        return None
    return max(c.meta_lr_decay_steps or c.num_meta_steps, 1)


def _meta_learning_rate(c: ml_collections.ConfigDict, scale: float = 1.0):
    steps = meta_lr_decay_steps(c)
    rate = c.meta_learning_rate * scale
    if c.meta_lr_decay == "linear":
        return tf.keras.optimizers.schedules.PolynomialDecay(rate, steps, 0.0)
    if c.meta_lr_decay == "cosine":
        return tf.keras.optimizers.schedules.CosineDecay(rate, steps)
    return rate


def _meta_param_groups(scales, num_params: int) -> list[tuple[float, list[int]]]:
    """(scale, indices of the meta-parameters with that learning-rate scale), in order."""
    groups: dict[float, list[int]] = {}
    for i, scale in enumerate(scales if scales is not None else [1.0] * num_params):
        groups.setdefault(float(scale), []).append(i)
    return list(groups.items())


@dataclasses.dataclass
class OnlineResult:
    """What `run` returns.

    Attributes:
      history: per logging step: "meta_step", "pt_step", "pt_loss", "ft_val_loss",
        "ft_train_loss", "meta_grad_norm", "solver_residual", "steps_per_sec", and
        whatever the problem's `describe_fn` returned: lists with one entry per
        logging step (None where a step did not log that key, e.g. warm-up).
      meta_steps: meta-steps completed; pt_steps: PT steps completed.
      skipped_meta_steps: meta-updates skipped for a non-finite meta-gradient.
      resumed_from: the meta-step the run resumed at (None for a fresh start).
      seconds: wall time of this invocation.
      skipped_head_steps: plain FT-head steps during PT skipped for a non-finite
        update (an FT-train batch with a NaN or Inf).
      restored_from: the checkpoint the run resumed from (None for a fresh start).
    """

    history: dict[str, list]
    meta_steps: int
    pt_steps: int
    skipped_meta_steps: int
    resumed_from: int | None
    seconds: float
    skipped_head_steps: int = 0
    restored_from: str | None = None


def _to_jsonable(value):
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    return value


def _finite(structure) -> tf.Tensor:
    """True iff every float tensor in `structure` (batches, GraphTensors included) is finite.

    Checked on the batches themselves, not only on what is computed from them: with
    oneDNN's fused MatMul+ReLU a NaN input can come out as a zero activation, so a
    NaN batch may leave no trace in a loss (observed with TF 2.21 on CPU).
    """
    checks = [
        tf.reduce_all(tf.math.is_finite(t))
        for t in tf.nest.flatten(structure, expand_composites=True)
        if isinstance(t, tf.Tensor) and t.dtype.is_floating
    ]
    return tf.reduce_all(checks) if checks else tf.constant(True)


# Why a PT step is bad, by priority (codes returned by the compiled PT steps).
_PT_OK, _PT_BAD_BATCH, _PT_BAD_LOSS, _PT_BAD_GRADIENT = 0, 1, 2, 3


class _Loop:
    """The loop's state and compiled steps; `run` drives it.

    Each compiled step (`_pt_steps`, `_meta_step`, `_apply_meta`) reads batches and
    updates the loop's variables in cross-replica context, and hands the arithmetic
    to a per-replica function through `strategy.run`; with one replica (the
    default strategy) that is a plain call.
    """

    def __init__(
        self,
        problem: interfaces.MetaPretrainProblem,
        pt_data: tf.data.Dataset,
        ft_train_data: tf.data.Dataset | Sequence[tf.data.Dataset],
        ft_val_data: tf.data.Dataset | Sequence[tf.data.Dataset],
        c: ml_collections.ConfigDict,
        meta_pt_data: tf.data.Dataset | None = None,
        strategy: tf.distribute.Strategy | None = None,
    ):
        self.problem = problem
        self.c = c
        self.strategy = strategy if strategy is not None else tf.distribute.get_strategy()
        distribute.check_strategy(self.strategy, c.distribute)
        distribute.check_variables(
            self.strategy, list(problem.pt_params) + list(problem.meta_params), "The problem's"
        )
        self.replicas = distribute.Replicas(self.strategy)
        self.dtype = problem.pt_params[0].dtype
        distribute.check_precision(problem.backbone, self.dtype, c.mixed_precision)
        if c.jit_compile:
            distribute.check_jit(self.strategy)
        self.loss_scaled = c.mixed_precision == "mixed_float16"
        self.pt_params = list(problem.pt_params)
        self.meta_params = list(problem.meta_params)
        self.pt_iter = iter(pt_data)
        # One FT-train and one FT-val iterator per head. Cross-fitted on two datasets,
        # the second head trains on FT-val and is validated on FT-train (the same two
        # iterators); on sequences of k datasets, head i trains on ft_train_data[i]
        # and is validated on ft_val_data[i] (k folds: fold i and the other folds).
        folds = _check_ft_data(ft_train_data, ft_val_data, c.ft_cross_fit)
        if folds:
            self.ft_train_iters = [iter(d) for d in ft_train_data]
            self.ft_val_iters = [iter(d) for d in ft_val_data]
            self._ft_iterators = {
                **{f"ft_train_iterator_{i}": it for i, it in enumerate(self.ft_train_iters)},
                **{f"ft_val_iterator_{i}": it for i, it in enumerate(self.ft_val_iters)},
            }
        else:
            train, val = iter(ft_train_data), iter(ft_val_data)
            self._ft_iterators = {"ft_train_iterator": train, "ft_val_iterator": val}
            self.ft_train_iters, self.ft_val_iters = [train], [val]
            if c.ft_cross_fit:
                self.ft_train_iters, self.ft_val_iters = [train, val], [val, train]
        self._num_heads = len(self.ft_train_iters)
        # The meta-step's PT batch: from its own pipeline (e.g. larger batches, so
        # that more per-example weights get a meta-gradient each step) or the PT one.
        self.meta_pt_iter = iter(meta_pt_data) if meta_pt_data is not None else self.pt_iter
        self.ft_rule = make_ft_update_rule(c)
        # Under Mirrored strategies all-reduces cannot run inside a tf.while_loop.
        self.solver = make_solver(c, unroll_cg=distribute.strategy_kind(self.strategy) != "default")

        feature_dim = int(problem.backbone.output_shape[-1])
        if c.head == "pt_head":
            expected = [(feature_dim, problem.num_ft_classes), (problem.num_ft_classes,)]
            got = [tuple(v.shape) for v in problem.pt_head_params or []]
            if got != expected:
                raise ValueError(
                    "config.meta.head='pt_head' needs problem.pt_head_params = [kernel, bias] "
                    f"of shapes {expected} (features -> FT classes). Received shapes {got}."
                )
        with self.strategy.scope():
            self.generator = tf.random.Generator.from_seed(c.seed)
            self.pt_optimizer = _keras_optimizer(c.pt_optimizer, c.pt_learning_rate)
            if self.loss_scaled:
                self.pt_optimizer = tf.keras.mixed_precision.LossScaleOptimizer(self.pt_optimizer)
            # One meta optimizer per learning-rate scale (a single one by default).
            self.meta_groups = _meta_param_groups(
                problem.meta_learning_rate_scales, len(self.meta_params)
            )
            self.meta_optimizers = []
            for scale, indices in self.meta_groups:
                optimizer = _keras_optimizer(
                    "sgd" if c.meta_optimizer == "normalized_sgd" else c.meta_optimizer,
                    _meta_learning_rate(c, scale),
                )
                optimizer.build([self.meta_params[i] for i in indices])
                self.meta_optimizers.append(optimizer)
            self.pt_optimizer.build(self.pt_params)
            head = self._init_heads(feature_dim)
            # [kernel, bias] per head, the heads one after the other (two if cross-fitted).
            self.head = [tf.Variable(h, name=f"ft_head_{i}") for i, h in enumerate(head)]
            state = self.ft_rule.init([h.read_value() for h in self.head])
            self.head_state = tf.nest.map_structure(
                lambda t: tf.Variable(t, trainable=False), state
            )
            self.pt_step = tf.Variable(0, dtype=tf.int64, trainable=False, name="pt_step")
            self.meta_step = tf.Variable(0, dtype=tf.int64, trainable=False, name="meta_step")
            self.skipped = tf.Variable(0, dtype=tf.int64, trainable=False, name="skipped")
            if isinstance(self.solver, hypergrad.AmortizedNeumann):
                self.solver.build(self.pt_params)  # its iterate, kept across meta-steps

        self.checkpoint = tf.train.Checkpoint(
            pt_params=self.pt_params,
            meta_params=self.meta_params,
            ft_head=self.head,
            ft_head_state=tf.nest.flatten(self.head_state),
            pt_optimizer=self.pt_optimizer,
            # The first under its old name, so checkpoints with one meta optimizer restore.
            **{
                f"meta_optimizer_{k}" if k else "meta_optimizer": o
                for k, o in enumerate(self.meta_optimizers)
            },
            pt_step=self.pt_step,
            meta_step=self.meta_step,
            skipped=self.skipped,
            **({"solver_state": self.solver.variables} if self.solver.variables else {}),
            generator=self.generator,
            pt_iterator=self.pt_iter,
            **self._ft_iterators,
            # Batch-norm statistics and the like: not trained, but part of the state.
            model_state=[v for v in problem.backbone.variables if not v.trainable],
            extras=dict(problem.checkpoint_extras or {}),
            **({} if meta_pt_data is None else {"meta_pt_iterator": self.meta_pt_iter}),
        )
        distributed = self.replicas.num_replicas > 1
        self.meta_gradient = hypergrad.MetaGradient(
            pt_loss_fn=self._meta_pt_loss,  # the batch went through _pt_batch first
            ft_train_loss_fn=self._ft_train_loss,
            ft_val_loss_fn=self._ft_loss,
            pt_params=self.pt_params,
            meta_params=self.meta_params,
            ft_update_rule=self.ft_rule,
            num_ft_steps=c.ft_unroll_steps,
            solver=self.solver,
            hvp_mode=c.hvp_mode,
            compile=False,  # compiled as part of _meta_step below
            reduce_fn=self._reduce if distributed or self.loss_scaled else None,
        )
        # Traced on first use, once each (`tracing.traced_once`): a benchmark runs many
        # loops in one process, and TensorFlow took their first traces for retracing.
        self._traced: dict[str, Callable] = {}
        # XLA compiles the per-replica arithmetic only: the iterators stay outside.
        self._replica_meta_step_fn = (
            tf.function(self._replica_meta_step, jit_compile=True, autograph=False)
            if c.jit_compile
            else self._replica_meta_step
        )

    # Losses. A replica's PT loss is its shard's share of the global mean loss.
    def _pt_loss(self, batch):
        loss = tf.cast(self.problem.pt_loss_fn(batch), self.dtype)
        if self.replicas.num_replicas > 1:
            loss = loss / tf.cast(self.replicas.num_replicas, self.dtype)
        return loss

    def _loss_scale(self):
        return tf.cast(self.pt_optimizer.loss_scale, self.dtype)

    def _meta_pt_loss(self, batch):
        loss = self._pt_loss(batch)
        return loss * self._loss_scale() if self.loss_scaled else loss

    def _reduce(self, values):
        """HVPs and the mixed term: summed over replicas, and unscaled (mixed_float16)."""
        values = self.replicas.all_reduce_sum(values)
        if self.loss_scaled:
            scale = self._loss_scale()
            values = [x / scale for x in values]
        return values

    @property
    def num_heads(self) -> int:
        return self._num_heads

    def _init_heads(self, feature_dim: int) -> list[tf.Tensor]:
        """Fresh FT heads from the loop's generator, [kernel, bias] each, one after the other."""
        heads = []
        for _ in range(self.num_heads):
            heads += interfaces.init_head(
                feature_dim, self.problem.num_ft_classes, self.generator, self.dtype
            )
        return heads

    # FT losses: each head on backbone features in inference mode. Under mixed
    # precision the backbone computes in 16 bits and the head in the variables' dtype.
    # Cross-fitted, an FT batch is a pair, one batch per head (_ft_batches).
    def _head_losses(self, head, batch, detach: bool = False) -> list[tf.Tensor]:
        batches = batch if self.c.ft_cross_fit else (batch,)
        losses = []
        for k, one in enumerate(batches):
            features = self.problem.backbone(one[self.problem.ft_input_key], training=False)
            features = tf.cast(features, head[0].dtype)
            if detach:
                features = tf.stop_gradient(features)
            logits = interfaces.head_logits(features, head[2 * k : 2 * k + 2])
            losses.append(
                interfaces.head_loss(
                    logits, one[self.problem.ft_label_key], self.problem.ft_multilabel
                )
            )
        return losses

    def _ft_loss(self, head, batch):
        """The FT val loss: the heads' mean."""
        return tf.add_n(self._head_losses(head, batch)) / self.num_heads

    def _ft_train_loss(self, head, batches, step):
        # The heads' sum: each head's gradient is that of its own loss, as if alone.
        return tf.add_n(self._head_losses(head, batches[step]))

    def _ft_train_batch(self):
        """The FT batch of one head step, plain or unrolled.

        Cross-fitted, each FT batch is a tuple with one batch per head, from that
        head's FT-train iterator (`ft_train_iters`).
        """
        if not self.c.ft_cross_fit:
            return next(self.ft_train_iters[0])
        return tuple(next(it) for it in self.ft_train_iters)

    def _ft_batches(self) -> tuple[list, object]:
        """K FT-train batches and an FT-val batch for the meta-step."""
        train = [self._ft_train_batch() for _ in range(self.c.ft_unroll_steps)]
        if not self.c.ft_cross_fit:
            return train, next(self.ft_val_iters[0])
        return train, tuple(next(it) for it in self.ft_val_iters)

    def _pt_batch(self, iterator):
        batch = next(iterator)
        if self.problem.pt_batch_fn is not None:
            batch = self.problem.pt_batch_fn(batch)
        return batch

    def _shard(self, batch):
        """This replica's piece of a global PT batch (the problem's `pt_shard_fn` if any)."""
        return self.replicas.shard(batch, shard_fn=self.problem.pt_shard_fn)

    # Per-replica functions: arithmetic only, no iterators and no loop variables written.
    def _replica_pt_step(self, batch):
        with tf.GradientTape() as tape:
            loss = self._pt_loss(self._shard(batch))
            scaled = self.pt_optimizer.get_scaled_loss(loss) if self.loss_scaled else loss
        grads = tape.gradient(scaled, self.pt_params)
        if self.loss_scaled:
            grads = self.pt_optimizer.get_unscaled_gradients(grads)
        # The optimizer sums the gradients over replicas before applying them.
        self.pt_optimizer.apply_gradients(zip(grads, self.pt_params, strict=True))
        # 1 where this replica's gradient has a NaN/Inf (summed over replicas by the caller).
        return loss, tf.cast(tf.logical_not(_finite(grads)), tf.int32)

    def _replica_head_step(self, batch, head, state):
        """One ordinary (non-differentiated) FT-head step on detached features."""
        with tf.GradientTape() as tape:
            tape.watch(head)
            loss = tf.add_n(self._head_losses(head, batch, detach=True))
        return self.ft_rule.apply(head, tape.gradient(loss, head), state)

    def _replica_meta_step(self, pt_batch, ft_batches, val_batch, head, state):
        if head is None:
            # The PT head variables themselves: read inside the unroll's tape, so v
            # reaches them. Nothing is copied back; PT keeps training its head.
            head = list(self.problem.pt_head_params)
            state = self.ft_rule.init([h.read_value() for h in head])
        result = self.meta_gradient(self._shard(pt_batch), ft_batches, val_batch, head, state)
        out = {
            "grads": result.meta_grads,
            "ft_val_loss": result.ft_val_loss,
            # Cross-fitted, the heads' mean (the unroll's train loss is their sum).
            "ft_train_loss": result.ft_train_losses[0] / self.num_heads,
            "solver_residual": result.solver_residual,
            "solver_diverged": result.solver_diverged,
        }
        if self.c.head == "persistent":
            out["ft_params"], out["ft_state"] = result.ft_params, result.ft_state
        return out

    def _replica_apply_meta(self, grads):
        # The meta-gradient is already the same on every replica: no second all-reduce.
        for optimizer, (_, indices) in zip(self.meta_optimizers, self.meta_groups, strict=True):
            optimizer.apply_gradients(
                [(grads[i], self.meta_params[i]) for i in indices],
                skip_gradients_aggregation=True,
            )

    # Compiled steps (cross-replica context).
    def _pt_steps(self, num_steps, head_steps):
        # A tf.while_loop written out, so that the function traces without AutoGraph.
        def body(i, losses, codes, head_skipped):
            batch = self._pt_batch(self.pt_iter)
            loss, bad_grads = self.strategy.run(self._replica_pt_step, args=(batch,))
            loss, bad_grads = self.replicas.sum(loss), self.replicas.sum(bad_grads)
            # The host stops the run after this chunk if a code is not _PT_OK.
            code = tf.where(
                tf.logical_not(_finite(batch)),
                _PT_BAD_BATCH,
                tf.where(
                    tf.logical_not(tf.math.is_finite(loss)),
                    _PT_BAD_LOSS,
                    tf.where(bad_grads == 0, _PT_OK, _PT_BAD_GRADIENT),
                ),
            )
            if head_steps:
                ft_batch = self._ft_train_batch()
                head = [h.read_value() for h in self.head]
                state = tf.nest.map_structure(lambda v: v.read_value(), self.head_state)
                new_head, new_state = self.replicas.first(
                    self.strategy.run(self._replica_head_step, args=(ft_batch, head, state))
                )
                # A NaN/Inf in the FT batch would poison the persistent head for good: skip it.
                head_finite = tf.logical_and(_finite(ft_batch), _finite([new_head, new_state]))
                for var, value in zip(self.head, new_head, strict=True):
                    var.assign(tf.where(head_finite, value, var))
                for var, value in zip(
                    tf.nest.flatten(self.head_state), tf.nest.flatten(new_state), strict=True
                ):
                    var.assign(tf.where(head_finite, value, var))
                head_skipped += tf.cast(tf.logical_not(head_finite), tf.int64)
            self.pt_step.assign_add(1)
            return i + 1, losses.write(i, loss), codes.write(i, code), head_skipped

        _, losses, codes, head_skipped = tf.while_loop(
            lambda i, *_: i < num_steps,
            body,
            (
                tf.constant(0),
                tf.TensorArray(self.dtype, size=num_steps),
                tf.TensorArray(tf.int32, size=num_steps),
                tf.constant(0, tf.int64),
            ),
            maximum_iterations=num_steps,
        )
        return losses.stack(), codes.stack(), head_skipped

    def _meta_step(self):
        head = state = None  # "pt_head": the replicas read the PT head variables
        if self.c.head == "reinit":
            head = self._init_heads(int(self.problem.backbone.output_shape[-1]))
            state = self.ft_rule.init(head)
        elif self.c.head == "persistent":
            head = [h.read_value() for h in self.head]
            state = tf.nest.map_structure(lambda v: v.read_value(), self.head_state)
        pt_batch = self._pt_batch(self.meta_pt_iter)
        ft_batches, val_batch = self._ft_batches()
        # Every output is the same on every replica (replicated FT, all-reduced solve).
        result = self.replicas.first(
            self.strategy.run(
                self._replica_meta_step_fn, args=(pt_batch, ft_batches, val_batch, head, state)
            )
        )
        batches_finite = {
            "pt_batch": _finite(pt_batch),
            "ft_train_batch": _finite(ft_batches),
            "ft_val_batch": _finite(val_batch),
        }
        if self.c.head == "persistent":
            head_finite = tf.logical_and(
                batches_finite["ft_train_batch"],
                _finite([result["ft_params"], result["ft_state"]]),
            )
            for var, value in zip(self.head, result["ft_params"], strict=True):
                var.assign(tf.where(head_finite, value, var))
            tf.nest.map_structure(
                lambda v, t: v.assign(tf.where(head_finite, t, v)),
                self.head_state,
                result["ft_state"],
            )
        grads = result["grads"]
        norm = tf.linalg.global_norm(grads)
        finite = tf.reduce_all([_finite(grads), *batches_finite.values()])
        self.meta_step.assign_add(1)
        return {
            "grads": grads,
            "finite": finite,
            "batches_finite": batches_finite,
            "meta_grad_norm": norm,
            "ft_val_loss": result["ft_val_loss"],
            "ft_train_loss": result["ft_train_loss"],
            "solver_residual": result["solver_residual"],
            "solver_diverged": result["solver_diverged"],
        }

    def _apply_meta(self, grads):
        if self.c.meta_grad_clip_norm > 0:
            grads, _ = tf.clip_by_global_norm(grads, self.c.meta_grad_clip_norm)
        if self.c.meta_optimizer == "normalized_sgd":
            norm = tf.linalg.global_norm(grads)
            scale = tf.where(norm > 0, 1.0 / norm, tf.zeros_like(norm))
            grads = [g * tf.cast(scale, g.dtype) for g in grads]
        self.strategy.run(self._replica_apply_meta, args=(grads,))

    @property
    def _pt_steps_fn(self) -> Callable:
        """`_pt_steps` traced once: (n: int32 scalar) -> (losses, codes, head steps skipped)."""
        if "pt_steps" not in self._traced:
            head_steps = self.c.head == "persistent" and self.c.head_steps_during_pt
            self._traced["pt_steps"] = tracing.traced_once(
                lambda n: self._pt_steps(n, head_steps), tf.TensorSpec([], tf.int32)
            )
        return self._traced["pt_steps"]

    @property
    def _meta_step_fn(self) -> Callable:
        """`_meta_step` traced once (it takes no arguments: it reads the iterators)."""
        if "meta_step" not in self._traced:
            self._traced["meta_step"] = tracing.traced_once(self._meta_step)
        return self._traced["meta_step"]

    def _apply_meta_fn(self, grads) -> None:
        """`_apply_meta` traced once, for the structure of the first meta-gradient."""
        if "apply_meta" not in self._traced:
            spec = tf.nest.map_structure(tf.type_spec_from_value, grads)
            self._traced["apply_meta"] = tracing.traced_once(self._apply_meta, spec)
        self._traced["apply_meta"](grads)

    def pt_steps(self, n: int) -> tuple[np.ndarray, np.ndarray, int]:
        """Runs n PT steps; returns their losses, their _PT_* codes, and FT-head steps skipped."""
        losses, codes, head_skipped = self._pt_steps_fn(tf.constant(n, tf.int32))
        return losses.numpy(), codes.numpy(), int(head_skipped)

    def meta_step_and_update(self) -> dict:
        out = self._meta_step_fn()
        finite = bool(out["finite"])
        if finite:
            self._apply_meta_fn(out["grads"])
        else:
            self.skipped.assign_add(1)
        skip = ("grads", "finite", "batches_finite")
        metrics = {k: float(v) for k, v in out.items() if k not in skip}
        metrics["finite"] = finite
        metrics["bad_batches"] = [k for k, v in out["batches_finite"].items() if not bool(v)]
        return metrics

    def sample_meta_gradients(self, num_samples: int) -> tuple[list[np.ndarray], np.ndarray]:
        """`num_samples` meta-gradients at the current state, each from fresh batches.

        Each sample is a meta-step without its meta-update; the persistent FT head,
        its optimizer state, the backbone's non-trainable variables (batch-norm
        statistics, which the meta-step's forward passes in training mode move) and
        the meta-step counter are put back after it, so every sample sees the same
        state and only the batches (and the problem's random draws) differ. A
        solver's state is put back too: an `AmortizedNeumann` sample is one step
        from the iterate the loop kept (zero where no meta-step has run: then
        alpha v, with alpha "auto" from a full power iteration).
        Returns per meta-parameter an array [num_samples, *shape], and the FT-val
        losses [num_samples].
        """
        kept = (
            list(self.head)
            + tf.nest.flatten(self.head_state)
            + [v for v in self.problem.backbone.variables if not v.trainable]
            + [self.meta_step]
            + self.solver.variables
        )
        values = [v.read_value() for v in kept]
        grads, val_losses = [], []
        for i in range(num_samples):
            out = self._meta_step_fn()
            for var, value in zip(kept, values, strict=True):
                var.assign(value)
            if not bool(out["finite"]):
                bad = [k for k, v in out["batches_finite"].items() if not bool(v)]
                raise NonFiniteLossError(
                    f"Meta-gradient sample {i + 1} at PT step {int(self.pt_step.numpy())} is "
                    f"not finite (non-finite batches: {bad or 'none'})."
                )
            grads.append([np.asarray(g) for g in out["grads"]])
            val_losses.append(float(out["ft_val_loss"]))
        stacked = [np.stack(per_param) for per_param in zip(*grads, strict=True)]
        return stacked, np.asarray(val_losses)


# A damaged checkpoint fails to restore with DataLossError (bad checksum), OpError
# ("not an sstable"), IndexError ("Read less bytes than requested": a truncated data
# file), NotFoundError (missing files), ValueError or AssertionError (objects that do
# not match): any exception means "not usable", and the next older one is tried.
_CHECKPOINT_NUMBER = re.compile(r"-(\d+)$")


def _checkpoint_candidates(manager: tf.train.CheckpointManager) -> list[str]:
    """Every checkpoint of the manager's directory, newest first.

    The manager's own list, and any `ckpt-N` whose `.index` is on disk but which
    it does not list: a damaged or missing state file must not hide checkpoints.
    Checkpoints moved aside by an earlier fallback are left out.
    """
    paths = {os.path.normpath(p) for p in manager.checkpoints}
    pattern = os.path.join(glob.escape(manager.directory), "ckpt-*.index")
    paths.update(os.path.normpath(p[: -len(".index")]) for p in glob.glob(pattern))
    paths = {
        p for p in paths if os.path.exists(p + ".index") or not os.path.exists(p + ".index.corrupt")
    }

    def number(path: str) -> int:
        match = _CHECKPOINT_NUMBER.search(path)
        return int(match.group(1)) if match else -1

    return sorted(paths, key=number, reverse=True)


def _move_aside(path: str) -> list[str]:
    """Renames the files of checkpoint `path` to `<file>.corrupt`; returns the new names."""
    moved = []
    for f in sorted(glob.glob(glob.escape(path) + ".*")):
        if not f.endswith(".corrupt"):
            os.replace(f, f + ".corrupt")
            moved.append(f + ".corrupt")
    return moved


def _first_line(error: Exception) -> str:
    text = (getattr(error, "message", None) or str(error)).strip()
    text = re.sub(r"^\{\{function_node [^}]*\}\}\s*", "", text)  # TF's op-name prefix
    return text.splitlines()[0] if text else "(no message)"


def _restore_newest_good(
    checkpoint: tf.train.Checkpoint,
    manager: tf.train.CheckpointManager,
    warn: Callable[[str], None],
    move_aside: bool = True,
) -> str | None:
    """Restores the newest checkpoint of `manager`'s directory that restores; returns it.

    A checkpoint that fails is reported through `warn` (naming it and the error)
    and the next older one is tried. A failed attempt may have assigned some
    variables; the next restore assigns every one of them again. Once one
    restores, the failed ones are moved aside (`<file>.corrupt`), kept for
    inspection; the run then saves over their numbers. Returns None when the
    directory holds no checkpoint.

    Raises:
      CheckpointRestoreError: there are checkpoints and none of them restores.
    """
    candidates = _checkpoint_candidates(manager)
    failures = []
    for i, path in enumerate(candidates):
        try:
            checkpoint.restore(path).assert_existing_objects_matched()
        except Exception as e:  # see above: any failure means the checkpoint is unusable
            reason = f"{type(e).__name__}: {_first_line(e)}"
            failures.append(f"{path} ({reason})")
            nxt = "trying the one before it" if i + 1 < len(candidates) else "no older one left"
            warn(f"Checkpoint {path} could not be restored ({reason}); {nxt}.")
            continue
        for bad in candidates[:i] if move_aside else []:
            moved = _move_aside(bad)
            if moved:
                warn(f"Moved the damaged checkpoint {bad} aside: {', '.join(moved)}.")
        return path
    if failures:
        raise CheckpointRestoreError(
            f"None of the {len(failures)} checkpoint(s) in {manager.directory} could be "
            f"restored: {'; '.join(failures)}. The run does not start from scratch over "
            "them: move that directory aside to start afresh, or use a --workdir whose "
            "checkpoints match this config."
        )
    return None


def _write_json(path: str, value) -> None:
    """Writes `value` as JSON to `path` atomically (a reader sees the old or the new file)."""
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(value, f)
    os.replace(tmp, path)


def _read_json(path: str, default, warn: Callable[[str], None]):
    """The JSON in `path`; `default` (with a warning) if it is missing or unreadable."""
    if not os.path.exists(path):
        return default
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        warn(f"{path} could not be read ({type(e).__name__}: {e}); starting it afresh.")
        return default


def run(
    problem: interfaces.MetaPretrainProblem,
    *,
    pt_data: tf.data.Dataset,
    ft_train_data: tf.data.Dataset | Sequence[tf.data.Dataset],
    ft_val_data: tf.data.Dataset | Sequence[tf.data.Dataset],
    config: ml_collections.ConfigDict,
    workdir: str,
    log: Callable[[str], None] | None = print,
    stop_after_meta_steps: int | None = None,
    meta_pt_data: tf.data.Dataset | None = None,
    strategy: tf.distribute.Strategy | None = None,
) -> OnlineResult:
    """Runs (or resumes) online meta-PT; returns the history and step counts.

    Args:
      problem: the model, PT loss and meta-parameters.
      pt_data, ft_train_data, ft_val_data: infinite (repeated), batched,
        deterministic datasets of dicts; their iterators are checkpointed. Under a
        strategy with R replicas, batches are global: B examples, a multiple of R.
        With `config.ft_cross_fit`, ft_train_data and ft_val_data may be sequences
        of k >= 2 datasets, k cross-fitting folds: head i trains on ft_train_data[i]
        (the other folds' examples) and is validated on ft_val_data[i] (fold i).
      config: the loop's settings, `default_config()`'s fields.
      workdir: checkpoints in `workdir/checkpoints`, TensorBoard in `workdir`,
        history in `workdir/history.json` (written by the chief worker).
      log: receives progress lines; None is silent.
      stop_after_meta_steps: return (after a checkpoint) once this many
        meta-steps are done, for tests of resumption; None runs to the end.
      meta_pt_data: PT batches for the meta-steps (default: from `pt_data`).
      strategy: the `tf.distribute` strategy the problem was built under
        (`distribute.make_strategy(config)`, the problem built inside
        `distribute.scope(strategy, config.mixed_precision)`); None: the strategy
        in scope, TensorFlow's default one outside any scope. Its kind must be
        the one `config.distribute` names.

    Raises:
      ValueError: a bad config field (named), a strategy of another kind than
        `config.distribute`, a problem built outside the strategy's scope or
        dtype policy, or FT folds without `ft_cross_fit` or of unequal lengths.
      NonFiniteLossError: a PT batch, loss or gradient was NaN/Inf (the step is named).
      CheckpointRestoreError: `workdir` holds checkpoints and none restores.
    """
    validate_config(config)
    start_time = time.perf_counter()
    loop = _Loop(problem, pt_data, ft_train_data, ft_val_data, config, meta_pt_data, strategy)
    os.makedirs(workdir, exist_ok=True)
    with distribute.checkpoint_dir(workdir, loop.strategy) as checkpoint_dir:
        return _drive(loop, config, workdir, checkpoint_dir, log, stop_after_meta_steps, start_time)


@dataclasses.dataclass
class MetaGradientSamples:
    """Meta-gradients sampled at one state (`sample_meta_gradients`).

    Attributes:
      pt_step: the PT steps done before sampling.
      grads: per meta-parameter, the samples [num_samples, *shape].
      ft_val_loss: the FT-val loss of each sample [num_samples].
    """

    pt_step: int
    grads: list[np.ndarray]
    ft_val_loss: np.ndarray

    def summary(self, index: int) -> dict[str, float]:
        """Mean, standard deviation (ddof 1), standard error, signal-to-noise ratio
        (mean / sd: the mean in units of one sample's noise) and the fraction of
        positive samples, of the meta-gradient of scalar meta-parameter `index`."""
        x = np.asarray(self.grads[index], np.float64).reshape(len(self.ft_val_loss), -1)
        if x.shape[1] != 1:
            raise ValueError(
                f"Meta-parameter {index} has {x.shape[1]} entries; summary() takes a scalar one."
            )
        x = x[:, 0]
        mean, sd = float(x.mean()), float(x.std(ddof=1))
        return {
            "mean": mean,
            "sd": sd,
            "se": sd / float(np.sqrt(x.size)),
            "snr": mean / sd if sd > 0 else float("nan"),
            "frac_positive": float(np.mean(x > 0)),
        }


def sample_meta_gradients(
    problem: interfaces.MetaPretrainProblem,
    *,
    pt_data: tf.data.Dataset,
    ft_train_data: tf.data.Dataset | Sequence[tf.data.Dataset],
    ft_val_data: tf.data.Dataset | Sequence[tf.data.Dataset],
    config: ml_collections.ConfigDict,
    at_pt_steps: Sequence[int],
    num_samples: int,
    log: Callable[[str], None] | None = print,
    meta_pt_data: tf.data.Dataset | None = None,
    strategy: tf.distribute.Strategy | None = None,
) -> list[MetaGradientSamples]:
    """How noisy is the meta-gradient? Samples it at states along plain PT.

    Runs PT with phi fixed (each PT step with its FT-head step, as `run`'s warm-up)
    and, on reaching each of `at_pt_steps`, computes `num_samples` meta-gradients
    (`config`'s K, solver and HVP mode) at that state, each from fresh PT, FT-train
    and FT-val batches, with no meta-update (`_Loop.sample_meta_gradients`). Their
    spread against their mean tells whether a meta-step's direction is signal or
    batch noise. The arguments are `run`'s; nothing is written to disk.

    Raises:
      ValueError: a bad config field, `num_samples` < 2, or `at_pt_steps` not
        increasing non-negative integers.
      NonFiniteLossError: a non-finite PT loss or meta-gradient sample.
    """
    validate_config(config)
    steps = [int(t) for t in at_pt_steps]
    if not steps or steps[0] < 0 or any(b <= a for a, b in zip(steps, steps[1:], strict=False)):
        raise ValueError(
            "at_pt_steps must be increasing non-negative integers. "
            f"Received: {list(at_pt_steps)!r}."
        )
    if isinstance(num_samples, bool) or int(num_samples) != num_samples or num_samples < 2:
        raise ValueError(f"num_samples must be an integer >= 2. Received: {num_samples!r}.")
    say = log or (lambda _: None)
    loop = _Loop(problem, pt_data, ft_train_data, ft_val_data, config, meta_pt_data, strategy)
    out = []
    for target in steps:
        done = int(loop.pt_step.numpy())
        if target > done:
            losses, codes, _ = loop.pt_steps(target - done)
            bad = np.flatnonzero(codes != _PT_OK)
            if bad.size:
                raise NonFiniteLossError(
                    f"PT step {done + int(bad[0]) + 1} failed (loss {losses[bad[0]]}); "
                    f"lower config.pt_learning_rate or check the PT data."
                )
        t0 = time.perf_counter()
        grads, val_losses = loop.sample_meta_gradients(int(num_samples))
        out.append(MetaGradientSamples(target, grads, val_losses))
        say(
            f"PT step {target}: {num_samples} meta-gradient samples "
            f"({time.perf_counter() - t0:.0f} s), FT-val loss {val_losses.mean():.4f}"
        )
    return out


def _drive(
    loop: _Loop,
    c: ml_collections.ConfigDict,
    workdir: str,
    checkpoint_dir: str,
    log: Callable[[str], None] | None,
    stop_after_meta_steps: int | None,
    start_time: float,
) -> OnlineResult:
    """`run`'s schedule: warm-up, meta-steps, checkpoints, summaries and history.

    Every worker runs it in lockstep (same steps, same saves: saving can involve
    collectives); only the chief writes TensorBoard events and the history, and
    its checkpoints are the ones every worker resumes from.
    """
    problem = loop.problem
    say = log or (lambda _: None)
    chief = distribute.is_chief(loop.strategy)
    manager = tf.train.CheckpointManager(
        loop.checkpoint, checkpoint_dir, max_to_keep=c.max_checkpoints
    )
    history_path = os.path.join(workdir, "history.json")
    # Host-side counters at each checkpoint's PT step (not in the TF checkpoint, whose
    # layout older runs must still restore).
    counters_path = os.path.join(workdir, "counters.json")
    records: list[dict] = []  # one per logging step; saved with every checkpoint
    counters: dict[str, dict] = {}
    head_skipped = 0
    resumed_from = None

    def warn(message: str) -> None:
        logging.warning("%s", message)  # on stderr even when `log` is None
        say(f"warning: {message}")

    # Every worker resumes from the chief's checkpoints; only the chief moves a
    # damaged one aside.
    restore_dir = os.path.join(workdir, "checkpoints")
    restore_manager = (
        manager
        if os.path.normpath(checkpoint_dir) == os.path.normpath(restore_dir)
        else tf.train.CheckpointManager(loop.checkpoint, restore_dir, max_to_keep=c.max_checkpoints)
    )
    restored = _restore_newest_good(loop.checkpoint, restore_manager, warn, move_aside=chief)
    if restored is not None:
        resumed_from = int(loop.meta_step.numpy())
        restored_pt_step = int(loop.pt_step.numpy())
        records = _read_json(history_path, [], warn)
        records = [r for r in records if r["pt_step"] <= restored_pt_step]
        counters = _read_json(counters_path, {}, warn)
        counters = {k: v for k, v in counters.items() if int(k) <= restored_pt_step}
        head_skipped = int(counters.get(str(restored_pt_step), {}).get("skipped_head_steps", 0))
        say(f"Resuming from {restored} (PT step {restored_pt_step}, meta-step {resumed_from}).")

    saved_at = [None]

    def save():
        step = int(loop.pt_step.numpy())
        if saved_at[0] == step:
            return
        saved_at[0] = step
        if chief:
            # History first: killed between the two writes, a resume drops the records
            # past the checkpoint's step; the other order would lose the records up to it.
            counters[str(step)] = {"skipped_head_steps": head_skipped}
            _write_json(history_path, records)
            _write_json(counters_path, counters)
        manager.save(checkpoint_number=step)

    writer = tf.summary.create_file_writer(workdir) if chief else tf.summary.create_noop_writer()
    total_pt = total_pt_steps(c)

    def check_losses(losses: np.ndarray, codes: np.ndarray, first_step: int) -> None:
        bad = np.flatnonzero(codes != _PT_OK)
        if not bad.size:
            return
        i = int(bad[0])
        where = f"at PT step {first_step + i + 1} (meta-step {int(loop.meta_step.numpy())})"
        lower = f"Lower config.meta.pt_learning_rate ({c.pt_learning_rate}) or check the PT data"
        last = f"the last checkpoint is in {manager.directory}."
        if codes[i] == _PT_BAD_BATCH:
            message = (
                f"The PT batch holds NaN or Inf values {where}; PT loss {losses[i]}. "
                f"Check the PT data; {last}"
            )
        elif codes[i] == _PT_BAD_LOSS:
            message = f"The PT loss is {losses[i]} {where}. {lower}; {last}"
        else:
            message = f"The PT gradient is NaN or Inf {where}; PT loss {losses[i]}. {lower}; {last}"
        raise NonFiniteLossError(message)

    def record(entry: dict) -> None:
        if problem.describe_fn is not None:
            entry.update(problem.describe_fn())
        step = int(loop.pt_step.numpy())
        with writer.as_default(step=step):
            for key, value in entry.items():
                if isinstance(value, bool):
                    continue
                if isinstance(value, int | float | np.floating | np.integer):
                    tf.summary.scalar(key, float(value))
                elif isinstance(value, np.ndarray) and value.dtype == np.uint8 and value.ndim == 4:
                    tf.summary.image(key, value)
                elif isinstance(value, np.ndarray) and value.ndim >= 1:
                    tf.summary.histogram(key, value)
            for i, var in enumerate(loop.meta_params):
                tf.summary.histogram(f"phi/{i}_{var.name.split(':')[0]}", var.numpy())
        writer.flush()
        records.append(
            {
                key: _to_jsonable(value)
                for key, value in entry.items()
                if not (isinstance(value, np.ndarray) and value.dtype == np.uint8)
            }
        )  # images go to TensorBoard only

    def pt_steps(n: int) -> np.ndarray:
        nonlocal head_skipped
        done = int(loop.pt_step.numpy())
        losses, codes, skipped = loop.pt_steps(n)
        check_losses(losses, codes, done)
        if skipped:
            head_skipped += skipped
            say(
                f"PT steps {done + 1}-{done + n}: {skipped} non-finite FT-head update(s) "
                f"skipped ({head_skipped} so far)."
            )
        return losses

    # Warm-up: plain PT in chunks, a checkpoint after each.
    chunk = c.log_every * c.pt_steps_per_meta_step
    while int(loop.pt_step.numpy()) < c.warmup_steps:
        done = int(loop.pt_step.numpy())
        n = min(chunk, c.warmup_steps - done)
        t0 = time.perf_counter()
        losses = pt_steps(n)
        rate = n / (time.perf_counter() - t0)
        say(
            f"warm-up PT step {done + n}/{c.warmup_steps}  pt_loss {losses.mean():.4f}  "
            f"{rate:.1f} steps/s"
        )
        record(
            {
                "meta_step": 0,
                "pt_step": done + n,
                "pt_loss": float(losses.mean()),
                "skipped_head_steps": head_skipped,
            }
        )
        save()

    # Meta-PT (or, with meta_enabled=False, the same PT schedule without meta-steps).
    pt_losses: list[float] = []
    window_start, window_steps = time.perf_counter(), 0
    decay_steps = meta_lr_decay_steps(c)
    while int(loop.pt_step.numpy()) < total_pt:
        losses = pt_steps(c.pt_steps_per_meta_step)
        pt_losses.extend(losses.tolist())
        # Past the decay horizon every meta learning rate is 0: no meta-gradient needed.
        decayed = (
            decay_steps is not None
            and int(loop.meta_optimizers[0].iterations.numpy()) >= decay_steps
        )
        if c.meta_enabled and not decayed:
            metrics = loop.meta_step_and_update()
            if not metrics["finite"]:
                cause = ", ".join(metrics["bad_batches"]) or "the meta-gradient itself"
                say(
                    f"meta-step {int(loop.meta_step.numpy())}: non-finite meta-gradient; "
                    f"update skipped ({int(loop.skipped.numpy())} so far; NaN/Inf in {cause})."
                )
        else:
            loop.meta_step.assign_add(1)
            metrics = {}
        window_steps += 1
        step = int(loop.meta_step.numpy())
        num_steps = c.num_meta_steps
        last = step >= num_steps
        if step % c.log_every == 0 or last:
            now = time.perf_counter()
            rate = window_steps / max(now - window_start, 1e-9)
            window_start, window_steps = now, 0
            entry = {
                "meta_step": step,
                "pt_step": int(loop.pt_step.numpy()),
                "pt_loss": float(np.mean(pt_losses)),
                "steps_per_sec": rate,
                "skipped_meta_steps": int(loop.skipped.numpy()),
                "skipped_head_steps": head_skipped,
            }
            entry.update({k: v for k, v in metrics.items() if k not in ("finite", "bad_batches")})
            pt_losses = []
            record(entry)
            width = len(str(num_steps))
            line = f"meta-step {step:>{width}}/{num_steps}  pt_loss {entry['pt_loss']:.4f}"
            if metrics:
                line += (
                    f"  ft_val {metrics['ft_val_loss']:.4f}  |g| {metrics['meta_grad_norm']:.2e}"
                    f"  residual {metrics['solver_residual']:.2e}"
                )
            line += (
                f"  {rate:.2f} steps/s  ETA {reporting.format_duration((num_steps - step) / rate)}"
            )
            say(line)
        if step % c.checkpoint_every == 0 or last:
            save()
        if stop_after_meta_steps is not None and step >= stop_after_meta_steps:
            save()
            break
    if int(loop.pt_step.numpy()) >= total_pt:
        save()
    writer.close()
    keys = list(dict.fromkeys(key for r in records for key in r))
    return OnlineResult(
        history={key: [r.get(key) for r in records] for key in keys},
        meta_steps=int(loop.meta_step.numpy()),
        pt_steps=int(loop.pt_step.numpy()),
        skipped_meta_steps=int(loop.skipped.numpy()),
        resumed_from=resumed_from,
        seconds=time.perf_counter() - start_time,
        skipped_head_steps=head_skipped,
        restored_from=restored,
    )
