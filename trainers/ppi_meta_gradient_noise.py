"""Does the PPI benchmark's meta-gradient rank the task kinds? Samples it at fixed states.

    python -m trainers.ppi_meta_gradient_noise --config=configs/ppi_multitask.py \\
        --workdir=runs/ppi_noise --setting=full --at_pt_steps=200,1200 \\
        --num_samples=256 [--seeds=0] [--test_as_ft_val] [--output=ranking.json] \\
        [--config.<field>=<value> ...]

For each seed: meta-PT's problem and loop settings in --setting, PT with every
task weight at 1, and at each PT step of --at_pt_steps, --num_samples
meta-gradients from fresh batches without meta-updates
(`ppi_benchmark.meta_gradient_ranking`). Prints, per seed and state, the AUROC
of relevant vs harmful and vs irrelevant tasks scored by one sample's ascent
direction of the weights and by the mean over the samples, and per kind the
fractions of tasks whose mean meta-gradient raises ("up") or lowers ("down")
the weight by more than 2 standard errors. --test_as_ft_val takes the FT-val
batches from the test graphs (with one FT head: cross-fitted heads would
train on them). The synthetic dataset is generated into
--workdir/data if missing (the benchmark's own --workdir reuses its dataset).
"""

import pathlib

from absl import app, flags, logging
from ml_collections import config_flags

from metapt_tf.training import ppi_benchmark, reporting
from trainers import cli

_DEFAULT_CONFIG = pathlib.Path(__file__).resolve().parents[1] / "configs" / "ppi_multitask.py"
_CONFIG = config_flags.DEFINE_config_file(
    "config", str(_DEFAULT_CONFIG), "PPI benchmark config (path[:variant]).", lock_config=True
)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory of the dataset (workdir/data).")
_SETTING = flags.DEFINE_enum("setting", "full", ppi_benchmark.SETTINGS, "The FT setting.")
_AT = flags.DEFINE_list("at_pt_steps", ["200", "1200"], "PT steps at which to sample.")
_SAMPLES = flags.DEFINE_integer("num_samples", 256, "Meta-gradients sampled per state.")
_SEEDS = flags.DEFINE_list("seeds", ["0"], "Seeds.")
_TEST_VAL = flags.DEFINE_bool(
    "test_as_ft_val",
    False,
    "FT-val batches from the test graphs instead of the FT-val ones (one FT head).",
)
_OUTPUT = flags.DEFINE_string("output", None, "Also write the rows to this JSON file.")

_COLUMNS = {
    "seed": "seed",
    "setting": "setting",
    "pt_step": "PT step",
    "auroc_harmful_one_sample": "AUROC rel-harm, 1 sample",
    "auroc_harmful_mean": "AUROC rel-harm, mean",
    "auroc_irrelevant_one_sample": "AUROC rel-irr, 1 sample",
    "auroc_irrelevant_mean": "AUROC rel-irr, mean",
    "relevant_up": "relevant up",
    "relevant_down": "relevant down",
    "irrelevant_up": "irrelevant up",
    "irrelevant_down": "irrelevant down",
    "harmful_up": "harmful up",
    "harmful_down": "harmful down",
}


def table(rows: list[dict]) -> str:
    """The rows as a Markdown table."""
    return reporting.markdown_table(
        list(_COLUMNS.values()), [[row[c] for c in _COLUMNS] for row in rows]
    )


def main(argv: list[str]) -> None:
    logging.set_verbosity(logging.WARNING)
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {' '.join(argv[1:])}")
    if not _WORKDIR.value:
        raise app.UsageError("--workdir is required (the dataset goes to workdir/data).")
    config = _CONFIG.value
    cli.require_experiment(config, "ppi_multitask", "a PPI benchmark")
    at = cli.int_list("at_pt_steps", _AT.value)
    seeds = cli.int_list("seeds", _SEEDS.value)

    def sample():
        ppi_benchmark.validate_config(config)
        return ppi_benchmark.meta_gradient_ranking(
            config,
            _WORKDIR.value,
            setting=_SETTING.value,
            at_pt_steps=at,
            num_samples=_SAMPLES.value,
            seeds=seeds,
            test_as_ft_val=_TEST_VAL.value,
        )

    cli.print_rows(cli.call_library(sample), table, _OUTPUT.value)


if __name__ == "__main__":
    cli.run(main, _DEFAULT_CONFIG)
