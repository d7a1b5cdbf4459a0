"""One meta-gradient step: FT unroll (truncated backprop) + implicit PT part.

    dL_val/dphi = -(d2L_PT/dphi dtheta) H^{-1} v,   v = dL_FT^val/dtheta through K FT steps.

`meta_gradient` composes `unroll_finetune` and `implicit_hypergradient` over
zero-argument/closure losses and runs eagerly or inside a caller's
`tf.function`. `MetaGradient` binds batch-taking losses once and compiles the
whole step into a single `tf.function` (optionally XLA), traced once for a
fixed batch signature.
"""

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import tensorflow as tf

from metapt_tf.hypergrad import _vectors
from metapt_tf.hypergrad import hessian as hvp_lib
from metapt_tf.hypergrad import implicit as implicit_lib
from metapt_tf.hypergrad import solvers as solvers_lib
from metapt_tf.hypergrad import unroll as unroll_lib


class MetaGradientResult(NamedTuple):
    """What one meta-gradient step returns.

    Attributes:
      meta_grads: list shaped like meta_params, dL_FT^val/dphi.
      v: list shaped like pt_params, dL_FT^val/dtheta through the unroll (zeros
        for parameters the FT loss does not read).
      ft_params: FT parameters after the K unrolled steps (copy back to keep
        the FT head persistent across meta-steps).
      ft_state: the FT update rule's state after the K steps.
      ft_val_loss: FT validation loss after the K steps.
      ft_train_losses: [K] FT train losses, one before each step.
      solver_residual: the solver's residual norm (see `solvers`).
      solver_diverged: bool, the solver flagged divergence.
      num_hvps: HVPs spent by the solver.
    """

    meta_grads: list
    v: list
    ft_params: list
    ft_state: Any
    ft_val_loss: tf.Tensor
    ft_train_losses: tf.Tensor
    solver_residual: tf.Tensor
    solver_diverged: tf.Tensor
    num_hvps: tf.Tensor


def meta_gradient(
    *,
    pt_loss_fn: Callable[[], tf.Tensor],
    pt_params: Sequence[tf.Variable],
    meta_params: Sequence[tf.Variable],
    ft_train_loss_fn: Callable[[list, int], tf.Tensor],
    ft_val_loss_fn: Callable[[list], tf.Tensor],
    ft_params: Sequence,
    ft_update_rule: unroll_lib.UpdateRule,
    num_ft_steps: int,
    solver: solvers_lib.InverseHvpSolver,
    ft_state: Any = None,
    hvp_mode: str = hvp_lib.DEFAULT_HVP_MODE,
    reduce_fn: implicit_lib.ReduceFn | None = None,
) -> MetaGradientResult:
    """One meta-gradient: K FT steps from `ft_params`, v, then the implicit PT part.

    Args:
      pt_loss_fn: zero-argument PT loss on a PT batch; reads pt_params and meta_params.
      pt_params: theta (backbone + PT head), list of `tf.Variable`.
      meta_params: phi, list of `tf.Variable`.
      ft_train_loss_fn: `(ft_params, step) -> scalar`, see `unroll_finetune`.
      ft_val_loss_fn: `ft_params -> scalar` FT validation loss.
      ft_params: initial FT parameters (the head for head-only FT; backbone
        copies + head for full-network FT).
      ft_update_rule: differentiable `SGD`, `Momentum` or `Adam`.
      num_ft_steps: K >= 1.
      solver: `Neumann`, `ConjugateGradient` or `Identity`.
      ft_state: the update rule's state to continue from, or None for a fresh one.
      hvp_mode: "forward_over_reverse" or "reverse_over_reverse".
      reduce_fn: optional, applied to every HVP and to the mixed term (see
        `implicit_hypergradient`): a cross-replica sum when `pt_loss_fn` is one
        replica's share of the PT loss. The FT unroll is not reduced: v is that of
        the FT losses as given.
    """
    pt_params = _vectors.check_params(pt_params, "pt_params")
    meta_params = _vectors.check_params(meta_params, "meta_params")
    hvp_lib.check_mode(hvp_mode)
    unrolled = unroll_lib.unroll_finetune(
        ft_train_loss_fn,
        ft_val_loss_fn,
        ft_params,
        pt_params,
        update_rule=ft_update_rule,
        num_steps=num_ft_steps,
        ft_state=ft_state,
    )
    implicit = implicit_lib.implicit_hypergradient_with_info(
        pt_loss_fn,
        pt_params,
        meta_params,
        unrolled.v,
        solver=solver,
        hvp_mode=hvp_mode,
        reduce_fn=reduce_fn,
    )
    return MetaGradientResult(
        meta_grads=implicit.meta_grads,
        v=_vectors.densify(unrolled.v, pt_params),
        ft_params=unrolled.ft_params,
        ft_state=unrolled.ft_state,
        ft_val_loss=unrolled.val_loss,
        ft_train_losses=unrolled.train_losses,
        solver_residual=implicit.solve.residual_norm,
        solver_diverged=implicit.solve.diverged,
        num_hvps=implicit.solve.num_hvps,
    )


class MetaGradient:
    """A compiled meta-gradient step over batch-taking losses.

    The losses take their batches as arguments, so one trace serves every call
    with batches of the same shapes and dtypes:

        pt_loss_fn(pt_batch) -> scalar
        ft_train_loss_fn(ft_params, ft_train_batch, step) -> scalar
        ft_val_loss_fn(ft_params, ft_val_batch) -> scalar

    Batches may be any nest of tensors. `ft_train_batch` is passed to every
    unrolled step; index it with `step` if it holds K batches. `ft_params` may
    hold tensors (e.g. a head) and variables (full-network FT passes the PT
    variables themselves).

    `trace_count` counts how often the step was traced (a retrace on every call
    would mean batches with changing shapes or Python values among the inputs).

    `reduce_fn` is passed to `meta_gradient` (a cross-replica sum of HVPs and the
    mixed term when `pt_loss_fn` returns one replica's share of the PT loss).
    """

    def __init__(
        self,
        *,
        pt_loss_fn: Callable[[Any], tf.Tensor],
        ft_train_loss_fn: Callable[[list, Any, int], tf.Tensor],
        ft_val_loss_fn: Callable[[list, Any], tf.Tensor],
        pt_params: Sequence[tf.Variable],
        meta_params: Sequence[tf.Variable],
        ft_update_rule: unroll_lib.UpdateRule,
        num_ft_steps: int,
        solver: solvers_lib.InverseHvpSolver,
        hvp_mode: str = hvp_lib.DEFAULT_HVP_MODE,
        compile: bool = True,
        jit_compile: bool = False,
        reduce_fn: implicit_lib.ReduceFn | None = None,
    ):
        self.pt_params = _vectors.check_params(pt_params, "pt_params")
        self.meta_params = _vectors.check_params(meta_params, "meta_params")
        self.hvp_mode = hvp_lib.check_mode(hvp_mode)
        if isinstance(num_ft_steps, bool) or not isinstance(num_ft_steps, int) or num_ft_steps < 1:
            raise ValueError(
                f"num_ft_steps (K) must be an int >= 1. Received: num_ft_steps={num_ft_steps!r}."
            )
        if not isinstance(solver, solvers_lib.InverseHvpSolver):
            raise TypeError(f"solver must be an InverseHvpSolver. Received: {solver!r}.")
        if jit_compile and getattr(solver, "raise_on_divergence", False):
            raise ValueError(
                "raise_on_divergence adds a runtime assertion that XLA cannot compile; "
                "use jit_compile=False or read MetaGradientResult.solver_diverged instead."
            )
        self._pt_loss_fn = pt_loss_fn
        self._ft_train_loss_fn = ft_train_loss_fn
        self._ft_val_loss_fn = ft_val_loss_fn
        self.ft_update_rule = ft_update_rule
        self.num_ft_steps = num_ft_steps
        self.solver = solver
        self.reduce_fn = reduce_fn
        self.trace_count = 0
        self.jit_compile = bool(jit_compile and compile)
        if compile:
            self._step_fn = tf.function(self._step, jit_compile=jit_compile, autograph=False)
        else:
            self._step_fn = self._step

    def _step(self, pt_batch, ft_train_batch, ft_val_batch, ft_params, ft_state):
        self.trace_count += 1
        return meta_gradient(
            pt_loss_fn=lambda: self._pt_loss_fn(pt_batch),
            pt_params=self.pt_params,
            meta_params=self.meta_params,
            ft_train_loss_fn=lambda params, step: self._ft_train_loss_fn(
                params, ft_train_batch, step
            ),
            ft_val_loss_fn=lambda params: self._ft_val_loss_fn(params, ft_val_batch),
            ft_params=ft_params,
            ft_update_rule=self.ft_update_rule,
            num_ft_steps=self.num_ft_steps,
            solver=self.solver,
            ft_state=ft_state,
            hvp_mode=self.hvp_mode,
            reduce_fn=self.reduce_fn,
        )

    def _inputs(self, ft_params: Sequence, ft_state: Any) -> tuple[list, Any]:
        # Variables stay variables: full-network FT passes the PT variables themselves,
        # which must be read inside the step's tape for v to flow through them.
        ft_params = [
            p if isinstance(p, tf.Variable) else tf.convert_to_tensor(p) for p in ft_params
        ]
        if ft_state is None:
            ft_state = self.init_ft_state(ft_params)
        return ft_params, ft_state

    def compiler_ir(
        self, pt_batch, ft_train_batch, ft_val_batch, ft_params: Sequence, ft_state: Any = None
    ) -> str:
        """The optimized HLO text of the XLA-compiled step (`jit_compile=True` only).

        Shows what XLA receives, e.g. that variables are arguments of the program
        rather than constants folded into it (which would force a recompilation
        after every variable update).
        """
        if not self.jit_compile:
            raise ValueError("compiler_ir needs MetaGradient(jit_compile=True).")
        ft_params, ft_state = self._inputs(ft_params, ft_state)
        return self._step_fn.experimental_get_compiler_ir(
            pt_batch, ft_train_batch, ft_val_batch, ft_params, ft_state
        )(stage="optimized_hlo")

    def init_ft_state(self, ft_params: Sequence) -> Any:
        """A fresh state of the FT update rule for `ft_params`."""
        return self.ft_update_rule.init([tf.convert_to_tensor(p) for p in ft_params])

    def __call__(
        self, pt_batch, ft_train_batch, ft_val_batch, ft_params: Sequence, ft_state: Any = None
    ) -> MetaGradientResult:
        ft_params, ft_state = self._inputs(ft_params, ft_state)
        return self._step_fn(pt_batch, ft_train_batch, ft_val_batch, ft_params, ft_state)
