"""Unrolled FT: v from nested tapes against central finite differences of a numpy
re-implementation of "K FT steps then val loss" (analytic first-order gradients,
numpy optimizers), for SGD, momentum and Adam, head-only and full-network FT."""

import numpy as np
import pytest
import tensorflow as tf

from metapt_tf import hypergrad

K = 3


def _np_grads(x, y, w1, b1, h, c):
    f = np.tanh(x @ w1 + b1)
    p = f @ h + c
    dp = 2 * (p - y) / p.size
    dh, dc = f.T @ dp, dp.sum(0)
    dz = (dp @ h.T) * (1 - f**2)
    return [x.T @ dz, dz.sum(0), dh, dc]


def _np_loss(x, y, w1, b1, h, c):
    return np.mean((np.tanh(x @ w1 + b1) @ h + c - y) ** 2)


class NpRule:
    """Numpy twin of the differentiable update rules."""

    def __init__(self, name, lr):
        self.name, self.lr = name, lr

    def run(self, params, grad_fn, steps):
        params = [p.copy() for p in params]
        m = [np.zeros_like(p) for p in params]
        v = [np.zeros_like(p) for p in params]
        for t in range(1, steps + 1):
            grads = grad_fn(params, t - 1)
            for i, g in enumerate(grads):
                if self.name == "sgd":
                    params[i] = params[i] - self.lr * g
                elif self.name == "momentum":
                    m[i] = 0.9 * m[i] - self.lr * g
                    params[i] = params[i] + m[i]
                else:
                    m[i] = 0.9 * m[i] + 0.1 * g
                    v[i] = 0.999 * v[i] + 0.001 * g**2
                    mh, vh = m[i] / (1 - 0.9**t), v[i] / (1 - 0.999**t)
                    params[i] = params[i] - self.lr * mh / (np.sqrt(vh) + 1e-8)
        return params


RULES = {
    "sgd": (lambda: hypergrad.SGD(0.3), NpRule("sgd", 0.3)),
    "momentum": (lambda: hypergrad.Momentum(0.2, momentum=0.9), NpRule("momentum", 0.2)),
    "adam": (lambda: hypergrad.Adam(0.05), NpRule("adam", 0.05)),
}


class Problem:
    def __init__(self, seed=0, zero_column=False):
        rng = np.random.default_rng(seed)
        self.xs = [rng.normal(size=(8, 4)) for _ in range(K)]  # one FT batch per step
        if zero_column:
            for x in self.xs:
                x[:, 0] = 0.0  # W1's first row then gets an exactly-zero gradient
        self.ys = [rng.normal(size=(8, 2)) for _ in range(K)]
        self.xv, self.yv = rng.normal(size=(10, 4)), rng.normal(size=(10, 2))
        self.w1_0, self.b1_0 = rng.normal(size=(4, 6)) * 0.5, rng.normal(size=6) * 0.1
        self.h0, self.c0 = rng.normal(size=(6, 2)) * 0.5, np.zeros(2)
        self.w1 = tf.Variable(self.w1_0, name="w1")
        self.b1 = tf.Variable(self.b1_0, name="b1")

    # TF losses: head-only FT reads the backbone variables; full FT takes all four.
    def head_loss(self, params, x, y):
        f = tf.tanh(tf.constant(x) @ self.w1 + self.b1)
        return tf.reduce_mean((f @ params[0] + params[1] - y) ** 2)

    def full_loss(self, params, x, y):
        w1, b1, h, c = params
        return tf.reduce_mean((tf.tanh(tf.constant(x) @ w1 + b1) @ h + c - y) ** 2)

    def unroll(self, rule, full, compiled=False):
        loss = self.full_loss if full else self.head_loss

        def run():
            # Full-network FT starts from the PT variables themselves.
            init = [self.w1, self.b1] if full else []
            init += [tf.constant(self.h0), tf.constant(self.c0)]
            return hypergrad.unroll_finetune(
                lambda p, k: loss(p, self.xs[k], self.ys[k]),
                lambda p: loss(p, self.xv, self.yv),
                init,
                [self.w1, self.b1],
                update_rule=rule,
                num_steps=K,
            )

        return tf.function(run)() if compiled else run()

    def pipeline_np(self, np_rule, full, theta):
        w1, b1 = theta[:24].reshape(4, 6), theta[24:]
        if full:

            def grad_fn(p, k):
                return _np_grads(self.xs[k], self.ys[k], *p)

            w1, b1, h, c = np_rule.run([w1, b1, self.h0, self.c0], grad_fn, K)
        else:

            def grad_fn(p, k):
                return _np_grads(self.xs[k], self.ys[k], w1, b1, *p)[2:]

            h, c = np_rule.run([self.h0, self.c0], grad_fn, K)
        return _np_loss(self.xv, self.yv, w1, b1, h, c)

    def fd_v(self, np_rule, full, eps=1e-6):
        theta = np.concatenate([self.w1_0.ravel(), self.b1_0])
        out = np.zeros_like(theta)
        for j in range(theta.size):
            e = np.zeros_like(theta)
            e[j] = eps
            out[j] = (
                self.pipeline_np(np_rule, full, theta + e)
                - self.pipeline_np(np_rule, full, theta - e)
            ) / (2 * eps)
        return out


def _flat(ts):
    return np.concatenate([t.numpy().ravel() for t in ts])


@pytest.mark.parametrize("rule_name", sorted(RULES))
@pytest.mark.parametrize("full", [False, True], ids=["head_only", "full_network"])
def test_unrolled_v_matches_finite_differences(rule_name, full):
    make_rule, np_rule = RULES[rule_name]
    problem = Problem(seed=hash((rule_name, full)) % 1000)
    result = problem.unroll(make_rule(), full)
    fd = problem.fd_v(np_rule, full)
    np.testing.assert_allclose(_flat(result.v), fd, rtol=1e-6, atol=1e-9)
    # The returned val loss and FT params are those of the numpy pipeline.
    theta = np.concatenate([problem.w1_0.ravel(), problem.b1_0])
    np.testing.assert_allclose(
        result.val_loss.numpy(), problem.pipeline_np(np_rule, full, theta), rtol=1e-12
    )
    assert result.train_losses.shape == (K,)


def test_compiled_unroll_equals_eager():
    problem = Problem(seed=5)
    eager = problem.unroll(hypergrad.Adam(0.05), full=True)
    graph = problem.unroll(hypergrad.Adam(0.05), full=True, compiled=True)
    np.testing.assert_allclose(_flat(graph.v), _flat(eager.v), rtol=1e-12)
    np.testing.assert_allclose(_flat(graph.ft_params), _flat(eager.ft_params), rtol=1e-12)


class _AdamPlainSqrt(hypergrad.Adam):
    """Adam with tf.sqrt: differentiating its update twice at a zero gradient gives NaN."""

    def apply(self, params, grads, state):
        step = state.step + 1
        new_p, ms, vs = [], [], []
        for p, g, m, v in zip(params, grads, state.m, state.v, strict=True):
            m = 0.9 * m + 0.1 * g
            v = 0.999 * v + 0.001 * g**2
            mh, vh = m / (1 - 0.9**step), v / (1 - 0.999**step)
            new_p.append(p - self.learning_rate * mh / (tf.sqrt(vh) + 1e-8))
            ms.append(m)
            vs.append(v)
        return new_p, hypergrad.AdamState(step, ms, vs)


def _unrolled_hvp(problem, rule, direction):
    """d v / d theta along `direction`: forward mode over the (reverse-mode) unroll,
    so the Adam update is differentiated twice."""
    params = [problem.w1, problem.b1]
    with tf.autodiff.ForwardAccumulator(params, direction) as acc:
        v = problem.unroll(rule, full=True).v
    return acc.jvp(v)


def test_adam_second_derivatives_stay_finite_at_zero_gradient():
    problem = Problem(seed=6, zero_column=True)
    result = problem.unroll(hypergrad.Adam(0.05), full=True)
    np.testing.assert_allclose(
        _flat(result.v), problem.fd_v(RULES["adam"][1], True), rtol=1e-6, atol=1e-9
    )
    rng = np.random.default_rng(0)
    direction = [tf.constant(rng.normal(size=s)) for s in [(4, 6), (6,)]]
    hv = _flat(_unrolled_hvp(problem, hypergrad.Adam(0.05), direction))
    assert np.all(np.isfinite(hv))
    # Oracle: central differences of v (itself checked against finite differences above).
    eps, v_at = 1e-5, []
    for sign in (1.0, -1.0):
        problem.w1.assign(problem.w1_0 + sign * eps * direction[0].numpy())
        problem.b1.assign(problem.b1_0 + sign * eps * direction[1].numpy())
        v_at.append(_flat(problem.unroll(hypergrad.Adam(0.05), full=True).v))
    problem.w1.assign(problem.w1_0)
    problem.b1.assign(problem.b1_0)
    np.testing.assert_allclose(hv, (v_at[0] - v_at[1]) / (2 * eps), rtol=1e-5, atol=1e-7)
    # The same with a plain square root is NaN: the finiteness check above can fail.
    plain = _flat(_unrolled_hvp(problem, _AdamPlainSqrt(0.05), direction))
    assert not np.all(np.isfinite(plain))


def test_safe_sqrt_derivatives():
    x = tf.constant([0.0, 0.25, 4.0], tf.float64)
    with tf.GradientTape() as t2:
        t2.watch(x)
        with tf.GradientTape() as t1:
            t1.watch(x)
            y = hypergrad.safe_sqrt(x)
        d1 = t1.gradient(y, x)
    d2 = t2.gradient(d1, x)
    np.testing.assert_allclose(y.numpy(), [0.0, 0.5, 2.0])
    np.testing.assert_allclose(d1.numpy(), [0.0, 1.0, 0.25])
    np.testing.assert_allclose(d2.numpy(), [0.0, -0.25 * 0.25**-1.5, -0.25 * 4.0**-1.5])


def test_state_continues_across_unrolls():
    problem = Problem(seed=7)
    x, y = problem.xs[0], problem.ys[0]

    def unroll(params, state, steps):
        return hypergrad.unroll_finetune(
            lambda p, k: problem.head_loss(p, x, y),
            lambda p: problem.head_loss(p, problem.xv, problem.yv),
            params,
            [problem.w1, problem.b1],
            update_rule=hypergrad.Adam(0.05),
            num_steps=steps,
            ft_state=state,
        )

    init = [tf.constant(problem.h0), tf.constant(problem.c0)]
    once = unroll(init, None, 4)
    first = unroll(init, None, 2)
    second = unroll(first.ft_params, first.ft_state, 2)
    np.testing.assert_allclose(_flat(second.ft_params), _flat(once.ft_params), rtol=1e-12)
    assert float(second.ft_state.step) == 4.0


def test_bad_arguments():
    problem = Problem()
    args = (
        lambda p, k: problem.head_loss(p, problem.xs[0], problem.ys[0]),
        lambda p: problem.head_loss(p, problem.xv, problem.yv),
        [tf.constant(problem.h0), tf.constant(problem.c0)],
        [problem.w1, problem.b1],
    )
    with pytest.raises(
        ValueError, match="num_steps \\(K\\) must be an int >= 1. Received: num_steps=0"
    ):
        hypergrad.unroll_finetune(*args, update_rule=hypergrad.SGD(0.1), num_steps=0)
    with pytest.raises(TypeError, match="update_rule must be an UpdateRule"):
        hypergrad.unroll_finetune(*args, update_rule="adam", num_steps=1)
    with pytest.raises(ValueError, match=r"beta_1 must be in \[0, 1.0\). Received: beta_1=1.0"):
        hypergrad.Adam(beta_1=1.0)
