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
(`online._Loop`), one loop per grid cell, all sharing one model (the harness of
benchmarks/meta_step_harness.py, shared with benchmarks/ecg_meta_step_bench.py):

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
(P PT steps + meta-gradient + meta-update) / (P PT steps). Target:
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
import platform  # noqa: E402
import sys  # noqa: E402
from dataclasses import dataclass  # noqa: E402

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from benchmarks import meta_step_harness  # noqa: E402
from benchmarks.meta_step_harness import (  # noqa: E402
    DEFAULT_HVP_MODE,
    gpu_device,
)
from configs import ppi_multitask  # noqa: E402
from metapt_tf.training import ppi_benchmark  # noqa: E402

TARGET_P, TARGET_N, TARGET_K = 10, 1, 1
TARGET_LIMIT = 1.6  # meta-step / P PT steps


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


class Bench(meta_step_harness.LoopBench):
    """One shared PPI problem (as `ppi_benchmark._Runner.pretrain_online` builds it) and
    one `online._Loop` per grid cell."""

    def __init__(self, cfg: Config, workdir: str):
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
        loops = meta_step_harness.make_loops(
            cfg,
            self.problem,
            runner.pt_data(),
            ft_train,
            ft_val,
            config.meta,
            meta_pt_data=runner.meta_pt_data(),
        )
        super().__init__(cfg, loops)


# -- memory -----------------------------------------------------------------------------


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


def summarize(cfg: Config, bench: Bench, times: dict, memory: dict) -> dict:
    summary = meta_step_harness.summarize(bench, times, memory)
    target = None
    for r in summary["cells"]:
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
    return {**summary, "target": target}


def report(cfg: Config, bench: Bench, summary: dict, memory_method: str | None) -> None:
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
    meta_step_harness.print_table(summary, memory_method)
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
    meta_step_harness.add_repeat_arguments(parser, FULL_REPEATS, FULL_WARMUP)
    parser.add_argument("--num_layers", type=int)
    parser.add_argument("--hidden_units", type=int)
    parser.add_argument("--pt_tasks", type=int)
    parser.add_argument("--ft_tasks", type=int)
    parser.add_argument("--batch", type=int, help="ego-graphs per PT / FT batch")
    parser.add_argument("--meta_pt_batch", type=int, help="ego-graphs in the meta-step's PT batch")
    parser.add_argument("--pt_graphs", type=int, help="synthetic PT graphs")
    parser.add_argument("--ft_graphs", type=int, help="synthetic labelled FT graphs")
    meta_step_harness.add_run_arguments(parser, TARGET_P, QUICK, QUICK_REPEATS)
    args = parser.parse_args(argv)
    sizes, repeats, warmup, modes = meta_step_harness.resolve(
        args,
        parser,
        full=FULL,
        quick=QUICK,
        repeats=(FULL_REPEATS, QUICK_REPEATS),
        warmup=(FULL_WARMUP, QUICK_WARMUP),
    )
    if repeats < 1 or warmup < 1 or args.pt_steps < 1 or min(sizes.values()) < 1:
        parser.error("--repeats, --warmup, --pt_steps and the sizes must be >= 1.")
    if sizes["ft_graphs"] > sizes["pt_graphs"]:
        parser.error("--ft_graphs must be <= --pt_graphs (the FT graphs are drawn from them).")
    cfg = Config(repeats=repeats, warmup=warmup, pt_steps=args.pt_steps, hvp_modes=modes, **sizes)
    return args, cfg


def main(argv=None) -> int:
    args, cfg = parse_args(argv)
    return meta_step_harness.main(
        args,
        cfg,
        module="benchmarks.gin_meta_step_bench",
        make_bench=Bench,
        size_argv=size_argv,
        summarize_fn=lambda bench, times, memory: summarize(cfg, bench, times, memory),
        report=report,
    )


if __name__ == "__main__":
    sys.exit(main())
