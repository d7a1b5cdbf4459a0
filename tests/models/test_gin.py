"""The GIN backbone: shapes, invariances, self-loops, readout, BatchNorm/dropout modes,
parameter count, no retracing, first and second derivatives, SavedModel round trip."""

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_gnn as tfgnn

from metapt_tf import hypergrad
from metapt_tf.data.graphs import (
    CENTER_FEATURE,
    EDGE_FEATURE,
    EDGE_FEATURE_DIM,
    EDGE_SET,
    FT_LABELS,
    NODE_SET,
    PT_LABELS,
    SELF_LOOP_CHANNEL,
    SPECIES,
)
from metapt_tf.models import (
    ConstantEmbedding,
    GINConv,
    TwiceDifferentiableBatchNorm,
    gin_backbone,
    gin_parameter_count,
)

NUM_PT, NUM_FT = 5, 3
UNITS = 16


# ---------------------------------------------------------------- test graphs
def random_ego_graph(rng, num_nodes=None, num_edges=None, center=0):
    """One ego-graph as numpy pieces: both directions of each undirected edge stored."""
    n = int(rng.integers(4, 9)) if num_nodes is None else num_nodes
    m = int(rng.integers(n, 2 * n)) if num_edges is None else num_edges
    a, b = rng.integers(0, n, m), rng.integers(0, n, m)
    feats = (rng.random((m, EDGE_FEATURE_DIM)) < 0.4).astype(np.float32)
    feats[:, SELF_LOOP_CHANNEL:] = 0.0  # the self-loop and mask flags are off on real edges
    is_center = np.zeros(n, np.float32)
    is_center[center] = 1.0
    return dict(
        is_center=is_center,
        source=np.concatenate([a, b]).astype(np.int32),
        target=np.concatenate([b, a]).astype(np.int32),
        edge_features=np.concatenate([feats, feats]),
        pt_labels=(rng.random(NUM_PT) < 0.5).astype(np.float32),
        ft_labels=(rng.random(NUM_FT) < 0.5).astype(np.float32),
        species=int(rng.integers(0, 10)),
    )


def to_graph_tensor(graphs):
    """Merges ego-graphs into one scalar GraphTensor, one component per ego-graph."""
    offsets = np.cumsum([0] + [len(g["is_center"]) for g in graphs]).astype(np.int32)
    cat = np.concatenate
    return tfgnn.GraphTensor.from_pieces(
        context=tfgnn.Context.from_fields(
            sizes=tf.ones([len(graphs)], tf.int32),
            features={
                PT_LABELS: np.stack([g["pt_labels"] for g in graphs]),
                FT_LABELS: np.stack([g["ft_labels"] for g in graphs]),
                SPECIES: np.array([g["species"] for g in graphs], np.int64),
            },
        ),
        node_sets={
            NODE_SET: tfgnn.NodeSet.from_fields(
                sizes=tf.constant([len(g["is_center"]) for g in graphs], tf.int32),
                features={CENTER_FEATURE: cat([g["is_center"] for g in graphs])},
            )
        },
        edge_sets={
            EDGE_SET: tfgnn.EdgeSet.from_fields(
                sizes=tf.constant([len(g["source"]) for g in graphs], tf.int32),
                features={
                    EDGE_FEATURE: cat([g["edge_features"] for g in graphs]).reshape(
                        [-1, EDGE_FEATURE_DIM]
                    )
                },
                adjacency=tfgnn.Adjacency.from_indices(
                    (
                        NODE_SET,
                        cat([g["source"] + o for g, o in zip(graphs, offsets, strict=False)]),
                    ),
                    (
                        NODE_SET,
                        cat([g["target"] + o for g, o in zip(graphs, offsets, strict=False)]),
                    ),
                ),
            )
        },
    )


def random_batch(seed, num_graphs=3):
    rng = np.random.default_rng(seed)
    return [random_ego_graph(rng) for _ in range(num_graphs)]


def graph_schema():
    schema = tfgnn.GraphSchema()

    def add(features, name, dtype, dims):
        features[name].dtype = dtype.as_datatype_enum
        for d in dims:
            features[name].shape.dim.add().size = d

    add(schema.context.features, PT_LABELS, tf.float32, [NUM_PT])
    add(schema.context.features, FT_LABELS, tf.float32, [NUM_FT])
    add(schema.context.features, SPECIES, tf.int64, [])
    add(schema.node_sets[NODE_SET].features, CENTER_FEATURE, tf.float32, [])
    schema.edge_sets[EDGE_SET].source = NODE_SET
    schema.edge_sets[EDGE_SET].target = NODE_SET
    add(schema.edge_sets[EDGE_SET].features, EDGE_FEATURE, tf.float32, [EDGE_FEATURE_DIM])
    return schema


SPEC = tfgnn.create_graph_spec_from_schema_pb(graph_schema())


def _model(seed=0, **kwargs):
    tf.keras.utils.set_random_seed(seed)
    kwargs.setdefault("num_layers", 2)
    kwargs.setdefault("hidden_units", UNITS)
    return gin_backbone(SPEC, **kwargs)


@pytest.fixture(scope="module")
def model():
    return _model()


def final_states(model, graph, training=False):
    """The node states after the last GIN layer."""
    last = [layer for layer in model.layers if layer.name.startswith("gin_layer_")][-1]
    sub = tf.keras.Model(model.input, last.output)
    return sub(graph, training=training).node_sets[NODE_SET][tfgnn.HIDDEN_STATE].numpy()


# ---------------------------------------------------------------- tests
def test_output_shape_dtype_and_centre_and_mean_halves(model):
    graphs = random_batch(0, num_graphs=4)
    graph = to_graph_tensor(graphs)
    out = model(graph, training=False)
    assert out.shape == (4, 2 * UNITS) and out.dtype == tf.float32
    states = final_states(model, graph)
    offsets = np.cumsum([0] + [len(g["is_center"]) for g in graphs]).astype(np.int32)
    for i, g in enumerate(graphs):
        rows = states[offsets[i] : offsets[i + 1]]
        np.testing.assert_allclose(out[i, :UNITS], rows.mean(0), rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(
            out[i, UNITS:], rows[np.argmax(g["is_center"])], rtol=1e-5, atol=1e-6
        )


def test_moving_the_centre_changes_only_the_centre_half(model):
    rng = np.random.default_rng(1)
    g = random_ego_graph(rng, num_nodes=6, num_edges=8)
    moved = dict(g, is_center=np.roll(g["is_center"], 3))
    a = model(to_graph_tensor([g]), training=False).numpy()
    b = model(to_graph_tensor([moved]), training=False).numpy()
    np.testing.assert_array_equal(a[:, :UNITS], b[:, :UNITS])
    assert np.abs(a[:, UNITS:] - b[:, UNITS:]).max() > 1e-4


def test_outputs_depend_on_edge_features(model):
    g = random_batch(2, num_graphs=1)[0]
    flipped = dict(g, edge_features=1.0 - g["edge_features"])
    a = model(to_graph_tensor([g]), training=False).numpy()
    b = model(to_graph_tensor([flipped]), training=False).numpy()
    assert np.abs(a - b).max() > 1e-3


def test_invariant_to_node_and_edge_order(model):
    rng = np.random.default_rng(3)
    g = random_ego_graph(rng, num_nodes=7, num_edges=10, center=2)
    perm = rng.permutation(7)  # new position of each old node
    eperm = rng.permutation(len(g["source"]))
    is_center = np.zeros(7, np.float32)
    is_center[perm] = g["is_center"]
    permuted = dict(
        g,
        is_center=is_center,
        source=perm[g["source"]][eperm],
        target=perm[g["target"]][eperm],
        edge_features=g["edge_features"][eperm],
    )
    a = model(to_graph_tensor([g]), training=False).numpy()
    b = model(to_graph_tensor([permuted]), training=False).numpy()
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_batching_invariance(model):
    g1, g2 = random_batch(4, num_graphs=2)
    both = model(to_graph_tensor([g1, g2]), training=False).numpy()
    alone = np.concatenate([model(to_graph_tensor([g]), training=False).numpy() for g in (g1, g2)])
    np.testing.assert_allclose(both, alone, rtol=1e-5, atol=1e-5)


def test_isolated_node_gets_the_self_loop_message(model):
    rng = np.random.default_rng(5)
    g = random_ego_graph(rng, num_nodes=1, num_edges=0)
    graph = to_graph_tensor([g])
    assert int(graph.edge_sets[EDGE_SET].total_size) == 0
    before = model(graph, training=False).numpy()
    assert before.shape == (1, 2 * UNITS) and np.all(np.isfinite(before))
    (weights,) = [
        v
        for v in model.trainable_variables
        if v.name == "gin_layer_0/node_set_update/conv/edge_embedding/kernel:0"
    ]
    saved = weights.numpy()
    try:
        other = saved.copy()
        other[0] += 1.0  # an edge channel no edge of this graph uses
        weights.assign(other)
        np.testing.assert_array_equal(model(graph, training=False).numpy(), before)
        loop = saved.copy()
        loop[SELF_LOOP_CHANNEL] += 1.0  # the self-loop flag's embedding
        weights.assign(loop)
        assert np.abs(model(graph, training=False).numpy() - before).max() > 1e-4
    finally:
        weights.assign(saved)


def test_dropout_only_in_training():
    graph = to_graph_tensor(random_batch(6))
    m = _model(dropout_rate=0.5)
    np.testing.assert_array_equal(m(graph, training=False), m(graph, training=False))
    assert np.abs(m(graph, training=True) - m(graph, training=True)).max() > 1e-4
    m0 = _model(dropout_rate=0.0)
    np.testing.assert_array_equal(m0(graph, training=True), m0(graph, training=True))
    assert not any(isinstance(x, tf.keras.layers.Dropout) for x in m0.submodules)
    assert sum(isinstance(x, tf.keras.layers.Dropout) for x in m.submodules) == 1  # not the last


def test_batch_norm_uses_batch_statistics_only_in_training():
    graph = to_graph_tensor(random_batch(7, num_graphs=4))
    m = _model(dropout_rate=0.0)
    moving = [v for v in m.non_trainable_variables if "moving_mean" in v.name]
    assert len(moving) == 4  # 2 per layer
    m(graph, training=False)
    assert all(not np.any(v.numpy()) for v in moving)
    train_states = final_states(m, graph, training=True)  # normalized over the batch's nodes
    np.testing.assert_allclose(train_states.mean(0), 0.0, atol=1e-4)
    np.testing.assert_allclose(train_states.var(0), 1.0, rtol=1e-2)
    assert all(np.any(v.numpy()) for v in moving)  # the moving averages moved
    infer_states = final_states(m, graph, training=False)
    assert np.abs(infer_states.mean(0)).max() > 1e-2 or np.abs(infer_states.var(0) - 1).max() > 0.1


def test_parameter_count_at_paper_size():
    m = gin_backbone(SPEC)  # 5 layers x 300 units
    assert m.output_shape == (None, 600)
    assert m.count_params() == gin_parameter_count(num_layers=5, hidden_units=300) == 2_737_800
    trainable = sum(int(np.prod(v.shape)) for v in m.trainable_variables)
    assert trainable == gin_parameter_count(trainable_only=True) == 2_728_800
    # Each layer has its own edge embedding.
    assert sum("edge_embedding/kernel" in v.name for v in m.trainable_variables) == 5


def test_no_retracing_for_different_graph_sizes(model):
    traces = []
    spec = SPEC.relax(num_components=True, num_nodes=True, num_edges=True)

    @tf.function(input_signature=[spec])
    def features(graph):
        traces.append(1)
        return model(graph, training=False)

    for seed, n in [(8, 1), (9, 3), (10, 5)]:
        graphs = random_batch(seed, num_graphs=n)
        assert features(to_graph_tensor(graphs)).shape == (n, 2 * UNITS)
    assert len(traces) == 1


def _loss(model, graph, training, seed=11):
    out = model(graph, training=training)
    w = tf.random.stateless_normal(out.shape, seed=[seed, 0])
    return tf.reduce_sum(out * w) + 0.5 * tf.reduce_sum(tf.square(out))


def test_gradients_finite_and_nonzero(model):
    graph = to_graph_tensor(random_batch(12))
    for training in (False, True):
        with tf.GradientTape() as tape:
            loss = _loss(model, graph, training)
        grads = tape.gradient(loss, model.trainable_variables)
        for v, g in zip(model.trainable_variables, grads, strict=True):
            assert g is not None, v.name
            g = tf.convert_to_tensor(g).numpy()
            assert np.all(np.isfinite(g)), v.name
            # With batch statistics, biases right before a BatchNorm get no gradient.
            pre_bn_bias = training and "_dense_" in v.name and v.name.endswith("/bias:0")
            if not pre_bn_bias:
                assert np.abs(g).max() > 0, (training, v.name)


@pytest.mark.parametrize("training", [False, True])
def test_hvp_matches_finite_differences(training, assert_hvp_matches_central_differences):
    m = _model(seed=3, num_layers=2, hidden_units=8, dropout_rate=0.0)
    graph = to_graph_tensor(random_batch(13, num_graphs=3))
    params = m.trainable_variables

    def loss_fn():
        return _loss(m, graph, training) / 10.0

    rng = np.random.default_rng(14)
    vector = [tf.constant(rng.normal(size=p.shape), tf.float32) for p in params]
    assert_hvp_matches_central_differences(loss_fn, params, vector)


def test_batch_norm_second_derivatives_are_exact():
    """Keras' BatchNormalization differentiates the batch variance around a stopped mean."""
    rng = np.random.default_rng(17)
    x = tf.constant(rng.normal(size=(12, 4)), tf.float32)
    w = tf.constant(rng.normal(size=(12, 4)), tf.float32)
    results = {}
    for cls in (TwiceDifferentiableBatchNorm, tf.keras.layers.BatchNormalization):
        tf.keras.utils.set_random_seed(0)
        dense, bn = tf.keras.layers.Dense(4), cls(epsilon=1e-5)

        def loss_fn(dense=dense, bn=bn):
            y = bn(dense(x), training=True)
            return tf.reduce_sum(w * y) + 0.5 * tf.reduce_sum(y**3)

        loss = loss_fn()
        params = dense.trainable_variables
        with tf.GradientTape() as tape:
            loss = loss_fn()
        grads = tape.gradient(loss, params)
        vector = [tf.ones_like(p) for p in params]
        results[cls] = loss, grads, hypergrad.hvp(loss_fn, params, vector)
    (loss, grads, hv), (keras_loss, keras_grads, keras_hv) = results.values()
    np.testing.assert_allclose(loss, keras_loss, rtol=1e-5)
    for g, kg in zip(grads, keras_grads, strict=True):
        np.testing.assert_allclose(g, kg, rtol=1e-4, atol=1e-5)
    # The loss does not depend on the bias before BatchNorm, so neither does H v.
    np.testing.assert_allclose(hv[1], 0.0, atol=1e-4)
    assert np.abs(keras_hv[1]).max() > 1e-2


@pytest.mark.filterwarnings("ignore:Encoding a StructuredValue with type tensorflow_gnn")
def test_saved_model_round_trip_with_tf_example_serving(tmp_path):
    m = _model(seed=4)
    graphs = random_batch(15, num_graphs=3)
    serialized = [tfgnn.write_example(to_graph_tensor([g])).SerializeToString() for g in graphs]

    class Exported(tf.Module):
        def __init__(self, model):
            super().__init__()
            self.model = model

        @tf.function(input_signature=[tf.TensorSpec([None], tf.string)])
        def serve(self, examples):
            graph = tfgnn.parse_example(SPEC, examples).merge_batch_to_components()
            return {"features": self.model(graph, training=False)}

    module = Exported(m)
    expected = m(to_graph_tensor(graphs), training=False).numpy()
    np.testing.assert_allclose(
        module.serve(tf.constant(serialized))["features"], expected, rtol=1e-5, atol=1e-6
    )
    path = str(tmp_path / "gin")
    tf.saved_model.save(module, path, signatures={"serving_default": module.serve})
    loaded = tf.saved_model.load(path)
    got = loaded.signatures["serving_default"](examples=tf.constant(serialized))["features"]
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-5, atol=1e-6)


def test_layer_configs_round_trip():
    conv = GINConv(12, self_loop_channel=None, name="c")
    config = conv.get_config()
    assert config["units"] == 12 and config["self_loop_channel"] is None
    assert config["sender_edge_feature"] == EDGE_FEATURE
    assert GINConv.from_config(config).get_config() == config
    emb = ConstantEmbedding(5, name="e")
    assert ConstantEmbedding.from_config(emb.get_config()).get_config() == emb.get_config()
    assert emb(tf.zeros([7])).shape == (7, 5)
    for name in ("metapt_tf>GINConv", "metapt_tf>ConstantEmbedding"):
        assert tf.keras.utils.get_registered_object(name) is not None


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(num_layers=0), r"num_layers must be an int >= 1\. Received: num_layers=0"),
        (dict(num_layers=True), r"num_layers must be an int >= 1\. Received: num_layers=True"),
        (dict(hidden_units=2.5), r"hidden_units must be an int >= 1\. Received: hidden_units=2.5"),
        (dict(dropout_rate=1.0), r"dropout_rate must be a float in \[0, 1\)\. Received: "),
        (dict(dropout_rate=-0.1), r"dropout_rate must be a float in \[0, 1\)"),
        (dict(name=""), r"name must be a non-empty str"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        gin_backbone(SPEC, **kwargs)


def test_bad_specs():
    graph = to_graph_tensor(random_batch(16, num_graphs=1))
    with pytest.raises(ValueError, match="must be a tfgnn.GraphTensorSpec"):
        gin_backbone(graph)
    with pytest.raises(ValueError, match="scalar GraphTensor.*rank 1"):
        gin_backbone(tf.data.Dataset.from_tensors(graph).batch(2).element_spec)
    nodes = graph.node_sets[NODE_SET]
    edges = graph.edge_sets[EDGE_SET]

    def with_pieces(node_features=None, edge_features=None, node_set=NODE_SET):
        return tfgnn.GraphTensor.from_pieces(
            node_sets={
                node_set: tfgnn.NodeSet.from_fields(
                    sizes=nodes.sizes,
                    features=nodes.get_features_dict() if node_features is None else node_features,
                )
            },
            edge_sets={
                EDGE_SET: tfgnn.EdgeSet.from_fields(
                    sizes=edges.sizes,
                    features=edges.get_features_dict() if edge_features is None else edge_features,
                    adjacency=tfgnn.Adjacency.from_indices(
                        (node_set, edges.adjacency.source), (node_set, edges.adjacency.target)
                    ),
                )
            },
        ).spec

    with pytest.raises(ValueError, match=r"no node set 'proteins'.*\['atoms'\]"):
        gin_backbone(with_pieces(node_set="atoms"))
    with pytest.raises(ValueError, match=r"node set 'proteins' has no feature 'is_center'"):
        gin_backbone(with_pieces(node_features={}))
    with pytest.raises(ValueError, match=r"edge set 'interactions' has no feature 'features'"):
        gin_backbone(with_pieces(edge_features={}))
    bad = {EDGE_FEATURE: tf.zeros([int(edges.total_size), 4])}
    with pytest.raises(ValueError, match=r"must be float32 of shape \[num_items, 9\]"):
        gin_backbone(with_pieces(edge_features=bad))
    with pytest.raises(ValueError, match="needs both sender_node_feature and sender_edge_feature"):
        GINConv(4, sender_edge_feature=None)
    with pytest.raises(ValueError, match="receiver_feature must be set"):
        GINConv(4, receiver_feature=None)
