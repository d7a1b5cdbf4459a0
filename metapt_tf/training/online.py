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
FT then starts from the PT model and v covers the PT head too. With `meta_enabled=False` the
same schedule runs without meta-steps: the plain-PT baseline.

Everything a resumed run needs is checkpointed with `tf.train.CheckpointManager`:
theta, phi, the FT head and its optimizer state, the PT and meta optimizers, the
step counters, the random generator, the data iterators, and the host-side
history. A run killed at any point and restarted with the same arguments ends
with the same phi (ops are made deterministic).

A non-finite PT loss stops the run with `NonFiniteLossError` naming the step.
TensorBoard scalars, histograms and images go to `workdir`, and a progress line
with rate and ETA to `log` at every logging step.

The loop runs under the `tf.distribute` strategy `config.meta.distribute` names
(one device by default, `MirroredStrategy`, `MultiWorkerMirroredStrategy`),
optionally in mixed precision (`config.meta.mixed_precision`); `distribute`
says how each step is split over the replicas. The compiled steps read batches
and update the loop's variables in cross-replica context and leave the
arithmetic to per-replica functions (`_replica_*`), which are what
`config.meta.jit_compile` compiles with XLA.
"""

import dataclasses
import json
import os
import time
from collections.abc import Callable

import ml_collections
import numpy as np
import tensorflow as tf

from metapt_tf import hypergrad
from metapt_tf.training import distribute, interfaces, reporting

FT_OPTIMIZERS = ("adam", "sgd", "momentum")
HEAD_MODES = ("persistent", "reinit", "pt_head")
SOLVERS = ("neumann", "cg", "identity")
OPTIMIZERS = ("adam", "sgd")
META_OPTIMIZERS = ("adam", "sgd", "normalized_sgd")
META_LR_DECAYS = ("none", "linear", "cosine")


class NonFiniteLossError(FloatingPointError):
    """The PT loss became NaN or Inf; the message names the step."""


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
    c.solver = "neumann"
    c.neumann_terms = 1
    c.neumann_alpha = 1e-3  # a number, or "auto"
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
    c.meta_grad_clip_norm = 0.0  # > 0: clip the meta-gradient's global norm to this first
    c.log_every = 10  # meta-steps (warm-up logs every log_every * P PT steps)
    c.checkpoint_every = 25  # meta-steps
    c.max_checkpoints = 2
    c.jit_compile = False  # XLA-compile the per-replica meta-step (GPU replicas if R > 1)
    c.distribute = "default"  # one of distribute.STRATEGIES
    c.devices = ""  # "mirrored": comma-separated devices, e.g. "/gpu:0,/gpu:1"; "": all GPUs
    c.mixed_precision = "none"  # or "mixed_bfloat16", "mixed_float16" (distribute.PRECISIONS)
    return c


def _fail(field: str, value, expected: str) -> ValueError:
    return ValueError(
        f"config.meta.{field} must be {expected}. Received: config.meta.{field}={value!r}."
    )


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

    for field in ("seed", "warmup_steps", "num_meta_steps", "neumann_terms"):
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
    for field in ("cg_damping", "meta_grad_clip_norm"):
        v = c[field]
        if isinstance(v, bool) or not isinstance(v, int | float) or v < 0:
            raise _fail(field, v, "a number >= 0")
    if c.neumann_alpha != "auto":
        positive("neumann_alpha")
    choice("pt_optimizer", OPTIMIZERS)
    choice("meta_optimizer", META_OPTIMIZERS)
    choice("meta_lr_decay", META_LR_DECAYS)
    choice("ft_optimizer", FT_OPTIMIZERS)
    choice("head", HEAD_MODES)
    choice("solver", SOLVERS)
    choice("hvp_mode", hypergrad.HVP_MODES)
    choice("distribute", distribute.STRATEGIES)
    choice("mixed_precision", distribute.PRECISIONS)
    if not isinstance(c.devices, str):
        raise _fail("devices", c.devices, 'a string of comma-separated devices (or "")')
    if c.devices.strip() and c.distribute != "mirrored":
        raise _fail("devices", c.devices, "\"\" unless config.meta.distribute is 'mirrored'")
    for field in ("meta_enabled", "head_steps_during_pt", "jit_compile"):
        if not isinstance(c[field], bool):
            raise _fail(field, c[field], "a bool")


def make_solver(
    c: ml_collections.ConfigDict, unroll_cg: bool = False
) -> hypergrad.InverseHvpSolver:
    """The config's solver; `unroll_cg` runs CG as a Python loop (see `distribute`)."""
    if c.solver == "neumann":
        return hypergrad.Neumann(num_terms=c.neumann_terms, alpha=c.neumann_alpha)
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


def _meta_learning_rate(c: ml_collections.ConfigDict):
    steps = max(c.num_meta_steps, 1)
    if c.meta_lr_decay == "linear":
        return tf.keras.optimizers.schedules.PolynomialDecay(c.meta_learning_rate, steps, 0.0)
    if c.meta_lr_decay == "cosine":
        return tf.keras.optimizers.schedules.CosineDecay(c.meta_learning_rate, steps)
    return c.meta_learning_rate


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
    """

    history: dict[str, list]
    meta_steps: int
    pt_steps: int
    skipped_meta_steps: int
    resumed_from: int | None
    seconds: float


def _to_jsonable(value):
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    return value


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
        ft_train_data: tf.data.Dataset,
        ft_val_data: tf.data.Dataset,
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
        self.ft_train_iter = iter(ft_train_data)
        self.ft_val_iter = iter(ft_val_data)
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
            self.meta_optimizer = _keras_optimizer(
                "sgd" if c.meta_optimizer == "normalized_sgd" else c.meta_optimizer,
                _meta_learning_rate(c),
            )
            self.pt_optimizer.build(self.pt_params)
            self.meta_optimizer.build(self.meta_params)
            head = interfaces.init_head(
                feature_dim, problem.num_ft_classes, self.generator, self.dtype
            )
            self.head = [tf.Variable(h, name=f"ft_head_{i}") for i, h in enumerate(head)]
            state = self.ft_rule.init([h.read_value() for h in self.head])
            self.head_state = tf.nest.map_structure(
                lambda t: tf.Variable(t, trainable=False), state
            )
            self.pt_step = tf.Variable(0, dtype=tf.int64, trainable=False, name="pt_step")
            self.meta_step = tf.Variable(0, dtype=tf.int64, trainable=False, name="meta_step")
            self.skipped = tf.Variable(0, dtype=tf.int64, trainable=False, name="skipped")

        self.checkpoint = tf.train.Checkpoint(
            pt_params=self.pt_params,
            meta_params=self.meta_params,
            ft_head=self.head,
            ft_head_state=tf.nest.flatten(self.head_state),
            pt_optimizer=self.pt_optimizer,
            meta_optimizer=self.meta_optimizer,
            pt_step=self.pt_step,
            meta_step=self.meta_step,
            skipped=self.skipped,
            generator=self.generator,
            pt_iterator=self.pt_iter,
            ft_train_iterator=self.ft_train_iter,
            ft_val_iterator=self.ft_val_iter,
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
        self._pt_steps_fn = tf.function(self._pt_steps)
        self._meta_step_fn = tf.function(self._meta_step)
        self._apply_meta_fn = tf.function(self._apply_meta)
        # XLA compiles the per-replica arithmetic only: the iterators stay outside.
        self._replica_meta_step_fn = (
            tf.function(self._replica_meta_step, jit_compile=True)
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

    # FT losses: the head on backbone features in inference mode. Under mixed
    # precision the backbone computes in 16 bits and the head in the variables' dtype.
    def _ft_loss(self, head, batch):
        features = self.problem.backbone(batch[self.problem.ft_input_key], training=False)
        logits = interfaces.head_logits(tf.cast(features, head[0].dtype), head)
        return interfaces.head_loss(
            logits, batch[self.problem.ft_label_key], self.problem.ft_multilabel
        )

    def _ft_train_loss(self, head, batches, step):
        return self._ft_loss(head, batches[step])

    def _pt_batch(self, iterator):
        batch = next(iterator)
        if self.problem.pt_batch_fn is not None:
            batch = self.problem.pt_batch_fn(batch)
        return batch

    # Per-replica functions: arithmetic only, no iterators and no loop variables written.
    def _replica_pt_step(self, batch):
        with tf.GradientTape() as tape:
            loss = self._pt_loss(self.replicas.shard(batch))
            scaled = self.pt_optimizer.get_scaled_loss(loss) if self.loss_scaled else loss
        grads = tape.gradient(scaled, self.pt_params)
        if self.loss_scaled:
            grads = self.pt_optimizer.get_unscaled_gradients(grads)
        # The optimizer sums the gradients over replicas before applying them.
        self.pt_optimizer.apply_gradients(zip(grads, self.pt_params, strict=True))
        return loss

    def _replica_head_step(self, batch, head, state):
        """One ordinary (non-differentiated) FT-head step on detached features."""
        with tf.GradientTape() as tape:
            tape.watch(head)
            features = self.problem.backbone(batch[self.problem.ft_input_key], training=False)
            features = tf.stop_gradient(tf.cast(features, head[0].dtype))
            loss = interfaces.head_loss(
                interfaces.head_logits(features, head),
                batch[self.problem.ft_label_key],
                self.problem.ft_multilabel,
            )
        return self.ft_rule.apply(head, tape.gradient(loss, head), state)

    def _replica_meta_step(self, pt_batch, ft_batches, val_batch, head, state):
        if head is None:
            # The PT head variables themselves: read inside the unroll's tape, so v
            # reaches them. Nothing is copied back; PT keeps training its head.
            head = list(self.problem.pt_head_params)
            state = self.ft_rule.init([h.read_value() for h in head])
        result = self.meta_gradient(
            self.replicas.shard(pt_batch), ft_batches, val_batch, head, state
        )
        out = {
            "grads": result.meta_grads,
            "ft_val_loss": result.ft_val_loss,
            "ft_train_loss": result.ft_train_losses[0],
            "solver_residual": result.solver_residual,
            "solver_diverged": result.solver_diverged,
        }
        if self.c.head == "persistent":
            out["ft_params"], out["ft_state"] = result.ft_params, result.ft_state
        return out

    def _replica_apply_meta(self, grads):
        # The meta-gradient is already the same on every replica: no second all-reduce.
        self.meta_optimizer.apply_gradients(
            zip(grads, self.meta_params, strict=True), skip_gradients_aggregation=True
        )

    # Compiled steps (cross-replica context).
    def _pt_steps(self, num_steps, head_steps):
        losses = tf.TensorArray(self.dtype, size=num_steps)
        for i in tf.range(num_steps):
            batch = self._pt_batch(self.pt_iter)
            loss = self.replicas.sum(self.strategy.run(self._replica_pt_step, args=(batch,)))
            if head_steps:
                ft_batch = next(self.ft_train_iter)
                head = [h.read_value() for h in self.head]
                state = tf.nest.map_structure(lambda v: v.read_value(), self.head_state)
                new_head, new_state = self.replicas.first(
                    self.strategy.run(self._replica_head_step, args=(ft_batch, head, state))
                )
                for var, value in zip(self.head, new_head, strict=True):
                    var.assign(value)
                tf.nest.map_structure(lambda v, t: v.assign(t), self.head_state, new_state)
            losses = losses.write(i, loss)
            self.pt_step.assign_add(1)
        return losses.stack()

    def _meta_step(self):
        head = state = None  # "pt_head": the replicas read the PT head variables
        if self.c.head == "reinit":
            feature_dim = int(self.problem.backbone.output_shape[-1])
            head = interfaces.init_head(
                feature_dim, self.problem.num_ft_classes, self.generator, self.dtype
            )
            state = self.ft_rule.init(head)
        elif self.c.head == "persistent":
            head = [h.read_value() for h in self.head]
            state = tf.nest.map_structure(lambda v: v.read_value(), self.head_state)
        pt_batch = self._pt_batch(self.meta_pt_iter)
        ft_batches = [next(self.ft_train_iter) for _ in range(self.c.ft_unroll_steps)]
        val_batch = next(self.ft_val_iter)
        # Every output is the same on every replica (replicated FT, all-reduced solve).
        result = self.replicas.first(
            self.strategy.run(
                self._replica_meta_step_fn, args=(pt_batch, ft_batches, val_batch, head, state)
            )
        )
        if self.c.head == "persistent":
            head_finite = tf.reduce_all(
                [tf.reduce_all(tf.math.is_finite(h)) for h in result["ft_params"]]
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
        finite = tf.reduce_all([tf.reduce_all(tf.math.is_finite(g)) for g in grads])
        self.meta_step.assign_add(1)
        return {
            "grads": grads,
            "finite": finite,
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

    def pt_steps(self, n: int) -> np.ndarray:
        head_steps = self.c.head == "persistent" and self.c.head_steps_during_pt
        return self._pt_steps_fn(tf.constant(n), head_steps).numpy()

    def meta_step_and_update(self) -> dict:
        out = self._meta_step_fn()
        finite = bool(out["finite"])
        if finite:
            self._apply_meta_fn(out["grads"])
        else:
            self.skipped.assign_add(1)
        metrics = {k: float(v) for k, v in out.items() if k not in ("grads", "finite")}
        metrics["finite"] = finite
        return metrics


def run(
    problem: interfaces.MetaPretrainProblem,
    *,
    pt_data: tf.data.Dataset,
    ft_train_data: tf.data.Dataset,
    ft_val_data: tf.data.Dataset,
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
        `config.distribute`, or a problem built outside the strategy's scope or
        dtype policy.
      NonFiniteLossError: the PT loss became non-finite (the step is named).
    """
    validate_config(config)
    start_time = time.perf_counter()
    loop = _Loop(problem, pt_data, ft_train_data, ft_val_data, config, meta_pt_data, strategy)
    os.makedirs(workdir, exist_ok=True)
    with distribute.checkpoint_dir(workdir, loop.strategy) as checkpoint_dir:
        return _drive(loop, config, workdir, checkpoint_dir, log, stop_after_meta_steps, start_time)


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
    records: list[dict] = []  # one per logging step; saved with every checkpoint
    resumed_from = None
    latest = tf.train.latest_checkpoint(os.path.join(workdir, "checkpoints"))
    if latest:
        loop.checkpoint.restore(latest).assert_existing_objects_matched()
        resumed_from = int(loop.meta_step.numpy())
        if os.path.exists(history_path):
            with open(history_path) as f:
                restored_pt_step = int(loop.pt_step.numpy())
                records = [r for r in json.load(f) if r["pt_step"] <= restored_pt_step]
        say(
            f"Resuming from {latest} (PT step {int(loop.pt_step.numpy())}, "
            f"meta-step {resumed_from})."
        )

    saved_at = [None]

    def save():
        if saved_at[0] == int(loop.pt_step.numpy()):
            return
        saved_at[0] = int(loop.pt_step.numpy())
        manager.save(checkpoint_number=saved_at[0])
        if not chief:
            return
        tmp = history_path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(records, f)
        os.replace(tmp, history_path)

    writer = tf.summary.create_file_writer(workdir) if chief else tf.summary.create_noop_writer()
    total_pt = c.warmup_steps + c.num_meta_steps * c.pt_steps_per_meta_step

    def check_losses(losses: np.ndarray, first_step: int) -> None:
        bad = np.flatnonzero(~np.isfinite(losses))
        if bad.size:
            step = first_step + int(bad[0]) + 1
            raise NonFiniteLossError(
                f"The PT loss is {losses[bad[0]]} at PT step {step} (meta-step "
                f"{int(loop.meta_step.numpy())}). Lower config.meta.pt_learning_rate "
                f"({c.pt_learning_rate}) or check the PT data; the last checkpoint is in "
                f"{manager.directory}."
            )

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

    # Warm-up: plain PT in chunks, a checkpoint after each.
    chunk = c.log_every * c.pt_steps_per_meta_step
    while int(loop.pt_step.numpy()) < c.warmup_steps:
        done = int(loop.pt_step.numpy())
        n = min(chunk, c.warmup_steps - done)
        t0 = time.perf_counter()
        losses = loop.pt_steps(n)
        check_losses(losses, done)
        rate = n / (time.perf_counter() - t0)
        say(
            f"warm-up PT step {done + n}/{c.warmup_steps}  pt_loss {losses.mean():.4f}  "
            f"{rate:.1f} steps/s"
        )
        record({"meta_step": 0, "pt_step": done + n, "pt_loss": float(losses.mean())})
        save()

    # Meta-PT (or, with meta_enabled=False, the same PT schedule without meta-steps).
    pt_losses: list[float] = []
    window_start, window_steps = time.perf_counter(), 0
    while int(loop.pt_step.numpy()) < total_pt:
        done_pt = int(loop.pt_step.numpy())
        losses = loop.pt_steps(c.pt_steps_per_meta_step)
        check_losses(losses, done_pt)
        pt_losses.extend(losses.tolist())
        if c.meta_enabled:
            metrics = loop.meta_step_and_update()
            if not metrics["finite"]:
                say(
                    f"meta-step {int(loop.meta_step.numpy())}: non-finite meta-gradient; "
                    f"update skipped ({int(loop.skipped.numpy())} so far)."
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
            }
            entry.update({k: v for k, v in metrics.items() if k != "finite"})
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
    )
