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

`reduce_fn` serves a PT loss computed in parts that sum to the whole (the
replicas of a data-parallel step, each holding its shard's share of the global
mean): HVPs and the mixed term are linear in the loss, so summing each across
the parts gives the whole loss's. It is applied to every HVP the solver asks for
and to the mixed term, so the solver sees the whole Hessian.
"""

from collections.abc import Callable, Sequence
from typing import NamedTuple

import tensorflow as tf

from metapt_tf.hypergrad import _vectors
from metapt_tf.hypergrad import hessian as hvp_lib
from metapt_tf.hypergrad import solvers as solvers_lib

_ZERO = tf.UnconnectedGradients.ZERO

ReduceFn = Callable[[list], Sequence]


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
    reduce_fn: ReduceFn | None = None,
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

    if reduce_fn is not None and not callable(reduce_fn):
        raise TypeError(f"reduce_fn must be callable or None. Received: {reduce_fn!r}.")

    if hvp_mode == hvp_lib.REVERSE_OVER_REVERSE:
        recorded = _RecordedGradient(pt_loss_fn, pt_params, meta_params)
        hvp_fn, mixed_fn = recorded.hvp, recorded.mixed
    else:
        hvp_fn = hvp_lib.make_hvp_fn(pt_loss_fn, pt_params, hvp_mode)

        def mixed_fn(p):
            return mixed_vjp_forward(pt_loss_fn, pt_params, meta_params, p)

    if reduce_fn is not None:
        local_hvp_fn = hvp_fn

        def hvp_fn(u):
            return _reduced(reduce_fn, local_hvp_fn(u), "HVP")

    solve = solver.solve(hvp_fn, v)
    # Connectivity is structural (the same in every part), so it is checked first.
    mixed = _check_connected(mixed_fn(solve.solution), meta_params)
    if reduce_fn is not None:
        mixed = _reduced(reduce_fn, mixed, "mixed term")
    return ImplicitResult(meta_grads=[-m for m in mixed], solve=solve)


def _reduced(reduce_fn: ReduceFn, values: list, what: str) -> list:
    out = list(reduce_fn(list(values)))
    if len(out) != len(values):
        raise ValueError(
            f"reduce_fn must return one tensor per input; for the {what} it received "
            f"{len(values)} and returned {len(out)}."
        )
    return out


def implicit_hypergradient(
    pt_loss_fn: Callable[[], tf.Tensor],
    pt_params: Sequence[tf.Variable],
    meta_params: Sequence[tf.Variable],
    v: Sequence,
    *,
    solver: solvers_lib.InverseHvpSolver,
    hvp_mode: str = hvp_lib.DEFAULT_HVP_MODE,
    reduce_fn: ReduceFn | None = None,
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
      reduce_fn: optional `list -> list` (one tensor per entry, same shapes)
        applied to every HVP and to the mixed term, e.g. a cross-replica sum when
        `pt_loss_fn` is one replica's share of the loss (see the module docstring).

    Returns:
      List of tensors shaped like `meta_params`.

    Raises:
      ValueError: `v` does not match `pt_params` (length, shape, dtype), or
        `pt_loss_fn`'s gradient does not depend on some meta-parameter.
    """
    return implicit_hypergradient_with_info(
        pt_loss_fn, pt_params, meta_params, v, solver=solver, hvp_mode=hvp_mode, reduce_fn=reduce_fn
    ).meta_grads
