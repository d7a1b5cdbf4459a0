"""Final fine-tuning of a pre-trained backbone with a fresh head, and evaluation.

After meta-PT (or plain PT) the backbone is copied, topped with a new linear
head of `num_classes` logits and trained on the FT training set: every weight
("full") or the head alone on frozen features ("linear"; `finetune_multilabel`
computes those features once and trains the head on them). The copy keeps the
pre-trained backbone itself untouched. Evaluation reports loss and accuracy
on a held-out FT test set.

Both `finetune_and_evaluate` and `finetune_multilabel` take an optional
`tf.distribute` strategy (`distribute.make_strategy(config.meta)`). None or the
default strategy: one device, as always. A strategy with R replicas:

* The classifier (the backbone copy and the head) and its optimizer are created
  in the strategy's scope, from the same random draws as on one device, so they
  start from the single-device weights.
* Every replica (and worker) reads the same global batches a single-device run
  reads, in the same order: `finetune_and_evaluate` draws one permutation of
  the training set per epoch exactly as `Model.fit(shuffle=True)` does (a
  `tf.random.shuffle` of the indices under the seed), `finetune_multilabel`
  iterates its datasets. A global batch of b examples is padded with zero rows
  to the fixed width W (the first batch's size rounded up to a multiple of R),
  each row weighted 1 (an example) or 0 (padding), and replica r takes rows
  [r W/R, (r+1) W/R) (`distribute.Replicas.shard`). A last partial batch is
  therefore trained on and evaluated like any other: no example is dropped.
* Train step (`strategy.run`): each replica's loss is the weighted sum of its
  shard's per-example losses divided by b, the global batch's example count, so
  the losses sum to the single-device mean loss; the optimizer sums the
  gradients over replicas and every replica applies the same update.
* Evaluation: each replica computes the loss and correct-prediction sums
  (single-label) or the predictions of its shard, placed in its rows of a zero
  [W, ...] tensor (multi-label); both are SUM-reduced over replicas, which gives
  the single-device numbers (adding zeros is exact).

The trained weights and metrics equal the single-device ones up to
floating-point summation order. Batch statistics are not split this way: batch
norm with `training=True` (full multi-label fine-tuning of a backbone with
batch norm) normalises each replica's shard by its own moments, padding rows
included, as in the online loop (`online`), unless the backbone synchronises
them (the GIN's batch norms do).

Padded batches (`finetune_multilabel` and `predict_multilabel` with `mask_key`):
batches without a leading dimension to split, such as GraphTensors of
ego-graphs, come already padded for R replicas (`padding.pad_blocks`: R blocks
of the same static sizes, a bool mask under `mask_key` marking the real rows),
and replica r takes the piece `shard_fn(batch, R, r)` cuts. Each replica's loss
is the sum over its real rows of the per-example loss divided by the global
batch's number of real rows (blocks may hold different numbers of real
examples, or none), test predictions are placed in the replica's rows of a zero
tensor, SUM-reduced and masked, so the real rows come back in order. On one
device the same mask applies, without a cut.
"""

import contextlib
import dataclasses
import math
from collections.abc import Callable

import numpy as np
import tensorflow as tf

from metapt_tf.training import distribute, reporting, tracing

MODES = ("full", "linear")
EVAL_BATCH_SIZE = 256  # examples per evaluation batch of `finetune_and_evaluate`


@dataclasses.dataclass
class FinetuneResult:
    """The fine-tuned classifier (images -> logits) and its test metrics."""

    model: tf.keras.Model
    test_accuracy: float
    test_loss: float
    train_accuracy: float


def _check_split(name: str, split: tuple[np.ndarray, np.ndarray]) -> None:
    x, y = split
    if len(x) == 0 or len(x) != len(y):
        raise ValueError(
            f"{name} must be (inputs, labels) of the same non-zero length. "
            f"Received lengths {len(x)} and {len(y)}."
        )


def _distributed(strategy: tf.distribute.Strategy | None) -> bool:
    """Whether `strategy` asks for the sharded path (None and the default strategy do not)."""
    return strategy is not None and distribute.strategy_kind(strategy) != "default"


def _padded_width(batch_size: int, num_replicas: int) -> int:
    """The global batch's rows with padding: `batch_size` rounded up to a multiple of R."""
    return num_replicas * math.ceil(batch_size / num_replicas)


def _check_tensor_batches(spec, what: str, num_replicas: int) -> None:
    for s in tf.nest.flatten(spec):
        if not isinstance(s, tf.TensorSpec) or s.shape.rank is None or s.shape.rank < 1:
            raise ValueError(
                f"Fine-tuning under a strategy with {num_replicas} replicas splits every "
                f"tensor of a batch by rows, so {what} must yield a nest of dense tensors with "
                f"a leading batch dimension. Received an element spec holding {s!r}."
            )


def _pad_rows(batch, width: int):
    """A global batch of b <= `width` rows, padded with zero rows to `width`.

    Returns the padded batch (static leading dimension `width`), the row weights
    (1 for an example, 0 for padding; int32 [width]) and b (int32). Cross-replica
    context.
    """
    size = tf.shape(tf.nest.flatten(batch)[0])[0]
    check = tf.debugging.assert_less_equal(
        size,
        width,
        message=(
            f"A fine-tuning batch has more rows than the {width} the first batch set "
            "(batches after the first may be smaller, never larger)."
        ),
    )
    with tf.control_dependencies([check]):
        size = tf.identity(size)

    def pad(x):
        paddings = tf.concat(
            [[[0, width - size]], tf.zeros([x.shape.rank - 1, 2], tf.int32)], axis=0
        )
        return tf.ensure_shape(tf.pad(x, paddings), [width, *x.shape[1:]])

    weights = tf.sequence_mask(size, width, dtype=tf.int32)
    return tf.nest.map_structure(pad, batch), weights, size


def _place_in_rows(values: tf.Tensor, width: int, num_replicas: int) -> tf.Tensor:
    """This replica's shard in its rows of a zero [width, ...] tensor (replica context),
    so that a SUM over replicas reassembles the global batch exactly."""
    if num_replicas == 1:
        return values
    rows = width // num_replicas
    before = tf.distribute.get_replica_context().replica_id_in_sync_group * rows
    paddings = tf.concat(
        [[[before, width - rows - before]], tf.zeros([values.shape.rank - 1, 2], tf.int32)],
        axis=0,
    )
    return tf.pad(values, paddings)


def _classifier(backbone: tf.keras.Model, num_classes: int, mode: str) -> tf.keras.Model:
    copy = tf.keras.models.clone_model(backbone)
    copy.set_weights(backbone.get_weights())
    copy.trainable = mode == "full"
    inputs = tf.keras.Input(shape=backbone.input_shape[1:], name="image")
    logits = tf.keras.layers.Dense(num_classes, name="ft_head")(copy(inputs, training=False))
    return tf.keras.Model(inputs, logits, name="finetuned")


def _epoch_orders(num_examples: int, epochs: int) -> tf.data.Dataset:
    """One permutation of range(num_examples) per epoch: the ones `Model.fit(shuffle=True)`
    draws on numpy inputs (the same ops, so the same op seeds under the global seed)."""

    def permutation(_):
        indices = tf.range(num_examples, dtype=tf.int64)
        indices = tf.random.shuffle(indices)
        return indices

    return tf.data.Dataset.range(1).repeat(epochs).map(permutation)


def finetune_and_evaluate(
    backbone: tf.keras.Model,
    train: tuple[np.ndarray, np.ndarray],
    test: tuple[np.ndarray, np.ndarray],
    *,
    num_classes: int,
    mode: str = "full",
    epochs: int = 50,
    batch_size: int = 32,
    learning_rate: float = 1e-3,
    seed: int = 0,
    strategy: tf.distribute.Strategy | None = None,
) -> FinetuneResult:
    """Fine-tunes a copy of `backbone` with a fresh head; evaluates on `test`.

    Training is Adam on the mean softmax cross-entropy of batches of
    `min(batch_size, len(train))` examples, reshuffled every epoch (the last
    batch of an epoch holds the remainder); evaluation takes every example once.

    Args:
      backbone: inputs -> features; not modified.
      train, test: (inputs, integer labels) arrays.
      num_classes: logits of the new head.
      mode: "full" (all weights train) or "linear" (the backbone is frozen).
      strategy: None or the default strategy: `Model.fit` and `Model.evaluate` on
        one device. A multi-replica strategy (`distribute.make_strategy`): the same
        batches in the same order, each split over the replicas (see the module
        docstring), giving the single-device weights and metrics.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}. Received: mode={mode!r}.")
    _check_split("train", train)
    _check_split("test", test)
    tf.keras.utils.set_random_seed(seed)
    if _distributed(strategy):
        with strategy.scope():
            model = _classifier(backbone, num_classes, mode)
        return _finetune_and_evaluate_sharded(
            model,
            train,
            test,
            epochs=epochs,
            batch_size=batch_size,
            learning_rate=learning_rate,
            strategy=strategy,
        )
    model = _classifier(backbone, num_classes, mode)
    model.compile(
        optimizer=tf.keras.optimizers.Adam(learning_rate),
        loss=tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    x, y = train
    model.fit(x, y, batch_size=min(batch_size, len(x)), epochs=epochs, shuffle=True, verbose=0)
    train_loss, train_acc = model.evaluate(x, y, batch_size=EVAL_BATCH_SIZE, verbose=0)
    test_loss, test_acc = model.evaluate(test[0], test[1], batch_size=EVAL_BATCH_SIZE, verbose=0)
    del train_loss
    return FinetuneResult(
        model=model,
        test_accuracy=float(test_acc),
        test_loss=float(test_loss),
        train_accuracy=float(train_acc),
    )


def _finetune_and_evaluate_sharded(
    model: tf.keras.Model,
    train: tuple[np.ndarray, np.ndarray],
    test: tuple[np.ndarray, np.ndarray],
    *,
    epochs: int,
    batch_size: int,
    learning_rate: float,
    strategy: tf.distribute.Strategy,
) -> FinetuneResult:
    """`finetune_and_evaluate`'s training and evaluation over the replicas of `strategy`
    (`model` built in its scope)."""
    replicas = distribute.Replicas(strategy)
    with strategy.scope():
        optimizer = tf.keras.optimizers.Adam(learning_rate)
    trainable = model.trainable_variables

    def sums(batch, weights, training):
        """Sums over this replica's shard: weighted cross-entropy and correct predictions."""
        inputs, labels = batch
        logits = model(inputs, training=training)
        losses = tf.keras.losses.sparse_categorical_crossentropy(labels, logits, from_logits=True)
        weights = tf.cast(weights, losses.dtype)
        correct = tf.cast(
            tf.equal(tf.argmax(logits, axis=-1), tf.cast(labels, tf.int64)), losses.dtype
        )
        return tf.reduce_sum(weights * losses), tf.reduce_sum(weights * correct)

    def replica_train_step(batch, weights, count):
        batch, weights = replicas.shard((batch, weights), "fine-tuning batch")
        with tf.GradientTape() as tape:
            loss_sum, _ = sums(batch, weights, training=True)
            # This shard's share of the global batch's mean loss.
            loss = loss_sum / tf.cast(count, loss_sum.dtype)
        grads = tape.gradient(loss, trainable)
        # The optimizer sums the gradients over replicas before applying them.
        optimizer.apply_gradients(zip(grads, trainable, strict=True))
        return loss

    def replica_eval_step(batch, weights):
        batch, weights = replicas.shard((batch, weights), "evaluation batch")
        return sums(batch, weights, training=False)

    x, y = (tf.convert_to_tensor(a) for a in train)
    spec = (tf.TensorSpec([None, *x.shape[1:]], x.dtype), tf.TensorSpec([None], y.dtype))
    size = min(batch_size, len(train[0]))
    width = _padded_width(size, replicas.num_replicas)

    def train_step_fn(batch):
        padded, weights, count = _pad_rows(batch, width)
        return replicas.sum(strategy.run(replica_train_step, args=(padded, weights, count)))

    train_step = tracing.traced_once(train_step_fn, spec)

    for order in _epoch_orders(len(train[0]), epochs):
        for start in range(0, len(train[0]), size):
            rows = order[start : start + size]
            train_step((tf.gather(x, rows), tf.gather(y, rows)))

    def evaluate(split):
        xs, ys = (tf.convert_to_tensor(a, dtype=s.dtype) for a, s in zip(split, spec, strict=True))
        n = len(split[0])
        eval_size = min(EVAL_BATCH_SIZE, n)
        eval_width = _padded_width(eval_size, replicas.num_replicas)

        def eval_step_fn(batch):
            padded, weights, _ = _pad_rows(batch, eval_width)
            return replicas.sum(strategy.run(replica_eval_step, args=(padded, weights)))

        eval_step = tracing.traced_once(eval_step_fn, spec)

        loss_sum = correct = 0.0
        for start in range(0, n, eval_size):
            batch_loss, batch_correct = eval_step(
                (xs[start : start + eval_size], ys[start : start + eval_size])
            )
            loss_sum += float(batch_loss)
            correct += float(batch_correct)
        return loss_sum / n, correct / n

    _, train_accuracy = evaluate(train)
    test_loss, test_accuracy = evaluate(test)
    return FinetuneResult(
        model=model,
        test_accuracy=test_accuracy,
        test_loss=test_loss,
        train_accuracy=train_accuracy,
    )


# ---------------------------------------------------------------------------
# Multi-label fine-tuning on tf.data pipelines (e.g. GraphTensor inputs)


class Classifier(tf.keras.Model):
    """A backbone topped with a linear head: inputs -> logits [B, num_outputs]."""

    def __init__(self, backbone: tf.keras.Model, num_outputs: int, **kwargs):
        super().__init__(**kwargs)
        self.backbone = backbone
        self.head = tf.keras.layers.Dense(num_outputs, name="ft_head")

    def call(self, inputs, training=False):
        return self.head(self.backbone(inputs, training=training))


@dataclasses.dataclass
class MultilabelResult:
    """The fine-tuned classifier and its per-task ROC-AUC on the test set.

    `per_task_auc` is NaN for a task whose test labels hold only one class;
    `test_auc` is the mean over the others.
    """

    model: Classifier
    test_auc: float
    per_task_auc: np.ndarray
    final_train_loss: float


def predict_multilabel(
    model: tf.keras.Model,
    data: tf.data.Dataset,
    *,
    input_key: str,
    label_key: str,
    strategy: tf.distribute.Strategy | None = None,
    mask_key: str | None = None,
    shard_fn: Callable | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Sigmoid outputs and labels over one pass of `data` (finite, batched).

    Under a multi-replica `strategy` (`model` built in its scope) each batch is
    padded and split over the replicas, and their predictions are reassembled
    by a SUM over replicas (see the module docstring): the same arrays.

    With `mask_key` the batches are padded (e.g. `padding.pad_blocks`): only the
    rows where `batch[mask_key]` is True are returned, in order; under a
    strategy, replica r predicts the piece `shard_fn` cuts (or, without
    `shard_fn`, its contiguous 1/R of the rows). See `finetune_multilabel`.
    """
    return _map_rows(
        lambda x: tf.sigmoid(model(x, training=False)),
        data,
        input_key=input_key,
        label_key=label_key,
        strategy=strategy,
        mask_key=mask_key,
        shard_fn=shard_fn,
    )


def _map_rows(
    fn: Callable,
    data: tf.data.Dataset,
    *,
    input_key: str,
    label_key: str,
    strategy: tf.distribute.Strategy | None,
    mask_key: str | None,
    shard_fn: Callable | None,
    first: dict | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """`fn(batch[input_key])` ([rows, ...] per batch) and the labels over one pass of
    `data`, for the real rows only, in order (see `predict_multilabel`).

    `first`: `data`'s first batch, if already read. A seeded shuffle gives every
    new iterator another order, so the pass must be the same iterator with or
    without a strategy; without `first`, a strategy reads the first batch from an
    iterator of its own for the batches' width.
    """
    _check_padded_options(mask_key, shard_fn)
    sharded = _distributed(strategy)
    if mask_key is not None:
        outputs = _masked_outputs(
            fn, data, input_key, strategy if sharded else None, mask_key, shard_fn
        )
    elif not sharded:
        # One trace for every batch: eager values carry their own sizes (e.g. a
        # GraphTensor's node counts), so a signature from the dataset is given.
        dense_outputs = tracing.traced_once(fn, data.element_spec[input_key])

        def outputs(batch):
            return dense_outputs(batch[input_key])

    else:
        replicas = distribute.Replicas(strategy)
        _check_tensor_batches(data.element_spec, "the evaluation data", replicas.num_replicas)
        if first is None:
            first = next(iter(data), None)
        rows = 1 if first is None else int(tf.shape(first[label_key])[0])
        width = _padded_width(rows, replicas.num_replicas)

        def replica_outputs(inputs):
            shard = replicas.shard(inputs, "evaluation batch")
            return _place_in_rows(fn(shard), width, replicas.num_replicas)

        def padded_outputs_fn(x):
            padded, _, size = _pad_rows(x, width)
            return replicas.sum(strategy.run(replica_outputs, args=(padded,)))[:size]

        padded_outputs = tracing.traced_once(padded_outputs_fn, data.element_spec[input_key])

        def outputs(batch):
            return padded_outputs(batch[input_key])

    values, labels = [], []
    for batch in data:
        values.append(outputs(batch).numpy())
        label = np.asarray(batch[label_key])
        labels.append(label if mask_key is None else label[np.asarray(batch[mask_key])])
    if not values:
        raise ValueError("The evaluation dataset is empty.")
    return np.concatenate(values), np.concatenate(labels)


def _check_padded_options(mask_key, shard_fn) -> None:
    if shard_fn is not None and mask_key is None:
        raise ValueError(
            "shard_fn cuts padded batches, whose real examples mask_key names; give both. "
            f"Received: mask_key=None with shard_fn={shard_fn!r}."
        )


def _global_rows(spec, mask_key: str, what: str, num_replicas: int) -> int:
    """The static number of rows of the padded batches' mask, a multiple of R."""
    mask = spec.get(mask_key) if isinstance(spec, dict) else None
    rows = mask.shape[0] if isinstance(mask, tf.TensorSpec) and mask.shape.rank == 1 else None
    if rows is None or rows % num_replicas:
        raise ValueError(
            f"Padded batches split over {num_replicas} replicas need a mask of a static "
            f"length divisible by {num_replicas}: {what}[{mask_key!r}] must be a bool "
            f"[rows] tensor. Received {mask!r}."
        )
    return int(rows)


def _masked_outputs(fn, data, input_key, strategy, mask_key, shard_fn):
    """`batch -> fn(inputs) of its real rows`, for padded batches (see
    `predict_multilabel`); `strategy` None: one device."""
    replicas = distribute.Replicas(strategy or tf.distribute.get_strategy())
    width = None
    if replicas.num_replicas > 1:
        width = _global_rows(
            data.element_spec, mask_key, "the evaluation data", replicas.num_replicas
        )

    def replica_outputs(batch):
        piece = replicas.shard(batch, "evaluation batch", shard_fn=shard_fn)
        out = fn(piece[input_key])
        return out if width is None else _place_in_rows(out, width, replicas.num_replicas)

    def outputs(batch):
        out = replicas.sum(replicas.strategy.run(replica_outputs, args=(batch,)))
        return tf.boolean_mask(out, batch[mask_key])

    return tracing.traced_once(outputs, data.element_spec)


def per_task_auc(scores: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """ROC-AUC per column; NaN where a column has a single class."""
    if scores.shape != labels.shape:
        raise ValueError(
            f"scores and labels must have the same shape. Received {scores.shape} "
            f"and {labels.shape}."
        )
    out = np.full(scores.shape[1], np.nan)
    for t in range(scores.shape[1]):
        positive = labels[:, t] > 0.5
        if 0 < positive.sum() < len(positive):
            out[t] = reporting.auroc(scores[:, t], positive)
    return out


def epochs_for_steps(steps: int, num_examples: int, batch_size: int) -> int:
    """The whole epochs over `num_examples` in batches of `batch_size` (the last one
    may be smaller) that make at least `steps` updates, and at least one epoch."""
    for name, value in (
        ("steps", steps),
        ("num_examples", num_examples),
        ("batch_size", batch_size),
    ):
        if value < 1:
            raise ValueError(f"{name} must be >= 1. Received: {name}={value}.")
    return max(1, math.ceil(steps / math.ceil(num_examples / batch_size)))


def _feature_batches(
    backbone, train_data, first, *, input_key, label_key, strategy, mask_key, shard_fn, seed
):
    """The linear probe's training data: `backbone`'s features of every real example
    of one pass of `train_data` (`training=False`), under `input_key`, with their
    labels, in batches of the first batch's number of real examples, reshuffled
    every epoch under `seed`. Returns the dataset and its first batch."""
    features, labels = _map_rows(
        lambda x: backbone(x, training=False),
        train_data,
        input_key=input_key,
        label_key=label_key,
        strategy=strategy,
        mask_key=mask_key,
        shard_fn=shard_fn,
        first=first,
    )
    if mask_key is None:
        batch = int(tf.shape(first[label_key])[0])
    else:
        batch = int(np.sum(np.asarray(first[mask_key])))
    data = tf.data.Dataset.from_tensor_slices({input_key: features, label_key: labels})
    data = data.shuffle(len(features), seed=seed, reshuffle_each_iteration=True)
    data = data.batch(max(1, batch))
    return data, next(iter(data))


def finetune_multilabel(
    backbone: tf.keras.Model,
    make_backbone,
    train_data: tf.data.Dataset,
    test_data: tf.data.Dataset,
    *,
    num_tasks: int,
    input_key: str,
    label_key: str,
    mode: str = "full",
    epochs: int = 50,
    learning_rate: float = 1e-3,
    seed: int = 0,
    log=None,
    strategy: tf.distribute.Strategy | None = None,
    mask_key: str | None = None,
    shard_fn: Callable | None = None,
) -> MultilabelResult:
    """Fine-tunes a copy of `backbone` with a fresh sigmoid head; per-task test AUC.

    Training is Adam on the mean sigmoid cross-entropy (over examples and tasks)
    of each batch of `train_data`.

    Args:
      backbone: the pre-trained backbone (inputs -> features); not modified.
        None fine-tunes a freshly initialised one (the no-PT baseline).
      make_backbone: `() -> tf.keras.Model`, a new backbone of the same
        architecture (weights are copied into it; its dropout rate may differ).
      train_data: one epoch of batched training data (reshuffled each epoch).
      test_data: one pass of batched test data.
      num_tasks: the head's outputs, the width of `batch[label_key]`.
      mode: "full" (every weight trains) or "linear" (the backbone is frozen: its
        features of the training examples are computed once, in one pass of
        `train_data` with `training=False`, and the head trains on them for
        `epochs` epochs, in batches of the first batch's number of real examples,
        reshuffled every epoch under `seed`).
      strategy: None or the default strategy: one device. A multi-replica strategy
        (`distribute.make_strategy`): every batch is split over the replicas (see
        the module docstring), giving the single-device weights and AUCs. Without
        `mask_key`, the batches must be dense tensors, and none may be larger than
        the first.
      mask_key: None, or the batches are padded: `batch[mask_key]` is a bool [rows]
        tensor, True for the real examples (e.g. ego-graph batches from
        `padding.pad_blocks`, `padding.MASK_KEY`). The loss is the mean over the
        real examples only, and the test predictions are those of the real
        examples, in order. Under a strategy with R replicas every batch must
        hold a static number of rows, a multiple of R.
      shard_fn: with `mask_key`, under a strategy with R > 1 replicas:
        `(batch, R, replica_id) -> batch`, replica `replica_id`'s piece of a padded
        global batch, holding its contiguous 1/R of the rows of every row tensor
        and of the mask (`distribute.Replicas.shard`; for padded GraphTensors,
        `padding.shard_batch` with `equal_blocks=False`). None: the contiguous 1/R
        of every tensor's leading dimension.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}. Received: mode={mode!r}.")
    if epochs < 1:
        raise ValueError(f"epochs must be >= 1. Received: epochs={epochs}.")
    _check_padded_options(mask_key, shard_fn)
    sharded = _distributed(strategy)
    replicas = distribute.Replicas(strategy if sharded else tf.distribute.get_strategy())
    masked = mask_key is not None
    if sharded:
        for what, data in (("train_data", train_data), ("test_data", test_data)):
            if masked:
                _global_rows(data.element_spec, mask_key, what, replicas.num_replicas)
            if shard_fn is None:
                _check_tensor_batches(data.element_spec, what, replicas.num_replicas)
    tf.keras.utils.set_random_seed(seed)
    with strategy.scope() if sharded else contextlib.nullcontext():
        copy = make_backbone()
        if backbone is not None:
            copy.set_weights(backbone.get_weights())
        model = Classifier(copy, num_tasks, name="finetuned")
        first = next(iter(train_data))
        model(first[input_key], training=False)  # builds the head
        optimizer = tf.keras.optimizers.Adam(learning_rate)
    if mode == "full":
        trainable, forward = model.trainable_variables, lambda x: model(x, training=True)
    else:
        # The frozen backbone's features do not change: computed once, the head
        # then trains on them (as many updates, a small fraction of the cost).
        train_data, first = _feature_batches(
            model.backbone,
            train_data,
            first,
            input_key=input_key,
            label_key=label_key,
            strategy=strategy if sharded else None,
            mask_key=mask_key,
            shard_fn=shard_fn,
            seed=seed,
        )
        masked = False
        trainable, forward = model.head.trainable_variables, model.head
    if sharded and not masked:
        width = _padded_width(int(tf.shape(first[label_key])[0]), replicas.num_replicas)

    def cross_entropy(batch):
        """Sigmoid cross-entropy of every example and task, [B, num_tasks]."""
        logits = forward(batch[input_key])
        labels = tf.cast(batch[label_key], logits.dtype)
        return tf.nn.sigmoid_cross_entropy_with_logits(labels, logits)

    def replica_step(batch, weights, count):
        batch, weights = replicas.shard((batch, weights), "fine-tuning batch")
        with tf.GradientTape() as tape:
            losses = tf.reduce_mean(cross_entropy(batch), axis=-1)  # per example
            # This shard's share of the global batch's mean loss.
            loss = tf.reduce_sum(tf.cast(weights, losses.dtype) * losses) / tf.cast(
                count, losses.dtype
            )
        grads = tape.gradient(loss, trainable)
        # The optimizer sums the gradients over replicas before applying them.
        optimizer.apply_gradients(zip(grads, trainable, strict=True))
        return loss

    def replica_masked_step(batch, count):
        batch = replicas.shard(batch, "fine-tuning batch", shard_fn=shard_fn)
        with tf.GradientTape() as tape:
            losses = tf.reduce_mean(cross_entropy(batch), axis=-1)  # per row
            # Padding rows are zeroed with where, not weighted: a zero weight would
            # not stop a NaN from the padding.
            real = tf.where(batch[mask_key], losses, tf.zeros_like(losses))
            # This piece's share of the global batch's mean over its real examples.
            loss = tf.reduce_sum(real) / tf.cast(count, losses.dtype)
        grads = tape.gradient(loss, trainable)
        # Under a strategy the optimizer sums the gradients over replicas.
        optimizer.apply_gradients(zip(grads, trainable, strict=True))
        return loss

    def step_fn(batch):
        labels = batch[label_key]
        if labels.shape[-1] is not None and labels.shape[-1] != num_tasks:
            raise ValueError(f"Labels have {labels.shape[-1]} tasks; the head has {num_tasks}.")
        if masked:
            count = tf.reduce_sum(tf.cast(batch[mask_key], tf.int32))  # the global real count
            return replicas.sum(replicas.strategy.run(replica_masked_step, args=(batch, count)))
        if sharded:
            padded, weights, count = _pad_rows(batch, width)
            return replicas.sum(strategy.run(replica_step, args=(padded, weights, count)))
        with tf.GradientTape() as tape:
            loss = tf.reduce_mean(cross_entropy(batch))
        grads = tape.gradient(loss, trainable)
        optimizer.apply_gradients(zip(grads, trainable, strict=True))
        return loss

    step = tracing.traced_once(step_fn, train_data.element_spec)
    loss = float("nan")
    for epoch in range(epochs):
        losses = [float(step(batch)) for batch in train_data]
        loss = float(np.mean(losses))
        if not np.isfinite(loss):
            raise FloatingPointError(
                f"Fine-tuning loss is {loss} at epoch {epoch + 1}; lower the learning rate "
                f"({learning_rate})."
            )
        if log is not None and ((epoch + 1) % 10 == 0 or epoch + 1 == epochs):
            log(f"  fine-tune epoch {epoch + 1}/{epochs}  loss {loss:.4f}")
    scores, labels = predict_multilabel(
        model,
        test_data,
        input_key=input_key,
        label_key=label_key,
        strategy=strategy if sharded else None,
        mask_key=mask_key,
        shard_fn=shard_fn,
    )
    aucs = per_task_auc(scores, labels)
    if np.all(np.isnan(aucs)):
        raise ValueError("No test task has both classes; the test AUC is undefined.")
    return MultilabelResult(
        model=model,
        test_auc=float(np.nanmean(aucs)),
        per_task_auc=aucs,
        final_train_loss=loss,
    )
