"""Checks of fine-tuning and the ECG benchmark under tf.distribute, run in a fresh
process by test_finetune_distribute.py.

Logical devices must be configured before TensorFlow initialises its devices, so
the checks run here, on 2 logical CPUs, and print one JSON line (prefixed by
RESULT_MARKER) with what they measured:

    python tests/training/finetune_distribute_checks.py WORKDIR
"""

import os

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")  # Keras 2, as metapt_tf requires
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import importlib.util  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import ml_collections  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from metapt_tf import hypergrad  # noqa: E402
from metapt_tf.models import digit_backbone  # noqa: E402
from metapt_tf.training import contrastive, distribute, ecg_benchmark, finetune  # noqa: E402

RESULT_MARKER = "FINETUNE_DISTRIBUTE_CHECK "
ROOT = Path(__file__).resolve().parents[2]
DEVICES = "/cpu:0,/cpu:1"
# Sizes that do not split evenly: batches of 7 (padded to 8 rows), 53 training
# examples (a last batch of 4), 41 test examples (one padded batch of 42 rows).
N_TRAIN, N_TEST, BATCH = 53, 41, 7
# Multi-label: 45 examples in batches of 8 (a last batch of 5), test batches of 16.
ML_TRAIN, ML_TEST, ML_BATCH, ML_TEST_BATCH = 45, 37, 8, 16


def _mirrored() -> tf.distribute.Strategy:
    return distribute.make_strategy(
        ml_collections.ConfigDict({"distribute": "mirrored", "devices": DEVICES})
    )


def _flat(weights) -> list[float]:
    return np.concatenate([np.ravel(w) for w in weights]).tolist()


def _digits(n, seed):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 3, size=n)
    x = rng.normal(size=(n, 6, 6, 1)) + 0.7 * y[:, None, None, None]
    return x, y


def single_label(strategy) -> dict:
    """finetune_and_evaluate without a strategy and under `strategy`, both modes."""
    tf.keras.utils.set_random_seed(0)
    backbone = digit_backbone("mlp", hidden_units=(8,), input_shape=(6, 6, 1))
    out = {"initial": _flat(backbone.get_weights())}
    for mode in finetune.MODES:
        for name, s in (("single", None), ("mirrored", strategy)):
            result = finetune.finetune_and_evaluate(
                backbone,
                _digits(N_TRAIN, 0),
                _digits(N_TEST, 1),
                num_classes=3,
                mode=mode,
                epochs=3,
                batch_size=BATCH,
                learning_rate=1e-2,
                strategy=s,
            )
            out[f"{mode}|{name}"] = {
                "backbone": _flat(result.model.get_layer(index=1).get_weights()),
                "weights": _flat(result.model.get_weights()),
                "test_loss": result.test_loss,
                "test_accuracy": result.test_accuracy,
                "train_accuracy": result.train_accuracy,
                "dtype": result.model.get_weights()[0].dtype.name,
            }
    return out


def _multilabel_data(n, seed):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 5))
    y = np.stack([x[:, 0] > 0, x[:, 1] + x[:, 2] > 0, x[:, 3] > 0.5], axis=1).astype(np.float32)
    return tf.data.Dataset.from_tensor_slices({"x": x, "y": y})


def _make_backbone():
    inputs = tf.keras.Input((5,))
    return tf.keras.Model(inputs, tf.keras.layers.Dense(16, activation="tanh")(inputs))


def multilabel(strategy) -> dict:
    """finetune_multilabel without a strategy and under `strategy`, both modes."""
    tf.keras.utils.set_random_seed(0)
    backbone = _make_backbone()
    out = {"initial": _flat(backbone.get_weights())}
    test = _multilabel_data(ML_TEST, 1).batch(ML_TEST_BATCH)
    for mode in finetune.MODES:
        for name, s in (("single", None), ("mirrored", strategy)):
            result = finetune.finetune_multilabel(
                backbone,
                _make_backbone,
                _multilabel_data(ML_TRAIN, 0).shuffle(ML_TRAIN, seed=3).batch(ML_BATCH),
                test,
                num_tasks=3,
                input_key="x",
                label_key="y",
                mode=mode,
                epochs=3,
                learning_rate=1e-2,
                strategy=s,
            )
            scores, _ = finetune.predict_multilabel(
                result.model, test, input_key="x", label_key="y", strategy=s
            )
            out[f"{mode}|{name}"] = {
                "backbone": _flat(result.model.backbone.get_weights()),
                "weights": _flat(result.model.get_weights()),
                "per_task_auc": result.per_task_auc.tolist(),
                "final_train_loss": result.final_train_loss,
                "scores": scores.tolist(),
            }
    ragged = (
        _multilabel_data(8, 0)
        .batch(4)
        .map(lambda b: {"x": tf.RaggedTensor.from_tensor(b["x"]), "y": b["y"]})
    )
    try:
        finetune.finetune_multilabel(
            None,
            _make_backbone,
            ragged,
            ragged,
            num_tasks=3,
            input_key="x",
            label_key="y",
            epochs=1,
            strategy=strategy,
        )
        out["ragged_error"] = None
    except ValueError as e:
        out["ragged_error"] = str(e)
    return out


def nt_xent(strategy) -> dict:
    """The global NT-Xent loss over 2 replicas against one device: loss, gradient, HVPs
    (both modes), mixed term, and the shard-local loss for contrast."""
    rng = np.random.default_rng(0)
    batch = {k: tf.constant(rng.normal(size=(8, 6))) for k in ("x", "noise_1", "noise_2")}
    w0, s0 = rng.normal(size=(6, 4)), np.array([0.3])
    vector = tf.constant(rng.normal(size=(6, 4)))
    out = {}
    for name, strat in (("single", tf.distribute.get_strategy()), ("mirrored", strategy)):
        with strat.scope():
            w, s = tf.Variable(w0), tf.Variable(s0)  # theta (an encoder) and phi (a noise scale)
        replicas = distribute.Replicas(strat)
        scale = 1.0 / replicas.num_replicas  # each replica's share, as the online loop scales

        def loss_fn(b, loss=contrastive.global_nt_xent_loss, w=w, s=s, scale=scale):
            z1 = tf.tanh(tf.matmul(b["x"] + s * b["noise_1"], w))
            z2 = tf.tanh(tf.matmul(b["x"] + s * b["noise_2"], w))
            return loss(z1, z2, 0.5) * scale

        def replica(b, loss_fn=loss_fn, w=w, s=s, replicas=replicas):
            b = replicas.shard(b)
            with tf.GradientTape(persistent=True) as outer:
                with tf.GradientTape() as inner:
                    loss = loss_fn(b)
                grad = inner.gradient(loss, w)
                inner_product = tf.reduce_sum(grad * vector)
            result = {
                "loss": loss,
                "local_loss": loss_fn(b, contrastive.nt_xent_loss),
                "grad": replicas.all_reduce_sum([grad])[0],
                # The mixed term d/dphi <dL/dtheta, p>, p held constant.
                "mixed": replicas.all_reduce_sum([outer.gradient(inner_product, s)])[0],
            }
            for mode in hypergrad.HVP_MODES:
                hv = hypergrad.hvp(lambda: loss_fn(b), [w], [vector], mode=mode)
                result[mode] = replicas.all_reduce_sum(hv)[0]
            return result

        got = tf.function(lambda b, strat=strat, replica=replica: strat.run(replica, args=(b,)))(
            batch
        )
        out[name] = {
            k: (replicas.sum(v) if "loss" in k else replicas.first(v)).numpy().tolist()
            for k, v in got.items()
        }
    return out


def ecg_run(strategy, workdir: str) -> dict:
    """A short ECG benchmark run (SimCLR meta-PT, full FT, export) under
    meta.distribute='mirrored' on both CPUs."""
    spec = importlib.util.spec_from_file_location("ecg_simclr", ROOT / "configs" / "ecg_simclr.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config("smoke")
    config.methods = ("simclr_meta",)
    config.num_labelled = (10,)
    config.finetune.modes = ("full",)  # linear FT under the strategy is checked above
    config.meta.distribute, config.meta.devices = "mirrored", DEVICES
    start = time.perf_counter()
    results = ecg_benchmark.run(config, workdir, log=None)
    (run,) = results["runs"]
    return {
        "seconds": time.perf_counter() - start,
        "meta_steps": run["meta_steps"],
        "expected_meta_steps": config.meta.num_meta_steps,
        "test_auc": run["test_auc"],
        "warp_scale": run["augment/warp_scale"],
        "export": results["export"],
        "strategy_is_mirrored": distribute.make_strategy(config.meta) is strategy,
    }


def main(workdir: str) -> dict:
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
    strategy = _mirrored()
    out = {"logical_cpus": len(tf.config.list_logical_devices("CPU"))}
    tf.keras.backend.set_floatx("float64")
    try:
        out["single_label"] = single_label(strategy)
        out["multilabel"] = multilabel(strategy)
    finally:
        tf.keras.backend.set_floatx("float32")
    out["nt_xent"] = nt_xent(strategy)
    out["ecg_run"] = ecg_run(strategy, workdir)
    return out


if __name__ == "__main__":
    print(RESULT_MARKER + json.dumps(main(sys.argv[1])), flush=True)
