"""Learns per-example PT weights on a noisy regression and shows corrupted ones fall.

    python -m trainers.hypergrad_demo --config=configs/hypergrad_demo.py --workdir=runs/demo

Prints a progress line per meta-step, then a results table; TensorBoard scalars go
to --workdir (pass --workdir= to write none). Fields of the config are overridden
with --config.<field>=<value>; see configs/hypergrad_demo.py.
"""

import pathlib

from absl import app, flags
from ml_collections import config_flags

from metapt_tf.training import example_weighting_demo

_DEFAULT_CONFIG = pathlib.Path(__file__).resolve().parents[1] / "configs" / "hypergrad_demo.py"

_CONFIG = config_flags.DEFINE_config_file(
    "config", str(_DEFAULT_CONFIG), "Path to the demo's config file.", lock_config=True
)
_WORKDIR = flags.DEFINE_string(
    "workdir", "runs/hypergrad_demo", "Directory for TensorBoard summaries ('' for none)."
)


def results_table(result: example_weighting_demo.DemoResult) -> str:
    """The final markdown table."""
    num_corrupted = int(result.corrupted.sum())
    num_clean = result.corrupted.size - num_corrupted
    rows = [
        (f"mean weight, clean examples ({num_clean})", f"{result.mean_weight_clean:.3f}"),
        (
            f"mean weight, corrupted examples ({num_corrupted})",
            f"{result.mean_weight_corrupted:.3f}",
        ),
        ("AUROC of the weights (clean vs corrupted)", f"{result.auroc:.3f}"),
        ("FT val loss, first meta-step", f"{result.ft_val_loss_start:.4f}"),
        ("FT val loss, last meta-step", f"{result.ft_val_loss_end:.4f}"),
    ]
    rows.insert(0, ("metric", "value"))
    name_width = max(len(name) for name, _ in rows)
    value_width = max(len(value) for _, value in rows)
    lines = [f"| {name:<{name_width}} | {value:>{value_width}} |" for name, value in rows]
    lines.insert(1, f"|{'-' * (name_width + 2)}|{'-' * (value_width + 1)}:|")
    return "\n".join(lines)


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {' '.join(argv[1:])}")
    config = _CONFIG.value
    try:
        example_weighting_demo.validate_config(config)
    except ValueError as e:
        raise app.UsageError(str(e)) from e
    workdir = _WORKDIR.value or None
    result = example_weighting_demo.run(config, workdir=workdir)
    print()
    print(results_table(result))
    print()
    if workdir:
        print(f"TensorBoard logs: {workdir}  (view: tensorboard --logdir {workdir})")
    else:
        print("TensorBoard logs: none (--workdir was empty)")


if __name__ == "__main__":
    app.run(main)
