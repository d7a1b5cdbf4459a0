"""Distribution strategies and mixed precision for the online meta-PT loop.

`config.meta.distribute` names the strategy ("default", "mirrored",
"multi_worker_mirrored", "tpu"); `make_strategy` builds it, and the problem is built in
`scope(strategy, config.meta.mixed_precision)` so that its variables belong to
the strategy (and its layers get the mixed-precision policy):

    strategy = distribute.make_strategy(config.meta)
    with distribute.scope(strategy, config.meta.mixed_precision):
        problem = build_problem()
    online.run(problem, ..., config=config.meta, strategy=strategy)

How one step is split over R replicas (the loop's compiled steps, `online._Loop`):

* Global batches. Every replica and worker reads the same global batches as a
  single-device run, from the same pipelines (so their iterators checkpoint as
  before); `pt_batch_fn` is applied once to the global batch, and replica r
  takes rows [r B/R, (r+1) B/R) of it (`Replicas.shard`). B must be a static
  multiple of R. A batch without such a leading dimension (a GraphTensor of
  ego-graphs) is cut by the problem's `pt_shard_fn` instead; for graphs, the
  global batch is R blocks padded to the same fixed sizes, and replica r takes
  block r (`metapt_tf.data.padding`).
* PT steps. Each replica's loss is its shard's loss divided by R, so the sum over
  replicas is the global mean loss; the optimizer all-reduces (sums) the
  gradients and every replica applies the same update.
* FT unroll. Replicated: every replica runs the K FT steps on the full (small)
  FT batches, so v is the single-device v on every replica, with no
  communication. (Unless the backbone keeps per-replica state that the unroll
  reads: the moving statistics of a batch norm trained on unsynchronised
  shards differ between replicas, and so do their v; the meta-gradient is
  still all-reduced, so phi stays identical.)
* Implicit part. Each replica's PT loss is again its 1/R share, and
  `reduce_fn` (`Replicas.all_reduce_sum`) sums every HVP inside the solver's
  closure and the mixed term across replicas: both are linear in the loss, so
  the solver works with the global Hessian, and every replica ends with the same
  meta-gradient. phi is updated with it on every replica without another
  all-reduce, so phi stays identical everywhere.

Exactness: for a PT loss that is a mean over examples (plus terms that do not
depend on the batch) the distributed step computes the single-device step's
quantities, up to floating-point summation order (tested in float64 against the
single-device step). Batch statistics are not split this way: batch norm with
`training=True` normalises each replica's shard by that shard's moments, as in
any data-parallel Keras training without synchronised batch norm.

Control flow. On CPUs, and on GPUs without XLA, Mirrored and MultiWorkerMirrored
strategies all-reduce through `merge_call`, which TensorFlow cannot run inside a
`tf.while_loop`; the conjugate-gradient solver therefore runs its iterations
unrolled (`ConjugateGradient(unroll=True)`: always `max_iters` HVPs, updates
masked after convergence, the same iterates). With `jit_compile=True` the
per-replica step is XLA-compiled; TensorFlow compiles all-reduces into XLA
programs only on GPUs, so under a multi-replica strategy `jit_compile` needs GPU
replicas and is refused with a message otherwise.

Multi-worker: the cluster comes from the `TF_CONFIG` environment variable, and
the strategy must be created before the program runs any other TensorFlow op.
Every worker runs the same loop on the same data and saves at the same steps
(saving can involve collectives); the chief (worker 0) writes checkpoints,
TensorBoard events and the history to `workdir`, the others write their
checkpoints to a temporary directory that is deleted at the end (TensorFlow's
documented pattern). All workers resume from the chief's checkpoints, so the
workdir must be on a filesystem every worker reads.

TPU. "tpu" builds a `TPUStrategy` on the TPU `config.meta.devices` names (a
Cloud TPU name or a grpc:// address; "" for the TPU of a TPU VM or of the
TPU_NAME environment variable), after connecting to it and initialising it;
where none is reachable, `make_strategy` raises a ValueError that says so. The
per-replica functions hold everything that runs on the accelerator and nothing
else: batches are read, `pt_batch_fn` applied, FT heads drawn and variables of
the loop updated outside them; inside, there is no host-side Python (no
`.numpy()`, no Python branching on tensor values, the solvers' loops are Python
loops or `tf.while_loop`s) and every shape is static given static batch shapes
(`drop_remainder=True`; the shard size is B/R; graph batches padded to fixed
sizes). That is what a TPU program needs. No TPU hardware is tested: what is
tested is the compiled path on CPU (the GIN PT step and meta-gradient on padded
graphs compile with XLA, `jit_compile=True`, and match the unpadded,
uncompiled computation; padded graphs have fully static shapes) and the error
without a TPU.

Mixed precision (`config.meta.mixed_precision`): "mixed_bfloat16" or
"mixed_float16" computes the backbone (PT and FT) in 16 bits with float32
variables; the FT head, the losses, v, the solver and the meta-gradient are
float32. "mixed_float16" scales the PT loss: the PT optimizer is a `LossScaleOptimizer`
(dynamic loss scale S), and the meta-step multiplies the PT loss by S and
divides every HVP and the mixed term by S (both linear in the loss), so their
float16 backward passes see the magnitudes the PT gradients do. v is not
scaled: scaling the FT loss as well would multiply the HVPs' float16
intermediates by S twice (the vector and the loss) and overflow. An overflow
gives a non-finite meta-gradient, which the loop skips and counts.
"""

import contextlib
import os
import shutil
import tempfile
from collections.abc import Hashable, Iterator, Mapping, Sequence

import ml_collections
import tensorflow as tf

import export

STRATEGIES = ("default", "mirrored", "multi_worker_mirrored", "tpu")
PRECISIONS = ("none", "mixed_float16", "mixed_bfloat16")

# One strategy per process and device set: two Mirrored strategies over the same
# devices number their collectives independently, and once both have run, their
# all-reduces are matched with each other's and abort.
_STRATEGIES: dict[tuple, tf.distribute.Strategy] = {}


def _parse_devices(devices: str | Sequence[str]) -> list[str]:
    if isinstance(devices, str):
        return [d.strip() for d in devices.split(",") if d.strip()]
    return [str(d) for d in devices]


def make_strategy(config: ml_collections.ConfigDict) -> tf.distribute.Strategy:
    """The strategy `config.distribute` names (`config` is an experiment's `config.meta`).

    "default": TensorFlow's default strategy (one replica, no scope needed).
    "mirrored": `MirroredStrategy` over `config.devices` (comma-separated device
      names, e.g. "/gpu:0,/gpu:1"; empty: every local GPU, else the CPU).
    "multi_worker_mirrored": `MultiWorkerMirroredStrategy` over the cluster in
      `TF_CONFIG`; call this before any other TensorFlow op of the program.
    "tpu": `TPUStrategy` on the TPU `config.devices` names (see the module
      docstring); call this before any other TensorFlow op of the program.

    Within a process, the same name and devices give the same strategy object.

    Raises:
      ValueError: an unknown name, devices given where they are not used, no
        TF_CONFIG for "multi_worker_mirrored", or no reachable TPU for "tpu".
    """
    name = config.distribute
    if name not in STRATEGIES:
        raise ValueError(
            f"config.meta.distribute must be one of {STRATEGIES}. "
            f"Received: config.meta.distribute={name!r}."
        )
    if name == "tpu":
        return _tpu_strategy(config.devices)
    devices = _parse_devices(config.devices)
    if devices and name != "mirrored":
        raise ValueError(
            f"config.meta.devices is only used with config.meta.distribute='mirrored'. "
            f"Received: config.meta.devices={config.devices!r} with distribute={name!r}."
        )
    if name == "default":
        return tf.distribute.get_strategy()
    if name == "multi_worker_mirrored" and not os.environ.get("TF_CONFIG"):
        raise ValueError(
            "config.meta.distribute='multi_worker_mirrored' needs the cluster in the "
            'TF_CONFIG environment variable, e.g. {"cluster": {"worker": '
            '["host0:12345", "host1:12345"]}, "task": {"type": "worker", "index": 0}}.'
        )
    key = (name, tuple(devices))
    if key not in _STRATEGIES:
        if name == "mirrored":
            _STRATEGIES[key] = tf.distribute.MirroredStrategy(devices or None)
        else:
            _STRATEGIES[key] = tf.distribute.MultiWorkerMirroredStrategy()
    return _STRATEGIES[key]


def _tpu_strategy(tpu: str) -> tf.distribute.Strategy:
    """A `TPUStrategy` on the TPU named `tpu` (connected and initialised once per process)."""
    if not isinstance(tpu, str):
        raise ValueError(
            "config.meta.devices must name the TPU (a string) with distribute='tpu'. "
            f"Received: config.meta.devices={tpu!r}."
        )
    key = ("tpu", tpu.strip())
    if key not in _STRATEGIES:
        try:
            resolver = tf.distribute.cluster_resolver.TPUClusterResolver(tpu=tpu.strip())
            tf.config.experimental_connect_to_cluster(resolver)
            tf.tpu.experimental.initialize_tpu_system(resolver)
        # The resolver and the connection fail in many ways (no name, no metadata
        # server, no such TPU, a TPU that does not answer): each means "no TPU here".
        except Exception as e:
            raise ValueError(
                "config.meta.distribute='tpu' needs a reachable TPU, named by "
                'config.meta.devices (a Cloud TPU name or a grpc:// address; "" for the '
                "TPU of a TPU VM or of the TPU_NAME environment variable). Received: "
                f"config.meta.devices={tpu!r}, and no TPU could be reached "
                f"({type(e).__name__}: {e}). Use distribute='default' or 'mirrored' "
                "without a TPU."
            ) from e
        _STRATEGIES[key] = tf.distribute.TPUStrategy(resolver)
    return _STRATEGIES[key]


def strategy_kind(strategy: tf.distribute.Strategy) -> str:
    """The `config.meta.distribute` name of `strategy`, or its class name if it has none."""
    if isinstance(strategy, tf.distribute.TPUStrategy):
        return "tpu"
    if isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy):
        return "multi_worker_mirrored"
    if isinstance(strategy, tf.distribute.MirroredStrategy):
        return "mirrored"
    if type(strategy).__name__ == "_DefaultDistributionStrategy":
        return "default"
    return type(strategy).__name__


def check_strategy(strategy: tf.distribute.Strategy, name: str) -> None:
    """Raises ValueError unless `strategy` is of the kind `config.meta.distribute` names."""
    kind = strategy_kind(strategy)
    if kind not in STRATEGIES:
        raise ValueError(
            f"The online loop runs under the strategies {STRATEGIES}. Received a {kind}."
        )
    if kind != name:
        raise ValueError(
            f"config.meta.distribute={name!r} but the loop was given a {kind!r} strategy. Build "
            "it with distribute.make_strategy(config.meta), build the problem inside "
            "distribute.scope(strategy, ...), and pass strategy= to online.run."
        )


def check_variables(strategy: tf.distribute.Strategy, variables: Sequence, what: str) -> None:
    """Raises ValueError naming the first variable not created in `strategy`'s scope."""
    for v in variables:
        if not strategy.extended.variable_created_in_scope(v):
            raise ValueError(
                f"{what} variable {v.name} was not created under the strategy's scope "
                f"({strategy_kind(strategy)}); build the problem inside "
                "`with distribute.scope(strategy, config.meta.mixed_precision):`."
            )


def check_jit(strategy: tf.distribute.Strategy) -> None:
    """jit_compile under a multi-replica strategy needs XLA all-reduces: GPU (or TPU)
    replicas only; on CPU replicas it is refused."""
    if strategy.num_replicas_in_sync == 1 and strategy_kind(strategy) == "default":
        return
    devices = list(strategy.extended.worker_devices)
    kinds = [(tf.DeviceSpec.from_string(d).device_type or "").upper() for d in devices]
    if not all(kind in ("GPU", "TPU") for kind in kinds):
        raise ValueError(
            "config.meta.jit_compile=True under a "
            f"{strategy_kind(strategy)} strategy needs GPU replicas: TensorFlow compiles "
            f"all-reduces into XLA programs only on GPUs. Replicas here: {devices}. Use "
            "jit_compile=False, or distribute='default' for an XLA-compiled meta-step."
        )


@contextlib.contextmanager
def precision_policy(name: str) -> Iterator[None]:
    """Sets the Keras dtype policy for layers built inside (restored after)."""
    if name not in PRECISIONS:
        raise ValueError(
            f"config.meta.mixed_precision must be one of {PRECISIONS}. "
            f"Received: config.meta.mixed_precision={name!r}."
        )
    if name == "none":
        yield
        return
    previous = tf.keras.mixed_precision.global_policy()
    tf.keras.mixed_precision.set_global_policy(name)
    try:
        yield
    finally:
        tf.keras.mixed_precision.set_global_policy(previous)


@contextlib.contextmanager
def scope(strategy: tf.distribute.Strategy, precision: str = "none") -> Iterator[None]:
    """Where to build a problem for `online.run`: the strategy's scope and dtype policy."""
    with strategy.scope(), precision_policy(precision):
        yield


def check_precision(backbone: tf.keras.Model, variable_dtype: tf.DType, name: str) -> None:
    """Raises ValueError unless every weighted layer of the backbone has the `name` policy
    ("none": any policy that computes in its variables' dtype)."""
    layers = [
        m
        for m in [backbone, *backbone.submodules]
        if isinstance(m, tf.keras.layers.Layer) and m._trainable_weights  # its own weights
    ]
    for layer in layers:
        policy = layer.dtype_policy
        mixed = policy.compute_dtype != policy.variable_dtype
        if (name == "none" and mixed) or (name != "none" and policy.name != name):
            raise ValueError(
                f"config.meta.mixed_precision={name!r}, but the backbone's layer {layer.name!r} "
                f"has the dtype policy {policy.name!r}. Build the problem inside "
                "`with distribute.scope(strategy, config.meta.mixed_precision):`."
            )
    if name != "none" and variable_dtype != tf.float32:
        raise ValueError(
            f"config.meta.mixed_precision={name!r} needs float32 variables; the PT "
            f"parameters are {variable_dtype.name}."
        )


class Replicas:
    """The per-replica side of a strategy: shards, all-reduces, results.

    `shard` and `all_reduce_sum` are called in replica context (inside
    `strategy.run`); `first` and `sum` turn `strategy.run`'s per-replica results
    into tensors in cross-replica context. With one replica all four pass values
    through unchanged.
    """

    def __init__(self, strategy: tf.distribute.Strategy):
        self.strategy = strategy
        self.num_replicas = int(strategy.num_replicas_in_sync)

    def shard(self, batch, what: str = "PT batch", shard_fn=None):
        """This replica's contiguous 1/R of every tensor of a global batch, or
        `shard_fn(batch, R, replica_id)` where given (a problem's `pt_shard_fn`)."""
        if self.num_replicas == 1:
            return batch
        r = self.num_replicas
        replica = tf.distribute.get_replica_context().replica_id_in_sync_group
        if shard_fn is not None:
            return shard_fn(batch, r, replica)

        def split(x):
            if not isinstance(x, tf.Tensor):
                raise TypeError(
                    f"The {what} must be a nest of tensors with a leading batch dimension to be "
                    f"split over {r} replicas. Received a {type(x).__name__}."
                )
            size = x.shape[0] if x.shape.rank else None
            if size is None:
                raise ValueError(
                    f"The {what} needs a static batch size to be split over {r} replicas "
                    f"(batch the dataset with drop_remainder=True). Received shape {x.shape}."
                )
            if size % r:
                raise ValueError(
                    f"The {what}'s global batch of {size} examples does not split evenly over "
                    f"{r} replicas; use a batch size that is a multiple of {r}."
                )
            rows = tf.reshape(x, [r, size // r, *x.shape[1:]])
            return tf.gather(rows, replica)

        return tf.nest.map_structure(split, batch)

    def all_reduce_sum(self, values: list) -> list:
        """The sum over replicas of each tensor (replica context)."""
        if self.num_replicas == 1:
            return list(values)
        ctx = tf.distribute.get_replica_context()
        return list(ctx.all_reduce(tf.distribute.ReduceOp.SUM, list(values)))

    def first(self, per_replica):
        """The first local replica's value (for values equal on every replica)."""
        return tf.nest.map_structure(
            lambda x: self.strategy.experimental_local_results(x)[0], per_replica
        )

    def sum(self, per_replica):
        """The sum over all replicas, in cross-replica context."""
        if self.num_replicas == 1:
            return self.first(per_replica)
        return self.strategy.reduce(tf.distribute.ReduceOp.SUM, per_replica, axis=None)


def is_chief(strategy: tf.distribute.Strategy) -> bool:
    """Whether this worker writes the run's outputs (always, without multiple workers)."""
    resolver = getattr(strategy, "cluster_resolver", None)
    if resolver is None or not resolver.cluster_spec().as_dict():
        return True
    task_type, task_id = resolver.task_type, resolver.task_id
    if task_type in (None, "chief"):
        return True
    return task_type == "worker" and task_id == 0 and "chief" not in resolver.cluster_spec().jobs


def is_multi_worker(strategy: tf.distribute.Strategy) -> bool:
    """Whether `strategy` spans several worker processes (a cluster in TF_CONFIG)."""
    resolver = getattr(strategy, "cluster_resolver", None)
    return resolver is not None and bool(resolver.cluster_spec().as_dict())


def worker_name(strategy: tf.distribute.Strategy) -> str:
    """This process's task in the cluster, e.g. "worker 1" ("chief" without a cluster)."""
    if not is_multi_worker(strategy):
        return "chief"
    resolver = strategy.cluster_resolver
    return f"{resolver.task_type} {resolver.task_id}"


@contextlib.contextmanager
def output_dir(path: str, strategy: tf.distribute.Strategy) -> Iterator[str]:
    """Where this worker writes what only the chief keeps: `path` on the chief, a
    temporary directory (deleted on exit) on the other workers.

    For writes every worker has to make because they can involve collectives
    (checkpoints, SavedModels of distributed variables): TensorFlow's documented
    multi-worker pattern.
    """
    if is_chief(strategy):
        yield path
        return
    temp = tempfile.mkdtemp(prefix="metapt_worker_")
    try:
        yield os.path.join(temp, os.path.basename(os.path.normpath(path)))
    finally:
        shutil.rmtree(temp, ignore_errors=True)


@contextlib.contextmanager
def checkpoint_dir(workdir: str, strategy: tf.distribute.Strategy) -> Iterator[str]:
    """Where this worker writes checkpoints: `workdir/checkpoints` on the chief, a
    temporary directory (deleted on exit) on the other workers."""
    with output_dir(os.path.join(workdir, "checkpoints"), strategy) as path:
        yield path


def chief_flags(strategy: tf.distribute.Strategy, flags: Sequence[bool]) -> list[bool]:
    """The chief's `flags` on every worker (one all-reduce; no communication without
    several workers).

    For decisions every worker must make alike because the work they lead to has
    collectives (e.g. which finished runs to skip, read from files the chief
    writes): every worker calls this at the same point with its own reading, and
    all go on with the chief's.
    """
    flags = [bool(f) for f in flags]
    if not is_multi_worker(strategy) or not flags:
        return flags
    chief = 1.0 if is_chief(strategy) else 0.0
    local = len(strategy.extended.worker_devices)
    values = tf.constant([float(f) * chief for f in flags], tf.float64)

    @tf.function
    def broadcast():
        def replica_fn(x):
            return tf.distribute.get_replica_context().all_reduce(tf.distribute.ReduceOp.SUM, x)

        return strategy.run(replica_fn, args=(values,))

    # Every local replica of the chief contributed its flags once.
    total = strategy.experimental_local_results(broadcast())[0].numpy() / local
    return [bool(round(v)) for v in total]


def previous_run(
    strategy: tf.distribute.Strategy, result_paths: Mapping[Hashable, str], export_base: str
) -> tuple[set, str | None]:
    """What an earlier launch in the same workdir finished, as the chief reads it.

    Read once, before any work: the keys of `result_paths` whose file exists, and
    the newest SavedModel version under `export_base`. Under several workers the
    chief's reading is every worker's (`chief_flags`), so all skip the same parts
    even if the chief writes a result while another worker is still reading.

    Returns:
      (the finished keys, the newest export's directory or None).
    """
    keys = list(result_paths)
    has_export = tf.io.gfile.isdir(export_base) and export.next_version(export_base) > 1
    *finished, has_export = chief_flags(
        strategy, [os.path.exists(result_paths[k]) for k in keys] + [has_export]
    )
    exported = None
    if has_export:
        exported = os.path.join(export_base, str(export.next_version(export_base) - 1))
    return {k for k, f in zip(keys, finished, strict=True) if f}, exported


def barrier(strategy: tf.distribute.Strategy) -> None:
    """Returns once every worker has called it (one all-reduce; nothing without several
    workers).

    For files one worker writes and the others then read: the writer calls it after
    closing them, the readers before opening them. Every worker must call it the
    same number of times, whatever it found on disk, or the collectives mismatch.
    """
    chief_flags(strategy, [True])
