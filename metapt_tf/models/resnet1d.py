"""The 1-D ResNet backbone and SimCLR projection head of the ECG experiment.

The backbone maps 12-lead ECG windows [B, length, num_leads] to features
[B, channels[-1]] (256 by default):

- stem: Conv1D(channels[0], kernel_size, stride 2) -> BatchNorm -> ReLU;
- `len(channels)` stages of `blocks[i]` basic blocks of width `channels[i]`. A basic
  block is Conv1D(k) -> BatchNorm -> ReLU -> Conv1D(k) -> BatchNorm, added to the
  shortcut, then ReLU. The first block of every stage after the first halves the
  length (stride 2 in its first convolution) and its shortcut is a projection,
  Conv1D(1, stride 2) -> BatchNorm; all other shortcuts are the identity;
- global average pooling over time.

Convolutions use "same" padding and no bias (each is followed by BatchNorm, whose
offset plays that role), so any length >= 1 works; the length shrinks by a factor
of 2 ** len(channels) (16 by default) before the pooling.

Every BatchNorm is `TwiceDifferentiableBatchNorm` with PyTorch's defaults, as in the
GIN: the SimCLR PT loss is computed in training mode (batch statistics) and is
differentiated twice by the hypergradient, where Keras' own layer gets the second
derivatives wrong.
"""

import tensorflow as tf

from metapt_tf.models.gin import (
    BATCH_NORM_EPSILON,
    BATCH_NORM_MOMENTUM,
    TwiceDifferentiableBatchNorm,
)


def _check_positive_int(value, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{what} must be an int >= 1. Received: {what}={value!r}.")
    return value


def _check_positive_ints(values, what: str) -> tuple[int, ...]:
    if (
        not isinstance(values, tuple | list)
        or not values
        or any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in values)
    ):
        raise ValueError(
            f"{what} must be a non-empty tuple of ints >= 1. Received: {what}={values!r}."
        )
    return tuple(values)


def _check_config(num_leads, length, channels, blocks, kernel_size):
    num_leads = _check_positive_int(num_leads, "num_leads")
    if length is not None:
        length = _check_positive_int(length, "length")
    channels = _check_positive_ints(channels, "channels")
    blocks = _check_positive_ints(blocks, "blocks")
    if len(channels) != len(blocks):
        raise ValueError(
            "channels and blocks must have one entry per stage, so the same length. "
            f"Received: channels={channels!r} (length {len(channels)}), "
            f"blocks={blocks!r} (length {len(blocks)})."
        )
    kernel_size = _check_positive_int(kernel_size, "kernel_size")
    return num_leads, length, channels, blocks, kernel_size


def _batch_norm(name: str) -> TwiceDifferentiableBatchNorm:
    return TwiceDifferentiableBatchNorm(
        momentum=BATCH_NORM_MOMENTUM, epsilon=BATCH_NORM_EPSILON, name=name
    )


def _conv(filters: int, kernel_size: int, strides: int, name: str) -> tf.keras.layers.Conv1D:
    return tf.keras.layers.Conv1D(
        filters, kernel_size, strides=strides, padding="same", use_bias=False, name=name
    )


def _basic_block(x, filters: int, kernel_size: int, strides: int, prefix: str):
    """Conv-BN-ReLU-Conv-BN plus shortcut, then ReLU; a projection shortcut if the shape changes."""
    shortcut = x
    if strides != 1 or x.shape[-1] != filters:
        shortcut = _conv(filters, 1, strides, f"{prefix}_shortcut_conv")(x)
        shortcut = _batch_norm(f"{prefix}_shortcut_bn")(shortcut)
    y = _conv(filters, kernel_size, strides, f"{prefix}_conv_0")(x)
    y = _batch_norm(f"{prefix}_bn_0")(y)
    y = tf.keras.layers.ReLU(name=f"{prefix}_relu_0")(y)
    y = _conv(filters, kernel_size, 1, f"{prefix}_conv_1")(y)
    y = _batch_norm(f"{prefix}_bn_1")(y)
    y = tf.keras.layers.Add(name=f"{prefix}_add")([y, shortcut])
    return tf.keras.layers.ReLU(name=f"{prefix}_relu_1")(y)


def resnet1d_backbone(
    *,
    num_leads: int = 12,
    length: int | None = 1024,
    channels: tuple[int, ...] = (32, 64, 128, 256),
    blocks: tuple[int, ...] = (2, 2, 2, 2),
    kernel_size: int = 15,
    name: str = "resnet1d",
) -> tf.keras.Model:
    """The 1-D ResNet: float32 [B, length, num_leads] -> features [B, channels[-1]].

    Args:
      num_leads: input channels (12 ECG leads).
      length: samples per window, or None for a model that takes any length.
      channels: width of each stage; the last is the feature size.
      blocks: number of basic blocks in each stage (one entry per stage).
      kernel_size: of the stem and of every block convolution (not the 1x1 shortcuts).
      name: the model's name.

    Returns:
      A Keras model; call it with `training=True` for batch statistics in the
      BatchNorms (PT), `training=False` for their moving statistics.
    """
    num_leads, length, channels, blocks, kernel_size = _check_config(
        num_leads, length, channels, blocks, kernel_size
    )
    if not isinstance(name, str) or not name:
        raise ValueError(f"name must be a non-empty str. Received: name={name!r}.")
    inputs = tf.keras.Input(shape=(length, num_leads), name="ecg")
    x = _conv(channels[0], kernel_size, 2, "stem_conv")(inputs)
    x = _batch_norm("stem_bn")(x)
    x = tf.keras.layers.ReLU(name="stem_relu")(x)
    for stage, (filters, num_blocks) in enumerate(zip(channels, blocks, strict=True)):
        for block in range(num_blocks):
            strides = 2 if stage > 0 and block == 0 else 1
            x = _basic_block(x, filters, kernel_size, strides, f"stage_{stage}_block_{block}")
    outputs = tf.keras.layers.GlobalAveragePooling1D(name="global_pool")(x)
    return tf.keras.Model(inputs, outputs, name=name)


def resnet1d_parameter_count(
    *,
    num_leads: int = 12,
    channels: tuple[int, ...] = (32, 64, 128, 256),
    blocks: tuple[int, ...] = (2, 2, 2, 2),
    kernel_size: int = 15,
    trainable_only: bool = False,
) -> int:
    """Closed-form size of `resnet1d_backbone` (it does not depend on the length).

    A Conv1D from c_in to c_out channels with kernel k has k c_in c_out weights (no
    bias); a BatchNorm on c channels has 4c weights, 2c of them trainable. Stem:
    k L c_0 + BN(c_0). Block c_in -> c_out: k c_in c_out + k c_out^2 + 2 BN(c_out),
    plus c_in c_out + BN(c_out) for a projection shortcut (the first block of each
    stage whose width or stride differs from its input).
    """
    num_leads, _, channels, blocks, k = _check_config(
        num_leads, None, channels, blocks, kernel_size
    )
    bn = 2 if trainable_only else 4
    total = k * num_leads * channels[0] + bn * channels[0]
    c_in = channels[0]
    for stage, (c_out, num_blocks) in enumerate(zip(channels, blocks, strict=True)):
        for block in range(num_blocks):
            total += k * c_in * c_out + k * c_out * c_out + 2 * bn * c_out
            if (stage > 0 and block == 0) or c_in != c_out:
                total += c_in * c_out + bn * c_out
            c_in = c_out
    return total


def projection_head(
    feature_dim: int = 256, hidden: int = 256, out: int = 128, *, name: str = "projection_head"
) -> tf.keras.Model:
    """SimCLR's projection head: features [B, feature_dim] -> Dense(hidden) -> ReLU -> Dense(out).

    The contrastive loss is computed on its output; fine-tuning uses the backbone's
    features, before the head.
    """
    feature_dim = _check_positive_int(feature_dim, "feature_dim")
    hidden = _check_positive_int(hidden, "hidden")
    out = _check_positive_int(out, "out")
    if not isinstance(name, str) or not name:
        raise ValueError(f"name must be a non-empty str. Received: name={name!r}.")
    return tf.keras.Sequential(
        [
            tf.keras.Input(shape=(feature_dim,), name="features"),
            tf.keras.layers.Dense(hidden, name="dense_0"),
            tf.keras.layers.ReLU(name="relu"),
            tf.keras.layers.Dense(out, name="dense_1"),
        ],
        name=name,
    )
