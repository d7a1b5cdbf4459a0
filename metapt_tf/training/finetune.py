"""Final fine-tuning of a pre-trained backbone with a fresh head, and evaluation.

After meta-PT (or plain PT) the backbone is copied, topped with a new linear
head of `num_classes` logits and trained on the FT training set: every weight
("full") or the head alone on frozen features ("linear"). The copy keeps the
pre-trained backbone itself untouched. Evaluation reports loss and accuracy
on a held-out FT test set.
"""

import dataclasses

import numpy as np
import tensorflow as tf

from metapt_tf.training import reporting

MODES = ("full", "linear")


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
) -> FinetuneResult:
    """Fine-tunes a copy of `backbone` with a fresh head; evaluates on `test`.

    Args:
      backbone: inputs -> features; not modified.
      train, test: (inputs, integer labels) arrays.
      num_classes: logits of the new head.
      mode: "full" (all weights train) or "linear" (the backbone is frozen).
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}. Received: mode={mode!r}.")
    _check_split("train", train)
    _check_split("test", test)
    tf.keras.utils.set_random_seed(seed)
    copy = tf.keras.models.clone_model(backbone)
    copy.set_weights(backbone.get_weights())
    copy.trainable = mode == "full"
    inputs = tf.keras.Input(shape=backbone.input_shape[1:], name="image")
    logits = tf.keras.layers.Dense(num_classes, name="ft_head")(copy(inputs, training=False))
    model = tf.keras.Model(inputs, logits, name="finetuned")
    model.compile(
        optimizer=tf.keras.optimizers.Adam(learning_rate),
        loss=tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    x, y = train
    model.fit(x, y, batch_size=min(batch_size, len(x)), epochs=epochs, shuffle=True, verbose=0)
    train_loss, train_acc = model.evaluate(x, y, batch_size=256, verbose=0)
    test_loss, test_acc = model.evaluate(test[0], test[1], batch_size=256, verbose=0)
    del train_loss
    return FinetuneResult(
        model=model,
        test_accuracy=float(test_acc),
        test_loss=float(test_loss),
        train_accuracy=float(train_acc),
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
    model: tf.keras.Model, data: tf.data.Dataset, *, input_key: str, label_key: str
) -> tuple[np.ndarray, np.ndarray]:
    """Sigmoid outputs and labels over one pass of `data` (finite, batched)."""

    # One trace for every batch: eager values carry their own sizes (e.g. a
    # GraphTensor's node counts), so a signature from the dataset is given.
    @tf.function(input_signature=[data.element_spec[input_key]])
    def probs(x):
        return tf.sigmoid(model(x, training=False))

    scores, labels = [], []
    for batch in data:
        scores.append(probs(batch[input_key]).numpy())
        labels.append(np.asarray(batch[label_key]))
    if not scores:
        raise ValueError("The evaluation dataset is empty.")
    return np.concatenate(scores), np.concatenate(labels)


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
) -> MultilabelResult:
    """Fine-tunes a copy of `backbone` with a fresh sigmoid head; per-task test AUC.

    Args:
      backbone: the pre-trained backbone (inputs -> features); not modified.
        None fine-tunes a freshly initialised one (the no-PT baseline).
      make_backbone: `() -> tf.keras.Model`, a new backbone of the same
        architecture (weights are copied into it; its dropout rate may differ).
      train_data: one epoch of batched training data (reshuffled each epoch).
      test_data: one pass of batched test data.
      num_tasks: the head's outputs, the width of `batch[label_key]`.
      mode: "full" (every weight trains) or "linear" (the backbone is frozen).
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}. Received: mode={mode!r}.")
    if epochs < 1:
        raise ValueError(f"epochs must be >= 1. Received: epochs={epochs}.")
    tf.keras.utils.set_random_seed(seed)
    copy = make_backbone()
    if backbone is not None:
        copy.set_weights(backbone.get_weights())
    model = Classifier(copy, num_tasks, name="finetuned")
    first = next(iter(train_data))
    model(first[input_key], training=False)  # builds the head
    trainable = model.trainable_variables if mode == "full" else model.head.trainable_variables
    optimizer = tf.keras.optimizers.Adam(learning_rate)

    @tf.function(input_signature=[train_data.element_spec])
    def step(batch):
        labels = tf.cast(batch[label_key], tf.float32)
        if labels.shape[-1] is not None and labels.shape[-1] != num_tasks:
            raise ValueError(f"Labels have {labels.shape[-1]} tasks; the head has {num_tasks}.")
        with tf.GradientTape() as tape:
            logits = model(batch[input_key], training=mode == "full")
            loss = tf.reduce_mean(tf.nn.sigmoid_cross_entropy_with_logits(labels, logits))
        grads = tape.gradient(loss, trainable)
        optimizer.apply_gradients(zip(grads, trainable, strict=True))
        return loss

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
    scores, labels = predict_multilabel(model, test_data, input_key=input_key, label_key=label_key)
    aucs = per_task_auc(scores, labels)
    if np.all(np.isnan(aucs)):
        raise ValueError("No test task has both classes; the test AUC is undefined.")
    return MultilabelResult(
        model=model,
        test_auc=float(np.nanmean(aucs)),
        per_task_auc=aucs,
        final_train_loss=loss,
    )
