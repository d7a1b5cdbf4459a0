"""What the training binaries' command lines share: start-up, integer lists, library errors.

Each binary stays thin (flags -> a locked config -> one library call); this
module holds the steps they all take around that call, so that a change to
one (an error type the library gains, the report's JSON) reaches every binary.
"""

import json
import pathlib
import sys
from collections.abc import Callable, Sequence

from absl import app

from metapt_tf.data import mnist
from metapt_tf.training import online
from trainers.config_overrides import check_overrides

# The library's errors for bad data, a diverged run or an unusable checkpoint:
# a binary reports them as one `error: ...` line and exit status 1.
LIBRARY_ERRORS = (
    online.NonFiniteLossError,
    online.CheckpointRestoreError,
    mnist.DigitsUnavailableError,
    FloatingPointError,
    FileNotFoundError,
    ValueError,  # bad data (named by the data layer); config errors are caught before
)


def run(main: Callable[[list[str]], None], default_config: pathlib.Path) -> None:
    """Checks the --config.<field> overrides against the config file, then runs `main`."""
    message = check_overrides(sys.argv[1:], default_config)
    if message:
        print(f"error: {message}", file=sys.stderr)
        sys.exit(2)
    app.run(main)


def require_experiment(config, experiment: str, what: str) -> None:
    """Raises a usage error unless `config.experiment` is `experiment` (`what` names it)."""
    if config.get("experiment") != experiment:
        raise app.UsageError(
            f"--config must be {what} config (experiment {experiment!r}). "
            f"Received: config.experiment={config.get('experiment')!r}."
        )


def int_list(name: str, values: Sequence[str] | None) -> list[int] | None:
    """The integers of a list flag (None stays None); a usage error names the flag."""
    if values is None:
        return None
    try:
        return [int(v) for v in values]
    except ValueError as e:
        raise app.UsageError(f"--{name} takes integers: {e}") from e


def call_library(fn: Callable[[], object]) -> object:
    """`fn()`, or exit status 1 with one `error: ...` line on one of LIBRARY_ERRORS."""
    try:
        return fn()
    except LIBRARY_ERRORS as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)


def print_rows(rows: list[dict], table: Callable[[list[dict]], str], output: str | None) -> None:
    """Prints the rows' table and, with `output`, writes them there as JSON."""
    print(table(rows))
    if output:
        with open(output, "w") as f:
            json.dump(rows, f, indent=1)
        print(f"Rows: {output}")
