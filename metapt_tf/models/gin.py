"""The GIN backbone of the protein-function (PPI) experiment, from TF-GNN Keras layers.

The reference architecture (Hu et al. 2020, "Strategies for Pre-training Graph
Neural Networks", biology benchmark):

- layer 0 state: a learned embedding of a constant node input (the ego-graphs
  have no node features; `CENTER_FEATURE` is only read by the readout);
- each of `num_layers` layers: along every edge, the message is the sender's
  state concatenated with a linear embedding of the edge's 9 features (each
  layer has its own edge embedding); every node also gets a self-loop message,
  its own state concatenated with the embedding of the self-loop edge features
  (zero except the flag `SELF_LOOP_CHANNEL` = 1); messages are summed at the
  receiver; the sum goes through Dense(2 * units) -> BatchNorm -> ReLU ->
  Dense(units), then BatchNorm, and (except after the last layer) ReLU and
  dropout;
- readout: per graph component (one ego-graph), the mean of the final node
  states concatenated with the centre node's final state, [2 * units].

The self-loops are an explicit term added to the pooled edge messages rather
than edges inserted into the graph: the result is the same, the edge set keeps
its size and order, and no op is needed beyond dense gather/segment-sum, so the
model traces once for graphs of any size and is twice differentiable (HVPs in
both reverse-over-reverse and forward-over-reverse modes).

BatchNorm follows PyTorch's defaults as in the reference (momentum 0.1, that is
Keras momentum 0.9; epsilon 1e-5): batch statistics with `training=True`,
moving statistics with `training=False`. It is `TwiceDifferentiableBatchNorm`,
because Keras' layer gets second derivatives wrong with batch statistics (see
there), and the PT loss is differentiated twice in that mode.

Padded batches (`metapt_tf.data.padding`): padding nodes carry a negative
`CENTER_FEATURE` and only padding edges, so real ego-graphs get the same
states as unpadded; the batch norms take their statistics over real nodes only
(`GINNextState` passes the mask), so a padded batch gives the unpadded batch's
outputs for its real components. Under a `tf.distribute` strategy with several
replicas the batch norms are synchronised: their statistics are those of the
global batch's real nodes, so data-parallel PT computes the one-device loss
(forward-over-reverse HVPs are not supported there; see
`TwiceDifferentiableBatchNorm`).
"""

import tensorflow as tf
import tensorflow_gnn as tfgnn

from metapt_tf.data.graphs import (
    CENTER_FEATURE,
    EDGE_FEATURE,
    EDGE_FEATURE_DIM,
    EDGE_SET,
    NODE_SET,
    SELF_LOOP_CHANNEL,
)

_CENTER_STATE = "center_state"
BATCH_NORM_MOMENTUM = 0.9  # = PyTorch momentum 0.1
BATCH_NORM_EPSILON = 1e-5


def _check_positive_int(value, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{what} must be an int >= 1. Received: {what}={value!r}.")
    return value


@tf.keras.utils.register_keras_serializable(package="metapt_tf")
class ConstantEmbedding(tf.keras.layers.Layer):
    """A learned vector, repeated once per row of the input: the embedding of a constant.

    Maps any tensor with leading dimension N to float32 [N, units]; only the number
    of rows of the input is read.
    """

    def __init__(self, units: int, *, embeddings_initializer="glorot_uniform", **kwargs):
        super().__init__(**kwargs)
        self.units = _check_positive_int(units, "units")
        self.embeddings_initializer = tf.keras.initializers.get(embeddings_initializer)

    def build(self, input_shape):
        # [1, units], so that Glorot scales it like one row of an embedding table.
        self.embeddings = self.add_weight(
            name="embeddings",
            shape=[1, self.units],
            initializer=self.embeddings_initializer,
            trainable=True,
        )
        super().build(input_shape)

    def call(self, inputs):
        num_rows = tf.shape(inputs)[0]
        return tf.tile(self.embeddings, tf.stack([num_rows, 1]))

    def get_config(self):
        return dict(
            units=self.units,
            embeddings_initializer=tf.keras.initializers.serialize(self.embeddings_initializer),
            **super().get_config(),
        )


@tf.keras.utils.register_keras_serializable(package="metapt_tf")
class TwiceDifferentiableBatchNorm(tf.keras.layers.BatchNormalization):
    """`tf.keras.layers.BatchNormalization` whose batch statistics have exact second derivatives.

    With `training=True`, Keras takes the batch moments from `tf.nn.moments`, which
    computes the variance around `tf.stop_gradient(mean)`. That leaves first
    derivatives exact (the dropped term is zero at the batch mean) but not second
    derivatives: e.g. Hessian-vector products show curvature along the bias of the
    preceding Dense layer, although the output does not depend on it. Here the
    variance is differentiated through the mean too, in every case:

    * no mask, one replica: the mean over the batch, then the mean squared
      difference from it (the Keras layer's outputs);
    * `mask` (bool [rows], False for padding): the same over the rows where it is
      True, written as `mean(x * m) * (rows / sum(m))`, so that an all-True mask
      gives the unmasked moments bit for bit;
    * `synchronized=True` under a strategy with R > 1 replicas (in replica
      context): the masked sums and counts are summed over the replicas, so every
      replica normalises with the moments of the global batch, as one device
      would. The all-reduces are differentiable in reverse mode (TensorFlow's
      all-reduce gradient is an all-reduce), so reverse-over-reverse HVPs are
      exact; forward-mode tangents (`tf.autodiff.ForwardAccumulator`) do not pass
      through them correctly, so forward-over-reverse HVPs under such a strategy
      are wrong, and callers must not use them.

    Same arguments, weights and outputs as the Keras layer.
    """

    def _calculate_mean_and_var(self, inputs, reduction_axes, keep_dims, mask=None):
        ctx = tf.distribute.get_replica_context()
        replicas = ctx.num_replicas_in_sync if self.synchronized and ctx is not None else 1
        if mask is None and replicas == 1:
            mean = tf.reduce_mean(inputs, axis=reduction_axes, keepdims=True)
            variance = tf.reduce_mean(
                tf.math.squared_difference(inputs, mean), axis=reduction_axes, keepdims=True
            )
        else:
            if mask is None:
                weights = tf.ones_like(inputs)
            else:
                weights = tf.cast(mask, inputs.dtype)
                weights = tf.reshape(
                    weights, tf.concat([tf.shape(weights), [1] * (inputs.shape.rank - 1)], 0)
                )
                weights = tf.broadcast_to(weights, tf.shape(inputs))
            count = tf.reduce_sum(weights, axis=reduction_axes, keepdims=True)
            if replicas == 1:
                rows = tf.reduce_sum(tf.ones_like(inputs), axis=reduction_axes, keepdims=True)
                scale = tf.math.divide_no_nan(rows, count)  # 1 exactly when nothing is masked
                mean = tf.reduce_mean(inputs * weights, axis=reduction_axes, keepdims=True) * scale
                squared = tf.math.squared_difference(inputs, mean) * weights
                variance = tf.reduce_mean(squared, axis=reduction_axes, keepdims=True) * scale
            else:
                total, count = ctx.all_reduce(
                    tf.distribute.ReduceOp.SUM,
                    [tf.reduce_sum(inputs * weights, axis=reduction_axes, keepdims=True), count],
                )
                mean = tf.math.divide_no_nan(total, count)
                squared = tf.math.squared_difference(inputs, mean) * weights
                squared = ctx.all_reduce(
                    tf.distribute.ReduceOp.SUM,
                    tf.reduce_sum(squared, axis=reduction_axes, keepdims=True),
                )
                variance = tf.math.divide_no_nan(squared, count)
        if not keep_dims:
            mean = tf.squeeze(mean, axis=reduction_axes)
            variance = tf.squeeze(variance, axis=reduction_axes)
        return mean, variance


@tf.keras.utils.register_keras_serializable(package="metapt_tf")
class GINNextState(tf.keras.layers.Layer):
    """The GIN update MLP as a `next_state` of `tfgnn.keras.layers.NodeSetUpdate`.

    Its node input is `CENTER_FEATURE`: nodes where it is negative are padding
    (`metapt_tf.data.padding`), and the MLP's batch norms leave them out of their
    statistics (`mask`); the edge input, the pooled GIN messages, goes through the
    MLP's layers in order. Without padding nodes this is `mlp(messages)`.

    Args:
      mlp: a `tf.keras.Sequential` of the update's layers.
    """

    def __init__(self, mlp: tf.keras.Sequential, **kwargs):
        super().__init__(**kwargs)
        self.mlp = mlp

    def get_config(self):
        return dict(mlp=tf.keras.layers.serialize(self.mlp), **super().get_config())

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        config["mlp"] = tf.keras.layers.deserialize(config["mlp"])
        return cls(**config)

    def call(self, inputs, training=None):
        node_input, edge_inputs, context_input = inputs
        del context_input  # unused
        mask = tf.greater_equal(node_input, 0.0)
        net = tf.concat(tf.nest.flatten(edge_inputs), axis=-1)
        if not self.mlp.built:  # its layers are called one by one below
            self.mlp.build(tf.TensorShape([None, net.shape[-1]]))
        for layer in self.mlp.layers:
            if isinstance(layer, tf.keras.layers.BatchNormalization):
                net = layer(net, training=training, mask=mask)
            elif isinstance(layer, tf.keras.layers.Dropout):
                net = layer(net, training=training)
            else:
                net = layer(net)
        return net


@tf.keras.utils.register_keras_serializable(package="metapt_tf")
class GINConv(tfgnn.keras.layers.AnyToAnyConvolutionBase):
    """GIN convolution with edge features (the "GINE" form of Hu et al. 2020).

    For each edge, the message is `concat(h_sender, edge_embedding(e))`, where
    `edge_embedding` is a Dense(units) layer on the edge feature; messages are summed
    at the receiver. With `self_loop_channel` set, each receiver also gets the
    message of a self-loop, `concat(h_receiver, edge_embedding(onehot(self_loop_channel)))`,
    added to the sum, as if the graph had one extra edge per node whose features
    are zero except that channel. The result, [num_receivers, state_dim + units],
    is the input of the GIN update MLP (a `next_state` of `tfgnn.keras.layers.NodeSetUpdate`).

    Args:
      units: width of the edge embedding.
      self_loop_channel: index of the self-loop flag in the edge features, or None
        for no self-loop messages.
      kernel_initializer, bias_initializer: of the edge embedding.
      receiver_tag, receiver_feature, sender_node_feature, sender_edge_feature: as in
        `tfgnn.keras.layers.AnyToAnyConvolutionBase`; the defaults convolve from
        SOURCE to TARGET nodes reading `tfgnn.HIDDEN_STATE` and the edge feature
        `EDGE_FEATURE`.
    """

    def __init__(
        self,
        units: int,
        *,
        self_loop_channel: int | None = SELF_LOOP_CHANNEL,
        kernel_initializer="glorot_uniform",
        bias_initializer="zeros",
        receiver_tag: str = tfgnn.TARGET,
        receiver_feature: str | None = tfgnn.HIDDEN_STATE,
        sender_node_feature: str | None = tfgnn.HIDDEN_STATE,
        sender_edge_feature: str | None = EDGE_FEATURE,
        **kwargs,
    ):
        kwargs.pop("extra_receiver_ops", None)  # Not a free parameter (see the base class).
        super().__init__(
            receiver_tag=receiver_tag,
            receiver_feature=receiver_feature,
            sender_node_feature=sender_node_feature,
            sender_edge_feature=sender_edge_feature,
            **kwargs,
        )
        self.units = _check_positive_int(units, "units")
        if sender_node_feature is None or sender_edge_feature is None:
            raise ValueError(
                "GINConv needs both sender_node_feature and sender_edge_feature. Received: "
                f"sender_node_feature={sender_node_feature!r}, "
                f"sender_edge_feature={sender_edge_feature!r}."
            )
        if self_loop_channel is not None:
            if isinstance(self_loop_channel, bool) or not isinstance(self_loop_channel, int):
                raise ValueError(
                    "self_loop_channel must be an int >= 0 or None. "
                    f"Received: self_loop_channel={self_loop_channel!r}."
                )
            if self_loop_channel < 0:
                raise ValueError(
                    "self_loop_channel must be an int >= 0 or None. "
                    f"Received: self_loop_channel={self_loop_channel!r}."
                )
            if receiver_feature is None:
                raise ValueError(
                    "Self-loop messages read the receiver's state: with self_loop_channel="
                    f"{self_loop_channel}, receiver_feature must be set. "
                    "Received: receiver_feature=None."
                )
        self.self_loop_channel = self_loop_channel
        self._edge_embedding = tf.keras.layers.Dense(
            self.units,
            kernel_initializer=kernel_initializer,
            bias_initializer=bias_initializer,
            name="edge_embedding",
        )

    @property
    def edge_embedding(self) -> tf.keras.layers.Dense:
        return self._edge_embedding

    def get_config(self):
        return dict(
            units=self.units,
            self_loop_channel=self.self_loop_channel,
            kernel_initializer=tf.keras.initializers.serialize(
                self._edge_embedding.kernel_initializer
            ),
            bias_initializer=tf.keras.initializers.serialize(self._edge_embedding.bias_initializer),
            **super().get_config(),  # receiver_tag and the feature names
        )

    def convolve(
        self,
        *,
        sender_node_input,
        sender_edge_input,
        receiver_input,
        broadcast_from_sender_node,
        broadcast_from_receiver,
        pool_to_receiver,
        training,
    ):
        del broadcast_from_receiver, training  # unused
        messages = tf.concat(
            [
                broadcast_from_sender_node(sender_node_input),
                self._edge_embedding(sender_edge_input),
            ],
            axis=-1,
        )
        pooled = pool_to_receiver(messages, reduce_type="sum")
        if self.self_loop_channel is None:
            return pooled
        edge_dim = sender_edge_input.shape[-1]
        if edge_dim is None or self.self_loop_channel >= edge_dim:
            raise ValueError(
                f"self_loop_channel={self.self_loop_channel} needs edge features of a known "
                f"size > {self.self_loop_channel}. Received edge features of shape "
                f"{sender_edge_input.shape}."
            )
        loop_features = tf.one_hot(
            [self.self_loop_channel], edge_dim, dtype=sender_edge_input.dtype
        )
        loop_embedding = self._edge_embedding(loop_features)  # [1, units]
        num_receivers = tf.shape(receiver_input)[0]
        self_messages = tf.concat(
            [receiver_input, tf.tile(loop_embedding, tf.stack([num_receivers, 1]))], axis=-1
        )
        return pooled + self_messages


def _check_spec(graph_spec) -> None:
    if not isinstance(graph_spec, tfgnn.GraphTensorSpec):
        raise ValueError(
            "graph_spec must be a tfgnn.GraphTensorSpec. "
            f"Received: graph_spec of type {type(graph_spec).__name__}."
        )
    if graph_spec.rank != 0:
        raise ValueError(
            "graph_spec must be the spec of a scalar GraphTensor (batch the ego-graphs, then "
            f"call .merge_batch_to_components()). Received a spec of rank {graph_spec.rank}."
        )
    if NODE_SET not in graph_spec.node_sets_spec:
        raise ValueError(
            f"graph_spec has no node set {NODE_SET!r}. "
            f"Received node sets: {sorted(graph_spec.node_sets_spec)}."
        )
    if EDGE_SET not in graph_spec.edge_sets_spec:
        raise ValueError(
            f"graph_spec has no edge set {EDGE_SET!r}. "
            f"Received edge sets: {sorted(graph_spec.edge_sets_spec)}."
        )
    adjacency = graph_spec.edge_sets_spec[EDGE_SET].adjacency_spec
    endpoints = (adjacency.source_name, adjacency.target_name)
    if endpoints != (NODE_SET, NODE_SET):
        raise ValueError(
            f"Edge set {EDGE_SET!r} must connect node set {NODE_SET!r} to itself. "
            f"Received (source, target) = {endpoints}."
        )
    required = [
        (f"node set {NODE_SET!r}", graph_spec.node_sets_spec[NODE_SET], CENTER_FEATURE, []),
        (
            f"edge set {EDGE_SET!r}",
            graph_spec.edge_sets_spec[EDGE_SET],
            EDGE_FEATURE,
            [EDGE_FEATURE_DIM],
        ),
    ]
    for where, piece, feature, item_shape in required:
        features = piece.features_spec
        if feature not in features:
            raise ValueError(
                f"graph_spec: {where} has no feature {feature!r}. "
                f"Received features: {sorted(features)}."
            )
        spec = features[feature]
        if spec.dtype != tf.float32 or spec.shape[1:].as_list() != item_shape:
            expected = ", ".join(["num_items", *map(str, item_shape)])
            raise ValueError(
                f"graph_spec: feature {feature!r} of {where} must be float32 of shape "
                f"[{expected}]. Received: {spec.dtype.name} of shape {spec.shape}."
            )


def gin_backbone(
    graph_spec: tfgnn.GraphTensorSpec,
    *,
    num_layers: int = 5,
    hidden_units: int = 300,
    dropout_rate: float = 0.2,
    name: str = "gin",
) -> tf.keras.Model:
    """The GIN backbone: a scalar GraphTensor of ego-graphs -> features [C, 2 * hidden_units].

    Args:
      graph_spec: spec of the input, a scalar GraphTensor with the layout of
        `metapt_tf.data.graphs` (batched ego-graphs merged into components, one
        component per ego-graph). Its sizes are relaxed here, so the model takes
        any number of graphs, nodes and edges.
      num_layers: number of GIN layers (5 in the reference).
      hidden_units: node state width (300 in the reference).
      dropout_rate: dropout after each layer but the last (0.2 in PT, 0.5 in FT).
      name: the model's name.

    Returns:
      A Keras model mapping the GraphTensor to float32 [num_components, 2 * hidden_units]:
      per ego-graph, the mean of the final node states, then the final state of the
      centre node (the node whose `CENTER_FEATURE` is 1; a graph without one gets
      zeros there).
    """
    num_layers = _check_positive_int(num_layers, "num_layers")
    units = _check_positive_int(hidden_units, "hidden_units")
    if (
        isinstance(dropout_rate, bool)
        or not isinstance(dropout_rate, int | float)
        or not 0.0 <= dropout_rate < 1.0
    ):
        raise ValueError(
            f"dropout_rate must be a float in [0, 1). Received: dropout_rate={dropout_rate!r}."
        )
    if not isinstance(name, str) or not name:
        raise ValueError(f"name must be a non-empty str. Received: name={name!r}.")
    _check_spec(graph_spec)
    graph_spec = graph_spec.relax(num_components=True, num_nodes=True, num_edges=True)

    inputs = tf.keras.layers.Input(type_spec=graph_spec, name="graph")

    def initial_node_state(node_set, *, node_set_name):
        if node_set_name != NODE_SET:
            return None
        features = node_set.get_features_dict()
        features[tfgnn.HIDDEN_STATE] = ConstantEmbedding(units, name="node_embedding")(
            features[CENTER_FEATURE]
        )
        return features

    graph = tfgnn.keras.layers.MapFeatures(node_sets_fn=initial_node_state, name="initial_state")(
        inputs
    )
    for i in range(num_layers):
        prefix = f"gin_layer_{i}"  # Sequential builds its layers outside this layer's scope
        mlp = [
            tf.keras.layers.Dense(2 * units, name=f"{prefix}_dense_0"),
            _batch_norm(f"{prefix}_batch_norm_0"),
            tf.keras.layers.ReLU(name=f"{prefix}_relu_0"),
            tf.keras.layers.Dense(units, name=f"{prefix}_dense_1"),
            _batch_norm(f"{prefix}_batch_norm_1"),  # the BatchNorm between layers
        ]
        if i < num_layers - 1:
            mlp.append(tf.keras.layers.ReLU(name=f"{prefix}_relu_1"))
            if dropout_rate > 0.0:
                mlp.append(tf.keras.layers.Dropout(float(dropout_rate), name=f"{prefix}_dropout"))
        graph = tfgnn.keras.layers.GraphUpdate(
            node_sets={
                NODE_SET: tfgnn.keras.layers.NodeSetUpdate(
                    {EDGE_SET: GINConv(units, name="conv")},
                    GINNextState(tf.keras.Sequential(mlp, name=f"{prefix}_mlp"), name="next_state"),
                    # GIN: the self term is the self-loop message; the node input only
                    # marks padding nodes for the batch norms.
                    node_input_feature=CENTER_FEATURE,
                    name="node_set_update",
                )
            },
            name=prefix,
        )(graph)

    def center_state(node_set, *, node_set_name):
        if node_set_name != NODE_SET:
            return None
        is_center = tf.keras.layers.Reshape([1], name="center_column")(node_set[CENTER_FEATURE])
        return {
            _CENTER_STATE: tf.keras.layers.Multiply(name="center_mask")(
                [node_set[tfgnn.HIDDEN_STATE], is_center]
            )
        }

    mean_state = tfgnn.keras.layers.Pool(
        tfgnn.CONTEXT, "mean", node_set_name=NODE_SET, name="mean_pool"
    )(graph)
    masked = tfgnn.keras.layers.MapFeatures(node_sets_fn=center_state, name="center_states")(graph)
    center = tfgnn.keras.layers.Pool(
        tfgnn.CONTEXT, "sum", node_set_name=NODE_SET, feature_name=_CENTER_STATE, name="center_pool"
    )(masked)
    outputs = tf.keras.layers.Concatenate(name="graph_representation")([mean_state, center])
    return tf.keras.Model(inputs, outputs, name=name)


def _batch_norm(name: str) -> tf.keras.layers.BatchNormalization:
    return TwiceDifferentiableBatchNorm(
        momentum=BATCH_NORM_MOMENTUM, epsilon=BATCH_NORM_EPSILON, synchronized=True, name=name
    )


def gin_parameter_count(
    *, num_layers: int = 5, hidden_units: int = 300, trainable_only: bool = False
) -> int:
    """Closed-form size of `gin_backbone` (edge features of `EDGE_FEATURE_DIM`).

    Per layer: edge embedding (d + 1) u, Dense 2u x 2u + 2u, BatchNorm on 2u, Dense
    2u x u + u, BatchNorm on u (4 weights per channel, 2 of them trainable); plus the
    initial embedding, u.
    """
    u = _check_positive_int(hidden_units, "hidden_units")
    layers = _check_positive_int(num_layers, "num_layers")
    bn_per_channel = 2 if trainable_only else 4
    per_layer = (
        (EDGE_FEATURE_DIM + 1) * u
        + (2 * u) * (2 * u)
        + 2 * u
        + bn_per_channel * 2 * u
        + (2 * u) * u
        + u
        + bn_per_channel * u
    )
    return u + layers * per_layer
