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


def test_per_task_auc_matches_rank_definition_and_marks_single_class_tasks():
    scores = np.array([[0.1, 0.9, 0.3], [0.4, 0.2, 0.8], [0.35, 0.7, 0.1], [0.8, 0.1, 0.5]])
    labels = np.array([[0, 1, 1], [0, 0, 1], [1, 1, 1], [1, 0, 1]], np.float32)
    aucs = finetune.per_task_auc(scores, labels)
    # Task 0: positives 0.35, 0.8 vs negatives 0.1, 0.4 -> 3 of 4 pairs ordered.
    assert aucs[0] == pytest.approx(0.75)
    assert aucs[1] == pytest.approx(1.0)
    assert np.isnan(aucs[2])  # one class only
    with pytest.raises(ValueError, match="same shape"):
        finetune.per_task_auc(scores, labels[:, :2])


def _multilabel_data(n, seed):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 5)).astype(np.float32)
    y = np.stack([x[:, 0] > 0, x[:, 1] + x[:, 2] > 0], axis=1).astype(np.float32)
    return tf.data.Dataset.from_tensor_slices({"x": x, "y": y})


@pytest.mark.parametrize("mode", finetune.MODES)
def test_finetune_multilabel_learns_and_leaves_the_backbone_alone(mode):
    def make_backbone():
        inputs = tf.keras.Input((5,))
        return tf.keras.Model(inputs, tf.keras.layers.Dense(16, activation="tanh")(inputs))

    tf.keras.utils.set_random_seed(0)
    backbone = make_backbone()
    before = [w.copy() for w in backbone.get_weights()]
    result = finetune.finetune_multilabel(
        backbone,
        make_backbone,
        _multilabel_data(200, 0).shuffle(200, seed=0).batch(32),
        _multilabel_data(200, 1).batch(64),
        num_tasks=2,
        input_key="x",
        label_key="y",
        mode=mode,
        epochs=40,
        learning_rate=1e-2,
    )
    for a, b in zip(before, backbone.get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)
    tuned = result.model.backbone.get_weights()
    changed = [not np.array_equal(a, b) for a, b in zip(before, tuned, strict=True)]
    assert all(changed) if mode == "full" else not any(changed)
    assert result.per_task_auc.shape == (2,)
    assert result.test_auc > 0.85  # both tasks are (nearly) linear in the inputs
    assert result.test_auc == pytest.approx(float(np.mean(result.per_task_auc)))


def test_finetune_multilabel_from_scratch_and_bad_arguments():
    def make_backbone():
        inputs = tf.keras.Input((5,))
        return tf.keras.Model(inputs, tf.keras.layers.Dense(4)(inputs))

    data = _multilabel_data(40, 0).batch(20)
    result = finetune.finetune_multilabel(
        None, make_backbone, data, data, num_tasks=2, input_key="x", label_key="y", epochs=1
    )
    assert 0.0 <= result.test_auc <= 1.0
    with pytest.raises(ValueError, match="mode must be one of"):
        finetune.finetune_multilabel(
            None,
            make_backbone,
            data,
            data,
            num_tasks=2,
            input_key="x",
            label_key="y",
            mode="half",
        )
    with pytest.raises(ValueError, match="epochs must be >= 1"):
        finetune.finetune_multilabel(
            None, make_backbone, data, data, num_tasks=2, input_key="x", label_key="y", epochs=0
        )
