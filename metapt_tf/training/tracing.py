"""Tracing the training loops' functions once, without TensorFlow's retracing warning."""

from __future__ import annotations

from collections.abc import Callable

import tensorflow as tf


def traced_once(fn: Callable, *input_signature) -> Callable:
    """`fn` traced once for `input_signature`: a concrete function.

    Every fine-tune or CoTrain run builds its step functions over its own new
    variables, each traced once. Traced through `tf.function.__call__`,
    TensorFlow counts those first traces of new functions made from one
    definition as retracing of one function, and logs its frequent-retracing
    warning after a few runs in one process (a benchmark runs dozens); traced
    explicitly, they are not counted.
    """
    return tf.function(fn, input_signature=list(input_signature)).get_concrete_function()
