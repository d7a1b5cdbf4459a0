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


@pytest.mark.parametrize("mode", finetune.MODES)
def test_finetune_multilabel_on_padded_batches_equals_unpadded(mode):
    # mask_key on one device: padding rows (here garbage) count for nothing; the loss
    # is the mean over the real rows and the test predictions are theirs, in order.
    # The linear probe's features are those of the real rows, in the same batches.
    def make_backbone():
        inputs = tf.keras.Input((5,))
        return tf.keras.Model(inputs, tf.keras.layers.Dense(4, activation="tanh")(inputs))

    def padded(ds, rows):
        def pad(b):
            real = tf.shape(b["y"])[0]
            return {
                "x": tf.concat(
                    [b["x"], tf.fill([rows - real, 5], tf.constant(7.0, tf.float64))], 0
                ),
                "y": tf.concat([b["y"], tf.ones([rows - real, 2], tf.float64)], 0),
                "mask": tf.sequence_mask(real, rows),
            }

        return ds.map(pad)

    tf.keras.backend.set_floatx("float64")
    try:

        def float64(d):
            return {k: tf.cast(v, tf.float64) for k, v in d.items()}

        train, test = _multilabel_data(20, 0).map(float64), _multilabel_data(13, 1).map(float64)
        kwargs = dict(
            num_tasks=2, input_key="x", label_key="y", epochs=2, learning_rate=0.05, mode=mode
        )
        results = []
        for mask_key in (None, "mask"):
            tf.keras.utils.set_random_seed(0)
            backbone = make_backbone()
            tr = train.shuffle(20, seed=0).batch(8)  # 8, 8, 4
            te = test.batch(5)  # 5, 5, 3
            if mask_key:
                tr, te = padded(tr, 8), padded(te, 5)
            result = finetune.finetune_multilabel(
                backbone, make_backbone, tr, te, mask_key=mask_key, **kwargs
            )
            scores, labels = finetune.predict_multilabel(
                result.model, te, input_key="x", label_key="y", mask_key=mask_key
            )
            results.append((result, scores, labels))
    finally:
        tf.keras.backend.set_floatx("float32")
    (plain, plain_scores, plain_labels), (masked, scores, labels) = results
    assert scores.shape == (13, 2)
    np.testing.assert_array_equal(labels, plain_labels)
    np.testing.assert_allclose(scores, plain_scores, rtol=1e-10)
    for a, b in zip(masked.model.get_weights(), plain.model.get_weights(), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-12)
    assert masked.final_train_loss == pytest.approx(plain.final_train_loss, rel=1e-10)
    with pytest.raises(ValueError, match="give both. Received: mask_key=None with shard_fn="):
        finetune.finetune_multilabel(
            None, make_backbone, tr, te, shard_fn=lambda b, r, i: b, **kwargs
        )


class _CountingBackbone(tf.keras.Model):
    """A dense backbone that counts the rows it is called on with training=False."""

    def __init__(self):
        super().__init__()
        self.dense = tf.keras.layers.Dense(8, activation="tanh")
        self.rows = tf.Variable(0, trainable=False)

    def call(self, x, training=False):
        self.rows.assign_add(tf.shape(x)[0])
        return self.dense(x)


def test_linear_finetuning_computes_the_features_once():
    # 50 training rows in batches of 16 for 30 epochs: 120 head updates, but the
    # frozen backbone sees each training row once (plus the test rows once).
    tf.keras.utils.set_random_seed(0)
    backbone = _CountingBackbone()
    backbone(tf.zeros([1, 5]))
    backbone.rows.assign(0)  # a weight: copied into the fine-tuned backbone
    counted = {}
    for mode in finetune.MODES:

        def make_backbone(mode=mode):
            model = _CountingBackbone()
            model(tf.zeros([1, 5]))
            counted[mode] = model
            return model

        result = finetune.finetune_multilabel(
            backbone,
            make_backbone,
            _multilabel_data(50, 0).shuffle(50, seed=0).batch(16),
            _multilabel_data(30, 1).batch(64),
            num_tasks=2,
            input_key="x",
            label_key="y",
            mode=mode,
            epochs=30,
            learning_rate=1e-2,
        )
        assert result.test_auc > 0.7  # 30 test rows; chance is 0.5
    # The first training batch builds the head once in each mode (16 rows).
    assert int(counted["linear"].rows) == 16 + 50 + 30
    assert int(counted["full"].rows) == 16 + 30 * 50 + 30


def test_epochs_for_steps():
    assert finetune.epochs_for_steps(700, 1000, 32) == 22  # 32 batches per epoch: 704
    assert finetune.epochs_for_steps(700, 500, 32) == 44  # 16 per epoch: 704 updates
    assert finetune.epochs_for_steps(1000, 10, 32) == 1000  # one batch per epoch
    assert finetune.epochs_for_steps(2, 100, 10) == 1  # at least one whole epoch
    for kwargs, name in (
        (dict(steps=0, num_examples=10, batch_size=2), "steps"),
        (dict(steps=5, num_examples=0, batch_size=2), "num_examples"),
        (dict(steps=5, num_examples=10, batch_size=0), "batch_size"),
    ):
        with pytest.raises(ValueError, match=f"{name} must be >= 1"):
            finetune.epochs_for_steps(**kwargs)


@pytest.mark.parametrize("mode", finetune.MODES)
def test_repeated_fine_tunes_are_not_taken_for_retracing(mode, tensorflow_warnings):
    # A benchmark fine-tunes many backbones in one process, each with functions of
    # its own traced once; TensorFlow must not warn of retracing after a few.
    def make_backbone():
        inputs = tf.keras.Input((5,))
        return tf.keras.Model(inputs, tf.keras.layers.Dense(4)(inputs))

    for seed in range(7):  # one batch each: every call of a function its first
        data = _multilabel_data(20, seed).batch(20)
        finetune.finetune_multilabel(
            make_backbone(),
            make_backbone,
            data,
            data,
            num_tasks=2,
            input_key="x",
            label_key="y",
            mode=mode,
            epochs=1,
            seed=seed,
        )
    assert not [m for m in tensorflow_warnings if "retracing" in m], tensorflow_warnings
