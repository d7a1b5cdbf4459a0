"""Multitask baselines: co-training PT and FT tasks, optionally with PCGrad.

CoTrain trains one backbone on the PT tasks and the FT tasks at once, each
with its own head: loss = L_PT(PT batch) + L_FT(FT batch). CoTrain + PCGrad
(Yu et al., "Gradient Surgery for Multi-Task Learning", 2020) treats the two as
tasks and, where their gradients on the shared backbone conflict (negative
inner product), projects each onto the normal plane of the other before
summing. Heads are task-specific and keep their own gradients.

`pcgrad` is a pure function over gradient lists; `cotrain` is the resumable
training loop (checkpoints, TensorBoard, progress lines) around it.

`cotrain` takes an optional `tf.distribute` strategy (`distribute.make_strategy`;
the backbone and heads built in its scope). With R > 1 replicas every replica
reads the same global PT and FT batches a single-device run reads, and takes its
piece of each: the contiguous 1/R of every tensor's rows, or, for padded batches
(`mask_key`), the piece the problem's `shard_fn` cuts (padded GraphTensor blocks,
`metapt_tf.data.padding`). Each replica's loss is its share of the global mean:
the loss of its piece divided by R, or, with `mask_key`, times n_r / N, its real
examples over the global batch's (the loss functions return the mean over the
real examples of what they are given). Each task's gradients are then summed
over the replicas separately (one all-reduce of the PT and FT gradients), so
that PCGrad projects the global per-task gradients, the conflict count tests
their global inner product, and every replica applies the same update (without
another all-reduce). With batch statistics that are global too (the GIN's
synchronised, masked batch norms) and no dropout, a step computes the
single-device step's quantities up to floating-point summation order. Dropout
draws its masks per replica, so with dropout the runs agree in distribution only.

Under a multi-worker strategy every worker runs `cotrain` in lockstep and saves
at the same steps (saving can involve collectives); the chief writes the
checkpoints, TensorBoard events and `history.json` to `workdir`, the others save
their checkpoints to a temporary directory that is deleted at the end
(`distribute.checkpoint_dir`), and every worker resumes from the chief's.
"""

import dataclasses
import json
import os
import time
from collections.abc import Callable, Sequence

import numpy as np
import tensorflow as tf

from metapt_tf.training import distribute, reporting, tracing

Grads = list[tf.Tensor]


def _dot(a: Grads, b: Grads) -> tf.Tensor:
    return tf.add_n([tf.reduce_sum(x * y) for x, y in zip(a, b, strict=True)])


def pcgrad(task_grads: Sequence[Grads]) -> Grads:
    """Gradient surgery: the sum of the task gradients after removing conflicts.

    For each task i, g_i is projected, for every other task j in turn (in a fixed
    order), onto the normal plane of g_j whenever the current g_i conflicts with
    g_j (<g_i, g_j> < 0): g_i <- g_i - <g_i, g_j> / ||g_j||^2 g_j. The result is
    the sum of the projected gradients. For two tasks the order does not matter.

    Args:
      task_grads: one list of gradients per task, all over the same (shared)
        variables, in the same order and shapes.

    Returns:
      The combined gradient, a list like each `task_grads[i]`.
    """
    if len(task_grads) < 2:
        raise ValueError(f"pcgrad needs at least 2 tasks. Received: {len(task_grads)}.")
    lengths = {len(g) for g in task_grads}
    if len(lengths) != 1:
        raise ValueError(
            f"Every task's gradient list must cover the same variables. Received lengths "
            f"{[len(g) for g in task_grads]}."
        )
    originals = [[tf.convert_to_tensor(t) for t in g] for g in task_grads]
    projected = []
    for i, g_i in enumerate(originals):
        g = list(g_i)
        for j, g_j in enumerate(originals):
            if i == j:
                continue
            inner = _dot(g, g_j)
            norm_sq = _dot(g_j, g_j)
            coef = tf.where(
                (inner < 0) & (norm_sq > 0),
                inner / tf.maximum(norm_sq, 1e-30),
                tf.zeros_like(inner),
            )
            g = [a - coef * b for a, b in zip(g, g_j, strict=True)]
        projected.append(g)
    return [tf.add_n(list(parts)) for parts in zip(*projected, strict=True)]


@dataclasses.dataclass
class CotrainResult:
    steps: int
    history: dict[str, list]
    seconds: float
    conflicts: int  # steps on which the two tasks' backbone gradients conflicted


def cotrain(
    *,
    shared_params: list[tf.Variable],
    pt_head_params: list[tf.Variable],
    ft_head_params: list[tf.Variable],
    pt_loss_fn: Callable,
    ft_loss_fn: Callable,
    pt_data: tf.data.Dataset,
    ft_data: tf.data.Dataset,
    num_steps: int,
    learning_rate: float,
    use_pcgrad: bool,
    workdir: str,
    log: Callable[[str], None] | None = print,
    log_every: int = 100,
    checkpoint_every: int = 500,
    strategy: tf.distribute.Strategy | None = None,
    mask_key: str | None = None,
    shard_fn: Callable | None = None,
) -> CotrainResult:
    """Trains the backbone on PT and FT tasks jointly for `num_steps` Adam steps.

    Args:
      shared_params: the backbone's variables (both tasks' gradients reach them).
      pt_head_params, ft_head_params: each task's own head.
      pt_loss_fn, ft_loss_fn: `batch -> scalar` on a PT / FT batch; read the
        backbone and their head.
      pt_data, ft_data: infinite batched datasets; their iterators are
        checkpointed, so a resumed run sees the batches it would have seen.
      use_pcgrad: combine the backbone gradients with `pcgrad` instead of summing.
      workdir: checkpoints, TensorBoard events and `history.json`; a run with an
        existing checkpoint there resumes from it.
      strategy: None or the default strategy: one device. A multi-replica strategy:
        every step split over the replicas (see the module docstring); the
        variables must have been created in its scope.
      mask_key: None, or the batches are padded: `batch[mask_key]` is a bool
        [rows] tensor, True for the real examples, and the loss functions return
        the mean over those (e.g. `padding.masked_mean`). Used to weigh the
        replicas' losses; on one device the batches go to the loss functions as
        they are.
      shard_fn: with `mask_key`, under a strategy with R > 1 replicas:
        `(batch, R, replica_id) -> batch`, replica `replica_id`'s piece of a padded
        global batch (`padding.shard_batch`). None: the contiguous 1/R of every
        tensor's leading dimension.
    """
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1. Received: num_steps={num_steps}.")
    if shard_fn is not None and mask_key is None:
        raise ValueError(
            "shard_fn cuts padded batches, whose real examples mask_key names; give both. "
            f"Received: mask_key=None with shard_fn={shard_fn!r}."
        )
    say = log or (lambda _: None)
    start = time.perf_counter()
    params = list(shared_params) + list(pt_head_params) + list(ft_head_params)
    strategy = strategy if strategy is not None else tf.distribute.get_strategy()
    replicas = distribute.Replicas(strategy)
    distributed = replicas.num_replicas > 1
    if distributed:
        distribute.check_variables(strategy, params, "CoTrain's")
    with strategy.scope():
        optimizer = tf.keras.optimizers.Adam(learning_rate)
        optimizer.build(params)
    step = tf.Variable(0, dtype=tf.int64, trainable=False, name="step")
    conflicts = tf.Variable(0, dtype=tf.int64, trainable=False, name="conflicts")
    pt_iter, ft_iter = iter(pt_data), iter(ft_data)
    checkpoint = tf.train.Checkpoint(
        params=params,
        optimizer=optimizer,
        step=step,
        conflicts=conflicts,
        pt_iterator=pt_iter,
        ft_iterator=ft_iter,
    )
    os.makedirs(workdir, exist_ok=True)
    n_shared = len(shared_params)

    def real_count(batch):
        return tf.reduce_sum(tf.cast(batch[mask_key], tf.int32))

    def share(loss, piece, count):
        """This replica's share of the global batch's mean loss."""
        if not distributed:
            return loss
        if mask_key is None:
            return loss / tf.cast(replicas.num_replicas, loss.dtype)
        return loss * tf.cast(real_count(piece), loss.dtype) / tf.cast(count, loss.dtype)

    def replica_step(pt_batch, ft_batch, pt_count, ft_count):
        pt_piece = replicas.shard(pt_batch, "PT batch", shard_fn=shard_fn)
        ft_piece = replicas.shard(ft_batch, "FT batch", shard_fn=shard_fn)
        with tf.GradientTape(persistent=True) as tape:
            pt_loss = share(pt_loss_fn(pt_piece), pt_piece, pt_count)
            ft_loss = share(ft_loss_fn(ft_piece), ft_piece, ft_count)
        pt_grads = tape.gradient(
            pt_loss,
            shared_params + pt_head_params,
            unconnected_gradients=tf.UnconnectedGradients.ZERO,
        )
        ft_grads = tape.gradient(
            ft_loss,
            shared_params + ft_head_params,
            unconnected_gradients=tf.UnconnectedGradients.ZERO,
        )
        del tape
        if distributed:
            # Each task's global gradient: PCGrad and the conflict test need them
            # separately, not only their sum.
            reduced = replicas.all_reduce_sum(pt_grads + ft_grads)
            pt_grads, ft_grads = reduced[: len(pt_grads)], reduced[len(pt_grads) :]
        g_pt, g_ft = pt_grads[:n_shared], ft_grads[:n_shared]
        if use_pcgrad:
            shared = pcgrad([g_pt, g_ft])
        else:
            shared = [a + b for a, b in zip(g_pt, g_ft, strict=True)]
        conflict = tf.cast(_dot(g_pt, g_ft) < 0, tf.int64)
        grads = shared + pt_grads[n_shared:] + ft_grads[n_shared:]
        # The gradients are global already: every replica applies the same update.
        optimizer.apply_gradients(
            zip(grads, params, strict=True), skip_gradients_aggregation=distributed
        )
        return pt_loss, ft_loss, conflict

    def train_steps_fn(n):
        pt_losses = tf.TensorArray(tf.float32, size=n)
        ft_losses = tf.TensorArray(tf.float32, size=n)
        for i in tf.range(n):
            pt_batch, ft_batch = next(pt_iter), next(ft_iter)
            counts = (
                (real_count(pt_batch), real_count(ft_batch))
                if distributed and mask_key is not None
                else (tf.constant(0), tf.constant(0))
            )
            pt_loss, ft_loss, conflict = strategy.run(
                replica_step, args=(pt_batch, ft_batch, *counts)
            )
            conflicts.assign_add(replicas.first(conflict))
            step.assign_add(1)
            pt_losses = pt_losses.write(i, tf.cast(replicas.sum(pt_loss), tf.float32))
            ft_losses = ft_losses.write(i, tf.cast(replicas.sum(ft_loss), tf.float32))
        return pt_losses.stack(), ft_losses.stack()

    train_steps = tracing.traced_once(
        train_steps_fn,
        tf.TensorSpec([], tf.int32),
        autograph=True,  # the tf.range loop
    )

    name = "CoTrain + PCGrad" if use_pcgrad else "CoTrain"
    chief = distribute.is_chief(strategy)
    with distribute.checkpoint_dir(workdir, strategy) as checkpoint_dir:
        manager = tf.train.CheckpointManager(checkpoint, checkpoint_dir, max_to_keep=2)
        # Every worker resumes from the chief's checkpoints.
        restore_dir = os.path.join(workdir, "checkpoints")
        restore = (
            manager
            if os.path.normpath(checkpoint_dir) == os.path.normpath(restore_dir)
            else tf.train.CheckpointManager(checkpoint, restore_dir, max_to_keep=2)
        )
        history_path = os.path.join(workdir, "history.json")
        records: list[dict] = []
        if restore.latest_checkpoint:
            checkpoint.restore(restore.latest_checkpoint).assert_existing_objects_matched()
            if os.path.exists(history_path):
                with open(history_path) as f:
                    records = [r for r in json.load(f) if r["step"] <= int(step.numpy())]
            say(
                f"Resuming co-training from {restore.latest_checkpoint} (step {int(step.numpy())})."
            )
        writer = (
            tf.summary.create_file_writer(workdir) if chief else tf.summary.create_noop_writer()
        )
        while int(step.numpy()) < num_steps:
            done = int(step.numpy())
            n = min(log_every, num_steps - done)
            t0 = time.perf_counter()
            pt_l, ft_l = (x.numpy() for x in train_steps(tf.constant(n)))
            if not (np.all(np.isfinite(pt_l)) and np.all(np.isfinite(ft_l))):
                raise FloatingPointError(
                    f"{name}: non-finite loss between steps {done + 1} and {done + n} "
                    f"(PT {pt_l.tolist()[-1]}, FT {ft_l.tolist()[-1]}); lower the learning rate "
                    f"({learning_rate}). The last checkpoint is in {manager.directory}."
                )
            rate = n / (time.perf_counter() - t0)
            entry = {
                "step": done + n,
                "pt_loss": float(pt_l.mean()),
                "ft_loss": float(ft_l.mean()),
                "conflict_fraction": int(conflicts.numpy()) / (done + n),
                "steps_per_sec": rate,
            }
            records.append(entry)
            with writer.as_default(step=done + n):
                for key, value in entry.items():
                    if key != "step":
                        tf.summary.scalar(key, value)
            writer.flush()
            say(
                f"{name} step {done + n}/{num_steps}  pt_loss {entry['pt_loss']:.4f}  "
                f"ft_loss {entry['ft_loss']:.4f}  {rate:.1f} steps/s"
            )
            if (done + n) % checkpoint_every < n or done + n >= num_steps:
                if chief:
                    reporting.write_json(history_path, records)
                manager.save(checkpoint_number=done + n)
        writer.close()
    keys = list(dict.fromkeys(k for r in records for k in r))
    return CotrainResult(
        steps=int(step.numpy()),
        history={k: [r.get(k) for r in records] for k in keys},
        seconds=time.perf_counter() - start,
        conflicts=int(conflicts.numpy()),
    )
