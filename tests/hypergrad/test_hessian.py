"""HVPs in both modes against a dense Hessian (itself checked by finite differences)."""

import numpy as np
import pytest
import tensorflow as tf

from metapt_tf import hypergrad

MODES = hypergrad.HVP_MODES


def _mlp_problem(dtype=tf.float64, seed=0):
    rng = np.random.default_rng(seed)
    shapes = [(4, 5), (5,), (5, 3), (3,)]
    params = [
        tf.Variable(rng.normal(scale=0.7, size=s), dtype=dtype, name=f"p{i}")
        for i, s in enumerate(shapes)
    ]
    x = tf.constant(rng.normal(size=(7, 4)), dtype)
    labels = tf.constant(rng.integers(0, 3, size=7))

    def loss_fn():
        w1, b1, w2, b2 = params
        logits = tf.tanh(x @ w1 + b1) @ w2 + b2
        ce = tf.nn.sparse_softmax_cross_entropy_with_logits(labels, logits)
        return tf.reduce_mean(ce) + 0.1 * tf.reduce_sum(w1**3)

    return loss_fn, params, rng


def _flat(tensors):
    return np.concatenate([np.reshape(t, [-1]) for t in tensors])


def _split(flat, params):
    out, i = [], 0
    for p in params:
        n = int(np.prod(p.shape))
        out.append(flat[i : i + n].reshape(p.shape))
        i += n
    return out


def _gradient(loss_fn, params):
    with tf.GradientTape() as tape:
        loss = loss_fn()
    return _flat([g.numpy() for g in tape.gradient(loss, params)])


def _dense_hessian(loss_fn, params):
    with tf.GradientTape(persistent=True) as outer:
        with tf.GradientTape() as inner:
            loss = loss_fn()
        grad = tf.concat([tf.reshape(g, [-1]) for g in inner.gradient(loss, params)], 0)
    rows = outer.jacobian(grad, params)
    n = grad.shape[0]
    return np.concatenate([np.reshape(r.numpy(), [n, -1]) for r in rows], axis=1)


def _fd_hessian(loss_fn, params, eps=1e-5):
    """Central differences of the gradient: an oracle that uses no second-order autodiff."""
    theta = _flat([p.numpy() for p in params])
    cols = []
    for j in range(theta.size):
        e = np.zeros_like(theta)
        e[j] = eps
        for p, val in zip(params, _split(theta + e, params), strict=True):
            p.assign(val)
        g_plus = _gradient(loss_fn, params)
        for p, val in zip(params, _split(theta - e, params), strict=True):
            p.assign(val)
        g_minus = _gradient(loss_fn, params)
        cols.append((g_plus - g_minus) / (2 * eps))
    for p, val in zip(params, _split(theta, params), strict=True):
        p.assign(val)
    return np.stack(cols, axis=1)


def test_dense_hessian_oracle_matches_finite_differences():
    loss_fn, params, _ = _mlp_problem()
    h = _dense_hessian(loss_fn, params)
    np.testing.assert_allclose(h, h.T, atol=1e-12)
    np.testing.assert_allclose(h, _fd_hessian(loss_fn, params), atol=1e-7)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("compiled", [False, True])
def test_hvp_equals_dense_hessian_times_vector(mode, compiled):
    loss_fn, params, rng = _mlp_problem()
    h = _dense_hessian(loss_fn, params)
    vec = [tf.constant(rng.normal(size=p.shape), tf.float64) for p in params]
    fn = (
        tf.function(lambda u: hypergrad.hvp(loss_fn, params, u, mode))
        if compiled
        else (lambda u: hypergrad.hvp(loss_fn, params, u, mode))
    )
    got = _flat([t.numpy() for t in fn(vec)])
    np.testing.assert_allclose(got, h @ _flat([u.numpy() for u in vec]), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("mode", MODES)
def test_none_entries_are_structural_zeros(mode):
    loss_fn, params, rng = _mlp_problem(seed=1)
    h = _dense_hessian(loss_fn, params)
    vec = [None, tf.constant(rng.normal(size=(5,))), None, tf.constant(rng.normal(size=(3,)))]
    dense = [tf.zeros_like(p) if u is None else u for u, p in zip(vec, params, strict=True)]
    got = _flat([t.numpy() for t in hypergrad.hvp(loss_fn, params, vec, mode)])
    np.testing.assert_allclose(got, h @ _flat([u.numpy() for u in dense]), rtol=1e-10, atol=1e-12)
    zeros = hypergrad.hvp(loss_fn, params, [None] * 4, mode)
    assert all(not np.any(z.numpy()) for z in zeros)


@pytest.mark.parametrize("mode", MODES)
def test_float32_matches_float64(mode):
    loss64, params64, rng = _mlp_problem(tf.float64, seed=2)
    loss32, params32, _ = _mlp_problem(tf.float32, seed=2)
    vec = [rng.normal(size=p.shape) for p in params64]
    h64 = hypergrad.hvp(loss64, params64, [tf.constant(u, tf.float64) for u in vec], mode)
    h32 = hypergrad.hvp(loss32, params32, [tf.constant(u, tf.float32) for u in vec], mode)
    assert all(t.dtype == tf.float32 for t in h32)
    np.testing.assert_allclose(
        _flat([t.numpy() for t in h32]), _flat([t.numpy() for t in h64]), rtol=1e-4, atol=1e-5
    )


def test_modes_agree_on_a_larger_network():
    rng = np.random.default_rng(3)
    w1 = tf.Variable(rng.normal(size=(30, 64)) * 0.2, dtype=tf.float32)
    w2 = tf.Variable(rng.normal(size=(64, 10)) * 0.2, dtype=tf.float32)
    x = tf.constant(rng.normal(size=(32, 30)), tf.float32)
    y = tf.constant(rng.integers(0, 10, size=32))

    def loss_fn():
        logits = tf.nn.gelu(x @ w1) @ w2
        return tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(y, logits))

    vec = [tf.constant(rng.normal(size=w.shape), tf.float32) for w in (w1, w2)]
    a, b = (hypergrad.hvp(loss_fn, [w1, w2], vec, m) for m in MODES)
    for ta, tb in zip(a, b, strict=True):
        np.testing.assert_allclose(ta.numpy(), tb.numpy(), rtol=1e-4, atol=1e-5)


def test_bad_inputs_raise_clear_errors():
    loss_fn, params, _ = _mlp_problem()
    vec = [tf.ones_like(p) for p in params]
    with pytest.raises(ValueError, match="hvp_mode must be one of"):
        hypergrad.hvp(loss_fn, params, vec, mode="reverse_over_forward")
    with pytest.raises(ValueError, match="expected 4 entries.*received 3"):
        hypergrad.hvp(loss_fn, params, vec[:3])
    with pytest.raises(ValueError, match=r"vector\[2\] has shape \(3, 5\)"):
        hypergrad.hvp(loss_fn, params, vec[:2] + [tf.ones((3, 5), tf.float64)] + vec[3:])
    with pytest.raises(ValueError, match=r"vector\[0\] has dtype float32.*float64"):
        hypergrad.hvp(loss_fn, params, [tf.ones(p.shape, tf.float32) for p in params])
    with pytest.raises(ValueError, match="must return a scalar loss"):
        hypergrad.hvp(lambda: params[1] * 2.0, params, vec)
    with pytest.raises(TypeError, match="must be a tf.Variable"):
        hypergrad.hvp(loss_fn, [p.read_value() for p in params], vec)
