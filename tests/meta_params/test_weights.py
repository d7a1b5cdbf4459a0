"""Per-example weights: their maps from phi, and their derivatives against finite differences."""

import numpy as np
import pytest
import tensorflow as tf

from metapt_tf.meta_params import ExampleWeights, TaskWeights


def _set_phi(weights, phi):
    weights.phi.assign(tf.constant(phi, weights.phi.dtype))


def test_2sigmoid_is_one_at_zero_and_maps_phi():
    weights = ExampleWeights(5)
    np.testing.assert_allclose(weights.weights(tf.constant([0, 3])).numpy(), [1.0, 1.0])
    _set_phi(weights, [0.0, 1.0, -2.0, 0.5, 3.0])
    got = weights.weights(tf.constant([1, 2])).numpy()
    np.testing.assert_allclose(got, 2.0 / (1.0 + np.exp([-1.0, 2.0])), rtol=1e-6)


def test_normalized_has_mean_one_per_batch():
    weights = ExampleWeights(6, weighting="normalized", dtype=tf.float64)
    _set_phi(weights, np.linspace(-2.0, 2.0, 6))
    w = weights.weights(tf.constant([0, 2, 5])).numpy()
    np.testing.assert_allclose(w.mean(), 1.0, rtol=1e-12)


def test_normalized_per_class_has_mean_one_within_each_label():
    rng = np.random.default_rng(0)
    weights = ExampleWeights(40, weighting="normalized_per_class", num_classes=4, dtype=tf.float64)
    _set_phi(weights, rng.normal(size=40))
    indices = np.arange(0, 40, 2)
    labels = np.array([0, 1, 1, 3, 0, 1, 3, 3, 0, 1, 1, 1, 3, 0, 0, 3, 1, 0, 3, 3])  # no label 2
    w = weights.weights(tf.constant(indices), tf.constant(labels)).numpy()
    raw = 2.0 / (1.0 + np.exp(-weights.phi.numpy()[indices]))
    for c in (0, 1, 3):
        m = labels == c
        np.testing.assert_allclose(w[m].mean(), 1.0, rtol=1e-12)
        # Within a label the ranking and the ratios of the raw weights are kept.
        np.testing.assert_allclose(w[m] / w[m][0], raw[m] / raw[m][0], rtol=1e-12)
    assert np.all(np.isfinite(w))


def test_normalized_per_class_gradient_matches_finite_differences():
    # d/dphi of a weighted loss through the per-label normalisation, float64.
    rng = np.random.default_rng(1)
    weights = ExampleWeights(12, weighting="normalized_per_class", num_classes=3, dtype=tf.float64)
    phi0 = rng.normal(size=12)
    indices = tf.constant([0, 1, 2, 4, 5, 7, 8, 9, 11])
    labels = tf.constant([0, 2, 2, 1, 0, 2, 1, 0, 2])
    losses = tf.constant(rng.uniform(0.1, 3.0, size=9))

    def loss():
        return tf.reduce_mean(weights.weights(indices, labels) * losses)

    _set_phi(weights, phi0)
    with tf.GradientTape() as tape:
        value = loss()
    grad = tape.gradient(value, weights.phi).numpy()
    eps = 1e-6
    fd = np.zeros(12)
    for i in range(12):
        for sign in (1.0, -1.0):
            phi = phi0.copy()
            phi[i] += sign * eps
            _set_phi(weights, phi)
            fd[i] += sign * loss().numpy() / (2 * eps)
    np.testing.assert_allclose(grad, fd, rtol=1e-7, atol=1e-10)
    # Examples that are not in the batch get no gradient; the class-wide direction
    # (every phi of one label moved together) does not change the loss.
    assert np.all(grad[[3, 6, 10]] == 0.0)
    for c in range(3):
        members = indices.numpy()[labels.numpy() == c]
        raw = 2.0 / (1.0 + np.exp(-phi0[members]))
        # Moving phi so that every raw weight of label c scales by one factor leaves
        # the loss unchanged: the gradient is orthogonal to d(phi)/d(log scale).
        direction = 1.0 - raw / 2.0  # d phi for d log(raw) = 1
        np.testing.assert_allclose(np.dot(grad[members], 1.0 / direction), 0.0, atol=1e-12)


def test_normalized_per_class_needs_labels_and_num_classes():
    with pytest.raises(ValueError, match="num_classes"):
        ExampleWeights(4, weighting="normalized_per_class")
    weights = ExampleWeights(4, weighting="normalized_per_class", num_classes=2)
    with pytest.raises(ValueError, match="labels"):
        weights.weights(tf.constant([0, 1]))


def test_unknown_weighting_is_refused():
    with pytest.raises(ValueError, match="weighting must be one of"):
        TaskWeights(3, weighting="softmax")
