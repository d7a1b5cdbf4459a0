"""Vectors over parameter lists, and the checks that keep them aligned.

A "vector" here is a Python list with one entry per parameter (a tensor of the
parameter's shape and dtype). An entry may be `None`: a structural zero, meaning
the quantity does not depend on that parameter at all. Keeping structural zeros
as `None` instead of materialised zeros lets HVPs skip the tangents of
parameters a vector never touches (e.g. the PT head under head-only FT).
"""

from collections.abc import Sequence

import tensorflow as tf

Vector = list


def _name(param, index: int) -> str:
    name = getattr(param, "name", None)
    return f"#{index} ({name})" if name else f"#{index}"


def check_vector(vector, params: Sequence, what: str, allow_none: bool = True) -> list:
    """Validates that `vector` is a list aligned with `params`, returns it as a list.

    Raises:
      TypeError: `vector` is not a list/tuple of tensors.
      ValueError: length, shape or dtype mismatch; the message names the entry.
    """
    if isinstance(vector, tf.Tensor | tf.Variable) or not isinstance(vector, Sequence):
        raise TypeError(
            f"{what} must be a list with one tensor per parameter ({len(params)} entries). "
            f"Received: {type(vector).__name__}."
        )
    vector = list(vector)
    if len(vector) != len(params):
        raise ValueError(
            f"{what} must have one entry per parameter: expected {len(params)} entries "
            f"(shapes {[tuple(p.shape) for p in params]}), received {len(vector)} "
            f"(shapes {[None if u is None else tuple(u.shape) for u in vector]})."
        )
    for i, (u, p) in enumerate(zip(vector, params, strict=True)):
        if u is None:
            if not allow_none:
                raise ValueError(f"{what}[{i}] is None; a tensor shaped like {_name(p, i)}.")
            continue
        u_dtype = getattr(u, "dtype", None)
        if u_dtype is None:
            raise TypeError(f"{what}[{i}] must be a tensor. Received: {type(u).__name__}.")
        if u_dtype.base_dtype != p.dtype.base_dtype:
            raise ValueError(
                f"{what}[{i}] has dtype {u_dtype.base_dtype.name} but parameter "
                f"{_name(p, i)} has dtype {p.dtype.base_dtype.name}; they must match."
            )
        if not p.shape.is_compatible_with(u.shape):
            raise ValueError(
                f"{what}[{i}] has shape {tuple(u.shape)} but parameter {_name(p, i)} has "
                f"shape {tuple(p.shape)}; they must match."
            )
    return vector


def check_params(params, what: str) -> list:
    if isinstance(params, tf.Variable) or not isinstance(params, Sequence):
        raise TypeError(f"{what} must be a list of tf.Variable. Received: {type(params).__name__}.")
    params = list(params)
    if not params:
        raise ValueError(f"{what} must not be empty.")
    for i, p in enumerate(params):
        if not isinstance(p, tf.Variable):
            raise TypeError(
                f"{what}[{i}] must be a tf.Variable (it is differentiated and watched). "
                f"Received: {type(p).__name__}."
            )
    return params


def as_scalar(value, dtype: tf.DType) -> tf.Tensor:
    """A scalar of `dtype`. Python numbers go straight to `dtype`: `tf.cast(0.3, tf.float64)`
    would round 0.3 through float32 first."""
    if isinstance(value, tf.Tensor | tf.Variable):
        return tf.cast(value, dtype)
    return tf.constant(value, dtype)


def _is_one(value) -> bool:
    return isinstance(value, int | float) and value == 1.0


def densify(vector: Sequence, params: Sequence) -> list:
    """Replaces structural zeros by zero tensors shaped like the parameters."""
    return [tf.zeros_like(p) if u is None else u for u, p in zip(vector, params, strict=True)]


def add(a: Sequence, b: Sequence, scale_b=1.0) -> list:
    """a + scale_b * b, entrywise; None + None stays None."""
    out = []
    for x, y in zip(a, b, strict=True):
        if y is None:
            out.append(x)
        elif x is None:
            out.append(y if _is_one(scale_b) else as_scalar(scale_b, y.dtype) * y)
        else:
            out.append(x + (y if _is_one(scale_b) else as_scalar(scale_b, y.dtype) * y))
    return out


def scale(c, a: Sequence) -> list:
    return [None if x is None else as_scalar(c, x.dtype) * x for x in a]


def dot(a: Sequence, b: Sequence, dtype=None):
    terms = [
        tf.reduce_sum(x * y) for x, y in zip(a, b, strict=True) if x is not None and y is not None
    ]
    if not terms:
        return tf.zeros([], dtype=dtype or tf.float32)
    return tf.add_n(terms)


def norm(a: Sequence, dtype=None):
    return tf.sqrt(dot(a, a, dtype=dtype))


def vector_dtype(params: Sequence) -> tf.DType:
    return params[0].dtype.base_dtype
