"""Final fine-tuning: full trains a copy of the backbone, linear freezes it."""

import numpy as np
import pytest
import tensorflow as tf

from metapt_tf.models import digit_backbone
from metapt_tf.training import finetune


def _data(n, seed):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 3, size=n)
    x = (rng.normal(size=(n, 6, 6, 1)) + y[:, None, None, None]).astype(np.float32)
    return x, y


@pytest.mark.parametrize("mode", finetune.MODES)
def test_modes_train_the_right_weights_and_leave_the_backbone_alone(mode):
    tf.keras.utils.set_random_seed(0)
    backbone = digit_backbone("mlp", hidden_units=(8,), input_shape=(6, 6, 1))
    before = [w.copy() for w in backbone.get_weights()]
    result = finetune.finetune_and_evaluate(
        backbone,
        _data(60, 0),
        _data(40, 1),
        num_classes=3,
        mode=mode,
        epochs=30,
        learning_rate=1e-2,
    )
    for a, b in zip(before, backbone.get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)
    tuned = result.model.get_layer(index=1).get_weights()  # the backbone copy
    changed = [not np.array_equal(a, b) for a, b in zip(before, tuned, strict=True)]
    assert all(changed) if mode == "full" else not any(changed)
    assert result.test_accuracy > 1 / 3  # the classes are separable


def test_bad_mode_and_empty_split():
    backbone = digit_backbone("mlp", hidden_units=(8,), input_shape=(6, 6, 1))
    with pytest.raises(ValueError, match="mode must be one of"):
        finetune.finetune_and_evaluate(
            backbone, _data(4, 0), _data(4, 1), num_classes=3, mode="partial"
        )
    with pytest.raises(ValueError, match="train must be .* Received lengths 0 and 0"):
        finetune.finetune_and_evaluate(
            backbone, (np.zeros((0, 6, 6, 1)), np.zeros(0)), _data(4, 1), num_classes=3
        )
