"""SavedModel export: TF Serving layout, explicit signature, same predictions in a fresh process."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf

from export import export_for_serving, next_version


def _classifier(seed=0):
    tf.keras.utils.set_random_seed(seed)
    model = tf.keras.Sequential(
        [
            tf.keras.layers.Dense(16, activation="relu", input_shape=(8,)),
            tf.keras.layers.Dense(4),
        ]
    )
    return model


def _serving_fn(model):
    def serve(features):
        logits = model(features["pixels"], training=False)
        return {"probabilities": tf.nn.softmax(logits), "logits": logits}

    return serve


def _export(model, base, **kwargs):
    return export_for_serving(
        model,
        _serving_fn(model),
        str(base),
        inputs={"pixels": tf.TensorSpec([None, 8], tf.float32)},
        **kwargs,
    )


def test_layout_and_versions(tmp_path):
    model = _classifier()
    base = tmp_path / "serving"
    assert next_version(str(base)) == 1
    first = _export(model, base)
    second = _export(model, base)
    assert Path(first) == base / "1" and Path(second) == base / "2"
    for path in (first, second):
        assert (Path(path) / "saved_model.pb").is_file()
        assert (Path(path) / "variables").is_dir()
    assert sorted(os.listdir(base)) == ["1", "2"]  # no temporary leftovers
    with pytest.raises(ValueError, match="Export version 2 already exists"):
        _export(model, base, version=2)


def test_fresh_process_predicts_like_the_in_memory_model(tmp_path):
    model = _classifier(seed=1)
    path = _export(model, tmp_path / "serving")
    x = np.random.default_rng(0).normal(size=(5, 8)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    expected = tf.nn.softmax(model(x)).numpy()
    script = textwrap.dedent(
        f"""
        import json, numpy as np, tensorflow as tf
        loaded = tf.saved_model.load({path!r})
        fn = loaded.signatures["serving_default"]
        out = fn(pixels=tf.constant(np.load({str(tmp_path / "x.npy")!r})))
        print(json.dumps({{k: v.numpy().tolist() for k, v in out.items()}}))
        """
    )
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    proc = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    outputs = json.loads(proc.stdout.strip().splitlines()[-1])
    assert set(outputs) == {"probabilities", "logits"}
    np.testing.assert_allclose(np.array(outputs["probabilities"]), expected, rtol=1e-5, atol=1e-6)


def test_saved_model_cli_lists_the_signature(tmp_path):
    path = _export(_classifier(), tmp_path / "serving")
    cli = Path(sys.executable).parent / "saved_model_cli"
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    proc = subprocess.run(
        [str(cli), "show", "--all", "--dir", path],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    text = proc.stdout
    assert "signature_def['serving_default']" in text
    assert "inputs['pixels']" in text
    assert "outputs['probabilities']" in text
    assert "shape: (-1, 8)" in text


def test_bad_arguments(tmp_path):
    model = _classifier()
    with pytest.raises(ValueError, match="non-empty dict of name -> tf.TensorSpec"):
        export_for_serving(model, _serving_fn(model), str(tmp_path), inputs={})
    with pytest.raises(TypeError, match=r"inputs\['pixels'\] must be a tf.TensorSpec"):
        export_for_serving(model, _serving_fn(model), str(tmp_path), inputs={"pixels": (8,)})
    with pytest.raises(ValueError, match="serving_fn must return a non-empty dict"):
        export_for_serving(
            model,
            lambda f: model(f["pixels"]),
            str(tmp_path),
            inputs={"pixels": tf.TensorSpec([None, 8], tf.float32)},
        )
    assert not any(p.name.startswith(".tmp") for p in tmp_path.iterdir())
