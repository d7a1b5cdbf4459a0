"""Online meta-pre-training, end to end: meta-PT, baseline, fine-tuning, evaluation, export.

    python -m trainers.meta_pretrain --config=configs/mnist_noisy_labels.py \
        --workdir=runs/mnist_noisy_labels [--config.<field>=<value> ...]

Thin: flags -> a locked config -> one library call. Unknown or invalid config
fields stop the run before any training with a message that names the field
and lists the valid ones. Re-running with the same --workdir resumes from the
last checkpoints.
"""

import importlib.util
import pathlib
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from metapt_tf.training import mnist_experiments, online

_DEFAULT_CONFIG = pathlib.Path(__file__).resolve().parents[1] / "configs" / "mnist_noisy_labels.py"

_CONFIG = config_flags.DEFINE_config_file(
    "config", str(_DEFAULT_CONFIG), "Experiment config file (path[:variant]).", lock_config=True
)
_WORKDIR = flags.DEFINE_string(
    "workdir", None, "Output directory (checkpoints, TensorBoard, results, export)."
)


def _flat_keys(config, prefix="") -> list[str]:
    keys = []
    for key, value in config.items():
        name = f"{prefix}{key}"
        keys.append(name)
        if hasattr(value, "items") and not isinstance(value, dict):
            keys.extend(_flat_keys(value, name + "."))
    return keys


def check_overrides(argv: list[str]) -> str | None:
    """Returns an error message for `--config.<field>` overrides that name no field."""
    path = str(_DEFAULT_CONFIG)
    for i, arg in enumerate(argv):
        if arg.startswith("--config="):
            path = arg.split("=", 1)[1]
        elif arg == "--config" and i + 1 < len(argv):
            path = argv[i + 1]
    file, _, variant = path.partition(":")
    if not pathlib.Path(file).is_file():
        return f"--config: no such config file: {file!r}."
    spec = importlib.util.spec_from_file_location("_config_module", file)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    try:
        config = module.get_config(variant or None) if variant else module.get_config()
    except (TypeError, ValueError) as e:
        return f"--config={path}: {e}"
    valid = _flat_keys(config)
    for arg in argv:
        if arg.startswith("--config."):
            field = arg[len("--config.") :].split("=", 1)[0]
            if field not in valid:
                return f"Unknown config field {field!r} (from {arg!r}). Valid fields: " + ", ".join(
                    valid
                )
    return None


def main(argv: list[str]) -> None:
    # Progress, results and warnings only: TensorFlow's INFO lines (one per
    # checkpoint write) would bury the progress lines.
    logging.set_verbosity(logging.WARNING)
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {' '.join(argv[1:])}")
    if not _WORKDIR.value:
        raise app.UsageError("--workdir is required (where results and checkpoints go).")
    config = _CONFIG.value
    try:
        mnist_experiments.validate_config(config)  # config.experiment included
    except ValueError as e:
        raise app.UsageError(str(e)) from e
    try:
        mnist_experiments.run(config, _WORKDIR.value)
    except online.NonFiniteLossError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    message = check_overrides(sys.argv[1:])
    if message:
        print(f"error: {message}", file=sys.stderr)
        sys.exit(2)
    app.run(main)
