"""Online meta-pre-training, end to end: meta-PT, baseline, fine-tuning, evaluation, export.

    python -m trainers.meta_pretrain --config=configs/mnist_noisy_labels.py \
        --workdir=runs/mnist_noisy_labels [--config.<field>=<value> ...]

Thin: flags -> a locked config -> one library call. Unknown or invalid config
fields stop the run before any training with a message that names the field
and lists the valid ones. Re-running with the same --workdir resumes from the
last checkpoint that restores (a damaged one is skipped with a warning). Bad
data, a non-finite PT loss or a directory with no usable checkpoint end the run
with exit status 1 and one `error: ...` line.
"""

import pathlib

from absl import app, flags, logging
from ml_collections import config_flags

from metapt_tf.training import mnist_experiments
from trainers import cli

_DEFAULT_CONFIG = pathlib.Path(__file__).resolve().parents[1] / "configs" / "mnist_noisy_labels.py"

_CONFIG = config_flags.DEFINE_config_file(
    "config", str(_DEFAULT_CONFIG), "Experiment config file (path[:variant]).", lock_config=True
)
_WORKDIR = flags.DEFINE_string(
    "workdir", None, "Output directory (checkpoints, TensorBoard, results, export)."
)


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
    cli.call_library(lambda: mnist_experiments.run(config, _WORKDIR.value))


if __name__ == "__main__":
    cli.run(main, _DEFAULT_CONFIG)
