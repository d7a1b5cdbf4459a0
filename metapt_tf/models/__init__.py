"""Keras models: digit backbones (and, later, the GIN and the 1-D ResNet)."""

from metapt_tf.models.digits import digit_backbone

__all__ = ["digit_backbone"]
