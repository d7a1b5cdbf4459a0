"""The 1-D ResNet backbone and projection head: shapes, parameter count, BatchNorm
modes, gradients, serialization, argument checks."""

import numpy as np
import pytest
import tensorflow as tf

from metapt_tf.models import (
    TwiceDifferentiableBatchNorm,
    projection_head,
    resnet1d_backbone,
    resnet1d_parameter_count,
)
from metapt_tf.training.contrastive import nt_xent_loss

SMALL = dict(channels=(4, 8), blocks=(1, 2), kernel_size=5)


def ecg(rng, batch, length, leads=12):
    return tf.constant(rng.normal(size=(batch, length, leads)), tf.float32)


def test_output_shape_default_length():
    model = resnet1d_backbone()
    assert model.input_shape == (None, 1024, 12)
    features = model(ecg(np.random.default_rng(0), 2, 1024), training=False)
    assert features.shape == (2, 256) and features.dtype == tf.float32


def test_output_shape_shorter_and_variable_lengths():
    rng = np.random.default_rng(1)
    assert resnet1d_backbone(length=256)(ecg(rng, 3, 256)).shape == (3, 256)
    model = resnet1d_backbone(length=None, num_leads=2, **SMALL)
    for length in (256, 100, 1):  # lengths not divisible by 16 work too ("same" padding)
        assert model(ecg(rng, 2, length, leads=2)).shape == (2, 8)


def test_parameter_count_default_closed_form():
    # k = 15, 12 leads, widths 32/64/128/256, 2 blocks each; convolutions have no bias,
    # a BatchNorm on c channels holds 4c weights (gamma, beta, moving mean and variance).
    stem = 15 * 12 * 32 + 4 * 32  # 5,888
    stage_1 = 2 * (2 * 15 * 32 * 32 + 2 * 4 * 32)  # identity shortcuts: 61,952

    def stage(c_in, c_out):  # first block downsamples, with a 1x1 projection + BN
        first = 15 * c_in * c_out + 15 * c_out * c_out + c_in * c_out + 3 * 4 * c_out
        second = 2 * 15 * c_out * c_out + 2 * 4 * c_out
        return first + second

    expected = stem + stage_1 + stage(32, 64) + stage(64, 128) + stage(128, 256)
    assert expected == 4_635_648
    num_bn_channels = 32 + 4 * 32 + 5 * (64 + 128 + 256)  # 20 BatchNorms
    model = resnet1d_backbone()
    assert model.count_params() == expected == resnet1d_parameter_count()
    trainable = sum(int(np.prod(v.shape)) for v in model.trainable_variables)
    assert trainable == expected - 2 * num_bn_channels == 4_630_848
    assert resnet1d_parameter_count(trainable_only=True) == trainable


@pytest.mark.parametrize(
    "config",
    [
        dict(num_leads=3, channels=(4,), blocks=(3,), kernel_size=3),
        dict(num_leads=1, channels=(6, 6, 5), blocks=(1, 1, 2), kernel_size=4),
        dict(num_leads=12, channels=(8, 4), blocks=(2, 1), kernel_size=1),
    ],
)
def test_parameter_count_other_configs(config):
    model = resnet1d_backbone(length=None, **config)
    assert model.count_params() == resnet1d_parameter_count(**config)


def test_projection_head():
    head = projection_head()
    assert head.count_params() == 256 * 256 + 256 + 256 * 128 + 128 == 98_688
    out = head(tf.random.stateless_normal([5, 256], seed=[0, 1]))
    assert out.shape == (5, 128)
    assert projection_head(16, hidden=8, out=4)(tf.zeros([2, 16])).shape == (2, 4)


def test_every_batch_norm_is_twice_differentiable():
    model = resnet1d_backbone()
    norms = [x for x in model.layers if isinstance(x, tf.keras.layers.BatchNormalization)]
    assert len(norms) == 1 + 4 + 3 * 5  # stem, stage 1, stages 2-4 (with the shortcut's)
    assert all(isinstance(x, TwiceDifferentiableBatchNorm) for x in norms)


def test_batch_norm_training_vs_inference():
    rng = np.random.default_rng(2)
    model = resnet1d_backbone(length=64, **SMALL)
    x = ecg(rng, 4, 64) * 3.0 + 1.0
    other = tf.concat([x[:1], ecg(rng, 3, 64) * 3.0 + 1.0], axis=0)
    # Inference: moving statistics, so each example's features ignore the rest of the batch.
    infer = model(x, training=False)
    np.testing.assert_allclose(model(other, training=False)[0], infer[0], rtol=1e-5, atol=1e-6)
    # Training: batch statistics, so they depend on the batch, and differ from inference.
    moving_before = [v.numpy() for v in model.non_trainable_variables]
    train = model(x, training=True)
    assert not np.allclose(train.numpy(), infer.numpy(), atol=1e-3)
    assert not np.allclose(model(other, training=True)[0], train[0], atol=1e-4)
    # ... and update the moving statistics, which inference does not.
    moving_after = [v.numpy() for v in model.non_trainable_variables]
    assert all(not np.allclose(a, b) for a, b in zip(moving_before, moving_after, strict=True))
    model(x, training=False)
    for a, v in zip(moving_after, model.non_trainable_variables, strict=True):
        np.testing.assert_array_equal(a, v.numpy())


def test_gradients_finite_and_nonzero():
    rng = np.random.default_rng(3)
    model = resnet1d_backbone(length=128)
    x = ecg(rng, 4, 128)
    weights = tf.constant(rng.normal(size=(1, 256)), tf.float32)
    with tf.GradientTape() as tape:
        loss = tf.reduce_sum(model(x, training=True) * weights)
    grads = tape.gradient(loss, model.trainable_variables)
    assert len(grads) == len(model.trainable_variables) == 20 + 2 * 20  # 20 convs, 20 BNs
    for var, grad in zip(model.trainable_variables, grads, strict=True):
        assert grad is not None, var.name
        assert np.all(np.isfinite(grad.numpy())), var.name
        assert np.any(grad.numpy() != 0.0), var.name


def test_simclr_loss_hvp_matches_finite_differences(assert_hvp_matches_central_differences):
    """The PT loss (both views in one batch, batch statistics) is twice differentiable."""
    tf.keras.utils.set_random_seed(5)
    backbone = resnet1d_backbone(length=32, num_leads=3, **SMALL)
    head = projection_head(8, hidden=8, out=4)
    rng = np.random.default_rng(5)
    x = ecg(rng, 6, 32, leads=3)
    views = tf.concat([x, x + 0.3 * ecg(rng, 6, 32, leads=3)], axis=0)
    params = backbone.trainable_variables + head.trainable_variables

    def loss_fn():
        z1, z2 = tf.split(head(backbone(views, training=True)), 2, axis=0)
        return nt_xent_loss(z1, z2, temperature=0.5)

    vector = [tf.constant(rng.normal(size=p.shape), tf.float32) for p in params]
    assert_hvp_matches_central_differences(loss_fn, params, vector)


def test_serialization_round_trip():
    rng = np.random.default_rng(4)
    model = resnet1d_backbone(length=None, **SMALL)
    clone = tf.keras.Model.from_config(model.get_config())
    clone.set_weights(model.get_weights())
    x = ecg(rng, 3, 40)
    for training in (False, True):
        np.testing.assert_allclose(
            clone(x, training=training), model(x, training=training), rtol=1e-5, atol=1e-6
        )
    norms = [x for x in clone.layers if isinstance(x, tf.keras.layers.BatchNormalization)]
    assert norms and all(isinstance(x, TwiceDifferentiableBatchNorm) for x in norms)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(num_leads=0), "num_leads must be an int >= 1. Received: num_leads=0"),
        (dict(length=0), "length must be an int >= 1. Received: length=0"),
        (dict(length=256.0), "length must be an int >= 1. Received: length=256.0"),
        (dict(channels=()), "channels must be a non-empty tuple of ints >= 1. Received"),
        (dict(channels=(32, 0, 128, 256)), r"Received: channels=\(32, 0, 128, 256\)"),
        (dict(blocks=(2, True, 2, 2)), r"blocks must be .* Received: blocks=\(2, True"),
        (dict(blocks=(2, 2)), r"same length. Received: channels=.*\(length 4\).*\(length 2\)"),
        (dict(kernel_size=-3), "kernel_size must be an int >= 1. Received: kernel_size=-3"),
        (dict(name=""), "name must be a non-empty str. Received: name=''"),
    ],
)
def test_bad_backbone_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        resnet1d_backbone(**kwargs)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(feature_dim=0), "feature_dim must be an int >= 1. Received: feature_dim=0"),
        (dict(hidden=None), "hidden must be an int >= 1. Received: hidden=None"),
        (dict(out=1.5), "out must be an int >= 1. Received: out=1.5"),
    ],
)
def test_bad_head_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        projection_head(**kwargs)


def test_bad_parameter_count_arguments():
    with pytest.raises(ValueError, match="same length"):
        resnet1d_parameter_count(channels=(8, 16), blocks=(1,))
