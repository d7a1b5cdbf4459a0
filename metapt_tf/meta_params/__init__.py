"""Meta-parameters phi: stored unconstrained, mapped to weights or distributions."""

from metapt_tf.meta_params.weights import (
    CategoricalDistribution,
    ExampleWeights,
    TaskWeights,
)

__all__ = ["CategoricalDistribution", "ExampleWeights", "TaskWeights"]
