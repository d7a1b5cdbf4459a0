"""Ego-graphs as TF-GNN GraphTensors: schema, TFRecord I/O, loaders, generators.

Layout of one ego-graph (the contract every graph model and experiment reads):

- node set `NODE_SET` ("proteins"): feature `CENTER_FEATURE` ("is_center"),
  float32 scalar per node, 1.0 on the ego-graph's centre node and 0.0 elsewhere
  (there are no other node features; models embed a constant input);
- edge set `EDGE_SET` ("interactions"), source and target `NODE_SET`, both
  directions of each interaction stored; feature `EDGE_FEATURE` ("features"),
  float32 [EDGE_FEATURE_DIM] (7 evidence channels, a self-loop flag, a mask flag);
- context: `PT_LABELS` ("pt_labels") float32 [num_pt_tasks], `FT_LABELS`
  ("ft_labels") float32 [num_ft_tasks] (multi-hot; 0 = negative or unknown),
  `SPECIES` ("species_id") int64 scalar.

What this module provides on top of the layout:

* `graph_schema` builds the `tfgnn.GraphSchema` of the layout for given task
  counts; `write_schema` / `read_schema` store it as text (schema.pbtxt), and
  `num_tasks` reads the task counts back, checking the layout.
* `EgoGraph` is one ego-graph in memory (numpy arrays), validated on
  construction. `to_graph_tensor` turns it into a scalar GraphTensor with one
  component, `to_example` into the tf.train.Example that `tfgnn.write_example`
  writes for that GraphTensor (built directly, which is much faster), and
  `write_tfrecord` writes many of them to a TFRecord file atomically.
* `load_dataset` reads TFRecord files into batches for training: one
  GraphTensor per batch (one component per ego-graph) and the label matrices.
  `load_graphs` reads the records back into `EgoGraph`s, `read_labels` reads
  only the labels (and species) as numpy arrays, `count_graphs` counts records.
* `split_graph_indices` cuts disjoint random index sets by fractions.

Files whose name ends in ".gz" are GZIP-compressed TFRecord files, everywhere in
this module; all other files are uncompressed.

Everything random takes an explicit seed.
"""

from __future__ import annotations

import dataclasses
import math
import os
import uuid
from collections.abc import Iterable, Iterator, Mapping, Sequence

import numpy as np
import tensorflow as tf
import tensorflow_gnn as tfgnn

NODE_SET = "proteins"
EDGE_SET = "interactions"
CENTER_FEATURE = "is_center"
EDGE_FEATURE = "features"
EDGE_FEATURE_DIM = 9
SELF_LOOP_CHANNEL = 7  # index of the self-loop flag in the edge features
PT_LABELS = "pt_labels"
FT_LABELS = "ft_labels"
SPECIES = "species_id"

NUM_EVIDENCE_CHANNELS = 7  # edge feature channels 0..6; 7 is the self-loop flag, 8 the mask flag
MASK_CHANNEL = 8  # index of the mask flag in the edge features

# The keys `tfgnn.write_example` uses for the layout's features in a tf.train.Example.
_NODE_SIZE_KEY = f"nodes/{NODE_SET}.#size"
_CENTER_KEY = f"nodes/{NODE_SET}.{CENTER_FEATURE}"
_EDGE_SIZE_KEY = f"edges/{EDGE_SET}.#size"
_SOURCE_KEY = f"edges/{EDGE_SET}.#source"
_TARGET_KEY = f"edges/{EDGE_SET}.#target"
_EDGE_FEATURE_KEY = f"edges/{EDGE_SET}.{EDGE_FEATURE}"
_PT_KEY = f"context/{PT_LABELS}"
_FT_KEY = f"context/{FT_LABELS}"
_SPECIES_KEY = f"context/{SPECIES}"

_DEFAULT_SHUFFLE_BUFFER = 10_000
_LABEL_READ_BATCH = 4096
_CHECK_BATCH = 1024  # records parsed at a time by check_records


# --- Schema ------------------------------------------------------------------------------------


def graph_schema(num_pt_tasks: int, num_ft_tasks: int) -> tfgnn.GraphSchema:
    """The `tfgnn.GraphSchema` of the ego-graph layout (see the module docstring).

    Args:
      num_pt_tasks: width of the `PT_LABELS` context feature, at least 1.
      num_ft_tasks: width of the `FT_LABELS` context feature, at least 1.
    """
    num_pt_tasks = _as_count("num_pt_tasks", num_pt_tasks, minimum=1)
    num_ft_tasks = _as_count("num_ft_tasks", num_ft_tasks, minimum=1)
    schema = tfgnn.GraphSchema()

    def add(features, name: str, dtype: tf.DType, dims: Sequence[int], description: str):
        feature = features[name]
        feature.dtype = dtype.as_datatype_enum
        feature.description = description
        for size in dims:
            feature.shape.dim.add().size = size

    context = schema.context.features
    add(context, PT_LABELS, tf.float32, [num_pt_tasks], "pre-training labels (multi-hot)")
    add(context, FT_LABELS, tf.float32, [num_ft_tasks], "fine-tuning labels (multi-hot)")
    add(context, SPECIES, tf.int64, [], "species (NCBI taxonomy id) of the centre protein")
    node_set = schema.node_sets[NODE_SET]
    node_set.description = "proteins of the ego-graph"
    add(node_set.features, CENTER_FEATURE, tf.float32, [], "1 on the centre protein, else 0")
    edge_set = schema.edge_sets[EDGE_SET]
    edge_set.description = "protein-protein interactions, both directions stored"
    edge_set.source = NODE_SET
    edge_set.target = NODE_SET
    add(
        edge_set.features,
        EDGE_FEATURE,
        tf.float32,
        [EDGE_FEATURE_DIM],
        "7 evidence channels, a self-loop flag, a mask flag",
    )
    tfgnn.validate_schema(schema)
    return schema


def num_tasks(schema: tfgnn.GraphSchema) -> tuple[int, int]:
    """(num_pt_tasks, num_ft_tasks) of a schema, after checking it has the ego-graph layout.

    Raises:
      ValueError: naming the first way in which `schema` differs from
        `graph_schema(num_pt_tasks, num_ft_tasks)`.
    """
    if not isinstance(schema, tfgnn.GraphSchema):
        raise ValueError(f"schema must be a tfgnn.GraphSchema. Received: {type(schema).__name__}")
    context = schema.context.features  # a proto map: look up with `in` (indexing inserts)
    pt = ft = 0
    if PT_LABELS in context and FT_LABELS in context:
        pt_dims, ft_dims = context[PT_LABELS].shape.dim, context[FT_LABELS].shape.dim
        if len(pt_dims) == 1 and len(ft_dims) == 1:
            pt, ft = pt_dims[0].size, ft_dims[0].size
    if pt < 1 or ft < 1:
        raise ValueError(
            "schema is not the ego-graph layout: its context must have the features "
            f"{PT_LABELS!r} and {FT_LABELS!r}, each of shape [num_tasks]. Received context "
            f"features: {_describe_features(schema.context.features)}"
        )
    expected = graph_schema(pt, ft)
    for what, got, want in _layout_parts(schema, expected):
        if got != want:
            raise ValueError(
                f"schema is not the ego-graph layout: {what} differs. "
                f"Expected: {want}. Received: {got}"
            )
    return int(pt), int(ft)


def _layout_parts(schema: tfgnn.GraphSchema, expected: tfgnn.GraphSchema):
    """(what, got, expected) pairs that must agree; descriptions are ignored."""
    yield (
        "the node sets",
        sorted(schema.node_sets),
        sorted(expected.node_sets),
    )
    yield "the edge sets", sorted(schema.edge_sets), sorted(expected.edge_sets)
    yield (
        "the context features",
        _describe_features(schema.context.features),
        _describe_features(expected.context.features),
    )
    yield (
        f"the features of node set {NODE_SET!r}",
        _describe_features(schema.node_sets[NODE_SET].features),
        _describe_features(expected.node_sets[NODE_SET].features),
    )
    edge_set, expected_edge_set = schema.edge_sets[EDGE_SET], expected.edge_sets[EDGE_SET]
    yield (
        f"the endpoints of edge set {EDGE_SET!r}",
        (edge_set.source, edge_set.target),
        (expected_edge_set.source, expected_edge_set.target),
    )
    yield (
        f"the features of edge set {EDGE_SET!r}",
        _describe_features(edge_set.features),
        _describe_features(expected_edge_set.features),
    )


def _describe_features(features) -> dict[str, str]:
    """name -> "float32[200]" for the features of a schema piece, sorted by name."""
    out = {}
    for name in sorted(features):
        feature = features[name]
        dims = [d.size for d in feature.shape.dim]
        out[name] = f"{tf.as_dtype(feature.dtype).name}{dims}"
    return out


def write_schema(schema: tfgnn.GraphSchema, path: str | os.PathLike) -> None:
    """Writes `schema` as a text proto (e.g. schema.pbtxt), atomically."""
    path = os.fspath(path)
    _atomic_write(path, lambda tmp: tfgnn.write_schema(schema, tmp))


def read_schema(path: str | os.PathLike) -> tfgnn.GraphSchema:
    """Reads a schema written by `write_schema` and checks it has the ego-graph layout."""
    path = os.fspath(path)
    if not tf.io.gfile.exists(path):
        raise FileNotFoundError(f"No graph schema file at {path!r}")
    try:
        schema = tfgnn.read_schema(path)
    except Exception as e:  # text-format parse errors come in several types
        raise ValueError(f"{path}: not a text-format tfgnn.GraphSchema: {e}") from e
    try:
        num_tasks(schema)
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from e
    return schema


# --- One ego-graph in memory -------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, eq=False)
class EgoGraph:
    """One ego-graph: a centre protein, its neighbourhood, the interactions, the labels.

    The constructor checks the fields and stores them as the dtypes below (the
    arrays are copied only when they need converting). Two EgoGraphs compare
    equal when all fields are equal.

    Attributes:
      num_nodes: number of proteins, at least 1. Nodes are 0..num_nodes-1.
      edges: int64 [E, 2] rows (source, target); every interaction is stored in
        both directions, so (s, t) occurs exactly as often as (t, s).
      edge_features: float32 [E, EDGE_FEATURE_DIM], one row per row of `edges`.
      center: index of the centre protein, in [0, num_nodes).
      pt_labels: float32 [num_pt_tasks], values in [0, 1].
      ft_labels: float32 [num_ft_tasks], values in [0, 1].
      species_id: species of the centre protein (an NCBI taxonomy id, or 0).
    """

    num_nodes: int
    edges: np.ndarray
    edge_features: np.ndarray
    center: int
    pt_labels: np.ndarray
    ft_labels: np.ndarray
    species_id: int = 0

    def __post_init__(self) -> None:
        num_nodes = _as_count("num_nodes", self.num_nodes, minimum=1)
        edges = np.asarray(self.edges)
        if edges.size == 0 and edges.ndim <= 2:
            edges = edges.reshape(0, 2)
        if edges.ndim != 2 or edges.shape[1] != 2:
            raise ValueError(
                f"edges must have shape [num_edges, 2] (source, target). "
                f"Received: shape={list(edges.shape)}"
            )
        if edges.size and not np.issubdtype(edges.dtype, np.integer):
            raise ValueError(f"edges must be integers. Received: dtype={edges.dtype}")
        edges = edges.astype(np.int64, copy=False)
        if edges.size:
            bad = np.flatnonzero((edges < 0).any(axis=1) | (edges >= num_nodes).any(axis=1))
            if bad.size:
                s, t = edges[bad[0]]
                raise ValueError(
                    f"edges must index nodes in [0, {num_nodes}) (num_nodes={num_nodes}). "
                    f"Received: edge {bad[0]} = ({s}, {t}), and {bad.size - 1} more out of range"
                )
            forward = np.sort(edges[:, 0] * num_nodes + edges[:, 1])
            backward = np.sort(edges[:, 1] * num_nodes + edges[:, 0])
            if not np.array_equal(forward, backward):
                unmatched = np.setdiff1d(forward, backward)[0]
                s, t = divmod(int(unmatched), num_nodes)
                raise ValueError(
                    "edges must hold both directions of every interaction. "
                    f"Received: edge ({s}, {t}) without a matching ({t}, {s})"
                )
        features = np.asarray(self.edge_features)
        if features.size == 0 and edges.shape[0] == 0:
            features = features.reshape(0, EDGE_FEATURE_DIM)
        if features.shape != (edges.shape[0], EDGE_FEATURE_DIM):
            raise ValueError(
                f"edge_features must have shape [num_edges={edges.shape[0]}, "
                f"{EDGE_FEATURE_DIM}]. Received: shape={list(features.shape)}"
            )
        features = _as_float32("edge_features", features)
        center = self.center
        if isinstance(center, np.ndarray) and center.size == 1:
            center = center.reshape(())[()]
        if isinstance(center, bool) or not isinstance(center, int | np.integer):
            raise ValueError(f"center must be an integer. Received: center={center!r}")
        if not 0 <= center < num_nodes:
            raise ValueError(
                f"center must be a node index in [0, {num_nodes}) (num_nodes={num_nodes}). "
                f"Received: center={center}"
            )
        species = self.species_id
        if isinstance(species, np.ndarray) and species.size == 1:
            species = species.reshape(())[()]
        if isinstance(species, bool) or not isinstance(species, int | np.integer):
            raise ValueError(f"species_id must be an integer. Received: {species!r}")
        object.__setattr__(self, "num_nodes", num_nodes)
        object.__setattr__(self, "edges", edges)
        object.__setattr__(self, "edge_features", features)
        object.__setattr__(self, "center", int(center))
        object.__setattr__(self, "pt_labels", _as_labels("pt_labels", self.pt_labels))
        object.__setattr__(self, "ft_labels", _as_labels("ft_labels", self.ft_labels))
        object.__setattr__(self, "species_id", int(species))

    @property
    def num_edges(self) -> int:
        """Number of stored (directed) edges, twice the number of interactions."""
        return int(self.edges.shape[0])

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, EgoGraph):
            return NotImplemented
        return (
            self.num_nodes == other.num_nodes
            and self.center == other.center
            and self.species_id == other.species_id
            and np.array_equal(self.edges, other.edges)
            and np.array_equal(self.edge_features, other.edge_features)
            and np.array_equal(self.pt_labels, other.pt_labels)
            and np.array_equal(self.ft_labels, other.ft_labels)
        )

    __hash__ = None  # mutable numpy fields: not hashable


def _as_float32(name: str, values: np.ndarray) -> np.ndarray:
    values = np.asarray(values)
    if values.size and not (
        np.issubdtype(values.dtype, np.floating)
        or np.issubdtype(values.dtype, np.integer)
        or values.dtype == bool
    ):
        raise ValueError(f"{name} must be numbers. Received: dtype={values.dtype}")
    values = values.astype(np.float32, copy=False)
    if values.size and not np.isfinite(values).all():
        raise ValueError(f"{name} must be finite. Received: a NaN or infinite value")
    return values


def _as_labels(name: str, values: np.ndarray) -> np.ndarray:
    values = np.asarray(values)
    if values.ndim != 1:
        raise ValueError(
            f"{name} must be a 1-D array [num_tasks]. Received: shape={list(values.shape)}"
        )
    values = _as_float32(name, values)
    if values.size and (values.min() < 0.0 or values.max() > 1.0):
        raise ValueError(
            f"{name} must be in [0, 1]. Received: values in [{values.min()}, {values.max()}]"
        )
    return values


# --- GraphTensor and tf.Example ----------------------------------------------------------------


def to_graph_tensor(graph: EgoGraph) -> tfgnn.GraphTensor:
    """A scalar GraphTensor with one component holding `graph`, in the layout."""
    is_center = np.zeros(graph.num_nodes, np.float32)
    is_center[graph.center] = 1.0
    return tfgnn.GraphTensor.from_pieces(
        context=tfgnn.Context.from_fields(
            features={
                PT_LABELS: tf.constant(graph.pt_labels[None]),
                FT_LABELS: tf.constant(graph.ft_labels[None]),
                SPECIES: tf.constant([graph.species_id], tf.int64),
            }
        ),
        node_sets={
            NODE_SET: tfgnn.NodeSet.from_fields(
                sizes=tf.constant([graph.num_nodes], tf.int64),
                features={CENTER_FEATURE: tf.constant(is_center)},
            )
        },
        edge_sets={
            EDGE_SET: tfgnn.EdgeSet.from_fields(
                sizes=tf.constant([graph.num_edges], tf.int64),
                adjacency=tfgnn.Adjacency.from_indices(
                    (NODE_SET, tf.constant(graph.edges[:, 0])),
                    (NODE_SET, tf.constant(graph.edges[:, 1])),
                ),
                features={EDGE_FEATURE: tf.constant(graph.edge_features)},
            )
        },
    )


def to_example(graph: EgoGraph) -> tf.train.Example:
    """The tf.train.Example of `graph`: equal to `tfgnn.write_example(to_graph_tensor(graph))`.

    Built directly from the arrays, which is about a hundred times faster than
    going through a GraphTensor.
    """
    example = tf.train.Example()
    feature = example.features.feature
    is_center = np.zeros(graph.num_nodes, np.float32)
    is_center[graph.center] = 1.0
    feature[_CENTER_KEY].float_list.value.extend(is_center)
    feature[_NODE_SIZE_KEY].int64_list.value.append(graph.num_nodes)
    feature[_EDGE_FEATURE_KEY].float_list.value.extend(graph.edge_features.reshape(-1))
    feature[_TARGET_KEY].int64_list.value.extend(graph.edges[:, 1])
    feature[_SOURCE_KEY].int64_list.value.extend(graph.edges[:, 0])
    feature[_EDGE_SIZE_KEY].int64_list.value.append(graph.num_edges)
    feature[_SPECIES_KEY].int64_list.value.append(graph.species_id)
    feature[_PT_KEY].float_list.value.extend(graph.pt_labels)
    feature[_FT_KEY].float_list.value.extend(graph.ft_labels)
    return example


def from_example(example: tf.train.Example, schema: tfgnn.GraphSchema) -> EgoGraph:
    """The EgoGraph of a tf.train.Example in the layout (inverse of `to_example`).

    Raises:
      ValueError: if the example does not match `schema` (see `load_dataset`).
    """
    problem = _example_problem(example, schema)
    if problem:
        raise ValueError(f"the tf.train.Example does not match the schema: {problem}")
    return _unchecked_from_example(example)


def _unchecked_from_example(example: tf.train.Example) -> EgoGraph:
    feature = example.features.feature
    num_nodes = feature[_NODE_SIZE_KEY].int64_list.value[0]
    is_center = np.asarray(feature[_CENTER_KEY].float_list.value, np.float32)
    centers = np.flatnonzero(is_center == 1.0)
    if centers.size != 1 or np.count_nonzero(is_center) != 1:
        raise ValueError(
            f"feature {_CENTER_KEY!r} must be 1.0 on exactly one node and 0.0 elsewhere. "
            f"Received: {np.count_nonzero(is_center)} non-zero values"
        )
    sources = np.asarray(feature[_SOURCE_KEY].int64_list.value, np.int64)
    targets = np.asarray(feature[_TARGET_KEY].int64_list.value, np.int64)
    edge_features = np.asarray(feature[_EDGE_FEATURE_KEY].float_list.value, np.float32)
    return EgoGraph(
        num_nodes=int(num_nodes),
        edges=np.stack([sources, targets], axis=1),
        edge_features=edge_features.reshape(-1, EDGE_FEATURE_DIM),
        center=int(centers[0]),
        pt_labels=np.asarray(feature[_PT_KEY].float_list.value, np.float32),
        ft_labels=np.asarray(feature[_FT_KEY].float_list.value, np.float32),
        species_id=int(feature[_SPECIES_KEY].int64_list.value[0]),
    )


def _example_problem(example: tf.train.Example, schema: tfgnn.GraphSchema) -> str | None:
    """What is wrong with `example` for `schema` (None if nothing), for error messages.

    Checks that every feature of the schema is present, has the right kind of
    list, and has as many values as its shape and its node or edge count say.
    """
    feature = example.features.feature

    def values(key: str, kind: str):
        if key not in feature:
            raise _Mismatch(f"feature {key!r} is missing (features present: {sorted(feature)})")
        which = feature[key].WhichOneof("kind")
        if which not in (kind, None):
            raise _Mismatch(f"feature {key!r} is a {which}, expected a {kind}")
        return getattr(feature[key], kind).value

    def size(key: str) -> int:
        sizes = values(key, "int64_list")
        if len(sizes) != 1 or sizes[0] < 0:
            raise _Mismatch(
                f"feature {key!r} must hold one non-negative count (one graph per record). "
                f"Received: {list(sizes)}"
            )
        return int(sizes[0])

    def check(key: str, spec, count: int | None, what: str) -> None:
        kind = _list_kind(spec.dtype)
        dims = [d.size for d in spec.shape.dim]
        per_item = math.prod(dims)
        got = len(values(key, kind))
        expected = per_item if count is None else count * per_item
        if got != expected:
            shape = dims if count is None else [count, *dims]
            raise _Mismatch(
                f"feature {key!r} has {got} values, expected {expected} for shape {shape} ({what})"
            )

    try:
        for name, spec in schema.context.features.items():
            check(f"context/{name}", spec, None, "per graph")
        for set_name, node_set in schema.node_sets.items():
            count = size(f"nodes/{set_name}.#size")
            for name, spec in node_set.features.items():
                check(f"nodes/{set_name}.{name}", spec, count, f"{count} nodes")
        for set_name, edge_set in schema.edge_sets.items():
            prefix = f"edges/{set_name}."
            count = size(prefix + "#size")
            for index_key in ("#source", "#target"):
                got = len(values(prefix + index_key, "int64_list"))
                if got != count:
                    raise _Mismatch(
                        f"feature {prefix + index_key!r} has {got} values, expected {count} "
                        f"(the edge count)"
                    )
            for name, spec in edge_set.features.items():
                check(prefix + name, spec, count, f"{count} edges")
    except _Mismatch as e:
        return str(e)
    return None


class _Mismatch(Exception):
    pass


def _first_line(error: Exception) -> str:
    text = (getattr(error, "message", None) or str(error)).strip()
    return text.splitlines()[0] if text else type(error).__name__


def _list_kind(dtype_enum: int) -> str:
    dtype = tf.as_dtype(dtype_enum)
    if dtype.is_floating:
        return "float_list"
    if dtype.is_integer or dtype.is_bool:
        return "int64_list"
    return "bytes_list"


# --- Writing -----------------------------------------------------------------------------------


def write_tfrecord(
    path: str | os.PathLike, graphs: Iterable[EgoGraph], schema: tfgnn.GraphSchema
) -> int:
    """Writes ego-graphs as tf.Example-encoded GraphTensors to one TFRecord file.

    The file is written under a temporary name in the same directory and
    renamed when complete, so `path` never holds a partial file. A path ending
    in ".gz" gets a GZIP-compressed file. Parent directories are created.

    Args:
      path: the output file.
      graphs: the ego-graphs (any iterable; it is consumed once).
      schema: the schema they must match (label widths are checked per graph).

    Returns:
      The number of graphs written.
    """
    path = os.fspath(path)
    num_pt, num_ft = num_tasks(schema)
    count = 0

    def write(tmp: str) -> None:
        nonlocal count
        with tf.io.TFRecordWriter(tmp, options=_compression(path)) as writer:
            for graph in graphs:
                if not isinstance(graph, EgoGraph):
                    raise ValueError(
                        f"graphs must be EgoGraph objects. Received: graph {count} is a "
                        f"{type(graph).__name__}"
                    )
                for name, got, want in (
                    ("pt_labels", graph.pt_labels.shape[0], num_pt),
                    ("ft_labels", graph.ft_labels.shape[0], num_ft),
                ):
                    if got != want:
                        raise ValueError(
                            f"graph {count} does not match the schema: {name} has {got} "
                            f"values, the schema has {want} tasks"
                        )
                writer.write(to_example(graph).SerializeToString())
                count += 1

    _atomic_write(path, write)
    return count


def _atomic_write(path: str, write) -> None:
    directory = os.path.dirname(path)
    if directory:
        tf.io.gfile.makedirs(directory)
    tmp = f"{path}.tmp-{uuid.uuid4().hex}"
    try:
        write(tmp)
        tf.io.gfile.rename(tmp, path, overwrite=True)
    finally:
        if tf.io.gfile.exists(tmp):
            tf.io.gfile.remove(tmp)


def _compression(path: str) -> str:
    return "GZIP" if path.endswith(".gz") else ""


# --- Reading -----------------------------------------------------------------------------------


def match_files(file_pattern: str | os.PathLike | Sequence[str | os.PathLike]) -> list[str]:
    """The sorted files matching a glob pattern (or each of a list of patterns).

    Raises:
      FileNotFoundError: if a pattern matches no file.
    """
    patterns = (
        [os.fspath(file_pattern)]
        if isinstance(file_pattern, str | os.PathLike)
        else [os.fspath(p) for p in file_pattern]
    )
    if not patterns:
        raise FileNotFoundError("No file pattern given. Received: an empty list")
    files: list[str] = []
    for pattern in patterns:
        matched = sorted(f for f in tf.io.gfile.glob(pattern) if not tf.io.gfile.isdir(f))
        if not matched:
            raise FileNotFoundError(f"No file matches the pattern {pattern!r}")
        files.extend(f for f in matched if f not in files)
    return files


def _record_dataset(files: Sequence[str]) -> tf.data.Dataset:
    """The serialized records of `files`, in order; compression by each file's suffix."""
    kinds = {_compression(f) for f in files}
    if len(kinds) == 1:
        return tf.data.TFRecordDataset(list(files), compression_type=kinds.pop())
    dataset = None
    for f in files:
        part = tf.data.TFRecordDataset([f], compression_type=_compression(f))
        dataset = part if dataset is None else dataset.concatenate(part)
    return dataset


def _check_first_records(files: Sequence[str], schema: tfgnn.GraphSchema) -> int:
    """Checks the first record of every file against `schema`; returns how many files have one.

    Raises:
      ValueError: naming the file, the feature and the expected and received sizes.
    """
    non_empty = 0
    for f in files:
        try:
            first = next(iter(_record_dataset([f]).take(1)), None)
        except tf.errors.OpError as e:
            raise ValueError(f"{f}: not a readable TFRecord file: {e.message}") from e
        if first is None:
            continue
        non_empty += 1
        problem = _record_problem(first.numpy(), schema)
        if problem:
            raise ValueError(f"{f}: record 0 does not match the graph schema: {problem}")
    return non_empty


def _record_problem(record: bytes, schema: tfgnn.GraphSchema) -> str | None:
    try:
        example = tf.train.Example.FromString(record)
    except Exception as e:  # protobuf's DecodeError
        return f"it is not a serialized tf.train.Example ({type(e).__name__}: {e})"
    return _example_problem(example, schema)


def _iter_records(files: Sequence[str]) -> Iterator[tuple[str, int, bytes]]:
    """(file, index in file, serialized record) for every record of `files`."""
    for f in files:
        try:
            for i, record in enumerate(_record_dataset([f]).as_numpy_iterator()):
                yield f, i, record
        except tf.errors.OpError as e:
            raise ValueError(f"{f}: not a readable TFRecord file: {e.message}") from e


def check_records(
    file_pattern: str | os.PathLike | Sequence[str | os.PathLike], schema: tfgnn.GraphSchema
) -> int:
    """Checks every record of the matching files against `schema`; returns how many there are.

    `load_dataset` checks the first record of each file only, so that opening a
    large dataset is cheap; a bad record further on would then fail in the middle
    of training with a parser error that names neither file nor record. This reads
    every record once with TensorFlow's parser, in batches, and if one does not
    parse, names it.

    Raises:
      FileNotFoundError: if no file matches the pattern.
      ValueError: naming the file, the record's position in it and what is wrong.
    """
    files = match_files(file_pattern)
    num_tasks(schema)
    spec = tfgnn.create_graph_spec_from_schema_pb(schema)

    def parsed_batch(i: tf.Tensor, serialized: tf.Tensor) -> tf.Tensor:
        graph = tfgnn.parse_example(spec, serialized)
        # Depend on the parse, so that it is not pruned away.
        return i + 0 * tf.cast(tf.reduce_sum(graph.node_sets[NODE_SET].sizes), tf.int64)

    total = 0
    for f in files:
        batches = _record_dataset([f]).batch(_CHECK_BATCH).enumerate()
        try:
            good = list(batches.map(parsed_batch).ignore_errors().as_numpy_iterator())
            count = int(_record_dataset([f]).reduce(np.int64(0), lambda n, _: n + 1))
        except tf.errors.OpError as e:
            raise ValueError(f"{f}: not a readable TFRecord file: {e.message}") from e
        num_batches = -(-count // _CHECK_BATCH)
        if len(good) != num_batches:
            first_bad = min(set(range(num_batches)) - {int(i) for i in good})
            start = first_bad * _CHECK_BATCH
            batch = _record_dataset([f]).skip(start).take(_CHECK_BATCH)
            for j, record in enumerate(batch.as_numpy_iterator()):
                problem = _record_problem(record, schema)
                if problem is None:
                    try:  # what _record_problem does not check, the parser does
                        tfgnn.parse_single_example(spec, tf.constant(record))
                    except (tf.errors.OpError, ValueError) as e:
                        problem = f"TensorFlow's parser rejects it: {_first_line(e)}"
                if problem:
                    raise ValueError(
                        f"{f}: record {start + j} (0-based) does not match the graph "
                        f"schema: {problem}"
                    )
        total += count
    return total


def count_graphs(file_pattern: str | os.PathLike | Sequence[str | os.PathLike]) -> int:
    """Number of records (ego-graphs) in the files matching `file_pattern`."""
    files = match_files(file_pattern)
    total = 0
    for f in files:
        try:
            total += int(_record_dataset([f]).reduce(np.int64(0), lambda n, _: n + 1))
        except tf.errors.OpError as e:
            raise ValueError(f"{f}: not a readable TFRecord file: {e.message}") from e
    return total


def load_graphs(
    file_pattern: str | os.PathLike | Sequence[str | os.PathLike], schema: tfgnn.GraphSchema
) -> list[EgoGraph]:
    """All ego-graphs of the matching files, in file order (files sorted by name).

    Every record is checked against `schema`; errors name the file and record.
    Meant for small files (tests, inspection, baselines): it holds every graph
    in memory as numpy arrays.
    """
    files = match_files(file_pattern)
    num_tasks(schema)
    graphs = []
    for f, i, record in _iter_records(files):
        problem = _record_problem(record, schema)
        if problem:
            raise ValueError(f"{f}: record {i} does not match the graph schema: {problem}")
        try:
            graphs.append(_unchecked_from_example(tf.train.Example.FromString(record)))
        except ValueError as e:
            raise ValueError(f"{f}: record {i} is not a valid ego-graph: {e}") from e
    return graphs


def read_labels(
    file_pattern: str | os.PathLike | Sequence[str | os.PathLike], schema: tfgnn.GraphSchema
) -> dict[str, np.ndarray]:
    """The labels and species of every graph in the matching files, as numpy arrays.

    Returns:
      {PT_LABELS: float32 [N, num_pt_tasks], FT_LABELS: float32 [N, num_ft_tasks],
      SPECIES: int64 [N]}, rows in the order `load_dataset` reads the graphs
      without shuffling.
    """
    files = match_files(file_pattern)
    num_pt, num_ft = num_tasks(schema)
    _check_first_records(files, schema)
    features = {
        _PT_KEY: tf.io.FixedLenFeature([num_pt], tf.float32),
        _FT_KEY: tf.io.FixedLenFeature([num_ft], tf.float32),
        _SPECIES_KEY: tf.io.FixedLenFeature([], tf.int64),
    }
    parts: dict[str, list[np.ndarray]] = {PT_LABELS: [], FT_LABELS: [], SPECIES: []}
    for f in files:
        dataset = (
            _record_dataset([f])
            .batch(_LABEL_READ_BATCH)
            .map(lambda records: tf.io.parse_example(records, features))
        )
        try:
            for batch in dataset.as_numpy_iterator():
                parts[PT_LABELS].append(batch[_PT_KEY])
                parts[FT_LABELS].append(batch[_FT_KEY])
                parts[SPECIES].append(batch[_SPECIES_KEY])
        except tf.errors.OpError as e:
            raise ValueError(f"{f}: could not read the labels: {e.message}") from e
    empty = {
        PT_LABELS: np.zeros((0, num_pt), np.float32),
        FT_LABELS: np.zeros((0, num_ft), np.float32),
        SPECIES: np.zeros((0,), np.int64),
    }
    return {k: np.concatenate(v) if v else empty[k] for k, v in parts.items()}


def load_dataset(
    file_pattern: str | os.PathLike | Sequence[str | os.PathLike],
    schema: tfgnn.GraphSchema,
    *,
    batch_size: int,
    shuffle: bool = False,
    seed: int = 0,
    repeat: bool = False,
    drop_remainder: bool = False,
    indices: np.ndarray | Sequence[int] | None = None,
    shuffle_buffer_size: int = _DEFAULT_SHUFFLE_BUFFER,
) -> tf.data.Dataset:
    """Batches of ego-graphs from TFRecord files, for training and evaluation.

    Each element is a dict:

    - "graph": a scalar GraphTensor with one component per ego-graph of the
      batch (`tfgnn.parse_example` of the batch, then
      `merge_batch_to_components()`); its context keeps only `SPECIES` (the
      labels are taken out so that a model cannot read them);
    - `PT_LABELS`: float32 [B, num_pt_tasks]; `FT_LABELS`: float32 [B, num_ft_tasks].

    The element spec is the same for every batch (the batch size, node and edge
    counts are None in it; the batch size is static with `drop_remainder`), so
    a `tf.function` with `input_signature=[dataset.element_spec]` traces once
    for all batches (without a signature, tf.function sees each batch's own
    shapes and may retrace).

    Records are read from the files in sorted file order. With `shuffle`,
    they pass through a shuffle buffer of `shuffle_buffer_size` records
    (reshuffled every epoch) seeded with `seed`: the first iterator's order
    depends only on `seed` and, if one is set, TensorFlow's global seed. A
    later iterator of the same dataset starts with another order (a seeded
    reshuffle moves on per iterator), so call this again for each run that
    must see the same batches. With `repeat`, the
    epochs follow one another without end (a batch may straddle two). The
    iterator can be saved and restored with `tf.train.Checkpoint(iterator=it)`
    and then resumes with the same batches; its checkpoint holds the records in
    the shuffle buffer, so keep the buffer small when records are large.

    Args:
      file_pattern: glob pattern of the TFRecord files (or a list of patterns).
      schema: the graph schema, from `graph_schema` or `read_schema`.
      batch_size: graphs per batch, at least 1.
      shuffle: shuffle the records; else keep the file order.
      seed: the shuffle's seed.
      repeat: repeat forever; else one pass.
      drop_remainder: drop the last batch if it is smaller than batch_size.
      indices: optional positions of the records to keep (positions in the
        sorted files' concatenated records, e.g. from `split_graph_indices`);
        None keeps all.
      shuffle_buffer_size: records in the shuffle buffer, at least 1.

    Raises:
      FileNotFoundError: if no file matches the pattern.
      ValueError: if a file is not a TFRecord file or its first record does not
        match the schema (naming the file, the feature and the sizes), if all
        files are empty, or if an index is out of range.
    """
    files = match_files(file_pattern)
    num_tasks(schema)
    batch_size = _as_count("batch_size", batch_size, minimum=1)
    shuffle_buffer_size = _as_count("shuffle_buffer_size", shuffle_buffer_size, minimum=1)
    if _check_first_records(files, schema) == 0:
        raise ValueError(f"The files matching {file_pattern!r} hold no records: {files}")
    spec = tfgnn.create_graph_spec_from_schema_pb(schema)
    records = _record_dataset(files)
    if indices is not None:
        records = _select(records, indices, count_graphs(files), file_pattern)
    if shuffle:
        records = records.shuffle(
            shuffle_buffer_size, seed=int(seed), reshuffle_each_iteration=True
        )
    if repeat:
        records = records.repeat()

    def parse(serialized: tf.Tensor) -> dict[str, object]:
        graph = tfgnn.parse_example(spec, serialized).merge_batch_to_components()
        # Parsing a batch gives int32 row splits; the schema's spec (and
        # GraphTensorSpec.relax(), which models use) has int64 ones.
        graph = graph.with_row_splits_dtype(spec.row_splits_dtype)
        labels = {PT_LABELS: graph.context[PT_LABELS], FT_LABELS: graph.context[FT_LABELS]}
        graph = graph.replace_features(context={SPECIES: graph.context[SPECIES]})
        return {"graph": graph, **labels}

    return (
        records.batch(batch_size, drop_remainder=drop_remainder)
        .map(parse, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
        .prefetch(tf.data.AUTOTUNE)
    )


def _select(records: tf.data.Dataset, indices, num_records: int, file_pattern) -> tf.data.Dataset:
    indices = np.asarray(indices)
    if indices.ndim != 1 or (indices.size and not np.issubdtype(indices.dtype, np.integer)):
        raise ValueError(
            "indices must be a 1-D array of integers. "
            f"Received: shape={list(indices.shape)}, dtype={indices.dtype}"
        )
    if indices.size and (indices.min() < 0 or indices.max() >= num_records):
        raise ValueError(
            f"indices must be in [0, {num_records}) (the files matching {file_pattern!r} hold "
            f"{num_records} records). Received: indices in [{indices.min()}, {indices.max()}]"
        )
    keep = np.zeros(num_records, bool)
    keep[indices] = True
    keep_tensor = tf.constant(keep)
    return (
        records.enumerate()
        .filter(lambda i, _: tf.gather(keep_tensor, i))
        .map(lambda _, record: record)
    )


# --- Splits ------------------------------------------------------------------------------------


def split_graph_indices(
    num_graphs: int, fractions: Mapping[str, float], seed: int
) -> dict[str, np.ndarray]:
    """Disjoint random subsets of range(num_graphs), one per named fraction.

    Split k gets floor(fraction_k * num_graphs) indices; when the fractions add
    up to 1, the indices left over by rounding go one each to the splits with
    the largest remainders, so that every index is used.

    Args:
      num_graphs: how many graphs there are.
      fractions: split name -> fraction in [0, 1], adding up to at most 1, e.g.
        {"train": 0.85, "val": 0.15}.
      seed: the split depends on this seed only.

    Returns:
      name -> sorted int64 array of indices, in the order of `fractions`.
    """
    num_graphs = _as_count("num_graphs", num_graphs)
    for name, fraction in fractions.items():
        if isinstance(fraction, bool) or not isinstance(fraction, int | float | np.number):
            raise ValueError(f"fractions must be numbers. Received: {name!r}: {fraction!r}")
        if not 0.0 <= fraction <= 1.0:
            raise ValueError(f"fractions must be in [0, 1]. Received: {name!r}: {fraction!r}")
    total = float(sum(fractions.values()))
    if total > 1.0 + 1e-9:
        raise ValueError(f"fractions must add up to at most 1. Received: {dict(fractions)}")
    exact = {name: float(f) * num_graphs for name, f in fractions.items()}
    sizes = {name: math.floor(x + 1e-9) for name, x in exact.items()}
    if abs(total - 1.0) <= 1e-9:
        left = num_graphs - sum(sizes.values())
        by_remainder = sorted(exact, key=lambda name: sizes[name] - exact[name])
        for name in by_remainder[:left]:
            sizes[name] += 1
    order = np.random.default_rng(seed).permutation(num_graphs)
    out: dict[str, np.ndarray] = {}
    start = 0
    for name, size in sizes.items():
        out[name] = np.sort(order[start : start + size]).astype(np.int64)
        start += size
    return out


def _as_count(name: str, value: object, minimum: int = 0) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}. Received: {name}={value!r}")
    return int(value)
