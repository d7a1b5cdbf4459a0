"""SimCLR's contrastive loss (NT-Xent) for the ECG pre-training.

Chen et al. 2020, "A Simple Framework for Contrastive Learning of Visual
Representations": a batch of B examples gives two augmented views each, projected
to z1[i] and z2[i]. Of the 2B projections, each one (the anchor) is to pick out its
partner (the other view of the same example) among the 2B - 1 others, by softmax
over cosine similarities divided by a temperature:

  loss_i = -log( exp(s(i, p(i)) / t) / sum_{j != i} exp(s(i, j) / t) ),

with s the cosine similarity and p(i) the partner of i; the loss is the mean of
loss_i over the 2B anchors. The anchor's similarity to itself is left out of the sum.

Under a `tf.distribute` strategy each replica holds a shard of the batch, and the
NT-Xent loss of a shard (negatives from that shard only) is not its share of the
loss of the whole batch. `global_nt_xent_loss` gathers the projections of every
replica (as SimCLR does across TPU cores) so that each replica computes the loss
of the global batch.
"""

import math

import tensorflow as tf


def _check_temperature(temperature) -> float:
    if (
        isinstance(temperature, bool)
        or not isinstance(temperature, int | float)
        or not math.isfinite(temperature)
        or temperature <= 0
    ):
        raise ValueError(
            f"temperature must be a finite number > 0. Received: temperature={temperature!r}."
        )
    return float(temperature)


def _check_views(z1: tf.Tensor, z2: tf.Tensor) -> None:
    for what, z in (("z1", z1), ("z2", z2)):
        if not z.dtype.is_floating:
            raise ValueError(f"{what} must be a float tensor. Received: {what} of dtype {z.dtype}.")
        if z.shape.rank != 2:
            raise ValueError(
                f"{what} must have shape [batch_size, dim]. Received: {what} of shape {z.shape}."
            )
    if z1.dtype != z2.dtype:
        raise ValueError(
            f"z1 and z2 must have the same dtype. Received: {z1.dtype} and {z2.dtype}."
        )
    if not z1.shape.is_compatible_with(z2.shape):
        raise ValueError(
            "z1 and z2 must have the same shape [batch_size, dim] (row i of each is a view of "
            f"example i). Received: z1 of shape {z1.shape}, z2 of shape {z2.shape}."
        )


def nt_xent_loss(z1, z2, temperature: float = 0.5) -> tf.Tensor:
    """The NT-Xent loss of two views of a batch: a scalar of the dtype of z1 and z2.

    Args:
      z1, z2: float [B, D], the projections of the two views; row i of z1 and row i
        of z2 come from the same example. Their norms do not matter (the loss uses
        cosine similarities).
      temperature: the softmax temperature, > 0 (0.5 here by default; SimCLR tunes it).

    Raises:
      ValueError: for a temperature <= 0 (or not finite), for inputs that are not
        floats of rank 2, or whose shapes or dtypes differ (shapes known at trace
        time); InvalidArgumentError at run time for shapes that turn out to differ.
    """
    temperature = _check_temperature(temperature)
    z1 = tf.convert_to_tensor(z1)
    z2 = tf.convert_to_tensor(z2, dtype_hint=z1.dtype)
    _check_views(z1, z2)
    with tf.control_dependencies(
        [
            tf.debugging.assert_equal(
                tf.shape(z1), tf.shape(z2), message="z1 and z2 must have the same shape."
            )
        ]
    ):
        z = tf.concat([z1, z2], axis=0)  # [2B, D]
    batch_size = tf.shape(z1)[0]
    z = tf.math.l2_normalize(z, axis=1)
    logits = tf.matmul(z, z, transpose_b=True) / tf.constant(temperature, z.dtype)  # [2B, 2B]
    num_views = 2 * batch_size
    is_self = tf.eye(num_views, dtype=tf.bool)
    logits = tf.where(is_self, tf.constant(-math.inf, z.dtype), logits)
    partner = tf.concat([tf.range(batch_size, num_views), tf.range(0, batch_size)], axis=0)
    positive = tf.gather(logits, partner, axis=1, batch_dims=1)  # logits[i, partner[i]]
    per_anchor = tf.reduce_logsumexp(logits, axis=1) - positive
    return tf.reduce_mean(per_anchor)


def gather_replicas(z: tf.Tensor) -> tf.Tensor:
    """Every replica's `z`, concatenated along axis 0 in replica order.

    In replica context (inside `strategy.run`) with R > 1 replicas this is an
    all-gather; its gradient sums the cotangents over the replicas and hands each
    replica those of its own rows. With one replica, or in cross-replica context,
    `z` is returned as it is.
    """
    ctx = tf.distribute.get_replica_context()
    if ctx is None or ctx.num_replicas_in_sync == 1:
        return z
    return ctx.all_gather(z, axis=0)


def global_nt_xent_loss(z1, z2, temperature: float = 0.5) -> tf.Tensor:
    """The NT-Xent loss of the global batch, from each replica's shard of it.

    Inside `strategy.run`, with replica r holding rows [r B/R, (r+1) B/R) of the
    global batch of B examples (`distribute.Replicas.shard`), the projections of
    all replicas are gathered in replica order, so every replica returns the
    single-device loss of the B examples, with negatives from the whole batch.
    Differentiating it on every replica and summing the gradients over replicas
    (as an optimizer does) gives R times the single-device gradient: scale each
    replica's loss by 1/R, as the online loop does with every PT loss. With one
    replica, or outside `strategy.run`, this is `nt_xent_loss`.

    Args:
      z1, z2: float [B/R, D], this replica's projections of the two views.
      temperature: as for `nt_xent_loss`.
    """
    z1 = tf.convert_to_tensor(z1)
    z2 = tf.convert_to_tensor(z2, dtype_hint=z1.dtype)
    _check_views(z1, z2)
    return nt_xent_loss(gather_replicas(z1), gather_replicas(z2), temperature)
