"""The pretrain-gnns "bio" converter, on a small dataset saved in the exact format with torch."""

import builtins
import json
import os
import random
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch

with warnings.catch_warnings():  # torch_geometric's import calls the deprecated torch.jit.script
    warnings.filterwarnings("ignore", "`torch.jit.script` is deprecated", DeprecationWarning)
    from torch_geometric.data import Data, InMemoryDataset

from metapt_tf.data import bio, graphs

NUM_PT, NUM_FT = 6, 4
HUMAN = 9606


def make_data_list(seed=0):
    """Data objects as pretrain-gnns builds them (bio/loader.py: nx_to_graph_data_obj)."""
    rng = np.random.default_rng(seed)
    species = [s for s in bio.TRAIN_SPECIES for _ in range(2)] + [HUMAN] * 9
    data_list = []
    for i, species_id in enumerate(species):
        n = int(rng.integers(2, 8))
        pairs = [(int(rng.integers(0, k)), k) for k in range(1, n)]
        edge_index, edge_attr = [], []
        for a, b in pairs:
            attr = [*rng.integers(0, 2, 7).tolist(), 0, 0]
            edge_index += [(a, b), (b, a)]
            edge_attr += [attr, attr]
        data = Data(
            x=torch.ones(n, 1),
            edge_index=torch.tensor(np.array(edge_index).T, dtype=torch.long),
            edge_attr=torch.tensor(np.array(edge_attr), dtype=torch.float),
        )
        data.species_id = torch.tensor([species_id], dtype=torch.long)
        data.center_node_idx = torch.tensor([int(rng.integers(0, n))], dtype=torch.long)
        data.go_target_downstream = torch.tensor(rng.integers(0, 2, NUM_FT), dtype=torch.long)
        data.go_target_pretrain = torch.tensor(rng.integers(0, 2, NUM_PT), dtype=torch.long)
        data.index = i  # not read by the converter
        data_list.append(data)
    return data_list


def as_ego_graph(data):
    return graphs.EgoGraph(
        num_nodes=data.x.shape[0],
        edges=data.edge_index.numpy().T,
        edge_features=data.edge_attr.numpy(),
        center=int(data.center_node_idx[0]),
        pt_labels=data.go_target_pretrain.numpy().astype(np.float32),
        ft_labels=data.go_target_downstream.numpy().astype(np.float32),
        species_id=int(data.species_id[0]),
    )


@pytest.fixture(scope="module")
def data_list():
    return make_data_list()


@pytest.fixture(scope="module")
def processed_file(tmp_path_factory, data_list):
    path = tmp_path_factory.mktemp("bio") / "geometric_data_processed.pt"
    data, slices = InMemoryDataset.collate(data_list)
    torch.save((data, slices), path)
    return path


@pytest.fixture(scope="module")
def converted(tmp_path_factory, processed_file):
    out = tmp_path_factory.mktemp("converted")
    summary = bio.convert_bio(processed_file, out, seed=42)
    return out, summary


def test_reads_every_graph_of_the_file(processed_file, data_list):
    dataset = bio.read_processed(processed_file)
    assert len(dataset) == len(data_list) == 23
    assert (dataset.num_pt_tasks, dataset.num_ft_tasks) == (NUM_PT, NUM_FT)
    assert [dataset.graph(i) for i in range(len(dataset))] == [as_ego_graph(d) for d in data_list]
    with pytest.raises(IndexError, match=r"graph index must be in \[0, 23\)"):
        dataset.graph(23)


def test_species_split_is_the_references(data_list):
    species = np.array([int(d.species_id[0]) for d in data_list])
    split = bio.species_split(species, seed=42)
    train = np.arange(14)
    np.testing.assert_array_equal(split["ft_train"], train)
    # As the reference: random.seed(seed); random.shuffle(positions); halves of int(0.5 n).
    positions = list(range(9))
    random.seed(42)
    random.shuffle(positions)
    joins_pt, held_out, rest = positions[:4], positions[4:8], positions[8:]
    np.testing.assert_array_equal(split["test"], np.sort(14 + np.array(held_out)))
    np.testing.assert_array_equal(split["test_species_pt"], np.sort(14 + np.array(joins_pt)))
    np.testing.assert_array_equal(split["left_out"], 14 + np.array(rest))
    np.testing.assert_array_equal(
        split["pt"], np.concatenate([train, np.sort(14 + np.array(joins_pt))])
    )
    other = bio.species_split(species, seed=0)
    assert not np.array_equal(other["test"], split["test"])
    with pytest.raises(ValueError, match=r"Received other species \(id: graphs\): \{10116: 2\}"):
        bio.species_split(np.array([3702, 10116, 10116]), seed=0)


def test_reference_random_split_matches_the_reference_cut():
    train, valid = bio.reference_random_split(20, (0.85, 0.15), seed=42)
    order = list(range(20))
    random.seed(42)
    random.shuffle(order)
    np.testing.assert_array_equal(train, sorted(order[:17]))
    np.testing.assert_array_equal(valid, sorted(order[17 : 17 + 3]))


def test_converted_files_hold_the_split_graphs(converted, data_list):
    out, summary = converted
    assert sorted(os.listdir(out)) == sorted(bio.FILE_NAMES.values())
    schema = graphs.read_schema(out / "schema.pbtxt")
    assert graphs.num_tasks(schema) == (NUM_PT, NUM_FT)
    species = np.array([int(d.species_id[0]) for d in data_list])
    split = bio.species_split(species, seed=42)
    expected = [as_ego_graph(d) for d in data_list]
    for name in ("pt", "ft_train", "test"):
        loaded = graphs.load_graphs(str(out / f"{name}.tfrecord"), schema)
        assert loaded == [expected[i] for i in split[name]], name
    assert summary["counts"] == {
        "pt": 18,
        "ft_train": 14,
        "test": 4,
        "test_species_pt": 4,
        "left_out": 1,
    }
    assert summary["species_counts"]["test"] == {"9606": 4}
    assert summary["species_counts"]["pt"]["9606"] == 4
    assert summary["species_counts"]["ft_train"] == {str(s): 2 for s in bio.TRAIN_SPECIES}
    assert (summary["num_pt_tasks"], summary["num_ft_tasks"], summary["seed"]) == (6, 4, 42)
    with open(out / "summary.json") as f:
        assert json.load(f) == summary
    labels = graphs.read_labels(str(out / "test.tfrecord"), schema)
    np.testing.assert_array_equal(labels[graphs.SPECIES], [HUMAN] * 4)
    np.testing.assert_array_equal(
        labels[graphs.FT_LABELS], [expected[i].ft_labels for i in split["test"]]
    )
    batch = next(iter(graphs.load_dataset(str(out / "pt.tfrecord"), schema, batch_size=18)))
    assert batch[graphs.PT_LABELS].shape == (18, NUM_PT)
    assert batch["graph"].num_components.numpy() == 18


def test_older_and_newer_pyg_file_forms(tmp_path, data_list):
    data, slices = InMemoryDataset.collate(data_list)
    fields = {k: data[k] for k in data.keys()}
    # PyTorch Geometric 1.x pickled Data with plain instance attributes.
    old = Data.__new__(Data)
    old.__dict__.update(fields)
    torch.save((old, slices), tmp_path / "old.pt")
    # PyTorch Geometric >= 2.4's InMemoryDataset.save: (data.to_dict(), slices, Data).
    torch.save((data.to_dict(), slices, Data), tmp_path / "dict.pt")
    expected = [as_ego_graph(d) for d in data_list]
    for name in ("old.pt", "dict.pt"):
        dataset = bio.read_processed(tmp_path / name)
        assert [dataset.graph(i) for i in range(len(dataset))] == expected, name


def test_clear_errors_for_bad_input(tmp_path, data_list):
    with pytest.raises(FileNotFoundError, match="No processed bio dataset file at"):
        bio.read_processed(tmp_path / "missing.pt")
    data, slices = InMemoryDataset.collate(data_list)
    del data.go_target_pretrain
    torch.save((data, slices), tmp_path / "no_pt_labels.pt")
    with pytest.raises(
        ValueError,
        match=r"no_pt_labels.pt: not the supervised bio dataset: "
        r"fields \['go_target_pretrain'\] are missing",
    ):
        bio.read_processed(tmp_path / "no_pt_labels.pt")
    torch.save({"a": 1}, tmp_path / "dict_only.pt")
    with pytest.raises(ValueError, match=r"expected torch.save\(\(data, slices\)\).*a dict"):
        bio.read_processed(tmp_path / "dict_only.pt")
    data, slices = InMemoryDataset.collate(data_list)
    data.center_node_idx = data.center_node_idx + 10  # out of range in every graph
    torch.save((data, slices), tmp_path / "bad_center.pt")
    dataset = bio.read_processed(tmp_path / "bad_center.pt")
    with pytest.raises(
        ValueError, match=r"bad_center.pt: graph 0 is not a valid ego-graph: center"
    ):
        dataset.graph(0)


def test_missing_torch_says_how_to_install(monkeypatch, processed_file):
    real_import = builtins.__import__

    def no_torch(name, *args, **kwargs):
        if name.split(".")[0] == "torch_geometric":
            raise ImportError("No module named 'torch_geometric'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_torch)
    with pytest.raises(ImportError, match=r"pip install 'metapt_tf\[bio\]'"):
        bio.read_processed(processed_file)


def test_command_line(tmp_path, processed_file):
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "TF_USE_LEGACY_KERAS": "1"}
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    command = [sys.executable, "-m", "trainers.convert_bio", f"--input={processed_file}"]
    proc = subprocess.run(
        [*command, f"--output_dir={tmp_path / 'out'}", "--seed=42", "--compress"],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout)
    assert summary["counts"]["test"] == 4 and summary["files"]["pt"] == "pt.tfrecord.gz"
    schema = graphs.read_schema(tmp_path / "out" / "schema.pbtxt")
    assert graphs.count_graphs(str(tmp_path / "out" / "*.tfrecord.gz")) == 18 + 14 + 4
    assert len(graphs.load_graphs(str(tmp_path / "out" / "test.tfrecord.gz"), schema)) == 4
    missing = subprocess.run(
        [*command[:3], f"--input={tmp_path / 'nothing.pt'}", f"--output_dir={tmp_path / 'x'}"],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert missing.returncode == 1
    assert "convert_bio: No processed bio dataset file at" in missing.stderr
