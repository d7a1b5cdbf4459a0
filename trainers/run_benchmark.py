"""Benchmarks with baselines, end to end: every method, setting and seed, one table.

    python -m trainers.run_benchmark --config=configs/ppi_multitask.py \
        --workdir=runs/ppi_multitask [--config.<field>=<value> ...]
    python -m trainers.run_benchmark --config=configs/ecg_simclr.py --workdir=runs/ecg_simclr

Thin: flags -> a locked config -> one library call (chosen by
`config.experiment`). Unknown or invalid config fields stop the run before any
training with a message naming the field. Re-running with the same --workdir
skips finished runs and resumes unfinished ones from their checkpoints (a
damaged checkpoint is skipped with a warning). Bad data, a non-finite PT loss or
a directory with no usable checkpoint end the run with exit status 1 and one
`error: ...` line.
"""

import pathlib

from absl import app, flags, logging
from ml_collections import config_flags

from metapt_tf.training import ecg_benchmark, ppi_benchmark
from trainers import cli

_DEFAULT_CONFIG = pathlib.Path(__file__).resolve().parents[1] / "configs" / "ppi_multitask.py"
_BENCHMARKS = {"ppi_multitask": ppi_benchmark, "ecg_simclr": ecg_benchmark}

_CONFIG = config_flags.DEFINE_config_file(
    "config", str(_DEFAULT_CONFIG), "Benchmark config file (path[:variant]).", lock_config=True
)
_WORKDIR = flags.DEFINE_string(
    "workdir", None, "Output directory (data, checkpoints, TensorBoard, results, export)."
)


def main(argv: list[str]) -> None:
    logging.set_verbosity(logging.WARNING)
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {' '.join(argv[1:])}")
    if not _WORKDIR.value:
        raise app.UsageError("--workdir is required (where results and checkpoints go).")
    config = _CONFIG.value
    module = _BENCHMARKS.get(config.get("experiment"))
    if module is None:
        raise app.UsageError(
            f"config.experiment must be one of {sorted(_BENCHMARKS)}. "
            f"Received: config.experiment={config.get('experiment')!r}."
        )
    try:
        module.validate_config(config)
    except ValueError as e:
        raise app.UsageError(str(e)) from e
    cli.call_library(lambda: module.run(config, _WORKDIR.value))


if __name__ == "__main__":
    cli.run(main, _DEFAULT_CONFIG)
