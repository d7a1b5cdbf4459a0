"""The PT part of the meta-gradient, by the implicit function theorem.

At a PT solution theta*(phi), grad_theta L_PT(theta*, phi) = 0, so

    d theta* / d phi = -H^{-1} d2L_PT/(dtheta dphi),   H = d2L_PT/dtheta2,

and for a vector v = dL_val/dtheta the hypergradient is

    dL_val/dphi = -(d2L_PT/(dphi dtheta)) p,   where p solves H p = v.

p comes from an inverse-HVP solver; the mixed term is one extra pass:

* forward_over_reverse: a `ForwardAccumulator` with tangent p on theta around
  a tape that takes dL_PT/dphi; the JVP of that gradient is the mixed term.
  Only the part of the graph that depends on phi is walked backwards.
* reverse_over_reverse: the first-order gradient g = dL_PT/dtheta is recorded
  once on a persistent tape; every HVP of the solve and the mixed term
  `d<g, p>/dphi` are backward passes over that one recording.
"""

from collections.abc import Callable, Sequence
from typing import NamedTuple

import tensorflow as tf

from metapt_tf.hypergrad import _vectors
from metapt_tf.hypergrad import hessian as hvp_lib
from metapt_tf.hypergrad import solvers as solvers_lib

_ZERO = tf.UnconnectedGradients.ZERO


class ImplicitResult(NamedTuple):
    """`meta_grads` (list shaped like meta_params) and the `solve` it used."""

    meta_grads: list
    solve: solvers_lib.SolveResult


def _unconnected_error(meta_params: Sequence, missing: list[int]) -> ValueError:
    names = [f"meta_params[{i}] ({getattr(meta_params[i], 'name', '?')})" for i in missing]
    return ValueError(
        "pt_loss_fn does not depend on " + ", ".join(names) + " through pt_params: the mixed "
        "derivative d2L_PT/(dphi dtheta) is structurally zero, so the implicit hypergradient "
        "would be identically zero. pt_loss_fn must read the meta-parameters (e.g. weight the "
        "per-task or per-example losses with them, or parameterise the augmentation)."
    )


def _check_connected(mixed: list, meta_params: Sequence) -> list:
    missing = [i for i, g in enumerate(mixed) if g is None]
    if missing:
        raise _unconnected_error(meta_params, missing)
    return mixed


def mixed_vjp_forward(
    loss_fn: Callable[[], tf.Tensor], params: list, meta_params: list, p: Sequence
) -> list:
    """(d2 loss / dphi dtheta) p by forward-over-reverse; None where unconnected.

    A `ForwardAccumulator` with tangent p on theta around a tape that takes
    dL/dphi: the JVP of dL/dphi along p is the mixed term. The backward pass only
    walks the part of the graph that depends on phi. (Reverse-over-forward gives
    the same numbers, but under XLA it makes TensorFlow fold every variable into
    the program as a constant, so each variable update forces a recompilation.)
    """
    active = [i for i, u in enumerate(p) if u is not None]
    with tf.autodiff.ForwardAccumulator(
        primals=[params[i] for i in active], tangents=[p[i] for i in active]
    ) as acc:
        with tf.GradientTape(watch_accessed_variables=False) as tape:
            tape.watch(meta_params)
            loss = hvp_lib.scalar_loss(loss_fn, "pt_loss_fn")
        grads = tape.gradient(loss, meta_params)
    # A gradient that exists but does not move with theta has no JVP: structurally zero.
    return [None if g is None else acc.jvp(g) for g in grads]


class _RecordedGradient:
    """g = dL/dtheta recorded once; HVPs and the mixed term reuse the recording."""

    def __init__(self, loss_fn: Callable[[], tf.Tensor], params: list, meta_params: list):
        self._params = params
        self._meta_params = meta_params
        self._tape = tf.GradientTape(persistent=True, watch_accessed_variables=False)
        with self._tape:
            self._tape.watch(params + meta_params)
            with tf.GradientTape(watch_accessed_variables=False) as inner:
                inner.watch(params)
                loss = hvp_lib.scalar_loss(loss_fn, "pt_loss_fn")
            self._grads = inner.gradient(loss, params, unconnected_gradients=_ZERO)

    def _vjp(self, u: Sequence, sources: list, unconnected):
        active = [i for i, x in enumerate(u) if x is not None]
        if not active:
            return [tf.zeros_like(s) for s in sources]
        return self._tape.gradient(
            [self._grads[i] for i in active],
            sources,
            output_gradients=[u[i] for i in active],
            unconnected_gradients=unconnected,
        )

    def hvp(self, u: Sequence) -> list:
        return self._vjp(u, self._params, _ZERO)

    def mixed(self, p: Sequence) -> list:
        return self._vjp(p, self._meta_params, tf.UnconnectedGradients.NONE)


def implicit_hypergradient_with_info(
    pt_loss_fn: Callable[[], tf.Tensor],
    pt_params: Sequence[tf.Variable],
    meta_params: Sequence[tf.Variable],
    v: Sequence,
    *,
    solver: solvers_lib.InverseHvpSolver,
    hvp_mode: str = hvp_lib.DEFAULT_HVP_MODE,
) -> ImplicitResult:
    """`implicit_hypergradient`, also returning the solver's `SolveResult`."""
    pt_params = _vectors.check_params(pt_params, "pt_params")
    meta_params = _vectors.check_params(meta_params, "meta_params")
    v = _vectors.check_vector(v, pt_params, "v")
    hvp_lib.check_mode(hvp_mode)
    if not isinstance(solver, solvers_lib.InverseHvpSolver):
        raise TypeError(
            "solver must be an InverseHvpSolver (Neumann, ConjugateGradient or Identity). "
            f"Received: {solver!r}."
        )
    if all(u is None for u in v):
        raise ValueError(
            "v has no non-None entry: the FT validation loss does not depend on pt_params, "
            "so there is no hypergradient to compute."
        )
    overlap = {id(x) for x in pt_params} & {id(x) for x in meta_params}
    if overlap:
        raise ValueError("pt_params and meta_params must be disjoint lists of variables.")

    if hvp_mode == hvp_lib.REVERSE_OVER_REVERSE:
        recorded = _RecordedGradient(pt_loss_fn, pt_params, meta_params)
        solve = solver.solve(recorded.hvp, v)
        mixed = recorded.mixed(solve.solution)
    else:
        solve = solver.solve(hvp_lib.make_hvp_fn(pt_loss_fn, pt_params, hvp_mode), v)
        mixed = mixed_vjp_forward(pt_loss_fn, pt_params, meta_params, solve.solution)
    mixed = _check_connected(mixed, meta_params)
    return ImplicitResult(meta_grads=[-m for m in mixed], solve=solve)


def implicit_hypergradient(
    pt_loss_fn: Callable[[], tf.Tensor],
    pt_params: Sequence[tf.Variable],
    meta_params: Sequence[tf.Variable],
    v: Sequence,
    *,
    solver: solvers_lib.InverseHvpSolver,
    hvp_mode: str = hvp_lib.DEFAULT_HVP_MODE,
) -> list:
    """-(d2L_PT/dphi dtheta) H^{-1} v, the PT part of the meta-gradient.

    Args:
      pt_loss_fn: zero-argument callable returning the scalar PT loss; reads
        `pt_params` and `meta_params`.
      pt_params: theta, list of `tf.Variable`.
      meta_params: phi, list of `tf.Variable`, disjoint from `pt_params`.
      v: dL_val/dtheta, list shaped like `pt_params` with matching dtypes;
        `None` entries are structural zeros (parameters the FT loss never reads).
      solver: an `InverseHvpSolver` for p ~ H^{-1} v.
      hvp_mode: "forward_over_reverse" or "reverse_over_reverse".

    Returns:
      List of tensors shaped like `meta_params`.

    Raises:
      ValueError: `v` does not match `pt_params` (length, shape, dtype), or
        `pt_loss_fn`'s gradient does not depend on some meta-parameter.
    """
    return implicit_hypergradient_with_info(
        pt_loss_fn, pt_params, meta_params, v, solver=solver, hvp_mode=hvp_mode
    ).meta_grads
