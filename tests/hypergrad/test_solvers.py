"""Inverse-HVP solvers against np.linalg.solve on SPD systems."""

import numpy as np
import pytest
import tensorflow as tf

from metapt_tf import hypergrad


def _spd(n=12, cond=10.0, seed=0):
    rng = np.random.default_rng(seed)
    q, _ = np.linalg.qr(rng.normal(size=(n, n)))
    eigs = np.linspace(1.0, cond, n)
    return (q * eigs) @ q.T, rng


def _block_hvp(a, sizes=(5, 7)):
    """The matrix a acting on a vector split in two blocks (two "parameters")."""
    a = tf.constant(a)
    split = list(sizes)

    def hvp_fn(u):
        dense = [
            tf.zeros([s], tf.float64) if x is None else x for x, s in zip(u, split, strict=True)
        ]
        return list(tf.split(tf.linalg.matvec(a, tf.concat(dense, 0)), split))

    return hvp_fn


def _concat(xs):
    return np.concatenate([x.numpy() for x in xs])


def _as_blocks(b, sizes=(5, 7)):
    return [tf.constant(x) for x in np.split(b, np.cumsum(sizes)[:-1])]


@pytest.mark.parametrize("compiled", [False, True])
def test_conjugate_gradient_matches_linalg_solve(compiled):
    a, rng = _spd()
    b = rng.normal(size=12)
    solver = hypergrad.ConjugateGradient(max_iters=50, tol=1e-12)
    solve = (
        tf.function(lambda v: solver.solve(_block_hvp(a), v))
        if compiled
        else (lambda v: solver.solve(_block_hvp(a), v))
    )
    result = solve(_as_blocks(b))
    x = _concat(result.solution)
    np.testing.assert_allclose(x, np.linalg.solve(a, b), rtol=1e-9)
    np.testing.assert_allclose(result.residual_norm.numpy(), np.linalg.norm(b - a @ x), atol=1e-9)
    assert not result.diverged.numpy()
    assert 1 <= int(result.num_hvps) <= 13  # CG is exact in n steps in exact arithmetic


def test_conjugate_gradient_with_damping_and_structural_zeros_under_xla():
    a, rng = _spd(seed=1)
    b = np.concatenate([np.zeros(5), rng.normal(size=7)])
    solver = hypergrad.ConjugateGradient(max_iters=60, tol=1e-12, damping=0.5)
    solve = tf.function(lambda v2: solver.solve(_block_hvp(a), [None, v2]), jit_compile=True)
    x = _concat(solve(tf.constant(b[5:])).solution)
    np.testing.assert_allclose(x, np.linalg.solve(a + 0.5 * np.eye(12), b), rtol=1e-9)


def test_conjugate_gradient_stops_early_at_tolerance():
    a, rng = _spd(n=50, cond=10.0, seed=2)
    b = rng.normal(size=50)
    hvp_fn, blocks = _block_hvp(a, (20, 30)), _as_blocks(b, (20, 30))
    loose = hypergrad.ConjugateGradient(max_iters=100, tol=1e-2).solve(hvp_fn, blocks)
    tight = hypergrad.ConjugateGradient(max_iters=100, tol=1e-12).solve(hvp_fn, blocks)
    assert int(loose.num_hvps) < int(tight.num_hvps)
    assert loose.residual_norm.numpy() <= 1e-2 * np.linalg.norm(b)


def test_conjugate_gradient_flags_indefinite_matrix():
    a, rng = _spd(seed=3)
    a = a - 5.0 * np.eye(12)  # eigenvalues from -4 to 5
    b = _as_blocks(rng.normal(size=12))
    result = hypergrad.ConjugateGradient(max_iters=30).solve(_block_hvp(a), b)
    assert result.diverged.numpy()


@pytest.mark.parametrize("alpha", [0.09, "auto"])
def test_neumann_matches_linalg_solve(alpha):
    a, rng = _spd(cond=10.0, seed=4)  # lambda_max = 10, so alpha < 0.2 converges
    b = rng.normal(size=12)
    solver = hypergrad.Neumann(num_terms=300, alpha=alpha, exact_residual=True, power_iters=100)
    result = solver.solve(_block_hvp(a), _as_blocks(b))
    x = _concat(result.solution)
    np.testing.assert_allclose(x, np.linalg.solve(a, b), rtol=1e-8)
    np.testing.assert_allclose(result.residual_norm.numpy(), np.linalg.norm(b - a @ x), atol=1e-9)
    assert not result.diverged.numpy()
    if alpha == "auto":
        np.testing.assert_allclose(result.alpha.numpy(), 1.0 / 10.0, rtol=1e-6)
        assert int(result.num_hvps) == 300 + 100 + 1


def test_neumann_series_is_the_truncated_sum_and_cheap_residual_is_last_term():
    a, rng = _spd(seed=5)
    b = rng.normal(size=12)
    alpha, n = 0.05, 3
    m = np.eye(12) - alpha * a
    expected = alpha * sum(np.linalg.matrix_power(m, j) @ b for j in range(n + 1))
    result = hypergrad.Neumann(num_terms=n, alpha=alpha).solve(_block_hvp(a), _as_blocks(b))
    np.testing.assert_allclose(_concat(result.solution), expected, rtol=1e-12)
    np.testing.assert_allclose(
        result.residual_norm.numpy(), np.linalg.norm(np.linalg.matrix_power(m, n) @ b), rtol=1e-12
    )
    assert int(result.num_hvps) == n


def test_neumann_with_too_large_alpha_is_flagged_and_can_raise():
    a, rng = _spd(cond=10.0, seed=6)
    b = _as_blocks(rng.normal(size=12))
    too_large = 0.5  # > 2 / lambda_max = 0.2
    result = hypergrad.Neumann(num_terms=20, alpha=too_large).solve(_block_hvp(a), b)
    assert result.diverged.numpy()
    assert result.residual_norm.numpy() > 1e3 * np.linalg.norm(_concat(b))
    ok = hypergrad.Neumann(num_terms=20, alpha=0.15).solve(_block_hvp(a), b)
    assert not ok.diverged.numpy()

    raising = hypergrad.Neumann(num_terms=20, alpha=too_large, raise_on_divergence=True)
    with pytest.raises(hypergrad.SolverDivergedError, match="Neumann series diverges"):
        raising.solve(_block_hvp(a), b)
    with pytest.raises(tf.errors.InvalidArgumentError, match="Neumann series diverges"):
        tf.function(lambda v: raising.solve(_block_hvp(a), v).solution)(b)


def test_identity_is_scaled_vector():
    a, rng = _spd(seed=7)
    b = rng.normal(size=12)
    result = hypergrad.Identity(alpha=0.3).solve(_block_hvp(a), _as_blocks(b))
    np.testing.assert_allclose(_concat(result.solution), 0.3 * b)
    assert int(result.num_hvps) == 0
    exact = hypergrad.Identity(alpha=0.3, exact_residual=True).solve(_block_hvp(a), _as_blocks(b))
    np.testing.assert_allclose(exact.residual_norm.numpy(), np.linalg.norm(b - 0.3 * a @ b))


def test_top_eigenvalue_matches_eigvalsh():
    a, rng = _spd(cond=7.0, seed=8)
    eig = hypergrad.top_eigenvalue(_block_hvp(a), _as_blocks(rng.normal(size=12)), num_iters=200)
    np.testing.assert_allclose(eig.numpy(), np.linalg.eigvalsh(a).max(), rtol=1e-6)


def test_solver_arguments_are_validated():
    with pytest.raises(ValueError, match="num_terms must be an int >= 0. Received: num_terms=-1"):
        hypergrad.Neumann(num_terms=-1)
    with pytest.raises(ValueError, match="alpha must be a number > 0 or 'auto'"):
        hypergrad.Neumann(alpha="automatic")
    with pytest.raises(ValueError, match="alpha must be > 0"):
        hypergrad.Identity(alpha=0.0)
    with pytest.raises(ValueError, match="max_iters must be an int >= 1"):
        hypergrad.ConjugateGradient(max_iters=0)
    with pytest.raises(ValueError, match="damping must be >= 0"):
        hypergrad.ConjugateGradient(damping=-1.0)
    assert "max_iters=7" in repr(hypergrad.ConjugateGradient(max_iters=7))


@pytest.mark.parametrize("tol", [1e-1, 1e-12])
def test_unrolled_conjugate_gradient_equals_the_while_loop(tol):
    # A Python loop with masked updates: the while loop's iterates, residual and HVP
    # count, whether it stops early (tol=1e-1) or runs to max_iters (tol=1e-12).
    a, rng = _spd(n=12, cond=10.0, seed=3)
    blocks = _as_blocks(rng.normal(size=12))
    hvp_fn = _block_hvp(a)
    calls = []

    def counting_hvp(u):
        calls.append(1)
        return hvp_fn(u)

    looped = hypergrad.ConjugateGradient(max_iters=8, tol=tol).solve(hvp_fn, blocks)
    unrolled = tf.function(
        lambda v: hypergrad.ConjugateGradient(max_iters=8, tol=tol, unroll=True).solve(
            counting_hvp, v
        )
    )(blocks)
    assert len(calls) == 8  # traced: one HVP per iteration, no tf.while_loop
    np.testing.assert_allclose(_concat(unrolled.solution), _concat(looped.solution), rtol=1e-12)
    np.testing.assert_allclose(unrolled.residual_norm.numpy(), looped.residual_norm.numpy())
    assert int(unrolled.num_hvps) == int(looped.num_hvps)
    assert (int(looped.num_hvps) < 8) == (tol == 1e-1)
    assert bool(unrolled.diverged) == bool(looped.diverged)


@pytest.mark.parametrize("alpha", [0.08, "auto"])
def test_amortized_neumann_converges_to_the_damped_inverse(alpha):
    a, rng = _spd(cond=10.0, seed=9)  # lambda_max = 10
    b = rng.normal(size=12)
    decay = 0.9
    solver = hypergrad.AmortizedNeumann(alpha=alpha, decay=decay, power_iters=100)
    hvp_fn = _block_hvp(a)
    for _ in range(400):
        result = solver.solve(hvp_fn, _as_blocks(b))
    step = 0.1 if alpha == "auto" else alpha
    np.testing.assert_allclose(result.alpha.numpy(), step, rtol=1e-6)
    delta = (1.0 - decay) / (decay * step)
    expected = np.linalg.solve(a + delta * np.eye(12), b) / decay
    np.testing.assert_allclose(_concat(result.solution), expected, rtol=1e-8)
    assert result.residual_norm.numpy() < 1e-8 * np.linalg.norm(b)
    assert not result.diverged.numpy()
    assert int(result.num_hvps) == (2 if alpha == "auto" else 1)


def test_amortized_neumann_iterates_are_the_discounted_series():
    a, rng = _spd(seed=10)
    bs = [rng.normal(size=12) for _ in range(4)]
    alpha, decay = 0.05, 0.8
    solver = hypergrad.AmortizedNeumann(alpha=alpha, decay=decay)
    m = decay * (np.eye(12) - alpha * a)
    x = np.zeros(12)
    for b in bs:
        result = solver.solve(_block_hvp(a), _as_blocks(b))
        x_new = alpha * b + m @ x
        np.testing.assert_allclose(_concat(result.solution), x_new, rtol=1e-12)
        # The previous iterate's residual in the damped system, for the current b.
        damped = decay * (a + (1 - decay) / (decay * alpha) * np.eye(12))
        np.testing.assert_allclose(
            result.residual_norm.numpy(), np.linalg.norm(b - damped @ x), rtol=1e-10
        )
        x = x_new
    # A fixed right-hand side: the partial sums of alpha sum_j M^j b.
    solver.reset()
    b = bs[0]
    for _ in range(3):
        result = solver.solve(_block_hvp(a), _as_blocks(b))
    expected = alpha * sum(np.linalg.matrix_power(m, j) @ b for j in range(3))
    np.testing.assert_allclose(_concat(result.solution), expected, rtol=1e-12)


def test_amortized_neumann_auto_alpha_power_iterates_first_then_one_step():
    a, rng = _spd(cond=7.0, seed=11)
    solver = hypergrad.AmortizedNeumann(alpha="auto", decay=0.5, power_iters=100)
    b = _as_blocks(rng.normal(size=12))
    calls = []

    def counting(u):
        calls.append(1)
        return _block_hvp(a)(u)

    first = solver.solve(counting, b)
    assert int(first.num_hvps) == 101 and len(calls) == 101
    np.testing.assert_allclose(1.0 / first.alpha.numpy(), 7.0, rtol=1e-4)
    second = solver.solve(counting, b)
    assert int(second.num_hvps) == 2 and len(calls) == 103
    np.testing.assert_allclose(1.0 / second.alpha.numpy(), 7.0, rtol=1e-5)


def test_amortized_neumann_in_tf_function_keeps_state_and_restarts_when_not_finite():
    a, rng = _spd(seed=12)
    b = rng.normal(size=12)
    solver = hypergrad.AmortizedNeumann(alpha="auto", decay=0.9, power_iters=30)
    solver.build(_as_blocks(b))
    assert len(solver.variables) == 2 * 2 + 2
    hvp_fn = _block_hvp(a)
    traces = []

    @tf.function
    def solve(v):
        traces.append(1)
        r = solver.solve(hvp_fn, v)
        return r.solution, r.diverged, r.num_hvps

    eager = hypergrad.AmortizedNeumann(alpha="auto", decay=0.9, power_iters=30)
    for _ in range(5):
        x, diverged, _ = solve(_as_blocks(b))
        expected = eager.solve(hvp_fn, _as_blocks(b))
        np.testing.assert_allclose(_concat(x), _concat(expected.solution), rtol=1e-10)
        assert not diverged.numpy()
    assert len(traces) == 1
    # A non-finite right-hand side: flagged, and the next solve starts over from alpha v.
    nan = [tf.constant(np.full(5, np.nan)), tf.constant(b[5:])]
    x, diverged, _ = solve(nan)
    assert diverged.numpy()
    x, diverged, _ = solve(_as_blocks(b))
    assert not diverged.numpy() and np.all(np.isfinite(_concat(x)))
    solver.reset()
    assert all(not np.any(var.numpy()) for var in solver.variables)


def test_amortized_neumann_arguments_and_structural_zeros():
    with pytest.raises(ValueError, match=r"decay must be a number in \[0, 1\). Received: decay=1"):
        hypergrad.AmortizedNeumann(decay=1.0)
    with pytest.raises(ValueError, match="alpha must be a number > 0 or 'auto'"):
        hypergrad.AmortizedNeumann(alpha="automatic")
    with pytest.raises(ValueError, match="power_iters must be an int >= 1"):
        hypergrad.AmortizedNeumann(power_iters=0)
    assert "decay=0.5" in repr(hypergrad.AmortizedNeumann(decay=0.5))
    a, rng = _spd(seed=13)
    b = rng.normal(size=12)
    unbuilt = hypergrad.AmortizedNeumann(alpha=0.05)
    with pytest.raises(ValueError, match=r"needs a shape for every entry; received None at \[0\]"):
        unbuilt.solve(_block_hvp(a), [None, tf.constant(b[5:])])
    # Built from the parameters' shapes, a structural zero is a zero block.
    solver = hypergrad.AmortizedNeumann(alpha=0.05, decay=0.5)
    solver.build([tf.Variable(tf.zeros([5], tf.float64)), tf.Variable(tf.zeros([7], tf.float64))])
    masked = np.concatenate([np.zeros(5), b[5:]])
    for _ in range(2):
        result = solver.solve(_block_hvp(a), [None, tf.constant(b[5:])])
    m = 0.5 * (np.eye(12) - 0.05 * a)
    np.testing.assert_allclose(_concat(result.solution), 0.05 * (masked + m @ masked), rtol=1e-12)
