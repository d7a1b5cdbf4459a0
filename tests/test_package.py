"""The package pins Keras 2 (tf-keras) before TensorFlow loads, or says how to fix it."""

import os
import subprocess
import sys

import pytest


def _run(code: str, **env_overrides) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "TF_USE_LEGACY_KERAS"}
    env.update(env_overrides)
    env["TF_CPP_MIN_LOG_LEVEL"] = "3"
    return subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300
    )


def test_import_first_pins_legacy_keras():
    proc = _run(
        "import metapt_tf, os, tensorflow as tf\n"
        "print(os.environ['TF_USE_LEGACY_KERAS'], tf.keras.__name__)"
    )
    assert proc.returncode == 0, proc.stderr
    flag, keras_name = proc.stdout.split()
    assert flag == "1"
    assert keras_name.startswith("tf_keras")


def test_tensorflow_imported_with_keras3_first_fails_with_a_fix():
    proc = _run("import tensorflow as tf\ntf.keras.layers\nimport metapt_tf")
    assert proc.returncode != 0
    assert "KerasVersionError" in proc.stderr
    assert "import metapt_tf` before `import tensorflow`" in proc.stderr
    assert "TF_USE_LEGACY_KERAS=1" in proc.stderr


def test_tensorflow_first_is_fine_when_the_flag_is_set():
    proc = _run(
        "import tensorflow as tf\nimport metapt_tf\nprint(tf.keras.__name__)",
        TF_USE_LEGACY_KERAS="1",
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().startswith("tf_keras")


@pytest.mark.parametrize("value", ["0", "false"])
def test_flag_set_to_keras3_is_rejected(value):
    proc = _run("import metapt_tf", TF_USE_LEGACY_KERAS=value)
    assert proc.returncode != 0
    assert f"Received TF_USE_LEGACY_KERAS='{value}'" in proc.stderr


def test_public_api_names():
    import metapt_tf as mpt

    for name in (
        "hvp",
        "Neumann",
        "AmortizedNeumann",
        "ConjugateGradient",
        "Identity",
        "implicit_hypergradient",
        "unroll_finetune",
        "meta_gradient",
        "MetaGradient",
        "SGD",
        "Momentum",
        "Adam",
    ):
        assert hasattr(mpt.hypergrad, name), name
