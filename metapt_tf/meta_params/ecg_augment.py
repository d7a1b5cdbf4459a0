"""A learned augmentation pipeline for 12-lead ECG as meta-parameters.

Signals are [batch, time, leads] tensors (T = 1024 samples, 12 leads in the ECG
experiment). Two kinds of augmentation:

- Fixed base augmentations, pure functions of the signal and explicit random draws:
  `random_lead_mask` zeros one random window per lead (up to `max_fraction` of the
  signal) and `additive_noise` adds U(0, max_scale) * per-lead std * N(0, 1).
- Learned augmentations whose parameters are the meta-parameters phi:
  `TimeWarp` (a smooth monotone random time warp, same for all leads of an example,
  whose strength is predicted per example by a small 1-D CNN times a learned global
  scale), `LearnedNoise` (additive noise with a learned scale) and `LearnedMask`
  (a random window per lead multiplied by 1 - learned strength).

`AugmentationPipeline` composes them. Randomness is separated from computation:
`sample_draws(batch, generator)` returns a dict of tensors and `apply(x, draws)` is a
deterministic function of x and the variables, differentiable in both, so the draws
can be held fixed (e.g. for finite-difference checks or for differentiating the same
two SimCLR views twice).

The time warp. For each example a standard normal field z is drawn at T / 4 points.
The log-speed field is

    l(t) = smooth(upsample(m(x) * g * z))(t),   m(x) = 2 * sigmoid(Dense(CNN(x))),
    g = scale_multiplier * s**2,

where CNN = 4 x [Conv1D(32, 15, stride 2), BatchNorm, ReLU] with global average
pooling, upsample is linear interpolation to T points and smooth is a normalized
Gaussian kernel (size 25, sigma 12) with symmetric padding. The warp integrates the
positive speed exp(l): the sample positions are

    p_0 = 0,   p_i = (T - 1) * sum_{j < i} exp(l_j) / sum_{j < T - 1} exp(l_j),

so p is non-decreasing (strictly increasing unless some speed underflows) for any
magnitude, keeps both end points, and is exactly p_i = i when m * g * z = 0 (then the
warp is the identity to the last bit). The output is x linearly interpolated at p,
all leads with the same p; it is differentiable in x and in p.

Every BatchNorm is `TwiceDifferentiableBatchNorm`, so the pipeline can sit inside a
loss that is differentiated twice. The convolutions have no bias (it would be cancelled
by the following BatchNorm and have a zero gradient).
"""

import math

import numpy as np
import tensorflow as tf

from metapt_tf.models.gin import TwiceDifferentiableBatchNorm

DOWNSAMPLE = 4
SMOOTH_KERNEL_SIZE = 25
SMOOTH_SIGMA = 12.0


def _check_signal(x: tf.Tensor, name: str = "x", length=None, num_leads=None) -> tf.Tensor:
    x = tf.convert_to_tensor(x)
    if x.shape.rank != 3:
        raise ValueError(
            f"{name} must have rank 3, [batch, time, leads]. Received shape {tuple(x.shape)}."
        )
    if not x.dtype.is_floating:
        raise ValueError(f"{name} must be a floating-point tensor. Received dtype {x.dtype.name}.")
    if length is not None and x.shape[1] is not None and x.shape[1] != length:
        raise ValueError(
            f"{name} must have {length} time steps (axis 1). Received shape {tuple(x.shape)}."
        )
    if num_leads is not None and x.shape[2] is not None and x.shape[2] != num_leads:
        raise ValueError(
            f"{name} must have {num_leads} leads (axis 2). Received shape {tuple(x.shape)}."
        )
    return x


def _check_fraction(name: str, value, allow_zero: bool = False) -> float:
    ok = isinstance(value, int | float | np.floating) and not isinstance(value, bool)
    low_ok = ok and (value >= 0.0 if allow_zero else value > 0.0)
    if not (low_ok and value <= 1.0):
        interval = "[0, 1]" if allow_zero else "(0, 1]"
        raise ValueError(f"{name} must be a number in {interval}. Received: {name}={value!r}.")
    return float(value)


def _check_positive_int(name: str, value, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}. Received: {name}={value!r}.")
    return int(value)


def _check_generator(generator) -> tf.random.Generator:
    if not isinstance(generator, tf.random.Generator):
        raise TypeError(
            f"generator must be a tf.random.Generator. Received: {type(generator).__name__}."
        )
    return generator


# Fixed base augmentations.


def sample_window(
    batch, length: int, num_leads: int, generator: tf.random.Generator, max_fraction: float = 0.5
) -> tuple[tf.Tensor, tf.Tensor]:
    """Random windows, one per example and lead: (start, size), both int32 [batch, leads].

    size is uniform in {0, ..., floor(max_fraction * length)} and start uniform in
    {0, ..., length - size}.
    """
    _check_generator(generator)
    max_fraction = _check_fraction("max_fraction", max_fraction)
    max_size = int(math.floor(max_fraction * length))
    u_size, u_start = tf.unstack(generator.uniform([2, batch, num_leads], dtype=tf.float64))
    size = tf.minimum(tf.cast(tf.floor(u_size * (max_size + 1)), tf.int32), max_size)
    room = length - size + 1
    start = tf.minimum(tf.cast(tf.floor(u_start * tf.cast(room, tf.float64)), tf.int32), room - 1)
    return start, size


def window_indicator(length: int, start: tf.Tensor, size: tf.Tensor, dtype) -> tf.Tensor:
    """1 inside [start, start + size) and 0 elsewhere, as [batch, length, leads]."""
    t = tf.range(length)[None, :, None]
    start = tf.convert_to_tensor(start)[:, None, :]
    size = tf.convert_to_tensor(size)[:, None, :]
    inside = tf.logical_and(t >= start, t < start + size)
    return tf.cast(inside, dtype)


def random_lead_mask(
    x: tf.Tensor, generator: tf.random.Generator, max_fraction: float = 0.5
) -> tf.Tensor:
    """Zeros one random window of each lead, at most `max_fraction` of its length."""
    x = _check_signal(x)
    length = x.shape[1]
    if length is None:
        raise ValueError("x must have a static number of time steps (axis 1).")
    start, size = sample_window(tf.shape(x)[0], length, tf.shape(x)[2], generator, max_fraction)
    return x * (1.0 - window_indicator(length, start, size, x.dtype))


def per_lead_std(x: tf.Tensor) -> tf.Tensor:
    """Standard deviation of each lead over time, [batch, 1, leads]."""
    return tf.math.reduce_std(x, axis=1, keepdims=True)


def additive_noise(
    x: tf.Tensor, generator: tf.random.Generator, max_scale: float = 0.1
) -> tf.Tensor:
    """x + U(0, max_scale) * per-lead std * N(0, 1); one uniform scale per example."""
    x = _check_signal(x)
    _check_generator(generator)
    if isinstance(max_scale, bool) or not isinstance(max_scale, int | float) or max_scale < 0:
        raise ValueError(f"max_scale must be a number >= 0. Received: max_scale={max_scale!r}.")
    scale = generator.uniform([tf.shape(x)[0], 1, 1], maxval=max_scale, dtype=x.dtype)
    noise = generator.normal(tf.shape(x), dtype=x.dtype)
    return x + scale * per_lead_std(x) * noise


# Differentiable helpers.


def interpolate_time(x: tf.Tensor, positions: tf.Tensor) -> tf.Tensor:
    """x [batch, T, leads] linearly interpolated at `positions` [batch, T'] in [0, T - 1].

    All leads of an example use the same positions. Differentiable in x and positions.
    """
    length = tf.shape(x)[1]
    positions = tf.clip_by_value(positions, 0.0, tf.cast(length - 1, positions.dtype))
    left = tf.stop_gradient(tf.minimum(tf.floor(positions), tf.cast(length - 2, positions.dtype)))
    frac = (positions - left)[:, :, None]
    left = tf.cast(left, tf.int32)
    x_left = tf.gather(x, left, batch_dims=1)
    x_right = tf.gather(x, left + 1, batch_dims=1)
    return x_left * (1.0 - frac) + x_right * frac


def _upsample_matrix(low: int, high: int) -> np.ndarray:
    """[high, low] matrix of linear interpolation with matching end points."""
    pos = np.arange(high) * (low - 1) / (high - 1)
    left = np.minimum(np.floor(pos).astype(int), low - 2)
    frac = pos - left
    m = np.zeros([high, low])
    m[np.arange(high), left] = 1.0 - frac
    m[np.arange(high), left + 1] = frac
    return m


def _gaussian_kernel(size: int, sigma: float) -> np.ndarray:
    t = np.arange(size) - (size - 1) / 2.0
    k = np.exp(-0.5 * (t / sigma) ** 2)
    return k / k.sum()


class TimeWarp(tf.Module):
    """Smooth monotone random time warp with a learned, input-dependent magnitude.

    Meta-parameters (`variables_list`): the trainable weights of the magnitude CNN
    (4 convolutions, 4 BatchNorms, the final Dense) and s, with global scale
    g = scale_multiplier * s**2. See the module docstring for the warp itself.

    Args:
      length: time steps T; a multiple of 4 with T / 4 >= 2.
      num_leads: leads (channels) of the input.
      initial_s, scale_multiplier: g = scale_multiplier * s**2, s = initial_s at the start.
      channels, kernel_size, num_conv: of the magnitude CNN.
      smooth_kernel_size, smooth_sigma: of the Gaussian smoothing of the log-speed.
    """

    def __init__(
        self,
        length: int = 1024,
        num_leads: int = 12,
        initial_s: float = 1.0,
        scale_multiplier: float = 1.0,
        channels: int = 32,
        kernel_size: int = 15,
        num_conv: int = 4,
        smooth_kernel_size: int = SMOOTH_KERNEL_SIZE,
        smooth_sigma: float = SMOOTH_SIGMA,
        dtype=tf.float32,
        name: str = "time_warp",
    ):
        super().__init__(name=name)
        self.length = _check_positive_int("length", length, minimum=2 * DOWNSAMPLE)
        if self.length % DOWNSAMPLE:
            raise ValueError(f"length must be a multiple of {DOWNSAMPLE}. Received: {length}.")
        self.num_leads = _check_positive_int("num_leads", num_leads)
        self.low_length = self.length // DOWNSAMPLE
        self.dtype = tf.as_dtype(dtype)
        self.scale_multiplier = float(scale_multiplier)
        self.s = tf.Variable(tf.constant(initial_s, self.dtype), name="s")
        with self.name_scope:
            layers = []
            for i in range(_check_positive_int("num_conv", num_conv)):
                layers += [
                    tf.keras.layers.Conv1D(
                        channels,
                        kernel_size,
                        strides=2,
                        padding="same",
                        use_bias=False,
                        dtype=self.dtype,
                        name=f"conv_{i}",
                    ),
                    TwiceDifferentiableBatchNorm(dtype=self.dtype, name=f"bn_{i}"),
                    tf.keras.layers.ReLU(dtype=self.dtype),
                ]
            layers += [
                tf.keras.layers.GlobalAveragePooling1D(dtype=self.dtype),
                tf.keras.layers.Dense(1, dtype=self.dtype, name="magnitude"),
            ]
            # Applied layer by layer: a Sequential model would cast its input to float32.
            self.cnn_layers = layers
            self._cnn(tf.zeros([1, self.length, self.num_leads], self.dtype), training=False)
        self._upsample = tf.constant(_upsample_matrix(self.low_length, self.length), self.dtype)
        self._smooth_size = _check_positive_int("smooth_kernel_size", smooth_kernel_size)
        self._kernel = tf.constant(
            _gaussian_kernel(self._smooth_size, float(smooth_sigma))[:, None, None], self.dtype
        )

    @property
    def network_variables(self) -> list[tf.Variable]:
        """The magnitude CNN's trainable variables."""
        return [v for layer in self.cnn_layers for v in layer.trainable_variables]

    @property
    def variables_list(self) -> list[tf.Variable]:
        return self.network_variables + [self.s]

    def _cnn(self, x: tf.Tensor, training: bool) -> tf.Tensor:
        for layer in self.cnn_layers:
            x = layer(x, training=training)
        return x

    def global_scale(self) -> tf.Tensor:
        return self.scale_multiplier * tf.square(self.s)

    def magnitude(self, x: tf.Tensor, training: bool = False) -> tf.Tensor:
        """Per-example magnitude 2 * sigmoid(Dense(CNN(x))), [batch]."""
        x = _check_signal(x, length=self.length, num_leads=self.num_leads)
        return 2.0 * tf.sigmoid(self._cnn(x, training=training)[:, 0])

    def sample_draws(self, batch, generator: tf.random.Generator) -> tf.Tensor:
        """The standard normal velocity field, [batch, T / 4]."""
        return _check_generator(generator).normal([batch, self.low_length], dtype=self.dtype)

    def _smooth(self, field: tf.Tensor) -> tf.Tensor:
        left = (self._smooth_size - 1) // 2
        right = self._smooth_size - 1 - left
        padded = tf.pad(field[:, :, None], [[0, 0], [left, right], [0, 0]], mode="SYMMETRIC")
        return tf.nn.conv1d(padded, self._kernel, stride=1, padding="VALID")[:, :, 0]

    def positions(self, x: tf.Tensor, noise: tf.Tensor, training: bool = False) -> tf.Tensor:
        """Sample positions p [batch, T] of the warp: non-decreasing, p_0 = 0, p_{T-1} = T - 1."""
        amplitude = self.magnitude(x, training=training) * self.global_scale()
        velocity = amplitude[:, None] * tf.cast(noise, self.dtype)
        log_speed = self._smooth(tf.linalg.matmul(velocity, self._upsample, transpose_b=True))
        # Subtracting the per-example maximum leaves p unchanged and avoids overflow.
        log_speed = log_speed - tf.stop_gradient(tf.reduce_max(log_speed, axis=1, keepdims=True))
        speed = tf.exp(log_speed[:, :-1])
        cumulative = tf.concat([tf.zeros_like(speed[:, :1]), tf.cumsum(speed, axis=1)], axis=1)
        # (c * (T - 1)) / total is exactly i when all speeds are 1.
        return cumulative * float(self.length - 1) / cumulative[:, -1:]

    def __call__(self, x: tf.Tensor, noise: tf.Tensor, training: bool = False) -> tf.Tensor:
        x = _check_signal(x, length=self.length, num_leads=self.num_leads)
        return interpolate_time(x, self.positions(x, noise, training=training))


class LearnedNoise(tf.Module):
    """x + scale * per-lead std * N(0, 1), scale = softplus(rho) (`initial_scale` at the start)."""

    def __init__(self, initial_scale: float = 0.05, dtype=tf.float32, name="learned_noise"):
        super().__init__(name=name)
        if not initial_scale > 0:
            raise ValueError(f"initial_scale must be > 0. Received: {initial_scale!r}.")
        rho = math.log(math.expm1(initial_scale))  # softplus^-1
        self.rho = tf.Variable(tf.constant(rho, dtype), name="rho")

    @property
    def variables_list(self) -> list[tf.Variable]:
        return [self.rho]

    def scale(self) -> tf.Tensor:
        return tf.nn.softplus(self.rho)

    def __call__(self, x: tf.Tensor, noise: tf.Tensor) -> tf.Tensor:
        x = _check_signal(x)
        return x + self.scale() * per_lead_std(x) * tf.cast(noise, x.dtype)


class LearnedMask(tf.Module):
    """Multiplies a random window of each lead by 1 - strength, strength = sigmoid(phi).

    strength is 1/2 at the start (phi = 0).
    """

    def __init__(self, dtype=tf.float32, name: str = "learned_mask"):
        super().__init__(name=name)
        self.phi = tf.Variable(tf.zeros([], dtype), name="phi")

    @property
    def variables_list(self) -> list[tf.Variable]:
        return [self.phi]

    def strength(self) -> tf.Tensor:
        return tf.sigmoid(self.phi)

    def __call__(self, x: tf.Tensor, start: tf.Tensor, size: tf.Tensor) -> tf.Tensor:
        x = _check_signal(x)
        window = window_indicator(tf.shape(x)[1], start, size, x.dtype)
        return x * (1.0 - self.strength() * window)


class AugmentationPipeline(tf.Module):
    """Time warp, masks and noise; each call gives one augmented view.

    Order: learned time warp, base mask, learned mask, base noise, learned noise.
    `variables_list` holds the meta-parameters: the warp's CNN weights and s, the
    learned noise's rho and the learned mask's phi (those switched on).

    Args:
      length, num_leads: the shape [T, leads] of one signal.
      base_augmentations: apply `random_lead_mask` and `additive_noise` (their draws).
      learned_noise, learned_mask: include `LearnedNoise` / `LearnedMask`.
      max_mask_fraction, max_noise_scale: of the base augmentations; the learned mask
        draws its windows with the same `max_mask_fraction`.
      warp_kwargs: passed on to `TimeWarp`.
    """

    def __init__(
        self,
        length: int = 1024,
        num_leads: int = 12,
        base_augmentations: bool = True,
        learned_noise: bool = True,
        learned_mask: bool = True,
        max_mask_fraction: float = 0.5,
        max_noise_scale: float = 0.1,
        initial_noise_scale: float = 0.05,
        dtype=tf.float32,
        name: str = "augmentation_pipeline",
        **warp_kwargs,
    ):
        super().__init__(name=name)
        self.dtype = tf.as_dtype(dtype)
        self.time_warp = TimeWarp(length, num_leads, dtype=self.dtype, **warp_kwargs)
        self.length, self.num_leads = self.time_warp.length, self.time_warp.num_leads
        self.base_augmentations = bool(base_augmentations)
        self.max_mask_fraction = _check_fraction("max_mask_fraction", max_mask_fraction)
        if isinstance(max_noise_scale, bool) or not max_noise_scale >= 0:
            raise ValueError(f"max_noise_scale must be >= 0. Received: {max_noise_scale!r}.")
        self.max_noise_scale = float(max_noise_scale)
        self.learned_noise = (
            LearnedNoise(initial_noise_scale, dtype=self.dtype) if learned_noise else None
        )
        self.learned_mask = LearnedMask(dtype=self.dtype) if learned_mask else None

    @property
    def variables_list(self) -> list[tf.Variable]:
        out = self.time_warp.variables_list
        for part in (self.learned_noise, self.learned_mask):
            if part is not None:
                out += part.variables_list
        return out

    def sample_draws(self, batch, generator: tf.random.Generator) -> dict[str, tf.Tensor]:
        """All random draws of one view for `batch` examples, as a dict of tensors."""
        _check_generator(generator)
        shape = [batch, self.length, self.num_leads]
        draws = {"warp": self.time_warp.sample_draws(batch, generator)}
        if self.base_augmentations:
            draws["mask_start"], draws["mask_size"] = sample_window(
                batch, self.length, self.num_leads, generator, self.max_mask_fraction
            )
            draws["noise_scale"] = generator.uniform(
                [batch, 1, 1], maxval=self.max_noise_scale, dtype=self.dtype
            )
            draws["noise"] = generator.normal(shape, dtype=self.dtype)
        if self.learned_mask is not None:
            draws["learned_mask_start"], draws["learned_mask_size"] = sample_window(
                batch, self.length, self.num_leads, generator, self.max_mask_fraction
            )
        if self.learned_noise is not None:
            draws["learned_noise"] = generator.normal(shape, dtype=self.dtype)
        return draws

    def apply(self, x: tf.Tensor, draws: dict[str, tf.Tensor], training: bool = False):
        """The augmented view: deterministic and differentiable in x and the variables."""
        x = _check_signal(x, length=self.length, num_leads=self.num_leads)
        needed = ["warp"]
        if self.base_augmentations:
            needed += ["mask_start", "mask_size", "noise_scale", "noise"]
        if self.learned_mask is not None:
            needed += ["learned_mask_start", "learned_mask_size"]
        if self.learned_noise is not None:
            needed += ["learned_noise"]
        missing = [k for k in needed if k not in draws]
        if missing:
            raise KeyError(f"draws lacks {missing}; make them with sample_draws().")
        y = self.time_warp(x, draws["warp"], training=training)
        if self.base_augmentations:
            y = y * (
                1.0
                - window_indicator(self.length, draws["mask_start"], draws["mask_size"], y.dtype)
            )
        if self.learned_mask is not None:
            y = self.learned_mask(y, draws["learned_mask_start"], draws["learned_mask_size"])
        if self.base_augmentations:
            scale = tf.cast(draws["noise_scale"], y.dtype)
            y = y + scale * per_lead_std(y) * tf.cast(draws["noise"], y.dtype)
        if self.learned_noise is not None:
            y = self.learned_noise(y, draws["learned_noise"])
        return y

    def __call__(self, x: tf.Tensor, generator_or_draws, training: bool = False) -> tf.Tensor:
        """One augmented view; pass a `tf.random.Generator` or a dict from `sample_draws`."""
        if isinstance(generator_or_draws, tf.random.Generator):
            x = _check_signal(x, length=self.length, num_leads=self.num_leads)
            generator_or_draws = self.sample_draws(tf.shape(x)[0], generator_or_draws)
        elif not isinstance(generator_or_draws, dict):
            raise TypeError(
                "generator_or_draws must be a tf.random.Generator or a dict from sample_draws(). "
                f"Received: {type(generator_or_draws).__name__}."
            )
        return self.apply(x, generator_or_draws, training=training)
