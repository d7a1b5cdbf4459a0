"""Writes SavedModels that TensorFlow Serving loads as they are.

Layout: `<export_base>/<version>/saved_model.pb` plus `variables/`, with integer
versions; TF Serving serves the highest. Each export is written to a temporary
sibling directory and renamed into place, so a server polling `export_base`
never sees a half-written version.

The `serving_default` signature is built here, not inherited from Keras: a
`tf.function` with an explicit input signature (named inputs) returning a dict
of named outputs. The optimizer is never saved.
"""

import os
import re
import shutil
import tempfile
from collections.abc import Callable, Mapping

import tensorflow as tf

SERVING_DEFAULT = "serving_default"
_VERSION = re.compile(r"^\d+$")


def next_version(export_base: str) -> int:
    """1 + the largest integer version directory under `export_base` (1 if none)."""
    if not tf.io.gfile.isdir(export_base):
        return 1
    versions = [
        int(name.rstrip("/"))
        for name in tf.io.gfile.listdir(export_base)
        if _VERSION.match(name.rstrip("/"))
    ]
    return max(versions, default=0) + 1


def _check_signature(inputs: Mapping[str, tf.TensorSpec]) -> dict[str, tf.TensorSpec]:
    if not isinstance(inputs, Mapping) or not inputs:
        raise ValueError(
            f"inputs must be a non-empty dict of name -> tf.TensorSpec. Received: {inputs!r}."
        )
    specs = {}
    for name, spec in inputs.items():
        if not isinstance(spec, tf.TensorSpec):
            raise TypeError(
                f"inputs[{name!r}] must be a tf.TensorSpec. Received: {type(spec).__name__}."
            )
        if not re.match(r"^[A-Za-z][A-Za-z0-9_]*$", name):
            raise ValueError(
                f"Input names must be identifiers (letters, digits, _). Received: {name!r}."
            )
        specs[name] = tf.TensorSpec(spec.shape, spec.dtype, name=name)
    return specs


def export_for_serving(
    model: tf.Module,
    serving_fn: Callable[[dict[str, tf.Tensor]], Mapping[str, tf.Tensor]],
    export_base: str,
    *,
    inputs: Mapping[str, tf.TensorSpec],
    version: int | None = None,
) -> str:
    """Exports `model` with a `serving_default` signature; returns the version dir.

    Args:
      model: the `tf.Module` (a Keras model is one) whose variables the signature
        reads; it is what gets saved.
      serving_fn: maps a dict of input tensors (keys = `inputs`' names) to a dict
        of named output tensors; it calls `model`.
      export_base: the directory TF Serving watches.
      inputs: name -> `tf.TensorSpec` (use None for the batch dimension).
      version: the version number; by default `next_version(export_base)`.

    Raises:
      ValueError: bad input specs, a non-dict or empty output, or an existing version.
    """
    specs = _check_signature(inputs)
    names = list(specs)
    if version is None:
        version = next_version(export_base)
    if isinstance(version, bool) or not isinstance(version, int) or version < 0:
        raise ValueError(f"version must be an int >= 0. Received: version={version!r}.")
    target = os.path.join(export_base, str(version))
    if tf.io.gfile.exists(target):
        raise ValueError(f"Export version {version} already exists: {target}.")

    def serve(*args):
        outputs = serving_fn(dict(zip(names, args, strict=True)))
        if not isinstance(outputs, Mapping) or not outputs:
            raise ValueError(
                "serving_fn must return a non-empty dict of named output tensors. "
                f"Received: {type(outputs).__name__}."
            )
        return {key: tf.convert_to_tensor(value) for key, value in outputs.items()}

    signature = tf.function(serve, input_signature=[specs[n] for n in names])
    signature.get_concrete_function()  # traced here: a bad serving_fn fails before any write

    tf.io.gfile.makedirs(export_base)
    tmp = tempfile.mkdtemp(prefix=f".tmp-{version}-", dir=export_base)
    try:
        tf.saved_model.save(
            model,
            tmp,
            # The function, not its concrete function: TensorFlow saves a concrete
            # function that reads distributed variables (e.g. batch norm's moving
            # statistics under a multi-worker strategy) only from its tf.function.
            signatures={SERVING_DEFAULT: signature},
            options=tf.saved_model.SaveOptions(experimental_custom_gradients=False),
        )
        os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target
