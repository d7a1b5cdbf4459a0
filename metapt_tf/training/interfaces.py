"""Contracts between an experiment and the online meta-PT loop.

An experiment builds a `MetaPretrainProblem` (its model, PT loss and
meta-parameters) and hands it, with three `tf.data` pipelines, to
`metapt_tf.training.online.run`. The loop owns everything else: the FT head,
optimizers, the meta-gradient, checkpoints, summaries and progress output.
"""

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import tensorflow as tf

Batch = Mapping[str, tf.Tensor]


@dataclasses.dataclass
class MetaPretrainProblem:
    """What the online loop needs from an experiment.

    Attributes:
      backbone: Keras model mapping `batch[ft_input_key]` to features [B, D].
        Shared by PT and FT; called with `training=False` inside the FT unroll.
      pt_params: theta, the variables PT trains: the backbone's and the PT head's.
      meta_params: phi, the variables the meta-gradient trains (e.g.
        `ExampleWeights.variables_list`).
      pt_loss_fn: `batch -> scalar` PT loss on a PT batch; reads theta and phi.
        Called inside `tf.function`; must be differentiable in both. The loop
        traces its steps without AutoGraph (it halves their tracing time), so
        this and the other callables here use `tf.cond`/`tf.where`, not Python
        `if`/`while` on tensors (or are themselves decorated with `tf.function`,
        which converts them).
      num_ft_classes: classes of the FT task (a softmax head of that many logits;
        with `ft_multilabel`, that many independent sigmoid outputs).
      ft_input_key, ft_label_key: keys of the FT batches' inputs and labels.
      ft_multilabel: FT labels are multi-hot [B, num_ft_classes] (sigmoid
        cross-entropy) rather than class ids [B] (softmax cross-entropy).
      pt_head_params: the PT head as [kernel [D, C], bias [C]] when the FT task
        has the PT task's classes; needed by `config.meta.head = "pt_head"`.
      describe_fn: optional host-side callback `() -> dict` called at each
        logging step. Returned floats are logged as scalars, 1-D arrays as
        histograms, and uint8 arrays of rank 4 as images; every value is also
        kept in the run's history (e.g. the learned distribution over time).
      pt_batch_fn: optional `batch -> batch` applied once to every PT batch,
        inside the compiled PT step and meta-step, before `pt_loss_fn` sees it.
        For losses with randomness (e.g. augmented views): draw it here, from a
        generator in `checkpoint_extras`, and every evaluation of the PT loss in
        one meta-step (gradient, HVPs, mixed term) sees the same draw.
      pt_shard_fn: optional `(batch, num_replicas, replica_id) -> batch`: under a
        strategy with R > 1 replicas, replica `replica_id` (a scalar tensor) takes
        its piece of the global PT batch (after `pt_batch_fn`) with it, inside the
        compiled per-replica step. The piece's `pt_loss_fn`, divided by R by the
        loop, must be its share of the global batch's loss. None: the contiguous
        1/R of every tensor's leading dimension (`distribute.Replicas.shard`).
        For batches without a leading batch dimension, e.g. padded GraphTensors
        (`metapt_tf.data.padding.shard_batch`).
      checkpoint_extras: optional trackables (e.g. that generator, or a module
        with non-trainable state) saved and restored with the loop's checkpoint.
        The backbone's non-trainable variables (batch-norm statistics) are
        always saved.
      meta_learning_rate_scales: optional, one positive float per meta-parameter:
        that variable's meta learning rate is `config.meta.meta_learning_rate`
        times its scale (e.g. a slow augmentation network next to a fast scalar).
        None: every meta-parameter at the configured rate.
    """

    backbone: tf.keras.Model
    pt_params: list[tf.Variable]
    meta_params: list[tf.Variable]
    pt_loss_fn: Callable[[Batch], tf.Tensor]
    num_ft_classes: int
    ft_input_key: str = "image"
    ft_label_key: str = "label"
    ft_multilabel: bool = False
    pt_head_params: list[tf.Variable] | None = None
    describe_fn: Callable[[], dict[str, Any]] | None = None
    pt_batch_fn: Callable[[Batch], Batch] | None = None
    pt_shard_fn: Callable[[Batch, int, tf.Tensor], Batch] | None = None
    checkpoint_extras: Mapping[str, Any] | None = None
    meta_learning_rate_scales: Sequence[float] | None = None

    def __post_init__(self):
        if not self.pt_params:
            raise ValueError("MetaPretrainProblem.pt_params must not be empty.")
        if not self.meta_params:
            raise ValueError("MetaPretrainProblem.meta_params must not be empty.")
        if isinstance(self.num_ft_classes, bool) or int(self.num_ft_classes) < 1:
            raise ValueError(
                f"num_ft_classes must be an int >= 1. Received: {self.num_ft_classes!r}."
            )
        scales = self.meta_learning_rate_scales
        if scales is not None:
            scales = list(scales)
            if len(scales) != len(self.meta_params) or not all(
                isinstance(x, int | float) and not isinstance(x, bool) and x > 0 for x in scales
            ):
                raise ValueError(
                    "meta_learning_rate_scales must hold one positive number per meta-parameter "
                    f"({len(self.meta_params)}). Received: {self.meta_learning_rate_scales!r}."
                )
        pt_ids = {id(v) for v in self.pt_params}
        if any(id(v) in pt_ids for v in self.meta_params):
            raise ValueError("pt_params and meta_params must not share variables.")
        missing = [v.name for v in self.backbone.trainable_variables if id(v) not in pt_ids]
        if missing:
            raise ValueError(
                f"Every trainable backbone variable must be in pt_params; missing: {missing}."
            )


def head_logits(features: tf.Tensor, head: list) -> tf.Tensor:
    """The FT head: a linear layer given as [kernel, bias]."""
    return tf.matmul(features, head[0]) + head[1]


def head_loss(logits: tf.Tensor, labels: tf.Tensor, multilabel: bool) -> tf.Tensor:
    if multilabel:
        labels = tf.cast(labels, logits.dtype)
        return tf.reduce_mean(tf.nn.sigmoid_cross_entropy_with_logits(labels, logits))
    return tf.reduce_mean(
        tf.nn.sparse_softmax_cross_entropy_with_logits(tf.cast(labels, tf.int32), logits)
    )


def init_head(feature_dim: int, num_classes: int, generator: tf.random.Generator, dtype):
    """Glorot-uniform kernel and zero bias, drawn from `generator` (checkpointed)."""
    limit = float(np.sqrt(6.0 / (feature_dim + num_classes)))
    kernel = generator.uniform([feature_dim, num_classes], -limit, limit, dtype=dtype)
    return [kernel, tf.zeros([num_classes], dtype)]
