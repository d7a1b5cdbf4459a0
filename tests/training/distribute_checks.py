"""Checks of the online loop under tf.distribute, run in fresh processes by test_distribute.py.

Logical devices must be configured before TensorFlow initialises its devices,
which a pytest process has long done, so each check runs here in a subprocess
and prints one JSON line (prefixed by RESULT_MARKER) with what it measured:

    python tests/training/distribute_checks.py mirrored    # 2 logical CPUs, one process
    python tests/training/distribute_checks.py worker OUT  # one MultiWorkerMirrored worker
                                                           # (TF_CONFIG set by the caller)
    python tests/training/distribute_checks.py gin         # GIN meta-PT, fine-tuning and
                                                           # CoTrain on padded graphs,
                                                           # 2 logical CPUs
"""

import os

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")  # Keras 2, as metapt_tf requires
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import importlib.util  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import gin_checks  # noqa: E402 (same directory)
import ml_collections  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from metapt_tf.meta_params import ExampleWeights  # noqa: E402
from metapt_tf.training import (  # noqa: E402
    distribute,
    finetune,
    interfaces,
    mnist_experiments,
    multitask,
    online,
)

RESULT_MARKER = "DISTRIBUTE_CHECK "
ROOT = Path(__file__).resolve().parents[2]
DEVICES = "/cpu:0,/cpu:1"
N_PT, SHAPE, CLASSES, BATCH = 96, (4, 4, 1), 3, 16
# (HVP mode, solver) pairs of the meta-gradient comparison: both modes, and CG (run
# unrolled under the strategy) in the default mode.
CASES = (
    ("forward_over_reverse", "neumann"),
    ("reverse_over_reverse", "neumann"),
    ("reverse_over_reverse", "cg"),
    ("forward_over_reverse", "amortized_neumann"),
)


def _data(seed):
    rng = np.random.default_rng(seed)
    protos = rng.normal(size=(CLASSES,) + SHAPE)
    labels = rng.integers(0, CLASSES, size=N_PT + 64)
    images = protos[labels] + 0.5 * rng.normal(size=(labels.size,) + SHAPE)
    noisy = labels.copy()
    noisy[:30] = (labels[:30] + 1) % CLASSES  # the first 30 PT labels are wrong
    return images, labels, noisy


def _dataset(arrays, seed):
    ds = tf.data.Dataset.from_tensor_slices(arrays).shuffle(96, seed=seed)
    # No autotuning threads: the many iterators of one process would each wait for
    # theirs when destroyed at exit (minutes in all).
    options = tf.data.Options()
    options.autotune.enabled = False
    options.experimental_optimization.inject_prefetch = False
    return ds.repeat().batch(BATCH, drop_remainder=True).with_options(options)


def build(dtype="float64", seed=0, pt_batch_sizes=None, noise=False):
    """The test_online problem (per-example weights against noisy labels), in `dtype`
    (the variables' dtype; the Keras policy in force sets the compute dtype).

    `pt_batch_sizes` collects the static batch size each traced PT loss sees. With
    `noise`, `pt_batch_fn` adds input noise drawn from a generator that is saved
    in the checkpoint (`checkpoint_extras`)."""
    tf.keras.utils.set_random_seed(seed)
    images, labels, noisy = _data(seed)
    var_dtype = "float32" if dtype == "mixed" else dtype
    layer_dtype = {} if dtype == "mixed" else {"dtype": dtype}  # "mixed": the policy's
    backbone = tf.keras.Sequential(
        [
            tf.keras.Input(SHAPE, dtype=var_dtype),
            tf.keras.layers.Flatten(**layer_dtype),
            tf.keras.layers.Dense(16, activation="tanh", **layer_dtype),
        ]
    )
    pt_head = tf.keras.layers.Dense(CLASSES, **layer_dtype)
    pt_head.build((None, 16))
    weights = ExampleWeights(N_PT, dtype=var_dtype)

    def pt_loss_fn(batch):
        if pt_batch_sizes is not None:
            pt_batch_sizes.append(int(batch["image"].shape[0]))
        logits = tf.cast(pt_head(backbone(batch["image"], training=True)), var_dtype)
        ce = tf.nn.sparse_softmax_cross_entropy_with_logits(batch["label"], logits)
        return tf.reduce_mean(weights.weights(batch["index"]) * ce)

    generator = tf.random.Generator.from_seed(seed + 100)

    def pt_batch_fn(batch):
        draw = generator.normal(batch["image"].shape, dtype=var_dtype)
        return {**batch, "image": batch["image"] + 0.3 * draw}

    problem = interfaces.MetaPretrainProblem(
        backbone=backbone,
        pt_params=backbone.trainable_variables + pt_head.trainable_variables,
        meta_params=weights.variables_list,
        pt_loss_fn=pt_loss_fn,
        num_ft_classes=CLASSES,
        pt_batch_fn=pt_batch_fn if noise else None,
        checkpoint_extras={"noise_generator": generator} if noise else None,
    )
    x = images.astype(var_dtype)
    pt = {"image": x[:N_PT], "label": noisy[:N_PT], "index": np.arange(N_PT)}
    ft = {"image": x[N_PT:], "label": labels[N_PT:]}
    data = dict(
        pt_data=_dataset(pt, seed),
        ft_train_data=_dataset({k: v[:32] for k, v in ft.items()}, seed + 1),
        ft_val_data=_dataset({k: v[32:] for k, v in ft.items()}, seed + 2),
    )
    return problem, weights, data


def config(**overrides):
    c = online.default_config()
    c.update(
        dict(
            warmup_steps=4,
            pt_steps_per_meta_step=2,
            num_meta_steps=6,
            log_every=2,
            checkpoint_every=3,
            meta_learning_rate=0.1,
            ft_learning_rate=0.05,
            pt_learning_rate=0.01,
            neumann_alpha=0.1,
            cg_max_iters=4,
        )
    )
    c.update(overrides)
    return c


def _flat(tensors):
    return np.concatenate([np.reshape(np.asarray(t), [-1]) for t in tensors])


def _rel(a, b):
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def _replica_values(var):
    """Every replica's copy of a variable (one value for a plain variable)."""
    return [np.asarray(v.numpy()) for v in getattr(var, "values", (var,))]


def _replica_spread(variables):
    """The largest difference between the copies of any variable on different replicas."""
    spread = 0.0
    for var in variables:
        copies = _replica_values(var)
        spread = max([spread] + [float(np.max(np.abs(c - copies[0]))) for c in copies[1:]])
    return spread


def _strategy(name):
    # make_strategy hands out one Mirrored strategy per process and device set.
    return distribute.make_strategy(_config_for(name))


def _config_for(name, **overrides):
    return config(distribute=name, devices=DEVICES if name == "mirrored" else "", **overrides)


def one_meta_gradient(name, hvp_mode, solver, precision="none", dtype="float64"):
    """P PT steps, one meta-gradient and its update, through the loop's compiled steps."""
    strategy = _strategy(name)
    sizes = []
    with distribute.scope(strategy, precision):
        problem, weights, data = build(
            dtype if precision == "none" else "mixed", pt_batch_sizes=sizes
        )
    amortized = solver == "amortized_neumann"
    c = _config_for(name, hvp_mode=hvp_mode, solver=solver, mixed_precision=precision)
    loop = online._Loop(
        problem, data["pt_data"], data["ft_train_data"], data["ft_val_data"], c, None, strategy
    )
    # AmortizedNeumann (a fixed alpha under a strategy): a second meta-step, whose
    # solve starts from the iterate the first one kept.
    for _ in range(2 if amortized else 1):
        losses, _, _ = loop.pt_steps(3)  # losses, status codes, FT-head steps skipped
        out = loop._meta_step_fn()
        loop._apply_meta_fn(out["grads"])
    return {
        "pt_losses": losses.tolist(),
        "theta": _flat([p.numpy() for p in loop.pt_params]).tolist(),
        "meta_grads": _flat([g.numpy() for g in out["grads"]]).tolist(),
        "ft_val_loss": float(out["ft_val_loss"]),
        "phi": weights.phi.numpy().tolist(),
        "replica_spread": _replica_spread(
            loop.pt_params + loop.meta_params + loop.head + loop.solver.variables
        ),
        "pt_batch_sizes": sorted(set(sizes)),
    }


def short_run(name, noise=False, **overrides):
    strategy = _strategy(name)
    precision = overrides.get("mixed_precision", "none")
    with distribute.scope(strategy, precision):
        problem, weights, data = build("mixed" if precision != "none" else "float64", noise=noise)
    c = _config_for(name, **overrides)
    result = online.run(
        problem, **data, config=c, workdir=tempfile.mkdtemp(), log=None, strategy=strategy
    )
    history = result.history
    return {
        "phi": weights.phi.numpy().tolist(),
        "phi_dtype": weights.phi.dtype.name,
        "compute_dtype": problem.backbone.compute_dtype,
        "meta_steps": result.meta_steps,
        "skipped_meta_steps": result.skipped_meta_steps,
        "ft_val_loss": [v for v in history["ft_val_loss"] if v is not None],
        "meta_grad_norm": [v for v in history["meta_grad_norm"] if v is not None],
        "replica_spread": _replica_spread(weights.variables_list),
    }


def mnist_experiment_mirrored_bfloat16() -> dict:
    """The MNIST noisy-label experiment (what `make run` runs), tiny, with
    config.meta.distribute='mirrored' over both CPUs and mixed_bfloat16."""
    spec = importlib.util.spec_from_file_location("c", ROOT / "configs" / "mnist_noisy_labels.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    c = ml_collections.ConfigDict(module.get_config().to_dict())
    c.seeds, c.export = (0,), False
    c.data.num_pt, c.data.num_ft_test = 200, 100
    c.data.pt_batch_size, c.data.meta_pt_batch_size = 20, 40
    c.model.architecture, c.model.hidden_units = "mlp", (16,)
    c.meta.warmup_steps, c.meta.num_meta_steps, c.meta.pt_steps_per_meta_step = 2, 3, 2
    c.meta.log_every = c.meta.checkpoint_every = 3
    c.finetune.epochs = 1
    c.meta.distribute, c.meta.devices = "mirrored", DEVICES
    c.meta.mixed_precision = "mixed_bfloat16"
    workdir = tempfile.mkdtemp()
    results = mnist_experiments.run(c, workdir, log=None)
    phi = np.load(os.path.join(workdir, "seed_0", "meta_pt", "phi.npy"))
    return {
        "meta_steps": results["per_seed"][0]["meta_pt"]["meta_steps"],
        "accuracy": results["meta_pt_ft_test_accuracy_mean"],
        "phi_finite": bool(np.all(np.isfinite(phi))),
        "phi_moved": float(np.abs(phi).max()),
    }


def _error(fn):
    try:
        fn()
    except ValueError as e:
        return str(e)
    return None


def _timed(what, fn, *args, **kwargs):
    start = time.perf_counter()
    out = fn(*args, **kwargs)
    print(f"{what}: {time.perf_counter() - start:.1f} s", file=sys.stderr, flush=True)
    return out


def mirrored_checks() -> dict:
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
    tf.config.experimental.enable_op_determinism()
    out = {"logical_cpus": len(tf.config.list_logical_devices("CPU"))}

    strategy = _strategy("mirrored")
    shards = strategy.run(distribute.Replicas(strategy).shard, args=({"index": tf.range(BATCH)},))
    out["shards"] = [
        r.numpy().tolist() for r in strategy.experimental_local_results(shards["index"])
    ]

    for hvp_mode, solver in CASES:
        key = f"{hvp_mode}|{solver}"
        out[f"meta_gradient|{key}"] = {
            name: _timed(f"{key} {name}", one_meta_gradient, name, hvp_mode, solver)
            for name in ("default", "mirrored")
        }
    out["meta_gradient|mixed"] = {
        precision: _timed(
            precision,
            one_meta_gradient,
            "mirrored",
            "reverse_over_reverse",
            "neumann",
            precision,
            dtype="float32",
        )
        for precision in distribute.PRECISIONS
    }
    # With pt_batch_fn drawing input noise from a checkpointed generator.
    out["run"] = {
        name: _timed("run " + name, short_run, name, noise=True) for name in ("default", "mirrored")
    }
    out["run_bfloat16"] = _timed("bf16", short_run, "mirrored", mixed_precision="mixed_bfloat16")
    out["run_float16"] = _timed("f16", short_run, "default", mixed_precision="mixed_float16")
    out["run_jit"] = _timed("jit", short_run, "default", noise=True, jit_compile=True)
    out["mnist_binary"] = _timed("mnist binary", mnist_experiment_mirrored_bfloat16)
    out["jit_mirrored_error"] = _error(lambda: short_run("mirrored", jit_compile=True))

    def wrong_scope():
        problem, _, data = build()  # built outside the strategy's scope
        online.run(
            problem,
            **data,
            config=_config_for("mirrored"),
            workdir=tempfile.mkdtemp(),
            log=None,
            strategy=strategy,
        )

    out["wrong_scope_error"] = _error(wrong_scope)
    return out


def worker(out_path: str) -> None:
    """One MultiWorkerMirrored worker: the strategy first, then a short run; phi to a file.

    METAPT_WORKDIR is the shared workdir; METAPT_STOP_AFTER, if set, stops the run
    after that many meta-steps (a later launch resumes it)."""
    c = config(distribute="multi_worker_mirrored", checkpoint_every=2)
    strategy = distribute.make_strategy(c)
    tf.config.experimental.enable_op_determinism()
    stop = os.environ.get("METAPT_STOP_AFTER")
    with distribute.scope(strategy):
        problem, weights, data = build(noise=True)
    result = online.run(
        problem,
        **data,
        config=c,
        workdir=os.environ["METAPT_WORKDIR"],
        log=None,
        strategy=strategy,
        stop_after_meta_steps=int(stop) if stop else None,
    )
    report = {
        "phi": weights.phi.numpy().tolist(),
        "meta_steps": result.meta_steps,
        "resumed_from": result.resumed_from,
        "num_replicas": strategy.num_replicas_in_sync,
        "chief": distribute.is_chief(strategy),
    }
    if report["chief"] and not stop:  # the oracle: the whole run on one device
        problem, weights, data = build(noise=True)
        online.run(problem, **data, config=config(), workdir=tempfile.mkdtemp(), log=None)
        report["single_device_phi"] = weights.phi.numpy().tolist()
    with open(out_path, "w") as f:
        json.dump(report, f)


def gin_checks_mirrored() -> dict:
    """The GIN (PPI) problem on padded graph batches, one block per replica: one
    meta-gradient in float64 against the single-device one on the same global
    (unpadded) batches; the same on one device with padded batches and an
    XLA-compiled meta-step; multi-label fine-tuning (both modes) and CoTrain steps
    (with and without PCGrad) on uneven padded blocks against one device on
    unpadded batches, in float64; and the benchmark's smoke variant under
    MirroredStrategy."""
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
    tf.config.experimental.enable_op_determinism()
    out = {"logical_cpus": len(tf.config.list_logical_devices("CPU"))}
    directory = tempfile.mkdtemp()
    schema = gin_checks.write_data(directory)
    previous = tf.keras.mixed_precision.global_policy()
    tf.keras.mixed_precision.set_global_policy("float64")
    try:
        # name: (strategy, padded blocks, loop config overrides)
        meta_runs = {
            "default": ("default", 0, {}),
            "mirrored": ("mirrored", 2, {"devices": DEVICES}),
            # Cross-fitted FT heads: pairs of FT batches, replicated like single ones.
            "default_cross_fit": ("default", 0, {"ft_cross_fit": True}),
            "mirrored_cross_fit": ("mirrored", 2, {"devices": DEVICES, "ft_cross_fit": True}),
            # The TPU-style program on one device: padded batches, XLA-compiled meta-step.
            "xla": ("default", 1, {"jit_compile": True}),
        }
        out["meta_gradient"] = {
            key: _timed(
                f"gin {key}",
                gin_checks.one_meta_gradient,
                directory,
                schema,
                _strategy(kind),
                shards=shards,
                **overrides,
            )
            for key, (kind, shards, overrides) in meta_runs.items()
        }
        ft_directory = tempfile.mkdtemp()
        ft_schema = gin_checks.write_data(ft_directory, num_test_graphs=gin_checks.NUM_TEST)
        runs = (("default", 0), ("mirrored", 2))
        out["finetune"] = {
            f"{mode}|{name}": _timed(
                f"gin finetune {mode} {name}",
                gin_checks.finetune_on_graphs,
                ft_directory,
                ft_schema,
                _strategy(name),
                shards=shards,
                mode=mode,
            )
            for mode in finetune.MODES
            for name, shards in runs
        }
        out["cotrain"] = {
            f"{pcgrad}|{name}": _timed(
                f"gin cotrain pcgrad={pcgrad} {name}",
                gin_checks.cotrain_steps,
                ft_directory,
                ft_schema,
                _strategy(name),
                shards=shards,
                use_pcgrad=pcgrad,
            )
            for pcgrad in (False, True)
            for name, shards in runs
        }
    finally:
        tf.keras.mixed_precision.set_global_policy(previous)
    out["ppi_smoke"] = _timed("ppi smoke mirrored", ppi_smoke_mirrored)
    return out


def ppi_smoke_mirrored() -> dict:
    """configs/ppi_multitask.py:smoke with meta.distribute='mirrored' over both CPUs
    (meta-PT and CoTrain + PCGrad in the full setting: online.run, cotrain,
    fine-tuning, the test), recording the strategy fine-tuning and CoTrain get."""
    from metapt_tf.training import ppi_benchmark  # noqa: PLC0415

    calls = []

    def recorded(fn, what):
        def wrapper(*args, **kwargs):
            result = fn(*args, **kwargs)
            strategy = kwargs.get("strategy")
            if what == "finetune":
                variables = result.model.variables
            else:
                variables = [
                    *kwargs["shared_params"],
                    *kwargs["pt_head_params"],
                    *kwargs["ft_head_params"],
                ]
            calls.append(
                {
                    "what": what,
                    "strategy": None if strategy is None else distribute.strategy_kind(strategy),
                    "mask_key": kwargs.get("mask_key"),
                    "in_scope": strategy is not None
                    and all(strategy.extended.variable_created_in_scope(v) for v in variables),
                }
            )
            return result

        return wrapper

    spec = importlib.util.spec_from_file_location("c", ROOT / "configs" / "ppi_multitask.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    smoke = module.get_config("smoke")
    smoke.meta.neumann_alpha = 1e-3  # AmortizedNeumann's power iteration cannot run mirrored
    c = ml_collections.ConfigDict(smoke.to_dict())
    c.settings, c.methods = ("full",), ("cotrain_pcgrad", "meta_pt")
    c.export = False
    c.meta.distribute, c.meta.devices = "mirrored", DEVICES
    workdir = tempfile.mkdtemp()
    originals = finetune.finetune_multilabel, multitask.cotrain
    finetune.finetune_multilabel = recorded(originals[0], "finetune")
    multitask.cotrain = recorded(originals[1], "cotrain")
    try:
        results = ppi_benchmark.run(c, workdir, log=None)
    finally:
        finetune.finetune_multilabel, multitask.cotrain = originals
    runs = {r["method"]: r for r in results["runs"]}
    meta = json.loads(Path(workdir, "seed_0", "full", "meta_pt", "result.json").read_text())
    return {
        "methods": sorted(runs),
        "meta_steps": meta["meta_steps"],
        "skipped_meta_steps": meta["skipped_meta_steps"],
        "task_weights": list(meta["task_weights"]),
        "test_auc": {m: r["test_auc"] for m, r in runs.items()},
        "calls": calls,
    }


if __name__ == "__main__":
    if sys.argv[1] == "mirrored":
        print(RESULT_MARKER + json.dumps(mirrored_checks()), flush=True)
    elif sys.argv[1] == "gin":
        print(RESULT_MARKER + json.dumps(gin_checks_mirrored()), flush=True)
    elif sys.argv[1] == "worker":
        worker(sys.argv[2])
    else:
        raise SystemExit(f"Unknown check {sys.argv[1]!r}; expected 'mirrored', 'gin' or 'worker'.")
