"""Inverse-Hessian-vector product solvers that work on an HVP closure.

Every solver takes `hvp_fn: u -> H u` and a right-hand side `v` (a list of
tensors; `None` entries are structural zeros) and returns a `SolveResult` with
an approximation `x ~ H^{-1} v`. No solver forms a matrix.

* `Neumann(num_terms, alpha)`:  x = alpha * sum_{j=0..N} (I - alpha H)^j v.
  Converges for positive-definite H when 0 < alpha < 2 / lambda_max(H).
  `alpha="auto"` estimates lambda_max by power iteration on HVPs each solve and
  uses `alpha = alpha_scale / lambda_max`.
* `ConjugateGradient(max_iters, tol, damping)`: CG on (H + damping I) x = v,
  stopping when ||r|| <= tol * ||v||.
* `Identity(alpha)`: x = alpha * v (Neumann with N = 0; no HVP).

Residuals (`SolveResult.residual_norm`): CG reports its recursive residual
||v - (H + damping I) x||, exact in exact arithmetic. Neumann and Identity with
`exact_residual=True` spend one more HVP and report ||v - H x|| exactly; by
default they report, for free, the norm of the last series term
||(I - alpha H)^N v||, which is the exact residual of the series one term
shorter. Either way a series that grows is flagged in `diverged`.
"""

import abc
from collections.abc import Callable, Sequence
from typing import NamedTuple

import tensorflow as tf

from metapt_tf.hypergrad import _vectors

HvpFn = Callable[[Sequence], list]


class SolverDivergedError(ValueError):
    """The inverse-HVP solve diverged (raised only when the solver is asked to)."""


class SolveResult(NamedTuple):
    """What a solve returns.

    Attributes:
      solution: list of tensors, the approximation x ~ H^{-1} v.
      residual_norm: scalar tensor, see the module docstring for its exact meaning.
      diverged: scalar bool tensor: the series grew, became non-finite, or CG met
        non-positive curvature (H not positive definite along a search direction).
      num_hvps: scalar int32 tensor, HVPs spent (power iteration included).
      alpha: scalar tensor, the Neumann/Identity step size used (NaN for CG).
    """

    solution: list
    residual_norm: tf.Tensor
    diverged: tf.Tensor
    num_hvps: tf.Tensor
    alpha: tf.Tensor


class InverseHvpSolver(abc.ABC):
    """Approximately solves H x = v given only u -> H u."""

    @abc.abstractmethod
    def solve(self, hvp_fn: HvpFn, v: Sequence) -> SolveResult:
        """Returns x ~ H^{-1} v as a `SolveResult`. `v` may hold `None` (zeros)."""

    @property
    def variables(self) -> list:
        """State kept across solves, to checkpoint with a run (none for most solvers)."""
        return []

    def get_config(self) -> dict:
        return {}

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.get_config().items())
        return f"{type(self).__name__}({args})"


def _rhs_dtype(v: Sequence) -> tf.DType:
    for u in v:
        if u is not None:
            return u.dtype.base_dtype
    raise ValueError("The right-hand side v has no non-None entry: there is nothing to solve.")


def _check_positive(name: str, value, allow_zero: bool = False) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"{name} must be a number. Received: {name}={value!r}.")
    if value < 0 or (value == 0 and not allow_zero):
        bound = ">= 0" if allow_zero else "> 0"
        raise ValueError(f"{name} must be {bound}. Received: {name}={value!r}.")


def _check_step_size(alpha, alpha_scale, power_iters) -> None:
    """Neumann's and AmortizedNeumann's alpha (a number > 0 or "auto") and its settings."""
    if isinstance(alpha, str):
        if alpha != "auto":
            raise ValueError(f"alpha must be a number > 0 or 'auto'. Received: alpha={alpha!r}.")
    else:
        _check_positive("alpha", alpha)
    if not 0.0 < alpha_scale < 2.0:
        raise ValueError(f"alpha_scale must be in (0, 2). Received: alpha_scale={alpha_scale!r}.")
    if isinstance(power_iters, bool) or not isinstance(power_iters, int) or power_iters < 1:
        raise ValueError(f"power_iters must be an int >= 1. Received: power_iters={power_iters!r}.")


def _raise_if_diverged(diverged: tf.Tensor, message: str) -> list:
    """Raises eagerly; in a graph adds an assertion (not supported under XLA)."""
    if tf.executing_eagerly():
        if bool(diverged):
            raise SolverDivergedError(message)
        return []
    return [tf.debugging.Assert(tf.logical_not(diverged), [message])]


def top_eigenvalue(hvp_fn: HvpFn, v: Sequence, num_iters: int = 20) -> tf.Tensor:
    """Power iteration on `hvp_fn` from `v`: the eigenvalue of largest magnitude.

    Returns the Rayleigh quotient <u, H u> of the final unit iterate (so the sign
    is kept). Costs `num_iters` HVPs.
    """
    dtype = _rhs_dtype(v)
    u = _unit(v, dtype)
    eig = tf.zeros([], dtype)
    for _ in range(num_iters):
        u, eig = _power_step(hvp_fn, u, dtype)
    return eig


_TINY = 1e-30  # floor of the norms and eigenvalues divided by


def _unit(u: Sequence, dtype: tf.DType) -> list:
    return _vectors.scale(1.0 / tf.maximum(_vectors.norm(u, dtype), tf.constant(_TINY, dtype)), u)


def _step_size(alpha_scale: float, eig: tf.Tensor, dtype: tf.DType) -> tf.Tensor:
    """alpha = alpha_scale / |lambda_max|, the step of alpha="auto"."""
    return tf.constant(alpha_scale, dtype) / tf.maximum(tf.abs(eig), tf.constant(_TINY, dtype))


def _power_step(hvp_fn: HvpFn, u: Sequence, dtype: tf.DType) -> tuple[list, tf.Tensor]:
    """One power-iteration step from the unit vector u: (H u / ||H u||, <u, H u>)."""
    hu = hvp_fn(u)
    return _unit(hu, dtype), _vectors.dot(u, hu, dtype)


class Neumann(InverseHvpSolver):
    """Truncated Neumann series: x = alpha * sum_{j=0..N} (I - alpha H)^j v.

    Costs `num_terms` HVPs (+ `power_iters` with alpha="auto", + 1 with
    `exact_residual=True`).

    Args:
      num_terms: N >= 0, the number of HVPs in the series (N = 0 is `Identity`).
      alpha: step size > 0, or "auto": alpha = alpha_scale / lambda_max(H),
        lambda_max by `power_iters` steps of power iteration each solve.
      alpha_scale: in (0, 2); only with alpha="auto".
      power_iters: power-iteration steps for alpha="auto".
      exact_residual: spend one more HVP to report ||v - H x|| exactly.
      raise_on_divergence: raise `SolverDivergedError` (eagerly) or fail an
        assertion (in a graph) when the series diverges, instead of only flagging.
    """

    def __init__(
        self,
        num_terms: int = 1,
        alpha: float | str = 1e-4,
        *,
        alpha_scale: float = 1.0,
        power_iters: int = 20,
        exact_residual: bool = False,
        raise_on_divergence: bool = False,
    ):
        if isinstance(num_terms, bool) or not isinstance(num_terms, int) or num_terms < 0:
            raise ValueError(f"num_terms must be an int >= 0. Received: num_terms={num_terms!r}.")
        _check_step_size(alpha, alpha_scale, power_iters)
        self.num_terms = num_terms
        self.alpha = alpha
        self.alpha_scale = alpha_scale
        self.power_iters = power_iters
        self.exact_residual = exact_residual
        self.raise_on_divergence = raise_on_divergence

    def get_config(self) -> dict:
        return {
            "num_terms": self.num_terms,
            "alpha": self.alpha,
            "alpha_scale": self.alpha_scale,
            "power_iters": self.power_iters,
            "exact_residual": self.exact_residual,
            "raise_on_divergence": self.raise_on_divergence,
        }

    def _alpha(self, hvp_fn: HvpFn, v: Sequence, dtype: tf.DType) -> tuple[tf.Tensor, int]:
        if self.alpha != "auto":
            return tf.constant(self.alpha, dtype), 0
        eig = top_eigenvalue(hvp_fn, v, self.power_iters)
        return _step_size(self.alpha_scale, eig, dtype), self.power_iters

    def solve(self, hvp_fn: HvpFn, v: Sequence) -> SolveResult:
        v = list(v)
        dtype = _rhs_dtype(v)
        alpha, num_hvps = self._alpha(hvp_fn, v, dtype)
        v_norm = _vectors.norm(v, dtype)
        term = v  # (I - alpha H)^j v
        total = v  # sum_{i<=j} (I - alpha H)^i v
        for _ in range(self.num_terms):
            term = _vectors.add(term, hvp_fn(term), -alpha)
            total = _vectors.add(total, term)
            num_hvps += 1
        if self.exact_residual:
            # v - H x = (I - alpha H)^{N+1} v.
            last = _vectors.add(term, hvp_fn(term), -alpha)
            num_hvps += 1
        else:
            last = term
        residual = _vectors.norm(last, dtype)
        diverged = tf.logical_or(
            tf.logical_not(tf.math.is_finite(residual)),
            residual > v_norm * tf.constant(1.0 + 1e-6, dtype),
        )
        deps = []
        if self.raise_on_divergence:
            deps = _raise_if_diverged(
                diverged,
                f"Neumann series diverges: the norm of its terms grows (num_terms="
                f"{self.num_terms}, alpha={self.alpha!r}). alpha must be below "
                "2 / lambda_max(H) and H positive definite; lower alpha or use alpha='auto'.",
            )
        with tf.control_dependencies(deps):
            solution = [None if t is None else tf.identity(alpha * t) for t in total]
        return SolveResult(
            solution=solution,
            residual_norm=residual,
            diverged=diverged,
            num_hvps=tf.constant(num_hvps, tf.int32),
            alpha=alpha,
        )


class Identity(InverseHvpSolver):
    """x = alpha * v: H approximated by I / alpha (Neumann with N = 0)."""

    def __init__(self, alpha: float = 1.0, *, exact_residual: bool = False):
        _check_positive("alpha", alpha)
        self.alpha = alpha
        self.exact_residual = exact_residual
        self._neumann = Neumann(0, alpha, exact_residual=exact_residual)

    def get_config(self) -> dict:
        return {"alpha": self.alpha, "exact_residual": self.exact_residual}

    def solve(self, hvp_fn: HvpFn, v: Sequence) -> SolveResult:
        return self._neumann.solve(hvp_fn, v)


class AmortizedNeumann(InverseHvpSolver):
    """A Neumann series spread over successive solves, one HVP each.

    Keeps its iterate x between calls (variables) and updates it once per solve:

        x_t = alpha v_t + decay (I - alpha H_t) x_{t-1},    x_0 = 0.

    For a fixed H and v the iterates are the partial sums of the discounted series
    alpha * sum_j decay^j (I - alpha H)^j v, whose limit is

        x = (H + delta I)^{-1} v / decay,    delta = (1 - decay) / (decay alpha),

    a damped inverse: a Neumann series of about 1 / (1 - decay) terms for the price
    of one. In an online loop H and v drift slowly from one meta-step to the next,
    and x follows them with a lag of about 1 / (1 - decay) solves (a moving average
    of the recent right-hand sides, too). It converges when
    decay * |1 - alpha lambda| < 1 over H's spectrum: alpha < (1 + 1 / decay) /
    lambda_max, and negative curvature no stronger than delta.

    `alpha="auto"` tracks lambda_max by power iteration on a kept vector:
    `power_iters` steps on the first solve, then one per solve (2 HVPs a solve).
    The choice is a `tf.cond` (and the first solve's steps a `tf.while_loop`), in
    which HVP closures that all-reduce across the replicas of a MirroredStrategy
    cannot run (TensorFlow forbids `merge_call` there): under one, pass a number.

    The residual is that of the previous iterate in the damped system with the
    current H and v, ||v - decay (H + delta I) x_{t-1}|| = ||x_t - x_{t-1}|| / alpha,
    for free. A non-finite iterate is flagged in `diverged`, and the state starts over.

    Stateful: `build(like)` creates the variables (shaped like `v`'s entries, e.g.
    the PT parameters), or the first solve does (inside a `tf.function` the first
    call then traces twice, once to create them); checkpoint `variables` with the
    rest of a run, and call `reset()` to start over.
    """

    def __init__(
        self,
        alpha: float | str = "auto",
        decay: float = 0.95,
        *,
        alpha_scale: float = 1.0,
        power_iters: int = 20,
    ):
        _check_step_size(alpha, alpha_scale, power_iters)
        if isinstance(decay, bool) or not isinstance(decay, int | float) or not 0 <= decay < 1:
            raise ValueError(f"decay must be a number in [0, 1). Received: decay={decay!r}.")
        self.alpha = alpha
        self.decay = float(decay)
        self.alpha_scale = alpha_scale
        self.power_iters = power_iters
        self._x = None

    def get_config(self) -> dict:
        return {
            "alpha": self.alpha,
            "decay": self.decay,
            "alpha_scale": self.alpha_scale,
            "power_iters": self.power_iters,
        }

    @property
    def built(self) -> bool:
        return self._x is not None

    def build(self, like: Sequence) -> None:
        """Creates the state: per entry of `like` (tensors or variables, no None) a zero
        iterate and power-iteration vector of its shape; then a scalar eigenvalue and a
        solve count. Does nothing once built."""
        if self.built:
            return
        like = list(like)
        if any(u is None for u in like):
            raise ValueError(
                "AmortizedNeumann.build needs a shape for every entry; received None at "
                f"{[i for i, u in enumerate(like) if u is None]}. Build it from the parameters "
                "(solver.build(pt_params)) before a solve whose v has structural zeros."
            )
        dtype = _rhs_dtype(like)
        agg = tf.VariableAggregation.ONLY_FIRST_REPLICA

        def zeros(name):
            return [
                tf.Variable(
                    tf.zeros(u.shape, dtype), trainable=False, aggregation=agg, name=f"{name}_{i}"
                )
                for i, u in enumerate(like)
            ]

        self._x = zeros("amortized_neumann_x")
        self._u = zeros("amortized_neumann_u")
        self._eig = tf.Variable(
            tf.zeros([], dtype), trainable=False, aggregation=agg, name="amortized_neumann_eig"
        )
        self._count = tf.Variable(
            0, dtype=tf.int64, trainable=False, aggregation=agg, name="amortized_neumann_count"
        )

    @property
    def variables(self) -> list:
        """The state to checkpoint: iterate, power-iteration vector, eigenvalue, count."""
        if not self.built:
            return []
        return [*self._x, *self._u, self._eig, self._count]

    def reset(self) -> None:
        for var in self.variables:
            var.assign(tf.zeros_like(var))

    def _power(self, hvp_fn: HvpFn, v: list, dtype: tf.DType) -> tf.Tensor:
        """lambda_max estimate: `power_iters` steps from v on the first solve, then one."""

        def first():
            u = _unit(_vectors.densify(v, self._x), dtype)
            eig = tf.zeros([], dtype)
            # A loop, not `power_iters` HVPs in the graph: tracing and optimizing that
            # many copies of a GNN's HVP took a minute.
            _, u, eig = tf.while_loop(
                lambda i, u, eig: i < self.power_iters,
                lambda i, u, eig: (i + 1, *_power_step(hvp_fn, u, dtype)),
                (tf.constant(0), u, eig),
            )
            return u, eig

        u, eig = tf.cond(
            self._count > 0,
            lambda: _power_step(hvp_fn, [tf.identity(t) for t in self._u], dtype),
            first,
        )
        for var, t in zip(self._u, u, strict=True):
            var.assign(t)
        self._eig.assign(tf.abs(eig))
        return _step_size(self.alpha_scale, eig, dtype)

    def solve(self, hvp_fn: HvpFn, v: Sequence) -> SolveResult:
        v = list(v)
        dtype = _rhs_dtype(v)
        self.build(v)
        if len(v) != len(self._x):
            raise ValueError(
                f"v has {len(v)} entries; this AmortizedNeumann was built for {len(self._x)}."
            )
        num_hvps = 1
        if self.alpha == "auto":
            alpha = self._power(hvp_fn, v, dtype)
            num_hvps += tf.where(self._count > 0, 1, self.power_iters)
        else:
            alpha = tf.constant(self.alpha, dtype)
        decay = tf.constant(self.decay, dtype)
        x_old = [tf.identity(x) for x in self._x]
        hx = hvp_fn(x_old)
        # x_new = alpha v + decay (x_old - alpha H x_old)
        x_new = _vectors.add(_vectors.scale(decay, _vectors.add(x_old, hx, -alpha)), v, alpha)
        step = _vectors.norm(_vectors.add(x_new, x_old, -1.0), dtype)
        residual = step / alpha
        finite = tf.logical_and(
            tf.math.is_finite(_vectors.norm(x_new, dtype)), tf.math.is_finite(residual)
        )
        finite = tf.logical_and(finite, tf.math.is_finite(alpha))
        # Not finite: the state starts over (x = 0, and with alpha "auto" a full power
        # iteration on the next solve).
        for var, t in zip(self._x, x_new, strict=True):
            var.assign(tf.where(finite, t, tf.zeros_like(t)))
        self._count.assign(tf.where(finite, self._count + 1, tf.zeros_like(self._count)))
        return SolveResult(
            solution=x_new,
            residual_norm=residual,
            diverged=tf.logical_not(finite),
            num_hvps=tf.cast(num_hvps, tf.int32),
            alpha=alpha,
        )


class ConjugateGradient(InverseHvpSolver):
    """Conjugate gradient on (H + damping I) x = v, from x = 0.

    Stops after `max_iters` HVPs or when ||r|| <= tol * ||v||. Runs in a
    `tf.while_loop`, so the stopping test works inside `tf.function` and XLA.
    Exact for symmetric positive-definite H + damping I; meeting non-positive
    curvature sets `diverged` (the iterate is then not reliable).

    `unroll=True` runs the iterations as a Python loop instead: always
    `max_iters` HVPs, with every update after the stopping test masked out, so
    the iterates, residual and `num_hvps` are those of the while loop. For HVP
    closures that cannot run inside a `tf.while_loop` (e.g. ones that all-reduce
    across the replicas of a MirroredStrategy, whose `merge_call` TensorFlow
    forbids in loop bodies).
    """

    def __init__(
        self, max_iters: int = 20, tol: float = 1e-6, damping: float = 0.0, *, unroll: bool = False
    ):
        if isinstance(max_iters, bool) or not isinstance(max_iters, int) or max_iters < 1:
            raise ValueError(f"max_iters must be an int >= 1. Received: max_iters={max_iters!r}.")
        _check_positive("tol", tol, allow_zero=True)
        _check_positive("damping", damping, allow_zero=True)
        if not isinstance(unroll, bool):
            raise TypeError(f"unroll must be a bool. Received: unroll={unroll!r}.")
        self.max_iters = max_iters
        self.tol = tol
        self.damping = damping
        self.unroll = unroll

    def get_config(self) -> dict:
        return {
            "max_iters": self.max_iters,
            "tol": self.tol,
            "damping": self.damping,
            "unroll": self.unroll,
        }

    def _matvec(self, hvp_fn: HvpFn, u: Sequence, dtype: tf.DType) -> list:
        hu = hvp_fn(u)
        if self.damping:
            hu = _vectors.add(hu, u, tf.constant(self.damping, dtype))
        return hu

    def solve(self, hvp_fn: HvpFn, v: Sequence) -> SolveResult:
        v = list(v)
        dtype = _rhs_dtype(v)
        zero = tf.zeros([], dtype)

        def safe_div(a, b):
            return tf.where(tf.equal(b, 0), zero, a / tf.where(tf.equal(b, 0), tf.ones_like(b), b))

        # The first iteration runs outside the loop: it turns structural zeros of v
        # into dense tensors (A v is dense), as tf.while_loop needs fixed structures.
        v_norm = _vectors.norm(v, dtype)
        stop_at = tf.constant(self.tol, dtype) * v_norm
        rr = v_norm * v_norm
        ap = self._matvec(hvp_fn, v, dtype)
        pap = _vectors.dot(v, ap, dtype)
        a = safe_div(rr, pap)
        x = [tf.zeros_like(hp) if u is None else a * u for u, hp in zip(v, ap, strict=True)]
        r = [(-a * hp) if u is None else (u - a * hp) for u, hp in zip(v, ap, strict=True)]
        p = [tf.zeros_like(hp) if u is None else u for u, hp in zip(v, ap, strict=True)]
        rr_new = _vectors.dot(r, r, dtype)
        p = _vectors.add(r, p, safe_div(rr_new, rr))
        bad = pap <= 0

        def cond(i, x, r, p, rr, bad):
            return tf.logical_and(i < self.max_iters, tf.sqrt(rr) > stop_at)

        def body(i, x, r, p, rr, bad):
            ap = self._matvec(hvp_fn, p, dtype)
            pap = _vectors.dot(p, ap, dtype)
            a = safe_div(rr, pap)
            x = _vectors.add(x, p, a)
            r = _vectors.add(r, ap, -a)
            rr_new = _vectors.dot(r, r, dtype)
            p = _vectors.add(r, p, safe_div(rr_new, rr))
            return i + 1, x, r, p, rr_new, tf.logical_or(bad, pap <= 0)

        i0 = tf.constant(1, tf.int32)
        if self.max_iters > 1 and self.unroll:
            loop_vars = (i0, x, r, p, rr_new, bad)
            for _ in range(self.max_iters - 1):
                active = cond(*loop_vars)
                loop_vars = tf.nest.map_structure(
                    lambda new, old, active=active: tf.where(active, new, old),
                    body(*loop_vars),
                    loop_vars,
                )
            i, x, r, p, rr, bad = loop_vars
        elif self.max_iters > 1:
            i, x, r, p, rr, bad = tf.while_loop(
                cond, body, (i0, x, r, p, rr_new, bad), maximum_iterations=self.max_iters - 1
            )
        else:
            i, rr = i0, rr_new
        residual = tf.sqrt(rr)
        # A zero right-hand side is solved exactly by x = 0 and has no curvature to meet.
        bad = tf.logical_and(bad, v_norm > 0)
        diverged = tf.logical_or(bad, tf.logical_not(tf.math.is_finite(residual)))
        return SolveResult(
            solution=x,
            residual_norm=residual,
            diverged=diverged,
            num_hvps=i,
            alpha=tf.constant(float("nan"), dtype),
        )
