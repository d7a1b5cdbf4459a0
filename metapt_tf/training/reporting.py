"""Where a run's results end: a Markdown table, results.json / results.md, PNG figures.

Every file is written atomically (a temporary file in the same directory, then
`os.replace`), so a reader never sees half a file and an interrupted run leaves the
previous version in place.

Figures use matplotlib's Agg canvas directly (`matplotlib.figure.Figure` with
`FigureCanvasAgg`), imported inside the functions that draw: importing this module
needs neither matplotlib nor a display, and drawing never touches pyplot's global
state or the caller's chosen backend.

`distribution_image` is pure numpy: it turns the history of a learned categorical
distribution into an RGB heatmap shaped for `tf.summary.image`.
"""

import io
import json
import math
import os
import uuid
from collections.abc import Mapping, Sequence

import numpy as np

RESULTS_JSON = "results.json"
RESULTS_MD = "results.md"

# matplotlib's "viridis" map sampled at 10 evenly spaced points (low -> high), for
# distribution_image, which interpolates between them.
_VIRIDIS = np.array(
    [
        [68, 1, 84],
        [72, 40, 120],
        [62, 73, 137],
        [49, 104, 142],
        [38, 130, 142],
        [31, 158, 137],
        [53, 183, 121],
        [110, 206, 88],
        [181, 222, 43],
        [253, 231, 37],
    ],
    dtype=np.float64,
)


# ---------------------------------------------------------------------------
# Tables


def _is_number(value) -> bool:
    # bool is an int subclass but reads as a word in a table.
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(
        value, (bool, np.bool_)
    )


def format_number(value) -> str:
    """An int in full; a float to 4 significant digits (scientific when tiny or huge)."""
    if isinstance(value, (int, np.integer)):
        return str(int(value))
    x = float(value)
    if math.isnan(x):
        return "nan"
    if math.isinf(x):
        return "inf" if x > 0 else "-inf"
    if x == 0.0:
        return "0"
    if 1e-3 <= abs(x) < 1e5:
        return f"{x:.4g}"
    return f"{x:.3e}"


def _cell_text(value) -> str:
    if value is None:
        return ""
    if _is_number(value):
        return format_number(value)
    # A "|" would end the cell and a newline the row.
    return str(value).replace("|", "\\|").replace("\n", " ")


def format_duration(seconds: float) -> str:
    """A duration for progress lines: "42s", "3m05s", "2h07m"; "?" when unknown."""
    if not math.isfinite(seconds):
        return "?"
    seconds = int(round(seconds))
    minutes, seconds = divmod(seconds, 60)
    hours, minutes = divmod(minutes, 60)
    if hours:
        return f"{hours}h{minutes:02d}m"
    return f"{minutes}m{seconds:02d}s" if minutes else f"{seconds}s"


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence]) -> str:
    """A GitHub-flavoured Markdown table, ending in a newline.

    A column whose cells are all numbers (None cells, shown empty, aside) is
    right-aligned; other columns are left-aligned. Cells are padded so the table also
    reads as plain text.
    """
    headers = [str(h) for h in headers]
    rows = [list(row) for row in rows]
    if not headers:
        raise ValueError("headers must name at least one column. Received: headers=[].")
    for i, row in enumerate(rows):
        if len(row) != len(headers):
            raise ValueError(
                f"Every row must have one cell per header: len(headers)={len(headers)}, "
                f"but len(rows[{i}])={len(row)}. Received: rows[{i}]={list(row)!r}."
            )
    numeric = [
        any(row[j] is not None for row in rows)
        and all(row[j] is None or _is_number(row[j]) for row in rows)
        for j in range(len(headers))
    ]
    cells = [[_cell_text(v) for v in row] for row in rows]
    header_cells = [h.replace("|", "\\|") for h in headers]
    widths = [
        max([3, len(header_cells[j])] + [len(r[j]) for r in cells]) for j in range(len(headers))
    ]

    def line(values: Sequence[str]) -> str:
        padded = [
            v.rjust(w) if right else v.ljust(w)
            for v, w, right in zip(values, widths, numeric, strict=True)
        ]
        return "| " + " | ".join(padded) + " |"

    rule = [
        "-" * (w - 1) + ":" if right else "-" * w for w, right in zip(widths, numeric, strict=True)
    ]
    return "\n".join([line(header_cells), line(rule), *(line(r) for r in cells)]) + "\n"


# ---------------------------------------------------------------------------
# results.json / results.md


def to_jsonable(value, where: str = "results"):
    """`value` as plain JSON types: numpy scalars and arrays, tuples and paths converted.

    Non-finite floats become None (JSON has no NaN or infinity). Raises TypeError
    naming the offending entry (e.g. `results['curves'][2]`) for anything else.
    """
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, np.bool_):
        return bool(value)
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        x = float(value)
        return x if math.isfinite(x) else None
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if isinstance(value, np.ndarray):
        if value.dtype.kind not in "biuf":
            raise TypeError(
                f"{where}: only bool, integer and float arrays can go into JSON. "
                f"Received: an array of dtype {value.dtype}."
            )
        return to_jsonable(value.tolist(), where)
    if hasattr(value, "numpy") and callable(value.numpy):  # an eager tf.Tensor
        return to_jsonable(np.asarray(value.numpy()), where)
    if isinstance(value, Mapping):
        out = {}
        for k, v in value.items():
            key = to_jsonable(k, f"{where} key {k!r}") if not isinstance(k, str) else k
            if not isinstance(key, (str, int, float, bool)):
                raise TypeError(f"{where}: keys must be strings or numbers. Received: {k!r}.")
            out[str(key)] = to_jsonable(v, f"{where}[{k!r}]")
        return out
    if isinstance(value, (list, tuple)):
        return [to_jsonable(v, f"{where}[{i}]") for i, v in enumerate(value)]
    raise TypeError(
        f"{where}: cannot be written to JSON. Received: a {type(value).__name__} ({value!r:.80})."
    )


def _atomic_write_bytes(path: str, data: bytes) -> None:
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    # Not tempfile.mkstemp: its files are private (0600); open() honours the umask.
    tmp = os.path.join(directory, f".{os.path.basename(path)}.{uuid.uuid4().hex[:12]}.tmp")
    try:
        with open(tmp, "xb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def write_json(path: str, value) -> str:
    """Writes `value` (see `to_jsonable`; NaN becomes null) to `path` atomically."""
    text = json.dumps(to_jsonable(value), indent=2, allow_nan=False) + "\n"
    _atomic_write_bytes(path, text.encode("utf-8"))
    return path


def mean_std(values) -> tuple[float, float]:
    """Mean and sample standard deviation (ddof=1; 0.0 for a single value), e.g. over seeds."""
    values = np.asarray(values, np.float64)
    return float(values.mean()), float(values.std(ddof=1)) if len(values) > 1 else 0.0


def write_results(workdir: str, results: Mapping, table_md: str) -> dict[str, str]:
    """Writes `workdir/results.json` and `workdir/results.md`; returns their paths.

    `results` may hold numpy scalars and arrays (see `to_jsonable`); `table_md` is the
    Markdown written to results.md as is (e.g. from `markdown_table`). Returns
    {"json": path, "markdown": path}.
    """
    if not isinstance(results, Mapping):
        raise TypeError(f"results must be a dict. Received: a {type(results).__name__}.")
    if not isinstance(table_md, str):
        raise TypeError(f"table_md must be a str. Received: a {type(table_md).__name__}.")
    paths = {
        "json": os.path.join(workdir, RESULTS_JSON),
        "markdown": os.path.join(workdir, RESULTS_MD),
    }
    write_json(paths["json"], results)
    md = table_md if table_md.endswith("\n") else table_md + "\n"
    _atomic_write_bytes(paths["markdown"], md.encode("utf-8"))
    return paths


# ---------------------------------------------------------------------------
# PNG figures


def auroc(scores: np.ndarray, positive: np.ndarray) -> float:
    """Rank-based AUROC (Mann-Whitney U) of `scores` for the boolean labels `positive`.

    Ties count one half. Raises ValueError unless both classes are present.
    """
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    positive = np.asarray(positive, dtype=bool).reshape(-1)
    if scores.shape != positive.shape:
        raise ValueError(
            f"scores and positive must have the same length. Received: {scores.shape[0]} "
            f"and {positive.shape[0]}."
        )
    num_pos = int(positive.sum())
    num_neg = positive.size - num_pos
    if num_pos == 0 or num_neg == 0:
        raise ValueError(
            f"AUROC needs both classes. Received: {num_pos} positive, {num_neg} negative."
        )
    # Average ranks (1-based), ties sharing the mean of their ranks.
    _, inverse, counts = np.unique(scores, return_inverse=True, return_counts=True)
    ends = np.cumsum(counts)
    average_rank = ends - (counts - 1) / 2.0
    ranks = average_rank[inverse]
    u = ranks[positive].sum() - num_pos * (num_pos + 1) / 2.0
    return float(u / (num_pos * num_neg))


def _vector(name: str, value, dtype=np.float64) -> np.ndarray:
    array = np.asarray(value)
    if array.ndim != 1:
        raise ValueError(f"{name} must be 1-D. Received: {name} with shape {array.shape}.")
    array = array.astype(dtype)
    if array.dtype.kind == "f" and not np.all(np.isfinite(array)):
        raise ValueError(f"{name} must be finite. Received: {name}={array.tolist()!r:.200}.")
    return array


def _same_lengths(**named) -> None:
    lengths = {name: len(v) for name, v in named.items()}
    if len(set(lengths.values())) > 1:
        names = list(lengths)
        together = ", ".join(names[:-1]) + " and " + names[-1]
        listed = ", ".join(f"len({n})={k}" for n, k in lengths.items())
        raise ValueError(f"{together} must have the same length. Received: {listed}.")


def _new_figure(figsize: tuple[float, float]):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize, dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _save_png(fig, path: str) -> str:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    _atomic_write_bytes(path, buffer.getvalue())
    return path


def plot_distribution(
    path: str,
    learned: np.ndarray,
    optimal: np.ndarray,
    labels: Sequence[str],
    title: str,
) -> str:
    """A grouped bar chart of a learned categorical distribution beside the optimal one.

    `learned[i]` and `optimal[i]` are the probabilities of category `labels[i]`.
    Writes a PNG to `path` and returns `path`.
    """
    learned = _vector("learned", learned)
    optimal = _vector("optimal", optimal)
    labels = [str(label) for label in labels]
    _same_lengths(learned=learned, optimal=optimal, labels=labels)
    if not labels:
        raise ValueError("labels must name at least one category. Received: labels=[].")

    fig = _new_figure((max(4.0, 0.6 * len(labels) + 2.0), 3.5))
    ax = fig.add_subplot()
    x = np.arange(len(labels))
    width = 0.4
    ax.bar(x - width / 2, learned, width, label="learned", color="tab:blue")
    ax.bar(x + width / 2, optimal, width, label="optimal", color="tab:gray")
    ax.set_xticks(x, labels, rotation=45 if len(labels) > 8 else 0)
    ax.set_ylabel("probability")
    ax.set_ylim(0.0, max(1e-6, float(max(learned.max(), optimal.max()))) * 1.15)
    ax.set_title(title)
    ax.legend()
    return _save_png(fig, path)


def plot_weight_histograms(
    path: str, weights: np.ndarray, noisy_mask: np.ndarray, title: str, bins: int = 30
) -> str:
    """Overlaid histograms of per-example weights, clean examples against noisy ones.

    `noisy_mask[i]` is true when example i is noisy (corrupted). Both histograms share
    the same bins. Writes a PNG to `path` and returns `path`.
    """
    weights = _vector("weights", weights)
    mask = np.asarray(noisy_mask)
    if mask.ndim != 1:
        raise ValueError(f"noisy_mask must be 1-D. Received: noisy_mask with shape {mask.shape}.")
    if mask.dtype != np.bool_:
        if not np.isin(mask, (0, 1)).all():
            raise ValueError(
                f"noisy_mask must be boolean (or 0/1). Received: dtype {mask.dtype} with values "
                f"{np.unique(mask)[:10].tolist()}."
            )
        mask = mask.astype(bool)
    _same_lengths(weights=weights, noisy_mask=mask)
    if weights.size == 0:
        raise ValueError("weights must not be empty. Received: 0 weights.")

    edges = np.histogram_bin_edges(weights, bins=bins)
    fig = _new_figure((5.0, 3.5))
    ax = fig.add_subplot()
    for name, selected, color in (("clean", ~mask, "tab:blue"), ("noisy", mask, "tab:red")):
        ax.hist(
            weights[selected],
            bins=edges,
            alpha=0.6,
            color=color,
            label=f"{name} (n={int(selected.sum())})",
        )
    ax.set_xlabel("example weight")
    ax.set_ylabel("examples")
    ax.set_title(title)
    ax.legend()
    return _save_png(fig, path)


def plot_weights_by_group(
    path: str, weights: np.ndarray, groups: Sequence[str], title: str, xlabel: str = "weight"
) -> str:
    """One point per weight, on a row per group (e.g. task weights by ground-truth kind).

    Points are jittered vertically within their row; each row is annotated with
    the group's size and mean weight. Writes a PNG to `path` and returns `path`.
    """
    weights = _vector("weights", weights)
    groups = [str(g) for g in groups]
    _same_lengths(weights=weights, groups=np.asarray(groups))
    if weights.size == 0:
        raise ValueError("weights must not be empty. Received: 0 weights.")
    names = list(dict.fromkeys(groups))
    rng = np.random.default_rng(0)
    fig = _new_figure((6.0, 1.0 + 0.8 * len(names)))
    ax = fig.add_subplot()
    labels = np.asarray(groups)
    ticks = []
    for row, name in enumerate(names):
        w = weights[labels == name]
        ax.scatter(w, row + rng.uniform(-0.25, 0.25, size=w.size), s=6, alpha=0.6)
        ticks.append(f"{name}\nn={w.size}, mean {w.mean():.2f}")
    ax.set_yticks(range(len(names)), ticks)
    ax.set_xlabel(xlabel)
    ax.set_title(title)
    return _save_png(fig, path)


def plot_curves(
    path: str,
    curves: Mapping[str, tuple[Sequence, Sequence]],
    title: str,
    ylabel: str,
) -> str:
    """Line plot of named curves, each `name: (steps, values)`, against step.

    Writes a PNG to `path` and returns `path`.
    """
    if not curves:
        raise ValueError("curves must hold at least one curve. Received: curves={}.")
    checked = {}
    for name, curve in curves.items():
        if len(curve) != 2:
            raise ValueError(
                f"curves[{name!r}] must be a pair (steps, values). "
                f"Received: a {type(curve).__name__} of length {len(curve)}."
            )
        steps = np.asarray(curve[0], dtype=np.float64)
        values = np.asarray(curve[1], dtype=np.float64)
        if steps.ndim != 1 or values.ndim != 1 or len(steps) != len(values):
            raise ValueError(
                f"curves[{name!r}] needs 1-D steps and values of the same length. "
                f"Received: steps with shape {steps.shape}, values with shape {values.shape}."
            )
        checked[str(name)] = (steps, values)

    fig = _new_figure((5.5, 3.5))
    ax = fig.add_subplot()
    for name, (steps, values) in checked.items():
        # Non-finite values are left as gaps rather than refused: a diverged curve is a result.
        ax.plot(steps, values, label=name, marker="." if len(steps) < 30 else None)
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    return _save_png(fig, path)


# ---------------------------------------------------------------------------
# TensorBoard image


def distribution_image(
    history: np.ndarray,
    *,
    pixels_per_bin: int = 8,
    min_width: int = 128,
    max_width: int = 512,
) -> np.ndarray:
    """A heatmap of a distribution over training, shaped for `tf.summary.image`.

    `history[t, k]` is the probability of bin k at record t (shape [T, K], entries
    >= 0). Time runs left to right and bins top (k=0) to bottom. Colours run
    dark purple (0) to yellow (the largest entry of `history`), as in viridis. Each
    bin is `pixels_per_bin` rows tall; each record is repeated to make the image at
    least `min_width` wide, and records are subsampled evenly when T > `max_width`.

    Returns a uint8 array of shape [1, K * pixels_per_bin, W, 3].
    """
    h = np.asarray(history, dtype=np.float64)
    if h.ndim != 2 or h.shape[0] == 0 or h.shape[1] == 0:
        raise ValueError(
            f"history must have shape [T, K] with T, K >= 1. Received: shape {h.shape}."
        )
    if not np.all(np.isfinite(h)) or h.min() < 0:
        raise ValueError(
            "history must hold finite, non-negative probabilities. "
            f"Received: min={np.nanmin(h)}, max={np.nanmax(h)}, "
            f"non-finite entries={int((~np.isfinite(h)).sum())}."
        )
    for name, value in (("pixels_per_bin", pixels_per_bin), ("min_width", min_width)):
        if int(value) != value or value < 1:
            raise ValueError(f"{name} must be a positive int. Received: {name}={value!r}.")
    if int(max_width) != max_width or max_width < min_width:
        raise ValueError(
            f"max_width must be an int >= min_width={min_width}. Received: max_width={max_width!r}."
        )

    if h.shape[0] > max_width:
        h = h[np.linspace(0, h.shape[0] - 1, max_width).round().astype(int)]
    top = h.max()
    scaled = h / top if top > 0 else h
    # Colour lookup: [T, K] in [0, 1] -> [T, K, 3].
    anchors = np.linspace(0.0, 1.0, len(_VIRIDIS))
    rgb = np.stack([np.interp(scaled, anchors, _VIRIDIS[:, c]) for c in range(3)], axis=-1)
    image = rgb.transpose(1, 0, 2)  # [K, T, 3]: bins down, time across.
    pixels_per_step = max(1, -(-min_width // image.shape[1]))
    image = np.repeat(np.repeat(image, pixels_per_bin, axis=0), pixels_per_step, axis=1)
    return np.clip(np.rint(image), 0, 255).astype(np.uint8)[np.newaxis]
