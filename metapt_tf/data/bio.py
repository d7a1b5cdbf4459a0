"""The pretrain-gnns "bio" dataset (supervised), converted to the ego-graph TFRecord layout.

Source: the processed file of the supervised protein ego-network dataset of
Hu et al., "Strategies for Pre-training Graph Neural Networks" (ICLR 2020),
dataset/supervised/processed/geometric_data_processed.pt, as used by Raghu et
al., "Meta-learning to improve pre-training" (NeurIPS 2021). It is a PyTorch
Geometric `InMemoryDataset` saved as `torch.save((data, slices), path)`:
`data` holds every graph's fields concatenated and `slices[field]` the
offsets of each graph in them (field -> int64 [num_graphs + 1]). Per graph:

- edge_index: int64 [2, E] (source row, target row), node indices local to
  the graph, both directions of each interaction stored;
- edge_attr: float [E, 9]: 7 evidence channels (0/1), a self-loop flag and a
  mask flag (both 0 in stored edges);
- x: float [N, 1] of ones (only its length, the node count, is used);
- center_node_idx: int64 [1], the centre protein (local index);
- species_id: int64 [1], the NCBI taxonomy id of the species;
- go_target_pretrain: int64 [5000] and go_target_downstream: int64 [40],
  the centre protein's GO labels (1 = positive, 0 = negative or unknown).

Split (the reference's species split): graphs of the species in
`TRAIN_SPECIES` are the FT training graphs, and also PT graphs; the graphs of
`TEST_SPECIES` (human) are shuffled with the seed and cut in two halves:
the first half joins PT (its PT labels are used, as in the reference), the
second is the test set. The shuffle is Python's `random.Random(seed).shuffle`
on the positions of the human graphs, with the same cut as the reference
code, so a given seed gives the same split as there (the reference's default
seed is 42). When the number of human graphs is odd, the last one in the
shuffled order is in neither half, as in the reference. To cut the FT
training graphs into train and validation as the reference does, use
`reference_random_split(count_graphs(ft_train), (0.85, 0.15), seed)`.

Output (names in FILE_NAMES): schema.pbtxt, pt.tfrecord, ft_train.tfrecord,
test.tfrecord in the layout of `metapt_tf.data.graphs` (every file holds
both label sets), and summary.json with the counts.

Reading the .pt file needs torch and torch_geometric, which are an optional
extra: pip install 'metapt_tf[bio]'. They are imported only when a file is
read. The file is unpickled (`torch.load(weights_only=False)`), which can run
code stored in it: only convert files from a source you trust.
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import warnings
from collections.abc import Iterator, Mapping, Sequence

import numpy as np

from metapt_tf.data import graphs as graphs_lib

TRAIN_SPECIES = (3702, 6239, 511145, 7227, 10090, 4932, 7955)
TEST_SPECIES = (9606,)  # human
REQUIRED_FIELDS = (
    "edge_index",
    "edge_attr",
    "center_node_idx",
    "species_id",
    "go_target_pretrain",
    "go_target_downstream",
)
FILE_NAMES = {
    "schema": "schema.pbtxt",
    "pt": "pt.tfrecord",
    "ft_train": "ft_train.tfrecord",
    "test": "test.tfrecord",
    "summary": "summary.json",
}
INSTALL_HINT = "pip install 'metapt_tf[bio]'"


@dataclasses.dataclass(frozen=True, eq=False)
class BioDataset:
    """The graphs of a processed bio file, as numpy arrays plus per-graph offsets.

    Attributes:
      path: the file read.
      arrays: field -> numpy array of all graphs' values, concatenated.
      slices: field -> int64 [num_graphs + 1] offsets along the concatenated axis.
      species: int64 [num_graphs] species id of each graph.
    """

    path: str
    arrays: Mapping[str, np.ndarray]
    slices: Mapping[str, np.ndarray]
    species: np.ndarray

    def __len__(self) -> int:
        return int(self.species.shape[0])

    @property
    def num_pt_tasks(self) -> int:
        return self._label_width("go_target_pretrain")

    @property
    def num_ft_tasks(self) -> int:
        return self._label_width("go_target_downstream")

    def _label_width(self, field: str) -> int:
        per_row = int(np.prod(self.arrays[field].shape[1:], dtype=np.int64))
        return int(self.slices[field][1] - self.slices[field][0]) * per_row

    def _part(self, field: str, index: int) -> np.ndarray:
        start, end = self.slices[field][index], self.slices[field][index + 1]
        if field == "edge_index":
            return self.arrays[field][:, start:end]
        return self.arrays[field][start:end]

    def graph(self, index: int) -> graphs_lib.EgoGraph:
        """Graph `index` as an EgoGraph (labels as float32)."""
        if not 0 <= index < len(self):
            raise IndexError(f"graph index must be in [0, {len(self)}). Received: {index}")
        edges = self._part("edge_index", index).T
        center = self._part("center_node_idx", index).reshape(-1)
        if "x" in self.arrays:
            num_nodes = int(self.slices["x"][index + 1] - self.slices["x"][index])
        else:  # no node features: the nodes are those the edges and the centre name
            num_nodes = int(max(edges.max(initial=-1), center.max(initial=-1)) + 1)
        try:
            return graphs_lib.EgoGraph(
                num_nodes=num_nodes,
                edges=edges,
                edge_features=self._part("edge_attr", index),
                center=int(center[0]) if center.size == 1 else center,
                pt_labels=self._part("go_target_pretrain", index).reshape(-1),
                ft_labels=self._part("go_target_downstream", index).reshape(-1),
                species_id=int(self.species[index]),
            )
        except ValueError as e:
            raise ValueError(f"{self.path}: graph {index} is not a valid ego-graph: {e}") from e


def read_processed(path: str | os.PathLike) -> BioDataset:
    """Reads a processed bio file (torch.save((data, slices)) of an InMemoryDataset).

    Accepts the file as PyTorch Geometric 1.x wrote it (the reference's) and as
    2.x writes it (a Data object, or `data.to_dict()` with the Data class as a
    third element).

    Raises:
      ImportError: if torch or torch_geometric is missing, saying how to install them.
      FileNotFoundError: if there is no file at `path`.
      ValueError: if the file does not hold the fields of the bio dataset, or
        their shapes do not fit together.
    """
    path = os.fspath(path)
    torch = _import_torch()
    if not os.path.isfile(path):
        raise FileNotFoundError(f"No processed bio dataset file at {path!r}")
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:
        raise ValueError(f"{path}: torch.load could not read it: {type(e).__name__}: {e}") from e
    if not isinstance(loaded, tuple | list) or len(loaded) not in (2, 3):
        raise ValueError(
            f"{path}: expected torch.save((data, slices)) of an InMemoryDataset. "
            f"Received: a {type(loaded).__name__}"
        )
    data, slices = loaded[0], loaded[1]
    fields = _data_fields(data)
    if not isinstance(slices, Mapping):
        raise ValueError(f"{path}: slices must be a dict. Received: {type(slices).__name__}")
    missing = [f for f in REQUIRED_FIELDS if f not in fields or f not in slices]
    if missing:
        raise ValueError(
            f"{path}: not the supervised bio dataset: fields {missing} are missing. "
            f"Fields present: {sorted(fields)}"
        )
    used = [*REQUIRED_FIELDS, *(["x"] if "x" in fields and "x" in slices else [])]
    arrays = {f: _to_numpy(fields[f]) for f in used}
    offsets = {f: _to_numpy(slices[f]).astype(np.int64).reshape(-1) for f in used}
    num_graphs = offsets["species_id"].shape[0] - 1
    for f in used:
        if offsets[f].shape[0] != num_graphs + 1:
            raise ValueError(
                f"{path}: slices[{f!r}] has {offsets[f].shape[0]} offsets, expected "
                f"{num_graphs + 1} (one more than the {num_graphs} graphs)"
            )
        axis_length = arrays[f].shape[1 if f == "edge_index" else 0]
        if offsets[f][0] != 0 or offsets[f][-1] != axis_length or (np.diff(offsets[f]) < 0).any():
            raise ValueError(
                f"{path}: slices[{f!r}] must rise from 0 to {axis_length}, the length of "
                f"{f!r}. Received: from {offsets[f][0]} to {offsets[f][-1]}"
            )
    if arrays["edge_index"].ndim != 2 or arrays["edge_index"].shape[0] != 2:
        raise ValueError(
            f"{path}: edge_index must have shape [2, num_edges]. "
            f"Received: {list(arrays['edge_index'].shape)}"
        )
    if arrays["edge_attr"].ndim != 2 or arrays["edge_attr"].shape[1] != graphs_lib.EDGE_FEATURE_DIM:
        raise ValueError(
            f"{path}: edge_attr must have shape [num_edges, {graphs_lib.EDGE_FEATURE_DIM}]. "
            f"Received: {list(arrays['edge_attr'].shape)}"
        )
    for f in ("center_node_idx", "species_id"):
        if (np.diff(offsets[f]) != 1).any():
            raise ValueError(f"{path}: every graph must have exactly one {f}")
    for f in ("go_target_pretrain", "go_target_downstream"):
        widths = np.diff(offsets[f])
        if widths.size and (widths != widths[0]).any():
            raise ValueError(
                f"{path}: every graph must have the same number of {f} labels. "
                f"Received: between {widths.min()} and {widths.max()} rows"
            )
    species = arrays["species_id"].reshape(-1).astype(np.int64)
    return BioDataset(path=path, arrays=arrays, slices=offsets, species=species)


def _import_torch():
    try:
        import torch

        with warnings.catch_warnings():  # its import calls the deprecated torch.jit.script
            warnings.filterwarnings(
                "ignore", "`torch.jit.script` is deprecated", DeprecationWarning
            )
            import torch_geometric  # noqa: F401  (unpickling the file needs its Data class)
    except ImportError as e:
        raise ImportError(
            f"Reading the bio dataset needs torch and torch_geometric ({e}). "
            f"Install them with: {INSTALL_HINT}"
        ) from e
    return torch


def _data_fields(data: object) -> dict[str, object]:
    """field -> tensor of a collated Data object (PyG 1.x or 2.x) or of its dict form."""
    if isinstance(data, Mapping):
        return {k: v for k, v in data.items() if v is not None}
    state = getattr(data, "__dict__", {})
    store = state.get("_store")
    if store is not None:  # PyG 2.x Data: attributes live in a storage mapping
        return {k: v for k, v in dict(store).items() if v is not None}
    # PyG 1.x Data unpickled by 2.x: the attributes are plain instance attributes.
    return {k: v for k, v in state.items() if not k.startswith("_") and v is not None}


def _to_numpy(value: object) -> np.ndarray:
    if hasattr(value, "detach"):
        return value.detach().cpu().numpy()
    return np.asarray(value)


def reference_random_split(
    num_items: int, fractions: Sequence[float], seed: int
) -> list[np.ndarray]:
    """The reference code's random split of range(num_items), reproduced exactly.

    Shuffles the positions with `random.Random(seed).shuffle` and cuts them as
    the reference does: the first int(f0 * n) positions, then the next
    int(f1 * n), then (with three fractions) the rest. Positions beyond the
    cuts of two fractions are in no part.

    Args:
      num_items: number of items.
      fractions: two or three fractions, e.g. (0.5, 0.5) or (0.8, 0.1, 0.1).
      seed: Python `random` seed.

    Returns:
      One sorted int64 index array per fraction.
    """
    if len(fractions) not in (2, 3) or any(not 0.0 <= f <= 1.0 for f in fractions):
        raise ValueError(
            f"fractions must be two or three fractions in [0, 1]. Received: {tuple(fractions)}"
        )
    order = list(range(int(num_items)))
    random.Random(seed).shuffle(order)
    first = int(fractions[0] * num_items)
    second = int(fractions[1] * num_items) + first
    parts = [order[:first], order[first:second]]
    if len(fractions) == 3:
        parts.append(order[second:])
    return [np.sort(np.asarray(p, dtype=np.int64)) for p in parts]


def species_split(species: np.ndarray, seed: int) -> dict[str, np.ndarray]:
    """Graph indices of the pt, ft_train and test sets (see the module docstring).

    Returns:
      {"pt", "ft_train", "test", "test_species_pt", "left_out"}: sorted int64
      indices; "test_species_pt" are the human graphs that joined pt and
      "left_out" the human graph left out when their number is odd.

    Raises:
      ValueError: if a graph's species is in neither species list.
    """
    species = np.asarray(species).reshape(-1)
    known = np.isin(species, TRAIN_SPECIES + TEST_SPECIES)
    if not known.all():
        unknown, counts = np.unique(species[~known], return_counts=True)
        raise ValueError(
            f"every graph's species must be in TRAIN_SPECIES {TRAIN_SPECIES} or TEST_SPECIES "
            f"{TEST_SPECIES}. Received other species (id: graphs): "
            f"{dict(zip(unknown.tolist(), counts.tolist(), strict=True))}"
        )
    train = np.flatnonzero(np.isin(species, TRAIN_SPECIES)).astype(np.int64)
    test_species = np.flatnonzero(np.isin(species, TEST_SPECIES)).astype(np.int64)
    joins_pt, held_out = reference_random_split(test_species.size, (0.5, 0.5), seed)
    used = np.zeros(test_species.size, bool)
    used[joins_pt] = used[held_out] = True
    return {
        "pt": np.sort(np.concatenate([train, test_species[joins_pt]])),
        "ft_train": train,
        "test": test_species[held_out],
        "test_species_pt": test_species[joins_pt],
        "left_out": test_species[~used],
    }


def convert_bio(
    input_path: str | os.PathLike,
    output_dir: str | os.PathLike,
    seed: int = 0,
    compress: bool = False,
) -> dict:
    """Converts a processed bio file to schema.pbtxt + TFRecord files + summary.json.

    Args:
      input_path: the processed file (geometric_data_processed.pt).
      output_dir: where to write (created if needed; existing files are replaced).
      seed: seed of the human graphs' split (the reference's default is 42).
      compress: write GZIP-compressed "*.tfrecord.gz" files instead.

    Returns:
      The summary written to summary.json: counts per split and species, task
      counts, the seed, the source and the file names.
    """
    dataset = read_processed(input_path)
    splits = species_split(dataset.species, seed)
    output_dir = os.fspath(output_dir)
    schema = graphs_lib.graph_schema(dataset.num_pt_tasks, dataset.num_ft_tasks)
    files = dict(FILE_NAMES)
    if compress:
        files.update({k: v + ".gz" for k, v in files.items() if v.endswith(".tfrecord")})
    graphs_lib.write_schema(schema, os.path.join(output_dir, files["schema"]))
    for name in ("pt", "ft_train", "test"):
        graphs_lib.write_tfrecord(
            os.path.join(output_dir, files[name]), _graphs(dataset, splits[name]), schema
        )

    def species_counts(indices: np.ndarray) -> dict[str, int]:
        ids, counts = np.unique(dataset.species[indices], return_counts=True)
        return {str(i): int(c) for i, c in zip(ids.tolist(), counts.tolist(), strict=True)}

    summary = {
        "source": os.path.abspath(dataset.path),
        "seed": int(seed),
        "num_graphs": len(dataset),
        "num_pt_tasks": dataset.num_pt_tasks,
        "num_ft_tasks": dataset.num_ft_tasks,
        "train_species": list(TRAIN_SPECIES),
        "test_species": list(TEST_SPECIES),
        "counts": {name: int(indices.size) for name, indices in splits.items()},
        "species_counts": {
            name: species_counts(splits[name]) for name in ("pt", "ft_train", "test")
        },
        "files": files,
    }
    path = os.path.join(output_dir, files["summary"])
    with open(f"{path}.tmp", "w") as f:
        json.dump(summary, f, indent=1)
    os.replace(f"{path}.tmp", path)
    return summary


def _graphs(dataset: BioDataset, indices: np.ndarray) -> Iterator[graphs_lib.EgoGraph]:
    for i in indices:
        yield dataset.graph(int(i))
