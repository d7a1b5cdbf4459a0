"""Per-example weights, per-task weights and categorical distributions as meta-parameters.

Each holds one unconstrained `tf.Variable` phi (`.variables` lists it) and maps it
back inside the step: weights w = 2 * sigmoid(phi) in (0, 2), equal to 1 at
phi = 0; a categorical distribution p = softmax(phi), uniform at phi = 0.
"""

import numpy as np
import tensorflow as tf

WEIGHTINGS = ("2sigmoid", "normalized", "normalized_per_class")


def _check_count(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 1:
        raise ValueError(f"{name} must be an int >= 1. Received: {name}={value!r}.")
    return int(value)


class _Weights(tf.Module):
    def __init__(self, count: int, what: str, weighting: str, dtype, name: str, num_classes=None):
        super().__init__(name=name)
        if weighting not in WEIGHTINGS:
            raise ValueError(
                f"weighting must be one of {WEIGHTINGS}. Received: weighting={weighting!r}."
            )
        self.count = _check_count(what, count)
        self.weighting = weighting
        self.num_classes = None
        if weighting == "normalized_per_class":
            self.num_classes = _check_count("num_classes", num_classes)
        self.phi = tf.Variable(tf.zeros([self.count], dtype), name="phi")

    @property
    def variables_list(self) -> list[tf.Variable]:
        return [self.phi]

    def all_weights(self) -> tf.Tensor:
        """w = 2 * sigmoid(phi) for every entry."""
        return 2.0 * tf.sigmoid(self.phi)

    def weights(self, indices: tf.Tensor, labels: tf.Tensor | None = None) -> tf.Tensor:
        """The weights of `indices` in one batch.

        "normalized" rescales them to mean 1 over the batch. "normalized_per_class"
        rescales them to mean 1 within each label of the batch (`labels`, ints in
        [0, num_classes)): every label keeps its share of the loss, so the weights
        can rank examples within a label but cannot shift the class balance.
        Both normalise over the examples passed in: under a distribution strategy,
        each replica's shard of the batch.
        """
        w = tf.gather(self.all_weights(), indices)
        if self.weighting == "normalized":
            w = w / tf.reduce_mean(w)
        elif self.weighting == "normalized_per_class":
            if labels is None:
                raise ValueError(
                    "weighting='normalized_per_class' needs the batch's labels: "
                    "call weights(indices, labels)."
                )
            one_hot = tf.one_hot(tf.cast(labels, tf.int32), self.num_classes, dtype=w.dtype)
            counts = tf.reduce_sum(one_hot, axis=0)
            sums = tf.linalg.matvec(one_hot, w, transpose_a=True)
            w = w * tf.linalg.matvec(one_hot, tf.math.divide_no_nan(counts, sums))
        return w


class ExampleWeights(_Weights):
    """One weight per PT example: w_i = 2 * sigmoid(phi_i), all 1 at the start."""

    def __init__(
        self,
        num_examples: int,
        weighting: str = "2sigmoid",
        dtype=tf.float32,
        name: str = "example_weights",
        num_classes: int | None = None,
    ):
        super().__init__(num_examples, "num_examples", weighting, dtype, name, num_classes)


class TaskWeights(_Weights):
    """One weight per PT task: w_t = 2 * sigmoid(phi_t), all 1 at the start."""

    def __init__(
        self, num_tasks: int, weighting: str = "2sigmoid", dtype=tf.float32, name="task_weights"
    ):
        super().__init__(num_tasks, "num_tasks", weighting, dtype, name)


class CategoricalDistribution(tf.Module):
    """p = softmax(phi) over `num_bins` outcomes, uniform at the start.

    `expectation(values)` is the exact expectation sum_k p_k values[..., k], so a
    loss averaged under the distribution is differentiable in phi without sampling.
    """

    def __init__(self, num_bins: int, dtype=tf.float32, name: str = "categorical"):
        super().__init__(name=name)
        self.num_bins = _check_count("num_bins", num_bins)
        self.phi = tf.Variable(tf.zeros([self.num_bins], dtype), name="phi")

    @property
    def variables_list(self) -> list[tf.Variable]:
        return [self.phi]

    def probs(self) -> tf.Tensor:
        return tf.nn.softmax(self.phi)

    def expectation(self, values: tf.Tensor) -> tf.Tensor:
        """sum_k p_k values[..., k]; `values` has the bins on its last axis."""
        if values.shape[-1] is not None and values.shape[-1] != self.num_bins:
            raise ValueError(
                f"values must have {self.num_bins} entries on the last axis (one per bin). "
                f"Received shape {tuple(values.shape)}."
            )
        return tf.reduce_sum(values * self.probs(), axis=-1)
