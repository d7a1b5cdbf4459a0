"""Writes synthetic 12-lead ECGs in PTB-XL's on-disk layout, for the ECG benchmark's ptbxl path.

    python -m trainers.write_synthetic_ptbxl --output_dir=data/ptbxl_synthetic \
      [--num_records=3000 --seed=0]

Writes `make_synthetic_ecg(num_records, seed=seed)` (10 s at 100 Hz) as
ptbxl_database.csv, scp_statements.csv and one wfdb record per row under
records100/ to --output_dir (see `metapt_tf.data.ecg.write_ptbxl_layout`), and
prints what it wrote and the command that runs the ptbxl variant on it. An
--output_dir that already holds a ptbxl_database.csv is refused unless
--overwrite is set.
"""

import shlex
import sys

from absl import app, flags

from metapt_tf.data import ecg

_OUTPUT_DIR = flags.DEFINE_string(
    "output_dir", None, "Directory to write the PTB-XL layout to (created).", required=True
)
_NUM_RECORDS = flags.DEFINE_integer(
    "num_records", 3000, "Synthetic records to write; fold 10 (a tenth) is the test set."
)
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the synthetic records.")
_OVERWRITE = flags.DEFINE_bool(
    "overwrite", False, "Replace a PTB-XL layout already in --output_dir."
)


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {' '.join(argv[1:])}")
    try:
        data = ecg.make_synthetic_ecg(_NUM_RECORDS.value, seed=_SEED.value)
        ecg.write_ptbxl_layout(data, _OUTPUT_DIR.value, overwrite=_OVERWRITE.value)
    except (FileExistsError, ValueError) as e:
        sys.exit(f"write_synthetic_ptbxl: {e}")
    counts = ", ".join(
        f"{name} {int(n)}" for name, n in zip(ecg.SUPERCLASSES, data.labels.sum(0), strict=True)
    )
    print(
        f"Wrote {len(data)} synthetic records (10 s at {data.fs} Hz, seed {_SEED.value}) in "
        f"PTB-XL's layout to {_OUTPUT_DIR.value}: {ecg.PTBXL_DATABASE_CSV}, "
        f"{ecg.SCP_STATEMENTS_CSV} and records100/ ({int(data.is_test.sum())} records in test "
        f"fold {ecg.TEST_FOLD}; labels: {counts})."
    )
    print("Run the ECG benchmark's ptbxl variant on them:")
    print(
        "  python -m trainers.run_benchmark --config=configs/ecg_simclr.py:ptbxl "
        f"--config.data.dir={shlex.quote(_OUTPUT_DIR.value)} --workdir=runs/ptbxl_synthetic"
    )


if __name__ == "__main__":
    app.run(main)
