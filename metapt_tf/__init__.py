"""metapt_tf: learn the meta-parameters of pre-training by gradient.

Importing the package pins the Keras flavour: TensorFlow GNN needs Keras 2
(`tf-keras`), so `TF_USE_LEGACY_KERAS=1` is set before TensorFlow is imported.
If TensorFlow was already imported with Keras 3 bound to `tf.keras`, the import
fails with a message that says how to fix it, rather than failing later inside
a TF-GNN layer.
"""

import os
import sys

__version__ = "0.1.0"


class KerasVersionError(ImportError):
    """TensorFlow was imported with Keras 3 before metapt_tf could pin Keras 2."""


def _pin_legacy_keras() -> None:
    value = os.environ.get("TF_USE_LEGACY_KERAS")
    if "tensorflow" not in sys.modules:
        if value not in (None, "1", "true", "True"):
            raise KerasVersionError(
                "metapt_tf needs Keras 2 (tf-keras) because TensorFlow GNN does. "
                f"Received TF_USE_LEGACY_KERAS={value!r}; unset it or set it to 1."
            )
        os.environ["TF_USE_LEGACY_KERAS"] = "1"
        return
    # TensorFlow is already imported: `tf.keras` is bound by now, so check which one.
    import tensorflow as tf

    keras_name = getattr(tf.keras, "__name__", "")
    if not keras_name.startswith("tf_keras"):
        raise KerasVersionError(
            "TensorFlow was imported before metapt_tf with Keras 3 as tf.keras "
            f"(tf.keras is {keras_name!r}), but metapt_tf and "
            "TensorFlow GNN need Keras 2. Fix: `import metapt_tf` before `import tensorflow`, "
            "or set the environment variable TF_USE_LEGACY_KERAS=1 before starting Python."
        )


_pin_legacy_keras()

from metapt_tf import hypergrad  # noqa: E402

__all__ = ["KerasVersionError", "__version__", "hypergrad"]
