"""Meta-parameters phi: stored unconstrained, mapped to weights or distributions."""

from metapt_tf.meta_params.ecg_augment import (
    AugmentationPipeline,
    LearnedMask,
    LearnedNoise,
    TimeWarp,
    additive_noise,
    random_lead_mask,
)
from metapt_tf.meta_params.weights import (
    CategoricalDistribution,
    ExampleWeights,
    TaskWeights,
)

__all__ = [
    "AugmentationPipeline",
    "CategoricalDistribution",
    "ExampleWeights",
    "LearnedMask",
    "LearnedNoise",
    "TaskWeights",
    "TimeWarp",
    "additive_noise",
    "random_lead_mask",
]
