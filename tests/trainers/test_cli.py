"""The training binaries' shared command-line steps (`trainers.cli`)."""

import json

import ml_collections
import pytest
from absl import app

from metapt_tf.training import online
from trainers import cli


def test_int_list_parses_and_names_the_flag_it_refuses():
    assert cli.int_list("seeds", ["0", "2"]) == [0, 2]
    assert cli.int_list("seeds", None) is None
    with pytest.raises(app.UsageError, match=r"--at_pt_steps takes integers.*'x'"):
        cli.int_list("at_pt_steps", ["1", "x"])


def test_require_experiment():
    config = ml_collections.ConfigDict({"experiment": "ecg_simclr"})
    cli.require_experiment(config, "ecg_simclr", "an ECG benchmark")
    with pytest.raises(
        app.UsageError,
        match=r"must be a PPI benchmark config \(experiment 'ppi_multitask'\)"
        r".*config.experiment='ecg_simclr'",
    ):
        cli.require_experiment(config, "ppi_multitask", "a PPI benchmark")


@pytest.mark.parametrize(
    "error", [online.NonFiniteLossError("pt_loss is nan"), FileNotFoundError("no data")]
)
def test_call_library_turns_library_errors_into_one_line_and_status_1(error, capsys):
    def fail():
        raise error

    with pytest.raises(SystemExit) as exit_info:
        cli.call_library(fail)
    assert exit_info.value.code == 1
    assert capsys.readouterr().err == f"error: {error}\n"
    assert cli.call_library(lambda: 3) == 3


def test_call_library_lets_programming_errors_through():
    def bug():
        raise TypeError("a bug, not bad input")

    with pytest.raises(TypeError, match="a bug"):
        cli.call_library(bug)


def test_print_rows_prints_the_table_and_writes_json(tmp_path, capsys):
    rows = [{"seed": 0, "auroc": 0.75}]
    cli.print_rows(rows, lambda r: f"table of {len(r)}", None)
    assert capsys.readouterr().out == "table of 1\n"
    path = tmp_path / "rows.json"
    cli.print_rows(rows, lambda r: "t", str(path))
    assert json.loads(path.read_text()) == rows
    assert capsys.readouterr().out == f"t\nRows: {path}\n"
