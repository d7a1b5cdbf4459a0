"""How noisy is the ECG benchmark's meta-gradient? Samples it at fixed states.

    python -m trainers.ecg_meta_gradient_noise --config=configs/ecg_simclr.py \\
        --n=100 --at_pt_steps=60,120 --num_samples=32 [--seeds=0,1,2] \\
        [--output=noise.json] [--config.<field>=<value> ...]

For each seed: the `simclr_meta` run's data, model and loop settings at N=--n,
PT with the augmentation pipeline fixed at its initial value, and at each PT step
of --at_pt_steps, --num_samples meta-gradients from fresh batches and views
without meta-updates (`ecg_benchmark.meta_gradient_noise`). Prints a table of
each strength's meta-gradient: mean, standard deviation, standard error,
signal-to-noise ratio (mean / sd) and fraction of positive samples; a positive
mean says the FT-val loss falls with a weaker augmentation. --output also
writes the rows as JSON.
"""

import json
import pathlib
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from metapt_tf.training import ecg_benchmark, online, reporting
from trainers.config_overrides import check_overrides

_DEFAULT_CONFIG = pathlib.Path(__file__).resolve().parents[1] / "configs" / "ecg_simclr.py"
_CONFIG = config_flags.DEFINE_config_file(
    "config", str(_DEFAULT_CONFIG), "ECG benchmark config (path[:variant]).", lock_config=True
)
_N = flags.DEFINE_integer("n", 100, "Labelled records N (one of config.num_labelled).")
_AT = flags.DEFINE_list("at_pt_steps", ["60", "120"], "PT steps at which to sample.")
_SAMPLES = flags.DEFINE_integer("num_samples", 32, "Meta-gradients sampled per state.")
_SEEDS = flags.DEFINE_list("seeds", None, "Seeds (default: config.seeds).")
_OUTPUT = flags.DEFINE_string("output", None, "Also write the rows to this JSON file.")

_COLUMNS = ("seed", "n", "pt_step", "parameter", "mean", "sd", "se", "snr", "frac_positive")


def table(rows: list[dict]) -> str:
    """The rows as a Markdown table."""
    return reporting.markdown_table(_COLUMNS, [[row[c] for c in _COLUMNS] for row in rows])


def main(argv: list[str]) -> None:
    logging.set_verbosity(logging.WARNING)
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {' '.join(argv[1:])}")
    config = _CONFIG.value
    if config.get("experiment") != "ecg_simclr":
        raise app.UsageError(
            f"--config must be an ECG benchmark config (experiment 'ecg_simclr'). "
            f"Received: config.experiment={config.get('experiment')!r}."
        )
    try:
        at = [int(t) for t in _AT.value]
        seeds = None if _SEEDS.value is None else [int(s) for s in _SEEDS.value]
    except ValueError as e:
        raise app.UsageError(f"--at_pt_steps and --seeds take integers: {e}") from e
    try:
        ecg_benchmark.validate_config(config)
        rows = ecg_benchmark.meta_gradient_noise(
            config, n=_N.value, at_pt_steps=at, num_samples=_SAMPLES.value, seeds=seeds
        )
    except (online.NonFiniteLossError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    print(table(rows))
    if _OUTPUT.value:
        with open(_OUTPUT.value, "w") as f:
            json.dump(rows, f, indent=1)
        print(f"Rows: {_OUTPUT.value}")


if __name__ == "__main__":
    message = check_overrides(sys.argv[1:], _DEFAULT_CONFIG)
    if message:
        print(f"error: {message}", file=sys.stderr)
        sys.exit(2)
    app.run(main)
