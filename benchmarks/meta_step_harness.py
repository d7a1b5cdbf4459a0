"""What the online meta-step cost benchmarks share, whatever the problem.

A meta-step benchmark (benchmarks/gin_meta_step_bench.py on the GIN,
benchmarks/ecg_meta_step_bench.py on the ECG ResNet) builds one problem and one
`online._Loop` per grid cell (N Neumann terms, K unrolled FT steps, HVP mode),
and compares P PT steps (`loop.pt_steps(P)`) with P PT steps plus a meta-step
(`loop.meta_step_and_update()`). This module owns the parts that do not depend
on the problem: the grid, driving the loops (`LoopBench`), warm-up, peak memory
(TensorFlow's allocator statistics on a GPU; on CPU the RSS of a fresh child
process, with the conventions and the child protocol of
benchmarks/hypergrad_bench.py), the summary rows and the printed table.
"""

import os

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")  # Keras 2, as metapt_tf requires
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable  # noqa: E402
from pathlib import Path  # noqa: E402

import ml_collections  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from benchmarks import hypergrad_bench  # noqa: E402
from metapt_tf import hypergrad  # noqa: E402
from metapt_tf.training import online  # noqa: E402

HVP_MODES = hypergrad.HVP_MODES
DEFAULT_HVP_MODE = hypergrad.DEFAULT_HVP_MODE
NEUMANN_TERMS = (1, 5)  # N
UNROLL_STEPS = (1, 5)  # K
REFERENCE = "pt_reference"
MEMORY_CALLS = 1
# The memory child's protocol and the table formatting are the MLP benchmark's.
CHILD_FLAG, CHILD_MARKER, ROOT = (
    hypergrad_bench.CHILD_FLAG,
    hypergrad_bench.CHILD_MARKER,
    hypergrad_bench.ROOT,
)
fmt = hypergrad_bench._fmt


def cells(cfg) -> list[tuple[int, int, str]]:
    """The grid, (N, K, HVP mode), in table order; `cfg.hvp_modes` lists the modes."""
    return [(n, k, m) for m in cfg.hvp_modes for n in NEUMANN_TERMS for k in UNROLL_STEPS]


def cell_name(cell: tuple[int, int, str]) -> str:
    n, k, mode = cell
    return f"meta_step[N={n},K={k},{mode}]"


def gpu_device() -> str | None:
    gpus = tf.config.list_physical_devices("GPU")
    return "GPU:0" if gpus else None


def parse_hvp_modes(value: str, parser) -> tuple[str, ...]:
    """`--hvp_modes`: comma-separated modes or 'all'; the default mode must be among them."""
    modes = HVP_MODES if value == "all" else tuple(value.split(","))
    if any(m not in HVP_MODES for m in modes) or DEFAULT_HVP_MODE not in modes:
        parser.error(f"--hvp_modes must include {DEFAULT_HVP_MODE!r}, drawn from {HVP_MODES}.")
    return modes


def environment() -> dict:
    return {
        "tensorflow": tf.__version__,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "cpu_count": os.cpu_count(),
        "gpu": gpu_device() is not None,
    }


# -- the loops --------------------------------------------------------------------------


def make_loops(
    cfg,
    problem,
    pt_data: tf.data.Dataset,
    ft_train_data: tf.data.Dataset,
    ft_val_data: tf.data.Dataset,
    meta_config: ml_collections.ConfigDict,
    meta_pt_data: tf.data.Dataset | None = None,
) -> dict:
    """{cell: online._Loop}, one loop per grid cell over the shared problem; each loop
    iterates over the pipelines on its own. `meta_config` is the loop's config; each
    cell sets its N, K and HVP mode in a copy."""
    loops = {}
    for cell in cells(cfg):
        n, k, mode = cell
        c = meta_config.copy_and_resolve_references()
        c.neumann_terms, c.ft_unroll_steps, c.hvp_mode = n, k, mode
        online.validate_config(c)
        loops[cell] = online._Loop(
            problem, pt_data, ft_train_data, ft_val_data, c, meta_pt_data=meta_pt_data
        )
    return loops


class LoopBench:
    """Drives the loops of one benchmark: `cfg.pt_steps` is P; subclasses build the
    problem and set `self.loops` (from `make_loops`) and `self.num_params`."""

    cfg: object
    loops: dict
    num_params: int

    def __init__(self, cfg, loops: dict):
        self.cfg = cfg
        self.loops = loops
        self.parts: dict[tuple, list[tuple[float, float]]] = {c: [] for c in self.loops}

    def pt_steps(self, cell) -> None:
        self.loops[cell].pt_steps(self.cfg.pt_steps)

    def meta_step(self, cell, record: bool = True) -> None:
        """P PT steps, the meta-gradient and the meta-update; records the parts' seconds."""
        loop = self.loops[cell]
        start = time.perf_counter()
        loop.pt_steps(self.cfg.pt_steps)
        middle = time.perf_counter()
        loop.meta_step_and_update()
        loop.meta_params[0][:1].numpy()  # waits for the meta-update
        if record:
            self.parts[cell].append((middle - start, time.perf_counter() - middle))

    def functions(self) -> dict[str, Callable[[], None]]:
        """Zero-argument callables: the reference (on the first cell's loop), then each cell."""
        first = next(iter(self.loops))
        fns = {REFERENCE: lambda: self.pt_steps(first)}
        for cell in self.loops:
            fns[cell_name(cell)] = lambda cell=cell: self.meta_step(cell)
        return fns

    def skipped(self) -> dict[str, int]:
        return {cell_name(c): int(loop.skipped.numpy()) for c, loop in self.loops.items()}


def warm_up(bench: LoopBench, warmup: int) -> None:
    """Traces every cell's PT steps and meta-step (the reference shares the first's)."""
    for cell in bench.loops:
        start = time.perf_counter()
        for _ in range(warmup):
            bench.meta_step(cell, record=False)
        print(
            f"  {cell_name(cell)}: {time.perf_counter() - start:.1f} s",
            file=sys.stderr,
            flush=True,
        )


# -- memory -----------------------------------------------------------------------------


class RssPeak:
    """Peak RSS increase of a block (MiB), CPU; None where the peak cannot be reset."""

    def __enter__(self):
        hypergrad_bench._trim_heap()
        self.base = hypergrad_bench._rss_kib()
        self.reset = hypergrad_bench._reset_peak()
        return self

    def __exit__(self, *exc):
        self.mib = (hypergrad_bench._peak_kib() - self.base) / 1024.0 if self.reset else None
        return False


class GpuPeak:
    """Peak allocator memory above the memory in use before the block (MiB), GPU."""

    def __init__(self, device: str):
        self.device = device

    def __enter__(self):
        tf.config.experimental.reset_memory_stats(self.device)
        self.base = tf.config.experimental.get_memory_info(self.device)["current"]
        return self

    def __exit__(self, *exc):
        peak = tf.config.experimental.get_memory_info(self.device)["peak"]
        self.mib = (peak - self.base) / 2**20
        return False


def measure_memory(bench: LoopBench, peak_block: Callable[[], object]) -> dict:
    """{cell name: {"pt_peak_mib", "meta_step_peak_mib"}}; the loops already traced."""
    out = {}
    for cell in bench.loops:
        with peak_block() as pt:
            for _ in range(MEMORY_CALLS):
                bench.pt_steps(cell)
        with peak_block() as meta:
            for _ in range(MEMORY_CALLS):
                bench.meta_step(cell, record=False)
        out[cell_name(cell)] = {"pt_peak_mib": pt.mib, "meta_step_peak_mib": meta.mib}
        print(f"  memory: {cell_name(cell)} done", file=sys.stderr, flush=True)
    return out


def memory_child(bench: LoopBench) -> dict:
    """Runs in the child on a freshly built bench: every cell's peaks, CPU RSS."""
    warm_up(bench, 1)
    return measure_memory(bench, RssPeak)


def run_memory_child(module: str, argv: list[str], workdir: str) -> dict:
    """Runs `python -m module *argv CHILD_FLAG workdir` (the benchmark re-invoked at the
    same sizes) and returns what it printed after CHILD_MARKER."""
    env = dict(os.environ)
    env.update(
        TF_USE_LEGACY_KERAS="1",
        TF_CPP_MIN_LOG_LEVEL="3",
        TF_ENABLE_ONEDNN_OPTS="0",  # oneDNN's pooling CPU allocator would hide the peaks
        MALLOC_MMAP_THRESHOLD_="131072",
        PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")])),
    )
    cmd = [sys.executable, "-m", module, *argv, CHILD_FLAG, workdir]
    print("peak memory: one child process, cells one after another", file=sys.stderr, flush=True)
    proc = subprocess.run(cmd, env=env, cwd=ROOT, stdout=subprocess.PIPE, text=True)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(CHILD_MARKER)]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"The memory child failed (exit {proc.returncode}); see stderr above.")
    return json.loads(lines[-1][len(CHILD_MARKER) :])


def peak_memory(
    bench: LoopBench, enabled: bool, run_child: Callable[[], dict]
) -> tuple[dict, str | None]:
    """(figures, how they were measured): GPU allocator statistics in this process, or
    `run_child()` on CPU; ({}, None) when not `enabled`."""
    if not enabled:
        return {}, None
    device = gpu_device()
    if device:
        memory = measure_memory(bench, lambda: GpuPeak(device))
        return memory, (
            f"peak allocator memory on {device} above the memory in use before "
            f"{MEMORY_CALLS} call(s) (tf.config.experimental.get_memory_info)"
        )
    return run_child(), (
        f"peak process RSS increase over {MEMORY_CALLS} call(s), above the RSS before "
        "them, in a fresh child process run with TF_ENABLE_ONEDNN_OPTS=0"
    )


# -- report -----------------------------------------------------------------------------


def median_ms(values) -> float:
    return float(np.median(values)) * 1e3


def summarize(bench: LoopBench, times: dict, memory: dict) -> dict:
    """{"reference": the P PT steps, "cells": a row per cell} from the round-robin
    `times` (seconds per call, by function name) and the `memory` figures."""
    pt_steps = bench.cfg.pt_steps
    ref_ms = median_ms(times[REFERENCE])
    pt_step_ms = ref_ms / pt_steps
    skipped = bench.skipped()
    rows = []
    for cell in bench.loops:
        n, k, mode = cell
        name = cell_name(cell)
        parts = np.asarray(bench.parts[cell])
        med = median_ms(times[name])
        mem = memory.get(name, {})
        pt_peak, meta_peak = mem.get("pt_peak_mib"), mem.get("meta_step_peak_mib")
        measured = pt_peak is not None and pt_peak > 0 and meta_peak is not None
        ratio_mem = meta_peak / pt_peak if measured else None
        meta_ms = median_ms(parts[:, 1])
        rows.append(
            {
                "name": name,
                "neumann_terms": n,
                "ft_unroll_steps": k,
                "hvp_mode": mode,
                "median_ms": med,
                "times_ms": [float(t) * 1e3 for t in times[name]],
                "pt_part_median_ms": median_ms(parts[:, 0]),
                "meta_gradient_median_ms": meta_ms,
                "time_ratio": med / ref_ms,
                "meta_gradient_in_pt_steps": meta_ms / pt_step_ms,
                "pt_peak_mib": pt_peak,
                "meta_step_peak_mib": meta_peak,
                "memory_ratio": ratio_mem,
                "skipped_meta_steps": skipped[name],
            }
        )
    reference = {
        "name": REFERENCE,
        "pt_steps": pt_steps,
        "median_ms": ref_ms,
        "pt_step_ms": pt_step_ms,
        "times_ms": [float(t) * 1e3 for t in times[REFERENCE]],
    }
    return {"reference": reference, "cells": rows}


def print_table(summary: dict, memory_method: str | None) -> None:
    """The reference line, a row per cell and the legend."""
    ref = summary["reference"]
    print(
        f"{REFERENCE} (P={ref['pt_steps']} PT steps): {ref['median_ms']:.1f} ms, "
        f"{ref['pt_step_ms']:.1f} ms per PT step"
    )
    print()
    header = (
        f"{'N':>2} {'K':>2} {'hvp mode':<21} {'meta-step ms':>12} {'time ratio':>10} "
        f"{'meta-grad':>9} {'PT MiB':>8} {'meta MiB':>8} {'mem ratio':>9}"
    )
    print(header)
    print("-" * len(header))
    for r in summary["cells"]:
        print(
            f"{r['neumann_terms']:>2} {r['ft_unroll_steps']:>2} {r['hvp_mode']:<21} "
            f"{r['median_ms']:>12.1f} {r['time_ratio']:>10.2f} "
            f"{r['meta_gradient_in_pt_steps']:>9.2f} {fmt(r['pt_peak_mib'], '8.1f'):>8} "
            f"{fmt(r['meta_step_peak_mib'], '8.1f'):>8} {fmt(r['memory_ratio'], '9.2f'):>9}"
        )
    print()
    print(
        f"time ratio: median meta-step (P PT steps + meta-gradient + meta-update) / median "
        f"of P PT steps.\nmeta-grad: median of the meta-gradient + meta-update part, in PT "
        f"steps ({REFERENCE} / P)."
    )
    if memory_method:
        print(f"PT MiB, meta MiB: {memory_method}.\nmem ratio: meta MiB / PT MiB.")
    else:
        print("PT MiB, meta MiB, mem ratio: peak memory not measured (--no_memory).")
    skipped = {r["name"]: r["skipped_meta_steps"] for r in summary["cells"]}
    if any(skipped.values()):
        print(f"skipped meta-updates (non-finite meta-gradient): {skipped}")


# -- the run ----------------------------------------------------------------------------


def measure(
    bench: LoopBench, *, memory: bool, run_child: Callable[[], dict]
) -> tuple[dict, dict, str | None]:
    """Warm-up (`cfg.warmup` calls of each cell), `cfg.repeats` round-robin rounds over
    the reference and the cells, then the peak memory (see `peak_memory`). Returns
    (seconds per call by function name, memory figures, how memory was measured)."""
    warm_up(bench, bench.cfg.warmup)
    times = hypergrad_bench.time_round_robin(bench.functions(), bench.cfg.repeats)
    figures, method = peak_memory(bench, memory, run_child)
    return times, figures, method


def write_json(
    path: str, cfg, summary: dict, memory_method: str | None, num_pt_params: int, **extra
) -> None:
    payload = {
        "config": dataclasses.asdict(cfg),
        "environment": environment(),
        "default_hvp_mode": DEFAULT_HVP_MODE,
        "num_pt_params": num_pt_params,
        **extra,
        "memory_method": memory_method,
        **summary,
    }
    Path(path).write_text(json.dumps(payload, indent=2) + "\n")
    print(f"\nwrote {path}")


# -- the command line -------------------------------------------------------------------


def add_repeat_arguments(parser: argparse.ArgumentParser, full_repeats: int, full_warmup: int):
    """--repeats and --warmup, whose defaults depend on --quick (see `resolve`)."""
    parser.add_argument("--repeats", type=int, help=f"timed rounds (default {full_repeats})")
    parser.add_argument(
        "--warmup", type=int, help=f"untimed calls per function (default {full_warmup})"
    )


def add_run_arguments(
    parser: argparse.ArgumentParser, default_p: int, quick: dict, quick_repeats: int
) -> None:
    """--pt_steps, --hvp_modes, --no_memory, --json, --quick and the memory child's flag."""
    parser.add_argument("--pt_steps", type=int, default=default_p, help="P, PT steps per meta-step")
    parser.add_argument(
        "--hvp_modes",
        default=DEFAULT_HVP_MODE,
        help=f"comma-separated HVP modes of {HVP_MODES}, or 'all' (default: {DEFAULT_HVP_MODE})",
    )
    parser.add_argument("--no_memory", action="store_true", help="skip the peak-memory figures")
    parser.add_argument("--json", metavar="PATH", help="write all figures as JSON")
    parser.add_argument(
        "--quick",
        action="store_true",
        help=f"tiny sizes {quick} and {quick_repeats} repeats (a smoke run)",
    )
    parser.add_argument(CHILD_FLAG, metavar="WORKDIR", help=argparse.SUPPRESS)


def resolve(
    args, parser, *, full: dict, quick: dict, repeats: tuple[int, int], warmup: tuple[int, int]
) -> tuple[dict, int, int, tuple[str, ...]]:
    """(sizes, repeats, warmup, HVP modes): the preset (`quick` with --quick, else `full`)
    overridden by the size flags given; `repeats` and `warmup` are (full, quick) defaults."""
    preset = quick if args.quick else full
    sizes = {k: getattr(args, k) if getattr(args, k) is not None else v for k, v in preset.items()}
    n_repeats = args.repeats or (repeats[1] if args.quick else repeats[0])
    n_warmup = args.warmup or (warmup[1] if args.quick else warmup[0])
    return sizes, n_repeats, n_warmup, parse_hvp_modes(args.hvp_modes, parser)


def main(
    args,
    cfg,
    *,
    module: str,
    make_bench: Callable[[object, str], LoopBench],
    size_argv: Callable[[object], list[str]],
    summarize_fn: Callable[[LoopBench, dict, dict], dict],
    report: Callable[[object, LoopBench, dict, str | None], None],
    json_extra: Callable[[LoopBench], dict] = lambda bench: {},
) -> int:
    """A benchmark's whole run: in the memory child, its peaks as a marked JSON line;
    otherwise build the loops in a temporary directory, time them (and measure memory in
    a child running `module` with `size_argv(cfg)`), report, and write the JSON."""
    if getattr(args, "_memory_child", None):
        result = memory_child(make_bench(cfg, args._memory_child))
        print(CHILD_MARKER + json.dumps(result), flush=True)
        return 0
    prefix = module.rsplit(".", 1)[-1] + "_"
    with tempfile.TemporaryDirectory(prefix=prefix) as workdir:
        start = time.perf_counter()
        bench = make_bench(cfg, workdir)
        print(
            f"built the problem and {len(bench.loops)} loops in "
            f"{time.perf_counter() - start:.1f} s; warm-up (tracing):",
            file=sys.stderr,
            flush=True,
        )
        times, memory, memory_method = measure(
            bench,
            memory=not args.no_memory,
            run_child=lambda: run_memory_child(module, size_argv(cfg), workdir),
        )
        summary = summarize_fn(bench, times, memory)
    report(cfg, bench, summary, memory_method)
    if args.json:
        write_json(args.json, cfg, summary, memory_method, bench.num_params, **json_extra(bench))
    return 0
