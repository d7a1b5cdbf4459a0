"""The online meta-PT loop on a tiny synthetic problem: it learns, resumes exactly,
skips non-finite meta-gradients and stops on a non-finite PT loss."""

import glob
import os

import ml_collections
import numpy as np
import pytest
import tensorflow as tf

from metapt_tf import hypergrad
from metapt_tf.meta_params import ExampleWeights
from metapt_tf.models import TwiceDifferentiableBatchNorm, digit_backbone
from metapt_tf.training import interfaces, online

N_PT, SHAPE, CLASSES = 96, (6, 6, 1), 3


def _data(seed=0, nan_index=None):
    rng = np.random.default_rng(seed)
    protos = rng.normal(size=(CLASSES,) + SHAPE)
    labels = rng.integers(0, CLASSES, size=N_PT + 64)
    images = (protos[labels] + 0.5 * rng.normal(size=(labels.size,) + SHAPE)).astype(np.float32)
    noisy = labels.copy()
    noisy[:30] = (labels[:30] + 1) % CLASSES  # the first 30 PT labels are wrong
    scale = np.ones(labels.size, np.float32)  # multiplies the PT loss of each example
    if nan_index is not None:
        scale[nan_index] = np.nan
    return images, labels, noisy, scale


def _dataset(arrays, batch, seed, shuffle=True):
    ds = tf.data.Dataset.from_tensor_slices(arrays)
    if shuffle:
        ds = ds.shuffle(len(next(iter(arrays.values()))), seed=seed)
    return ds.repeat().batch(batch, drop_remainder=True)


def _problem(seed=0, nan_index=None, sqrt_weights=False, shuffle=True, lr_scales=None):
    tf.keras.utils.set_random_seed(seed)
    images, labels, noisy, scale = _data(seed, nan_index)
    backbone = digit_backbone("mlp", hidden_units=(16,), input_shape=SHAPE)
    pt_head = tf.keras.layers.Dense(CLASSES)
    pt_head.build((None, 16))
    weights = ExampleWeights(N_PT)
    # With lr_scales: a second meta-parameter, a log-gain on the whole PT loss.
    gain = tf.Variable(0.0, name="log_gain")

    def pt_loss_fn(batch):
        logits = pt_head(backbone(batch["image"], training=True))
        ce = tf.nn.sparse_softmax_cross_entropy_with_logits(batch["label"], logits)
        if sqrt_weights:  # derivative of sqrt at 0 is infinite: a non-finite meta-gradient
            w = tf.sqrt(tf.gather(weights.phi, batch["index"]))
        else:
            w = weights.weights(batch["index"])
        loss = tf.reduce_mean(w * ce * batch["scale"])
        return loss * tf.exp(gain) if lr_scales is not None else loss

    problem = interfaces.MetaPretrainProblem(
        backbone=backbone,
        pt_params=backbone.trainable_variables + pt_head.trainable_variables,
        meta_params=weights.variables_list + ([gain] if lr_scales is not None else []),
        pt_loss_fn=pt_loss_fn,
        num_ft_classes=CLASSES,
        describe_fn=lambda: {"weights": weights.all_weights().numpy()},
        meta_learning_rate_scales=lr_scales,
    )
    weights.gain = gain
    pt = {
        "image": images[:N_PT],
        "label": noisy[:N_PT],
        "index": np.arange(N_PT),
        "scale": scale[:N_PT],
    }
    ft = {"image": images[N_PT:], "label": labels[N_PT:]}
    data = dict(
        pt_data=_dataset(pt, 16, seed, shuffle),
        ft_train_data=_dataset({k: v[:32] for k, v in ft.items()}, 16, seed + 1),
        ft_val_data=_dataset({k: v[32:] for k, v in ft.items()}, 16, seed + 2),
    )
    return problem, weights, data


def _config(**overrides) -> ml_collections.ConfigDict:
    c = online.default_config()
    c.update(
        dict(
            warmup_steps=20,
            pt_steps_per_meta_step=2,
            num_meta_steps=30,
            log_every=5,
            checkpoint_every=5,
            meta_learning_rate=0.1,
            ft_learning_rate=0.05,
            pt_learning_rate=0.01,
            neumann_alpha=0.1,
        )
    )
    c.update(overrides)
    return c


def test_meta_pt_learns_and_logs(tmp_path):
    problem, weights, data = _problem()
    lines = []
    result = online.run(problem, **data, config=_config(), workdir=str(tmp_path), log=lines.append)
    assert result.meta_steps == 30 and result.pt_steps == 20 + 60
    assert result.skipped_meta_steps == 0
    w = weights.all_weights().numpy()
    assert not np.allclose(w, 1.0)
    assert w[:30].mean() < w[30:].mean()  # the wrongly labelled examples lose weight
    assert result.history["meta_step"][-1] == 30
    assert len(result.history["weights"]) == len(result.history["meta_step"])
    assert any(line.startswith("meta-step 30/30") and "ETA" in line for line in lines)
    assert glob.glob(str(tmp_path / "events.out.tfevents.*"))
    assert os.path.exists(tmp_path / "history.json")


def test_baseline_runs_the_same_pt_schedule_without_meta_steps(tmp_path):
    problem, weights, data = _problem()
    result = online.run(
        problem, **data, config=_config(meta_enabled=False), workdir=str(tmp_path), log=None
    )
    assert result.pt_steps == 80
    np.testing.assert_array_equal(weights.phi.numpy(), 0.0)


def _three_folds(data, seed=0):
    """`data` with its FT sets replaced by three cross-fitting folds of 16 FT
    examples (`_fold_batches`), each dataset shuffled with its own seed."""
    train, val = _fold_batches()
    data["ft_train_data"] = [_dataset(t, 16, seed + 1 + i) for i, t in enumerate(train)]
    data["ft_val_data"] = [_dataset(v, 8, seed + 4 + i) for i, v in enumerate(val)]
    return data


@pytest.mark.parametrize("cross_fit", [False, True, "folds"])
def test_resumed_run_ends_with_the_same_phi(tmp_path, cross_fit):
    # Cross-fitted, every head and its optimizer state must come back, and with k
    # folds every fold's iterators.
    tf.config.experimental.enable_op_determinism()
    config = _config(ft_cross_fit=bool(cross_fit))
    folds = _three_folds if cross_fit == "folds" else dict
    problem, weights, data = _problem()
    online.run(problem, **folds(data), config=config, workdir=str(tmp_path / "a"), log=None)
    uninterrupted = weights.phi.numpy().copy()

    problem, weights, data = _problem()
    partial = online.run(
        problem,
        **folds(data),
        config=config,
        workdir=str(tmp_path / "b"),
        log=None,
        stop_after_meta_steps=12,
    )
    assert partial.meta_steps == 12
    problem, weights, data = _problem()  # a fresh process would rebuild everything
    resumed = online.run(
        problem, **folds(data), config=config, workdir=str(tmp_path / "b"), log=None
    )
    assert resumed.resumed_from == 12
    np.testing.assert_allclose(weights.phi.numpy(), uninterrupted, atol=1e-6)
    assert resumed.history["meta_step"][0] == 0  # history from before the stop is kept


def test_amortized_neumann_learns_and_its_iterate_resumes(tmp_path):
    # The solver's iterate and power-iteration vector carry over between meta-steps:
    # a resumed run that lost them would take other meta-steps after the stop.
    tf.config.experimental.enable_op_determinism()
    config = _config(solver="amortized_neumann", neumann_alpha="auto", neumann_decay=0.9)
    problem, weights, data = _problem()
    result = online.run(problem, **data, config=config, workdir=str(tmp_path / "a"), log=None)
    assert result.skipped_meta_steps == 0
    w = weights.all_weights().numpy()
    assert w[:30].mean() < w[30:].mean()  # the wrongly labelled examples lose weight
    uninterrupted = weights.phi.numpy().copy()

    problem, weights, data = _problem()
    online.run(
        problem,
        **data,
        config=config,
        workdir=str(tmp_path / "b"),
        log=None,
        stop_after_meta_steps=12,
    )
    problem, weights, data = _problem()
    resumed = online.run(problem, **data, config=config, workdir=str(tmp_path / "b"), log=None)
    assert resumed.resumed_from == 12
    np.testing.assert_allclose(weights.phi.numpy(), uninterrupted, atol=1e-6)


def test_non_finite_meta_gradient_is_skipped_and_counted(tmp_path):
    problem, weights, data = _problem(sqrt_weights=True)
    weights.phi.assign(tf.zeros_like(weights.phi))
    lines = []
    result = online.run(
        problem,
        **data,
        config=_config(num_meta_steps=4, warmup_steps=0, log_every=1),
        workdir=str(tmp_path),
        log=lines.append,
    )
    assert result.skipped_meta_steps == 4
    np.testing.assert_array_equal(weights.phi.numpy(), 0.0)
    assert any("non-finite meta-gradient; update skipped" in line for line in lines)


def test_non_finite_pt_loss_stops_naming_the_step(tmp_path):
    problem, _, data = _problem(nan_index=40, shuffle=False)  # in batch 3 (16 per batch)
    with pytest.raises(online.NonFiniteLossError, match="at PT step 3 "):
        online.run(problem, **data, config=_config(), workdir=str(tmp_path), log=None)


def test_bad_config_fields_are_named():
    c = _config()
    c.solver = "lbfgs"
    with pytest.raises(ValueError, match=r"config.meta.solver must be one of .*'lbfgs'"):
        online.validate_config(c)
    c = _config(pt_steps_per_meta_step=0)
    with pytest.raises(ValueError, match="config.meta.pt_steps_per_meta_step must be an int >= 1"):
        online.validate_config(c)
    with pytest.raises(ValueError, match=r"config.meta.ft_cross_fit must be False with .*pt_head"):
        online.validate_config(_config(head="pt_head", ft_cross_fit=True))
    with pytest.raises(ValueError, match=r"config.meta.neumann_decay must be a number in \[0, 1\)"):
        online.validate_config(_config(neumann_decay=1.0))
    c = ml_collections.ConfigDict(dict(_config()))
    c.bogus = 1
    with pytest.raises(ValueError, match="Unknown field.*config.meta.bogus.*Valid fields: "):
        online.validate_config(c)


def test_meta_gradient_clipping_bounds_each_meta_update(tmp_path):
    problem, weights, data = _problem()
    clip, lr = 1e-3, 10.0
    c = _config(
        num_meta_steps=3,
        warmup_steps=0,
        log_every=1,
        meta_optimizer="sgd",
        meta_learning_rate=lr,
        meta_grad_clip_norm=clip,
    )
    online.run(problem, **data, config=c, workdir=str(tmp_path), log=None)
    # Three SGD steps of at most lr * clip each.
    assert 0 < np.linalg.norm(weights.phi.numpy()) <= 3 * lr * clip * (1 + 1e-5)
    problem, weights, data = _problem()
    c.meta_grad_clip_norm = 0.0
    online.run(problem, **data, config=c, workdir=str(tmp_path / "unclipped"), log=None)
    assert np.linalg.norm(weights.phi.numpy()) > 3 * lr * clip  # the clip did bind


def test_tensorboard_serves_a_runs_scalars(tmp_path):
    from test_tensorboard_server import read_scalars  # same directory: the real server

    problem, _, data = _problem()
    c = _config(num_meta_steps=10, warmup_steps=0, log_every=5)
    result = online.run(problem, **data, config=c, workdir=str(tmp_path), log=None)
    served = read_scalars(str(tmp_path), "ft_val_loss", min_events=2)
    logged = [
        (s, v)
        for s, v in zip(result.history["pt_step"], result.history["ft_val_loss"], strict=True)
        if v is not None
    ]
    assert [s for s, _ in served] == [s for s, _ in logged] == [10, 20]
    np.testing.assert_allclose([v for _, v in served], [v for _, v in logged], rtol=1e-6)


def _normalized_sgd_decay_steps(tmp_path, **overrides):
    """Sizes of the first four meta-updates of phi (normalized SGD at rate 0.4, decaying
    linearly), one meta-step per call, resuming each time; and the last call's result."""
    c = _config(
        num_meta_steps=4,
        warmup_steps=0,
        log_every=1,
        checkpoint_every=1,
        meta_optimizer="normalized_sgd",
        meta_learning_rate=0.4,
        meta_lr_decay="linear",
        **overrides,
    )
    phis, result = [np.zeros(N_PT)], None
    for k in range(1, 5):
        problem, weights, data = _problem()
        result = online.run(
            problem, **data, config=c, workdir=str(tmp_path), log=None, stop_after_meta_steps=k
        )
        phis.append(weights.phi.numpy().copy())
    return [np.linalg.norm(b - a) for a, b in zip(phis, phis[1:], strict=False)], result


def test_normalized_sgd_with_linear_decay_takes_shrinking_steps(tmp_path):
    steps, _ = _normalized_sgd_decay_steps(tmp_path)
    np.testing.assert_allclose(steps, [0.4, 0.3, 0.2, 0.1], rtol=1e-4)


def test_meta_lr_decay_steps_stop_meta_updates_at_the_horizon(tmp_path):
    steps, result = _normalized_sgd_decay_steps(tmp_path, meta_lr_decay_steps=2)
    np.testing.assert_allclose(steps, [0.4, 0.2, 0.0, 0.0], rtol=1e-4, atol=1e-7)
    assert result.meta_steps == 4 and result.pt_steps == 8  # PT goes on past the horizon
    # No meta-gradient is computed past it.
    assert result.history["ft_val_loss"][-2:] == [None, None]
    assert all(v is not None for v in result.history["ft_val_loss"][:-2])
    with pytest.raises(ValueError, match="meta_lr_decay_steps must be 0 unless"):
        online.validate_config(_config(meta_lr_decay_steps=2))
    with pytest.raises(ValueError, match="meta_lr_decay_steps must be an int >= 0"):
        online.validate_config(_config(meta_lr_decay="linear", meta_lr_decay_steps=-1))


def test_reinitialised_head_runs_and_learns(tmp_path):
    problem, weights, data = _problem()
    result = online.run(
        problem, **data, config=_config(head="reinit"), workdir=str(tmp_path), log=None
    )
    assert result.meta_steps == 30 and result.skipped_meta_steps == 0
    assert np.all(np.isfinite(result.history["ft_val_loss"][-1]))
    assert not np.allclose(weights.phi.numpy(), 0.0)


def test_cross_fitted_heads_learn_with_either_head_mode(tmp_path):
    for head in ("persistent", "reinit"):
        problem, weights, data = _problem()
        result = online.run(
            problem,
            **data,
            config=_config(head=head, ft_cross_fit=True),
            workdir=str(tmp_path / head),
            log=None,
        )
        assert result.meta_steps == 30 and result.skipped_meta_steps == 0
        w = weights.all_weights().numpy()
        assert w[:30].mean() < w[30:].mean(), head  # the wrongly labelled examples lose weight


def _ce(backbone, head, batch):
    logits = backbone(batch["image"], training=False) @ head[0] + head[1]
    return tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(batch["label"], logits))


def _head_snapshots(loop):
    """Each head's [kernel, bias] and Adam state, as numpy, head by head."""
    head = [h.numpy() for h in loop.head]
    state = tf.nest.map_structure(lambda v: v.numpy(), loop.head_state)
    return [
        (
            head[2 * k : 2 * k + 2],
            state._replace(m=state.m[2 * k : 2 * k + 2], v=state.v[2 * k : 2 * k + 2]),
        )
        for k in range(loop.num_heads)
    ]


def _check_heads_against_single_heads(loop, problem, pt, train, val):
    """Cross-fitted heads against single heads by the library's meta_gradient and Adam
    rule, head i trained on the fixed batch train[i] and validated on val[i]: the plain
    head step during PT, the meta-step (the mean of the single heads' meta-gradients,
    one implicit solve), its FT-val loss and the persistent heads' new values.
    Returns the single heads' meta-gradients."""
    rule = hypergrad.Adam(0.05)
    loop.pt_steps(3)
    before = _head_snapshots(loop)
    loop.pt_steps(1)  # the PT step, then the head steps on the updated backbone
    for (head, state), batch, got in zip(before, train, _head_snapshots(loop), strict=True):
        head = [tf.constant(h) for h in head]
        with tf.GradientTape() as tape:
            tape.watch(head)
            loss = _ce(problem.backbone, head, batch)
        want, _ = rule.apply(head, tape.gradient(loss, head), state)
        for w, g in zip(want, got[0], strict=True):
            np.testing.assert_allclose(g, w.numpy(), rtol=1e-5, atol=1e-7)

    before = _head_snapshots(loop)
    out = loop._meta_step_fn()
    singles = [
        hypergrad.meta_gradient(
            pt_loss_fn=lambda: problem.pt_loss_fn(pt),
            pt_params=problem.pt_params,
            meta_params=problem.meta_params,
            ft_train_loss_fn=lambda p, step, t=t: _ce(problem.backbone, p, t),
            ft_val_loss_fn=lambda p, v=v: _ce(problem.backbone, p, v),
            ft_params=[tf.constant(h) for h in head],
            ft_update_rule=rule,
            num_ft_steps=1,
            solver=hypergrad.Neumann(num_terms=1, alpha=0.1),
            ft_state=state,
        )
        for (head, state), t, v in zip(before, train, val, strict=True)
    ]
    grads = [r.meta_grads[0].numpy() for r in singles]
    np.testing.assert_allclose(out["grads"][0].numpy(), np.mean(grads, 0), rtol=1e-4, atol=1e-7)
    np.testing.assert_allclose(
        float(out["ft_val_loss"]), np.mean([float(r.ft_val_loss) for r in singles]), rtol=1e-5
    )
    for (head, _), single in zip(_head_snapshots(loop), singles, strict=True):
        for h, w in zip(head, single.ft_params, strict=True):
            np.testing.assert_allclose(h, w.numpy(), rtol=1e-5, atol=1e-7)
    return grads


def _fixed_pt_batch():
    images, _, noisy, scale = _data()
    return {"image": images[:16], "label": noisy[:16], "index": np.arange(16), "scale": scale[:16]}


def test_cross_fitted_heads_are_two_single_heads_with_train_and_val_swapped():
    # The first head trained on FT-train and validated on FT-val, the second the
    # other way round.
    problem, _, _ = _problem()
    loop = online._Loop(problem, **_constant_batch_data(), c=_config(ft_cross_fit=True))
    assert loop.num_heads == 2 and len(loop.head) == 4
    images, labels, _, _ = _data()
    ft = {"image": images[N_PT:][:16], "label": labels[N_PT:][:16]}
    val = {"image": images[N_PT:][16:32], "label": labels[N_PT:][16:32]}
    g_a, g_b = _check_heads_against_single_heads(
        loop, problem, _fixed_pt_batch(), (ft, val), (val, ft)
    )
    assert np.abs(g_a - g_b).max() > 0.1 * np.abs(g_a).max()  # the heads do differ


def _fold_batches():
    """Three folds of 16 FT examples: head i's FT-train batch (the other two folds,
    one fixed batch of 32) and FT-val batch (fold i)."""
    images, labels, _, _ = _data()
    ft = {"image": images[N_PT:][:48], "label": labels[N_PT:][:48]}
    folds = [np.arange(16 * i, 16 * i + 16) for i in range(3)]
    rest = [np.concatenate(folds[:i] + folds[i + 1 :]) for i in range(3)]
    train = [{k: v[r] for k, v in ft.items()} for r in rest]
    val = [{k: v[f] for k, v in ft.items()} for f in folds]
    return train, val


def test_k_cross_fitted_folds_are_k_single_heads_on_their_own_folds():
    # Head i trained on the other two folds and validated on fold i.
    problem, _, _ = _problem()
    pt = _fixed_pt_batch()
    train, val = _fold_batches()
    data = dict(
        pt_data=_dataset(pt, 16, 0, shuffle=False),
        ft_train_data=[_dataset(t, 32, 1, shuffle=False) for t in train],
        ft_val_data=[_dataset(v, 16, 2, shuffle=False) for v in val],
    )
    loop = online._Loop(problem, **data, c=_config(ft_cross_fit=True))
    assert loop.num_heads == 3 and len(loop.head) == 6
    grads = _check_heads_against_single_heads(loop, problem, pt, train, val)
    assert np.abs(grads[0] - grads[1]).max() > 0.1 * np.abs(grads[0]).max()


def test_bad_fold_sequences_are_refused():
    problem, _, data = _problem()
    ds = data["ft_val_data"]
    with pytest.raises(ValueError, match=r"need config.meta.ft_cross_fit=True"):
        online._Loop(problem, data["pt_data"], [ds, ds], [ds, ds], _config())
    with pytest.raises(ValueError, match=r"same length k >= 2.*Received: 2 and 3"):
        online._Loop(problem, data["pt_data"], [ds, ds], [ds] * 3, _config(ft_cross_fit=True))
    with pytest.raises(ValueError, match=r"Received: 2 and a dataset"):
        online._Loop(problem, data["pt_data"], [ds, ds], ds, _config(ft_cross_fit=True))
    with pytest.raises(ValueError, match=r"Received: 1 and 1"):
        online._Loop(problem, data["pt_data"], [ds], [ds], _config(ft_cross_fit=True))


def _noisy_input_problem(seed=0):
    """A PT loss on inputs plus noise drawn per batch by `pt_batch_fn` from a generator
    in `checkpoint_extras`, and a backbone with batch norm (non-trainable state)."""
    problem, weights, data = _problem(seed)
    tf.keras.utils.set_random_seed(seed)
    backbone = tf.keras.Sequential(
        [
            tf.keras.Input(SHAPE),
            tf.keras.layers.Flatten(),
            tf.keras.layers.Dense(16, activation="relu"),
            TwiceDifferentiableBatchNorm(),
        ]
    )
    pt_head = tf.keras.layers.Dense(CLASSES)
    pt_head.build((None, 16))
    generator = tf.random.Generator.from_seed(seed + 100)

    def pt_batch_fn(batch):
        return {**batch, "noise": generator.normal(tf.shape(batch["image"]))}

    def pt_loss_fn(batch):
        logits = pt_head(backbone(batch["image"] + batch["noise"], training=True))
        ce = tf.nn.sparse_softmax_cross_entropy_with_logits(batch["label"], logits)
        return tf.reduce_mean(weights.weights(batch["index"]) * ce)

    problem = interfaces.MetaPretrainProblem(
        backbone=backbone,
        pt_params=backbone.trainable_variables + pt_head.trainable_variables,
        meta_params=weights.variables_list,
        pt_loss_fn=pt_loss_fn,
        num_ft_classes=CLASSES,
        pt_batch_fn=pt_batch_fn,
        checkpoint_extras={"noise_generator": generator},
    )
    return problem, weights, data


def test_pt_batch_fn_draws_and_batch_norm_statistics_resume_exactly(tmp_path):
    tf.config.experimental.enable_op_determinism()
    problem, weights, data = _noisy_input_problem()
    online.run(problem, **data, config=_config(), workdir=str(tmp_path / "a"), log=None)
    uninterrupted = weights.phi.numpy().copy()
    moving_mean = problem.backbone.layers[-1].moving_mean.numpy().copy()
    assert not np.allclose(moving_mean, 0.0)  # PT updated the statistics

    problem, weights, data = _noisy_input_problem()
    online.run(
        problem,
        **data,
        config=_config(),
        workdir=str(tmp_path / "b"),
        log=None,
        stop_after_meta_steps=12,
    )
    problem, weights, data = _noisy_input_problem()
    resumed = online.run(problem, **data, config=_config(), workdir=str(tmp_path / "b"), log=None)
    assert resumed.resumed_from == 12
    np.testing.assert_allclose(weights.phi.numpy(), uninterrupted, atol=1e-6)
    np.testing.assert_allclose(
        problem.backbone.layers[-1].moving_mean.numpy(), moving_mean, atol=1e-6
    )


def test_meta_learning_rate_scales_set_each_variables_rate(tmp_path):
    c = _config(num_meta_steps=1, warmup_steps=0, meta_optimizer="sgd", meta_learning_rate=0.5)
    problem, weights, data = _problem(lr_scales=(1.0, 1.0))
    online.run(problem, **data, config=c, workdir=str(tmp_path / "same"), log=None)
    phi_same, gain_same = weights.phi.numpy(), float(weights.gain.numpy())
    problem, weights, data = _problem(lr_scales=(1.0, 0.01))
    online.run(problem, **data, config=c, workdir=str(tmp_path / "scaled"), log=None)
    # One SGD step from the same state: the same gradient, the gain's step 100x smaller.
    assert abs(gain_same) > 0 and np.abs(phi_same).max() > 0
    np.testing.assert_allclose(weights.phi.numpy(), phi_same, rtol=1e-6)
    np.testing.assert_allclose(float(weights.gain.numpy()), 0.01 * gain_same, rtol=1e-5)


def test_meta_learning_rate_scales_resume_with_every_optimizer_state(tmp_path):
    # Adam at two rates: both optimizers' moments are checkpointed, so a resumed run
    # ends where an uninterrupted one does.
    tf.config.experimental.enable_op_determinism()
    c = _config(num_meta_steps=8, checkpoint_every=2, meta_optimizer="adam")
    scales = (1.0, 0.1)
    problem, weights, data = _problem(lr_scales=scales)
    online.run(problem, **data, config=c, workdir=str(tmp_path / "a"), log=None)
    expected = weights.phi.numpy().copy(), float(weights.gain.numpy())
    problem, weights, data = _problem(lr_scales=scales)
    online.run(
        problem, **data, config=c, workdir=str(tmp_path / "b"), log=None, stop_after_meta_steps=4
    )
    problem, weights, data = _problem(lr_scales=scales)
    resumed = online.run(problem, **data, config=c, workdir=str(tmp_path / "b"), log=None)
    assert resumed.resumed_from == 4
    np.testing.assert_allclose(weights.phi.numpy(), expected[0], atol=1e-6)
    np.testing.assert_allclose(float(weights.gain.numpy()), expected[1], atol=1e-6)


@pytest.mark.parametrize("scales", [(1.0,), (1.0, 0.0), (1.0, True)])
def test_bad_meta_learning_rate_scales_are_refused(scales):
    with pytest.raises(ValueError, match="meta_learning_rate_scales must hold one positive"):
        _problem(lr_scales=scales)


def test_repeated_runs_are_not_taken_for_retracing(tmp_path, tensorflow_warnings):
    # A benchmark runs a loop per method, seed and setting in one process, each with
    # its compiled steps traced once; TensorFlow must not warn of retracing after a few.
    for seed in range(6):
        problem, _, data = _problem(seed)
        config = _config(num_meta_steps=3, warmup_steps=2, log_every=1, checkpoint_every=3)
        result = online.run(
            problem, **data, config=config, workdir=str(tmp_path / str(seed)), log=None
        )
        assert result.meta_steps == 3
    assert not [m for m in tensorflow_warnings if "retracing" in m], tensorflow_warnings


def test_pt_loss_with_python_control_flow_needs_its_own_tf_function(tmp_path):
    # The loop traces its steps without AutoGraph: a Python `if` on a tensor in the PT
    # loss fails at the first trace, with TensorFlow's error naming AutoGraph; the same
    # loss decorated with tf.function (which converts it) runs, and trains like the
    # loss without the branch (never taken here).
    config = _config(num_meta_steps=3, warmup_steps=2, log_every=1, checkpoint_every=3)

    def with_branch(loss_fn):
        def branchy(batch):
            loss = loss_fn(batch)
            if loss > 1e6:
                loss = loss * 0.0
            return loss

        return branchy

    problem, _, data = _problem()
    problem.pt_loss_fn = with_branch(problem.pt_loss_fn)
    with pytest.raises(tf.errors.OperatorNotAllowedInGraphError, match="AutoGraph"):
        online.run(problem, **data, config=config, workdir=str(tmp_path / "plain"), log=None)

    problem, weights, data = _problem()
    online.run(problem, **data, config=config, workdir=str(tmp_path / "reference"), log=None)
    expected = weights.phi.numpy().copy()
    problem, weights, data = _problem()
    problem.pt_loss_fn = tf.function(with_branch(problem.pt_loss_fn))
    online.run(problem, **data, config=config, workdir=str(tmp_path / "decorated"), log=None)
    assert np.abs(expected).max() > 1e-6  # phi moved from 0
    np.testing.assert_allclose(weights.phi.numpy(), expected, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("value, expected", [("auto", "auto"), ("1e-4", 1e-4)])
def test_neumann_alpha_is_a_number_or_auto_in_configs_and_on_the_command_line(value, expected):
    from absl import flags
    from ml_collections import config_flags

    from trainers import config_overrides

    config_file = os.path.join(os.path.dirname(__file__), "..", "..", "configs", "ppi_multitask.py")
    argv = [f"--config={config_file}", f"--config.meta.neumann_alpha={value}"]
    assert config_overrides.check_overrides(argv, config_file) is None
    flag_values = flags.FlagValues()  # as the trainers parse their flags
    config_flags.DEFINE_config_file(
        "config", None, flag_values=flag_values, sys_argv=["trainer", *argv]
    )
    flag_values(["trainer", *argv])
    meta = flag_values.config.meta
    assert meta.neumann_alpha == expected
    online.validate_config(meta)
    solver = online.make_solver(meta)
    assert solver.alpha == expected
    meta.neumann_alpha = "big"
    with pytest.raises(ValueError, match=r"neumann_alpha must be a number > 0 or 'auto'"):
        online.validate_config(meta)


def _constant_batch_data():
    """One fixed batch each for PT, FT-train and FT-val (the FT sets are one batch
    in a reshuffled order, whose mean loss is the same up to rounding)."""
    images, labels, noisy, scale = _data()
    pt = {"image": images[:16], "label": noisy[:16], "index": np.arange(16), "scale": scale[:16]}
    return dict(
        pt_data=_dataset(pt, 16, 0, shuffle=False),
        ft_train_data=_dataset({"image": images[N_PT:][:16], "label": labels[N_PT:][:16]}, 16, 1),
        ft_val_data=_dataset({"image": images[N_PT:][16:32], "label": labels[N_PT:][16:32]}, 16, 2),
    )


def test_meta_gradient_samples_on_fixed_batches_are_one_meta_gradient():
    # Every sample starts from the same state: the persistent FT head (an Adam step at
    # rate 0.05 per meta-step) is put back after each, so fixed batches give one value.
    problem, _, _ = _problem()
    (samples,) = online.sample_meta_gradients(
        problem,
        **_constant_batch_data(),
        config=_config(),
        at_pt_steps=[5],
        num_samples=3,
        log=None,
    )
    assert samples.pt_step == 5 and samples.grads[0].shape == (3, N_PT)
    assert np.abs(samples.grads[0][0]).max() > 0
    for k in (1, 2):
        np.testing.assert_allclose(samples.grads[0][k], samples.grads[0][0], rtol=1e-5, atol=1e-9)
        np.testing.assert_allclose(samples.ft_val_loss[k], samples.ft_val_loss[0], rtol=1e-6)

    # Control: meta-steps without the restore move the head, and the meta-gradient.
    problem, _, _ = _problem()
    loop = online._Loop(problem, **_constant_batch_data(), c=_config())
    loop.pt_steps(5)
    first = loop._meta_step_fn()["grads"][0].numpy()
    second = loop._meta_step_fn()["grads"][0].numpy()
    np.testing.assert_allclose(first, samples.grads[0][0], rtol=1e-5, atol=1e-9)
    assert np.abs(second - first).max() > 1e-3 * np.abs(first).max()


@pytest.mark.parametrize("solver", ["neumann", "amortized_neumann"])
def test_sampling_meta_gradients_leaves_the_state_as_it_was(solver):
    problem, _, data = _noisy_input_problem()
    loop = online._Loop(problem, **data, c=_config(solver=solver))
    loop.pt_steps(4)
    if solver == "amortized_neumann":
        loop._meta_step_fn()  # a non-zero iterate, which every sample starts from
        assert np.abs(loop.solver.variables[0].numpy()).max() > 0
    bn = problem.backbone.layers[-1]
    state = (
        problem.pt_params
        + problem.meta_params
        + loop.head
        + tf.nest.flatten(loop.head_state)
        + loop.solver.variables
        + [bn.moving_mean, bn.moving_variance, loop.meta_step, loop.pt_step]
    )
    before = [v.numpy().copy() for v in state]
    grads, val_losses = loop.sample_meta_gradients(3)
    for var, value in zip(state, before, strict=True):
        np.testing.assert_array_equal(var.numpy(), value, err_msg=var.name)
    assert grads[0].shape == (3, N_PT) and val_losses.shape == (3,)
    # Fresh batches and noise draws per sample: the samples differ.
    assert np.abs(grads[0][1] - grads[0][0]).max() > 0
    # Control: a meta-step's forward passes in training mode move the batch-norm
    # statistics, which sampling puts back.
    loop._meta_step_fn()
    assert not np.array_equal(bn.moving_mean.numpy(), before[-4])


def test_meta_gradient_samples_summary_and_bad_arguments():
    x = np.array([0.3, -0.1, 0.5, 0.2])
    samples = online.MetaGradientSamples(
        pt_step=7, grads=[x.reshape(4, 1, 1), np.zeros((4, 2))], ft_val_loss=np.ones(4)
    )
    got = samples.summary(0)
    sd = np.sqrt(np.sum((x - 0.225) ** 2) / 3)
    np.testing.assert_allclose(
        [got["mean"], got["sd"], got["se"], got["snr"], got["frac_positive"]],
        [0.225, sd, sd / 2, 0.225 / sd, 0.75],
    )
    with pytest.raises(ValueError, match="has 2 entries"):
        samples.summary(1)

    problem, _, data = _problem()
    for kwargs, message in (
        (dict(at_pt_steps=[4, 4], num_samples=2), "increasing"),
        (dict(at_pt_steps=[-1], num_samples=2), "increasing"),
        (dict(at_pt_steps=[], num_samples=2), "increasing"),
        (dict(at_pt_steps=[2], num_samples=1), "num_samples"),
    ):
        with pytest.raises(ValueError, match=message):
            online.sample_meta_gradients(problem, **data, config=_config(), log=None, **kwargs)
