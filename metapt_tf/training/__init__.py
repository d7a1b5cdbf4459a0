"""Training loops: the online meta-PT loop and the demos built on it.

Library code only: configs come in as `ml_collections.ConfigDict` objects, never
from flags or files.
"""

from metapt_tf.training import example_weighting_demo

__all__ = ["example_weighting_demo"]
