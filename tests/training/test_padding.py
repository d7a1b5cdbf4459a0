"""Padded ego-graph batches (`metapt_tf.data.padding`): static sizes, the unpadded GIN
loss and gradient (also XLA-compiled), blocks per replica, and clear errors for batches
that do not fit. Here rather than in tests/data because it shares the GIN problem of
the training tests (gin_checks.py)."""

import gin_checks  # same directory (pytest puts it on sys.path)
import numpy as np
import pytest
import tensorflow as tf

from metapt_tf.data import graphs, padding
from metapt_tf.models.gin import TwiceDifferentiableBatchNorm


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    directory = str(tmp_path_factory.mktemp("ppi"))
    return directory, gin_checks.write_data(directory)


@pytest.fixture
def float64():
    previous = tf.keras.mixed_precision.global_policy()
    tf.keras.mixed_precision.set_global_policy("float64")
    yield
    tf.keras.mixed_precision.set_global_policy(previous)


def _rel(a, b) -> float:
    a, b = gin_checks.flat(a), gin_checks.flat(b)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def test_global_batch_has_static_sizes_and_every_block_its_graphs(data):
    directory, schema = data
    unpadded = next(iter(gin_checks.pt_data(directory, schema, 0)))
    batch = next(iter(gin_checks.pt_data(directory, schema, 2)))
    graph = batch["graph"]
    # 2 blocks of 4 real graphs and one padding component each, every size static.
    assert graph.spec.total_num_components == 10
    for piece in (*graph.node_sets.values(), *graph.edge_sets.values(), graph.context):
        assert piece.spec.total_size is not None and piece.sizes.shape.is_fully_defined()
        for feature in piece.features.values():
            assert feature.shape.is_fully_defined(), feature.shape
    assert graph.edge_sets[graphs.EDGE_SET].adjacency.source.shape.is_fully_defined()
    mask = batch[padding.MASK_KEY].numpy()
    assert mask.tolist() == [True] * 4 + [False] + [True] * 4 + [False]
    np.testing.assert_array_equal(batch["pt_labels"].numpy()[mask], unpadded["pt_labels"])
    assert not batch["pt_labels"].numpy()[~mask].any()
    centers = graph.node_sets[graphs.NODE_SET][graphs.CENTER_FEATURE].numpy()
    assert (centers == padding.PADDING_CENTER).any() and set(np.unique(centers)) <= {-1, 0, 1}
    # Block 1 is a padded GraphTensor of its own: the second 4 graphs, indices re-based.
    block = padding.shard_batch(batch, 2, 1)
    nodes = graph.node_sets[graphs.NODE_SET].total_size
    assert block["graph"].num_components == 5
    assert block[padding.MASK_KEY].numpy().tolist() == [True] * 4 + [False]
    np.testing.assert_array_equal(block["pt_labels"][:4], unpadded["pt_labels"][4:])
    sources = block["graph"].edge_sets[graphs.EDGE_SET].adjacency.source.numpy()
    assert 0 <= sources.min() and sources.max() < nodes // 2
    sizes = block["graph"].node_sets[graphs.NODE_SET].sizes.numpy()
    np.testing.assert_array_equal(
        sizes[:4], unpadded["graph"].node_sets[graphs.NODE_SET].sizes.numpy()[4:]
    )
    assert sizes.sum() == nodes // 2


def test_padded_batch_gives_the_unpadded_gin_loss_and_gradient(data, float64):
    directory, schema = data
    spec = gin_checks.pt_data(directory, schema, 0).element_spec["graph"]
    problem, _ = gin_checks.build_problem(spec, shard=False)
    variables = problem.pt_params + problem.meta_params

    def loss_and_grads(batch):
        with tf.GradientTape() as tape:
            loss = problem.pt_loss_fn(batch)
        return loss, tape.gradient(loss, variables)

    loss, grads = loss_and_grads(next(iter(gin_checks.pt_data(directory, schema, 0))))
    padded = next(iter(gin_checks.pt_data(directory, schema, 2)))
    padded_loss, padded_grads = loss_and_grads(padded)
    assert loss.dtype == tf.float64 and float(loss) > 0.1
    assert abs(float(padded_loss) - float(loss)) < 1e-12
    assert _rel(padded_grads, grads) < 1e-12
    # Compiled with XLA (no host-side Python, static shapes): the same step.
    xla_loss, xla_grads = tf.function(loss_and_grads, jit_compile=True)(padded)
    assert abs(float(xla_loss) - float(loss)) < 1e-12
    assert _rel(xla_grads, grads) < 1e-12
    # Without the mask the padding would count: the check can fail.
    unmasked = {k: v for k, v in padded.items() if k != padding.MASK_KEY}
    assert abs(float(problem.pt_loss_fn(unmasked)) - float(loss)) > 1e-3


def test_all_true_mask_gives_the_unmasked_batch_norm_bit_for_bit():
    # Unpadded graphs reach the GIN's batch norms with an all-True mask: the
    # one-device path must be the unmasked computation exactly.
    layer = TwiceDifferentiableBatchNorm(dtype="float64")
    x = tf.constant(np.random.default_rng(0).normal(size=(37, 5)) * 3.0 + 1.0)
    mask = tf.ones([37], tf.bool)
    outs = []
    for m in (None, mask):
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = layer(x, training=True, mask=m)
            loss = tf.reduce_sum(tf.sin(y) * tf.range(5, dtype=tf.float64))
        outs.append((y.numpy(), tape.gradient(loss, x).numpy()))
    np.testing.assert_array_equal(outs[1][0], outs[0][0])
    np.testing.assert_array_equal(outs[1][1], outs[0][1])
    # A mask leaves rows out: the statistics of the others.
    partial = tf.constant([True] * 30 + [False] * 7)
    y = layer(x, training=True, mask=partial).numpy()
    expected = layer(x[:30], training=True).numpy()
    np.testing.assert_allclose(y[:30], expected, rtol=1e-12, atol=1e-12)


def test_a_batch_larger_than_the_constraints_is_a_clear_error(data):
    directory, schema = data
    path = f"{directory}/pt.tfrecord"
    constraints = padding.size_constraints(path, schema, 2)
    assert constraints.total_num_components == 3
    batches = graphs.load_dataset(path, schema, batch_size=4, drop_remainder=True)
    batch = next(iter(batches))
    with pytest.raises(ValueError, match=r"does not fit the padding sizes .*total_num_components"):
        padding.pad_batch(batch, constraints)
    # The static batch size is checked when the dataset is built.
    with pytest.raises(ValueError, match=r"does not fit .* {'total_num_components': 4"):
        padding.padded_dataset(batches, constraints)
    # Node and edge counts vary from batch to batch: checked when the batch is padded.
    small = constraints._replace(
        total_num_components=5,
        total_num_nodes={graphs.NODE_SET: 20},
        total_num_edges={graphs.EDGE_SET: 20},
    )
    with pytest.raises(tf.errors.InvalidArgumentError, match="does not fit the padding sizes"):
        next(iter(padding.padded_dataset(batches, small)))
    with pytest.raises(ValueError, match="graphs_per_batch must be an int >= 1. Received: .*=0"):
        padding.size_constraints(path, schema, 0)


def test_masked_mean_ignores_padding_rows_even_if_not_finite():
    values = tf.constant([[1.0, 3.0], [5.0, 7.0], [np.nan, np.inf]])
    mask = tf.constant([True, True, False])
    assert float(padding.masked_mean(values, mask)) == 4.0
    assert float(padding.masked_mean(values[:2], None)) == 4.0


def test_pad_blocks_splits_any_batch_into_the_padded_dataset_layout(data):
    directory, schema = data
    path = f"{directory}/pt.tfrecord"
    constraints = padding.size_constraints(path, schema, 4)

    def batches(size, drop_remainder=False):
        ds = graphs.load_dataset(path, schema, batch_size=size, drop_remainder=drop_remainder)
        return ds.map(lambda b: {"graph": b["graph"], "pt_labels": b[graphs.PT_LABELS]})

    # A batch of R G graphs: exactly the global batch padded_dataset merges.
    expected = next(iter(padding.padded_dataset(batches(4, True), constraints, 2)))
    got = padding.pad_blocks(next(iter(batches(8))), constraints, 2)
    assert got["graph"].spec == expected["graph"].spec
    flat_expected = tf.nest.flatten(expected, expand_composites=True)
    flat_got = tf.nest.flatten(got, expand_composites=True)
    assert len(flat_got) == len(flat_expected)
    for a, b in zip(flat_got, flat_expected, strict=True):
        np.testing.assert_array_equal(a.numpy(), b.numpy())
    # 3 graphs: all in block 0, block 1 empty (all padding), inside a tf.function too.
    three = next(iter(batches(3)))
    out = tf.function(lambda b: padding.pad_blocks(b, constraints, 2))(three)
    assert out["graph"].spec == expected["graph"].spec  # the same static sizes
    assert out[padding.MASK_KEY].numpy().tolist() == [True] * 3 + [False] * 7
    np.testing.assert_array_equal(out["pt_labels"][:3], three["pt_labels"])
    empty = padding.shard_batch(out, 2, 1, equal_blocks=False)
    assert not empty[padding.MASK_KEY].numpy().any()
    centers = empty["graph"].node_sets[graphs.NODE_SET][graphs.CENTER_FEATURE].numpy()
    assert (centers == padding.PADDING_CENTER).all()
    assert float(padding.masked_mean(tf.ones([5, 2]), empty[padding.MASK_KEY])) == 0.0
    # The online loop's cut insists on equal blocks.
    with pytest.raises(tf.errors.InvalidArgumentError, match="must hold the same number"):
        padding.shard_batch(out, 2, 1)
    with pytest.raises(ValueError, match=r"more ego-graphs than the 2 blocks of 4 .*Received 9"):
        padding.pad_blocks(next(iter(batches(9))), constraints, 2)
