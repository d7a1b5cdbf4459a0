"""Backbones for 28x28 digit images: a small MLP and a small CNN.

Neither has batch norm or dropout, so the backbone computes the same function in
PT (training) and in the FT inner loop (inference), as the online algorithm
assumes when it shares the backbone between the two.
"""

import tensorflow as tf

ARCHITECTURES = ("mlp", "cnn")


def digit_backbone(
    architecture: str = "mlp",
    *,
    hidden_units: tuple[int, ...] = (256, 256),
    conv_filters: tuple[int, ...] = (32, 64),
    input_shape: tuple[int, int, int] = (28, 28, 1),
    name: str = "backbone",
) -> tf.keras.Model:
    """A Keras model mapping images [B, 28, 28, 1] to features [B, D].

    Args:
      architecture: "mlp" (flatten, then ReLU dense layers) or "cnn" (3x3 ReLU
        convolutions with 2x2 max pooling, then one ReLU dense layer).
      hidden_units: widths of the dense layers; the last is the feature size D.
      conv_filters: filters of the convolution blocks ("cnn" only).
    """
    if architecture not in ARCHITECTURES:
        raise ValueError(
            f"architecture must be one of {ARCHITECTURES}. Received: architecture={architecture!r}."
        )
    if not hidden_units or any(int(u) < 1 for u in hidden_units):
        raise ValueError(f"hidden_units must be positive ints. Received: {hidden_units!r}.")
    inputs = tf.keras.Input(shape=input_shape, name="image")
    x = inputs
    if architecture == "cnn":
        for i, filters in enumerate(conv_filters):
            x = tf.keras.layers.Conv2D(
                filters, 3, padding="same", activation="relu", name=f"conv{i}"
            )(x)
            x = tf.keras.layers.MaxPool2D(2, name=f"pool{i}")(x)
    x = tf.keras.layers.Flatten(name="flatten")(x)
    for i, units in enumerate(hidden_units):
        x = tf.keras.layers.Dense(int(units), activation="relu", name=f"dense{i}")(x)
    return tf.keras.Model(inputs, x, name=name)
