"""Shared test setup: Keras 2 pinned before TensorFlow loads, quiet logs."""

import logging
import os

import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import metapt_tf  # noqa: E402,F401  (pins Keras 2 before any test imports TensorFlow)


def _check_hvp_against_central_differences(loss_fn, params, vector, rel_tol=1e-2):
    """Both HVP modes equal central differences of the gradient along `vector`.

    The step is small relative to `vector` (larger steps cross ReLU kinks); the
    variables are restored afterwards.
    """
    import numpy as np
    import tensorflow as tf

    from metapt_tf import hypergrad

    def flat(tensors):
        return np.concatenate([np.reshape(tf.convert_to_tensor(t).numpy(), [-1]) for t in tensors])

    def gradient():
        with tf.GradientTape() as tape:
            loss = loss_fn()
        return flat(tape.gradient(loss, params))

    eps = 1e-3 / np.linalg.norm(flat(vector))
    saved = [p.numpy() for p in params]
    grads = []
    try:
        for sign in (1.0, -1.0):
            for p, s, u in zip(params, saved, vector, strict=True):
                p.assign(s + sign * eps * np.asarray(u))
            grads.append(gradient())
    finally:
        for p, s in zip(params, saved, strict=True):
            p.assign(s)
    fd = (grads[0] - grads[1]) / (2 * eps)
    for mode in hypergrad.HVP_MODES:
        hv = flat(hypergrad.hvp(loss_fn, params, vector, mode=mode))
        assert np.all(np.isfinite(hv)), mode
        assert np.linalg.norm(hv - fd) / np.linalg.norm(hv) < rel_tol, mode


@pytest.fixture
def assert_hvp_matches_central_differences():
    """The check above, for tests of models whose losses are differentiated twice."""
    return _check_hvp_against_central_differences


class _Messages(logging.Handler):
    def __init__(self, messages):
        super().__init__(logging.WARNING)
        self.messages = messages

    def emit(self, record):
        self.messages.append(record.getMessage())


@pytest.fixture
def tensorflow_warnings():
    """The messages of the warnings TensorFlow's logger emits during the test (a list)."""
    import tensorflow as tf

    messages = []
    handler = _Messages(messages)
    tf.get_logger().addHandler(handler)
    yield messages
    tf.get_logger().removeHandler(handler)
