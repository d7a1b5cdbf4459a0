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

import pathlib

from absl import app, flags, logging
from ml_collections import config_flags

from metapt_tf.training import ecg_benchmark, reporting
from trainers import cli

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
    cli.require_experiment(config, "ecg_simclr", "an ECG benchmark")
    at = cli.int_list("at_pt_steps", _AT.value)
    seeds = cli.int_list("seeds", _SEEDS.value)

    def sample():
        ecg_benchmark.validate_config(config)
        return ecg_benchmark.meta_gradient_noise(
            config, n=_N.value, at_pt_steps=at, num_samples=_SAMPLES.value, seeds=seeds
        )

    cli.print_rows(cli.call_library(sample), table, _OUTPUT.value)


if __name__ == "__main__":
    cli.run(main, _DEFAULT_CONFIG)
