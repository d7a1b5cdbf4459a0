"""A synthetic PPI-like ego-graph benchmark whose PT tasks are known to help, not matter, or hurt.

The real benchmark (pretrain-gnns "bio") pre-trains a GNN on thousands of GO
labels of protein ego-networks and fine-tunes it on 40 others. Which PT tasks
help is unknown there. This generator makes ego-graphs in the same layout
(`metapt_tf.data.graphs`) with the answer known, so that a method that learns
per-task PT weights can be checked against the truth.

Design
------
Every graph g has hidden factors z_g in [0, 1]^K (independent, uniform),
each realised in the graph so that a GIN with edge features can read it:

* `evidence_0` .. `evidence_6`: each edge carries evidence channel c
  (a 0/1 edge feature, channels 0..6 of the layout) with probability
  0.1 + 0.7 * z_c, independently, across the whole graph; an edge that draws
  no channel gets one, picked with probability proportional to those
  propensities. Read by summing edge embeddings (one message-passing layer).
* `centre_degree`: the centre is joined to d = round(d_lo + z (d_hi - d_lo))
  proteins, the "ring", with d_lo = round(0.1 max_nodes) (at least 1) and
  d_hi = round(0.45 (max_nodes - 1)) (3 and 13 for max_nodes = 30); the
  other proteins, the "periphery", are two hops out. Read from the centre
  node's state (sum aggregation counts its neighbours).
* `clustering`: each pair of ring proteins interacts with probability
  0.8 * z: triangles through the centre. A GIN whose nodes carry no input
  features cannot count triangles, but sees their effect on the degrees of
  the centre's neighbours (the centre's state after two layers).
* `periphery_density`: each pair of periphery proteins interacts with
  probability 0.05 + 0.55 * z: a dense community two hops out, which changes
  the degrees the mean pool sees. Periphery-ring pairs interact with a fixed
  probability 0.08, and every periphery protein is joined to one random ring
  protein, so every graph is connected.

The periphery's size is uniform in [max(1, min_nodes - 1 - d),
max_nodes - 1 - d], so the size n = 1 + d + periphery is in [min_nodes,
max_nodes] and, given d, independent of the factors. Node order is a random
permutation (the centre is anywhere); both directions of each interaction
are stored with the same features, and the self-loop and mask channels (7
and 8) are 0.

The factors are split into *FT factors* (default: `evidence_0`,
`evidence_1`, `centre_degree`, `clustering`) and *nuisance factors* (the
other six). A task is a noisy threshold of a sparse linear score:

    label = [sum_k w_k z_k > threshold], then flipped with prob. label_noise,

with 1 to 3 factors k (FT tasks: 2 to 3), weights w_k = +-U(0.5, 1), and the
threshold the (1 - r) quantile of the score under the factor distribution
for a positive rate r ~ U(0.1, 0.5). The kinds of task (the default design,
`relevant_tasks="ft_related"`, `harmful_tasks="nuisance_scores"`):

* FT tasks: scores over FT factors.
* "relevant" PT tasks (relevance +1): related terms of the FT tasks, as a
  GO term's parent or child is to it: each takes a random FT task's score,
  rescales every weight by U(0.75, 1.25) and draws its own positive rate.
  Learning one builds the features its FT task needs.
* "harmful" PT tasks (relevance -1): scores over nuisance factors only:
  learnable from the graph and useless for FT, and a model too narrow to hold
  every factor that learns them has fewer features left for the FT factors.
* "irrelevant" PT tasks (relevance 0): labels drawn at random per graph with a
  positive rate r ~ U(0.1, 0.5), independent of the graph. Only memorising
  individual graphs fits them; a small GIN cannot, and they neither help nor
  harm it. Their positive rates are distributed like the others', so the rate
  alone does not give them away.

The former design (`relevant_tasks="ft_factors"`, `harmful_tasks=
"random_labels"`) made each relevant task a score over its own random subset
of the FT factors, called the random-label tasks harmful and the nuisance
scores irrelevant. Measured with the benchmark's GIN, the random-label tasks
neither helped nor harmed and the nuisance scores harmed, so the default now
names each kind by what it does (README, "Multitask GNN pre-training").

The kinds are assigned to PT task positions in random order. Task
definitions depend only on the seed and the task counts (not on
num_graphs), thresholds being set on a fixed reference sample of factors.
Everything is drawn from `numpy.random.default_rng` streams spawned from the
seed, so the output is a function of the arguments alone.

`summary_statistics` computes per-graph statistics that estimate the factors
(channel frequencies, centre degree, neighbour and mean degrees, centre
clustering, periphery density); a linear model on them predicts the FT
tasks and the scored PT tasks well and the random-label ones at chance, also
when restricted to the statistics message passing can compute
(`MESSAGE_PASSING_SUMMARY_NAMES`), which is the benchmark's sanity check.

`write_synthetic_benchmark` writes schema.pbtxt, pt.tfrecord,
ft_train.tfrecord, test.tfrecord (the file set `metapt_tf.data.bio` writes for
the real data; by default the ft_train graphs are drawn from the pt graphs, as
there) and task_info.json with each task's ground truth ("kinds",
"relevance", per-task factors, weights, thresholds) and the generator's
parameters.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Sequence

import numpy as np

from metapt_tf.data import graphs as graphs_lib

EVIDENCE_FACTORS = tuple(f"evidence_{c}" for c in range(graphs_lib.NUM_EVIDENCE_CHANNELS))
FACTORS = (*EVIDENCE_FACTORS, "centre_degree", "clustering", "periphery_density")
DEFAULT_FT_FACTORS = ("evidence_0", "evidence_1", "centre_degree", "clustering")
TASK_KINDS = ("relevant", "irrelevant", "harmful")
RELEVANT_TASKS = ("ft_related", "ft_factors")  # how relevant PT tasks are made
HARMFUL_TASKS = ("nuisance_scores", "random_labels")  # which kind reads the nuisance factors
RELEVANCE = {"relevant": 1.0, "irrelevant": 0.0, "harmful": -1.0}

SUMMARY_NAMES = (
    *(f"centre_edges_channel_{c}" for c in range(graphs_lib.NUM_EVIDENCE_CHANNELS)),
    *(f"all_edges_channel_{c}" for c in range(graphs_lib.NUM_EVIDENCE_CHANNELS)),
    "centre_degree",
    "neighbour_mean_degree",
    "mean_degree",
    "degree_std",
    "centre_degree_fraction",
    "centre_clustering",
    "periphery_density",
    "density",
    "num_nodes",
)
# The statistics that sum-aggregating message passing with a readout of the mean
# and the centre's state can compute although the nodes carry no input
# features (no node count, no triangles): what a GIN on these graphs can see.
MESSAGE_PASSING_SUMMARY_NAMES = SUMMARY_NAMES[:18]

FILE_NAMES = {
    "schema": "schema.pbtxt",
    "pt": "pt.tfrecord",
    "ft_train": "ft_train.tfrecord",
    "test": "test.tfrecord",
    "task_info": "task_info.json",
}

# How the factors are realised (see the module docstring).
_CHANNEL_BASE, _CHANNEL_SPAN = 0.1, 0.7
_DEGREE_LOW, _DEGREE_HIGH = 0.1, 0.45  # centre degrees span [0.1, 0.45] * max_nodes (about)
_RING_BASE, _RING_SPAN = 0.0, 0.8
_PERIPHERY_BASE, _PERIPHERY_SPAN = 0.05, 0.55
_RING_PERIPHERY_PROB = 0.08
_WEIGHT_RANGE = (0.5, 1.0)
_RELATED_SCALE = (0.75, 1.25)  # a related term's weights: its FT task's, each rescaled
_REFERENCE_SAMPLES = 8192  # factor draws on which task thresholds are set
_TASK_CHUNK = 512  # tasks per block when setting thresholds
_GRAPH_CHUNK = 1024  # graphs per block when drawing labels
_PADDED_CELLS_PER_CHUNK = 2_000_000  # bounds the [graphs, max_nodes, max_nodes] arrays


@dataclasses.dataclass(frozen=True, eq=False)
class TaskInfo:
    """Ground truth of a synthetic benchmark.

    Attributes:
      factor_names: the K hidden factors, in the column order of `latent` and
        of the weight matrices.
      ft_factor_names: the factors FT tasks (and relevant PT tasks) read.
      nuisance_factor_names: the others (read by harmful PT tasks; by
        irrelevant ones in the former design).
      pt_kinds: kind of each PT task: "relevant", "irrelevant" or "harmful".
      pt_relevance: float32 [T]: +1 relevant, 0 irrelevant, -1 harmful.
      pt_weights: float32 [T, K] score weights (all zero for random-label tasks).
      pt_thresholds: float32 [T] score thresholds (NaN for random-label tasks).
      pt_positive_rates: float32 [T] positive rate before label noise.
      pt_related_ft_tasks: int64 [T]: for a relevant task made as a related
        term (`relevant_tasks="ft_related"`), the FT task it derives from; -1
        for every other task.
      ft_weights, ft_thresholds, ft_positive_rates: the same for the FT tasks.
      latent: float32 [num_graphs, K] factors of each generated graph.
      params: the generator's arguments.
    """

    factor_names: tuple[str, ...]
    ft_factor_names: tuple[str, ...]
    nuisance_factor_names: tuple[str, ...]
    pt_kinds: tuple[str, ...]
    pt_relevance: np.ndarray
    pt_weights: np.ndarray
    pt_thresholds: np.ndarray
    pt_positive_rates: np.ndarray
    pt_related_ft_tasks: np.ndarray
    ft_weights: np.ndarray
    ft_thresholds: np.ndarray
    ft_positive_rates: np.ndarray
    latent: np.ndarray
    params: dict

    def pt_tasks_of_kind(self, kind: str) -> np.ndarray:
        """int64 indices of the PT tasks of one kind."""
        if kind not in TASK_KINDS:
            raise ValueError(f"kind must be one of {TASK_KINDS}. Received: kind={kind!r}")
        return np.flatnonzero(np.asarray(self.pt_kinds) == kind).astype(np.int64)

    def to_json(self) -> dict:
        """The ground truth as JSON-ready data (without the per-graph factors)."""

        def task(weights, threshold, rate, kind, related=-1):
            entry = {"kind": kind, "relevance": RELEVANCE[kind]} if kind else {}
            if related >= 0:
                entry["related_ft_task"] = int(related)
            entry["factors"] = {
                self.factor_names[k]: round(float(weights[k]), 6) for k in np.flatnonzero(weights)
            }
            entry["threshold"] = None if np.isnan(threshold) else round(float(threshold), 6)
            entry["positive_rate"] = round(float(rate), 6)
            return entry

        return {
            "generator": dict(self.params),
            "factors": list(self.factor_names),
            "ft_factors": list(self.ft_factor_names),
            "nuisance_factors": list(self.nuisance_factor_names),
            "kinds": list(self.pt_kinds),
            "relevance": [float(r) for r in self.pt_relevance],
            "pt_tasks": [
                task(w, t, r, k, j)
                for w, t, r, k, j in zip(
                    self.pt_weights,
                    self.pt_thresholds,
                    self.pt_positive_rates,
                    self.pt_kinds,
                    self.pt_related_ft_tasks,
                    strict=True,
                )
            ],
            "ft_tasks": [
                task(w, t, r, None)
                for w, t, r in zip(
                    self.ft_weights, self.ft_thresholds, self.ft_positive_rates, strict=True
                )
            ],
        }


def make_synthetic_ppi(
    *,
    num_graphs: int = 3000,
    num_pt_tasks: int = 200,
    num_ft_tasks: int = 12,
    task_mix: Sequence[float] = (0.2, 0.3, 0.5),
    min_nodes: int = 10,
    max_nodes: int = 30,
    label_noise: float = 0.05,
    positive_rate: tuple[float, float] = (0.1, 0.5),
    pt_factors_per_task: tuple[int, int] = (1, 3),
    ft_factors_per_task: tuple[int, int] = (2, 3),
    ft_factors: Sequence[str] = DEFAULT_FT_FACTORS,
    relevant_tasks: str = "ft_related",
    harmful_tasks: str = "nuisance_scores",
    species_id: int = 0,
    seed: int = 0,
) -> tuple[list[graphs_lib.EgoGraph], TaskInfo]:
    """Generates synthetic PPI-like ego-graphs with PT and FT labels (see the module docstring).

    Args:
      num_graphs: number of ego-graphs.
      num_pt_tasks: number of PT tasks T (the paper's bio benchmark: 5000).
      num_ft_tasks: number of FT tasks F (the paper's bio benchmark: 40).
      task_mix: fractions of (relevant, irrelevant, harmful) PT tasks, adding
        up to 1; task counts are rounded by largest remainder.
      min_nodes, max_nodes: range of ego-graph sizes (inclusive), min_nodes >= 3.
      label_noise: probability of flipping each label, in [0, 0.5).
      positive_rate: range (low, high) of the tasks' positive rates, in (0, 1).
      pt_factors_per_task, ft_factors_per_task: range (low, high) of the number
        of factors a task's score reads (capped by the factors available; a
        related term reads its FT task's factors).
      ft_factors: names of the FT factors, a non-empty proper subset of `FACTORS`.
      relevant_tasks: "ft_related" (each relevant PT task is a related term of
        a random FT task: its score with every weight rescaled by U(0.75, 1.25),
        and its own positive rate) or "ft_factors" (each reads its own random
        subset of the FT factors, with its own weights).
      harmful_tasks: "nuisance_scores" (harmful tasks are scores over the
        nuisance factors, irrelevant tasks have random labels) or
        "random_labels" (the other way round).
      species_id: the species id stored in every graph.
      seed: everything depends on this seed and the arguments only.

    Returns:
      (graphs, task_info): the ego-graphs, with float32 labels, and the truth.
    """
    num_graphs = _count("num_graphs", num_graphs, 1)
    num_pt_tasks = _count("num_pt_tasks", num_pt_tasks, 1)
    num_ft_tasks = _count("num_ft_tasks", num_ft_tasks, 1)
    min_nodes = _count("min_nodes", min_nodes, 3)
    max_nodes = _count("max_nodes", max_nodes, 3)
    if max_nodes < min_nodes:
        raise ValueError(
            f"max_nodes must be >= min_nodes. Received: min_nodes={min_nodes}, "
            f"max_nodes={max_nodes}"
        )
    mix = np.asarray(task_mix, dtype=np.float64)
    if mix.shape != (3,) or (mix < 0).any() or abs(mix.sum() - 1.0) > 1e-6:
        raise ValueError(
            "task_mix must be three non-negative fractions (relevant, irrelevant, harmful) "
            f"adding up to 1. Received: task_mix={tuple(task_mix)}"
        )
    if not 0.0 <= label_noise < 0.5:
        raise ValueError(f"label_noise must be in [0, 0.5). Received: label_noise={label_noise}")
    low, high = positive_rate
    if not 0.0 < low <= high < 1.0:
        raise ValueError(
            f"positive_rate must be (low, high) with 0 < low <= high < 1. "
            f"Received: positive_rate={tuple(positive_rate)}"
        )
    for name, (lo, hi) in (
        ("pt_factors_per_task", pt_factors_per_task),
        ("ft_factors_per_task", ft_factors_per_task),
    ):
        if not 1 <= lo <= hi:
            raise ValueError(
                f"{name} must be (low, high) with 1 <= low <= high. Received: {lo, hi}"
            )
    ft_factors = tuple(ft_factors)
    unknown = [f for f in ft_factors if f not in FACTORS]
    if unknown or not ft_factors or len(set(ft_factors)) == len(FACTORS):
        raise ValueError(
            f"ft_factors must be a non-empty proper subset of {FACTORS}. "
            f"Received: ft_factors={ft_factors}"
        )
    if relevant_tasks not in RELEVANT_TASKS:
        raise ValueError(
            f"relevant_tasks must be one of {RELEVANT_TASKS}. "
            f"Received: relevant_tasks={relevant_tasks!r}"
        )
    if harmful_tasks not in HARMFUL_TASKS:
        raise ValueError(
            f"harmful_tasks must be one of {HARMFUL_TASKS}. "
            f"Received: harmful_tasks={harmful_tasks!r}"
        )
    ft_index = np.array(sorted({FACTORS.index(f) for f in ft_factors}), np.int64)
    nuisance_index = np.setdiff1d(np.arange(len(FACTORS)), ft_index)
    params = {
        "num_graphs": num_graphs,
        "num_pt_tasks": num_pt_tasks,
        "num_ft_tasks": num_ft_tasks,
        "task_mix": [float(x) for x in mix],
        "min_nodes": min_nodes,
        "max_nodes": max_nodes,
        "label_noise": float(label_noise),
        "positive_rate": [float(low), float(high)],
        "pt_factors_per_task": [int(x) for x in pt_factors_per_task],
        "ft_factors_per_task": [int(x) for x in ft_factors_per_task],
        "ft_factors": [FACTORS[k] for k in ft_index],
        "relevant_tasks": relevant_tasks,
        "harmful_tasks": harmful_tasks,
        "species_id": int(species_id),
        "seed": int(seed),
    }
    task_rng, factor_rng, structure_rng, label_rng = (
        np.random.default_rng(s) for s in np.random.SeedSequence(int(seed)).spawn(4)
    )

    # Tasks: kinds in random positions, then weights and thresholds. Kind indices
    # follow TASK_KINDS (0 relevant, 1 irrelevant, 2 harmful); which of the last two
    # reads the nuisance factors and which has random labels is `harmful_tasks`.
    counts = _largest_remainder(mix, num_pt_tasks)
    kinds = np.repeat(np.arange(3), counts)[task_rng.permutation(num_pt_tasks)]
    nuisance_kind, random_kind = (2, 1) if harmful_tasks == "nuisance_scores" else (1, 2)
    relevant_rows = np.flatnonzero(kinds == 0)
    pt_weights = np.zeros((num_pt_tasks, len(FACTORS)))
    if relevant_tasks == "ft_factors":
        pt_weights[relevant_rows] = _draw_weights(
            task_rng, relevant_rows.size, ft_index, pt_factors_per_task
        )
    rows = np.flatnonzero(kinds == nuisance_kind)
    pt_weights[rows] = _draw_weights(task_rng, rows.size, nuisance_index, pt_factors_per_task)
    pt_rates = task_rng.uniform(low, high, num_pt_tasks)
    ft_weights = _draw_weights(task_rng, num_ft_tasks, ft_index, ft_factors_per_task)
    ft_rates = task_rng.uniform(low, high, num_ft_tasks)
    related = np.full(num_pt_tasks, -1, np.int64)
    if relevant_tasks == "ft_related":
        # A related term: an FT task's score, each weight rescaled, with its own
        # positive rate (a broader or narrower term on the same biology).
        related[relevant_rows] = task_rng.integers(0, num_ft_tasks, relevant_rows.size)
        scale = task_rng.uniform(*_RELATED_SCALE, (relevant_rows.size, len(FACTORS)))
        pt_weights[relevant_rows] = ft_weights[related[relevant_rows]] * scale
    reference = task_rng.random((_REFERENCE_SAMPLES, len(FACTORS)))
    pt_thresholds = _thresholds(reference, pt_weights, pt_rates)
    pt_thresholds[kinds == random_kind] = np.nan
    ft_thresholds = _thresholds(reference, ft_weights, ft_rates)

    # Graphs: factors, structure, labels.
    latent = factor_rng.random((num_graphs, len(FACTORS)))
    ring, sizes = _ring_and_sizes(
        factor_rng, latent[:, FACTORS.index("centre_degree")], min_nodes, max_nodes
    )
    pt_labels = _labels(label_rng, latent, pt_weights, pt_thresholds, pt_rates, label_noise)
    ft_labels = _labels(label_rng, latent, ft_weights, ft_thresholds, ft_rates, label_noise)
    graphs = _structures(
        structure_rng, latent, ring, sizes, max_nodes, pt_labels, ft_labels, species_id
    )

    info = TaskInfo(
        factor_names=FACTORS,
        ft_factor_names=tuple(FACTORS[k] for k in ft_index),
        nuisance_factor_names=tuple(FACTORS[k] for k in nuisance_index),
        pt_kinds=tuple(TASK_KINDS[k] for k in kinds),
        pt_relevance=np.array([RELEVANCE[TASK_KINDS[k]] for k in kinds], np.float32),
        pt_weights=pt_weights.astype(np.float32),
        pt_thresholds=pt_thresholds.astype(np.float32),
        pt_positive_rates=pt_rates.astype(np.float32),
        pt_related_ft_tasks=related,
        ft_weights=ft_weights.astype(np.float32),
        ft_thresholds=ft_thresholds.astype(np.float32),
        ft_positive_rates=ft_rates.astype(np.float32),
        latent=latent.astype(np.float32),
        params=params,
    )
    return graphs, info


def _draw_weights(
    rng: np.random.Generator, num_tasks: int, allowed: np.ndarray, per_task: tuple[int, int]
) -> np.ndarray:
    """[num_tasks, K] weights: each row reads a random subset of `allowed` factors."""
    weights = np.zeros((num_tasks, len(FACTORS)))
    low = min(per_task[0], allowed.size)
    high = min(per_task[1], allowed.size)
    for row in range(num_tasks):
        size = rng.integers(low, high + 1)
        chosen = rng.choice(allowed, size=size, replace=False)
        signs = rng.choice([-1.0, 1.0], size=size)
        weights[row, chosen] = signs * rng.uniform(*_WEIGHT_RANGE, size=size)
    return weights


def _thresholds(reference: np.ndarray, weights: np.ndarray, rates: np.ndarray) -> np.ndarray:
    """Per task, the (1 - rate) quantile of its score on the reference factors."""
    out = np.empty(weights.shape[0])
    for start in range(0, weights.shape[0], _TASK_CHUNK):
        block = slice(start, start + _TASK_CHUNK)
        scores = np.sort(reference @ weights[block].T, axis=0)
        position = np.clip(
            np.rint((1.0 - rates[block]) * reference.shape[0]).astype(np.int64),
            0,
            reference.shape[0] - 1,
        )
        out[block] = scores[position, np.arange(position.size)]
    return out


def _labels(
    rng: np.random.Generator,
    latent: np.ndarray,
    weights: np.ndarray,
    thresholds: np.ndarray,
    rates: np.ndarray,
    noise: float,
) -> np.ndarray:
    """float32 [G, T] labels: thresholded scores (random where the threshold is NaN), noised."""
    num_graphs, num_tasks = latent.shape[0], weights.shape[0]
    labels = np.empty((num_graphs, num_tasks), np.float32)
    random_tasks = np.isnan(thresholds)
    safe_thresholds = np.where(random_tasks, 0.0, thresholds)
    for start in range(0, num_graphs, _GRAPH_CHUNK):
        block = slice(start, start + _GRAPH_CHUNK)
        rows = latent[block].shape[0]
        positive = latent[block] @ weights.T > safe_thresholds
        draws = rng.random((rows, num_tasks))
        positive = np.where(random_tasks, draws < rates, positive)
        if noise > 0:
            positive ^= rng.random((rows, num_tasks)) < noise
        labels[block] = positive
    return labels


def _ring_and_sizes(
    rng: np.random.Generator, centre_degree: np.ndarray, min_nodes: int, max_nodes: int
) -> tuple[np.ndarray, np.ndarray]:
    """The centre's degree (set by its factor) and the graph sizes (the periphery is random)."""
    low = max(1, round(_DEGREE_LOW * max_nodes))
    high = min(max(low, round(_DEGREE_HIGH * (max_nodes - 1))), max_nodes - 2)
    ring = np.rint(low + centre_degree * (high - low)).astype(np.int64)
    fewest = np.maximum(1, min_nodes - 1 - ring)
    most = max_nodes - 1 - ring
    periphery = fewest + np.floor(rng.random(ring.shape) * (most - fewest + 1)).astype(np.int64)
    return ring, 1 + ring + periphery


def _structures(
    rng: np.random.Generator,
    latent: np.ndarray,
    ring: np.ndarray,
    sizes: np.ndarray,
    max_nodes: int,
    pt_labels: np.ndarray,
    ft_labels: np.ndarray,
    species_id: int,
) -> list[graphs_lib.EgoGraph]:
    """The ego-graphs realising each row of `latent`, in blocks of padded adjacency arrays."""
    chunk = max(1, _PADDED_CELLS_PER_CHUNK // (max_nodes * max_nodes))
    out: list[graphs_lib.EgoGraph] = []
    for start in range(0, latent.shape[0], chunk):
        block = slice(start, start + chunk)
        out.extend(
            _structure_block(
                rng,
                latent[block],
                ring[block],
                sizes[block],
                max_nodes,
                pt_labels[block],
                ft_labels[block],
                species_id,
            )
        )
    return out


def _structure_block(rng, latent, ring, sizes, max_nodes, pt_labels, ft_labels, species_id):
    num = latent.shape[0]
    factor = {name: latent[:, k] for k, name in enumerate(FACTORS)}
    # Position 0 is the centre, 1..ring are its neighbours, ring+1..n-1 the periphery.
    position = np.arange(max_nodes)[None, :]
    in_ring = (position >= 1) & (position <= ring[:, None])
    in_periphery = (position > ring[:, None]) & (position < sizes[:, None])
    ring_prob = _RING_BASE + _RING_SPAN * factor["clustering"]
    periphery_prob = _PERIPHERY_BASE + _PERIPHERY_SPAN * factor["periphery_density"]
    prob = (
        (in_ring[:, :, None] & in_ring[:, None, :]) * ring_prob[:, None, None]
        + (in_periphery[:, :, None] & in_periphery[:, None, :]) * periphery_prob[:, None, None]
        + (in_ring[:, :, None] & in_periphery[:, None, :]) * _RING_PERIPHERY_PROB
    )
    prob[:, 0, :] = in_ring  # the centre interacts with all of the ring, none of the periphery
    adjacency = np.triu(rng.random(prob.shape) < prob, k=1)
    # Every periphery protein interacts with one random ring protein (lower position).
    parent = 1 + np.floor(rng.random((num, max_nodes)) * ring[:, None]).astype(np.int64)
    g_idx, p_idx = np.nonzero(in_periphery)
    adjacency[g_idx, parent[g_idx, p_idx], p_idx] = True

    graph_of_edge, first, second = np.nonzero(adjacency)
    channel_prob = _CHANNEL_BASE + _CHANNEL_SPAN * latent[:, : graphs_lib.NUM_EVIDENCE_CHANNELS]
    edge_prob = channel_prob[graph_of_edge]
    channels = rng.random(edge_prob.shape) < edge_prob
    empty = ~channels.any(axis=1)
    pick = np.argmax(edge_prob[empty] * rng.random((int(empty.sum()), edge_prob.shape[1])), axis=1)
    channels[np.flatnonzero(empty), pick] = True

    # A random node order per graph (padding sorts last).
    keys = rng.random((num, max_nodes)) + (position >= sizes[:, None])
    new_position = np.argsort(np.argsort(keys, axis=1), axis=1)
    source = new_position[graph_of_edge, first]
    target = new_position[graph_of_edge, second]
    centers = new_position[:, 0]

    # Both directions, interleaved: (s, t), (t, s) for each interaction.
    directed = np.stack([np.stack([source, target], 1), np.stack([target, source], 1)], 1)
    directed = directed.reshape(-1, 2).astype(np.int64)
    features = np.zeros((channels.shape[0], graphs_lib.EDGE_FEATURE_DIM), np.float32)
    features[:, : graphs_lib.NUM_EVIDENCE_CHANNELS] = channels
    features = np.repeat(features, 2, axis=0)
    bounds = 2 * np.concatenate([[0], np.cumsum(np.bincount(graph_of_edge, minlength=num))])
    return [
        graphs_lib.EgoGraph(
            num_nodes=int(sizes[g]),
            edges=directed[bounds[g] : bounds[g + 1]],
            edge_features=features[bounds[g] : bounds[g + 1]],
            center=int(centers[g]),
            pt_labels=pt_labels[g],
            ft_labels=ft_labels[g],
            species_id=species_id,
        )
        for g in range(num)
    ]


def _largest_remainder(fractions: np.ndarray, total: int) -> np.ndarray:
    exact = fractions * total
    counts = np.floor(exact + 1e-9).astype(np.int64)
    order = np.argsort(-(exact - counts), kind="stable")
    counts[order[: total - counts.sum()]] += 1
    return counts


# --- Summary statistics ------------------------------------------------------------------------


def summary_statistics(graphs: Sequence[graphs_lib.EgoGraph]) -> np.ndarray:
    """float32 [len(graphs), len(SUMMARY_NAMES)] simple per-graph statistics.

    Columns (see SUMMARY_NAMES): the frequency of each evidence channel on the
    edges at the centre and on all edges; the centre's degree; the mean degree
    of its neighbours; the mean and standard deviation of all degrees (these
    first 18 are MESSAGE_PASSING_SUMMARY_NAMES); the centre's degree over
    n - 1; the centre's clustering coefficient (interacting pairs among its
    neighbours over all pairs); the density among the proteins not adjacent to
    the centre; the whole graph's density; n. They estimate the generator's
    factors and serve as inputs of simple baselines.
    """
    channels = graphs_lib.NUM_EVIDENCE_CHANNELS
    out = np.zeros((len(graphs), len(SUMMARY_NAMES)), np.float32)
    for row, graph in enumerate(graphs):
        n, c = graph.num_nodes, graph.center
        adjacency = np.zeros((n, n), bool)
        adjacency[graph.edges[:, 0], graph.edges[:, 1]] = True
        np.fill_diagonal(adjacency, False)
        at_centre = graph.edges[:, 0] == c
        if at_centre.any():
            out[row, :channels] = graph.edge_features[at_centre, :channels].mean(axis=0)
        if graph.num_edges:
            out[row, channels : 2 * channels] = graph.edge_features[:, :channels].mean(axis=0)
        degrees = adjacency.sum(axis=1)
        neighbours = adjacency[c]
        k = int(neighbours.sum())
        periphery = ~neighbours
        periphery[c] = False
        m = int(periphery.sum())
        out[row, 2 * channels :] = (
            k,
            degrees[neighbours].mean() if k else 0.0,
            degrees.mean(),
            degrees.std(),
            k / max(n - 1, 1),
            adjacency[np.ix_(neighbours, neighbours)].sum() / max(k * (k - 1), 1),
            adjacency[np.ix_(periphery, periphery)].sum() / max(m * (m - 1), 1),
            adjacency.sum() / max(n * (n - 1), 1),
            n,
        )
    return out


# --- Writing a benchmark -----------------------------------------------------------------------


def write_synthetic_benchmark(
    out_dir: str | os.PathLike,
    *,
    num_pt_graphs: int = 2000,
    num_ft_graphs: int = 200,
    num_test_graphs: int = 1000,
    ft_graphs_from_pt: bool = True,
    **generator_args,
) -> dict:
    """Generates a benchmark with `make_synthetic_ppi` and writes it to `out_dir`.

    Files (names in FILE_NAMES): schema.pbtxt; pt.tfrecord (`num_pt_graphs`
    graphs); ft_train.tfrecord (the labelled FT pool, `num_ft_graphs` graphs:
    with `ft_graphs_from_pt`, drawn from the pt graphs, as the real benchmark
    fine-tunes on PT graphs; else further graphs of their own); test.tfrecord
    (`num_test_graphs` graphs, disjoint from the others); task_info.json
    (`TaskInfo.to_json()` plus the split counts, the generated graphs' indices
    in each split and the file names). Every file holds both label sets. The
    splits depend only on the seed.

    Args:
      out_dir: output directory (created if needed; existing files are replaced).
      num_pt_graphs, num_ft_graphs, num_test_graphs: split sizes (>= 1 each;
        num_ft_graphs <= num_pt_graphs with ft_graphs_from_pt).
      ft_graphs_from_pt: draw the FT pool from the PT graphs.
      **generator_args: keyword arguments of `make_synthetic_ppi`, except
        num_graphs (which follows from the split sizes).

    Returns:
      The data written to task_info.json.
    """
    num_pt = _count("num_pt_graphs", num_pt_graphs, 1)
    num_ft = _count("num_ft_graphs", num_ft_graphs, 1)
    num_test = _count("num_test_graphs", num_test_graphs, 1)
    if "num_graphs" in generator_args:
        raise ValueError(
            "num_graphs follows from num_pt_graphs, num_ft_graphs and num_test_graphs. "
            f"Received: num_graphs={generator_args['num_graphs']!r}"
        )
    if ft_graphs_from_pt and num_ft > num_pt:
        raise ValueError(
            "num_ft_graphs must be at most num_pt_graphs when the FT graphs are drawn from the "
            f"PT graphs. Received: num_ft_graphs={num_ft}, num_pt_graphs={num_pt}"
        )
    num_graphs = num_pt + num_test + (0 if ft_graphs_from_pt else num_ft)
    graphs, info = make_synthetic_ppi(num_graphs=num_graphs, **generator_args)
    # The graphs are independent draws, so blocks of them are random samples.
    split_rng = np.random.default_rng(np.random.SeedSequence(info.params["seed"]).spawn(5)[4])
    pt = np.arange(num_pt)
    test = np.arange(num_pt, num_pt + num_test)
    if ft_graphs_from_pt:
        ft_train = np.sort(split_rng.choice(pt, size=num_ft, replace=False))
    else:
        ft_train = np.arange(num_pt + num_test, num_graphs)
    splits = {"pt": pt, "ft_train": ft_train, "test": test}

    out_dir = os.fspath(out_dir)
    schema = graphs_lib.graph_schema(info.params["num_pt_tasks"], info.params["num_ft_tasks"])
    graphs_lib.write_schema(schema, os.path.join(out_dir, FILE_NAMES["schema"]))
    for name, indices in splits.items():
        path = os.path.join(out_dir, FILE_NAMES[name])
        graphs_lib.write_tfrecord(path, (graphs[i] for i in indices), schema)
    summary = info.to_json()
    summary["generator"]["ft_graphs_from_pt"] = bool(ft_graphs_from_pt)
    summary["counts"] = {name: int(indices.size) for name, indices in splits.items()}
    summary["split_indices"] = {name: indices.tolist() for name, indices in splits.items()}
    summary["files"] = dict(FILE_NAMES)
    info_path = os.path.join(out_dir, FILE_NAMES["task_info"])
    tmp = f"{info_path}.tmp"
    with open(tmp, "w") as f:
        json.dump(summary, f, indent=1)
    os.replace(tmp, info_path)
    return summary


def read_ground_truth(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """The PT tasks' truth from a task_info.json: {"kinds": str [T], "relevance": float32 [T]}."""
    with open(path) as f:
        data = json.load(f)
    missing = [k for k in ("kinds", "relevance") if k not in data]
    if missing:
        raise ValueError(
            f"{os.fspath(path)}: not a synthetic benchmark's task_info.json: it lacks {missing}"
        )
    return {
        "kinds": np.asarray(data["kinds"], dtype=str),
        "relevance": np.asarray(data["relevance"], dtype=np.float32),
    }


def _count(name: str, value: object, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}. Received: {name}={value!r}")
    return int(value)
