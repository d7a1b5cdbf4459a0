"""Cost of one online meta-step relative to plain SimCLR steps, on the ECG ResNet-18.

    python -m benchmarks.ecg_meta_step_bench              # paper model, PT batch 32 (CPU)
    python -m benchmarks.ecg_meta_step_bench --quick      # tiny sizes, a smoke run
    python -m benchmarks.ecg_meta_step_bench --pt_batch=256 --json out.json   # the paper's batch

Setting (the defaults): the ECG experiment of `metapt_tf.training.ecg_benchmark`
with the model of the `paper` variant of configs/ecg_simclr.py: a 1-D ResNet-18
(channels 32/64/128/256, two basic blocks per stage, kernel 15) on 12-lead
records of length 1024, a projection head 256 -> 256 -> 128 and the NT-Xent loss
of two views of every record, both drawn by the learned augmentation pipeline
(`meta_params.AugmentationPipeline`, phi: time warp with a per-example magnitude
CNN of 32 channels x 4 layers, learned mask strength and noise scale; the draws
made once per batch by `pt_batch_fn`). The problem is `ecg_benchmark.build_problem`,
the data synthetic 12-lead records (`ecg.make_synthetic_ecg`) read through the
experiment's own `tf.data` pipelines: PT batches from folds 1-9, FT-train / FT-val
batches of 32 from 500 labelled records (a 400 / 100 split), a multi-label FT head
256 -> 5. The loop's settings are the paper variant's: P = 10, head "persistent"
with one FT-head step per PT step, PT Adam 1e-3, FT-head Adam 1e-2, Neumann alpha
1e-3, Adam meta-optimizer, graph mode (no XLA).

The PT batch is a flag: the paper trains with 256 records per batch (512 views
through the ResNet per step); the default here is 32, to keep a CPU run in
reach: one run of the defaults took 25 minutes on 2 CPU cores shared with other
jobs (about 4 of them tracing, 8 the timed rounds, 9 the memory child, which
`--no_memory` skips; expect less on an idle machine). The ratios are of compute
that scales with the batch on both sides, but the meta-step's FT batches (32)
do not grow with it: at batch 256 the FT unroll weighs less against a PT step
than here.

What is timed is what `online.run` runs, through the loop's own compiled steps
(`online._Loop`), one loop per grid cell, all sharing one model (the harness of
benchmarks/meta_step_harness.py, shared with benchmarks/gin_meta_step_bench.py):

* pt_reference: `loop.pt_steps(P)`: P SimCLR steps in one `tf.function`, each
  one a PT batch, two views drawn and applied by the pipeline, forward +
  backward of ResNet and projection head, a Keras Adam update of theta, and one
  plain FT-head step (an FT batch, backbone features in inference mode, a
  `hypergrad.Adam` step of the head).
* meta_step[N, K, mode]: `loop.pt_steps(P)` followed by
  `loop.meta_step_and_update()`: a meta PT batch (the PT batch size), K FT
  batches and an FT val batch, K differentiable FT-head steps, v = dL_val/dtheta,
  the implicit part with Neumann(N terms) and HVP mode `mode` (the mixed term
  differentiates the SimCLR loss through the pipeline's warp, mask and noise),
  then the Adam step on phi. The second part, `meta_gradient`, is also reported
  in units of one PT step (pt_reference / P).

Grid: N (Neumann terms) in {1, 5} x K (unrolled FT steps) in {1, 5}, P = 10,
HVP mode `hypergrad.DEFAULT_HVP_MODE` (`--hvp_modes all` adds the other).
time ratio = median(meta_step) / median(pt_reference). No target is set
for this setting: the ratios are informational (the GIN benchmark has the target).

Timing, peak memory: as in benchmarks/gin_meta_step_bench.py: warm-up (tracing)
first, then round-robin repetitions over the reference and all cells, medians.
On a GPU, the allocator's peak above the memory in use before the calls; on CPU,
the peak RSS increase in a fresh child process run with TF_ENABLE_ONEDNN_OPTS=0
(Eigen's convolutions instead of oneDNN's: the same tensors, other kernels). Per
cell: PT peak over `pt_steps(P)`, meta-step peak over `pt_steps(P)` +
`meta_step_and_update()`, and their ratio. `--no_memory` skips the child.

Every convolution keeps at least 16 channels, `--quick` included: TF 2.21's
oneDNN CPU kernels corrupt memory on 1-D convolutions of 8 channels or fewer at
small batch sizes.
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
    gpu_device,
)
from configs import ecg_simclr  # noqa: E402
from metapt_tf.data import ecg  # noqa: E402
from metapt_tf.training import ecg_benchmark  # noqa: E402

PAPER_PT_BATCH = 256
MIN_CHANNELS = 16  # oneDNN's CPU 1-D convolutions break at 8 channels or fewer
DEFAULT_P = ecg_simclr.get_config("paper").meta.pt_steps_per_meta_step  # 10


@dataclass(frozen=True)
class Config:
    channels: tuple[int, ...]
    blocks: tuple[int, ...]
    kernel_size: int
    length: int
    projection_hidden: int
    projection_out: int
    warp_channels: int
    warp_conv_layers: int
    pt_batch: int
    ft_batch: int
    records: int
    labelled: int
    pt_steps: int  # P
    hvp_modes: tuple[str, ...]
    repeats: int
    warmup: int
    seed: int = 0


FULL = {
    "channels": (32, 64, 128, 256),
    "blocks": (2, 2, 2, 2),
    "kernel_size": 15,
    "length": 1024,
    "projection_hidden": 256,
    "projection_out": 128,
    "warp_channels": 32,
    "warp_conv_layers": 4,
    "pt_batch": 32,
    "ft_batch": 32,
    "records": 1024,  # about 920 in folds 1-9: the PT pool, the 500 labelled drawn from it
    "labelled": 500,  # split 400 / 100: full FT-train and FT-val batches of 32
}
FULL_REPEATS = 5
FULL_WARMUP = 1
QUICK = {
    "channels": (16, 16),
    "blocks": (1, 1),
    "kernel_size": 5,
    "length": 256,
    "projection_hidden": 16,
    "projection_out": 16,
    "warp_channels": 16,
    "warp_conv_layers": 2,
    "pt_batch": 8,
    "ft_batch": 8,
    "records": 120,
    "labelled": 25,  # split 15 / 10
}
QUICK_REPEATS = 2
QUICK_WARMUP = 1
TUPLE_SIZES = ("channels", "blocks")


# -- the problem and the loops ----------------------------------------------------------


def experiment_config(cfg: Config):
    """configs/ecg_simclr.py's `paper` variant at this benchmark's sizes."""
    config = ecg_simclr.get_config("paper")
    config.seeds = (cfg.seed,)
    config.num_labelled = (cfg.labelled,)
    d = config.data
    d.num_records, d.seed, d.length = cfg.records, cfg.seed, cfg.length
    d.duration_s = min(float(d.duration_s), cfg.length / ecg.PTBXL_FS)
    d.pt_batch_size, d.ft_batch_size = cfg.pt_batch, cfg.ft_batch
    m = config.model
    m.channels, m.blocks, m.kernel_size = cfg.channels, cfg.blocks, cfg.kernel_size
    m.projection_hidden, m.projection_out = cfg.projection_hidden, cfg.projection_out
    config.augment.warp_channels = cfg.warp_channels
    config.augment.warp_conv_layers = cfg.warp_conv_layers
    config.meta.pt_steps_per_meta_step = cfg.pt_steps
    config.meta.seed = cfg.seed
    ecg_benchmark.validate_config(config)
    return config


class Bench(meta_step_harness.LoopBench):
    """One shared SimCLR problem (as `ecg_benchmark._Runner.pretrain` builds it for
    simclr_meta) and one `online._Loop` per grid cell."""

    def __init__(self, cfg: Config, workdir: str):
        config = experiment_config(cfg)
        self.config = config
        data = ecg_benchmark.prepare_data(config, say=lambda _: None)
        runner = ecg_benchmark._Runner(config, data, workdir, cfg.seed, say=lambda _: None)
        self.problem = ecg_benchmark.build_problem(config, cfg.seed).problem
        self.num_params = sum(int(np.prod(v.shape)) for v in self.problem.pt_params)
        self.num_meta_params = sum(int(np.prod(v.shape)) for v in self.problem.meta_params)
        train, val = runner.splits.labelled[cfg.labelled]
        self.ft_batches = (min(cfg.ft_batch, train.size), min(cfg.ft_batch, val.size))
        # One pipeline of each kind; every loop iterates over it on its own.
        loops = meta_step_harness.make_loops(
            cfg,
            self.problem,
            runner.pt_data,
            runner._ft_stream(train, 1),
            runner._ft_stream(val, 2),
            config.meta,
        )
        super().__init__(cfg, loops)


# -- memory -----------------------------------------------------------------------------


def _join(values) -> str:
    return ",".join(str(v) for v in values)


def size_argv(cfg: Config) -> list[str]:
    return [
        f"--channels={_join(cfg.channels)}",
        f"--blocks={_join(cfg.blocks)}",
        f"--kernel_size={cfg.kernel_size}",
        f"--length={cfg.length}",
        f"--projection_hidden={cfg.projection_hidden}",
        f"--projection_out={cfg.projection_out}",
        f"--warp_channels={cfg.warp_channels}",
        f"--warp_conv_layers={cfg.warp_conv_layers}",
        f"--pt_batch={cfg.pt_batch}",
        f"--ft_batch={cfg.ft_batch}",
        f"--records={cfg.records}",
        f"--labelled={cfg.labelled}",
        f"--pt_steps={cfg.pt_steps}",
        f"--hvp_modes={_join(cfg.hvp_modes)}",
    ]


# -- report -----------------------------------------------------------------------------


def report(cfg: Config, bench: Bench, summary: dict, memory_method: str | None) -> None:
    m = bench.config.meta
    resnet = "ResNet-18" if cfg.blocks == (2, 2, 2, 2) else "ResNet"
    paper = "" if cfg.pt_batch == PAPER_PT_BATCH else f" (the paper: {PAPER_PT_BATCH})"
    print()
    print(
        f"metapt_tf ECG SimCLR meta-step benchmark  (TF {tf.__version__}, {platform.machine()}, "
        f"{os.cpu_count()} CPUs, {'GPU' if gpu_device() else 'CPU'}, float32)"
    )
    print(
        f"1-D {resnet}: channels {'/'.join(map(str, cfg.channels))}, blocks "
        f"{'/'.join(map(str, cfg.blocks))}, kernel {cfg.kernel_size}, length {cfg.length}, "
        f"12 leads; projection head {cfg.channels[-1]}-{cfg.projection_hidden}-"
        f"{cfg.projection_out} ({bench.num_params:,} PT parameters); NT-Xent on two views "
        f"from the augmentation pipeline (phi: {bench.num_meta_params:,} parameters, warp CNN "
        f"{cfg.warp_channels} channels x {cfg.warp_conv_layers} layers)"
    )
    print(
        f"PT batch {cfg.pt_batch} records{paper}, also the meta-step's PT batch; FT head "
        f"{cfg.channels[-1]}->{ecg.NUM_CLASSES} multi-label, FT-train / FT-val batches "
        f"{bench.ft_batches[0]} / {bench.ft_batches[1]}; persistent FT head, one FT-head step "
        f"per PT step; PT {m.pt_optimizer} {m.pt_learning_rate:g}, FT {m.ft_optimizer} "
        f"{m.ft_learning_rate:g}, Neumann alpha {m.neumann_alpha:g}"
    )
    print(
        f"{cfg.repeats} round-robin repetitions after {cfg.warmup} warm-up calls; medians. "
        f"P = {cfg.pt_steps} PT steps per meta-step."
    )
    meta_step_harness.print_table(summary, memory_method)
    print()
    print("No target is set for the ECG setting; these ratios are informational.")


# -- main -------------------------------------------------------------------------------


def _int_tuple(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated ints, e.g. 32,64. Received: {text!r}"
        ) from None


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.ecg_meta_step_bench",
        description="Time and peak memory of one meta-step on the ECG ResNet versus P plain "
        "SimCLR steps.",
    )
    meta_step_harness.add_repeat_arguments(parser, FULL_REPEATS, FULL_WARMUP)
    parser.add_argument("--channels", type=_int_tuple, help="ResNet stage widths, e.g. 32,64")
    parser.add_argument("--blocks", type=_int_tuple, help="basic blocks per stage, e.g. 2,2")
    parser.add_argument("--kernel_size", type=int)
    parser.add_argument("--length", type=int, help="samples per record")
    parser.add_argument("--projection_hidden", type=int)
    parser.add_argument("--projection_out", type=int)
    parser.add_argument("--warp_channels", type=int, help="channels of the warp-magnitude CNN")
    parser.add_argument("--warp_conv_layers", type=int)
    parser.add_argument(
        "--pt_batch",
        type=int,
        help=f"records per PT batch (default {FULL['pt_batch']}; the paper: {PAPER_PT_BATCH})",
    )
    parser.add_argument("--ft_batch", type=int, help="records per FT-train / FT-val batch")
    parser.add_argument("--records", type=int, help="synthetic records (fold 10 is held out)")
    parser.add_argument("--labelled", type=int, help="labelled FT records (FT-train + FT-val)")
    meta_step_harness.add_run_arguments(parser, DEFAULT_P, QUICK, QUICK_REPEATS)
    args = parser.parse_args(argv)
    sizes, repeats, warmup, modes = meta_step_harness.resolve(
        args,
        parser,
        full=FULL,
        quick=QUICK,
        repeats=(FULL_REPEATS, QUICK_REPEATS),
        warmup=(FULL_WARMUP, QUICK_WARMUP),
    )
    scalars = [v for k, v in sizes.items() if k not in TUPLE_SIZES]
    if repeats < 1 or warmup < 1 or args.pt_steps < 1 or min(scalars) < 1:
        parser.error("--repeats, --warmup, --pt_steps and the sizes must be >= 1.")
    if len(sizes["channels"]) != len(sizes["blocks"]) or min(sizes["blocks"]) < 1:
        parser.error("--blocks must have one entry >= 1 per entry of --channels.")
    if min(*sizes["channels"], sizes["warp_channels"]) < MIN_CHANNELS:
        parser.error(
            f"--channels and --warp_channels must be >= {MIN_CHANNELS}: TF 2.21's oneDNN CPU "
            "1-D convolutions corrupt memory at 8 channels or fewer. Received: "
            f"--channels={_join(sizes['channels'])} --warp_channels={sizes['warp_channels']}"
        )
    if sizes["labelled"] < 2:
        parser.error(f"--labelled must be >= 2. Received: {sizes['labelled']}")
    cfg = Config(repeats=repeats, warmup=warmup, pt_steps=args.pt_steps, hvp_modes=modes, **sizes)
    return args, cfg


def main(argv=None) -> int:
    args, cfg = parse_args(argv)
    return meta_step_harness.main(
        args,
        cfg,
        module="benchmarks.ecg_meta_step_bench",
        make_bench=Bench,
        size_argv=size_argv,
        summarize_fn=meta_step_harness.summarize,
        report=report,
        json_extra=lambda bench: {"num_meta_params": bench.num_meta_params, "target": None},
    )


if __name__ == "__main__":
    sys.exit(main())
