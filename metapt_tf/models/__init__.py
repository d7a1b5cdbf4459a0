"""Keras models: digit backbones and the GIN for ego-graphs and the 1-D ResNet for ECG."""

from metapt_tf.models.digits import digit_backbone
from metapt_tf.models.gin import (
    ConstantEmbedding,
    GINConv,
    TwiceDifferentiableBatchNorm,
    gin_backbone,
    gin_parameter_count,
)
from metapt_tf.models.resnet1d import (
    projection_head,
    resnet1d_backbone,
    resnet1d_parameter_count,
)

__all__ = [
    "ConstantEmbedding",
    "GINConv",
    "TwiceDifferentiableBatchNorm",
    "digit_backbone",
    "gin_backbone",
    "gin_parameter_count",
    "projection_head",
    "resnet1d_backbone",
    "resnet1d_parameter_count",
]
