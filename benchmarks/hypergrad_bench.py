"""Cost of the meta-gradient relative to plain pre-training, on a multitask MLP.

    python -m benchmarks.hypergrad_bench                # full setting, ~2-4 min on 2 CPU cores
    python -m benchmarks.hypergrad_bench --quick        # tiny sizes, a smoke run
    python -m benchmarks.hypergrad_bench --json out.json --no_memory

Setting (the defaults): a 784-512-512 ReLU backbone, a PT head of 1000 sigmoid
tasks weighted by w = 2 * sigmoid(phi) (phi: one meta-parameter per task), an FT
head of 40 sigmoid tasks, batch 256, float32, random data with fixed seeds.

Measured, each compiled once with `tf.function` (graph mode) and once with
`jit_compile=True` (XLA), on the same variables and batches:

* pt_step[...]: one PT training step, forward + backward + Adam update of the
  PT parameters (theta = backbone + PT head); once with `hypergrad.Adam`'s
  update rule assigned to variables and once with `tf_keras.optimizers.Adam`.
  The faster of the two (per compile mode) is the reference `pt_step`.
* gradient: dL_PT/dtheta (forward + backward, no update).
* hvp[mode]: H u for a dense random u over theta, for both HVP modes.
* meta_gradient[mode]: one full `hypergrad.MetaGradient` step: head-only FT
  unroll with K=1 `hypergrad.Adam(1e-4)` step, then the implicit PT part with
  `Neumann(num_terms=1, alpha=1e-4)`.
* breakdown of the meta-gradient: `unroll_finetune` alone, and
  `implicit_hypergradient` alone (given the unroll's v) for both modes.

Timing: after warm-up (trace/compile), repetitions run round-robin over all
measured functions (both compile modes interleaved, the starting point rotating
each round), so slow drifts of a noisy machine hit every function alike; each
function's median is reported, and every ratio divides medians of the same run.

Peak memory: CPU TensorFlow has no allocator statistics, so each function runs
again in a fresh child process (this script re-invoked with a hidden flag) and
the child reports the increase of its peak resident set size (Linux VmHWM, the
counter behind getrusage's ru_maxrss), in MiB:
* peak: over 3 calls of the already compiled function, above the process RSS
  just before them (freed heap handed back to the OS first, and the peak counter
  reset through /proc/self/clear_refs): the working memory of one call.
* first: over the first 2 calls (tracing/XLA compilation included), above the
  RSS after the model, data and a cheap warm-up op exist.
The child runs with TF_ENABLE_ONEDNN_OPTS=0: with oneDNN on, TensorFlow's CPU
allocator is a BFC pool that keeps freed memory, so RSS would hide the peak of
every call after the first. Glibc's mmap threshold is pinned too
(MALLOC_MMAP_THRESHOLD_), so large tensor buffers go back to the OS when freed
and RSS follows live memory. The tensors are the same as in the timed run; only
the kernels (Eigen instead of oneDNN) differ.
"""

import os

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")  # Keras 2, as metapt_tf requires
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import argparse  # noqa: E402
import concurrent.futures  # noqa: E402
import ctypes  # noqa: E402
import gc  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import platform  # noqa: E402
import re  # noqa: E402
import resource  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable  # noqa: E402
from dataclasses import asdict, dataclass  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
import tf_keras  # noqa: E402

from metapt_tf import hypergrad  # noqa: E402

MODES = ("graph", "xla")
HVP_MODES = hypergrad.HVP_MODES
DEFAULT_HVP_MODE = hypergrad.DEFAULT_HVP_MODE
PT_STEP_HG = "pt_step[hypergrad.Adam]"
PT_STEP_KERAS = "pt_step[tf_keras.Adam]"
PT_STEP_NAMES = (PT_STEP_HG, PT_STEP_KERAS)
HVP_LIMIT = 1.8  # hvp / gradient, default HVP mode
META_LIMIT = 3.0  # meta_gradient / pt_step, default HVP mode
MEMORY_CALLS = 3
CHILD_FLAG = "--_memory_child"
CHILD_MARKER = "MEMORY_RESULT "
ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Config:
    batch: int
    hidden: int
    input_dim: int
    pt_tasks: int
    ft_tasks: int
    repeats: int
    warmup: int
    ft_learning_rate: float = 1e-4
    neumann_terms: int = 1
    neumann_alpha: float = 1e-4
    seed: int = 0


FULL = {"batch": 256, "hidden": 512, "input_dim": 784, "pt_tasks": 1000, "ft_tasks": 40}
FULL_REPEATS = 200
QUICK = {"batch": 16, "hidden": 32, "input_dim": 64, "pt_tasks": 50, "ft_tasks": 8}
QUICK_REPEATS = 3


def names() -> list[str]:
    """Every measured function, in table order."""
    return [
        *PT_STEP_NAMES,
        "gradient",
        *(f"hvp[{m}]" for m in HVP_MODES),
        *(f"meta_gradient[{m}]" for m in HVP_MODES),
        "unroll",
        *(f"implicit[{m}]" for m in HVP_MODES),
    ]


class Problem:
    """The multitask MLP as plain variables, its losses and fixed random batches."""

    def __init__(self, cfg: Config):
        rng = np.random.default_rng(cfg.seed)
        d, h, t, f, b = cfg.input_dim, cfg.hidden, cfg.pt_tasks, cfg.ft_tasks, cfg.batch

        def weight(name, fan_in, fan_out):
            scale = math.sqrt(2.0 / fan_in)
            return tf.Variable(
                (scale * rng.standard_normal((fan_in, fan_out))).astype(np.float32), name=name
            )

        def bias(name, n):
            return tf.Variable(np.zeros(n, np.float32), name=name)

        self.w1, self.b1 = weight("W1", d, h), bias("b1", h)
        self.w2, self.b2 = weight("W2", h, h), bias("b2", h)
        self.wp, self.bp = weight("Wp", h, t), bias("bp", t)
        self.wf, self.bf = weight("Wf", h, f), bias("bf", f)
        self.phi = tf.Variable((0.5 * rng.standard_normal(t)).astype(np.float32), name="phi")
        self.backbone = [self.w1, self.b1, self.w2, self.b2]
        self.pt_params = [*self.backbone, self.wp, self.bp]
        self.meta_params = [self.phi]

        def batch(labels):
            x = rng.standard_normal((b, d)).astype(np.float32)
            y = (rng.random((b, labels)) < 0.3).astype(np.float32)
            return tf.constant(x), tf.constant(y)

        self.pt_batch = batch(t)
        self.ft_train_batch = batch(f)
        self.ft_val_batch = batch(f)
        self.hvp_vector = [
            tf.constant((0.01 * rng.standard_normal(p.shape)).astype(np.float32))
            for p in self.pt_params
        ]
        self.ft_params0 = [tf.convert_to_tensor(self.wf), tf.convert_to_tensor(self.bf)]

    def features(self, x):
        h1 = tf.nn.relu(tf.matmul(x, self.w1) + self.b1)
        return tf.nn.relu(tf.matmul(h1, self.w2) + self.b2)

    def pt_loss(self, batch):
        x, y = batch
        logits = tf.matmul(self.features(x), self.wp) + self.bp
        bce = tf.nn.sigmoid_cross_entropy_with_logits(labels=y, logits=logits)
        weights = 2.0 * tf.sigmoid(self.phi)
        return tf.reduce_mean(bce * weights)

    def ft_loss(self, head, batch):
        x, y = batch
        w, b = head
        logits = tf.matmul(self.features(x), w) + b
        return tf.reduce_mean(tf.nn.sigmoid_cross_entropy_with_logits(labels=y, logits=logits))


class Bench:
    """Builds the measured functions (zero-argument callables) for both compile modes."""

    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.p = Problem(cfg)
        self.ft_rule = hypergrad.Adam(cfg.ft_learning_rate)
        self.solver = hypergrad.Neumann(num_terms=cfg.neumann_terms, alpha=cfg.neumann_alpha)
        self.ft_state0 = self.ft_rule.init(self.p.ft_params0)
        # PT optimizers: hypergrad.Adam's state lives in variables; tf_keras.Adam is built
        # up front so that no variable is created while tracing.
        self.pt_rule = hypergrad.Adam(1e-4)
        self.pt_adam_step = tf.Variable(0.0, name="pt_adam_step")
        self.pt_adam_m = [tf.Variable(tf.zeros_like(v), name="m") for v in self.p.pt_params]
        self.pt_adam_v = [tf.Variable(tf.zeros_like(v), name="v") for v in self.p.pt_params]
        self.keras_adam = tf_keras.optimizers.Adam(1e-4)
        self.keras_adam.build(self.p.pt_params)
        self._v_backbone = None

    # -- the computations -------------------------------------------------------------

    def _gradient(self, pt_batch):
        with tf.GradientTape() as tape:
            loss = self.p.pt_loss(pt_batch)
        return loss, tape.gradient(loss, self.p.pt_params)

    def _pt_step_hypergrad(self, pt_batch):
        loss, grads = self._gradient(pt_batch)
        params = [tf.convert_to_tensor(v) for v in self.p.pt_params]
        state = hypergrad.AdamState(
            step=tf.convert_to_tensor(self.pt_adam_step),
            m=[tf.convert_to_tensor(m) for m in self.pt_adam_m],
            v=[tf.convert_to_tensor(v) for v in self.pt_adam_v],
        )
        new_params, new_state = self.pt_rule.apply(params, grads, state)
        for var, value in zip(self.p.pt_params, new_params, strict=True):
            var.assign(value)
        for var, value in zip(self.pt_adam_m, new_state.m, strict=True):
            var.assign(value)
        for var, value in zip(self.pt_adam_v, new_state.v, strict=True):
            var.assign(value)
        self.pt_adam_step.assign(new_state.step)
        return loss

    def _pt_step_keras(self, pt_batch):
        loss, grads = self._gradient(pt_batch)
        self.keras_adam.apply_gradients(zip(grads, self.p.pt_params, strict=True))
        return loss

    def _hvp(self, mode):
        def fn(pt_batch, vector):
            return hypergrad.hvp(lambda: self.p.pt_loss(pt_batch), self.p.pt_params, vector, mode)

        return fn

    def _unroll(self, ft_train_batch, ft_val_batch, ft_params, ft_state):
        return hypergrad.unroll_finetune(
            lambda head, step: self.p.ft_loss(head, ft_train_batch),
            lambda head: self.p.ft_loss(head, ft_val_batch),
            ft_params,
            self.p.pt_params,
            update_rule=self.ft_rule,
            num_steps=1,
            ft_state=ft_state,
        )

    def _implicit(self, mode):
        n_head = len(self.p.pt_params) - len(self.p.backbone)

        def fn(pt_batch, v_backbone):
            return hypergrad.implicit_hypergradient_with_info(
                lambda: self.p.pt_loss(pt_batch),
                self.p.pt_params,
                self.p.meta_params,
                [*v_backbone, *([None] * n_head)],  # head-only FT never reads the PT head
                solver=self.solver,
                hvp_mode=mode,
            )

        return fn

    def _meta_gradient(self, mode, xla):
        return hypergrad.MetaGradient(
            pt_loss_fn=self.p.pt_loss,
            ft_train_loss_fn=lambda head, batch, step: self.p.ft_loss(head, batch),
            ft_val_loss_fn=self.p.ft_loss,
            pt_params=self.p.pt_params,
            meta_params=self.p.meta_params,
            ft_update_rule=self.ft_rule,
            num_ft_steps=1,
            solver=self.solver,
            hvp_mode=mode,
            jit_compile=xla,
        )

    def v_backbone(self):
        """v = dL_FT^val/d backbone from one unroll (the input of the implicit part alone)."""
        if self._v_backbone is None:
            v = self._unroll(
                self.p.ft_train_batch, self.p.ft_val_batch, self.p.ft_params0, self.ft_state0
            ).v
            self._v_backbone = [tf.convert_to_tensor(u) for u in v[: len(self.p.backbone)]]
        return self._v_backbone

    def build(self, name: str, mode: str) -> Callable[[], object]:
        """The zero-argument callable that runs `name` compiled in `mode`."""
        xla = mode == "xla"
        p = self.p

        def compiled(fn):
            return tf.function(fn, jit_compile=xla, autograph=False)

        if name == PT_STEP_HG:
            fn = compiled(self._pt_step_hypergrad)
            return lambda: fn(p.pt_batch)
        if name == PT_STEP_KERAS:
            fn = tf.function(self._pt_step_keras, jit_compile=xla)
            return lambda: fn(p.pt_batch)
        if name == "gradient":
            fn = compiled(self._gradient)
            return lambda: fn(p.pt_batch)
        for hmode in HVP_MODES:
            if name == f"hvp[{hmode}]":
                fn = compiled(self._hvp(hmode))
                return lambda: fn(p.pt_batch, p.hvp_vector)
            if name == f"meta_gradient[{hmode}]":
                step = self._meta_gradient(hmode, xla)
                return lambda: step(
                    p.pt_batch, p.ft_train_batch, p.ft_val_batch, p.ft_params0, self.ft_state0
                )
            if name == f"implicit[{hmode}]":
                fn = compiled(self._implicit(hmode))
                v = self.v_backbone()
                return lambda: fn(p.pt_batch, v)
        if name == "unroll":
            fn = compiled(self._unroll)
            return lambda: fn(p.ft_train_batch, p.ft_val_batch, p.ft_params0, self.ft_state0)
        raise ValueError(f"Unknown measurement {name!r}; expected one of {names()}.")


def _block(out) -> None:
    """Waits for `out` by fetching its smallest tensor to the host."""
    tensors = [t for t in tf.nest.flatten(out) if isinstance(t, tf.Tensor)]
    if tensors:
        min(tensors, key=lambda t: t.shape.num_elements() or 0).numpy()


# -- timing -----------------------------------------------------------------------------


def _time_call(fn) -> float:
    start = time.perf_counter()
    _block(fn())
    return time.perf_counter() - start


def time_round_robin(fns: dict, repeats: int, rounds: dict | None = None) -> dict:
    """Seconds per call of each zero-argument callable, repetitions interleaved.

    `rounds` optionally caps the number of rounds a function takes part in (it then
    joins only the first rounds, still interleaved with the others).
    """
    keys = list(fns)
    rounds = rounds or {}
    times = {k: [] for k in keys}
    gc.collect()
    for r in range(repeats):
        shift = r % len(keys)
        gc.disable()
        try:
            for k in keys[shift:] + keys[:shift]:
                if r < rounds.get(k, repeats):
                    times[k].append(_time_call(fns[k]))
        finally:
            gc.enable()
        gc.collect()
        if (r + 1) % max(1, repeats // 5) == 0:
            print(f"  timed round {r + 1}/{repeats}", file=sys.stderr, flush=True)
    return times


def check_recompiles(fns: dict, perturb: Callable[[], object]) -> dict:
    """Finds functions whose compiled program is rebuilt when variable values change.

    Each function is timed once as it is (compiled, nothing changed since its last
    call), then once right after `perturb` (a PT step, which changes the PT
    parameters' values, as training does between calls). A call more than 3x (and
    5 ms) slower after the change means the compiler baked values into the program
    and recompiled. Returns {key: {"steady_ms", "after_change_ms", "recompiles"}}.

    A program with the values baked in may also have been constant-folded by the
    compiler, so its "steady" call is no measure of the work (it can return a
    precomputed result): only the call after the change counts.
    """
    out = {}
    for key, fn in fns.items():
        steady = min(_time_call(fn) for _ in range(2))
        _block(perturb())
        after = _time_call(fn)
        out[key] = {
            "steady_ms": steady * 1e3,
            "after_change_ms": after * 1e3,
            "recompiles": after > 3 * steady + 5e-3,
        }
    return out


# -- memory (child processes) -----------------------------------------------------------


def _status_kib(field: str) -> int | None:
    try:
        text = Path("/proc/self/status").read_text()
    except OSError:
        return None
    match = re.search(rf"^{field}:\s+(\d+) kB", text, re.MULTILINE)
    return int(match.group(1)) if match else None


def _peak_kib() -> int:
    peak = _status_kib("VmHWM")
    if peak is None:  # no procfs: ru_maxrss is the same counter (KiB on Linux)
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak


def _rss_kib() -> int:
    rss = _status_kib("VmRSS")
    return _peak_kib() if rss is None else rss


def _reset_peak() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
        return True
    except OSError:
        return False


def _trim_heap() -> None:
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def memory_child(cfg: Config, key: str) -> dict:
    """Runs in the child: peak RSS increase of one measured function (MiB)."""
    name, mode = key.rsplit("|", 1)
    bench = Bench(cfg)
    fn = bench.build(name, mode)
    cheap = tf.function(lambda x: tf.reduce_sum(x * x))
    _block(cheap(tf.ones([8])))
    _trim_heap()
    base = _rss_kib()
    _reset_peak()
    for _ in range(2):  # trace/compile, then one steady call
        _block(fn())
    first = _peak_kib() - base
    _trim_heap()
    base = _rss_kib()
    reset = _reset_peak()
    for _ in range(MEMORY_CALLS):
        _block(fn())
    peak = _peak_kib() - base
    return {
        "peak_mib": peak / 1024.0 if reset else None,
        "first_mib": first / 1024.0,
    }


def run_memory_children(cfg: Config, keys: list[str], jobs: int) -> dict:
    """Runs one child process per measured function (`jobs` at a time); RSS is per process,
    so children running side by side do not disturb each other's figures."""
    env = dict(os.environ)
    env.update(
        TF_USE_LEGACY_KERAS="1",
        TF_CPP_MIN_LOG_LEVEL="3",
        TF_ENABLE_ONEDNN_OPTS="0",  # oneDNN's pooling CPU allocator would hide the peaks
        MALLOC_MMAP_THRESHOLD_="131072",
        PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")])),
    )

    def run(key: str) -> dict:
        cmd = [sys.executable, "-m", "benchmarks.hypergrad_bench", *size_argv(cfg), CHILD_FLAG, key]
        proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True)
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(CHILD_MARKER)]
        if proc.returncode != 0 or not lines:
            raise RuntimeError(
                f"Memory child for {key} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}"
            )
        print(f"  memory: {key} done", file=sys.stderr, flush=True)
        return json.loads(lines[-1][len(CHILD_MARKER) :])

    print(f"peak memory: {len(keys)} child processes, {jobs} at a time", file=sys.stderr)
    with concurrent.futures.ThreadPoolExecutor(max_workers=jobs) as pool:
        return dict(zip(keys, pool.map(run, keys), strict=True))


def size_argv(cfg: Config) -> list[str]:
    return [
        f"--batch={cfg.batch}",
        f"--hidden={cfg.hidden}",
        f"--input_dim={cfg.input_dim}",
        f"--pt_tasks={cfg.pt_tasks}",
        f"--ft_tasks={cfg.ft_tasks}",
    ]


# -- matmul FLOP model ------------------------------------------------------------------


def flop_model(cfg: Config) -> dict:
    """Multiply-accumulates of the matmuls, relative to one gradient (elementwise work and
    the Adam update left out). L1..L4: one matmul of each layer over the batch."""
    b, d, h, t, f = cfg.batch, cfg.input_dim, cfg.hidden, cfg.pt_tasks, cfg.ft_tasks
    l1, l2, l3, l4 = b * d * h, b * h * h, b * h * t, b * h * f
    forward = l1 + l2 + l3
    gradient = 2 * l1 + 3 * l2 + 3 * l3  # no input gradient for the first layer
    tangent_dense = 2 * l1 + 6 * l2 + 6 * l3  # JVP of forward+backward, dense tangent
    tangent_backbone = 2 * l1 + 6 * l2 + 4 * l3  # tangent zero on the PT head
    mixed_tangent = l1 + 2 * l2 + 2 * l3  # tangent of the forward pass, dense p
    unroll = 4 * l1 + 6 * l2 + 8 * l4  # 2 backbone forwards, 2 backbone backwards, head
    implicit = {
        "forward_over_reverse": gradient + tangent_backbone + forward + mixed_tangent,
        "reverse_over_reverse": gradient + tangent_backbone + mixed_tangent,
    }
    out = {"gradient": 1.0, "hvp": (gradient + tangent_dense) / gradient}
    out["unroll"] = unroll / gradient
    for mode, cost in implicit.items():
        out[f"implicit[{mode}]"] = cost / gradient
        out[f"meta_gradient[{mode}]"] = (unroll + cost) / gradient
    return out


# -- report -----------------------------------------------------------------------------


def summarize(times: dict, memory: dict, recompiles: dict) -> tuple[list[dict], dict]:
    rows, reference = [], {}
    medians = {k: float(np.median(v)) * 1e3 for k, v in times.items()}
    for mode in MODES:
        candidates = [(medians[(n, mode)], n) for n in PT_STEP_NAMES if (n, mode) in medians]
        if candidates:
            reference[mode] = min(candidates)[1]
    for name in names():
        for mode in MODES:
            if (name, mode) not in times:
                continue
            t = np.asarray(times[(name, mode)]) * 1e3
            med = medians[(name, mode)]
            mem = memory.get(f"{name}|{mode}", {})
            rec = recompiles.get((name, mode), {})
            rows.append(
                {
                    "name": name,
                    "mode": mode,
                    "median_ms": med,
                    "p25_ms": float(np.percentile(t, 25)),
                    "p75_ms": float(np.percentile(t, 75)),
                    "min_ms": float(t.min()),
                    "times_ms": [float(x) for x in t],
                    "ratio_to_pt_step": med / medians[(reference[mode], mode)],
                    "ratio_to_gradient": med / medians[("gradient", mode)],
                    "recompiles_on_variable_change": rec.get("recompiles"),
                    "steady_ms": rec.get("steady_ms"),
                    "after_change_ms": rec.get("after_change_ms"),
                    "peak_rss_mib": mem.get("peak_mib"),
                    "first_call_rss_mib": mem.get("first_mib"),
                }
            )
    return rows, reference


def _fmt(x, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def report(cfg: Config, rows: list[dict], reference: dict, memory_on: bool) -> dict:
    by = {(r["name"], r["mode"]): r for r in rows}
    modes = [m for m in MODES if ("gradient", m) in by]
    print()
    print(
        f"metapt_tf hypergradient benchmark  (TF {tf.__version__}, {platform.machine()}, "
        f"{os.cpu_count()} CPUs, float32)"
    )
    print(
        f"MLP {cfg.input_dim}-{cfg.hidden}-{cfg.hidden} ReLU, PT head {cfg.pt_tasks} weighted "
        f"sigmoid tasks, FT head {cfg.ft_tasks} tasks, batch {cfg.batch}; meta-gradient: "
        f"head-only FT, K=1 hypergrad.Adam({cfg.ft_learning_rate:g}), "
        f"Neumann(num_terms={cfg.neumann_terms}, alpha={cfg.neumann_alpha:g})"
    )
    print(
        f"{cfg.repeats} round-robin repetitions after {cfg.warmup} warm-up calls; medians. "
        f"Default HVP mode: {DEFAULT_HVP_MODE}."
    )
    for mode in modes:
        print(f"pt_step reference [{mode}]: {reference[mode]} (the faster PT step in this run)")
    print()
    header = (
        f"{'name':<40} {'mode':<5} {'median ms':>10} {'IQR ms':>8} {'x pt_step':>9} "
        f"{'x grad':>7} {'peak MiB':>9} {'1st MiB':>8}  note"
    )
    print(header)
    print("-" * len(header))
    for r in rows:
        label = r["name"]
        if label == "unroll" or label.startswith("implicit["):
            label = "  " + label + " (part)"
        iqr = r["p75_ms"] - r["p25_ms"]
        note = ""
        if r["recompiles_on_variable_change"]:
            note = "R"
        print(
            f"{label:<40} {r['mode']:<5} {r['median_ms']:>10.2f} {iqr:>8.2f} "
            f"{r['ratio_to_pt_step']:>9.2f} {r['ratio_to_gradient']:>7.2f} "
            f"{_fmt(r['peak_rss_mib'], '9.1f'):>9} {_fmt(r['first_call_rss_mib'], '8.1f'):>8}"
            f"  {note}".rstrip()
        )
    print()
    print(
        "x pt_step, x grad: median / median of the reference pt_step, of gradient, same mode. "
        "IQR: interquartile\n  range of the per-call times."
    )
    if memory_on:
        print(
            "peak MiB: peak process RSS increase (MiB) during 3 calls of the compiled function, "
            "in a fresh child process,\n  over its RSS just before them; 1st MiB: the same over "
            "the first 2 calls, tracing/XLA compilation included.\n  Children run with "
            "TF_ENABLE_ONEDNN_OPTS=0 (oneDNN's pooling CPU allocator would keep freed memory)."
        )
    else:
        print("peak MiB, 1st MiB: peak memory not measured (--no_memory).")
    if any(r["recompiles_on_variable_change"] for r in rows):
        print(
            "R: recompiles after every change of a variable's value (checked after a PT step): "
            "XLA took the\n  variables' values as compile-time constants, so every call in "
            "training pays a compilation.\n  Its time is one call after a PT step (not in the "
            "rounds); the memory figures are of calls\n  with nothing changed."
        )
    print()

    breakdown = {}
    for mode in modes:
        unroll = by[("unroll", mode)]["median_ms"]
        grad = by[("gradient", mode)]["median_ms"]
        for hmode in HVP_MODES:
            implicit = by[(f"implicit[{hmode}]", mode)]["median_ms"]
            meta = by[(f"meta_gradient[{hmode}]", mode)]["median_ms"]
            hvp = by[(f"hvp[{hmode}]", mode)]["median_ms"]
            breakdown[f"{mode}|{hmode}"] = {
                "unroll_ms": unroll,
                "implicit_ms": implicit,
                "sum_ms": unroll + implicit,
                "meta_gradient_ms": meta,
                "implicit_minus_hvp_ms": implicit - hvp,
            }
            print(
                f"breakdown [{mode}] meta_gradient[{hmode}] {meta:.2f} ms: unroll {unroll:.2f} "
                f"({unroll / grad:.2f} grad) + implicit {implicit:.2f} ({implicit / grad:.2f} grad)"
                f" = {unroll + implicit:.2f} ms"
            )
    print()
    model = flop_model(cfg)
    print(
        "matmul FLOP model, in gradients: hvp (dense u) "
        f"{model['hvp']:.2f}; unroll {model['unroll']:.2f}; "
        + "; ".join(
            f"implicit[{m}] {model[f'implicit[{m}]']:.2f}, "
            f"meta_gradient[{m}] {model[f'meta_gradient[{m}]']:.2f}"
            for m in HVP_MODES
        )
        + "; pt_step 1.00 + the Adam update"
    )
    print()

    targets = []
    for mode in modes:
        hvp = by[(f"hvp[{DEFAULT_HVP_MODE}]", mode)]
        meta = by[(f"meta_gradient[{DEFAULT_HVP_MODE}]", mode)]
        for label, row, value, limit in (
            (
                f"hvp/grad (default mode={DEFAULT_HVP_MODE})",
                hvp,
                hvp["ratio_to_gradient"],
                HVP_LIMIT,
            ),
            ("meta/pt_step", meta, meta["ratio_to_pt_step"], META_LIMIT),
        ):
            ok = value <= limit
            entry = {"mode": mode, "target": label, "value": value, "limit": limit, "pass": ok}
            print(f"TARGET [{mode}] {label} <= {limit}: {value:.2f} {'PASS' if ok else 'FAIL'}")
            if row["recompiles_on_variable_change"]:
                entry["recompiles_on_variable_change"] = True
                print(f"  ({row['name']} [{mode}] recompiles after every variable update: R)")
            targets.append(entry)
    return {"breakdown": breakdown, "flop_model": model, "targets": targets}


# -- main -------------------------------------------------------------------------------


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.hypergrad_bench",
        description="Time and peak memory of PT steps, gradients, HVPs and meta-gradients.",
    )
    parser.add_argument("--repeats", type=int, help=f"timed rounds (default {FULL_REPEATS})")
    parser.add_argument("--warmup", type=int, default=2, help="untimed calls per function")
    parser.add_argument("--batch", type=int)
    parser.add_argument("--hidden", type=int)
    parser.add_argument("--input_dim", type=int)
    parser.add_argument("--pt_tasks", type=int)
    parser.add_argument("--ft_tasks", type=int)
    parser.add_argument("--no_xla", action="store_true", help="graph mode only")
    parser.add_argument("--no_memory", action="store_true", help="skip the peak-RSS children")
    parser.add_argument(
        "--memory_jobs", type=int, default=2, help="memory child processes run side by side"
    )
    parser.add_argument("--json", metavar="PATH", help="write all figures as JSON")
    parser.add_argument(
        "--quick",
        action="store_true",
        help=f"tiny sizes {QUICK} and {QUICK_REPEATS} repeats (a smoke run)",
    )
    parser.add_argument(CHILD_FLAG, metavar="NAME|MODE", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    preset = QUICK if args.quick else FULL
    sizes = {k: getattr(args, k) if getattr(args, k) is not None else v for k, v in preset.items()}
    repeats = args.repeats or (QUICK_REPEATS if args.quick else FULL_REPEATS)
    if repeats < 1 or args.warmup < 1 or args.memory_jobs < 1 or min(sizes.values()) < 1:
        parser.error("--repeats, --warmup, --memory_jobs and the sizes must be >= 1.")
    return args, Config(repeats=repeats, warmup=args.warmup, **sizes)


def main(argv=None) -> int:
    args, cfg = parse_args(argv)
    if args._memory_child:
        result = memory_child(cfg, args._memory_child)
        print(CHILD_MARKER + json.dumps(result), flush=True)
        return 0

    modes = ["graph"] if args.no_xla else list(MODES)
    bench = Bench(cfg)
    fns = {}
    for mode in modes:
        for name in names():
            fns[(name, mode)] = bench.build(name, mode)
    print(f"warm-up: tracing/compiling {len(fns)} functions", file=sys.stderr, flush=True)
    for key, fn in fns.items():
        start = time.perf_counter()
        for _ in range(cfg.warmup):
            _block(fn())
        print(
            f"  {key[0]} [{key[1]}]: {time.perf_counter() - start:.1f} s",
            file=sys.stderr,
            flush=True,
        )
    print("checking for recompilation after a variable update", file=sys.stderr, flush=True)
    perturb = bench.build(PT_STEP_HG, "graph")
    recompiles = check_recompiles(fns, perturb)
    rounds = {k: 0 for k, r in recompiles.items() if r["recompiles"]}
    for key in rounds:
        print(
            f"  {key[0]} [{key[1]}] recompiles after each variable update: its one call "
            "after the update is its time (left out of the rounds)",
            file=sys.stderr,
            flush=True,
        )
    times = time_round_robin(fns, cfg.repeats, rounds)
    for key in rounds:
        times[key] = [recompiles[key]["after_change_ms"] / 1e3]

    memory = {}
    if not args.no_memory:
        memory = run_memory_children(cfg, [f"{n}|{m}" for n, m in fns], args.memory_jobs)

    rows, reference = summarize(times, memory, recompiles)
    extra = report(cfg, rows, reference, memory_on=not args.no_memory)
    if args.json:
        payload = {
            "config": asdict(cfg),
            "environment": {
                "tensorflow": tf.__version__,
                "python": platform.python_version(),
                "machine": platform.machine(),
                "cpu_count": os.cpu_count(),
            },
            "default_hvp_mode": DEFAULT_HVP_MODE,
            "pt_step_reference": reference,
            "memory_method": None
            if args.no_memory
            else "peak process RSS increase (MiB) in a fresh child process run with "
            f"TF_ENABLE_ONEDNN_OPTS=0: peak_rss_mib over {MEMORY_CALLS} calls of the compiled "
            "function; first_call_rss_mib over the first 2 calls including tracing/compilation",
            "measurements": rows,
            **extra,
        }
        Path(args.json).write_text(json.dumps(payload, indent=2) + "\n")
        print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
