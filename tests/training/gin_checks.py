"""A tiny PPI-like GIN meta-PT problem on padded and unpadded graph batches, for the
tests of padding, XLA compilation and MirroredStrategy (test_ppi_distribute.py, and
distribute_checks.py in a subprocess with 2 logical CPUs).

The problem is the benchmark's (`ppi_benchmark._pt_loss`: task-weighted BCE over
real graphs), on a GIN without dropout (dropout draws differ with the batch's
shape), in the dtype of the Keras policy in force. The same GIN is fine-tuned
(`finetune_on_graphs`) and co-trained (`cotrain_steps`) on FT batches of
`FT_BATCH` graphs, which neither the FT pool nor 2 replicas divide evenly.
"""

import functools
import os
import tempfile

import ml_collections
import numpy as np
import tensorflow as tf

from metapt_tf.data import graphs, padding, synthetic_ppi
from metapt_tf.meta_params import TaskWeights
from metapt_tf.models import gin_backbone
from metapt_tf.training import (
    distribute,
    finetune,
    interfaces,
    multitask,
    online,
    ppi_benchmark,
)

NUM_PT_TASKS, NUM_FT_TASKS, BATCH = 6, 3, 8
# Fine-tuning: 16 FT graphs in batches of 5 (5, 5, 5, 1: blocks of 3 and 2, and of 1
# and none), 11 test graphs in batches of 4 (4, 4, 3).
FT_BATCH, TEST_BATCH, NUM_TEST = 5, 4, 11


def write_data(directory: str, num_test_graphs: int = 4):
    """The tiny synthetic benchmark in `directory`; returns its schema."""
    synthetic_ppi.write_synthetic_benchmark(
        directory,
        num_pt_graphs=32,
        num_ft_graphs=16,
        num_test_graphs=num_test_graphs,
        num_pt_tasks=NUM_PT_TASKS,
        num_ft_tasks=NUM_FT_TASKS,
        # The former task design: in this tiny benchmark its PT and FT gradients
        # conflict within the first co-training steps, which the PCGrad checks need
        # (with the default design they do not conflict in those steps).
        relevant_tasks="ft_factors",
        harmful_tasks="random_labels",
        seed=0,
    )
    return graphs.read_schema(os.path.join(directory, "schema.pbtxt"))


def _options(ds):
    options = tf.data.Options()
    options.autotune.enabled = False
    options.experimental_optimization.inject_prefetch = False
    return ds.with_options(options)


def pt_data(directory, schema, shards: int, seed: int = 0, batch: int = BATCH):
    """PT batches of `batch` graphs: unpadded (shards=0) or padded for `shards` replicas."""
    path = os.path.join(directory, "pt.tfrecord")
    ds = graphs.load_dataset(
        path,
        schema,
        batch_size=batch // shards if shards else batch,
        shuffle=True,
        seed=seed,
        repeat=True,
        drop_remainder=True,
    ).map(lambda b: {"graph": b["graph"], "pt_labels": b[graphs.PT_LABELS]})
    if shards:
        per_block = batch // shards
        ds = padding.padded_dataset(ds, padding.size_constraints(path, schema, per_block), shards)
    return _options(ds)


def ft_data(directory, schema, seed: int):
    ds = graphs.load_dataset(
        os.path.join(directory, "ft_train.tfrecord"),
        schema,
        batch_size=4,
        shuffle=True,
        seed=seed,
        repeat=True,
        drop_remainder=True,
    ).map(lambda b: {"graph": b["graph"], "labels": b[graphs.FT_LABELS]})
    return _options(ds)


def build_problem(spec, *, shard: bool, seed: int = 0):
    """The GIN problem (variables in the Keras policy's dtype); `shard`: padded batches
    cut per replica (`padding.shard_batch`)."""
    tf.keras.utils.set_random_seed(seed)
    backbone = gin_backbone(spec, num_layers=2, hidden_units=8, dropout_rate=0.0)
    feature_dim = int(backbone.output_shape[-1])
    pt_head = tf.keras.layers.Dense(NUM_PT_TASKS, name="pt_head")
    pt_head.build((None, feature_dim))
    weights = TaskWeights(NUM_PT_TASKS, dtype=pt_head.kernel.dtype)
    # Task weights away from 1, so that the meta-gradient is not symmetric in them.
    weights.variables_list[0].assign(np.linspace(-1.0, 1.0, NUM_PT_TASKS))

    def pt_loss_fn(batch):
        return ppi_benchmark._pt_loss(pt_head, backbone, batch, weights.all_weights())

    problem = interfaces.MetaPretrainProblem(
        backbone=backbone,
        pt_params=backbone.trainable_variables + pt_head.trainable_variables,
        meta_params=weights.variables_list,
        pt_loss_fn=pt_loss_fn,
        num_ft_classes=NUM_FT_TASKS,
        ft_input_key="graph",
        ft_label_key="labels",
        ft_multilabel=True,
        pt_shard_fn=padding.shard_batch if shard else None,
    )
    return problem, weights


def loop_config(**overrides) -> ml_collections.ConfigDict:
    c = online.default_config()
    c.update(
        dict(
            warmup_steps=0,
            pt_steps_per_meta_step=2,
            num_meta_steps=2,
            pt_learning_rate=0.01,
            ft_learning_rate=0.05,
            neumann_alpha=0.1,
            neumann_terms=2,
            hvp_mode="reverse_over_reverse",
        )
    )
    c.update(overrides)
    return c


def flat(tensors) -> np.ndarray:
    return np.concatenate([np.reshape(np.asarray(t), [-1]) for t in tensors])


def one_meta_gradient(directory, schema, strategy, *, shards: int, **config) -> dict:
    """Two PT steps, then one meta-gradient, through the online loop's compiled steps."""
    c = loop_config(distribute=distribute.strategy_kind(strategy), **config)
    spec = pt_data(directory, schema, 0).element_spec["graph"]
    with distribute.scope(strategy):
        problem, weights = build_problem(spec, shard=shards > 1)
    loop = online._Loop(
        problem,
        pt_data(directory, schema, shards),
        ft_data(directory, schema, 1),
        ft_data(directory, schema, 2),
        c,
        pt_data(directory, schema, shards, seed=3),
        strategy,
    )
    losses, codes, _ = loop.pt_steps(2)
    out = loop._meta_step_fn()
    return {
        "pt_losses": losses.tolist(),
        "codes": codes.tolist(),
        "theta": flat([p.numpy() for p in loop.pt_params]).tolist(),
        "meta_grads": flat([g.numpy() for g in out["grads"]]).tolist(),
        "ft_val_loss": float(out["ft_val_loss"]),
        "dtype": weights.phi.dtype.name,
    }


def _shard_options(strategy, shards: int) -> dict:
    """finetune's and cotrain's options for padded blocks (the benchmark's)."""
    if not shards:
        return {}
    return {
        "strategy": strategy,
        "mask_key": padding.MASK_KEY,
        "shard_fn": functools.partial(padding.shard_batch, equal_blocks=False),
    }


def ft_blocks(directory, schema, file: str, batch: int, *, shards: int, shuffle: bool, seed=0):
    """FT batches {"graph", "labels"} of `batch` graphs of `file` (every graph, the
    last batch partial): unpadded (shards=0), or as `shards` padded blocks each
    (`padding.pad_blocks`)."""
    path = os.path.join(directory, file)
    ds = graphs.load_dataset(path, schema, batch_size=batch, shuffle=shuffle, seed=seed)
    ds = ds.map(lambda b: {"graph": b["graph"], "labels": b[graphs.FT_LABELS]})
    if shards:
        constraints = padding.size_constraints(path, schema, -(-batch // shards))
        ds = ds.map(lambda b: padding.pad_blocks(b, constraints, shards))
    return _options(ds)


def _gin(spec):
    return gin_backbone(spec, num_layers=2, hidden_units=8, dropout_rate=0.0)


def finetune_on_graphs(directory, schema, strategy, *, shards: int, mode: str) -> dict:
    """`finetune.finetune_multilabel` of a GIN on FT batches of `FT_BATCH` graphs (two
    epochs) and its test predictions: on one device (shards=0, unpadded batches) or
    over `shards` replicas of `strategy` (padded blocks)."""
    spec = pt_data(directory, schema, 0).element_spec["graph"]
    tf.keras.utils.set_random_seed(0)
    backbone = _gin(spec)
    tf.keras.utils.set_random_seed(0)  # the same datasets' seeds in every call

    def data(file, batch, shuffle):
        return ft_blocks(directory, schema, file, batch, shards=shards, shuffle=shuffle, seed=1)

    test = data("test.tfrecord", TEST_BATCH, False)
    options = _shard_options(strategy, shards)
    result = finetune.finetune_multilabel(
        backbone,
        lambda: _gin(spec),
        data("ft_train.tfrecord", FT_BATCH, True),
        test,
        num_tasks=NUM_FT_TASKS,
        input_key="graph",
        label_key="labels",
        mode=mode,
        epochs=2,
        learning_rate=0.02,
        **options,
    )
    scores, labels = finetune.predict_multilabel(
        result.model, test, input_key="graph", label_key="labels", **options
    )
    in_scope = strategy.extended.variable_created_in_scope
    return {
        "weights": flat(result.model.get_weights()).tolist(),
        "backbone": flat(result.model.backbone.get_weights()).tolist(),
        "initial": flat(backbone.get_weights()).tolist(),
        "per_task_auc": result.per_task_auc.tolist(),
        "test_auc": result.test_auc,
        "final_train_loss": result.final_train_loss,
        "scores": scores.tolist(),
        "labels": labels.tolist(),
        "dtype": result.model.head.kernel.dtype.name,
        "in_scope": all(in_scope(v) for v in result.model.variables),
    }


def cotrain_steps(directory, schema, strategy, *, shards: int, use_pcgrad: bool, steps=2):
    """`multitask.cotrain` steps of a GIN with the benchmark's losses, on PT batches of
    `BATCH` graphs and FT batches of `FT_BATCH`: on one device (shards=0, unpadded)
    or over `shards` replicas of `strategy` (padded blocks)."""
    spec = pt_data(directory, schema, 0).element_spec["graph"]
    tf.keras.utils.set_random_seed(0)
    with distribute.scope(strategy):
        backbone = _gin(spec)
        feature_dim = int(backbone.output_shape[-1])
        pt_head = ppi_benchmark._dense_head(NUM_PT_TASKS, feature_dim, "pt_head")
        ft_head = ppi_benchmark._dense_head(NUM_FT_TASKS, feature_dim, "ft_head")
    shared, heads = (
        backbone.trainable_variables,
        (pt_head.trainable_variables, ft_head.trainable_variables),
    )
    initial = [v.numpy() for v in shared]
    ft = ft_blocks(directory, schema, "ft_train.tfrecord", FT_BATCH, shards=shards, shuffle=False)
    result = multitask.cotrain(
        shared_params=shared,
        pt_head_params=heads[0],
        ft_head_params=heads[1],
        pt_loss_fn=lambda batch: ppi_benchmark._pt_loss(pt_head, backbone, batch),
        ft_loss_fn=lambda batch: ppi_benchmark._ft_loss(ft_head, backbone, batch),
        pt_data=pt_data(directory, schema, shards),
        # From the fourth batch on: the one of a single graph (an empty block).
        ft_data=ft.repeat().skip(3),
        num_steps=steps,
        learning_rate=0.05,
        use_pcgrad=use_pcgrad,
        workdir=tempfile.mkdtemp(),
        log=None,
        log_every=steps,
        **_shard_options(strategy, shards),
    )
    return {
        "shared": flat([v.numpy() for v in shared]).tolist(),
        "initial": flat(initial).tolist(),
        "heads": flat([v.numpy() for v in heads[0] + heads[1]]).tolist(),
        "pt_loss": result.history["pt_loss"],
        "ft_loss": result.history["ft_loss"],
        "conflicts": result.conflicts,
        "dtype": backbone.trainable_variables[0].dtype.name,
    }
