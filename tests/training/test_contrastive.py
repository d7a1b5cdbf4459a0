"""NT-Xent: against a loop-by-loop numpy version, invariances, gradient by finite
differences, argument checks."""

import math

import numpy as np
import pytest
import tensorflow as tf

from metapt_tf.training.contrastive import nt_xent_loss


def reference_nt_xent(z1, z2, temperature):
    """NT-Xent with one loop over the 2B anchors and one over their candidates."""
    z = np.concatenate([z1, z2]).astype(np.float64)
    z = z / np.linalg.norm(z, axis=1, keepdims=True)
    n = len(z)
    batch = n // 2
    losses = []
    for i in range(n):
        partner = (i + batch) % n
        denominator = 0.0
        for j in range(n):
            if j != i:
                denominator += math.exp(float(z[i] @ z[j]) / temperature)
        numerator = math.exp(float(z[i] @ z[partner]) / temperature)
        losses.append(-math.log(numerator / denominator))
    return sum(losses) / n


@pytest.mark.parametrize(
    "batch, dim, temperature", [(1, 3, 0.5), (2, 5, 0.1), (8, 16, 0.5), (13, 4, 1.7)]
)
def test_matches_reference(batch, dim, temperature):
    rng = np.random.default_rng(batch * 100 + dim)
    z1, z2 = rng.normal(size=(2, batch, dim))
    loss = nt_xent_loss(tf.constant(z1), tf.constant(z2), temperature)
    assert loss.dtype == tf.float64 and loss.shape == ()
    expected = reference_nt_xent(z1, z2, temperature)
    assert abs(loss.numpy() - expected) <= 1e-10 * abs(expected) + 1e-15


def test_single_pair_has_zero_loss():
    # B = 1: each anchor's only candidate is its partner.
    loss = nt_xent_loss(tf.constant([[1.0, 2.0]]), tf.constant([[-3.0, 0.5]]))
    assert abs(loss.numpy()) < 1e-6


def test_invariant_to_scale():
    rng = np.random.default_rng(0)
    z1, z2 = rng.normal(size=(2, 6, 8))
    scales1 = rng.uniform(0.01, 100.0, size=(6, 1))
    scales2 = rng.uniform(0.01, 100.0, size=(6, 1))
    base = nt_xent_loss(tf.constant(z1), tf.constant(z2)).numpy()
    for a, b in ((3.7, 3.7), (1e-3, 250.0), (scales1, scales2)):
        scaled = nt_xent_loss(tf.constant(z1 * a), tf.constant(z2 * b)).numpy()
        np.testing.assert_allclose(scaled, base, rtol=1e-12)


def test_lower_for_aligned_positives():
    rng = np.random.default_rng(1)
    z1 = rng.normal(size=(16, 32))
    aligned = nt_xent_loss(tf.constant(z1), tf.constant(z1 + 0.05 * rng.normal(size=z1.shape)))
    unrelated = nt_xent_loss(tf.constant(z1), tf.constant(rng.normal(size=z1.shape)))
    assert aligned.numpy() < unrelated.numpy() - 1.0
    # Aligned views: each anchor ties its partner (similarity 1) against 2B - 2 negatives.
    identical = nt_xent_loss(tf.constant(z1), tf.constant(z1), temperature=0.05).numpy()
    assert identical < 0.01


def test_gradient_matches_finite_differences():
    rng = np.random.default_rng(2)
    z1, z2 = rng.normal(size=(2, 5, 4))
    temperature = 0.3
    z1_var = tf.constant(z1)
    with tf.GradientTape() as tape:
        tape.watch(z1_var)
        loss = nt_xent_loss(z1_var, tf.constant(z2), temperature)
    grad = tape.gradient(loss, z1_var).numpy()
    assert np.all(np.isfinite(grad)) and np.any(grad != 0.0)
    h = 1e-6
    numeric = np.zeros_like(z1)
    for index in np.ndindex(*z1.shape):
        step = np.zeros_like(z1)
        step[index] = h
        plus = nt_xent_loss(tf.constant(z1 + step), tf.constant(z2), temperature).numpy()
        minus = nt_xent_loss(tf.constant(z1 - step), tf.constant(z2), temperature).numpy()
        numeric[index] = (plus - minus) / (2 * h)
    np.testing.assert_allclose(grad, numeric, rtol=1e-6, atol=1e-9)


def test_float32_in_tf_function_with_unknown_batch():
    spec = tf.TensorSpec([None, 8], tf.float32)
    loss_fn = tf.function(nt_xent_loss, input_signature=[spec, spec])
    rng = np.random.default_rng(3)
    z1, z2 = rng.normal(size=(2, 7, 8))
    loss = loss_fn(tf.constant(z1, tf.float32), tf.constant(z2, tf.float32))
    assert loss.dtype == tf.float32
    np.testing.assert_allclose(loss.numpy(), reference_nt_xent(z1, z2, 0.5), rtol=1e-5)
    with pytest.raises(tf.errors.InvalidArgumentError, match="same shape"):
        loss_fn(tf.zeros([3, 8]), tf.ones([4, 8]))


@pytest.mark.parametrize("temperature", [0, 0.0, -0.5, float("nan"), float("inf"), "0.5", True])
def test_bad_temperature(temperature):
    with pytest.raises(ValueError, match=r"temperature must be a finite number > 0\. Received"):
        nt_xent_loss(tf.ones([2, 3]), tf.ones([2, 3]), temperature)


@pytest.mark.parametrize(
    "z1, z2, message",
    [
        (tf.ones([4, 8]), tf.ones([5, 8]), r"same shape .* Received: z1 of shape \(4, 8\), z2"),
        (tf.ones([4, 8]), tf.ones([4, 6]), r"same shape .* Received: z1 of shape \(4, 8\), z2"),
        (tf.ones([4]), tf.ones([4]), r"z1 must have shape \[batch_size, dim\]. Received"),
        (tf.ones([4, 8]), tf.ones([4, 8, 1]), r"z2 must have shape \[batch_size, dim\]"),
        (tf.ones([4, 8], tf.int32), tf.ones([4, 8], tf.int32), "z1 must be a float tensor"),
        (tf.ones([4, 8]), tf.ones([4, 8], tf.float64), "same dtype. Received: <dtype: 'float32'>"),
    ],
)
def test_bad_inputs(z1, z2, message):
    with pytest.raises(ValueError, match=message):
        nt_xent_loss(z1, z2)
