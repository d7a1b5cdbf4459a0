"""The FT part of the meta-gradient: K differentiable fine-tuning steps.

`unroll_finetune` runs K update steps on the FT parameters inside an outer
`GradientTape` (each step's gradient comes from an inner tape, so the outer tape
records the update as a function of everything it read), evaluates the FT
validation loss, and returns

    v = d L_FT^val(params_K) / d wrt          (truncated backprop through K steps)

together with the final FT parameters and optimizer state.

Head-only FT: `ft_params` is the head psi; the loss functions compute features
with the PT backbone variables (in `wrt`), so v flows through the features.
Full-network FT: `ft_params` holds the PT variables themselves (plus the head);
they are read inside the tape, the loss functions use the resulting tensors
functionally, and v flows through those initial values.

The update rules are pure (`init`, `apply`) and differentiable. Adam's
denominator uses a square root whose derivative is taken as 0 at 0, so second
derivatives stay finite when a gradient entry is exactly zero.
"""

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import tensorflow as tf

from metapt_tf.hypergrad import _vectors
from metapt_tf.hypergrad._vectors import as_scalar

_ZERO = tf.UnconnectedGradients.ZERO


def safe_sqrt(x: tf.Tensor) -> tf.Tensor:
    """sqrt(x) for x >= 0 whose derivatives (all orders) at x = 0 are 0, not inf/NaN."""
    positive = x > 0
    return tf.where(positive, tf.sqrt(tf.where(positive, x, tf.ones_like(x))), tf.zeros_like(x))


def _check_rate(name: str, value: float, upper: float | None = None) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"{name} must be a number. Received: {name}={value!r}.")
    if value < 0 or (upper is not None and value >= upper):
        bound = f"in [0, {upper})" if upper is not None else ">= 0"
        raise ValueError(f"{name} must be {bound}. Received: {name}={value!r}.")


class UpdateRule:
    """A pure, differentiable optimizer: `init(params) -> state`,
    `apply(params, grads, state) -> (params, state)`. States are nests of tensors."""

    def init(self, params: Sequence[tf.Tensor]) -> Any:
        raise NotImplementedError

    def apply(self, params: list, grads: list, state: Any) -> tuple[list, Any]:
        raise NotImplementedError

    def get_config(self) -> dict:
        return {}

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.get_config().items())
        return f"{type(self).__name__}({args})"


class SGD(UpdateRule):
    def __init__(self, learning_rate: float):
        _check_rate("learning_rate", learning_rate)
        self.learning_rate = learning_rate

    def get_config(self) -> dict:
        return {"learning_rate": self.learning_rate}

    def init(self, params):
        return ()

    def apply(self, params, grads, state):
        lr = self.learning_rate
        return [p - as_scalar(lr, p.dtype) * g for p, g in zip(params, grads, strict=True)], state


class Momentum(UpdateRule):
    """Heavy-ball momentum as in `tf.keras.optimizers.SGD(momentum=...)`:
    m <- mu m - lr g;  p <- p + m  (Nesterov: p <- p + mu m - lr g)."""

    def __init__(self, learning_rate: float, momentum: float = 0.9, nesterov: bool = False):
        _check_rate("learning_rate", learning_rate)
        _check_rate("momentum", momentum, upper=1.0)
        self.learning_rate = learning_rate
        self.momentum = momentum
        self.nesterov = nesterov

    def get_config(self) -> dict:
        return {
            "learning_rate": self.learning_rate,
            "momentum": self.momentum,
            "nesterov": self.nesterov,
        }

    def init(self, params):
        return [tf.zeros_like(p) for p in params]

    def apply(self, params, grads, state):
        new_params, new_state = [], []
        for p, g, m in zip(params, grads, state, strict=True):
            lr, mu = as_scalar(self.learning_rate, p.dtype), as_scalar(self.momentum, p.dtype)
            m = mu * m - lr * g
            new_params.append(p + mu * m - lr * g if self.nesterov else p + m)
            new_state.append(m)
        return new_params, new_state


class AdamState(NamedTuple):
    step: tf.Tensor  # float scalar, steps taken so far
    m: list
    v: list


class Adam(UpdateRule):
    """Adam with bias correction in the textbook form (as PyTorch and optax):
    p <- p - lr * m_hat / (sqrt(v_hat) + epsilon)."""

    def __init__(
        self,
        learning_rate: float = 1e-3,
        beta_1: float = 0.9,
        beta_2: float = 0.999,
        epsilon: float = 1e-8,
    ):
        _check_rate("learning_rate", learning_rate)
        _check_rate("beta_1", beta_1, upper=1.0)
        _check_rate("beta_2", beta_2, upper=1.0)
        if epsilon <= 0:
            raise ValueError(f"epsilon must be > 0. Received: epsilon={epsilon!r}.")
        self.learning_rate = learning_rate
        self.beta_1 = beta_1
        self.beta_2 = beta_2
        self.epsilon = epsilon

    def get_config(self) -> dict:
        return {
            "learning_rate": self.learning_rate,
            "beta_1": self.beta_1,
            "beta_2": self.beta_2,
            "epsilon": self.epsilon,
        }

    def init(self, params):
        dtype = params[0].dtype
        return AdamState(
            step=tf.zeros([], dtype),
            m=[tf.zeros_like(p) for p in params],
            v=[tf.zeros_like(p) for p in params],
        )

    def apply(self, params, grads, state):
        dtype = params[0].dtype
        step = tf.cast(state.step, dtype) + 1
        b1, b2 = as_scalar(self.beta_1, dtype), as_scalar(self.beta_2, dtype)
        lr, eps = as_scalar(self.learning_rate, dtype), as_scalar(self.epsilon, dtype)
        c1 = 1 - tf.pow(b1, step)
        c2 = 1 - tf.pow(b2, step)
        new_params, ms, vs = [], [], []
        for p, g, m, v in zip(params, grads, state.m, state.v, strict=True):
            m = b1 * m + (1 - b1) * g
            v = b2 * v + (1 - b2) * tf.square(g)
            new_params.append(p - lr * (m / c1) / (safe_sqrt(v / c2) + eps))
            ms.append(m)
            vs.append(v)
        return new_params, AdamState(step=step, m=ms, v=vs)


class UnrollResult(NamedTuple):
    """What `unroll_finetune` returns.

    Attributes:
      v: list aligned with `wrt`: dL_val/dwrt through the unroll; `None` where
        the validation loss does not depend on that variable at all.
      ft_params: the FT parameters after K steps (gradient stopped).
      ft_state: the update rule's state after K steps (gradient stopped).
      val_loss: the FT validation loss after K steps.
      train_losses: float tensor [K], the FT train loss before each step.
    """

    v: list
    ft_params: list
    ft_state: Any
    val_loss: tf.Tensor
    train_losses: tf.Tensor


def unroll_finetune(
    train_loss_fn: Callable[[list, int], tf.Tensor],
    val_loss_fn: Callable[[list], tf.Tensor],
    ft_params: Sequence,
    wrt: Sequence[tf.Variable],
    *,
    update_rule: UpdateRule,
    num_steps: int,
    ft_state: Any = None,
) -> UnrollResult:
    """K differentiable FT steps, then v = d L_val / d wrt through them.

    Args:
      train_loss_fn: `(params, step) -> scalar` FT train loss of the current FT
        parameters (list of tensors) at unroll step `step` (a Python int, so a
        different batch can be used per step).
      val_loss_fn: `params -> scalar` FT validation loss.
      ft_params: initial FT parameters (tensors or variables). For full-network FT
        pass the PT variables themselves: they are read inside the tape, so v flows
        through them (a copy made before the call would cut that path).
      wrt: the variables v is taken with respect to (theta).
      update_rule: `SGD`, `Momentum`, `Adam` or another `UpdateRule`.
      num_steps: K >= 1.
      ft_state: the update rule's state to start from (e.g. a persistent head's
        Adam moments); `update_rule.init(ft_params)` when None.
    """
    if isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps < 1:
        raise ValueError(f"num_steps (K) must be an int >= 1. Received: num_steps={num_steps!r}.")
    if not isinstance(update_rule, UpdateRule):
        raise TypeError(
            f"update_rule must be an UpdateRule (SGD, Momentum, Adam). Received: {update_rule!r}."
        )
    wrt = _vectors.check_params(wrt, "wrt")
    if not ft_params:
        raise ValueError("ft_params must be a non-empty list of tensors.")

    with tf.GradientTape(watch_accessed_variables=False) as outer:
        outer.watch(wrt)
        params = [tf.convert_to_tensor(p) for p in ft_params]
        state = update_rule.init(params) if ft_state is None else ft_state
        train_losses = []
        for step in range(num_steps):
            with tf.GradientTape(watch_accessed_variables=False) as inner:
                inner.watch(params)
                loss = train_loss_fn(params, step)
            if loss.shape.rank != 0:
                raise ValueError(
                    f"train_loss_fn must return a scalar. Received shape {tuple(loss.shape)}."
                )
            grads = inner.gradient(loss, params, unconnected_gradients=_ZERO)
            params, state = update_rule.apply(params, grads, state)
            train_losses.append(loss)
        val_loss = val_loss_fn(params)
        if val_loss.shape.rank != 0:
            raise ValueError(
                f"val_loss_fn must return a scalar. Received shape {tuple(val_loss.shape)}."
            )
    v = outer.gradient(val_loss, wrt)
    return UnrollResult(
        v=v,
        ft_params=[tf.stop_gradient(p) for p in params],
        ft_state=tf.nest.map_structure(tf.stop_gradient, state),
        val_loss=tf.stop_gradient(val_loss),
        train_losses=tf.stop_gradient(tf.stack(train_losses)),
    )
