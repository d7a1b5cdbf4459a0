"""Keras models: digit backbones and the GIN for ego-graphs (and, later, the 1-D ResNet)."""

from metapt_tf.models.digits import digit_backbone
from metapt_tf.models.gin import (
    ConstantEmbedding,
    GINConv,
    TwiceDifferentiableBatchNorm,
    gin_backbone,
    gin_parameter_count,
)

__all__ = [
    "ConstantEmbedding",
    "GINConv",
    "TwiceDifferentiableBatchNorm",
    "digit_backbone",
    "gin_backbone",
    "gin_parameter_count",
]
