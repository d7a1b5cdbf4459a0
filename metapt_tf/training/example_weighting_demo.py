"""Per-example PT weights learned online by hypergradient, on a noisy linear regression.

The problem (numpy RNG, fixed by `config.seed`):

    theta* ~ N(0, I / d), shape [d, m];   PT:  Y = X theta* + label_noise * eps,
    X ~ N(0, I);   a known `corrupted` mask: those target rows are flipped
    (y -> -y) or shifted by large noise;   FT train / FT val: clean examples
    from the same theta*.

The regression has m outputs (`num_outputs`) and every loss is the squared error
summed over outputs, averaged over examples. With one output the weights are not
identifiable: the FT validation loss only sees theta (d numbers), and many
weightings of the PT examples give the same theta, so once it is right the
meta-gradient stops telling a harmless corrupted example from a clean one.
With m outputs a corrupted row pulls theta the wrong way in m directions at
once, and d * m exceeds the number of corrupted examples.

Meta-parameters phi (one per PT example) give weights w = 2 * sigmoid(phi) in
(0, 2), starting at 1. PT minimises the weighted mean squared error plus a ridge
term over theta. Each meta-step (the online algorithm of DESIGN.md):

1. P PT steps on theta with the current weights;
2. K differentiable SGD steps of full-network FT on a copy of theta, FT val loss,
   and v = dL_FT^val/dtheta through them;
3. the implicit PT part -(d2L_PT/dphi dtheta) H^{-1} v (conjugate gradient by
   default), all by `hypergrad.meta_gradient`;
4. one Adam step on phi.

A corrupted example pulls theta away from theta*, so raising its weight raises
the FT validation loss: its hypergradient is positive and its weight falls.
`run` prints a progress line per logging step, writes TensorBoard scalars, and
returns a `DemoResult` with the weight history and how well the final weights
separate clean from corrupted examples (AUROC).
"""

import dataclasses
import math
import time
from collections.abc import Callable

import ml_collections
import numpy as np
import tensorflow as tf

from metapt_tf import hypergrad
from metapt_tf.training import reporting
from metapt_tf.training.config_checks import config_error

SOLVERS = ("cg", "neumann", "identity")
PT_OPTIMIZERS = ("sgd", "adam")
CORRUPTIONS = ("flip", "shift")
DTYPES = ("float32", "float64")


@dataclasses.dataclass(frozen=True)
class Problem:
    """The regression data; `corrupted[i]` marks PT example i as corrupted."""

    theta_star: np.ndarray  # [d, m]
    x_pt: np.ndarray  # [n, d]
    y_pt: np.ndarray  # [n, m]
    corrupted: np.ndarray  # bool [n]
    x_ft_train: np.ndarray
    y_ft_train: np.ndarray
    x_ft_val: np.ndarray
    y_ft_val: np.ndarray


@dataclasses.dataclass(frozen=True)
class DemoResult:
    """What `run` returns.

    Attributes:
      weight_history: [T + 1, n] per-example weights, before the first meta-step
        and after each one.
      corrupted: bool [n], the corrupted mask.
      ft_val_loss_history: [T] FT validation loss at each meta-step (after the
        K FT steps, before that step's update of phi).
      solver_residual_history: [T] the inverse-HVP solver's residual norm.
      mean_weight_clean: mean final weight of the clean examples.
      mean_weight_corrupted: mean final weight of the corrupted examples.
      auroc: AUROC of the final weights as a score for "clean" (1.0: every clean
        example outweighs every corrupted one; 0.5: no separation).
      ft_val_loss_start: FT validation loss at the first meta-step (all weights 1,
        after warm-up PT).
      ft_val_loss_end: FT validation loss at the last meta-step.
      steps_per_sec: meta-steps per second after the first (compiling) step.
      workdir: where TensorBoard summaries went, or None.
    """

    weight_history: np.ndarray
    corrupted: np.ndarray
    ft_val_loss_history: np.ndarray
    solver_residual_history: np.ndarray
    mean_weight_clean: float
    mean_weight_corrupted: float
    auroc: float
    ft_val_loss_start: float
    ft_val_loss_end: float
    steps_per_sec: float
    workdir: str | None


def validate_config(config: ml_collections.ConfigDict) -> None:
    """Raises ValueError naming the first field that is out of range."""

    def positive_int(name: str, minimum: int = 1) -> None:
        value = config[name]
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise config_error(name, value, f"an int >= {minimum}")

    def number(name: str, low: float, high: float | None = None, open_low: bool = True) -> None:
        value = config[name]
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise config_error(name, value, "a number")
        too_low = value <= low if open_low else value < low
        if too_low or (high is not None and value >= high) or not math.isfinite(value):
            bracket = "(" if open_low else "["
            upper = f"{high})" if high is not None else "inf)"
            raise config_error(name, value, f"in {bracket}{low}, {upper}")

    def choice(name: str, options: tuple) -> None:
        if config[name] not in options:
            raise config_error(name, config[name], f"one of {options}")

    choice("dtype", DTYPES)
    choice("corruption", CORRUPTIONS)
    choice("pt_optimizer", PT_OPTIMIZERS)
    choice("solver", SOLVERS)
    choice("hvp_mode", hypergrad.HVP_MODES)
    for name in (
        "num_pt_examples",
        "num_features",
        "num_outputs",
        "num_ft_train",
        "num_ft_val",
        "pt_steps_per_meta_step",
        "num_meta_steps",
        "ft_unroll_steps",
        "cg_max_iters",
        "log_every",
    ):
        positive_int(name)
    positive_int("pt_warmup_steps", minimum=0)
    positive_int("neumann_terms", minimum=0)
    number("corrupt_fraction", 0.0, 1.0)
    number("corruption_scale", 0.0)
    number("label_noise", 0.0, open_low=False)
    number("ridge_l2", 0.0, open_low=False)
    number("pt_learning_rate", 0.0)
    number("ft_learning_rate", 0.0)
    number("cg_tol", 0.0, open_low=False)
    number("cg_damping", 0.0, open_low=False)
    number("neumann_alpha", 0.0)
    number("meta_learning_rate", 0.0)
    num_corrupted = round(config.corrupt_fraction * config.num_pt_examples)
    if not 0 < num_corrupted < config.num_pt_examples:
        raise config_error(
            "corrupt_fraction",
            config.corrupt_fraction,
            f"such that at least one of the {config.num_pt_examples} PT examples is clean and "
            f"one corrupted (it gives {num_corrupted} corrupted)",
        )


def make_problem(config: ml_collections.ConfigDict) -> Problem:
    """Draws the regression problem from `config.seed` (numpy only)."""
    rng = np.random.default_rng(config.seed)
    n, d, m = config.num_pt_examples, config.num_features, config.num_outputs
    theta_star = rng.normal(size=(d, m)) / np.sqrt(d)  # so that var((x theta*)_j) = 1

    def draw(num: int) -> tuple[np.ndarray, np.ndarray]:
        x = rng.normal(size=(num, d))
        return x, x @ theta_star + config.label_noise * rng.normal(size=(num, m))

    x_pt, y_pt = draw(n)
    corrupted = np.zeros(n, dtype=bool)
    corrupted[rng.permutation(n)[: round(config.corrupt_fraction * n)]] = True
    if config.corruption == "flip":
        y_pt = np.where(corrupted[:, None], -y_pt, y_pt)
    else:
        y_pt = y_pt + corrupted[:, None] * config.corruption_scale * rng.normal(size=(n, m))
    x_ft_train, y_ft_train = draw(config.num_ft_train)
    x_ft_val, y_ft_val = draw(config.num_ft_val)
    return Problem(
        theta_star=theta_star,
        x_pt=x_pt,
        y_pt=y_pt,
        corrupted=corrupted,
        x_ft_train=x_ft_train,
        y_ft_train=y_ft_train,
        x_ft_val=x_ft_val,
        y_ft_val=y_ft_val,
    )


def make_solver(config: ml_collections.ConfigDict) -> hypergrad.InverseHvpSolver:
    if config.solver == "cg":
        return hypergrad.ConjugateGradient(
            max_iters=config.cg_max_iters, tol=config.cg_tol, damping=config.cg_damping
        )
    if config.solver == "neumann":
        return hypergrad.Neumann(num_terms=config.neumann_terms, alpha=config.neumann_alpha)
    return hypergrad.Identity(alpha=config.neumann_alpha)


def _format_rate(steps_per_sec: float) -> str:
    if not math.isfinite(steps_per_sec):
        return "(tracing)"
    return f"{steps_per_sec:.1f} steps/s"


def run(
    config: ml_collections.ConfigDict,
    *,
    workdir: str | None = None,
    log: Callable[[str], None] | None = print,
) -> DemoResult:
    """Learns per-example weights online and returns how well they flag corrupted examples.

    Args:
      config: see `configs/hypergrad_demo.py` for the fields.
      workdir: directory for TensorBoard summaries; None or "" writes none.
      log: receives one progress line per `config.log_every` meta-steps; None is silent.

    Raises:
      ValueError: a config field is out of range (the message names it).
      FloatingPointError: the FT validation loss or the meta-gradient is not finite.
    """
    validate_config(config)
    problem = make_problem(config)
    dtype = tf.as_dtype(config.dtype)

    def const(a: np.ndarray) -> tf.Tensor:
        return tf.constant(a, dtype)

    x_pt, y_pt = const(problem.x_pt), const(problem.y_pt)
    x_ft_train, y_ft_train = const(problem.x_ft_train), const(problem.y_ft_train)
    x_ft_val, y_ft_val = const(problem.x_ft_val), const(problem.y_ft_val)
    ridge_l2 = tf.constant(config.ridge_l2, dtype)

    theta = tf.Variable(  # pt_params
        tf.zeros([config.num_features, config.num_outputs], dtype), name="theta"
    )
    phi = tf.Variable(tf.zeros([config.num_pt_examples], dtype), name="phi")  # meta_params

    def weights() -> tf.Tensor:
        return 2.0 * tf.sigmoid(phi)

    def squared_errors(x: tf.Tensor, y: tf.Tensor, params) -> tf.Tensor:
        return tf.reduce_sum(tf.square(tf.matmul(x, params) - y), axis=1)  # [num examples]

    def pt_loss_fn() -> tf.Tensor:
        weighted = tf.reduce_mean(weights() * squared_errors(x_pt, y_pt, theta))
        return weighted + ridge_l2 * tf.reduce_sum(tf.square(theta))

    def mse(x: tf.Tensor, y: tf.Tensor, params: list) -> tf.Tensor:
        return tf.reduce_mean(squared_errors(x, y, params[0]))

    # Full-network FT: the FT losses use their params functionally. `ft_params=[theta]`
    # hands over the variable itself; `unroll_finetune` reads it inside its tape, which
    # is what connects v to theta (a copy made before the call would be a constant there).
    def ft_train_loss_fn(params: list, step: int) -> tf.Tensor:
        del step  # the same small FT train set at every unrolled step
        return mse(x_ft_train, y_ft_train, params)

    def ft_val_loss_fn(params: list) -> tf.Tensor:
        return mse(x_ft_val, y_ft_val, params)

    if config.pt_optimizer == "sgd":
        pt_optimizer = tf.keras.optimizers.SGD(config.pt_learning_rate)
    else:
        pt_optimizer = tf.keras.optimizers.Adam(config.pt_learning_rate)
    meta_optimizer = tf.keras.optimizers.Adam(config.meta_learning_rate)
    pt_optimizer.build([theta])
    meta_optimizer.build([phi])
    solver = make_solver(config)
    ft_update_rule = hypergrad.SGD(config.ft_learning_rate)

    def pt_steps(num_steps: tf.Tensor) -> None:
        for _ in tf.range(num_steps):
            with tf.GradientTape(watch_accessed_variables=False) as tape:
                tape.watch(theta)
                loss = pt_loss_fn()
            pt_optimizer.apply_gradients([(tape.gradient(loss, theta), theta)])

    @tf.function
    def warmup(num_steps: tf.Tensor) -> None:
        pt_steps(num_steps)

    @tf.function
    def meta_step() -> dict:
        pt_steps(tf.constant(config.pt_steps_per_meta_step))
        result = hypergrad.meta_gradient(
            pt_loss_fn=pt_loss_fn,
            pt_params=[theta],
            meta_params=[phi],
            ft_train_loss_fn=ft_train_loss_fn,
            ft_val_loss_fn=ft_val_loss_fn,
            ft_params=[theta],
            ft_update_rule=ft_update_rule,
            num_ft_steps=config.ft_unroll_steps,
            solver=solver,
            hvp_mode=config.hvp_mode,
        )
        (meta_grad,) = result.meta_grads
        grad_finite = tf.reduce_all(tf.math.is_finite(meta_grad))
        # A non-finite meta-gradient leaves phi as it was; the host stops the run.
        meta_grad = tf.where(grad_finite, meta_grad, tf.zeros_like(meta_grad))
        meta_optimizer.apply_gradients([(meta_grad, phi)])
        return {
            "ft_val_loss": result.ft_val_loss,
            "solver_residual": result.solver_residual,
            "solver_diverged": result.solver_diverged,
            "meta_grad_finite": grad_finite,
            "weights": weights(),
        }

    if config.pt_warmup_steps:
        warmup(tf.constant(config.pt_warmup_steps))

    writer = tf.summary.create_file_writer(workdir) if workdir else None
    clean = ~problem.corrupted
    total = config.num_meta_steps
    history = [weights().numpy()]
    val_losses, residuals = [], []
    first_done = None  # time when the first (tracing) step finished
    for step in range(1, total + 1):
        out = meta_step()
        w = out["weights"].numpy()
        val_loss = float(out["ft_val_loss"])
        residual = float(out["solver_residual"])
        history.append(w)
        val_losses.append(val_loss)
        residuals.append(residual)
        if not math.isfinite(val_loss) or not bool(out["meta_grad_finite"]):
            raise FloatingPointError(
                f"Meta-step {step}: FT val loss {val_loss} or the meta-gradient is not finite "
                f"(solver residual {residual}). Lower config.meta_learning_rate "
                f"({config.meta_learning_rate}) or config.pt_learning_rate "
                f"({config.pt_learning_rate}), or use config.solver='cg'."
            )
        now = time.perf_counter()
        if first_done is None:
            first_done = now
        # The first step includes tracing; the rate and ETA count from its end.
        rate = (step - 1) / (now - first_done) if step > 1 else float("nan")
        if step % config.log_every and step != total:
            continue
        w_clean, w_corrupt = float(w[clean].mean()), float(w[~clean].mean())
        if log is not None:
            diverged = "  SOLVER DIVERGED" if bool(out["solver_diverged"]) else ""
            log(
                f"meta-step {step:>{len(str(total))}}/{total}  ft_val_loss {val_loss:.4f}  "
                f"w_clean {w_clean:.3f}  w_corrupted {w_corrupt:.3f}  "
                f"residual {residual:.2e}  {_format_rate(rate)}  "
                f"ETA {reporting.format_duration((total - step) / rate)}{diverged}"
            )
        if writer is not None:
            with writer.as_default(step=step):
                tf.summary.scalar("ft_val_loss", val_loss)
                tf.summary.scalar("weights/mean_clean", w_clean)
                tf.summary.scalar("weights/mean_corrupted", w_corrupt)
                tf.summary.scalar("weights/auroc", reporting.auroc(w, clean))
                tf.summary.scalar("solver/residual", residual)
                if math.isfinite(rate):
                    tf.summary.scalar("steps_per_sec", rate)
                tf.summary.histogram("weights/clean", w[clean])
                tf.summary.histogram("weights/corrupted", w[~clean])
    elapsed_after_first = time.perf_counter() - first_done
    if writer is not None:
        writer.flush()
        writer.close()

    final = history[-1]
    return DemoResult(
        weight_history=np.stack(history),
        corrupted=problem.corrupted,
        ft_val_loss_history=np.asarray(val_losses),
        solver_residual_history=np.asarray(residuals),
        mean_weight_clean=float(final[clean].mean()),
        mean_weight_corrupted=float(final[~clean].mean()),
        auroc=reporting.auroc(final, clean),
        ft_val_loss_start=val_losses[0],
        ft_val_loss_end=val_losses[-1],
        steps_per_sec=(total - 1) / elapsed_after_first if total > 1 else float("nan"),
        workdir=workdir or None,
    )
