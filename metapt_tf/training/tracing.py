"""Tracing the training loops' functions once, without TensorFlow's retracing warning."""

from __future__ import annotations

from collections.abc import Callable

import tensorflow as tf


def traced_once(fn: Callable, *input_signature, autograph: bool = False) -> Callable:
    """`fn` traced once for `input_signature`: a concrete function.

    Every fine-tune or CoTrain run builds its step functions over its own new
    variables, each traced once. Traced through `tf.function.__call__`,
    TensorFlow counts those first traces of new functions made from one
    definition as retracing of one function, and logs its frequent-retracing
    warning after a few runs in one process (a benchmark runs dozens); traced
    explicitly, they are not counted.

    Without AutoGraph by default: `fn` must not use Python control flow on tensors
    (`autograph=True` for one that does; tracing fails loudly otherwise). AutoGraph
    rewrites the source of every function the trace calls (the model's layers, the
    hypergradient library), which took about half of a GIN meta-step's tracing time.
    """
    return tf.function(
        fn, input_signature=list(input_signature), autograph=autograph
    ).get_concrete_function()
