"""The two-level meta-gradient: HVPs, inverse-HVP solvers, implicit and unrolled parts.

Pure functions over callables and variables; no Keras, flags or file I/O.
"""

from metapt_tf.hypergrad.hessian import (
    DEFAULT_HVP_MODE,
    FORWARD_OVER_REVERSE,
    HVP_MODES,
    REVERSE_OVER_REVERSE,
    hvp,
    make_hvp_fn,
)
from metapt_tf.hypergrad.implicit import (
    ImplicitResult,
    implicit_hypergradient,
    implicit_hypergradient_with_info,
)
from metapt_tf.hypergrad.meta_gradient import MetaGradient, MetaGradientResult, meta_gradient
from metapt_tf.hypergrad.solvers import (
    AmortizedNeumann,
    ConjugateGradient,
    Identity,
    InverseHvpSolver,
    Neumann,
    SolverDivergedError,
    SolveResult,
    top_eigenvalue,
)
from metapt_tf.hypergrad.unroll import (
    SGD,
    Adam,
    AdamState,
    Momentum,
    UnrollResult,
    UpdateRule,
    safe_sqrt,
    unroll_finetune,
)

__all__ = [
    "DEFAULT_HVP_MODE",
    "FORWARD_OVER_REVERSE",
    "HVP_MODES",
    "REVERSE_OVER_REVERSE",
    "SGD",
    "Adam",
    "AdamState",
    "AmortizedNeumann",
    "ConjugateGradient",
    "Identity",
    "ImplicitResult",
    "InverseHvpSolver",
    "MetaGradient",
    "MetaGradientResult",
    "Momentum",
    "Neumann",
    "SolveResult",
    "SolverDivergedError",
    "UnrollResult",
    "UpdateRule",
    "hvp",
    "implicit_hypergradient",
    "implicit_hypergradient_with_info",
    "make_hvp_fn",
    "meta_gradient",
    "safe_sqrt",
    "top_eigenvalue",
    "unroll_finetune",
]
