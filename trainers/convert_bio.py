"""Converts the pretrain-gnns "bio" dataset to the ego-graph TFRecord layout.

    python -m trainers.convert_bio \
      --input=dataset/supervised/processed/geometric_data_processed.pt \
      --output_dir=data/bio --seed=0

Writes schema.pbtxt, pt.tfrecord, ft_train.tfrecord, test.tfrecord and
summary.json to --output_dir (see metapt_tf/data/bio.py for the split), and
prints the summary. Needs the optional extra: pip install 'metapt_tf[bio]'.
"""

import json
import sys

from absl import app, flags

from metapt_tf.data import bio

_INPUT = flags.DEFINE_string(
    "input", None, "The processed bio dataset file (geometric_data_processed.pt).", required=True
)
_OUTPUT_DIR = flags.DEFINE_string(
    "output_dir", None, "Directory for the schema, TFRecord files and summary.", required=True
)
_SEED = flags.DEFINE_integer(
    "seed", 0, "Seed of the split of the human graphs (the reference code's default is 42)."
)
_COMPRESS = flags.DEFINE_bool("compress", False, "Write GZIP-compressed *.tfrecord.gz files.")


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {' '.join(argv[1:])}")
    try:
        summary = bio.convert_bio(
            _INPUT.value, _OUTPUT_DIR.value, seed=_SEED.value, compress=_COMPRESS.value
        )
    except (ImportError, FileNotFoundError, ValueError) as e:
        sys.exit(f"convert_bio: {e}")
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    app.run(main)
