"""Synthetic PPI-like benchmark: valid ego-graphs, determinism, task truth, learnability."""

import json
import os
import tracemalloc
from collections import deque

import numpy as np
import pytest

from metapt_tf.data import graphs, synthetic_ppi


@pytest.fixture(scope="module")
def benchmark():
    return synthetic_ppi.make_synthetic_ppi(num_graphs=3000, seed=0)


def _connected(graph):
    neighbours = [[] for _ in range(graph.num_nodes)]
    for s, t in graph.edges:
        neighbours[s].append(t)
    seen, queue = {graph.center}, deque([graph.center])
    while queue:
        for t in neighbours[queue.popleft()]:
            if t not in seen:
                seen.add(t)
                queue.append(t)
    return len(seen) == graph.num_nodes


def test_graphs_are_valid_ego_graphs_of_the_layout(benchmark):
    all_graphs, info = benchmark
    assert len(all_graphs) == 3000
    sizes = np.array([g.num_nodes for g in all_graphs])
    assert sizes.min() == 10 and sizes.max() == 30
    centre_degrees = np.array([np.count_nonzero(g.edges[:, 0] == g.center) for g in all_graphs])
    assert centre_degrees.min() == 3 and centre_degrees.max() == 13
    for g in all_graphs[:300]:
        assert _connected(g)
        features = g.edge_features
        assert set(np.unique(features[:, :7])) <= {0.0, 1.0}
        assert (features[:, 7:] == 0).all()  # no self-loop or mask flags in stored edges
        assert (features[:, :7].sum(axis=1) >= 1).all()  # every edge has some evidence
        assert not (g.edges[:, 0] == g.edges[:, 1]).any()
        # Interleaved directions with equal features.
        np.testing.assert_array_equal(g.edges[0::2], g.edges[1::2, ::-1])
        np.testing.assert_array_equal(features[0::2], features[1::2])
        assert g.pt_labels.dtype == np.float32 and g.pt_labels.shape == (200,)
        assert g.ft_labels.shape == (12,)
    # The centre is not always node 0.
    assert len({g.center for g in all_graphs[:50]}) > 5
    assert info.latent.shape == (3000, len(synthetic_ppi.FACTORS))


def _factor_indices(info):
    ft_index = [synthetic_ppi.FACTORS.index(f) for f in info.ft_factor_names]
    nuisance = [synthetic_ppi.FACTORS.index(f) for f in info.nuisance_factor_names]
    return ft_index, nuisance


def test_task_kinds_rates_and_truth(benchmark):
    all_graphs, info = benchmark
    kinds = np.asarray(info.pt_kinds)
    assert [int((kinds == k).sum()) for k in synthetic_ppi.TASK_KINDS] == [40, 60, 100]
    assert not (kinds[:40] == "relevant").all()  # kinds are interleaved, not in blocks
    np.testing.assert_array_equal(info.pt_relevance[kinds == "harmful"], -1.0)
    np.testing.assert_array_equal(info.pt_relevance[kinds == "irrelevant"], 0.0)
    ft_index, nuisance = _factor_indices(info)
    # Relevant tasks are related terms of FT tasks: the same factors and signs, each
    # weight rescaled by U(0.75, 1.25).
    relevant = np.flatnonzero(kinds == "relevant")
    source = info.pt_related_ft_tasks[relevant]
    assert ((0 <= source) & (source < 12)).all() and len(set(source)) > 6
    np.testing.assert_array_equal(info.pt_related_ft_tasks[kinds != "relevant"], -1)
    ratio = np.divide(
        info.pt_weights[relevant],
        info.ft_weights[source],
        out=np.zeros_like(info.pt_weights[relevant]),
        where=info.ft_weights[source] != 0,
    )
    np.testing.assert_array_equal(info.pt_weights[relevant] != 0, info.ft_weights[source] != 0)
    used = ratio[ratio != 0]
    assert used.min() >= 0.75 and used.max() <= 1.25 and used.std() > 0.1
    # Harmful tasks read nuisance factors only; irrelevant tasks have random labels.
    harmful = info.pt_weights[kinds == "harmful"]
    assert (harmful[:, ft_index] == 0).all() and (harmful != 0).any(axis=1).all()
    assert (info.pt_weights[kinds == "irrelevant"] == 0).all()
    assert np.isnan(info.pt_thresholds[kinds == "irrelevant"]).all()
    assert not np.isnan(info.pt_thresholds[kinds != "irrelevant"]).any()
    assert (info.ft_weights[:, nuisance] == 0).all()
    assert ((info.ft_weights != 0).sum(axis=1) >= 2).all()
    ft = np.stack([g.ft_labels for g in all_graphs])
    pt = np.stack([g.pt_labels for g in all_graphs])
    # Positive rates 10-50% before 5% label noise: 0.14-0.5 after, +- sampling error.
    assert 0.1 < ft.mean(axis=0).min() and ft.mean(axis=0).max() < 0.55
    assert 0.1 < pt.mean(axis=0).min() and pt.mean(axis=0).max() < 0.55
    np.testing.assert_allclose(
        pt.mean(axis=0), info.pt_positive_rates * 0.9 + 0.05, atol=0.05
    )  # thresholds hit their target rates
    # A related term's labels follow its FT task's, most often more than any other FT
    # task's (FT tasks over the same 4 factors resemble each other).
    correlation = np.corrcoef(pt[:, relevant].T, ft.T)[: relevant.size, relevant.size :]
    own = correlation[np.arange(relevant.size), source]
    others = np.ones(correlation.shape, bool)
    others[np.arange(relevant.size), source] = False
    assert own.min() > 0.2 and own.mean() > np.abs(correlation[others]).mean() + 0.25
    assert (correlation.argmax(axis=1) == source).mean() > 0.6


def test_former_design_relevant_scores_of_their_own_and_random_harmful_labels():
    _, info = synthetic_ppi.make_synthetic_ppi(
        num_graphs=50,
        task_mix=(0.2, 0.5, 0.3),
        relevant_tasks="ft_factors",
        harmful_tasks="random_labels",
    )
    kinds = np.asarray(info.pt_kinds)
    assert [int((kinds == k).sum()) for k in synthetic_ppi.TASK_KINDS] == [40, 100, 60]
    ft_index, nuisance = _factor_indices(info)
    relevant, irrelevant = (
        info.pt_weights[kinds == "relevant"],
        info.pt_weights[kinds == "irrelevant"],
    )
    assert (relevant[:, nuisance] == 0).all() and (relevant[:, ft_index] != 0).any(axis=1).all()
    # Not copies of FT tasks: some read a single factor (FT tasks read 2 or 3).
    assert ((relevant != 0).sum(axis=1) == 1).any()
    assert (irrelevant[:, ft_index] == 0).all() and (irrelevant != 0).any(axis=1).all()
    assert (info.pt_weights[kinds == "harmful"] == 0).all()
    assert np.isnan(info.pt_thresholds[kinds == "harmful"]).all()
    np.testing.assert_array_equal(info.pt_related_ft_tasks, -1)
    assert info.params["relevant_tasks"] == "ft_factors"
    assert info.params["harmful_tasks"] == "random_labels"


def test_generation_is_deterministic_in_the_seed():
    a_graphs, a_info = synthetic_ppi.make_synthetic_ppi(num_graphs=50, num_pt_tasks=20, seed=3)
    b_graphs, b_info = synthetic_ppi.make_synthetic_ppi(num_graphs=50, num_pt_tasks=20, seed=3)
    c_graphs, c_info = synthetic_ppi.make_synthetic_ppi(num_graphs=50, num_pt_tasks=20, seed=4)
    assert a_graphs == b_graphs and a_info.pt_kinds == b_info.pt_kinds
    np.testing.assert_array_equal(a_info.latent, b_info.latent)
    assert a_info.to_json() == b_info.to_json()
    assert a_graphs != c_graphs
    assert not np.array_equal(a_info.pt_weights, c_info.pt_weights)
    # Task definitions do not depend on the number of graphs.
    _, more = synthetic_ppi.make_synthetic_ppi(num_graphs=80, num_pt_tasks=20, seed=3)
    np.testing.assert_array_equal(more.pt_weights, a_info.pt_weights)
    np.testing.assert_array_equal(more.ft_thresholds, a_info.ft_thresholds)
    assert more.pt_kinds == a_info.pt_kinds


def _auc(scores, positive):
    positive = positive.astype(bool)
    ranks = np.argsort(np.argsort(scores)) + 1.0  # continuous scores: no ties
    num_pos = positive.sum()
    return (ranks[positive].sum() - num_pos * (num_pos + 1) / 2) / (num_pos * (~positive).sum())


def _logistic_regression(x, y, steps=15, l2=1.0):
    """Per column of y, Newton's method on the L2-penalised logistic loss (all columns at once)."""
    x = np.concatenate([x, np.ones((x.shape[0], 1))], axis=1)
    weights = np.zeros((y.shape[1], x.shape[1]))
    penalty = l2 * np.eye(x.shape[1])
    for _ in range(steps):
        p = 1.0 / (1.0 + np.exp(-x @ weights.T))  # [N, T]
        gradients = (p - y).T @ x + weights @ penalty  # [T, D]
        hessians = np.einsum("nt,ni,nj->tij", p * (1 - p), x, x, optimize=True) + penalty
        weights = weights - np.linalg.solve(hessians, gradients[:, :, None])[:, :, 0]
    return lambda z: np.concatenate([z, np.ones((z.shape[0], 1))], axis=1) @ weights.T


def test_summary_statistics_estimate_the_factors(benchmark):
    all_graphs, info = benchmark
    stats = synthetic_ppi.summary_statistics(all_graphs[:1000])
    names = synthetic_ppi.SUMMARY_NAMES
    assert stats.shape == (1000, len(names)) and np.isfinite(stats).all()
    pairs = {f"evidence_{c}": f"all_edges_channel_{c}" for c in range(7)}
    pairs.update(
        centre_degree="centre_degree_fraction",
        clustering="centre_clustering",
        periphery_density="periphery_density",
    )
    for factor, stat in pairs.items():
        k = synthetic_ppi.FACTORS.index(factor)
        r = np.corrcoef(info.latent[:1000, k], stats[:, names.index(stat)])[0, 1]
        assert r > 0.6, (factor, stat, r)


@pytest.mark.parametrize("visible_to_message_passing", [False, True])
def test_linear_model_on_summaries_learns_all_but_random_label_tasks(
    benchmark, visible_to_message_passing
):
    """The benchmark's sanity check: the factors are in the graphs; random labels are not."""
    all_graphs, info = benchmark
    stats = synthetic_ppi.summary_statistics(all_graphs)
    if visible_to_message_passing:
        names = synthetic_ppi.SUMMARY_NAMES
        stats = stats[:, [names.index(n) for n in synthetic_ppi.MESSAGE_PASSING_SUMMARY_NAMES]]
    stats = (stats - stats.mean(axis=0)) / (stats.std(axis=0) + 1e-6)
    pt = np.stack([g.pt_labels for g in all_graphs])
    ft = np.stack([g.ft_labels for g in all_graphs])
    labels = np.concatenate([pt, ft], axis=1)
    train, test = slice(0, 1500), slice(1500, 3000)
    scores = _logistic_regression(stats[train], labels[train])(stats[test])
    aucs = np.array([_auc(scores[:, t], labels[test, t]) for t in range(labels.shape[1])])
    pt_auc, ft_auc = aucs[:200], aucs[200:]
    kinds = np.asarray(info.pt_kinds)
    assert ft_auc.mean() > 0.8 and ft_auc.min() > 0.75, ft_auc
    assert pt_auc[kinds == "relevant"].mean() > 0.8
    assert pt_auc[kinds == "relevant"].min() > 0.7
    assert pt_auc[kinds == "harmful"].mean() > 0.8
    random_labels = pt_auc[kinds == "irrelevant"]
    assert abs(random_labels.mean() - 0.5) < 0.03, random_labels
    assert np.abs(random_labels - 0.5).max() < 0.1, random_labels


def test_the_papers_task_shape_generates_in_bounded_memory():
    tracemalloc.start()
    try:
        all_graphs, info = synthetic_ppi.make_synthetic_ppi(
            num_graphs=1000, num_pt_tasks=5000, num_ft_tasks=40, seed=1
        )
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert len(all_graphs) == 1000 and len(info.pt_kinds) == 5000
    assert all_graphs[0].pt_labels.shape == (5000,) and all_graphs[0].pt_labels.dtype == np.float32
    assert all_graphs[0].ft_labels.shape == (40,)
    assert [info.pt_kinds.count(k) for k in synthetic_ppi.TASK_KINDS] == [1000, 1500, 2500]
    # The labels themselves are 1000 x 5040 float32 (20 MB); the rest is bounded by blocks.
    assert peak < 250 * 2**20, f"peak {peak / 2**20:.0f} MiB"


def test_bad_arguments_are_named():
    with pytest.raises(
        ValueError, match=r"task_mix must be three.*Received: task_mix=\(0.5, 0.6\)"
    ):
        synthetic_ppi.make_synthetic_ppi(num_graphs=5, task_mix=(0.5, 0.6))
    with pytest.raises(ValueError, match="max_nodes must be >= min_nodes"):
        synthetic_ppi.make_synthetic_ppi(num_graphs=5, min_nodes=12, max_nodes=11)
    with pytest.raises(ValueError, match=r"ft_factors must be.*\('degree',\)"):
        synthetic_ppi.make_synthetic_ppi(num_graphs=5, ft_factors=("degree",))
    with pytest.raises(ValueError, match=r"label_noise must be in \[0, 0.5\)"):
        synthetic_ppi.make_synthetic_ppi(num_graphs=5, label_noise=0.5)
    with pytest.raises(ValueError, match=r"relevant_tasks must be one of.*'related'"):
        synthetic_ppi.make_synthetic_ppi(num_graphs=5, relevant_tasks="related")
    with pytest.raises(ValueError, match=r"harmful_tasks must be one of.*'noise'"):
        synthetic_ppi.make_synthetic_ppi(num_graphs=5, harmful_tasks="noise")


def test_write_synthetic_benchmark(tmp_path):
    summary = synthetic_ppi.write_synthetic_benchmark(
        tmp_path / "bench",
        num_pt_graphs=40,
        num_ft_graphs=10,
        num_test_graphs=15,
        num_pt_tasks=20,
        num_ft_tasks=4,
        seed=2,
    )
    directory = tmp_path / "bench"
    assert sorted(os.listdir(directory)) == sorted(synthetic_ppi.FILE_NAMES.values())
    schema = graphs.read_schema(directory / "schema.pbtxt")
    assert graphs.num_tasks(schema) == (20, 4)
    counts = {
        name: graphs.count_graphs(str(directory / f"{name}.tfrecord")) for name in summary["counts"]
    }
    assert counts == summary["counts"] == {"pt": 40, "ft_train": 10, "test": 15}
    # The FT pool is drawn from the PT graphs; the test graphs are others.
    pt = graphs.load_graphs(str(directory / "pt.tfrecord"), schema)
    ft = graphs.load_graphs(str(directory / "ft_train.tfrecord"), schema)
    test = graphs.load_graphs(str(directory / "test.tfrecord"), schema)
    assert ft == [pt[i] for i in summary["split_indices"]["ft_train"]]
    assert not any(g == p for g in test for p in pt)
    with open(directory / "task_info.json") as f:
        stored = json.load(f)
    assert stored == summary
    assert len(stored["kinds"]) == 20 and stored["generator"]["seed"] == 2
    assert stored["generator"]["num_graphs"] == 55
    truth = synthetic_ppi.read_ground_truth(directory / "task_info.json")
    np.testing.assert_array_equal(
        truth["relevance"], [synthetic_ppi.RELEVANCE[k] for k in stored["kinds"]]
    )
    for task, kind in zip(stored["pt_tasks"], stored["kinds"], strict=True):
        assert task["kind"] == kind and (task["threshold"] is None) == (kind == "irrelevant")
        assert ("related_ft_task" in task) == (kind == "relevant")
    batch = next(iter(graphs.load_dataset(str(directory / "pt.tfrecord"), schema, batch_size=8)))
    assert batch[graphs.PT_LABELS].shape == (8, 20)
    separate = synthetic_ppi.write_synthetic_benchmark(
        tmp_path / "separate",
        num_pt_graphs=5,
        num_ft_graphs=3,
        num_test_graphs=2,
        ft_graphs_from_pt=False,
        num_pt_tasks=3,
        num_ft_tasks=2,
    )
    assert separate["split_indices"]["ft_train"] == [7, 8, 9]
    with pytest.raises(ValueError, match="num_ft_graphs must be at most num_pt_graphs"):
        synthetic_ppi.write_synthetic_benchmark(
            tmp_path / "x", num_pt_graphs=5, num_ft_graphs=6, num_test_graphs=2
        )
