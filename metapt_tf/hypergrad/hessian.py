"""Hessian-vector products of a scalar loss with respect to a list of variables.

Two exact modes, both without forming the Hessian:

* `forward_over_reverse`: a `tf.autodiff.ForwardAccumulator` (tangent = the
  vector) around a `GradientTape` that takes the gradient; the JVP of the
  gradient is `H v`.
* `reverse_over_reverse`: the gradient is recorded by an outer tape and
  differentiated again with `output_gradients = v`, giving `v^T H = H v`.

Entries of the vector that are `None` are structural zeros: forward-over-reverse
leaves those variables out of the accumulator, reverse-over-reverse leaves them
out of the second backward pass. The result is always dense (one tensor per
parameter), since `H v` generally touches every parameter.
"""

from collections.abc import Callable, Sequence

import tensorflow as tf

from metapt_tf.hypergrad import _vectors

FORWARD_OVER_REVERSE = "forward_over_reverse"
REVERSE_OVER_REVERSE = "reverse_over_reverse"
HVP_MODES = (FORWARD_OVER_REVERSE, REVERSE_OVER_REVERSE)
# The faster mode as measured by benchmarks/hypergrad_bench.py on CPU (README,
# "Performance"): in the implicit part it records the PT gradient once and serves
# every HVP and the mixed term from that recording.
DEFAULT_HVP_MODE = REVERSE_OVER_REVERSE

_ZERO = tf.UnconnectedGradients.ZERO

LossFn = Callable[[], tf.Tensor]


def check_mode(mode: str) -> str:
    if mode not in HVP_MODES:
        raise ValueError(f"hvp_mode must be one of {HVP_MODES}. Received: hvp_mode={mode!r}.")
    return mode


def scalar_loss(loss_fn: LossFn, what: str = "loss_fn") -> tf.Tensor:
    """Calls `loss_fn` and checks that it returned a floating scalar."""
    loss = loss_fn()
    if not isinstance(loss, tf.Tensor | tf.Variable):
        loss = tf.convert_to_tensor(loss)
    if loss.shape.rank != 0:
        raise ValueError(
            f"{what} must return a scalar loss. Received a tensor of shape {tuple(loss.shape)}; "
            "reduce it (e.g. tf.reduce_mean) first."
        )
    if not loss.dtype.is_floating:
        raise ValueError(f"{what} must return a floating loss. Received dtype {loss.dtype.name}.")
    return loss


def _active(vector: Sequence) -> list[int]:
    return [i for i, u in enumerate(vector) if u is not None]


def _hvp_forward_over_reverse(loss_fn: LossFn, params: list, vector: list) -> list:
    active = _active(vector)
    with tf.autodiff.ForwardAccumulator(
        primals=[params[i] for i in active], tangents=[vector[i] for i in active]
    ) as acc:
        with tf.GradientTape(watch_accessed_variables=False) as tape:
            tape.watch(params)
            loss = scalar_loss(loss_fn)
        grads = tape.gradient(loss, params, unconnected_gradients=_ZERO)
    return acc.jvp(grads, unconnected_gradients=_ZERO)


def _hvp_reverse_over_reverse(loss_fn: LossFn, params: list, vector: list) -> list:
    active = _active(vector)
    with tf.GradientTape(watch_accessed_variables=False) as outer:
        outer.watch(params)
        with tf.GradientTape(watch_accessed_variables=False) as inner:
            inner.watch(params)
            loss = scalar_loss(loss_fn)
        grads = inner.gradient(loss, params, unconnected_gradients=_ZERO)
    # v^T (d grads / d params) = (H v)^T, H symmetric.
    return outer.gradient(
        [grads[i] for i in active],
        params,
        output_gradients=[vector[i] for i in active],
        unconnected_gradients=_ZERO,
    )


def make_hvp_fn(
    loss_fn: LossFn, params: Sequence[tf.Variable], mode: str = DEFAULT_HVP_MODE
) -> Callable[[Sequence], list]:
    """Returns `u -> H u` for `H = d^2 loss_fn() / d params^2` (no input checks per call)."""
    check_mode(mode)
    params = list(params)
    impl = _hvp_forward_over_reverse if mode == FORWARD_OVER_REVERSE else _hvp_reverse_over_reverse

    def hvp_fn(vector: Sequence) -> list:
        vector = list(vector)
        if not _active(vector):
            return [tf.zeros_like(p) for p in params]
        return impl(loss_fn, params, vector)

    return hvp_fn


def hvp(
    loss_fn: LossFn,
    params: Sequence[tf.Variable],
    vector: Sequence,
    mode: str = DEFAULT_HVP_MODE,
) -> list:
    """Hessian-vector product `H v`, `H = d^2 loss_fn() / d params^2`.

    Args:
      loss_fn: zero-argument callable returning a scalar; reads `params`.
      params: list of `tf.Variable`.
      vector: list shaped like `params` (same dtypes); `None` entries are zeros.
      mode: "forward_over_reverse" or "reverse_over_reverse".

    Returns:
      List of tensors shaped like `params`.
    """
    params = _vectors.check_params(params, "params")
    vector = _vectors.check_vector(vector, params, "vector")
    return make_hvp_fn(loss_fn, params, mode)(vector)
