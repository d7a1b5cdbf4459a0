"""PCGrad against its closed form, and the co-training loop (learning, resuming)."""

import os

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")

import numpy as np
import pytest
import tensorflow as tf

from metapt_tf.training import multitask


def _np(grads):
    return np.concatenate([np.ravel(g.numpy()) for g in grads])


def test_pcgrad_conflicting_pair_matches_closed_form():
    g1 = [tf.constant([1.0, 0.0], tf.float64)]
    g2 = [tf.constant([-1.0, 1.0], tf.float64)]
    # g1 - <g1,g2>/|g2|^2 g2 = [0.5, 0.5]; g2 - <g2,g1>/|g1|^2 g1 = [0, 1].
    out = multitask.pcgrad([g1, g2])
    np.testing.assert_allclose(_np(out), [0.5, 1.5], rtol=1e-12)


def test_pcgrad_leaves_agreeing_gradients_summed():
    g1 = [tf.constant([[1.0, 2.0]]), tf.constant([3.0])]
    g2 = [tf.constant([[0.5, 0.1]]), tf.constant([1.0])]
    out = multitask.pcgrad([g1, g2])
    np.testing.assert_allclose(_np(out), _np(g1) + _np(g2), rtol=1e-6)


def test_pcgrad_result_never_conflicts_with_either_task():
    rng = np.random.default_rng(0)
    for _ in range(20):
        a = rng.normal(size=(3, 4))
        b = rng.normal(size=(3, 4))
        g1, g2 = [tf.constant(a[:2]), tf.constant(a[2])], [tf.constant(b[:2]), tf.constant(b[2])]
        out = _np(multitask.pcgrad([g1, g2]))
        flat1, flat2 = _np(g1), _np(g2)
        if flat1 @ flat2 < 0:
            # Each projected gradient is orthogonal to the other task's.
            p1 = flat1 - (flat1 @ flat2) / (flat2 @ flat2) * flat2
            p2 = flat2 - (flat2 @ flat1) / (flat1 @ flat1) * flat1
            np.testing.assert_allclose(out, p1 + p2, atol=1e-12)
            assert p1 @ flat2 == pytest.approx(0.0, abs=1e-10)
        assert out @ flat1 >= -1e-10 and out @ flat2 >= -1e-10


def test_pcgrad_rejects_bad_input():
    with pytest.raises(ValueError, match="at least 2 tasks"):
        multitask.pcgrad([[tf.constant(1.0)]])
    with pytest.raises(ValueError, match="same variables"):
        multitask.pcgrad([[tf.constant(1.0)], [tf.constant(1.0), tf.constant(2.0)]])


def _problem(seed):
    """Linear backbone 3->2, two linear heads; PT and FT regression targets."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(64, 3)).astype(np.float32)
    y_pt = (x @ rng.normal(size=(3, 1))).astype(np.float32)
    y_ft = (x @ rng.normal(size=(3, 1))).astype(np.float32)
    tf.keras.utils.set_random_seed(seed)
    w = tf.Variable(tf.random.normal([3, 2]), name="w")
    h_pt = tf.Variable(tf.random.normal([2, 1]), name="h_pt")
    h_ft = tf.Variable(tf.random.normal([2, 1]), name="h_ft")

    def data(y, s):
        ds = tf.data.Dataset.from_tensor_slices({"x": x, "y": y})
        return ds.shuffle(64, seed=s).repeat().batch(16)

    def loss(head):
        return lambda b: tf.reduce_mean((b["x"] @ w @ head - b["y"]) ** 2)

    return dict(
        shared_params=[w],
        pt_head_params=[h_pt],
        ft_head_params=[h_ft],
        pt_loss_fn=loss(h_pt),
        ft_loss_fn=loss(h_ft),
        pt_data=data(y_pt, 1),
        ft_data=data(y_ft, 2),
    ), (w, h_pt, h_ft)


@pytest.mark.parametrize("use_pcgrad", [False, True])
def test_cotrain_learns_and_resumes_exactly(tmp_path, use_pcgrad):
    def train(workdir, num_steps):
        kwargs, variables = _problem(0)  # a new process rebuilds everything like this
        result = multitask.cotrain(
            **kwargs,
            num_steps=num_steps,
            learning_rate=0.05,
            use_pcgrad=use_pcgrad,
            workdir=str(tmp_path / workdir),
            log=None,
            log_every=10,
            checkpoint_every=10,
        )
        return result, [v.numpy() for v in variables]

    straight, final = train("straight", 60)
    assert straight.steps == 60
    assert straight.history["pt_loss"][-1] < 0.5 * straight.history["pt_loss"][0]
    assert straight.history["ft_loss"][-1] < 0.5 * straight.history["ft_loss"][0]

    train("interrupted", 30)
    resumed, resumed_final = train("interrupted", 60)
    assert resumed.steps == 60 and resumed.history["step"][-1] == 60
    for a, b in zip(final, resumed_final, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)


def test_cotrain_rejects_zero_steps(tmp_path):
    kwargs, _ = _problem(0)
    with pytest.raises(ValueError, match="num_steps"):
        multitask.cotrain(
            **kwargs,
            num_steps=0,
            learning_rate=0.1,
            use_pcgrad=False,
            workdir=str(tmp_path),
            log=None,
        )


def test_repeated_cotrain_runs_are_not_taken_for_retracing(tmp_path, tensorflow_warnings):
    # A benchmark co-trains a new backbone per seed and setting in one process, each
    # run with its own step function traced once; TensorFlow must not warn of
    # retracing after a few runs.
    for seed in range(7):
        kwargs, _ = _problem(seed)
        multitask.cotrain(
            **kwargs,
            num_steps=2,
            learning_rate=0.05,
            use_pcgrad=seed % 2 == 1,
            workdir=str(tmp_path / str(seed)),
            log=None,
            log_every=1,
            checkpoint_every=2,
        )
    assert not [m for m in tensorflow_warnings if "retracing" in m], tensorflow_warnings
