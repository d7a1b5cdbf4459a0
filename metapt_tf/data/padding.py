"""Ego-graph batches padded to fixed total sizes, and split into per-replica pieces.

A batch of `load_dataset` ({"graph": GraphTensor, label matrices}) has as many
nodes and edges as its ego-graphs happen to have. Compiled programs that need
static shapes (XLA, TPUs) and strategies that give every replica its own piece
of a batch take it padded instead, with TF-GNN's padding utilities:

* `size_constraints` measures a file once (`tfgnn.find_tight_size_constraints`)
  and returns the `tfgnn.SizeConstraints` that fit any batch of `graphs_per_batch`
  of its ego-graphs: G + 1 components, and G times the largest node and edge
  counts plus room for the padding.
* `pad_batch` pads one batch to those sizes (`tfgnn.pad_to_total_sizes`): the
  padding is one or more extra components at the end, whose nodes carry
  `CENTER_FEATURE` = `PADDING_CENTER` (-1; real nodes have 0 or 1, which is how
  `metapt_tf.models.gin` leaves them out of batch-norm statistics) and whose
  edges join padding nodes only, so real graphs see nothing of them. Every
  other tensor of the batch (label matrices [G, ...]) is padded with zero rows,
  and `MASK_KEY` holds the component mask (True for the G real graphs). Every
  shape of the result is static.
* `padded_dataset` turns a dataset of batches of G = B / R graphs into one of
  global batches for R replicas: R padded batches merged into one scalar
  GraphTensor (R (G + 1) components), replica r's in the r-th contiguous block
  of components, nodes and edges. The global batch is itself a padded batch,
  which one device runs as is, and `shard_batch` cuts replica r's block back
  out (static slices, node indices re-based), with no host-side work.
* `pad_blocks` makes the same layout from one batch of up to R G graphs, for
  pipelines that read every graph (fine-tuning, evaluation, co-training's FT
  batches: a last partial batch, a batch size that R does not divide): block r
  holds the batch's graphs [r G, (r + 1) G), as many as there are, so blocks
  may hold fewer than G real graphs, or none.

Losses on padded batches sum over the real graphs only (`MASK_KEY`) and divide
by the number of real graphs. Every block of a `padded_dataset` batch holds
exactly G real graphs (the batches are cut with `drop_remainder=True`;
`shard_batch` checks it), so a replica's mean over its block, divided by R as
the online loop does, is its share of the global mean: the replicas' sum is the
one-device loss. Blocks of `pad_blocks` batches are uneven, so a replica's
share is its sum over its real graphs divided by the global batch's count of
real graphs (`finetune.finetune_multilabel`, `multitask.cotrain`).
"""

from collections.abc import Mapping

import tensorflow as tf
import tensorflow_gnn as tfgnn

from metapt_tf.data import graphs

PADDING_CENTER = -1.0  # CENTER_FEATURE of padding nodes (real nodes: 0 or 1)
MASK_KEY = "graph_mask"  # bool [components]: True for real ego-graphs


def _plain_adjacency(edge_set: tfgnn.EdgeSet, name: str, caller: str) -> tfgnn.Adjacency:
    """`edge_set`'s adjacency, which must be a plain `tfgnn.Adjacency` (source and
    target indices), the only kind `caller` can cut and re-base."""
    adjacency = edge_set.adjacency
    if type(adjacency) is not tfgnn.Adjacency:
        raise ValueError(
            f"{caller} handles tfgnn.Adjacency only; edge set {name!r} has a "
            f"{type(adjacency).__name__}."
        )
    return adjacency


def padding_values() -> tfgnn.FeatureDefaultValues:
    """The feature values of padding items: `PADDING_CENTER` on nodes, zeros elsewhere."""
    return tfgnn.FeatureDefaultValues(
        node_sets={graphs.NODE_SET: {graphs.CENTER_FEATURE: tf.constant(PADDING_CENTER)}}
    )


def size_constraints(file_pattern, schema: tfgnn.GraphSchema, graphs_per_batch: int):
    """The tightest `tfgnn.SizeConstraints` that fit any `graphs_per_batch` ego-graphs
    of the files (read once, in full).

    Args:
      file_pattern: TFRecord files of ego-graphs (as for `graphs.load_dataset`).
      schema: their schema.
      graphs_per_batch: G, the number of ego-graphs in every padded batch.

    Returns:
      Constraints with G + 1 components (one for the padding) and total node and
      edge counts that leave room for at least one padding node.
    """
    g = graphs_per_batch
    if isinstance(g, bool) or not isinstance(g, int) or g < 1:
        raise ValueError(f"graphs_per_batch must be an int >= 1. Received: graphs_per_batch={g!r}.")
    single = graphs.load_dataset(file_pattern, schema, batch_size=1).map(lambda b: b["graph"])
    constraints = tfgnn.find_tight_size_constraints(single, target_batch_size=graphs_per_batch)
    return tf.nest.map_structure(int, constraints)


def _sizes(graph: tfgnn.GraphTensor) -> dict[str, tf.Tensor]:
    out = {"total_num_components": graph.num_components}
    for name, piece in (*graph.node_sets.items(), *graph.edge_sets.items()):
        out[name] = piece.total_size
    return out


def pad_batch(batch: Mapping, constraints: tfgnn.SizeConstraints) -> dict:
    """One batch padded to `constraints` (static shapes), with its component mask.

    Args:
      batch: {"graph": a scalar GraphTensor with one component per ego-graph,
        other keys: tensors with one row per ego-graph (labels)}.
      constraints: from `size_constraints` (ints).

    Returns:
      The batch with "graph" padded (`padding_values`), every other tensor
      padded with zero rows to the number of components, and `MASK_KEY`.

    Raises:
      ValueError (eagerly, or in a graph for sizes known statically) or
      tf.errors.InvalidArgumentError (when a graph, e.g. a dataset's map, runs):
      the batch has more components, nodes or edges than the constraints allow;
      the message gives both.
    """
    graph = batch["graph"]
    fits = tfgnn.satisfies_size_constraints(graph, constraints)
    limits = {
        "total_num_components": constraints.total_num_components,
        **dict(constraints.total_num_nodes),
        **dict(constraints.total_num_edges),
    }
    message = (
        f"The graph batch does not fit the padding sizes {limits} (the padding needs one "
        "more component, and a node to spare if edges are padded); compute the constraints "
        "with padding.size_constraints for this batch size and these files. Batch sizes:"
    )
    sizes = _sizes(graph)
    static = {"total_num_components": graph.spec.total_num_components}
    static.update({n: p.spec.total_size for n, p in graph.node_sets.items()})
    static.update({n: p.spec.total_size for n, p in graph.edge_sets.items()})
    if any(v is not None and k in limits and v > limits[k] for k, v in static.items()):
        raise ValueError(f"{message} {static}.")
    if tf.executing_eagerly():
        if not bool(fits):
            got = {k: int(v) for k, v in sizes.items()}
            raise ValueError(f"{message} {got}.")
    else:
        data = [message]
        for key, value in sizes.items():
            data += [f"{key}=", value]
        check = tf.debugging.Assert(fits, data, summarize=10)
        with tf.control_dependencies([check]):
            graph = tf.nest.map_structure(tf.identity, graph, expand_composites=True)
    padded, mask = tfgnn.pad_to_total_sizes(
        graph, constraints, padding_values=padding_values(), validate=False
    )
    rows = int(constraints.total_num_components)
    out = {"graph": padded, MASK_KEY: tf.ensure_shape(mask, [rows])}
    for key, value in batch.items():
        if key in ("graph", MASK_KEY):
            continue
        value = tf.convert_to_tensor(value)
        pad = [[0, rows - tf.shape(value)[0]]] + [[0, 0]] * (value.shape.rank - 1)
        out[key] = tf.ensure_shape(tf.pad(value, pad), [rows, *value.shape[1:]])
    return out


def padded_dataset(
    dataset: tf.data.Dataset, constraints: tfgnn.SizeConstraints, num_shards: int = 1
) -> tf.data.Dataset:
    """Global batches of `num_shards` padded batches, merged (see the module docstring).

    Args:
      dataset: batches of G ego-graphs each (`graphs.load_dataset` with
        `drop_remainder=True`), G = the global batch size / `num_shards`.
      constraints: fit for G ego-graphs (`size_constraints`).
      num_shards: R, the number of replicas the global batches are split over.

    Returns:
      A dataset of global batches of R G ego-graphs with static shapes: "graph"
      with R (G + 1) components, other tensors with that many rows, `MASK_KEY`.
    """
    if isinstance(num_shards, bool) or not isinstance(num_shards, int) or num_shards < 1:
        raise ValueError(f"num_shards must be an int >= 1. Received: num_shards={num_shards!r}.")

    def merge(stacked):
        out = {"graph": stacked["graph"].merge_batch_to_components()}
        for key, value in stacked.items():
            if key != "graph":
                out[key] = tf.reshape(value, [-1, *value.shape[2:]])
        return out

    return (
        dataset.map(lambda b: pad_batch(b, constraints))
        .batch(num_shards, drop_remainder=True)
        .map(merge)
    )


def _component_range(graph: tfgnn.GraphTensor, start, stop) -> tfgnn.GraphTensor:
    """Components [start, stop) of a scalar GraphTensor, as a GraphTensor of their own
    (their items in order, edge indices re-based)."""

    def items(piece):
        """The item range [first, end) of the components, in the piece's index dtype."""
        offsets = tf.concat([tf.zeros([1], piece.sizes.dtype), tf.cumsum(piece.sizes)], axis=0)
        return offsets[start], offsets[stop]

    def features(piece, first, end):
        return {k: v[first:end] for k, v in piece.features.items()}

    node_sets, first_node = {}, {}
    for name, piece in graph.node_sets.items():
        first, end = items(piece)
        first_node[name] = first
        node_sets[name] = tfgnn.NodeSet.from_fields(
            sizes=piece.sizes[start:stop], features=features(piece, first, end)
        )
    edge_sets = {}
    for name, piece in graph.edge_sets.items():
        adjacency = _plain_adjacency(piece, name, "pad_blocks")
        first, end = items(piece)

        def indices(tag, adjacency=adjacency, first=first, end=end):
            node_set = adjacency.node_set_name(tag)
            offset = tf.cast(first_node[node_set], adjacency[tag].dtype)
            return (node_set, adjacency[tag][first:end] - offset)

        edge_sets[name] = tfgnn.EdgeSet.from_fields(
            sizes=piece.sizes[start:stop],
            adjacency=tfgnn.Adjacency.from_indices(indices(tfgnn.SOURCE), indices(tfgnn.TARGET)),
            features=features(piece, first, end),
        )
    context = tfgnn.Context.from_fields(
        sizes=graph.context.sizes[start:stop], features=features(graph.context, start, stop)
    )
    return tfgnn.GraphTensor.from_pieces(context=context, node_sets=node_sets, edge_sets=edge_sets)


def _concat_graphs(blocks: list[tfgnn.GraphTensor]) -> tfgnn.GraphTensor:
    """Padded GraphTensors of the same static sizes, one after the other in one scalar
    GraphTensor (what `merge_batch_to_components` makes of them, batched)."""

    def cat(values):
        return tf.concat(values, axis=0)

    def features(pieces):
        return {k: cat([p.features[k] for p in pieces]) for k in pieces[0].features}

    first = blocks[0]
    node_sets = {}
    for name in first.node_sets:
        pieces = [g.node_sets[name] for g in blocks]
        node_sets[name] = tfgnn.NodeSet.from_fields(
            sizes=cat([p.sizes for p in pieces]), features=features(pieces)
        )
    edge_sets = {}
    for name, piece in first.edge_sets.items():
        pieces = [g.edge_sets[name] for g in blocks]

        def indices(tag, pieces=pieces, adjacency=piece.adjacency):
            node_set = adjacency.node_set_name(tag)
            size = first.node_sets[node_set].spec.total_size  # static: the blocks are padded
            return (
                node_set,
                cat([p.adjacency[tag] + i * size for i, p in enumerate(pieces)]),
            )

        edge_sets[name] = tfgnn.EdgeSet.from_fields(
            sizes=cat([p.sizes for p in pieces]),
            adjacency=tfgnn.Adjacency.from_indices(indices(tfgnn.SOURCE), indices(tfgnn.TARGET)),
            features=features(pieces),
        )
    contexts = [g.context for g in blocks]
    context = tfgnn.Context.from_fields(
        sizes=cat([c.sizes for c in contexts]), features=features(contexts)
    )
    return tfgnn.GraphTensor.from_pieces(context=context, node_sets=node_sets, edge_sets=edge_sets)


def pad_blocks(batch: Mapping, constraints: tfgnn.SizeConstraints, num_shards: int) -> dict:
    """One batch of up to R G ego-graphs as a global batch of R padded blocks of G.

    For batches whose graph count need not split evenly (fine-tuning and
    evaluation reading every graph, a last partial batch included): block r
    holds graphs [r G, (r + 1) G) of the batch, as many as there are (possibly
    none), padded to `constraints` (`pad_batch`), so that a batch of b graphs
    fills the first ceil(b / G) blocks. The result has the layout of a
    `padded_dataset` batch (`shard_batch` with `equal_blocks=False` cuts it), and
    its real graphs, in `MASK_KEY` order, are the batch's graphs in order.

    Args:
      batch: as for `pad_batch`, with at most R G graphs.
      constraints: fit for G ego-graphs (`size_constraints`).
      num_shards: R.

    Raises:
      ValueError (eagerly) or tf.errors.InvalidArgumentError (in a graph): the
      batch holds more than R G graphs.
    """
    if isinstance(num_shards, bool) or not isinstance(num_shards, int) or num_shards < 1:
        raise ValueError(f"num_shards must be an int >= 1. Received: num_shards={num_shards!r}.")
    per_block = int(constraints.total_num_components) - 1
    graph = batch["graph"]
    count = tf.cast(graph.num_components, tf.int64)
    capacity = num_shards * per_block
    message = (
        f"pad_blocks: a batch holds more ego-graphs than the {num_shards} blocks of "
        f"{per_block} the constraints allow ({capacity})"
    )
    if tf.executing_eagerly():
        if int(count) > capacity:
            raise ValueError(f"{message}. Received {int(count)} graphs.")
    else:
        check = tf.debugging.assert_less_equal(count, tf.constant(capacity, tf.int64), message)
        with tf.control_dependencies([check]):
            count = tf.identity(count)
    blocks = []
    for r in range(num_shards):
        start = tf.minimum(tf.constant(r * per_block, tf.int64), count)
        stop = tf.minimum(tf.constant((r + 1) * per_block, tf.int64), count)
        block = {"graph": _component_range(graph, start, stop)}
        for key, value in batch.items():
            if key not in ("graph", MASK_KEY):
                block[key] = tf.convert_to_tensor(value)[start:stop]
        blocks.append(pad_batch(block, constraints))
    out = {"graph": _concat_graphs([b["graph"] for b in blocks])}
    for key in blocks[0]:
        if key != "graph":
            out[key] = tf.concat([b[key] for b in blocks], axis=0)
    return out


def _block(x: tf.Tensor, num_shards: int, shard, what: str) -> tf.Tensor:
    size = x.shape[0] if x.shape.rank else None
    if size is None or size % num_shards:
        raise ValueError(
            f"{what} needs a static leading dimension divisible by the {num_shards} shards "
            f"(a batch from padding.padded_dataset). Received shape {x.shape}."
        )
    rows = tf.reshape(x, [num_shards, size // num_shards, *x.shape[1:]])
    return tf.gather(rows, shard)


def shard_graph(graph: tfgnn.GraphTensor, num_shards: int, shard) -> tfgnn.GraphTensor:
    """Block `shard` of a merged `padded_dataset` graph: its own padded GraphTensor."""

    def features(piece, what):
        return {
            k: _block(v, num_shards, shard, f"{what} feature {k!r}")
            for k, v in piece.features.items()
        }

    def sizes(piece, what):
        return _block(piece.sizes, num_shards, shard, f"{what} sizes")

    node_sets = {
        name: tfgnn.NodeSet.from_fields(
            sizes=sizes(piece, f"node set {name!r}"), features=features(piece, f"node set {name!r}")
        )
        for name, piece in graph.node_sets.items()
    }
    edge_sets = {}
    for name, piece in graph.edge_sets.items():
        adjacency = _plain_adjacency(piece, name, "shard_graph")

        def indices(tag, adjacency=adjacency, name=name):
            node_set = adjacency.node_set_name(tag)
            offset = tf.cast(shard, adjacency[tag].dtype) * (
                graph.node_sets[node_set].total_size // num_shards
            )
            block = _block(adjacency[tag], num_shards, shard, f"edge set {name!r} indices")
            return (node_set, block - offset)

        edge_sets[name] = tfgnn.EdgeSet.from_fields(
            sizes=sizes(piece, f"edge set {name!r}"),
            adjacency=tfgnn.Adjacency.from_indices(indices(tfgnn.SOURCE), indices(tfgnn.TARGET)),
            features=features(piece, f"edge set {name!r}"),
        )
    context = tfgnn.Context.from_fields(
        sizes=sizes(graph.context, "context"), features=features(graph.context, "context")
    )
    return tfgnn.GraphTensor.from_pieces(context=context, node_sets=node_sets, edge_sets=edge_sets)


def shard_batch(batch: Mapping, num_shards: int, shard, *, equal_blocks: bool = True) -> dict:
    """Replica `shard`'s block of a global batch of `padded_dataset` or `pad_blocks`.

    Args:
      batch: a global batch ({"graph", `MASK_KEY`, labels}).
      num_shards: R, as given to `padded_dataset` or `pad_blocks`.
      shard: the replica's index (a scalar tensor in replica context, or an int).
      equal_blocks: check that every block holds 1/R of the real graphs (what a
        loss that is the block's mean divided by R needs, as in the online loop).
        False for `pad_blocks` batches, whose losses divide by the global count.

    Returns:
      The block's batch: a padded GraphTensor with G + 1 components, its rows
      of every other tensor, and its mask.

    Raises:
      tf.errors.InvalidArgumentError: when run with `equal_blocks`, if the block
        does not hold 1/R of the real graphs (its loss share would not be 1/R of
        the global loss).
    """
    if num_shards == 1:
        return dict(batch)
    out = {}
    for key, value in batch.items():
        if key == "graph":
            out[key] = shard_graph(value, num_shards, shard)
        else:
            out[key] = _block(tf.convert_to_tensor(value), num_shards, shard, f"batch[{key!r}]")
    if equal_blocks and MASK_KEY in batch:
        real = tf.reduce_sum(tf.cast(out[MASK_KEY], tf.int32))
        total = tf.reduce_sum(tf.cast(batch[MASK_KEY], tf.int32))
        check = tf.debugging.assert_equal(
            real * num_shards,
            total,
            message=f"Every one of the {num_shards} blocks of a padded batch must hold the same "
            "number of real graphs (batch the graphs with drop_remainder=True).",
        )
        with tf.control_dependencies([check]):
            out[MASK_KEY] = tf.identity(out[MASK_KEY])
    return out


def masked_mean(values: tf.Tensor, mask: tf.Tensor | None) -> tf.Tensor:
    """The mean of `values` [components, ...] over the real components (all, if mask is None);
    0 for a block without real components (a replica's empty block of `pad_blocks`)."""
    if mask is None:
        return tf.reduce_mean(values)
    mask = tf.cast(mask, values.dtype)
    axes = list(range(1, values.shape.rank))
    per_graph = tf.reduce_mean(values, axis=axes) if axes else values
    # Padding rows are zeroed with where, not multiplied: a zero weight would not
    # stop a NaN from the padding.
    real = tf.where(mask > 0, per_graph, tf.zeros_like(per_graph))
    return tf.reduce_sum(real) / tf.maximum(tf.reduce_sum(mask), 1.0)
