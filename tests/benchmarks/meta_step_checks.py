"""Checks shared by the meta-step benchmarks' tests (the JSON of benchmarks/meta_step_harness)."""

import math

DEFAULT_HVP_MODE = "reverse_over_reverse"  # metapt_tf.hypergrad.DEFAULT_HVP_MODE
GRID = {(n, k) for n in (1, 5) for k in (1, 5)}
CELL_KEYS = {
    "name",
    "neumann_terms",
    "ft_unroll_steps",
    "hvp_mode",
    "median_ms",
    "times_ms",
    "pt_part_median_ms",
    "meta_gradient_median_ms",
    "time_ratio",
    "meta_gradient_in_pt_steps",
    "pt_peak_mib",
    "meta_step_peak_mib",
    "memory_ratio",
    "skipped_meta_steps",
}


def finite_positive(x) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x) and x > 0


def check_timings(data: dict) -> None:
    """The reference and every grid cell (default HVP mode, P = 10): positive times, one
    per repetition, ratios of the reported medians, no skipped meta-steps."""
    reference = data["reference"]
    assert reference["pt_steps"] == 10
    assert len(reference["times_ms"]) == data["config"]["repeats"]
    assert all(finite_positive(t) for t in reference["times_ms"])
    assert finite_positive(reference["median_ms"])
    assert math.isclose(reference["pt_step_ms"], reference["median_ms"] / 10)

    cells = data["cells"]
    assert {(c["neumann_terms"], c["ft_unroll_steps"]) for c in cells} == GRID
    assert len(cells) == len(GRID)
    for c in cells:
        where = c["name"]
        assert set(c) == CELL_KEYS, where
        assert c["hvp_mode"] == DEFAULT_HVP_MODE, where
        assert len(c["times_ms"]) == data["config"]["repeats"], where
        assert all(finite_positive(t) for t in c["times_ms"]), where
        for key in (
            "median_ms",
            "pt_part_median_ms",
            "meta_gradient_median_ms",
            "time_ratio",
            "meta_gradient_in_pt_steps",
        ):
            assert finite_positive(c[key]), (where, key, c[key])
        assert math.isclose(c["time_ratio"], c["median_ms"] / reference["median_ms"]), where
        assert math.isclose(
            c["meta_gradient_in_pt_steps"],
            c["meta_gradient_median_ms"] / reference["pt_step_ms"],
        ), where
        assert c["skipped_meta_steps"] == 0, where
