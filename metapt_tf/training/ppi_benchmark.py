"""Multitask GNN pre-training on ego-graphs: learned task weights against the baselines.

The paper's PPI experiment, on any dataset in the layout of
`metapt_tf.data.graphs` (the synthetic PPI-like benchmark by default, or the
converted pretrain-gnns "bio" dataset). A directory holds `schema.pbtxt` and
three TFRecord files of ego-graphs: `pt.tfrecord` (graphs with PT labels),
`ft_train.tfrecord` (the labelled FT pool) and `test.tfrecord` (held out).

Methods (all share the GIN backbone and the PT schedule's length):
* `no_pt`: fine-tuning from a freshly initialised GIN;
* `supervised_pt`: PT on every PT task with weight 1;
* `oracle_pt` (synthetic data only, a diagnostic): PT with the weights the
  ground truth suggests, 2 for relevant, 1 for irrelevant and 0 for harmful
  tasks: what a perfect weighting could gain on the benchmark;
* `cotrain`: PT tasks and FT tasks trained jointly, each with its own head;
* `cotrain_pcgrad`: the same, with PCGrad on the backbone's gradients;
* `meta_pt`: online meta-parameterised PT (`online.run`) with one weight per
  PT task, w = 2 sigmoid(phi), phi = 0 at the start, learned through the FT
  validation loss after K unrolled FT-head steps.

Settings: `full` (all labelled FT graphs and FT tasks), `partial` (a seeded
`partial_fraction` of the labelled FT graphs, for meta-PT, co-training and the
final FT), `held_out` (meta-PT and co-training see the first
`held_out_meta_fraction` of the FT tasks; the final FT and the test use the
others). Meta-PT splits its FT graphs into FT-train / FT-val
(`meta_val_fraction`), or, with k = `meta_folds` > 2 cross-fitted FT heads, into
k folds (head i trained on the other folds, validated on fold i). Every method
ends with fine-tuning a fresh head on the setting's labelled FT graphs and the
per-task test ROC-AUC, averaged over tasks.

Strategies (`config.meta.distribute`): "default" runs everything on one device.
"mirrored" runs every training and evaluation step data-parallel over the
replicas: meta-PT and the PT baselines that go through `online.run` (supervised
PT, PT with ground-truth weights), CoTrain and CoTrain + PCGrad
(`multitask.cotrain`), and the final fine-tuning and test predictions
(`finetune.finetune_multilabel`). Each PT batch of B ego-graphs is read as R
blocks of B/R graphs, each padded to the same fixed sizes
(`metapt_tf.data.padding`), and replica r takes block r
(`MetaPretrainProblem.pt_shard_fn`). FT and test batches, which hold every graph
once (a last partial batch included), are cut into R blocks of ceil(B/R)
graphs, as many as there are (`padding.pad_blocks`), and replica r takes block r
(`padding.shard_batch`). Losses count real graphs only, a replica's loss is its
share of the global batch's mean, CoTrain all-reduces each task's gradients
before PCGrad, and the GIN's batch norms are synchronised across replicas, so
every step computes the one-device step's quantities (up to summation order);
dropout draws its masks per replica, so with dropout (`model.pt_dropout`,
`model.ft_dropout`) runs match one device in distribution only. HVPs must be
reverse-over-reverse.

"multi_worker_mirrored" runs the same steps over the replicas of every worker;
every worker runs this same program with its own `TF_CONFIG`, and the workdir
must be on a filesystem all workers read. The chief (worker 0) alone generates
the synthetic dataset, when `data/task_info.json` (written last, by a rename)
is not there yet; then every worker passes one barrier (`distribute.barrier`, an
all-reduce) before reading the dataset, so the others read files the chief has
closed. Every worker passes that barrier whether or not the chief generated
anything, so all run the same collectives, and on a restart with the dataset in
place no worker generates it. (Generating the seeded dataset on every worker
into a temporary directory and comparing it with the chief's would give the
same data at the cost of generating it once per worker, and would still need a
collective to wait for the chief's copy.) Which runs a previous launch finished
(their `result.json`) and whether it exported is read once, before any
training, and the chief's reading is every worker's (`distribute.chief_flags`,
one all-reduce), so all skip the same runs. The chief writes the `result.json`
files, results, figure and export; every worker trains, fine-tunes and saves
the SavedModel (saving distributed variables can involve collectives), the
others into a temporary directory that is deleted (`distribute.output_dir`),
and the others end with a line naming the chief's workdir. The online loop and
CoTrain write their checkpoints, TensorBoard events and histories the same way
(`online`, `multitask`). "tpu" is refused: the benchmark's CoTrain, fine-tuning
and evaluation have not been run on a TPU.

Everything lands in `workdir`: the dataset (`data/`, generated once), one
directory per seed/setting/method (checkpoints, TensorBoard, `result.json`;
finished parts are skipped when the run is restarted), `results.json`,
`results.md`, `task_weights.png` and the SavedModel of the seed-0 meta-PT model
in the full setting, `export/<version>/`.
"""

import dataclasses
import functools
import json
import os
import time
from collections.abc import Callable, Sequence

import ml_collections
import numpy as np
import tensorflow as tf
import tensorflow_gnn as tfgnn

import export
from metapt_tf.data import graphs, padding, synthetic_ppi
from metapt_tf.meta_params import TaskWeights
from metapt_tf.models import gin_backbone
from metapt_tf.training import distribute, finetune, interfaces, multitask, online, reporting
from metapt_tf.training.config_checks import config_error

METHODS = ("no_pt", "supervised_pt", "oracle_pt", "cotrain", "cotrain_pcgrad", "meta_pt")
SETTINGS = ("full", "partial", "held_out")
METHOD_NAMES = {
    "no_pt": "No PT",
    "supervised_pt": "Supervised PT",
    "oracle_pt": "PT, ground-truth task weights",
    "cotrain": "CoTrain",
    "cotrain_pcgrad": "CoTrain + PCGrad",
    "meta_pt": "Meta-parameterized PT",
}
SOURCES = ("synthetic", "tfrecord")
# config.meta.distribute values this benchmark runs
DISTRIBUTE = ("default", "mirrored", "multi_worker_mirrored")
EVAL_BATCH_SIZE = 256  # test graphs per evaluation batch
FILES = ("pt.tfrecord", "ft_train.tfrecord", "test.tfrecord")
SCHEMA_FILE = "schema.pbtxt"
TASK_INFO_FILE = "task_info.json"


def validate_config(config: ml_collections.ConfigDict) -> None:
    """Raises ValueError naming the first bad field (before any training starts)."""
    if config.experiment != "ppi_multitask":
        raise config_error("experiment", config.experiment, "'ppi_multitask'")
    if not isinstance(config.seeds, tuple | list) or not config.seeds:
        raise config_error("seeds", config.seeds, "a non-empty tuple of ints")
    for name, allowed in (("methods", METHODS), ("settings", SETTINGS)):
        value = config[name]
        if not isinstance(value, tuple | list) or not value or any(v not in allowed for v in value):
            raise config_error(name, value, f"a non-empty tuple drawn from {allowed}")
    d = config.data
    if d.source not in SOURCES:
        raise config_error("data.source", d.source, f"one of {SOURCES}")
    if d.source == "tfrecord" and not d.dir:
        raise config_error(
            "data.dir", d.dir, "a directory with schema.pbtxt and " + ", ".join(FILES)
        )
    for field in ("pt_batch_size", "meta_pt_batch_size", "ft_batch_size"):
        if not isinstance(d[field], int) or d[field] < 1:
            raise config_error(f"data.{field}", d[field], "an int >= 1")
    for field in ("meta_val_fraction", "partial_fraction", "held_out_meta_fraction"):
        if not 0.0 < float(d[field]) < 1.0:
            raise config_error(f"data.{field}", d[field], "in (0, 1)")
    if isinstance(d.meta_folds, bool) or not isinstance(d.meta_folds, int) or d.meta_folds < 2:
        raise config_error("data.meta_folds", d.meta_folds, "an int >= 2")
    if d.meta_folds > 2 and not config.meta.ft_cross_fit:
        raise config_error(
            "data.meta_folds", d.meta_folds, "2 unless config.meta.ft_cross_fit is True"
        )
    m = config.model
    if not isinstance(m.num_layers, int) or m.num_layers < 1:
        raise config_error("model.num_layers", m.num_layers, "an int >= 1")
    if not isinstance(m.hidden_units, int) or m.hidden_units < 1:
        raise config_error("model.hidden_units", m.hidden_units, "an int >= 1")
    for field in ("pt_dropout", "ft_dropout"):
        if not 0.0 <= float(m[field]) < 1.0:
            raise config_error(f"model.{field}", m[field], "in [0, 1)")
    if config.cotrain.learning_rate <= 0:
        raise config_error("cotrain.learning_rate", config.cotrain.learning_rate, "> 0")
    f = config.finetune
    if f.mode not in finetune.MODES:
        raise config_error("finetune.mode", f.mode, f"one of {finetune.MODES}")
    if (f.steps is None) == (f.epochs is None):
        raise ValueError(
            "Set exactly one of config.finetune.steps (about that many updates, whole "
            "epochs, whatever the number of labelled graphs) and config.finetune.epochs. "
            f"Received: steps={f.steps!r}, epochs={f.epochs!r}."
        )
    budget = "steps" if f.steps is not None else "epochs"
    if not isinstance(f[budget], int) or f[budget] < 1:
        raise config_error(f"finetune.{budget}", f[budget], "an int >= 1")
    if f.learning_rate <= 0:
        raise config_error("finetune.learning_rate", f.learning_rate, "> 0")
    online.validate_config(config.meta)
    m = config.meta
    if m.distribute not in DISTRIBUTE:
        raise config_error(
            "meta.distribute",
            m.distribute,
            f"one of {DISTRIBUTE} here (this benchmark's CoTrain, fine-tuning and evaluation "
            "have not been run on a TPU; the online loop alone runs under 'tpu')",
        )
    if m.mixed_precision != "none":
        raise config_error(
            "meta.mixed_precision", m.mixed_precision, "'none': the GIN runs in float32 here"
        )
    if m.distribute in ("mirrored", "multi_worker_mirrored"):
        if m.hvp_mode != "reverse_over_reverse":
            # The synchronised batch norms all-reduce inside the PT loss; forward-mode
            # tangents do not pass through those all-reduces correctly.
            raise config_error(
                "meta.hvp_mode",
                m.hvp_mode,
                f"'reverse_over_reverse' with meta.distribute={m.distribute!r} (the GIN's batch "
                "norms are synchronised across replicas, which forward-mode HVPs do not support)",
            )
        replicas = len([x for x in m.devices.split(",") if x.strip()])
        for field in ("pt_batch_size", "meta_pt_batch_size"):
            if replicas and d[field] % replicas:
                raise config_error(
                    f"data.{field}", d[field], f"a multiple of the {replicas} config.meta.devices"
                )


# ---------------------------------------------------------------------------
# Data


@dataclasses.dataclass
class _Data:
    """The dataset on disk and what the benchmark needs to know about it."""

    directory: str
    schema: tfgnn.GraphSchema
    description: str
    num_pt_tasks: int
    num_ft_tasks: int
    num_ft_graphs: int
    task_kinds: list[str] | None  # ground truth per PT task, when known
    num_test_graphs: int | None = None  # graphs in test.tfrecord, when counted

    def path(self, name: str) -> str:
        """The file `name` in the dataset directory, or its GZIP-compressed `name.gz`."""
        return _find(self.directory, name) or os.path.join(self.directory, name)


def _find(directory: str, name: str) -> str | None:
    for candidate in (name, name + ".gz"):
        path = os.path.join(directory, candidate)
        if os.path.exists(path):
            return path
    return None


def prepare_data(
    config: ml_collections.ConfigDict,
    workdir: str,
    say,
    strategy: tf.distribute.Strategy | None = None,
) -> _Data:
    """The synthetic benchmark (generated once into workdir/data) or a converted dataset.

    Args:
      config: the benchmark's config (`config.data` is read).
      workdir: the synthetic dataset goes to `workdir/data`.
      say: logs a line.
      strategy: under several workers, only the chief generates the dataset, and
        every worker passes one barrier before reading it (see the module docstring).
        None: one process.

    Raises:
      FileNotFoundError: a dataset file is missing.
      ValueError: a file holds no records, or task_info.json disagrees with the schema.
    """
    d = config.data
    strategy = strategy if strategy is not None else tf.distribute.get_strategy()
    if d.source == "synthetic":
        directory = os.path.join(workdir, "data")
        # task_info.json is written last (by a rename): a dataset without it is unfinished.
        generate = not os.path.exists(os.path.join(directory, TASK_INFO_FILE))
        if generate and distribute.is_chief(strategy):
            s = d.synthetic
            say(
                f"Generating the synthetic PPI-like benchmark ({s.num_pt_graphs} PT, "
                f"{s.num_ft_graphs} labelled FT, {s.num_test_graphs} test graphs; "
                f"{s.num_pt_tasks} PT tasks, {s.num_ft_tasks} FT tasks) in {directory}."
            )
            synthetic_ppi.write_synthetic_benchmark(directory, **s.to_dict())
        # The chief has closed every file; the other workers read them after this.
        distribute.barrier(strategy)
        description = "synthetic PPI-like ego-graphs"
    else:
        directory = d.dir
        description = f"ego-graphs from {directory}"
    missing = [n for n in (SCHEMA_FILE, *FILES) if _find(directory, n) is None]
    if missing:
        raise FileNotFoundError(
            f"The dataset directory {directory!r} lacks {missing}; it needs {SCHEMA_FILE} and "
            f"{', '.join(FILES)} (see metapt_tf.data.graphs and trainers/convert_bio.py)."
        )
    schema = graphs.read_schema(os.path.join(directory, SCHEMA_FILE))
    num_pt_tasks, num_ft_tasks = graphs.num_tasks(schema)
    # Every record against the schema now, rather than a parser error mid-training.
    counts = {name: graphs.check_records(_find(directory, name), schema) for name in FILES}
    empty = [_find(directory, name) for name, n in counts.items() if n == 0]
    if empty:
        raise ValueError(f"The dataset file(s) {empty} hold no records (ego-graphs).")
    kinds = None
    info_path = os.path.join(directory, TASK_INFO_FILE)
    if os.path.exists(info_path):
        with open(info_path) as f:
            kinds = list(json.load(f)["kinds"])
        if len(kinds) != num_pt_tasks:
            raise ValueError(
                f"{info_path} lists {len(kinds)} PT task kinds; the schema has {num_pt_tasks}."
            )
    return _Data(
        directory=directory,
        schema=schema,
        description=description,
        num_pt_tasks=num_pt_tasks,
        num_ft_tasks=num_ft_tasks,
        num_ft_graphs=counts["ft_train.tfrecord"],
        task_kinds=kinds,
        num_test_graphs=counts["test.tfrecord"],
    )


@dataclasses.dataclass
class _Setting:
    """Which labelled FT graphs and FT tasks each stage of one setting sees."""

    name: str
    ft_graphs: np.ndarray  # indices into ft_train.tfrecord: meta-PT, co-training, final FT
    meta_train: np.ndarray  # meta-PT's FT-train / FT-val split of ft_graphs
    meta_val: np.ndarray
    meta_tasks: np.ndarray  # FT tasks meta-PT and co-training see
    eval_tasks: np.ndarray  # FT tasks of the final FT and the test
    # With data.meta_folds = k > 2 (cross-fitted heads): ft_graphs in k folds, and
    # meta_train / meta_val are unused.
    meta_folds: list[np.ndarray] = dataclasses.field(default_factory=list)


def make_setting(name: str, data: _Data, config, seed: int) -> _Setting:
    d = config.data
    rng = np.random.default_rng(seed + 1000)
    pool = np.arange(data.num_ft_graphs)
    if name == "partial":
        keep = max(2, int(round(d.partial_fraction * len(pool))))
        pool = np.sort(rng.permutation(pool)[:keep])
    order = rng.permutation(pool)
    num_val = max(1, int(round(d.meta_val_fraction * len(order))))
    tasks = np.arange(data.num_ft_tasks)
    meta_tasks = eval_tasks = tasks
    if name == "held_out":
        num_meta = int(round(d.held_out_meta_fraction * len(tasks)))
        if not 0 < num_meta < len(tasks):
            raise ValueError(
                f"config.data.held_out_meta_fraction={d.held_out_meta_fraction} leaves no "
                f"task on one side of the split of {len(tasks)} FT tasks."
            )
        meta_tasks, eval_tasks = tasks[:num_meta], tasks[num_meta:]
    folds = []
    if d.meta_folds > 2:
        if d.meta_folds > len(order):
            raise ValueError(
                f"config.data.meta_folds={d.meta_folds} is more folds than the "
                f"{len(order)} labelled FT graphs of the {name!r} setting."
            )
        folds = [np.sort(f) for f in np.array_split(order, d.meta_folds)]
    return _Setting(
        name=name,
        ft_graphs=pool,
        meta_train=np.sort(order[num_val:]),
        meta_val=np.sort(order[:num_val]),
        meta_tasks=meta_tasks,
        eval_tasks=eval_tasks,
        meta_folds=folds,
    )


def _pt_dataset(
    data: _Data,
    config,
    seed: int,
    batch_size: int,
    shards: int = 0,
) -> tf.data.Dataset:
    """PT batches {"graph", "pt_labels"} of `batch_size` ego-graphs.

    With `shards` = R >= 1, global batches for R replicas padded to fixed sizes
    (`padding.padded_dataset`, with `padding.MASK_KEY`): R blocks of
    `batch_size` / R graphs, the same graphs in the same order as unpadded.
    """
    per_block = batch_size // shards if shards else batch_size
    ds = graphs.load_dataset(
        data.path("pt.tfrecord"),
        data.schema,
        batch_size=per_block,
        shuffle=True,
        seed=seed,
        repeat=True,
        drop_remainder=True,
    )
    ds = ds.map(lambda b: {"graph": b["graph"], "pt_labels": b[graphs.PT_LABELS]})
    if not shards:
        return ds
    constraints = padding.size_constraints(data.path("pt.tfrecord"), data.schema, per_block)
    return padding.padded_dataset(ds, constraints, shards)


def _ft_dataset(
    data: _Data,
    file: str,
    indices: np.ndarray | None,
    tasks: np.ndarray,
    *,
    batch_size: int,
    seed: int,
    train: bool,
) -> tf.data.Dataset:
    """FT batches {"graph", "labels"} with the labels of `tasks` only."""
    ds = graphs.load_dataset(
        data.path(file),
        data.schema,
        batch_size=batch_size,
        shuffle=train,
        seed=seed,
        repeat=False,
        indices=indices,
    )
    tasks = tf.constant(tasks, tf.int32)
    return ds.map(
        lambda b: {"graph": b["graph"], "labels": tf.gather(b[graphs.FT_LABELS], tasks, axis=1)}
    )


# ---------------------------------------------------------------------------
# Models and losses


def _make_backbone(config, spec, dropout: float) -> tf.keras.Model:
    m = config.model
    return gin_backbone(
        spec, num_layers=m.num_layers, hidden_units=m.hidden_units, dropout_rate=dropout
    )


def _weighted_bce(logits, labels, weights=None, mask=None):
    """Mean over batch and tasks of w_t * BCE (the paper's PT loss); with `mask`
    (a padded batch), over its real graphs only."""
    bce = tf.nn.sigmoid_cross_entropy_with_logits(tf.cast(labels, logits.dtype), logits)
    if weights is not None:
        bce = bce * weights[tf.newaxis, :]
    if mask is not None:
        return padding.masked_mean(bce, mask)
    return tf.reduce_mean(bce)


def _pt_loss(pt_head, backbone, batch, weights=None):
    logits = pt_head(backbone(batch["graph"], training=True))
    return _weighted_bce(logits, batch["pt_labels"], weights, batch.get(padding.MASK_KEY))


def _ft_loss(ft_head, backbone, batch):
    logits = ft_head(backbone(batch["graph"], training=True))
    return _weighted_bce(logits, batch["labels"], mask=batch.get(padding.MASK_KEY))


def _dense_head(units: int, feature_dim: int, name: str) -> tf.keras.layers.Dense:
    head = tf.keras.layers.Dense(units, name=name)
    head.build((None, feature_dim))
    return head


# ---------------------------------------------------------------------------
# One (seed, setting, method)


def _json_load(path):
    with open(path) as f:
        return json.load(f)


class _Runner:
    """Trains and evaluates the methods of one seed; caches finished results."""

    def __init__(self, config, data: _Data, workdir: str, seed: int, say, strategy=None):
        self.config, self.data, self.workdir, self.seed, self.say = config, data, workdir, seed, say
        # Meta-PT and the PT baselines (online.run) under config.meta.distribute (the
        # strategy `run` built from it; None: the default strategy, one device); with
        # several replicas their PT batches are padded graphs cut per replica.
        self.strategy = strategy or tf.distribute.get_strategy()
        replicas = int(self.strategy.num_replicas_in_sync)
        shards = replicas if distribute.strategy_kind(self.strategy) != "default" else 0
        for field in ("pt_batch_size", "meta_pt_batch_size"):
            if shards and config.data[field] % shards:
                raise config_error(
                    f"data.{field}", config.data[field], f"a multiple of the {shards} replicas"
                )
        self.padded = bool(shards)
        self.shards = shards
        self._constraints: dict[tuple[str, int], tfgnn.SizeConstraints] = {}
        # The models' input: unpadded graphs (gin_backbone relaxes the sizes).
        self.spec = _pt_dataset(data, config, seed, config.data.pt_batch_size).element_spec["graph"]
        self.pt_steps = online.total_pt_steps(config.meta)

    def pt_data(self) -> tf.data.Dataset:
        """PT batches, new for every PT run: a seeded shuffle gives each new iterator of
        one dataset another order, so a shared dataset would make a method's batches
        depend on the methods run before it in the process (or skipped on a restart)."""
        c = self.config
        return _pt_dataset(self.data, c, self.seed, c.data.pt_batch_size, self.shards)

    def meta_pt_data(self) -> tf.data.Dataset:
        """The meta-step's PT batches (new for every run, as `pt_data`): larger than a
        PT step's, so that every task's weight gets a less noisy meta-gradient."""
        c = self.config
        return _pt_dataset(self.data, c, self.seed + 3, c.data.meta_pt_batch_size, self.shards)

    def online_data(self, setting: _Setting, tasks, ft_val: str = "meta_val") -> dict:
        """`online.run`'s data for meta-PT in `setting` on FT `tasks`: PT batches, the
        meta-steps' PT batches, and FT-train / FT-val batches (FT-val from the `ft_val`
        graphs, see `ft_data`)."""
        out = {"pt_data": self.pt_data(), "meta_pt_data": self.meta_pt_data()}
        if setting.meta_folds and ft_val == "meta_val":
            # k cross-fitted heads: head i validated on fold i, trained on the others.
            folds = setting.meta_folds
            rest = [np.sort(np.concatenate(folds[:i] + folds[i + 1 :])) for i in range(len(folds))]
            out["ft_train_data"] = [
                self.ft_data(setting, r, tasks, train=True, repeat=True) for r in rest
            ]
            out["ft_val_data"] = [
                self.ft_data(setting, f, tasks, train=True, repeat=True) for f in folds
            ]
            return out
        out["ft_train_data"] = self.ft_data(setting, "meta_train", tasks, train=True, repeat=True)
        out["ft_val_data"] = self.ft_data(setting, ft_val, tasks, train=True, repeat=True)
        return out

    def backbone(self, dropout: float) -> tf.keras.Model:
        return _make_backbone(self.config, self.spec, dropout)

    def ft_data(
        self, setting: _Setting, which: str, tasks, *, train: bool, repeat=False, blocks=False
    ):
        """FT batches of `which` graphs ("pool", "meta_train", "meta_val", "test", or an
        array of indices into ft_train.tfrecord: a fold).

        With `blocks` under a multi-replica strategy, each batch is a global batch of
        R padded blocks (`padding.pad_blocks`, with `padding.MASK_KEY`), holding the
        same graphs in the same order.
        """
        f = self.config.data
        if isinstance(which, np.ndarray):  # indices into ft_train.tfrecord (a fold)
            indices, which = which, "fold"
        else:
            indices = {
                "pool": setting.ft_graphs,
                "meta_train": setting.meta_train,
                "meta_val": setting.meta_val,
            }.get(which)
        file = "test.tfrecord" if which == "test" else "ft_train.tfrecord"
        batch = f.ft_batch_size if train else EVAL_BATCH_SIZE
        ds = _ft_dataset(
            self.data, file, indices, tasks, batch_size=batch, seed=self.seed + 7, train=train
        )
        if blocks and self.padded:
            count = len(indices) if indices is not None else self.data.num_test_graphs
            constraints = self.block_constraints(file, min(batch, count or batch))
            ds = ds.map(lambda b: padding.pad_blocks(b, constraints, self.shards))
        return ds.repeat() if repeat else ds

    def block_constraints(self, file: str, batch_size: int) -> tfgnn.SizeConstraints:
        """Padding sizes for blocks of ceil(batch_size / R) graphs of `file` (cached)."""
        per_block = -(-batch_size // self.shards)
        key = (file, per_block)
        if key not in self._constraints:
            self._constraints[key] = padding.size_constraints(
                self.data.path(file), self.data.schema, per_block
            )
        return self._constraints[key]

    def shard_kwargs(self) -> dict:
        """The strategy and padded-batch options of `finetune` and `multitask` calls."""
        if not self.padded:
            return {}
        return {
            "strategy": self.strategy,
            "mask_key": padding.MASK_KEY,
            # pad_blocks' blocks may hold fewer real graphs than others.
            "shard_fn": functools.partial(padding.shard_batch, equal_blocks=False),
        }

    # -- pre-training methods ------------------------------------------------

    def build_problem(
        self, tasks: np.ndarray, *, describe: bool = False
    ) -> tuple[interfaces.MetaPretrainProblem, TaskWeights]:
        """A fresh GIN, PT head and task weights (all 1) as a `MetaPretrainProblem`.

        The PT loss is the mean over batch and tasks of w_t * BCE; the FT task is
        multi-label over `tasks` (the FT tasks meta-PT sees). With `describe`, the
        weights' statistics against the ground truth are logged (synthetic data).
        """
        c = self.config
        tf.keras.utils.set_random_seed(self.seed)
        with distribute.scope(self.strategy, c.meta.mixed_precision):
            backbone = self.backbone(c.model.pt_dropout)
            feature_dim = int(backbone.output_shape[-1])
            pt_head = _dense_head(self.data.num_pt_tasks, feature_dim, "pt_head")
            weights = TaskWeights(self.data.num_pt_tasks)

        def pt_loss_fn(batch):
            return _pt_loss(pt_head, backbone, batch, weights.all_weights())

        describe_fn = None
        if describe and self.data.task_kinds is not None:
            kinds = np.asarray(self.data.task_kinds)

            def describe_fn():
                w = weights.all_weights().numpy()
                return {**_weight_stats(w, kinds), "task_weights/all": w}

        problem = interfaces.MetaPretrainProblem(
            backbone=backbone,
            pt_params=backbone.trainable_variables + pt_head.trainable_variables,
            meta_params=weights.variables_list,
            pt_loss_fn=pt_loss_fn,
            num_ft_classes=len(tasks),
            ft_input_key="graph",
            ft_label_key="labels",
            ft_multilabel=True,
            describe_fn=describe_fn,
            pt_shard_fn=padding.shard_batch if self.padded else None,
        )
        return problem, weights

    def pretrain_online(
        self,
        setting: _Setting | None,
        run_dir: str,
        meta: bool,
        fixed_weights: np.ndarray | None = None,
    ):
        """Meta-PT (meta=True) or PT with fixed task weights (1, or `fixed_weights`)."""
        c = self.config
        tasks = setting.meta_tasks if setting is not None else np.arange(self.data.num_ft_tasks)
        problem, weights = self.build_problem(tasks, describe=meta)
        backbone = problem.backbone
        if fixed_weights is not None:
            # w = 2 sigmoid(phi): phi = logit(w / 2), clipped so that w = 0 and 2 stay finite.
            half = np.clip(np.asarray(fixed_weights, np.float64) / 2.0, 1e-6, 1.0 - 1e-6)
            weights.variables_list[0].assign(np.log(half / (1.0 - half)).astype(np.float32))
        meta_config = ml_collections.ConfigDict(c.meta.to_dict())
        meta_config.seed = self.seed
        meta_config.meta_enabled = meta
        if not meta:
            meta_config.head_steps_during_pt = False  # the FT head is not used
        full = setting or make_setting("full", self.data, c, self.seed)
        result = online.run(
            problem,
            **self.online_data(full, tasks),
            config=meta_config,
            workdir=run_dir,
            log=self.say,
            strategy=self.strategy,
        )
        extra = {"pt_steps": result.pt_steps, "meta_steps": result.meta_steps}
        if meta:
            w = weights.all_weights().numpy()
            extra["task_weights"] = w
            extra["skipped_meta_steps"] = result.skipped_meta_steps
            if self.data.task_kinds is not None:
                extra.update(_weight_stats(w, np.asarray(self.data.task_kinds)))
        return backbone, extra

    def pretrain_cotrain(self, setting: _Setting, run_dir: str, use_pcgrad: bool):
        c = self.config
        tf.keras.utils.set_random_seed(self.seed)
        with distribute.scope(self.strategy, c.meta.mixed_precision):
            backbone = self.backbone(c.model.pt_dropout)
            feature_dim = int(backbone.output_shape[-1])
            pt_head = _dense_head(self.data.num_pt_tasks, feature_dim, "pt_head")
            ft_head = _dense_head(len(setting.meta_tasks), feature_dim, "ft_head")

        def pt_loss_fn(batch):
            return _pt_loss(pt_head, backbone, batch)

        def ft_loss_fn(batch):
            return _ft_loss(ft_head, backbone, batch)

        result = multitask.cotrain(
            shared_params=backbone.trainable_variables,
            pt_head_params=pt_head.trainable_variables,
            ft_head_params=ft_head.trainable_variables,
            pt_loss_fn=pt_loss_fn,
            ft_loss_fn=ft_loss_fn,
            pt_data=self.pt_data(),
            ft_data=self.ft_data(
                setting, "pool", setting.meta_tasks, train=True, repeat=True, blocks=True
            ),
            num_steps=self.pt_steps,
            learning_rate=c.cotrain.learning_rate,
            use_pcgrad=use_pcgrad,
            workdir=run_dir,
            log=self.say,
            log_every=c.meta.log_every * c.meta.pt_steps_per_meta_step,
            **self.shard_kwargs(),
        )
        return backbone, {"pt_steps": result.steps, "conflicts": result.conflicts}

    # -- fine-tuning and evaluation -----------------------------------------

    def finetune(self, backbone, setting: _Setting):
        f = self.config.finetune
        return finetune.finetune_multilabel(
            backbone,
            lambda: self.backbone(self.config.model.ft_dropout),
            self.ft_data(setting, "pool", setting.eval_tasks, train=True, blocks=True),
            self.ft_data(setting, "test", setting.eval_tasks, train=False, blocks=True),
            num_tasks=len(setting.eval_tasks),
            input_key="graph",
            label_key="labels",
            mode=f.mode,
            epochs=finetune_epochs(self.config, len(setting.ft_graphs)),
            learning_rate=f.learning_rate,
            seed=self.seed,
            **self.shard_kwargs(),
        )


def finetune_epochs(config, num_graphs: int) -> int:
    """The final FT's epochs over `num_graphs` labelled graphs: `finetune.epochs`, or
    the whole epochs that make about `finetune.steps` updates, so that a smaller FT
    set (the partial setting) is not also a shorter fit."""
    f = config.finetune
    if f.steps is None:
        return f.epochs
    return finetune.epochs_for_steps(f.steps, num_graphs, config.data.ft_batch_size)


def _oracle_weights(data: _Data) -> np.ndarray:
    kinds = np.asarray(data.task_kinds)
    return np.select([kinds == "relevant", kinds == "harmful"], [2.0, 0.0], default=1.0)


def _weight_stats(w: np.ndarray, kinds: np.ndarray) -> dict:
    out = {}
    for kind in ("relevant", "irrelevant", "harmful"):
        if (kinds == kind).any():
            out[f"task_weights/mean_{kind}"] = float(w[kinds == kind].mean())
    both = (kinds == "relevant") | (kinds == "harmful")
    if (kinds == "relevant").any() and (kinds == "harmful").any():
        out["task_weights/auroc_relevant_vs_harmful"] = reporting.auroc(
            w[both], kinds[both] == "relevant"
        )
    return out


def meta_gradient_ranking(
    config: ml_collections.ConfigDict,
    workdir: str,
    *,
    setting: str,
    at_pt_steps: Sequence[int],
    num_samples: int,
    seeds: Sequence[int] | None = None,
    test_as_ft_val: bool = False,
    log: Callable[[str], None] | None = print,
) -> list[dict]:
    """Does the meta-gradient rank the task kinds, one sample at a time or on average?

    For each seed, meta-PT's problem and loop settings in `setting` ("full",
    "partial" or "held_out") up to its choice of phi: PT with every task weight at
    1, and at each of `at_pt_steps` PT steps `num_samples` meta-gradients from fresh
    batches (`online.sample_meta_gradients`). With `test_as_ft_val`, the FT-val
    batches come from the test graphs instead of the setting's FT-val graphs, to
    tell the FT-val sample's own error from the rest (with one FT head, trained on
    the FT-train graphs, even if `config.meta.ft_cross_fit`). One row per seed and
    state: the AUROC of relevant vs harmful and of relevant vs irrelevant tasks, scoring
    each task by the ascent direction of its weight (minus its meta-gradient), for
    one sample (averaged over the samples) and for the mean over the samples; and
    per kind the fraction of tasks whose mean is more than 2 standard errors above
    0 ("up") or below it ("down"), and the median |mean| / sd. Needs the synthetic
    data's task kinds; the dataset is generated into `workdir/data` if missing.
    """
    validate_config(config)
    if setting not in SETTINGS:
        raise ValueError(f"setting must be one of {SETTINGS}. Received: {setting!r}.")
    say = log or (lambda _: None)
    data = prepare_data(config, workdir, say)
    if data.task_kinds is None:
        raise ValueError(
            f"{data.directory} has no {TASK_INFO_FILE}: ranking the task kinds needs the "
            "synthetic benchmark's ground truth."
        )
    kinds = np.asarray(data.task_kinds)
    counts = {kind: int(np.sum(kinds == kind)) for kind in synthetic_ppi.TASK_KINDS}
    if min(counts.values()) == 0:
        raise ValueError(
            f"Ranking the task kinds needs PT tasks of every kind; {data.directory} has {counts}."
        )
    relevant = kinds == "relevant"

    def auroc(scores, other):
        both = relevant | (kinds == other)
        return reporting.auroc(scores[both], relevant[both])

    rows = []
    for seed in config.seeds if seeds is None else seeds:
        runner = _Runner(config, data, workdir, int(seed), say)
        chosen = make_setting(setting, data, config, int(seed))
        tasks = chosen.meta_tasks
        problem, _ = runner.build_problem(tasks)
        meta_config = ml_collections.ConfigDict(config.meta.to_dict())
        meta_config.seed = int(seed)
        if test_as_ft_val:
            meta_config.ft_cross_fit = False  # cross-fitted heads would train on the test graphs
        for samples in online.sample_meta_gradients(
            problem,
            **runner.online_data(chosen, tasks, "test" if test_as_ft_val else "meta_val"),
            config=meta_config,
            at_pt_steps=at_pt_steps,
            num_samples=num_samples,
            log=say,
        ):
            ascent = -np.asarray(samples.grads[0], np.float64)  # [samples, tasks]
            mean, sd = ascent.mean(0), ascent.std(0, ddof=1)
            se = sd / np.sqrt(len(ascent))
            row = {"seed": int(seed), "setting": setting, "pt_step": samples.pt_step}
            for other in ("harmful", "irrelevant"):
                row[f"auroc_{other}_one_sample"] = float(np.mean([auroc(a, other) for a in ascent]))
                row[f"auroc_{other}_mean"] = auroc(mean, other)
            for kind in synthetic_ppi.TASK_KINDS:
                sel = kinds == kind
                row[f"{kind}_up"] = float(np.mean(mean[sel] > 2 * se[sel]))
                row[f"{kind}_down"] = float(np.mean(mean[sel] < -2 * se[sel]))
                row[f"{kind}_snr"] = float(np.median(np.abs(mean[sel]) / sd[sel]))
            rows.append(row)
    return rows


def _export(model: tf.keras.Model, schema: tfgnn.GraphSchema, export_base: str) -> str:
    # Clients send graphs without labels: the serving spec leaves them out (examples
    # that carry them parse all the same).
    serving_schema = tfgnn.GraphSchema()
    serving_schema.CopyFrom(schema)
    for key in (graphs.PT_LABELS, graphs.FT_LABELS):
        if key in serving_schema.context.features:
            del serving_schema.context.features[key]
    spec = tfgnn.create_graph_spec_from_schema_pb(serving_schema)

    def serve(inputs):
        graph = tfgnn.parse_example(spec, inputs["examples"]).merge_batch_to_components()
        return {"probabilities": tf.sigmoid(model(graph, training=False))}

    # Only the variables and the signature are saved, not the Keras model's own
    # functions (their GraphTensor specs would make a Python loader import TF-GNN).
    holder = tf.Module()
    holder.variables_list = list(model.variables)
    return export.export_for_serving(
        holder, serve, export_base, inputs={"examples": tf.TensorSpec([None], tf.string)}
    )


# ---------------------------------------------------------------------------
# The benchmark


def run(
    config: ml_collections.ConfigDict,
    workdir: str,
    *,
    log: Callable[[str], None] | None = print,
) -> dict:
    """Runs every method in every setting over `config.seeds`; returns the results."""
    validate_config(config)
    strategy = distribute.make_strategy(config.meta)  # before any other op runs
    chief = distribute.is_chief(strategy)
    say = log or (lambda _: None)
    start = time.perf_counter()
    os.makedirs(workdir, exist_ok=True)
    data = prepare_data(config, workdir, say, strategy)
    say(
        f"Data: {data.description}: {data.num_pt_tasks} PT tasks, {data.num_ft_tasks} FT tasks, "
        f"{data.num_ft_graphs} labelled FT graphs."
    )
    per_run: list[dict] = []
    export_base = os.path.join(workdir, "export")
    # What a previous run finished, the same on every worker (`distribute.previous_run`);
    # `exported`: the first meta-PT model of the full setting, kept from a previous run.
    result_paths = {
        (seed, setting, method): os.path.join(
            workdir, f"seed_{seed}", setting, method, "result.json"
        )
        for seed in config.seeds
        for setting in config.settings
        for method in config.methods
    }
    finished, exported = distribute.previous_run(strategy, result_paths, export_base)
    total = len(config.seeds) * len(config.settings) * len(config.methods)
    done = 0
    for seed in config.seeds:
        runner = _Runner(config, data, workdir, seed, say, strategy)
        supervised = oracle = None  # PT with fixed weights: once per seed, for every setting
        for setting_name in config.settings:
            setting = make_setting(setting_name, data, config, seed)
            for method in config.methods:
                run_dir = os.path.join(workdir, f"seed_{seed}", setting_name, method)
                result_path = result_paths[(seed, setting_name, method)]
                done += 1
                elapsed = time.perf_counter() - start
                say(
                    f"[{done}/{total}] seed {seed}, {setting_name}, {METHOD_NAMES[method]} "
                    f"({elapsed / 60:.1f} min so far)"
                )
                if (seed, setting_name, method) in finished:
                    per_run.append(_json_load(result_path))
                    say(f"  done before: test AUC {per_run[-1]['test_auc']:.4f}")
                    continue
                os.makedirs(run_dir, exist_ok=True)
                extra: dict = {}
                if method == "no_pt":
                    backbone = None
                elif method == "supervised_pt":
                    if supervised is None:
                        pt_dir = os.path.join(workdir, f"seed_{seed}", "supervised_pt")
                        supervised = runner.pretrain_online(None, pt_dir, meta=False)
                    backbone, extra = supervised
                elif method == "oracle_pt":
                    if data.task_kinds is None:
                        say("  skipped: the dataset has no ground-truth task kinds")
                        continue
                    if oracle is None:
                        pt_dir = os.path.join(workdir, f"seed_{seed}", "oracle_pt")
                        oracle = runner.pretrain_online(
                            None, pt_dir, meta=False, fixed_weights=_oracle_weights(data)
                        )
                    backbone, extra = oracle
                elif method in ("cotrain", "cotrain_pcgrad"):
                    backbone, extra = runner.pretrain_cotrain(
                        setting, run_dir, use_pcgrad=method == "cotrain_pcgrad"
                    )
                else:
                    backbone, extra = runner.pretrain_online(setting, run_dir, meta=True)
                tuned = runner.finetune(backbone, setting)
                say(f"  test AUC {tuned.test_auc:.4f}")
                entry = {
                    "seed": seed,
                    "setting": setting_name,
                    "method": method,
                    "test_auc": tuned.test_auc,
                    "per_task_auc": tuned.per_task_auc,
                    **extra,
                }
                if chief:
                    reporting.write_json(result_path, entry)
                    per_run.append(_json_load(result_path))
                else:
                    per_run.append(reporting.to_jsonable(entry))
                if (
                    method == "meta_pt"
                    and setting_name == "full"
                    and config.export
                    and exported is None
                ):
                    # Every worker saves (saving distributed variables can involve
                    # collectives); the others' copies go to a directory deleted after.
                    with distribute.output_dir(export_base, strategy) as base:
                        exported = _export(tuned.model, data.schema, base)
                    if chief:
                        say(f"SavedModel: {exported}")

    if not chief:
        say(
            f"This is {distribute.worker_name(strategy)}, not the chief: the chief writes the "
            f"results, figure and SavedModel to {workdir}."
        )
        return _aggregate(config, data, per_run, None, time.perf_counter() - start)

    results = _aggregate(config, data, per_run, exported, time.perf_counter() - start)
    table = _table(config, results)
    paths = reporting.write_results(workdir, results, table)
    figure = _figure(config, data, per_run, workdir)
    say("\n" + table)
    say(f"\nResults:     {paths['json']}, {paths['markdown']}")
    if figure:
        say(f"Figure:      {figure}")
    say(f"SavedModel:  {exported or 'not exported (config.export=False)'}")
    say(f"TensorBoard: tensorboard --logdir {workdir}")
    return results


def _aggregate(config, data, per_run, exported, seconds) -> dict:
    summary: dict = {}
    for setting in config.settings:
        for method in config.methods:
            aucs = [
                r["test_auc"] for r in per_run if r["setting"] == setting and r["method"] == method
            ]
            if aucs:
                mean, std = reporting.mean_std(aucs)
                summary.setdefault(setting, {})[method] = {"mean": mean, "std": std, "runs": aucs}
    weights: dict = {}
    for setting in config.settings:
        runs = [r for r in per_run if r["setting"] == setting and r["method"] == "meta_pt"]
        key = "task_weights/auroc_relevant_vs_harmful"
        if runs and all(key in r for r in runs):
            mean, std = reporting.mean_std([r[key] for r in runs])
            weights[setting] = {"auroc_relevant_vs_harmful": {"mean": mean, "std": std}}
            for kind in ("relevant", "irrelevant", "harmful"):
                k = f"task_weights/mean_{kind}"
                if all(k in r for r in runs):
                    weights[setting][f"mean_weight_{kind}"] = float(np.mean([r[k] for r in runs]))
    checks = {}
    for setting, by_method in summary.items():
        if all(m in by_method for m in ("no_pt", "supervised_pt", "meta_pt")):
            a, b, c = (by_method[m] for m in ("meta_pt", "supervised_pt", "no_pt"))
            checks[setting] = {
                "meta_pt_beats_supervised_pt_by_more_than_std": bool(
                    a["mean"] - b["mean"] > max(a["std"], b["std"])
                ),
                "supervised_pt_beats_no_pt_by_more_than_std": bool(
                    b["mean"] - c["mean"] > max(b["std"], c["std"])
                ),
            }
    return {
        "experiment": config.experiment,
        "data": data.description,
        "num_pt_tasks": data.num_pt_tasks,
        "num_ft_tasks": data.num_ft_tasks,
        "seeds": list(config.seeds),
        "finetune_mode": config.finetune.mode,
        "test_auc": summary,
        "task_weights": weights,
        "checks": checks,
        "runs": [{k: v for k, v in r.items() if k != "task_weights"} for r in per_run],
        "export": exported,
        "seconds": seconds,
    }


def _table(config, results) -> str:
    settings = [s for s in config.settings if s in results["test_auc"]]
    rows = []
    for method in config.methods:
        row = [METHOD_NAMES[method]]
        for s in settings:
            cell = results["test_auc"][s].get(method)
            row.append(f"{100 * cell['mean']:.1f} +- {100 * cell['std']:.1f}" if cell else "-")
        rows.append(row)
    n = len(results["seeds"])
    headers = [f"method ({results['finetune_mode']} FT, {n} seeds): test AUC"]
    headers += [
        {"full": "full FT", "partial": "50% FT data", "held_out": "held-out tasks"}[s]
        for s in settings
    ]
    text = reporting.markdown_table(headers, rows)
    if results["task_weights"]:
        w_rows = []
        for s, stats in results["task_weights"].items():
            auc = stats["auroc_relevant_vs_harmful"]
            w_rows.append(
                [s, f"{auc['mean']:.3f} +- {auc['std']:.3f}"]
                + [
                    f"{stats.get(f'mean_weight_{k}', float('nan')):.3f}"
                    for k in ("relevant", "irrelevant", "harmful")
                ]
            )
        text += "\n\n" + reporting.markdown_table(
            [
                "learned task weights",
                "AUROC relevant vs harmful",
                "mean w relevant",
                "mean w irrelevant",
                "mean w harmful",
            ],
            w_rows,
        )
    text += (
        f"\n\nData: {results['data']} ({results['num_pt_tasks']} PT tasks, "
        f"{results['num_ft_tasks']} FT tasks)."
    )
    return text


def _figure(config, data, per_run, workdir) -> str | None:
    if data.task_kinds is None:
        return None
    runs = [r for r in per_run if r["method"] == "meta_pt" and "task_weights" in r]
    if not runs:
        return None
    first = runs[0]
    return reporting.plot_weights_by_group(
        os.path.join(workdir, "task_weights.png"),
        np.asarray(first["task_weights"]),
        data.task_kinds,
        f"Learned PT task weights by ground truth (seed {first['seed']}, {first['setting']})",
        xlabel="task weight w = 2 sigmoid(phi)",
    )
