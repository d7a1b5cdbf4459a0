"""The composed meta-gradient: whole-pipeline finite differences, a dense oracle for the
Neumann composition, and the compiled step (one trace, XLA, both HVP modes)."""

import re

import numpy as np
import pytest
import tensorflow as tf

from metapt_tf import hypergrad

# ---------------------------------------------------------------------------
# Whole pipeline on a convex PT problem: weighted, L2-regularised logistic regression.
#   theta*(phi) = argmin_theta mean_i w_i BCE(x_i . theta, y_i) + lam/2 ||theta||^2
#   then K full-network SGD FT steps on an FT-train set, then the FT-val loss.
# ---------------------------------------------------------------------------
N_PT, D, LAM, K, FT_LR = 40, 6, 0.05, 3, 0.5


def _sigmoid(z):
    return 1.0 / (1.0 + np.exp(-z))


def _bce_np(x, y, theta, wts=None):
    z = x @ theta
    losses = np.logaddexp(0.0, z) - y * z
    return np.mean(losses if wts is None else wts * losses)


class Logistic:
    def __init__(self, seed=0):
        rng = np.random.default_rng(seed)
        true = rng.normal(size=D)
        self.x = rng.normal(size=(N_PT, D))
        self.y = (rng.uniform(size=N_PT) < _sigmoid(self.x @ true)).astype(float)
        self.y[:8] = 1.0 - self.y[:8]  # some flipped labels, so the weights matter
        shift = np.diag(np.linspace(0.6, 1.4, D))  # FT inputs from a shifted distribution
        self.xt, self.xv = rng.normal(size=(25, D)) @ shift, rng.normal(size=(30, D)) @ shift
        self.yt = (rng.uniform(size=25) < _sigmoid(self.xt @ true)).astype(float)
        self.yv = (rng.uniform(size=30) < _sigmoid(self.xv @ true)).astype(float)
        self.phi0 = 0.5 * rng.normal(size=N_PT)
        self.theta = tf.Variable(tf.zeros([D], tf.float64), name="theta")
        self.phi = tf.Variable(self.phi0, name="phi")

    def theta_star_np(self, phi, iters=50):
        wts, theta = 2 * _sigmoid(phi), np.zeros(D)
        for _ in range(iters):  # Newton's method: converges to machine precision
            p = _sigmoid(self.x @ theta)
            grad = self.x.T @ (wts * (p - self.y)) / N_PT + LAM * theta
            hess = (self.x.T * (wts * p * (1 - p))) @ self.x / N_PT + LAM * np.eye(D)
            theta = theta - np.linalg.solve(hess, grad)
        assert np.linalg.norm(grad) < 1e-12
        return theta

    def pipeline_np(self, phi):
        theta = self.theta_star_np(phi)
        for _ in range(K):
            theta = theta - FT_LR * self.xt.T @ (_sigmoid(self.xt @ theta) - self.yt) / 25
        return _bce_np(self.xv, self.yv, theta)

    def fd_meta_grad(self, eps=1e-5):
        out = np.zeros(N_PT)
        for i in range(N_PT):
            e = np.zeros(N_PT)
            e[i] = eps
            out[i] = (self.pipeline_np(self.phi0 + e) - self.pipeline_np(self.phi0 - e)) / (2 * eps)
        return out

    # TF side
    def pt_loss(self):
        z = tf.linalg.matvec(tf.constant(self.x), self.theta)
        bce = tf.nn.sigmoid_cross_entropy_with_logits(tf.constant(self.y), z)
        return tf.reduce_mean(2 * tf.sigmoid(self.phi) * bce) + LAM / 2 * tf.reduce_sum(
            self.theta**2
        )

    @staticmethod
    def bce(theta, x, y):
        x, y = tf.convert_to_tensor(x, tf.float64), tf.convert_to_tensor(y, tf.float64)
        return tf.reduce_mean(
            tf.nn.sigmoid_cross_entropy_with_logits(y, tf.linalg.matvec(x, theta))
        )

    def meta_gradient(self, solver, hvp_mode):
        self.theta.assign(self.theta_star_np(self.phi0))
        return hypergrad.meta_gradient(
            pt_loss_fn=self.pt_loss,
            pt_params=[self.theta],
            meta_params=[self.phi],
            ft_train_loss_fn=lambda p, k: self.bce(p[0], self.xt, self.yt),
            ft_val_loss_fn=lambda p: self.bce(p[0], self.xv, self.yv),
            ft_params=[self.theta],  # full-network FT from theta*
            ft_update_rule=hypergrad.SGD(FT_LR),
            num_ft_steps=K,
            solver=solver,
            hvp_mode=hvp_mode,
        )


def _cos(a, b):
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


@pytest.fixture(scope="module")
def logistic_fd():
    problem = Logistic()
    return problem, problem.fd_meta_grad()


@pytest.mark.parametrize("mode", hypergrad.HVP_MODES)
@pytest.mark.parametrize(
    "solver",
    [
        hypergrad.ConjugateGradient(max_iters=50, tol=1e-14),
        hypergrad.Neumann(num_terms=300, alpha="auto", power_iters=50),
    ],
    ids=["cg", "neumann"],
)
def test_whole_pipeline_matches_finite_differences(logistic_fd, solver, mode):
    problem, fd = logistic_fd
    result = problem.meta_gradient(solver, mode)
    got = result.meta_grads[0].numpy()
    assert _cos(got, fd) > 0.99
    assert np.linalg.norm(got - fd) / np.linalg.norm(fd) < 1e-5
    np.testing.assert_allclose(
        result.ft_val_loss.numpy(), problem.pipeline_np(problem.phi0), rtol=1e-10
    )
    assert not result.solver_diverged.numpy()


def test_compiled_full_network_ft_from_the_pt_variables():
    problem = Logistic(seed=1)
    problem.theta.assign(problem.theta_star_np(problem.phi0))
    solver = hypergrad.ConjugateGradient(max_iters=30, tol=1e-12)
    step = hypergrad.MetaGradient(
        pt_loss_fn=lambda batch: problem.pt_loss(),
        ft_train_loss_fn=lambda p, batch, k: problem.bce(p[0], *batch),
        ft_val_loss_fn=lambda p, batch: problem.bce(p[0], *batch),
        pt_params=[problem.theta],
        meta_params=[problem.phi],
        ft_update_rule=hypergrad.SGD(FT_LR),
        num_ft_steps=K,
        solver=solver,
    )
    val = (problem.xv, problem.yv)
    for start in range(3):
        train = (problem.xt[start : start + 20], problem.yt[start : start + 20])
        got = step(tf.zeros([]), train, val, [problem.theta])
        want = hypergrad.meta_gradient(
            pt_loss_fn=problem.pt_loss,
            pt_params=[problem.theta],
            meta_params=[problem.phi],
            ft_train_loss_fn=lambda p, k, train=train: problem.bce(p[0], *train),
            ft_val_loss_fn=lambda p: problem.bce(p[0], *val),
            ft_params=[problem.theta],
            ft_update_rule=hypergrad.SGD(FT_LR),
            num_ft_steps=K,
            solver=solver,
        )
        np.testing.assert_allclose(got.meta_grads[0].numpy(), want.meta_grads[0].numpy(), rtol=1e-9)
        assert np.linalg.norm(got.meta_grads[0].numpy()) > 0
    assert step.trace_count == 1


# ---------------------------------------------------------------------------
# A small multitask network with head-only Adam FT (the released code's meta-step):
#   backbone tanh MLP, PT head over T weighted tasks, FT head over F tasks.
# ---------------------------------------------------------------------------
DIN, HID, T_PT, F_FT, B = 5, 7, 6, 3, 16


class Multitask:
    def __init__(self, dtype=tf.float64, seed=0):
        rng = np.random.default_rng(seed)
        self.dtype = dtype

        def var(shape, scale, name):
            return tf.Variable(rng.normal(size=shape) * scale, dtype=dtype, name=name)

        self.backbone = [var((DIN, HID), 0.6, "w1"), var((HID,), 0.1, "b1")]
        self.pt_head = [var((HID, T_PT), 0.6, "wp"), var((T_PT,), 0.1, "bp")]
        self.phi = var((T_PT,), 0.5, "phi")
        self.ft_head = [rng.normal(size=(HID, F_FT)) * 0.6, np.zeros(F_FT)]
        self.rng = rng

    def batch(self, labels):
        x = self.rng.normal(size=(B, DIN))
        y = (self.rng.uniform(size=(B, labels)) < 0.5).astype(float)
        return tf.constant(x, self.dtype), tf.constant(y, self.dtype)

    def features(self, x):
        return tf.tanh(x @ self.backbone[0] + self.backbone[1])

    def pt_loss(self, batch):
        x, y = batch
        logits = self.features(x) @ self.pt_head[0] + self.pt_head[1]
        bce = tf.nn.sigmoid_cross_entropy_with_logits(y, logits)
        return tf.reduce_mean(2 * tf.sigmoid(self.phi) * bce)

    def ft_loss(self, head, batch, step=None):
        x, y = batch
        logits = self.features(x) @ head[0] + head[1]
        return tf.reduce_mean(tf.nn.sigmoid_cross_entropy_with_logits(y, logits))

    @property
    def pt_params(self):
        return self.backbone + self.pt_head

    def make(self, hvp_mode, solver, **kwargs):
        return hypergrad.MetaGradient(
            pt_loss_fn=self.pt_loss,
            ft_train_loss_fn=self.ft_loss,
            ft_val_loss_fn=self.ft_loss,
            pt_params=self.pt_params,
            meta_params=[self.phi],
            ft_update_rule=hypergrad.Adam(0.05),
            num_ft_steps=2,
            solver=solver,
            hvp_mode=hvp_mode,
            **kwargs,
        )

    def ft_head_tensors(self):
        return [tf.constant(h, self.dtype) for h in self.ft_head]


def _flat(ts):
    return np.concatenate([np.reshape(t.numpy(), [-1]) for t in ts])


def _dense_second_derivatives(model, pt_batch):
    """Dense H = d2L/dtheta2 and M = d2L/(dtheta dphi) by jacobians of the gradient."""
    params = model.pt_params
    with tf.GradientTape(persistent=True) as outer:
        with tf.GradientTape() as inner:
            loss = model.pt_loss(pt_batch)
        grad = tf.concat([tf.reshape(g, [-1]) for g in inner.gradient(loss, params)], 0)
    n = grad.shape[0]
    h = np.concatenate([np.reshape(j.numpy(), [n, -1]) for j in outer.jacobian(grad, params)], 1)
    m = outer.jacobian(grad, model.phi).numpy()
    return h, m


@pytest.mark.parametrize("mode", hypergrad.HVP_MODES)
def test_neumann_meta_gradient_matches_dense_oracle(mode):
    model = Multitask()
    pt_batch, ft_train, ft_val = model.batch(T_PT), model.batch(F_FT), model.batch(F_FT)
    alpha, terms = 0.3, 2
    step = model.make(mode, hypergrad.Neumann(num_terms=terms, alpha=alpha), compile=False)
    result = step(pt_batch, ft_train, ft_val, model.ft_head_tensors())
    h, m = _dense_second_derivatives(model, pt_batch)
    v = _flat(result.v)
    # Head-only FT never reads the PT head: those entries of v are exactly zero.
    assert not np.any(_flat(result.v[2:]))
    a = np.eye(h.shape[0]) - alpha * h
    p = alpha * sum(np.linalg.matrix_power(a, j) @ v for j in range(terms + 1))
    np.testing.assert_allclose(result.meta_grads[0].numpy(), -m.T @ p, rtol=1e-9, atol=1e-12)


def test_v_of_the_meta_step_matches_finite_differences():
    model = Multitask(seed=1)
    ft_train, ft_val = model.batch(F_FT), model.batch(F_FT)
    step = model.make("forward_over_reverse", hypergrad.Identity(1.0), compile=False)
    result = step(model.batch(T_PT), ft_train, ft_val, model.ft_head_tensors())

    def pipeline():  # two plain Adam steps on the FT head, then the val loss
        head, state = model.ft_head_tensors(), None
        rule = hypergrad.Adam(0.05)
        state = rule.init(head)
        for _ in range(2):
            with tf.GradientTape() as tape:
                tape.watch(head)
                loss = model.ft_loss(head, ft_train)
            head, state = rule.apply(head, tape.gradient(loss, head), state)
        return float(model.ft_loss(head, ft_val))

    w1 = model.backbone[0]
    base, eps, fd = w1.numpy(), 1e-6, np.zeros(w1.shape)
    for idx in np.ndindex(*w1.shape):
        vals = []
        for sign in (1, -1):
            pert = base.copy()
            pert[idx] += sign * eps
            w1.assign(pert)
            vals.append(pipeline())
        fd[idx] = (vals[0] - vals[1]) / (2 * eps)
    w1.assign(base)
    np.testing.assert_allclose(result.v[0].numpy(), fd, rtol=1e-6, atol=1e-9)


def test_compiled_step_is_traced_once_and_matches_eager_xla_and_both_modes():
    model = Multitask(seed=2)
    solver = hypergrad.Neumann(num_terms=1, alpha=0.3)
    compiled = model.make("forward_over_reverse", solver)
    eager = model.make("forward_over_reverse", solver, compile=False)
    xla = model.make("forward_over_reverse", solver, jit_compile=True)
    rev = model.make("reverse_over_reverse", solver)
    head = model.ft_head_tensors()
    state = compiled.init_ft_state(head)
    for _ in range(3):
        batches = (model.batch(T_PT), model.batch(F_FT), model.batch(F_FT))
        results = [fn(*batches, head, state) for fn in (compiled, eager, xla, rev)]
        ref = results[1]
        for other in results[0], results[2], results[3]:
            np.testing.assert_allclose(
                other.meta_grads[0].numpy(), ref.meta_grads[0].numpy(), rtol=1e-9, atol=1e-13
            )
            np.testing.assert_allclose(_flat(other.ft_params), _flat(ref.ft_params), rtol=1e-9)
        # The FT head persists: continue from the unrolled head and its Adam state.
        head, state = results[0].ft_params, results[0].ft_state
    assert compiled.trace_count == 1
    assert xla.trace_count == 1
    assert rev.trace_count == 1
    assert float(state.step) == 6.0


@pytest.mark.parametrize("mode", hypergrad.HVP_MODES)
def test_xla_program_takes_variables_and_batches_as_arguments(mode):
    """Variables folded into the XLA program as constants would force a recompilation
    after every PT step; each input must be an argument of the compiled program."""
    model = Multitask(dtype=tf.float32, seed=4)
    step = model.make(mode, hypergrad.Neumann(num_terms=1, alpha=0.3), jit_compile=True)
    batches = (model.batch(T_PT), model.batch(F_FT), model.batch(F_FT))
    head = model.ft_head_tensors()
    state = step.init_ft_state(head)
    hlo = step.compiler_ir(*batches, head, state)
    entry = next(line for line in hlo.splitlines() if line.startswith("ENTRY"))
    num_args = len(re.findall(r"\barg\d+(?:\.\d+)?:", entry))
    expected = len(tf.nest.flatten((batches, head, state))) + len(model.pt_params) + 1
    assert num_args == expected, entry[:400]
    before = step(*batches, head, state).meta_grads[0].numpy()
    model.backbone[0].assign_add(0.1 * tf.ones_like(model.backbone[0]))
    after = step(*batches, head, state).meta_grads[0].numpy()
    eager = model.make(mode, hypergrad.Neumann(num_terms=1, alpha=0.3), compile=False)
    np.testing.assert_allclose(
        after, eager(*batches, head, state).meta_grads[0].numpy(), rtol=1e-4, atol=1e-6
    )
    assert not np.allclose(before, after)


def test_float32_meta_gradient_is_close_to_float64():
    results = []
    for dtype in (tf.float32, tf.float64):
        model = Multitask(dtype=dtype, seed=3)
        step = model.make("forward_over_reverse", hypergrad.Neumann(num_terms=1, alpha=0.3))
        batches = (model.batch(T_PT), model.batch(F_FT), model.batch(F_FT))
        results.append(step(*batches, model.ft_head_tensors()).meta_grads[0])
    assert results[0].dtype == tf.float32
    np.testing.assert_allclose(results[0].numpy(), results[1].numpy(), rtol=1e-4, atol=1e-6)


def test_meta_gradient_validates_its_arguments():
    model = Multitask()
    with pytest.raises(ValueError, match="hvp_mode must be one of"):
        model.make("forward", hypergrad.Identity())
    with pytest.raises(ValueError, match="num_ft_steps \\(K\\) must be an int >= 1"):
        hypergrad.MetaGradient(
            pt_loss_fn=model.pt_loss,
            ft_train_loss_fn=model.ft_loss,
            ft_val_loss_fn=model.ft_loss,
            pt_params=model.pt_params,
            meta_params=[model.phi],
            ft_update_rule=hypergrad.SGD(0.1),
            num_ft_steps=0,
            solver=hypergrad.Identity(),
        )
    with pytest.raises(ValueError, match="XLA cannot compile"):
        model.make(
            "forward_over_reverse", hypergrad.Neumann(raise_on_divergence=True), jit_compile=True
        )
    # An FT head that ignores the backbone gives no v: a clear error, not zeros.
    step = hypergrad.MetaGradient(
        pt_loss_fn=model.pt_loss,
        ft_train_loss_fn=lambda head, batch, k: tf.reduce_sum(head[0] ** 2),
        ft_val_loss_fn=lambda head, batch: tf.reduce_sum(head[0] ** 2),
        pt_params=model.pt_params,
        meta_params=[model.phi],
        ft_update_rule=hypergrad.SGD(0.1),
        num_ft_steps=1,
        solver=hypergrad.Identity(),
        compile=False,
    )
    with pytest.raises(ValueError, match="does not depend on pt_params"):
        step(model.batch(T_PT), model.batch(F_FT), model.batch(F_FT), model.ft_head_tensors())
