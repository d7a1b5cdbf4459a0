"""The fault suite's cases as pytest tests: the code `python -m tests.reliability.fault_suite` runs.

One test per case; a case fails when any of its injected faults was not survived
as the rule for it says, and the message lists which and why.
"""

import pytest
from fault_suite import CASES, run_case  # same directory (pytest puts it on sys.path)


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """One directory for every case, so that the MNIST reference run is made once."""
    return tmp_path_factory.mktemp("faults")


@pytest.mark.parametrize("case", CASES, ids=[c.__name__.removeprefix("case_") for c in CASES])
def test_fault_case(case, workspace):
    result = run_case(case, workspace)
    assert result.tried >= 3, f"{result.case}: only {result.tried} faults tried"
    assert result.survived == result.tried, (
        f"{result.case}: {result.survived}/{result.tried} survived\n{result.failures()}"
    )
    assert result.records_lost == 0, f"{result.case}: {result.records_lost} records lost"
