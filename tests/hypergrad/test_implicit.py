"""Implicit hypergradient on weighted ridge regression, where theta*(phi) is closed form.

PT:  L_PT(theta; phi) = mean_i w_i (x_i . theta - y_i)^2 + lam ||theta||^2,  w = 2 sigmoid(phi)
     theta*(phi) = (X^T W X / n + lam I)^{-1} X^T W y / n
Val: L_val(theta) = mean_j (xv_j . theta - yv_j)^2
The exact hypergradient d L_val(theta*(phi)) / d phi is taken (a) by autodiff through
the closed-form solve and (b) by central finite differences of the closed form in numpy.
"""

import numpy as np
import pytest
import tensorflow as tf

from metapt_tf import hypergrad

N, D, LAM = 30, 5, 0.1


def _sigmoid(z):
    return 1.0 / (1.0 + np.exp(-z))


class Ridge:
    def __init__(self, dtype=tf.float64, seed=0):
        rng = np.random.default_rng(seed)
        self.x = np.concatenate([rng.normal(size=(N, D)), np.ones((N, 1))], axis=1)  # bias column
        true = rng.normal(size=D + 1)
        self.y = self.x @ true + 0.3 * rng.normal(size=N)
        self.y[:6] += 3.0 * rng.normal(size=6)  # a few corrupted targets, so phi matters
        self.xv = np.concatenate([rng.normal(size=(20, D)), np.ones((20, 1))], axis=1)
        self.yv = self.xv @ true + 0.1 * rng.normal(size=20)
        self.phi0 = 0.5 * rng.normal(size=N)
        self.dtype = dtype
        # theta split in two variables (weights, bias) and phi in two, to exercise lists.
        self.w = tf.Variable(tf.zeros([D], dtype), name="w")
        self.b = tf.Variable(tf.zeros([], dtype), name="b")
        self.phi_a = tf.Variable(self.phi0[:12], dtype=dtype, name="phi_a")
        self.phi_b = tf.Variable(self.phi0[12:], dtype=dtype, name="phi_b")

    @property
    def pt_params(self):
        return [self.w, self.b]

    @property
    def meta_params(self):
        return [self.phi_a, self.phi_b]

    def theta_star_np(self, phi):
        wts = 2 * _sigmoid(phi)
        a = (self.x.T * wts) @ self.x / N + LAM * np.eye(D + 1)
        return np.linalg.solve(a, (self.x.T * wts) @ self.y / N)

    def val_loss_np(self, theta):
        return np.mean((self.xv @ theta - self.yv) ** 2)

    def pt_loss(self):
        phi = tf.concat([self.phi_a, self.phi_b], 0)
        theta = tf.concat([self.w, self.b[None]], 0)
        x, y = tf.constant(self.x, self.dtype), tf.constant(self.y, self.dtype)
        resid = tf.linalg.matvec(x, theta) - y
        return tf.reduce_mean(2 * tf.sigmoid(phi) * resid**2) + LAM * tf.reduce_sum(theta**2)

    def val_loss(self):
        theta = tf.concat([self.w, self.b[None]], 0)
        xv, yv = tf.constant(self.xv, self.dtype), tf.constant(self.yv, self.dtype)
        return tf.reduce_mean((tf.linalg.matvec(xv, theta) - yv) ** 2)

    def set_theta_star(self):
        theta = self.theta_star_np(self.phi0)
        self.w.assign(theta[:D])
        self.b.assign(theta[D])

    def v(self):
        with tf.GradientTape() as tape:
            loss = self.val_loss()
        return tape.gradient(loss, self.pt_params)

    def exact_hypergradient_autodiff(self):
        phi = tf.constant(self.phi0, tf.float64)
        x, y = tf.constant(self.x), tf.constant(self.y)
        with tf.GradientTape() as tape:
            tape.watch(phi)
            wts = 2 * tf.sigmoid(phi)
            a = tf.transpose(x) @ (x * wts[:, None]) / N + LAM * tf.eye(D + 1, dtype=tf.float64)
            rhs = tf.linalg.matvec(tf.transpose(x), wts * y) / N
            theta = tf.linalg.solve(a, rhs[:, None])[:, 0]
            xv, yv = tf.constant(self.xv), tf.constant(self.yv)
            loss = tf.reduce_mean((tf.linalg.matvec(xv, theta) - yv) ** 2)
        return tape.gradient(loss, phi).numpy()

    def exact_hypergradient_fd(self, eps=1e-6):
        grad = np.zeros(N)
        for i in range(N):
            e = np.zeros(N)
            e[i] = eps
            plus = self.val_loss_np(self.theta_star_np(self.phi0 + e))
            minus = self.val_loss_np(self.theta_star_np(self.phi0 - e))
            grad[i] = (plus - minus) / (2 * eps)
        return grad


def _rel_err(a, b):
    return np.linalg.norm(a - b) / np.linalg.norm(b)


def test_oracles_agree():
    ridge = Ridge()
    exact = ridge.exact_hypergradient_autodiff()
    assert _rel_err(ridge.exact_hypergradient_fd(), exact) < 1e-7
    assert np.linalg.norm(exact) > 1e-3  # a non-trivial target


@pytest.mark.parametrize("mode", hypergrad.HVP_MODES)
@pytest.mark.parametrize("compiled", [False, True])
def test_implicit_hypergradient_with_cg_is_exact(mode, compiled):
    ridge = Ridge()
    ridge.set_theta_star()
    solver = hypergrad.ConjugateGradient(max_iters=50, tol=1e-14)

    def run(v):
        return hypergrad.implicit_hypergradient(
            ridge.pt_loss, ridge.pt_params, ridge.meta_params, v, solver=solver, hvp_mode=mode
        )

    grads = (tf.function(run) if compiled else run)(ridge.v())
    assert [g.shape for g in grads] == [(12,), (18,)]
    got = np.concatenate([g.numpy() for g in grads])
    assert _rel_err(got, ridge.exact_hypergradient_autodiff()) < 1e-6
    assert _rel_err(got, ridge.exact_hypergradient_fd()) < 1e-6


@pytest.mark.parametrize("mode", hypergrad.HVP_MODES)
def test_implicit_hypergradient_with_neumann_converges_to_exact(mode):
    ridge = Ridge(seed=1)
    ridge.set_theta_star()
    solver = hypergrad.Neumann(num_terms=400, alpha="auto", power_iters=50)
    result = hypergrad.implicit_hypergradient_with_info(
        ridge.pt_loss, ridge.pt_params, ridge.meta_params, ridge.v(), solver=solver, hvp_mode=mode
    )
    got = np.concatenate([g.numpy() for g in result.meta_grads])
    assert _rel_err(got, ridge.exact_hypergradient_autodiff()) < 1e-5
    assert not result.solve.diverged.numpy()


@pytest.mark.parametrize("mode", hypergrad.HVP_MODES)
def test_identity_solver_gives_minus_alpha_mixed_term_in_closed_form(mode):
    ridge = Ridge(seed=2)
    ridge.set_theta_star()
    v = ridge.v()
    alpha = 0.7
    grads = hypergrad.implicit_hypergradient(
        ridge.pt_loss,
        ridge.pt_params,
        ridge.meta_params,
        v,
        solver=hypergrad.Identity(alpha),
        hvp_mode=mode,
    )
    # d/dphi_i grad_theta L_PT = (2/n) w'(phi_i) r_i x_i, with w' = 2 s (1 - s).
    theta = ridge.theta_star_np(ridge.phi0)
    s = _sigmoid(ridge.phi0)
    resid = ridge.x @ theta - ridge.y
    v_np = np.concatenate([t.numpy().reshape(-1) for t in v])
    expected = -alpha * (2.0 / N) * (2 * s * (1 - s)) * resid * (ridge.x @ v_np)
    np.testing.assert_allclose(np.concatenate([g.numpy() for g in grads]), expected, rtol=1e-10)


@pytest.mark.parametrize("mode", hypergrad.HVP_MODES)
def test_amortized_neumann_in_tf_function_reaches_the_damped_hypergradient(mode):
    # Repeated solves at a fixed theta* and v: the iterate converges to
    # (H + delta I)^{-1} v / decay, and the hypergradient to -G of that, where
    # G = d2L_PT/(dphi dtheta) and H = d2L_PT/dtheta2 are dense in closed form.
    ridge = Ridge(seed=4)
    ridge.set_theta_star()
    v = ridge.v()
    decay = 0.8
    solver = hypergrad.AmortizedNeumann(alpha="auto", decay=decay, power_iters=50)
    solver.build(ridge.pt_params)  # built inside, the first call would trace twice
    traces = []

    @tf.function
    def step(v):
        traces.append(1)
        result = hypergrad.implicit_hypergradient_with_info(
            ridge.pt_loss, ridge.pt_params, ridge.meta_params, v, solver=solver, hvp_mode=mode
        )
        return result.meta_grads, result.solve.alpha

    for _ in range(150):
        grads, alpha = step(v)
    assert len(traces) == 1
    theta = ridge.theta_star_np(ridge.phi0)
    s = _sigmoid(ridge.phi0)
    w = 2 * s
    h = 2.0 / N * (ridge.x.T * w) @ ridge.x + 2 * LAM * np.eye(D + 1)
    np.testing.assert_allclose(1.0 / alpha.numpy(), np.linalg.eigvalsh(h).max(), rtol=1e-8)
    g = (2.0 / N) * ((2 * s * (1 - s)) * (ridge.x @ theta - ridge.y))[:, None] * ridge.x
    delta = (1 - decay) / (decay * alpha.numpy())
    v_np = np.concatenate([t.numpy().reshape(-1) for t in v])
    expected = -g @ np.linalg.solve(h + delta * np.eye(D + 1), v_np) / decay
    got = np.concatenate([t.numpy() for t in grads])
    assert _rel_err(got, expected) < 1e-8


@pytest.mark.parametrize("mode", hypergrad.HVP_MODES)
def test_float32_runs_and_is_close(mode):
    ridge = Ridge(dtype=tf.float32, seed=3)
    ridge.set_theta_star()
    grads = hypergrad.implicit_hypergradient(
        ridge.pt_loss,
        ridge.pt_params,
        ridge.meta_params,
        ridge.v(),
        solver=hypergrad.ConjugateGradient(max_iters=30, tol=1e-7),
        hvp_mode=mode,
    )
    assert all(g.dtype == tf.float32 for g in grads)
    got = np.concatenate([g.numpy() for g in grads])
    assert _rel_err(got, ridge.exact_hypergradient_autodiff()) < 1e-3


def test_mismatched_v_and_unconnected_meta_params_raise_clear_errors():
    ridge = Ridge()
    ridge.set_theta_star()
    v = ridge.v()
    cg = hypergrad.ConjugateGradient()
    args = (ridge.pt_loss, ridge.pt_params, ridge.meta_params)
    with pytest.raises(ValueError, match=r"v must have one entry per parameter: expected 2"):
        hypergrad.implicit_hypergradient(*args, v[:1], solver=cg)
    with pytest.raises(ValueError, match=r"v\[0\] has dtype float32 but parameter #0 \(w:0\)"):
        hypergrad.implicit_hypergradient(*args, [tf.cast(v[0], tf.float32), v[1]], solver=cg)
    with pytest.raises(ValueError, match=r"v\[0\] has shape \(4,\)"):
        hypergrad.implicit_hypergradient(*args, [v[0][:4], v[1]], solver=cg)
    with pytest.raises(TypeError, match="v must be a list"):
        hypergrad.implicit_hypergradient(*args, v[0], solver=cg)
    with pytest.raises(ValueError, match="no non-None entry"):
        hypergrad.implicit_hypergradient(*args, [None, None], solver=cg)
    with pytest.raises(TypeError, match="solver must be an InverseHvpSolver"):
        hypergrad.implicit_hypergradient(*args, v, solver="cg")

    def no_phi():
        theta = tf.concat([ridge.w, ridge.b[None]], 0)
        return tf.reduce_sum(theta**2)

    def additive_phi():  # depends on phi, but not through theta: mixed term is zero
        return no_phi() + tf.reduce_sum(ridge.phi_a**2) + tf.reduce_sum(ridge.phi_b**2)

    for mode in hypergrad.HVP_MODES:
        for fn in (no_phi, additive_phi):
            with pytest.raises(ValueError, match=r"does not depend on meta_params\[0\] \(phi_a"):
                hypergrad.implicit_hypergradient(
                    fn, ridge.pt_params, ridge.meta_params, v, solver=cg, hvp_mode=mode
                )


@pytest.mark.parametrize("mode", hypergrad.HVP_MODES)
@pytest.mark.parametrize("solver_name", ["cg", "neumann"])
def test_reduce_fn_reaches_every_hvp_and_the_mixed_term(mode, solver_name):
    # Two replicas with identical halves: each holds L/2 and the cross-replica sum
    # doubles. The result is the whole loss's only if the solver's HVPs and the mixed
    # term are both reduced (reducing one of them alone gives twice or half of it).
    ridge = Ridge(seed=4)
    ridge.set_theta_star()
    if solver_name == "cg":
        solver = hypergrad.ConjugateGradient(max_iters=50, tol=1e-14)
    else:
        solver = hypergrad.Neumann(num_terms=400, alpha="auto", power_iters=50)
    calls = []

    def reduce_fn(values):
        calls.append(len(values))
        return [2.0 * x for x in values]

    grads = hypergrad.implicit_hypergradient(
        lambda: 0.5 * ridge.pt_loss(),
        ridge.pt_params,
        ridge.meta_params,
        ridge.v(),
        solver=solver,
        hvp_mode=mode,
        reduce_fn=reduce_fn,
    )
    got = np.concatenate([g.numpy() for g in grads])
    tol = 1e-6 if solver_name == "cg" else 1e-5
    assert _rel_err(got, ridge.exact_hypergradient_autodiff()) < tol
    assert calls.count(2) >= 2  # the HVPs (over theta) and the mixed term (over phi)


def test_reduce_fn_must_keep_one_tensor_per_entry():
    ridge = Ridge()
    ridge.set_theta_star()
    with pytest.raises(ValueError, match="reduce_fn must return one tensor per input"):
        hypergrad.implicit_hypergradient(
            ridge.pt_loss,
            ridge.pt_params,
            ridge.meta_params,
            ridge.v(),
            solver=hypergrad.Neumann(num_terms=1, alpha=0.1),
            reduce_fn=lambda values: values[:1],
        )
    with pytest.raises(TypeError, match="reduce_fn must be callable"):
        hypergrad.implicit_hypergradient(
            ridge.pt_loss,
            ridge.pt_params,
            ridge.meta_params,
            ridge.v(),
            solver=hypergrad.Neumann(num_terms=1, alpha=0.1),
            reduce_fn=2.0,
        )
