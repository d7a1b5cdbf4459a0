"""Ego-graph layout: schema, EgoGraph checks, tf.Example encoding, TFRecord I/O and loaders."""

import os
import re

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_gnn as tfgnn

from metapt_tf.data import graphs

NUM_PT, NUM_FT = 5, 3


@pytest.fixture(scope="module")
def schema():
    return graphs.graph_schema(NUM_PT, NUM_FT)


def random_graph(rng, num_nodes=None, num_pt=NUM_PT, num_ft=NUM_FT, species=9606):
    """A connected random ego-graph: a random tree plus a few extra interactions."""
    n = int(num_nodes if num_nodes is not None else rng.integers(2, 9))
    pairs = [(int(rng.integers(0, i)), i) for i in range(1, n)]
    pairs += [tuple(sorted(rng.choice(n, 2, replace=False).tolist())) for _ in range(n // 3)]
    pairs = np.array(pairs, np.int64).reshape(-1, 2)
    edges = np.concatenate([pairs, pairs[:, ::-1]])
    features = np.zeros((len(pairs), graphs.EDGE_FEATURE_DIM), np.float32)
    features[:, :7] = rng.integers(0, 2, (len(pairs), 7))
    return graphs.EgoGraph(
        num_nodes=n,
        edges=edges,
        edge_features=np.concatenate([features, features]),
        center=int(rng.integers(0, n)),
        pt_labels=rng.integers(0, 2, num_pt).astype(np.float32),
        ft_labels=rng.integers(0, 2, num_ft).astype(np.float32),
        species_id=species,
    )


@pytest.fixture(scope="module")
def five_graphs():
    rng = np.random.default_rng(0)
    return [random_graph(rng, num_nodes=n) for n in (3, 6, 2, 8, 5)]


@pytest.fixture(scope="module")
def five_graphs_file(tmp_path_factory, five_graphs, schema):
    path = str(tmp_path_factory.mktemp("five") / "graphs.tfrecord")
    assert graphs.write_tfrecord(path, five_graphs, schema) == 5
    return path


def graph_from_batch(batch, k):
    """Component k of a loaded batch, as an EgoGraph (labels from the batch)."""
    graph = batch["graph"]
    node_sizes = graph.node_sets[graphs.NODE_SET].sizes.numpy()
    edge_sizes = graph.edge_sets[graphs.EDGE_SET].sizes.numpy()
    node_start, edge_start = node_sizes[:k].sum(), edge_sizes[:k].sum()
    edge_slice = slice(edge_start, edge_start + edge_sizes[k])
    adjacency = graph.edge_sets[graphs.EDGE_SET].adjacency
    is_center = graph.node_sets[graphs.NODE_SET][graphs.CENTER_FEATURE].numpy()
    is_center = is_center[node_start : node_start + node_sizes[k]]
    assert np.count_nonzero(is_center) == 1
    return graphs.EgoGraph(
        num_nodes=int(node_sizes[k]),
        edges=np.stack(
            [adjacency.source.numpy()[edge_slice], adjacency.target.numpy()[edge_slice]], 1
        )
        - node_start,
        edge_features=graph.edge_sets[graphs.EDGE_SET][graphs.EDGE_FEATURE].numpy()[edge_slice],
        center=int(np.argmax(is_center)),
        pt_labels=batch[graphs.PT_LABELS].numpy()[k],
        ft_labels=batch[graphs.FT_LABELS].numpy()[k],
        species_id=int(graph.context[graphs.SPECIES].numpy()[k]),
    )


# --- Schema ------------------------------------------------------------------------------------


def test_schema_has_the_layout_and_round_trips_through_a_file(schema, tmp_path):
    assert graphs.num_tasks(schema) == (NUM_PT, NUM_FT)
    spec = tfgnn.create_graph_spec_from_schema_pb(schema)
    assert spec.context_spec.features_spec[graphs.PT_LABELS].shape == [1, NUM_PT]
    assert spec.context_spec.features_spec[graphs.SPECIES].dtype == tf.int64
    edge_spec = spec.edge_sets_spec[graphs.EDGE_SET]
    assert edge_spec.features_spec[graphs.EDGE_FEATURE].shape[-1] == graphs.EDGE_FEATURE_DIM
    assert edge_spec.adjacency_spec.source_name == graphs.NODE_SET
    path = tmp_path / "sub" / "schema.pbtxt"
    graphs.write_schema(schema, path)
    assert graphs.read_schema(path) == schema
    assert os.listdir(tmp_path / "sub") == ["schema.pbtxt"]  # no temporary file left


def test_schema_errors(tmp_path):
    with pytest.raises(ValueError, match=r"num_pt_tasks must be an integer >= 1.*=0"):
        graphs.graph_schema(0, 3)
    with pytest.raises(FileNotFoundError, match="No graph schema file at"):
        graphs.read_schema(tmp_path / "missing.pbtxt")
    other = graphs.graph_schema(2, 2)
    other.edge_sets[graphs.EDGE_SET].features[graphs.EDGE_FEATURE].shape.dim[0].size = 8
    path = tmp_path / "other.pbtxt"
    tfgnn.write_schema(other, str(path))
    with pytest.raises(
        ValueError, match=r"other.pbtxt.*features of edge set 'interactions'.*\[9\]"
    ):
        graphs.read_schema(path)
    no_labels = tfgnn.GraphSchema()
    no_labels.node_sets[graphs.NODE_SET].description = "x"
    with pytest.raises(ValueError, match="context must have the features 'pt_labels'"):
        graphs.num_tasks(no_labels)
    assert graphs.PT_LABELS not in no_labels.context.features  # the check did not add it


# --- EgoGraph ----------------------------------------------------------------------------------


def _triangle(**overrides):
    pairs = np.array([[0, 1], [1, 2], [0, 2]])
    fields = dict(
        num_nodes=3,
        edges=np.concatenate([pairs, pairs[:, ::-1]]),
        edge_features=np.zeros((6, graphs.EDGE_FEATURE_DIM)),
        center=1,
        pt_labels=np.ones(NUM_PT),
        ft_labels=np.zeros(NUM_FT),
    )
    fields.update(overrides)
    return graphs.EgoGraph(**fields)


def test_ego_graph_converts_dtypes_and_compares_by_value():
    g = _triangle()
    assert g.edges.dtype == np.int64 and g.edge_features.dtype == np.float32
    assert g.pt_labels.dtype == np.float32 and g.num_edges == 6 and g.species_id == 0
    assert g == _triangle()
    assert g != _triangle(center=2)
    assert g != _triangle(ft_labels=np.array([0.0, 1.0, 0.0]))


@pytest.mark.parametrize(
    "overrides, message",
    [
        (
            dict(edges=np.array([[0, 1], [1, 7], [1, 0], [7, 1]])),
            r"edges must index nodes in \[0, 3\) \(num_nodes=3\). Received: edge 1 = \(1, 7\)",
        ),
        (dict(edges=np.array([[0, 1], [1, 2], [1, 0]])), r"without a matching \(2, 1\)"),
        (dict(edges=np.array([[0.0, 1.0], [1.0, 0.0]])), "edges must be integers"),
        (
            dict(edges=np.array([0, 1, 1, 0])),
            r"shape \[num_edges, 2\] \(source, target\). Received: shape=\[4\]",
        ),
        (
            dict(edge_features=np.zeros((6, 7))),
            r"edge_features must have shape \[num_edges=6, 9\]. Received: shape=\[6, 7\]",
        ),
        (dict(center=3), r"center must be a node index in \[0, 3\).*center=3"),
        (dict(center=-1), r"center=-1"),
        (dict(pt_labels=np.full(NUM_PT, 2.0)), r"pt_labels must be in \[0, 1\]"),
        (dict(ft_labels=np.zeros((1, NUM_FT))), r"ft_labels must be a 1-D array"),
        (dict(num_nodes=0), r"num_nodes must be an integer >= 1"),
        (
            dict(edge_features=np.full((6, graphs.EDGE_FEATURE_DIM), np.nan)),
            "edge_features must be finite",
        ),
    ],
)
def test_ego_graph_rejects_bad_fields(overrides, message):
    with pytest.raises(ValueError, match=message):
        _triangle(**overrides)


# --- tf.Example encoding -----------------------------------------------------------------------


def test_to_example_equals_tfgnn_write_example(five_graphs, schema):
    lone = graphs.EgoGraph(1, np.zeros((0, 2)), np.zeros((0, 9)), 0, np.ones(NUM_PT), np.ones(3))
    for g in [*five_graphs, lone]:
        expected = tfgnn.write_example(graphs.to_graph_tensor(g))
        assert graphs.to_example(g) == expected
        assert graphs.from_example(expected, schema) == g


def test_from_example_names_the_mismatch(five_graphs):
    example = graphs.to_example(five_graphs[0])
    with pytest.raises(ValueError, match=r"'context/pt_labels' has 5 values, expected 7"):
        graphs.from_example(example, graphs.graph_schema(7, NUM_FT))
    del example.features.feature["edges/interactions.#source"]
    with pytest.raises(ValueError, match=r"'edges/interactions.#source' is missing"):
        graphs.from_example(example, graphs.graph_schema(NUM_PT, NUM_FT))


# --- Writing and reading -----------------------------------------------------------------------


def test_round_trip_through_a_file(five_graphs, five_graphs_file, schema):
    assert graphs.load_graphs(five_graphs_file, schema) == five_graphs
    assert graphs.count_graphs(five_graphs_file) == 5
    batches = list(graphs.load_dataset(five_graphs_file, schema, batch_size=1))
    assert len(batches) == 5
    assert [graph_from_batch(b, 0) for b in batches] == five_graphs


def test_gzip_files_by_suffix(five_graphs, schema, tmp_path):
    path = str(tmp_path / "graphs.tfrecord.gz")
    graphs.write_tfrecord(path, five_graphs, schema)
    with open(path, "rb") as f:
        assert f.read(2) == b"\x1f\x8b"  # the GZIP magic number
    assert graphs.load_graphs(path, schema) == five_graphs
    batch = next(iter(graphs.load_dataset(path, schema, batch_size=5)))
    assert [graph_from_batch(batch, k) for k in range(5)] == five_graphs


def test_batches_merge_graphs_into_components(five_graphs, five_graphs_file, schema):
    batches = list(graphs.load_dataset(five_graphs_file, schema, batch_size=3))
    assert [b[graphs.PT_LABELS].shape[0] for b in batches] == [3, 2]
    first = batches[0]
    graph = first["graph"]
    assert graph.shape.rank == 0 and graph.num_components.numpy() == 3
    np.testing.assert_array_equal(
        graph.node_sets[graphs.NODE_SET].sizes, [g.num_nodes for g in five_graphs[:3]]
    )
    # Node indices are offset by the nodes of the components before.
    source = graph.edge_sets[graphs.EDGE_SET].adjacency.source.numpy()
    offsets = np.repeat([0, 3, 9], [g.num_edges for g in five_graphs[:3]])
    np.testing.assert_array_equal(
        source, np.concatenate([g.edges[:, 0] for g in five_graphs[:3]]) + offsets
    )
    is_center = graph.node_sets[graphs.NODE_SET][graphs.CENTER_FEATURE].numpy()
    np.testing.assert_array_equal(
        np.flatnonzero(is_center),
        [g.center + o for g, o in zip(five_graphs[:3], [0, 3, 9], strict=True)],
    )
    np.testing.assert_array_equal(first[graphs.FT_LABELS], [g.ft_labels for g in five_graphs[:3]])
    assert set(graph.context.features) == {graphs.SPECIES}  # labels are not in the graph
    assert [graph_from_batch(batches[1], k) for k in range(2)] == five_graphs[3:]
    dropped = list(graphs.load_dataset(five_graphs_file, schema, batch_size=3, drop_remainder=True))
    assert len(dropped) == 1
    assert dropped[0][graphs.PT_LABELS].shape == (3, NUM_PT)


@pytest.mark.parametrize("drop_remainder", [False, True])
def test_a_tf_function_traces_once_for_all_batches(
    five_graphs, five_graphs_file, schema, drop_remainder
):
    dataset = graphs.load_dataset(
        five_graphs_file, schema, batch_size=2, repeat=True, drop_remainder=drop_remainder
    )
    traces = []

    @tf.function(input_signature=[dataset.element_spec])
    def step(batch):
        traces.append(1)
        graph = batch["graph"]
        edges = graph.edge_sets[graphs.EDGE_SET]
        return tf.reduce_sum(edges[graphs.EDGE_FEATURE]) + tf.reduce_sum(batch[graphs.PT_LABELS])

    # Models relax the spec to any number of graphs, nodes and edges; that must be possible.
    graph_spec = dataset.element_spec["graph"]
    relaxed = graph_spec.relax(num_components=True, num_nodes=True, num_edges=True)
    assert relaxed.is_compatible_with(graph_spec)
    total = 0.0
    for batch in dataset.take(5):  # 10 graphs: two epochs of 5, in batches of varying shapes
        total += float(step(batch))
    assert len(traces) == 1
    expected = sum(float(g.edge_features.sum() + g.pt_labels.sum()) for g in five_graphs)
    assert total == pytest.approx(2 * expected)


def test_shuffle_is_seeded_and_the_iterator_resumes_from_a_checkpoint(schema, tmp_path):
    rng = np.random.default_rng(1)
    many = [random_graph(rng, species=i) for i in range(20)]
    path = str(tmp_path / "many.tfrecord")
    graphs.write_tfrecord(path, many, schema)

    def order(dataset, n):
        return [b["graph"].context[graphs.SPECIES].numpy().tolist() for b in dataset.take(n)]

    def make(seed):
        return graphs.load_dataset(
            path, schema, batch_size=3, shuffle=True, seed=seed, repeat=True, shuffle_buffer_size=8
        )

    first = order(make(5), 10)
    assert first == order(make(5), 10)
    assert first != order(make(6), 10)
    assert sorted(
        sum(order(graphs.load_dataset(path, schema, batch_size=4, shuffle=True), 5), [])
    ) == (list(range(20)))  # one epoch, shuffled: every graph once

    iterator = iter(make(5))
    for _ in range(4):
        next(iterator)
    checkpoint = tf.train.Checkpoint(iterator=iterator)
    saved = checkpoint.save(str(tmp_path / "ckpt" / "it"))
    expected = [next(iterator)["graph"].context[graphs.SPECIES].numpy().tolist() for _ in range(5)]
    restored_iterator = iter(make(5))
    tf.train.Checkpoint(iterator=restored_iterator).restore(saved).assert_consumed()
    resumed = [
        next(restored_iterator)["graph"].context[graphs.SPECIES].numpy().tolist() for _ in range(5)
    ]
    assert resumed == expected == first[4:9]


def test_indices_select_records(five_graphs, five_graphs_file, schema):
    batch = next(iter(graphs.load_dataset(five_graphs_file, schema, batch_size=5, indices=[3, 1])))
    assert [graph_from_batch(batch, k) for k in range(2)] == [five_graphs[1], five_graphs[3]]
    with pytest.raises(
        ValueError, match=r"indices must be in \[0, 5\).*Received: indices in \[1, 5\]"
    ):
        graphs.load_dataset(five_graphs_file, schema, batch_size=2, indices=[1, 5])


def test_labels_and_counts_over_several_files(five_graphs, schema, tmp_path):
    graphs.write_tfrecord(str(tmp_path / "b.tfrecord"), five_graphs[2:], schema)
    graphs.write_tfrecord(str(tmp_path / "a.tfrecord"), five_graphs[:2], schema)
    pattern = str(tmp_path / "*.tfrecord")
    assert graphs.count_graphs(pattern) == 5
    labels = graphs.read_labels(pattern, schema)
    np.testing.assert_array_equal(labels[graphs.PT_LABELS], [g.pt_labels for g in five_graphs])
    np.testing.assert_array_equal(labels[graphs.FT_LABELS], [g.ft_labels for g in five_graphs])
    assert labels[graphs.PT_LABELS].dtype == np.float32
    np.testing.assert_array_equal(labels[graphs.SPECIES], [9606] * 5)
    assert graphs.load_graphs(pattern, schema) == five_graphs


# --- Errors naming the file --------------------------------------------------------------------


def test_no_matching_file(schema, tmp_path):
    pattern = str(tmp_path / "nothing-*.tfrecord")
    with pytest.raises(
        FileNotFoundError, match=re.escape(f"No file matches the pattern '{pattern}'")
    ):
        graphs.load_dataset(pattern, schema, batch_size=2)
    with pytest.raises(FileNotFoundError, match="No file matches"):
        graphs.read_labels(pattern, schema)


def test_schema_mismatch_names_file_feature_and_sizes(five_graphs_file, schema):
    wider = graphs.graph_schema(NUM_PT + 1, NUM_FT)
    expected = (
        f"{five_graphs_file}: record 0 does not match the graph schema: feature "
        r"'context/pt_labels' has 5 values, expected 6 for shape \[6\]"
    )
    with pytest.raises(ValueError, match=expected):
        graphs.load_dataset(five_graphs_file, wider, batch_size=2)
    with pytest.raises(ValueError, match=expected):
        graphs.read_labels(five_graphs_file, wider)
    with pytest.raises(ValueError, match=expected):
        graphs.load_graphs(five_graphs_file, wider)


def test_check_records_names_a_bad_record_past_the_first(five_graphs, schema, tmp_path):
    path = str(tmp_path / "one_bad.tfrecord")
    examples = [graphs.to_example(g) for g in five_graphs]
    examples[3].features.feature["context/ft_labels"].float_list.value.append(1.0)
    with tf.io.TFRecordWriter(path) as writer:
        for example in examples:
            writer.write(example.SerializeToString())
    assert graphs.load_dataset(path, schema, batch_size=2) is not None  # record 0 is fine
    with pytest.raises(
        ValueError,
        match=re.escape(f"{path}: record 3 (0-based) does not match the graph schema: feature ")
        + r"'context/ft_labels' has 4 values, expected 3",
    ):
        graphs.check_records(path, schema)


def test_check_records_counts_good_files(five_graphs_file, schema, tmp_path):
    assert graphs.check_records(five_graphs_file, schema) == 5
    empty = str(tmp_path / "empty.tfrecord")
    graphs.write_tfrecord(empty, [], schema)
    assert graphs.check_records(empty, schema) == 0


def test_not_a_tfrecord_file(schema, tmp_path):
    path = tmp_path / "notes.tfrecord"
    path.write_text("these are not records\n" * 10)
    with pytest.raises(ValueError, match=f"{path}: not a readable TFRecord file"):
        graphs.load_dataset(str(path), schema, batch_size=2)


def test_records_that_are_not_examples(schema, tmp_path):
    path = str(tmp_path / "strings.tfrecord")
    with tf.io.TFRecordWriter(path) as writer:
        writer.write(b"\xff\xff not a proto")
    with pytest.raises(ValueError, match="record 0 does not match.*not a serialized tf.train"):
        graphs.load_dataset(path, schema, batch_size=2)


def test_empty_files_hold_no_records(schema, tmp_path):
    path = str(tmp_path / "empty.tfrecord")
    assert graphs.write_tfrecord(path, [], schema) == 0
    assert graphs.count_graphs(path) == 0
    assert graphs.read_labels(path, schema)[graphs.PT_LABELS].shape == (0, NUM_PT)
    with pytest.raises(ValueError, match="hold no records"):
        graphs.load_dataset(path, schema, batch_size=2)


def test_write_rejects_graphs_off_the_schema_and_leaves_no_file(five_graphs, tmp_path):
    path = tmp_path / "out.tfrecord"
    with pytest.raises(ValueError, match="graph 0 does not match the schema: pt_labels has 5"):
        graphs.write_tfrecord(str(path), five_graphs, graphs.graph_schema(4, NUM_FT))
    with pytest.raises(ValueError, match="graph 2 is a dict"):
        graphs.write_tfrecord(str(path), [*five_graphs[:2], {}], graphs.graph_schema(5, 3))
    assert os.listdir(tmp_path) == []


# --- Splits ------------------------------------------------------------------------------------


def test_split_graph_indices():
    parts = graphs.split_graph_indices(101, {"train": 0.85, "val": 0.15}, seed=3)
    assert [p.size for p in parts.values()] == [86, 15]
    np.testing.assert_array_equal(np.sort(np.concatenate(list(parts.values()))), np.arange(101))
    again = graphs.split_graph_indices(101, {"train": 0.85, "val": 0.15}, seed=3)
    assert all(np.array_equal(parts[k], again[k]) for k in parts)
    other = graphs.split_graph_indices(101, {"train": 0.85, "val": 0.15}, seed=4)
    assert not np.array_equal(parts["val"], other["val"])
    partial = graphs.split_graph_indices(10, {"a": 0.25, "b": 0.25}, seed=0)
    assert [p.size for p in partial.values()] == [2, 2]
    assert not set(partial["a"]) & set(partial["b"])
    with pytest.raises(ValueError, match="add up to at most 1"):
        graphs.split_graph_indices(10, {"a": 0.7, "b": 0.7}, seed=0)
    with pytest.raises(ValueError, match=r"fractions must be in \[0, 1\]. Received: 'a': -0.1"):
        graphs.split_graph_indices(10, {"a": -0.1}, seed=0)
