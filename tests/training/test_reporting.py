"""Results tables, results.json / results.md, PNG figures and the TensorBoard heatmap."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from metapt_tf.training import reporting

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _read_png(path: str) -> np.ndarray:
    import matplotlib.image

    with open(path, "rb") as f:
        assert f.read(8) == PNG_SIGNATURE
    return matplotlib.image.imread(path)


# ---------------------------------------------------------------------------
# markdown_table


def test_markdown_table_aligns_numbers_right_and_text_left():
    table = reporting.markdown_table(
        ["method", "AUROC", "steps"],
        [["meta-PT", 0.98765, 400], ["uniform | baseline", np.float32(0.5), np.int64(12)]],
    )
    lines = table.splitlines()
    assert table.endswith("\n")
    assert lines == [
        "| method              |  AUROC | steps |",
        "| ------------------- | -----: | ----: |",
        "| meta-PT             | 0.9877 |   400 |",
        "| uniform \\| baseline |    0.5 |    12 |",
    ]


def test_markdown_table_pads_to_equal_widths():
    table = reporting.markdown_table(["a", "b"], [[1.0, "x"], [123456.0, "longer text"]])
    lengths = {len(line) for line in table.splitlines()}
    assert len(lengths) == 1


@pytest.mark.parametrize(
    "value, text",
    [
        (0, "0"),
        (12345678, "12345678"),
        (0.0, "0"),
        (0.123456, "0.1235"),
        (1234.5678, "1235"),
        (2.0, "2"),
        (1.5e-5, "1.500e-05"),
        (3.2e7, "3.200e+07"),
        (-0.25, "-0.25"),
        (float("nan"), "nan"),
        (float("-inf"), "-inf"),
        (np.float32(0.1), "0.1"),
    ],
)
def test_format_number(value, text):
    assert reporting.format_number(value) == text


def test_markdown_table_mixed_column_is_text_and_none_is_blank():
    table = reporting.markdown_table(["x", "y"], [[1, None], ["n/a", 2.5], [True, None]])
    assert table.splitlines() == [
        "| x    |   y |",
        "| ---- | --: |",
        "| 1    |     |",
        "| n/a  | 2.5 |",
        "| True |     |",
    ]


def test_markdown_table_rejects_a_short_row():
    with pytest.raises(ValueError, match=r"len\(headers\)=3, but len\(rows\[1\]\)=2"):
        reporting.markdown_table(["a", "b", "c"], [[1, 2, 3], [1, 2]])


def test_markdown_table_rejects_no_headers():
    with pytest.raises(ValueError, match="headers"):
        reporting.markdown_table([], [])


# ---------------------------------------------------------------------------
# write_results


def test_write_results_round_trips_numpy_types(tmp_path):
    results = {
        "auroc": np.float32(0.875),
        "steps": np.int64(400),
        "converged": np.bool_(True),
        "weights": np.array([[0.5, 1.5], [2.0, 0.25]], dtype=np.float32),
        "mask": np.array([True, False]),
        "curve": (np.arange(3), [np.float64(1.0), 2.0, float("nan")]),
        "nested": {"name": "meta-PT", 3: np.int32(7)},
        "workdir": tmp_path,
    }
    table = reporting.markdown_table(["auroc"], [[results["auroc"]]])

    paths = reporting.write_results(str(tmp_path / "out"), results, table)

    assert paths == {
        "json": str(tmp_path / "out" / "results.json"),
        "markdown": str(tmp_path / "out" / "results.md"),
    }
    with open(paths["json"], encoding="utf-8") as f:
        loaded = json.load(f)
    assert loaded == {
        "auroc": 0.875,
        "steps": 400,
        "converged": True,
        "weights": [[0.5, 1.5], [2.0, 0.25]],
        "mask": [True, False],
        "curve": [[0, 1, 2], [1.0, 2.0, None]],
        "nested": {"name": "meta-PT", "3": 7},
        "workdir": str(tmp_path),
    }
    assert type(loaded["steps"]) is int
    with open(paths["markdown"], encoding="utf-8") as f:
        assert f.read() == table
    # No temporary files left behind.
    assert sorted(os.listdir(tmp_path / "out")) == ["results.json", "results.md"]
    # Readable like any file the process creates (the umask decides), not private.
    umask = os.umask(0)
    os.umask(umask)
    assert os.stat(paths["json"]).st_mode & 0o777 == 0o666 & ~umask


def test_write_results_replaces_previous_files(tmp_path):
    reporting.write_results(str(tmp_path), {"a": 1}, "old")
    paths = reporting.write_results(str(tmp_path), {"a": 2}, "new")
    with open(paths["json"], encoding="utf-8") as f:
        assert json.load(f) == {"a": 2}
    with open(paths["markdown"], encoding="utf-8") as f:
        assert f.read() == "new\n"


def test_write_results_names_the_entry_it_cannot_convert(tmp_path):
    with pytest.raises(TypeError, match=r"results\['run'\]\['fn'\]: cannot be written to JSON"):
        reporting.write_results(str(tmp_path), {"run": {"fn": print}}, "")
    assert not (tmp_path / "results.json").exists()


def test_to_jsonable_rejects_string_arrays():
    with pytest.raises(TypeError, match=r"results\['labels'\].*dtype <U1"):
        reporting.to_jsonable({"labels": np.array(["a", "b"])})


# ---------------------------------------------------------------------------
# PNG figures


def test_plot_distribution_writes_a_png(tmp_path):
    labels = ["identity", "rotate", "shift", "noise"]
    path = reporting.plot_distribution(
        str(tmp_path / "figs" / "dist.png"),
        learned=np.array([0.1, 0.5, 0.3, 0.1]),
        optimal=np.array([0.0, 0.6, 0.4, 0.0]),
        labels=labels,
        title="augmentation distribution",
    )
    assert path == str(tmp_path / "figs" / "dist.png")
    image = _read_png(path)
    assert image.ndim == 3 and image.shape[2] in (3, 4)
    assert 200 <= image.shape[0] <= 1000 and 300 <= image.shape[1] <= 1500
    assert image.std() > 0.01  # something was drawn


def test_plot_weight_histograms_writes_a_png(tmp_path):
    rng = np.random.default_rng(0)
    weights = np.concatenate([rng.normal(1.3, 0.1, 80), rng.normal(0.3, 0.1, 20)])
    mask = np.arange(100) >= 80
    path = reporting.plot_weight_histograms(str(tmp_path / "w.png"), weights, mask, "weights")
    image = _read_png(path)
    assert image.shape[:2] == (350, 500)


def test_plot_weight_histograms_accepts_a_01_mask_and_an_empty_group(tmp_path):
    path = reporting.plot_weight_histograms(
        str(tmp_path / "w.png"), [1.0, 1.1, 0.9], np.zeros(3, np.int64), "all clean"
    )
    assert _read_png(path).shape[:2] == (350, 500)


def test_plot_curves_writes_a_png(tmp_path):
    steps = np.arange(50)
    path = reporting.plot_curves(
        str(tmp_path / "curves.png"),
        {"pt_loss": (steps, np.exp(-steps / 10)), "ft_val_loss": (steps[::5], steps[::5] * 0.01)},
        title="losses",
        ylabel="loss",
    )
    assert _read_png(path).shape[:2] == (350, 550)


def test_figures_do_not_change_the_pyplot_backend(tmp_path):
    code = (
        "import matplotlib; matplotlib.use('svg');"
        "from metapt_tf.training import reporting;"
        f"reporting.plot_curves({str(tmp_path / 'c.png')!r}, {{'a': ([0, 1], [1, 0])}}, 't', 'y');"
        "print(matplotlib.get_backend())"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120
    )
    assert out.stdout.strip() == "svg"


def test_importing_the_module_does_not_import_matplotlib():
    code = "import sys; from metapt_tf.training import reporting;print('matplotlib' in sys.modules)"
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120
    )
    assert out.stdout.strip() == "False"


def test_plot_distribution_names_mismatched_lengths(tmp_path):
    with pytest.raises(
        ValueError,
        match=r"learned, optimal and labels must have the same length\. "
        r"Received: len\(learned\)=3, len\(optimal\)=2, len\(labels\)=3",
    ):
        reporting.plot_distribution(
            str(tmp_path / "d.png"), [0.2, 0.3, 0.5], [0.5, 0.5], ["a", "b", "c"], "t"
        )
    assert not (tmp_path / "d.png").exists()


def test_plot_weight_histograms_names_mismatched_lengths(tmp_path):
    with pytest.raises(ValueError, match=r"len\(weights\)=4, len\(noisy_mask\)=3"):
        reporting.plot_weight_histograms(
            str(tmp_path / "w.png"), np.ones(4), np.array([True, False, True]), "t"
        )


def test_plot_weight_histograms_rejects_a_non_boolean_mask(tmp_path):
    with pytest.raises(ValueError, match="noisy_mask must be boolean"):
        reporting.plot_weight_histograms(str(tmp_path / "w.png"), np.ones(2), [0.5, 2.0], "t")


def test_plot_curves_names_the_mismatched_curve(tmp_path):
    with pytest.raises(
        ValueError,
        match=r"curves\['ft_val_loss'\] needs 1-D steps and values of the same length. "
        r"Received: steps with shape \(3,\), values with shape \(2,\)",
    ):
        reporting.plot_curves(
            str(tmp_path / "c.png"),
            {"pt_loss": ([0, 1], [1.0, 0.5]), "ft_val_loss": ([0, 1, 2], [1.0, 0.5])},
            "t",
            "loss",
        )
    with pytest.raises(ValueError, match="at least one curve"):
        reporting.plot_curves(str(tmp_path / "c.png"), {}, "t", "loss")


# ---------------------------------------------------------------------------
# distribution_image


def test_distribution_image_shape_dtype_and_range():
    history = np.full((41, 5), 0.2)
    history[-1] = [0.0, 0.0, 1.0, 0.0, 0.0]
    image = reporting.distribution_image(history)
    # 5 bins of 8 rows; 41 records repeated ceil(128 / 41) = 4 times.
    assert image.shape == (1, 40, 164, 3)
    assert image.dtype == np.uint8
    # Largest entry -> viridis yellow; zero -> viridis purple.
    np.testing.assert_array_equal(image[0, 2 * 8, -1], [253, 231, 37])
    np.testing.assert_array_equal(image[0, 0, -1], [68, 1, 84])
    # All records before the last are uniform, so those columns are one colour.
    assert len(np.unique(image[0, :, :160].reshape(-1, 3), axis=0)) == 1


def test_distribution_image_subsamples_long_histories():
    image = reporting.distribution_image(np.random.default_rng(0).random((5000, 3)))
    assert image.shape == (1, 24, 512, 3)


def test_distribution_image_feeds_tf_summary_image(tmp_path):
    import tensorflow as tf

    image = reporting.distribution_image(np.eye(4)[[0, 1, 2, 3, 3, 3]])
    writer = tf.summary.create_file_writer(str(tmp_path))
    with writer.as_default():
        assert tf.summary.image("augmentation_distribution", image, step=0)
    writer.close()
    assert any(name.startswith("events.out.tfevents") for name in os.listdir(tmp_path))


@pytest.mark.parametrize(
    "history, match",
    [
        (np.ones(4), r"shape \[T, K\].*Received: shape \(4,\)"),
        (np.ones((0, 3)), r"Received: shape \(0, 3\)"),
        (np.array([[0.5, -0.1]]), "non-negative"),
        (np.array([[0.5, np.nan]]), "non-finite entries=1"),
    ],
)
def test_distribution_image_rejects_bad_histories(history, match):
    with pytest.raises(ValueError, match=match):
        reporting.distribution_image(history)


def test_plot_weights_by_group_writes_a_png_and_checks_lengths(tmp_path):
    path = reporting.plot_weights_by_group(
        str(tmp_path / "w.png"), [0.1, 1.9, 1.0, 0.5], ["harmful", "relevant", "x", "harmful"], "t"
    )
    assert open(path, "rb").read()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ValueError, match="same length"):
        reporting.plot_weights_by_group(str(tmp_path / "v.png"), [0.1, 0.2], ["a"], "t")
    with pytest.raises(ValueError, match="must not be empty"):
        reporting.plot_weights_by_group(str(tmp_path / "e.png"), [], [], "t")


@pytest.mark.parametrize(
    "seconds, text",
    [
        (0.4, "0s"),
        (42, "42s"),
        (185, "3m05s"),
        (7620, "2h07m"),
        (float("inf"), "?"),
        (float("nan"), "?"),
    ],
)
def test_format_duration(seconds, text):
    assert reporting.format_duration(seconds) == text
