"""Tests of the ECG augmentations: base augmentations, the time warp and the pipeline."""

import numpy as np
import pytest
import tensorflow as tf

from metapt_tf.meta_params.ecg_augment import (
    AugmentationPipeline,
    LearnedMask,
    LearnedNoise,
    TimeWarp,
    additive_noise,
    interpolate_time,
    random_lead_mask,
)

LENGTH = 128  # Short signals keep the tests fast; the default T = 1024 is checked once.
LEADS = 12


def _signal(batch=3, length=LENGTH, leads=LEADS, seed=0, dtype=np.float64):
    rng = np.random.default_rng(seed)
    t = np.linspace(0.0, 1.0, length)[None, :, None]
    freq = rng.uniform(2.0, 6.0, [batch, 1, leads])
    x = np.sin(2 * np.pi * freq * t) + 0.3 * rng.normal(size=[batch, length, leads])
    return tf.constant(x * rng.uniform(0.5, 3.0, [batch, 1, leads]), dtype)


# Base augmentations.


def test_random_lead_mask_zeros_one_window_per_lead_within_max_fraction():
    x = _signal(batch=8) + 10.0  # No zeros before masking.
    for max_fraction in (0.5, 0.25):
        y = random_lead_mask(x, tf.random.Generator.from_seed(1), max_fraction=max_fraction)
        zero = (y.numpy() == 0.0).astype(int)
        counts = zero.sum(axis=1)
        assert counts.max() <= int(max_fraction * LENGTH)
        assert counts.max() > 0
        # The zeros of each lead form one contiguous window; the rest is untouched.
        starts = np.diff(np.pad(zero, [[0, 0], [1, 0], [0, 0]]), axis=1) == 1
        assert starts.sum(axis=1).max() <= 1
        np.testing.assert_array_equal(y.numpy()[zero == 0], x.numpy()[zero == 0])
        # Windows differ between leads.
        assert len({tuple(zero[0, :, c]) for c in range(LEADS)}) > 1


def test_additive_noise_scales_with_per_lead_std():
    x = _signal(batch=4)
    c = tf.constant(np.arange(1.0, LEADS + 1.0)[None, None, :])
    noise_x = additive_noise(x, tf.random.Generator.from_seed(2)) - x
    noise_cx = additive_noise(x * c, tf.random.Generator.from_seed(2)) - x * c
    np.testing.assert_allclose(noise_cx.numpy(), noise_x.numpy() * c.numpy(), rtol=1e-10)
    assert np.abs(noise_x.numpy()).max() > 0.0
    # |scale| <= max_scale: the noise divided by the lead std stays within 0.1 * N(0, 1).
    ratio = noise_x / tf.math.reduce_std(x, axis=1, keepdims=True)
    assert np.abs(ratio.numpy()).max() < 0.1 * 6.0
    zero = additive_noise(x, tf.random.Generator.from_seed(2), max_scale=0.0)
    np.testing.assert_array_equal(zero.numpy(), x.numpy())


@pytest.mark.parametrize("fn", [random_lead_mask, additive_noise])
def test_base_augmentations_reject_wrong_rank(fn):
    gen = tf.random.Generator.from_seed(0)
    with pytest.raises(ValueError, match=r"rank 3, \[batch, time, leads\]"):
        fn(tf.zeros([4, LENGTH]), gen)
    with pytest.raises(ValueError, match="floating-point"):
        fn(tf.zeros([1, LENGTH, LEADS], tf.int32), gen)
    with pytest.raises(TypeError, match="tf.random.Generator"):
        fn(tf.zeros([1, LENGTH, LEADS]), 0)


def test_base_augmentations_reject_bad_arguments():
    gen = tf.random.Generator.from_seed(0)
    x = tf.zeros([1, LENGTH, LEADS])
    with pytest.raises(ValueError, match="max_fraction"):
        random_lead_mask(x, gen, max_fraction=1.5)
    with pytest.raises(ValueError, match="max_fraction"):
        random_lead_mask(x, gen, max_fraction=0.0)
    with pytest.raises(ValueError, match="max_scale"):
        additive_noise(x, gen, max_scale=-0.1)


# The time warp.


def _warp(dtype=tf.float64, length=LENGTH, **kwargs):
    tf.keras.utils.set_random_seed(0)
    return TimeWarp(length=length, num_leads=LEADS, dtype=dtype, **kwargs)


def test_time_warp_is_monotone_for_large_magnitudes():
    x = _signal(batch=4)
    noise = _warp().sample_draws(4, tf.random.Generator.from_seed(3))
    for s in (1.0, 10.0, 100.0):
        warp = _warp(initial_s=s)
        p = warp.positions(x, noise, training=True).numpy()
        assert np.all(np.isfinite(p))
        assert np.all(np.diff(p, axis=1) >= 0.0)
        np.testing.assert_allclose(p[:, [0, -1]], [[0.0, LENGTH - 1.0]] * 4, atol=1e-9)
        # The warp really moves the samples.
        assert np.abs(p - np.arange(LENGTH)).max() > 1.0
    # float32 with a huge magnitude: no overflow, still monotone.
    warp32 = _warp(dtype=tf.float32, initial_s=1000.0)
    p32 = warp32.positions(tf.cast(x, tf.float32), tf.cast(noise, tf.float32)).numpy()
    assert np.all(np.isfinite(p32)) and np.all(np.diff(p32, axis=1) >= 0.0)


def test_time_warp_is_exact_identity_at_zero_magnitude():
    x = _signal(batch=2)
    noise = tf.random.Generator.from_seed(4).normal([2, LENGTH // 4], dtype=tf.float64)
    warp = _warp(initial_s=0.0)
    np.testing.assert_array_equal(warp.positions(x, noise).numpy()[0], np.arange(LENGTH))
    np.testing.assert_array_equal(warp(x, noise, training=True).numpy(), x.numpy())
    np.testing.assert_array_equal(_warp()(x, tf.zeros_like(noise)).numpy(), x.numpy())


def test_time_warp_default_shape_and_magnitude_range():
    warp = _warp(dtype=tf.float32, length=1024)
    x = tf.cast(_signal(batch=2, length=1024), tf.float32)
    noise = warp.sample_draws(2, tf.random.Generator.from_seed(5))
    assert noise.shape == (2, 256)
    assert warp(x, noise).shape == (2, 1024, LEADS)
    m = warp.magnitude(x).numpy()
    assert m.shape == (2,) and np.all((m > 0.0) & (m < 2.0))
    # 4 convolutions (no bias), 4 BatchNorms (gamma, beta), Dense (kernel, bias) and s.
    assert len(warp.variables_list) == 4 + 8 + 2 + 1
    assert warp.variables_list[0].shape == (15, LEADS, 32)


def test_interpolate_time_matches_numpy_interp():
    x = _signal(batch=2)
    rng = np.random.default_rng(6)
    p = np.sort(rng.uniform(0, LENGTH - 1, [2, LENGTH]), axis=1)
    p[:, -1] = LENGTH - 1
    y = interpolate_time(x, tf.constant(p)).numpy()
    for b in range(2):
        for c in range(LEADS):
            expected = np.interp(p[b], np.arange(LENGTH), x.numpy()[b, :, c])
            np.testing.assert_allclose(y[b, :, c], expected, rtol=1e-12, atol=1e-12)


def test_time_warp_rejects_wrong_shapes():
    warp = _warp()
    noise = tf.zeros([1, LENGTH // 4], tf.float64)
    with pytest.raises(ValueError, match=f"{LENGTH} time steps"):
        warp(tf.zeros([1, LENGTH + 4, LEADS], tf.float64), noise)
    with pytest.raises(ValueError, match=f"{LEADS} leads"):
        warp(tf.zeros([1, LENGTH, 3], tf.float64), noise)
    with pytest.raises(ValueError, match="rank 3"):
        warp(tf.zeros([LENGTH, LEADS], tf.float64), noise)
    with pytest.raises(ValueError, match="multiple of 4"):
        TimeWarp(length=130)


# The pipeline.


def _pipeline(**kwargs):
    tf.keras.utils.set_random_seed(0)
    return AugmentationPipeline(length=LENGTH, num_leads=LEADS, dtype=tf.float64, **kwargs)


def test_same_warp_for_all_leads():
    pipe = _pipeline(base_augmentations=False, learned_noise=False, learned_mask=False)
    one = _signal(batch=3, leads=1)
    x = tf.tile(one, [1, 1, LEADS])
    y = pipe(x, tf.random.Generator.from_seed(7), training=True).numpy()
    assert np.abs(y - x.numpy()).max() > 1e-3  # The warp did something...
    for c in range(1, LEADS):
        np.testing.assert_array_equal(y[:, :, c], y[:, :, 0])  # ...the same to every lead.


def test_pipeline_draws_fix_the_view_and_generators_vary_it():
    pipe = _pipeline()
    x = _signal(batch=2)
    gen = tf.random.Generator.from_seed(8)
    d1, d2 = pipe.sample_draws(2, gen), pipe.sample_draws(2, gen)
    v1 = pipe(x, d1, training=True).numpy()
    np.testing.assert_array_equal(pipe(x, d1, training=True).numpy(), v1)
    assert np.abs(pipe(x, d2, training=True).numpy() - v1).max() > 1e-3
    assert v1.shape == (2, LENGTH, LEADS)
    np.testing.assert_array_equal(
        pipe(x, tf.random.Generator.from_seed(9)).numpy(),
        pipe(x, tf.random.Generator.from_seed(9)).numpy(),
    )
    with pytest.raises(KeyError, match="sample_draws"):
        pipe.apply(x, {"warp": d1["warp"]})
    with pytest.raises(TypeError, match="tf.random.Generator or a dict"):
        pipe(x, 3)
    with pytest.raises(ValueError, match=f"{LEADS} leads"):
        pipe(tf.zeros([2, LENGTH, 8], tf.float64), d1)


def test_learned_parts_map_their_variables():
    noise = LearnedNoise(initial_scale=0.05, dtype=tf.float64)
    np.testing.assert_allclose(noise.scale().numpy(), 0.05, rtol=1e-12)
    mask = LearnedMask(dtype=tf.float64)
    assert mask.strength().numpy() == 0.5
    x = tf.ones([1, 8, 2], tf.float64)
    y = mask(x, tf.constant([[2, 0]]), tf.constant([[3, 0]])).numpy()
    np.testing.assert_array_equal(y[0, :, 0], [1, 1, 0.5, 0.5, 0.5, 1, 1, 1])
    np.testing.assert_array_equal(y[0, :, 1], np.ones(8))


def _contrastive_loss(v1, v2, projection, temperature=0.5):
    f1 = tf.math.l2_normalize(tf.reshape(v1, [v1.shape[0], -1]) @ projection, axis=1)
    f2 = tf.math.l2_normalize(tf.reshape(v2, [v2.shape[0], -1]) @ projection, axis=1)
    logits = f1 @ tf.transpose(f2) / temperature
    return tf.reduce_mean(tf.reduce_logsumexp(logits, axis=1) - tf.linalg.diag_part(logits))


def test_gradients_match_finite_differences_for_every_parameter():
    pipe = _pipeline(initial_s=0.7)
    x = _signal(batch=3)
    gen = tf.random.Generator.from_seed(10)
    draws1, draws2 = pipe.sample_draws(3, gen), pipe.sample_draws(3, gen)
    rng = np.random.default_rng(11)
    projection = tf.constant(rng.normal(size=[LENGTH * LEADS, 8]) / np.sqrt(LENGTH * LEADS))
    variables = pipe.variables_list
    assert len(variables) == 4 + 8 + 2 + 1 + 2

    def loss():
        v1 = pipe.apply(x, draws1, training=True)
        v2 = pipe.apply(x, draws2, training=True)
        return _contrastive_loss(v1, v2, projection)

    with tf.GradientTape() as tape:
        value = loss()
    grads = tape.gradient(value, variables)
    eps = 1e-6
    for var, grad in zip(variables, grads, strict=True):
        assert grad is not None, var.name
        assert np.abs(grad.numpy()).max() > 1e-8, var.name
        direction = rng.normal(size=var.shape)
        original = var.numpy()
        var.assign(original + eps * direction)
        plus = loss().numpy()
        var.assign(original - eps * direction)
        minus = loss().numpy()
        var.assign(original)
        numeric = (plus - minus) / (2 * eps)
        analytic = float(np.sum(grad.numpy() * direction))
        rel = abs(numeric - analytic) / max(abs(analytic), 1e-12)
        assert rel < 1e-4, (var.name, numeric, analytic, rel)


def test_pipeline_is_differentiable_in_the_signal():
    # Also guards against a float32 round trip of the CNN input, which makes the
    # magnitude noisy at the 1e-8 level and breaks this float64 check.
    pipe = _pipeline(initial_s=0.7)
    x = _signal(batch=3)
    draws = pipe.sample_draws(3, tf.random.Generator.from_seed(12))
    weights = tf.constant(np.random.default_rng(13).normal(size=[3, LENGTH, LEADS]))

    def loss(signal):
        return tf.reduce_sum(weights * pipe.apply(signal, draws, training=True))

    with tf.GradientTape() as tape:
        tape.watch(x)
        value = loss(x)
    grad = tape.gradient(value, x).numpy()
    direction = tf.constant(np.random.default_rng(14).normal(size=x.shape))
    eps = 1e-6
    numeric = (loss(x + eps * direction) - loss(x - eps * direction)).numpy() / (2 * eps)
    analytic = float(np.sum(grad * direction.numpy()))
    assert abs(numeric - analytic) < 1e-4 * abs(analytic)
