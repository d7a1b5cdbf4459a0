"""Cost of one online meta-step relative to plain PT steps, on the GIN at the paper's size.

    python -m benchmarks.gin_meta_step_bench              # paper size, 5-10 min on 2 CPU cores
    python -m benchmarks.gin_meta_step_bench --quick      # tiny sizes, a smoke run
    python -m benchmarks.gin_meta_step_bench --json out.json --no_memory --hvp_modes all

Setting (the defaults): the PPI experiment of `metapt_tf.training.ppi_benchmark`
at the paper's model size: a GIN of 5 layers x 300 units (dropout 0.2 in PT),
a PT head of 5000 sigmoid tasks weighted by w = 2 sigmoid(phi) (`TaskWeights`,
the loss `ppi_benchmark._weighted_bce`), an FT head of 40 sigmoid tasks, batches
of 32 ego-graphs (PT, FT train, FT val, and the meta-step's PT batch, which the
experiment's config sets to 256 for training: `--meta_pt_batch=256`), synthetic
PPI-like ego-graphs from `synthetic_ppi.write_synthetic_benchmark` read through
the experiment's own `tf.data` pipelines. The loop's settings are the `paper`
variant of configs/ppi_multitask.py: head "persistent" with one FT-head step per
PT step (`head_steps_during_pt`), PT / FT learning rates 1e-4, Neumann alpha
1e-4, Adam meta-optimizer, graph mode (no XLA).

What is timed is what `online.run` runs, through the loop's own compiled steps
(`online._Loop`), one loop per grid cell, all sharing one model:

* pt_reference: `loop.pt_steps(P)`: P PT steps in one `tf.function`, each one
  a PT batch from the pipeline, forward + backward of GIN and PT head, a Keras
  Adam update of theta, and (as in training with the persistent head) one
  plain FT-head step: an FT batch, backbone features in inference mode, a
  `hypergrad.Adam` step of the head. The same function every cell's loop runs.
* meta_step[N, K, mode]: `loop.pt_steps(P)` followed by
  `loop.meta_step_and_update()`: a meta PT batch, K FT batches and an FT val
  batch, K differentiable FT-head steps, v = dL_val/dtheta, the implicit part
  with Neumann(N terms) and HVP mode `mode`, then the Adam step on phi (and the
  host reads of the step's metrics). Its two parts are also clocked apart: the
  second, `meta_gradient`, is reported in units of one PT step (pt_reference / P).

Grid: N (Neumann terms) in {1, 5} x K (unrolled FT steps) in {1, 5}, P = 10,
HVP mode `hypergrad.DEFAULT_HVP_MODE` (`--hvp_modes all` adds the other).
time ratio = median(meta_step) / median(pt_reference), i.e.
(P PT steps + meta-gradient + meta-update) / (P PT steps). Target (the issue):
P=10, K=1, N=1, default HVP mode: time ratio <= 1.6.

Timing: after warm-up (tracing), repetitions run round-robin over the reference
and all cells (the starting point rotating each round), so slow drifts of a noisy
machine hit every function alike; medians are reported, and every ratio divides
medians of the same run. Training goes on while timing (theta, phi and the FT
heads change); that is what training costs.

Peak memory: on a GPU, TensorFlow's allocator statistics
(`tf.config.experimental.get_memory_info`, peak above the memory in use just
before, after `reset_memory_stats`). On CPU, in a fresh child process (this
script re-invoked with a hidden flag; the conventions of
benchmarks/hypergrad_bench.py): the increase of the peak resident set size
(Linux VmHWM, reset through /proc/self/clear_refs) over the RSS just before the
calls, with TF_ENABLE_ONEDNN_OPTS=0 and a pinned MALLOC_MMAP_THRESHOLD_ so that
RSS follows live memory. Per cell: the PT peak over `pt_steps(P)` calls, the
meta-step peak over `pt_steps(P)` + `meta_step_and_update()` calls, and
memory ratio = meta-step peak / PT peak, both of the cell's own loop.

Wall time at the paper's size is mostly tracing: each of the two processes
traces four loops' PT steps and meta-steps (over a minute on 2 CPU cores);
`--no_memory` skips the second process.
"""

import os

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")  # Keras 2, as metapt_tf requires
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import argparse  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable  # noqa: E402
from dataclasses import asdict, dataclass  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from benchmarks import hypergrad_bench  # noqa: E402
from configs import ppi_multitask  # noqa: E402
from metapt_tf import hypergrad  # noqa: E402
from metapt_tf.training import online, ppi_benchmark  # noqa: E402

HVP_MODES = hypergrad.HVP_MODES
DEFAULT_HVP_MODE = hypergrad.DEFAULT_HVP_MODE
NEUMANN_TERMS = (1, 5)  # N
UNROLL_STEPS = (1, 5)  # K
TARGET_P, TARGET_N, TARGET_K = 10, 1, 1
TARGET_LIMIT = 1.6  # meta-step / P PT steps
REFERENCE = "pt_reference"
MEMORY_CALLS = 1
# The memory child's protocol and the table formatting are the other benchmark's.
CHILD_FLAG, CHILD_MARKER, ROOT = (
    hypergrad_bench.CHILD_FLAG,
    hypergrad_bench.CHILD_MARKER,
    hypergrad_bench.ROOT,
)
_fmt = hypergrad_bench._fmt


@dataclass(frozen=True)
class Config:
    num_layers: int
    hidden_units: int
    pt_tasks: int
    ft_tasks: int
    batch: int
    meta_pt_batch: int
    pt_graphs: int
    ft_graphs: int
    pt_steps: int  # P
    hvp_modes: tuple[str, ...]
    repeats: int
    warmup: int
    seed: int = 0


FULL = {
    "num_layers": 5,
    "hidden_units": 300,
    "pt_tasks": 5000,
    "ft_tasks": 40,
    "batch": 32,
    "meta_pt_batch": 32,
    "pt_graphs": 512,
    "ft_graphs": 256,  # FT val (15%) still fills a batch of 32
}
FULL_REPEATS = 8
FULL_WARMUP = 1
QUICK = {
    "num_layers": 2,
    "hidden_units": 16,
    "pt_tasks": 50,
    "ft_tasks": 8,
    "batch": 8,
    "meta_pt_batch": 8,
    "pt_graphs": 64,
    "ft_graphs": 64,
}
QUICK_REPEATS = 2
QUICK_WARMUP = 1


def cells(cfg: Config) -> list[tuple[int, int, str]]:
    """The grid, (N, K, HVP mode), in table order."""
    return [(n, k, m) for m in cfg.hvp_modes for n in NEUMANN_TERMS for k in UNROLL_STEPS]


def cell_name(cell: tuple[int, int, str]) -> str:
    n, k, mode = cell
    return f"meta_step[N={n},K={k},{mode}]"


def gpu_device() -> str | None:
    gpus = tf.config.list_physical_devices("GPU")
    return "GPU:0" if gpus else None


# -- the problem and the loops ----------------------------------------------------------


def experiment_config(cfg: Config):
    """configs/ppi_multitask.py's `paper` variant at this benchmark's sizes."""
    config = ppi_multitask.get_config("paper")
    s = config.data.synthetic
    s.num_pt_graphs, s.num_ft_graphs, s.num_test_graphs = cfg.pt_graphs, cfg.ft_graphs, 1
    s.num_pt_tasks, s.num_ft_tasks, s.seed = cfg.pt_tasks, cfg.ft_tasks, cfg.seed
    config.data.pt_batch_size = cfg.batch
    config.data.ft_batch_size = cfg.batch
    config.data.meta_pt_batch_size = cfg.meta_pt_batch
    config.model.num_layers = cfg.num_layers
    config.model.hidden_units = cfg.hidden_units
    m = config.meta
    m.head = "persistent"
    m.head_steps_during_pt = True
    m.pt_steps_per_meta_step = cfg.pt_steps
    m.pt_learning_rate = 1e-4
    m.ft_learning_rate = 1e-4
    m.solver = "neumann"
    m.neumann_alpha = 1e-4
    m.meta_optimizer = "adam"
    m.jit_compile = False
    return config


class Bench:
    """One shared PPI problem (as `ppi_benchmark._Runner.pretrain_online` builds it) and
    one `online._Loop` per grid cell."""

    def __init__(self, cfg: Config, workdir: str):
        self.cfg = cfg
        config = experiment_config(cfg)
        self.config = config
        data = ppi_benchmark.prepare_data(config, workdir, say=lambda _: None)
        runner = ppi_benchmark._Runner(config, data, workdir, cfg.seed, say=lambda _: None)
        setting = ppi_benchmark.make_setting("full", data, config, cfg.seed)
        tasks = setting.meta_tasks
        self.problem, _ = runner.build_problem(tasks)
        self.num_params = sum(int(np.prod(v.shape)) for v in self.problem.pt_params)
        # One pipeline of each kind; every loop iterates over it on its own.
        ft_train = runner.ft_data(setting, "meta_train", tasks, train=True, repeat=True)
        ft_val = runner.ft_data(setting, "meta_val", tasks, train=True, repeat=True)
        self.loops = {}
        for cell in cells(cfg):
            n, k, mode = cell
            c = config.meta.copy_and_resolve_references()
            c.neumann_terms, c.ft_unroll_steps, c.hvp_mode = n, k, mode
            online.validate_config(c)
            self.loops[cell] = online._Loop(
                self.problem,
                runner.pt_data,
                ft_train,
                ft_val,
                c,
                meta_pt_data=runner.meta_pt_data,
            )
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


def warm_up(bench: Bench, warmup: int) -> None:
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


class _RssPeak:
    """Peak RSS increase of a block (MiB), CPU; None where the peak cannot be reset."""

    def __enter__(self):
        hypergrad_bench._trim_heap()
        self.base = hypergrad_bench._rss_kib()
        self.reset = hypergrad_bench._reset_peak()
        return self

    def __exit__(self, *exc):
        self.mib = (hypergrad_bench._peak_kib() - self.base) / 1024.0 if self.reset else None
        return False


class _GpuPeak:
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


def measure_memory(bench: Bench, peak_block: Callable[[], object]) -> dict:
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


def memory_child(cfg: Config, workdir: str) -> dict:
    """Runs in the child: every cell's peaks, CPU RSS."""
    bench = Bench(cfg, workdir)
    warm_up(bench, 1)
    return measure_memory(bench, _RssPeak)


def run_memory_child(cfg: Config, workdir: str) -> dict:
    env = dict(os.environ)
    env.update(
        TF_USE_LEGACY_KERAS="1",
        TF_CPP_MIN_LOG_LEVEL="3",
        TF_ENABLE_ONEDNN_OPTS="0",  # oneDNN's pooling CPU allocator would hide the peaks
        MALLOC_MMAP_THRESHOLD_="131072",
        PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")])),
    )
    cmd = [
        sys.executable,
        "-m",
        "benchmarks.gin_meta_step_bench",
        *size_argv(cfg),
        CHILD_FLAG,
        workdir,
    ]
    print("peak memory: one child process, cells one after another", file=sys.stderr, flush=True)
    proc = subprocess.run(cmd, env=env, cwd=ROOT, stdout=subprocess.PIPE, text=True)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(CHILD_MARKER)]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"The memory child failed (exit {proc.returncode}); see stderr above.")
    return json.loads(lines[-1][len(CHILD_MARKER) :])


def size_argv(cfg: Config) -> list[str]:
    return [
        f"--num_layers={cfg.num_layers}",
        f"--hidden_units={cfg.hidden_units}",
        f"--pt_tasks={cfg.pt_tasks}",
        f"--ft_tasks={cfg.ft_tasks}",
        f"--batch={cfg.batch}",
        f"--meta_pt_batch={cfg.meta_pt_batch}",
        f"--pt_graphs={cfg.pt_graphs}",
        f"--ft_graphs={cfg.ft_graphs}",
        f"--pt_steps={cfg.pt_steps}",
        f"--hvp_modes={','.join(cfg.hvp_modes)}",
    ]


# -- report -----------------------------------------------------------------------------


def _median_ms(values) -> float:
    return float(np.median(values)) * 1e3


def summarize(cfg: Config, bench: Bench, times: dict, memory: dict) -> dict:
    ref_ms = _median_ms(times[REFERENCE])
    pt_step_ms = ref_ms / cfg.pt_steps
    skipped = bench.skipped()
    rows = []
    for cell in bench.loops:
        n, k, mode = cell
        name = cell_name(cell)
        parts = np.asarray(bench.parts[cell])
        med = _median_ms(times[name])
        mem = memory.get(name, {})
        pt_peak, meta_peak = mem.get("pt_peak_mib"), mem.get("meta_step_peak_mib")
        measured = pt_peak is not None and pt_peak > 0 and meta_peak is not None
        ratio_mem = meta_peak / pt_peak if measured else None
        meta_ms = _median_ms(parts[:, 1])
        rows.append(
            {
                "name": name,
                "neumann_terms": n,
                "ft_unroll_steps": k,
                "hvp_mode": mode,
                "median_ms": med,
                "times_ms": [float(t) * 1e3 for t in times[name]],
                "pt_part_median_ms": _median_ms(parts[:, 0]),
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
        "pt_steps": cfg.pt_steps,
        "median_ms": ref_ms,
        "pt_step_ms": pt_step_ms,
        "times_ms": [float(t) * 1e3 for t in times[REFERENCE]],
    }
    target = None
    for r in rows:
        if (r["neumann_terms"], r["ft_unroll_steps"], r["hvp_mode"]) == (
            TARGET_N,
            TARGET_K,
            DEFAULT_HVP_MODE,
        ):
            target = {
                "pt_steps": cfg.pt_steps,
                "neumann_terms": TARGET_N,
                "ft_unroll_steps": TARGET_K,
                "hvp_mode": DEFAULT_HVP_MODE,
                "value": r["time_ratio"],
                "limit": TARGET_LIMIT,
                "pass": r["time_ratio"] <= TARGET_LIMIT,
                "memory_ratio": r["memory_ratio"],
            }
    return {"reference": reference, "cells": rows, "target": target}


def report(cfg: Config, bench: Bench, summary: dict, memory_method: str | None) -> None:
    ref = summary["reference"]
    print()
    print(
        f"metapt_tf GIN meta-step benchmark  (TF {tf.__version__}, {platform.machine()}, "
        f"{os.cpu_count()} CPUs, {'GPU' if gpu_device() else 'CPU'}, float32)"
    )
    print(
        f"GIN {cfg.num_layers} layers x {cfg.hidden_units} units ({bench.num_params:,} PT "
        f"parameters), PT head {cfg.pt_tasks} weighted sigmoid tasks, FT head {cfg.ft_tasks} "
        f"tasks, batch {cfg.batch} ego-graphs (meta-step PT batch {cfg.meta_pt_batch}); "
        f"persistent FT head, one FT-head step per PT step; Neumann alpha 1e-4"
    )
    print(
        f"{cfg.repeats} round-robin repetitions after {cfg.warmup} warm-up calls; medians. "
        f"P = {cfg.pt_steps} PT steps per meta-step."
    )
    print(
        f"{REFERENCE} (P={cfg.pt_steps} PT steps): {ref['median_ms']:.1f} ms, "
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
            f"{r['meta_gradient_in_pt_steps']:>9.2f} {_fmt(r['pt_peak_mib'], '8.1f'):>8} "
            f"{_fmt(r['meta_step_peak_mib'], '8.1f'):>8} {_fmt(r['memory_ratio'], '9.2f'):>9}"
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
    print()
    t = summary["target"]
    label = (
        f"meta-step / {cfg.pt_steps} PT steps (P={cfg.pt_steps}, K={TARGET_K}, N={TARGET_N}, "
        f"hvp={DEFAULT_HVP_MODE})"
    )
    if t is None:
        print(f"TARGET {label} <= {TARGET_LIMIT}: not measured (cell not in the grid)")
    else:
        note = "" if cfg.pt_steps == TARGET_P else f" (the target is defined for P={TARGET_P})"
        print(
            f"TARGET {label} <= {TARGET_LIMIT}: {t['value']:.2f} "
            f"{'PASS' if t['pass'] else 'FAIL'}{note}"
        )


# -- main -------------------------------------------------------------------------------


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.gin_meta_step_bench",
        description="Time and peak memory of one meta-step on the GIN versus P plain PT steps.",
    )
    parser.add_argument("--repeats", type=int, help=f"timed rounds (default {FULL_REPEATS})")
    parser.add_argument(
        "--warmup", type=int, help=f"untimed calls per function (default {FULL_WARMUP})"
    )
    parser.add_argument("--num_layers", type=int)
    parser.add_argument("--hidden_units", type=int)
    parser.add_argument("--pt_tasks", type=int)
    parser.add_argument("--ft_tasks", type=int)
    parser.add_argument("--batch", type=int, help="ego-graphs per PT / FT batch")
    parser.add_argument("--meta_pt_batch", type=int, help="ego-graphs in the meta-step's PT batch")
    parser.add_argument("--pt_graphs", type=int, help="synthetic PT graphs")
    parser.add_argument("--ft_graphs", type=int, help="synthetic labelled FT graphs")
    parser.add_argument("--pt_steps", type=int, default=TARGET_P, help="P, PT steps per meta-step")
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
        help=f"tiny sizes {QUICK} and {QUICK_REPEATS} repeats (a smoke run)",
    )
    parser.add_argument(CHILD_FLAG, metavar="WORKDIR", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    preset = QUICK if args.quick else FULL
    sizes = {k: getattr(args, k) if getattr(args, k) is not None else v for k, v in preset.items()}
    repeats = args.repeats or (QUICK_REPEATS if args.quick else FULL_REPEATS)
    warmup = args.warmup or (QUICK_WARMUP if args.quick else FULL_WARMUP)
    modes = HVP_MODES if args.hvp_modes == "all" else tuple(args.hvp_modes.split(","))
    if any(m not in HVP_MODES for m in modes) or DEFAULT_HVP_MODE not in modes:
        parser.error(f"--hvp_modes must include {DEFAULT_HVP_MODE!r}, drawn from {HVP_MODES}.")
    if repeats < 1 or warmup < 1 or args.pt_steps < 1 or min(sizes.values()) < 1:
        parser.error("--repeats, --warmup, --pt_steps and the sizes must be >= 1.")
    if sizes["ft_graphs"] > sizes["pt_graphs"]:
        parser.error("--ft_graphs must be <= --pt_graphs (the FT graphs are drawn from them).")
    cfg = Config(repeats=repeats, warmup=warmup, pt_steps=args.pt_steps, hvp_modes=modes, **sizes)
    return args, cfg


def main(argv=None) -> int:
    args, cfg = parse_args(argv)
    if args._memory_child:
        result = memory_child(cfg, args._memory_child)
        print(CHILD_MARKER + json.dumps(result), flush=True)
        return 0

    with tempfile.TemporaryDirectory(prefix="gin_meta_step_bench_") as workdir:
        start = time.perf_counter()
        bench = Bench(cfg, workdir)
        print(
            f"built the problem and {len(bench.loops)} loops in "
            f"{time.perf_counter() - start:.1f} s; warm-up (tracing):",
            file=sys.stderr,
            flush=True,
        )
        warm_up(bench, cfg.warmup)
        times = hypergrad_bench.time_round_robin(bench.functions(), cfg.repeats)

        memory, memory_method = {}, None
        device = gpu_device()
        if not args.no_memory and device:
            memory = measure_memory(bench, lambda: _GpuPeak(device))
            memory_method = (
                f"peak allocator memory on {device} above the memory in use before "
                f"{MEMORY_CALLS} call(s) (tf.config.experimental.get_memory_info)"
            )
        elif not args.no_memory:
            memory = run_memory_child(cfg, workdir)
            memory_method = (
                f"peak process RSS increase over {MEMORY_CALLS} call(s), above the RSS before "
                "them, in a fresh child process run with TF_ENABLE_ONEDNN_OPTS=0"
            )
        summary = summarize(cfg, bench, times, memory)
    report(cfg, bench, summary, memory_method)
    if args.json:
        payload = {
            "config": asdict(cfg),
            "environment": {
                "tensorflow": tf.__version__,
                "python": platform.python_version(),
                "machine": platform.machine(),
                "cpu_count": os.cpu_count(),
                "gpu": gpu_device() is not None,
            },
            "default_hvp_mode": DEFAULT_HVP_MODE,
            "num_pt_params": bench.num_params,
            "memory_method": memory_method,
            **summary,
        }
        Path(args.json).write_text(json.dumps(payload, indent=2) + "\n")
        print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
