"""Meta-step throughput of the online loop on one device and on two replicas, side by side.

    python -m benchmarks.distribute_scaling_bench            # full setting, ~2 min on 2 CPU cores
    python -m benchmarks.distribute_scaling_bench --quick    # tiny sizes, a smoke run
    python -m benchmarks.distribute_scaling_bench --json out.json

The process splits its CPU into 2 logical devices and builds the same problem
three times, one loop each (`online._Loop`, the compiled steps `online.run`
runs):

* default: no strategy, one device (what `config.meta.distribute="default"` runs);
* mirrored x1: `MirroredStrategy` over /cpu:0 alone (the strategy's own overhead);
* mirrored x2: `MirroredStrategy` over /cpu:0 and /cpu:1, each replica on half
  of the same global batch.

Setting (the defaults): a 784-256-256 ReLU MLP backbone, a 10-class PT head, one
weight per PT example (4096 examples), global PT batch 512, FT batches of 128,
K=1 FT step (Adam), Neumann with N=1, the default HVP mode, float32, random
data with fixed seeds.

Measured: `meta_step` (one meta-gradient and the meta-update, as
`_Loop.meta_step_and_update`) and `pt_step` (one PT step with its plain FT-head
step), after warm-up, repetitions round-robin over all six (the starting point
rotating each round), medians. The ratios divide medians of the same run:
throughput of mirrored x2 over default (above 1: two replicas are faster).

Logical CPU devices share the process's CPU thread pools, so on a CPU-only
machine two replicas do not bring more compute: the ratio measures what the
split costs (per-replica work on half batches, all-reduces, replicated FT
unroll). With one GPU per replica the same code runs each replica on its own
device.
"""

import os

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")  # Keras 2, as metapt_tf requires
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import argparse  # noqa: E402
import gc  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from dataclasses import asdict, dataclass  # noqa: E402

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from metapt_tf.meta_params import ExampleWeights  # noqa: E402
from metapt_tf.training import distribute, interfaces, online  # noqa: E402

LOOPS = ("default", "mirrored x1", "mirrored x2")
STEPS = ("meta_step", "pt_step")
DEVICES = {"mirrored x1": "/cpu:0", "mirrored x2": "/cpu:0,/cpu:1"}
RATIO_PREFIX = "RATIO"


@dataclass(frozen=True)
class Config:
    input_dim: int
    hidden: int
    num_pt: int
    batch: int
    ft_batch: int
    repeats: int
    warmup: int
    classes: int = 10
    seed: int = 0


FULL = {"input_dim": 784, "hidden": 256, "num_pt": 4096, "batch": 512, "ft_batch": 128}
FULL_REPEATS = 30
QUICK = {"input_dim": 32, "hidden": 16, "num_pt": 256, "batch": 32, "ft_batch": 16}
QUICK_REPEATS = 3


def _split_cpu() -> None:
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)


def build_loop(cfg: Config, name: str):
    """The loop for `name`, over a problem built in its strategy's scope (same seeds)."""
    c = online.default_config()
    c.distribute = "default" if name == "default" else "mirrored"
    c.devices = DEVICES.get(name, "")
    c.seed = cfg.seed
    strategy = distribute.make_strategy(c)
    rng = np.random.default_rng(cfg.seed)
    x = rng.standard_normal((cfg.num_pt + 2 * cfg.ft_batch, cfg.input_dim)).astype(np.float32)
    y = rng.integers(0, cfg.classes, size=len(x))
    with distribute.scope(strategy):
        tf.keras.utils.set_random_seed(cfg.seed)
        backbone = tf.keras.Sequential(
            [
                tf.keras.Input((cfg.input_dim,)),
                tf.keras.layers.Dense(cfg.hidden, activation="relu"),
                tf.keras.layers.Dense(cfg.hidden, activation="relu"),
            ]
        )
        pt_head = tf.keras.layers.Dense(cfg.classes)
        pt_head.build((None, cfg.hidden))
        weights = ExampleWeights(cfg.num_pt)

    def pt_loss_fn(batch):
        logits = pt_head(backbone(batch["image"], training=True))
        ce = tf.nn.sparse_softmax_cross_entropy_with_logits(batch["label"], logits)
        return tf.reduce_mean(weights.weights(batch["index"]) * ce)

    problem = interfaces.MetaPretrainProblem(
        backbone=backbone,
        pt_params=backbone.trainable_variables + pt_head.trainable_variables,
        meta_params=weights.variables_list,
        pt_loss_fn=pt_loss_fn,
        num_ft_classes=cfg.classes,
    )

    def dataset(lo, hi, batch):
        arrays = {"image": x[lo:hi], "label": y[lo:hi], "index": np.arange(hi - lo)}
        return tf.data.Dataset.from_tensor_slices(arrays).repeat().batch(batch, True)

    n, f = cfg.num_pt, cfg.ft_batch
    return online._Loop(
        problem,
        dataset(0, n, cfg.batch),
        dataset(n, n + f, f),
        dataset(n + f, n + 2 * f, f),
        c,
        None,
        strategy,
    )


def _time(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def measure(cfg: Config) -> dict:
    """Seconds per call of each (loop, step), repetitions interleaved round-robin."""
    loops = {name: build_loop(cfg, name) for name in LOOPS}
    fns = {}
    for name, loop in loops.items():
        fns[(name, "meta_step")] = loop.meta_step_and_update  # fetches its metrics: blocks
        fns[(name, "pt_step")] = lambda loop=loop: loop.pt_steps(1)
    for key, fn in fns.items():
        warm = sum(_time(fn) for _ in range(cfg.warmup))
        print(f"  warm-up {key[0]} {key[1]}: {warm:.1f} s", file=sys.stderr, flush=True)
    keys = list(fns)
    times = {k: [] for k in keys}
    gc.collect()
    for r in range(cfg.repeats):
        shift = r % len(keys)
        gc.disable()
        try:
            for k in keys[shift:] + keys[:shift]:
                times[k].append(_time(fns[k]))
        finally:
            gc.enable()
        if (r + 1) % max(1, cfg.repeats // 5) == 0:
            print(f"  timed round {r + 1}/{cfg.repeats}", file=sys.stderr, flush=True)
    replicas = {name: loop.replicas.num_replicas for name, loop in loops.items()}
    return {"times": times, "replicas": replicas}


def report(cfg: Config, measured: dict) -> dict:
    times = measured["times"]
    median = {k: float(np.median(v)) * 1e3 for k, v in times.items()}
    print()
    print(
        f"metapt_tf distribution scaling benchmark  (TF {tf.__version__}, {platform.machine()}, "
        f"{os.cpu_count()} CPUs, 2 logical CPU devices, float32)"
    )
    print(
        f"MLP {cfg.input_dim}-{cfg.hidden}-{cfg.hidden} ReLU, PT head {cfg.classes} classes, "
        f"{cfg.num_pt} per-example weights, global PT batch {cfg.batch}, FT batch "
        f"{cfg.ft_batch}; K=1 Adam FT step, Neumann N=1"
    )
    print(f"{cfg.repeats} round-robin repetitions after {cfg.warmup} warm-up calls; medians.")
    print()
    header = f"{'step':<10} " + " ".join(f"{name + ' ms':>16}" for name in LOOPS)
    header += f" {'x2 / default':>13} {'x2 / x1':>8}"
    print(header)
    print("-" * len(header))
    rows, ratios = [], {}
    for step in STEPS:
        ms = {name: median[(name, step)] for name in LOOPS}
        # Throughput ratios: time on one device over time on two replicas.
        vs_default = ms["default"] / ms["mirrored x2"]
        vs_x1 = ms["mirrored x1"] / ms["mirrored x2"]
        ratios[step] = vs_default
        print(
            f"{step:<10} "
            + " ".join(f"{ms[name]:>16.2f}" for name in LOOPS)
            + f" {vs_default:>13.2f} {vs_x1:>8.2f}"
        )
        rows.append(
            {
                "step": step,
                "median_ms": ms,
                "times_ms": {name: [t * 1e3 for t in times[(name, step)]] for name in LOOPS},
                "throughput_ratio_x2_vs_default": vs_default,
                "throughput_ratio_x2_vs_x1": vs_x1,
            }
        )
    print()
    print(
        "x2 / default, x2 / x1: throughput of 2 replicas over that of one device (above 1: "
        "faster),\n  each the ratio of medians of the same run, on the same global batch."
    )
    for step in STEPS:
        print(f"{RATIO_PREFIX} {step} throughput 2 replicas / 1 device: {ratios[step]:.2f}")
    return {"rows": rows, "ratios": ratios, "replicas": measured["replicas"]}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.distribute_scaling_bench",
        description="Meta-step and PT-step throughput on 1 device vs 2 MirroredStrategy replicas.",
    )
    parser.add_argument("--repeats", type=int, help=f"timed rounds (default {FULL_REPEATS})")
    parser.add_argument("--warmup", type=int, default=2, help="untimed calls per function")
    for field in FULL:
        parser.add_argument(f"--{field}", type=int)
    parser.add_argument("--json", metavar="PATH", help="write all figures as JSON")
    parser.add_argument(
        "--quick", action="store_true", help=f"tiny sizes {QUICK}, {QUICK_REPEATS} repeats"
    )
    args = parser.parse_args(argv)
    preset = QUICK if args.quick else FULL
    sizes = {k: getattr(args, k) if getattr(args, k) is not None else v for k, v in preset.items()}
    repeats = args.repeats or (QUICK_REPEATS if args.quick else FULL_REPEATS)
    if repeats < 1 or args.warmup < 1 or min(sizes.values()) < 1:
        parser.error("--repeats, --warmup and the sizes must be >= 1.")
    if sizes["batch"] % 2:
        parser.error(f"--batch must be even (split over 2 replicas). Received: {sizes['batch']}.")
    return args, Config(repeats=repeats, warmup=args.warmup, **sizes)


def main(argv=None) -> int:
    args, cfg = parse_args(argv)
    _split_cpu()  # before TensorFlow initialises its devices

    print("building 3 loops and tracing their steps", file=sys.stderr, flush=True)
    result = report(cfg, measure(cfg))
    if args.json:
        payload = {
            "config": asdict(cfg),
            "tensorflow": tf.__version__,
            "cpus": os.cpu_count(),
            **result,
        }
        tmp = args.json + ".tmp"
        with open(tmp, "w") as f:
            json.dump(payload, f, indent=1)
        os.replace(tmp, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
