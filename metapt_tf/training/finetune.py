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
