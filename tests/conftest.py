"""Shared test setup: Keras 2 pinned before TensorFlow loads, quiet logs."""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import metapt_tf  # noqa: E402,F401  (pins Keras 2 before any test imports TensorFlow)
