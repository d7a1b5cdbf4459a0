"""A learned PT augmentation distribution (rotation angles) on real MNIST digits.

Run from the repository root (a few minutes on 2 CPU cores):

    python -m trainers.meta_pretrain --config=configs/mnist_augment.py \
        --workdir=runs/mnist_augment

Full-size MNIST on a GPU:

    python -m trainers.meta_pretrain --config=configs/mnist_augment.py:gpu \
        --workdir=runs/mnist_augment_gpu

PT classifies upright digits, each rotated by an angle from `augment.bin_angles`
drawn with probabilities softmax(phi), phi the meta-parameter (the PT loss is the
exact expectation over the bins, so it is differentiable in phi). FT digits are
rotated by the angles in `augment.ft_angles`, so the optimal PT distribution is
known by construction: uniform over those bins. Starting from uniform over all
bins, the learned distribution should end with most of its mass there. The
baseline keeps the uniform distribution. Under every bin, PT digits are also
shifted by up to `augment.shift_pixels` whole pixels (fixed, not learned).
"""

import ml_collections

from metapt_tf.training import online


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.experiment = "mnist_augment"
    config.seeds = (0, 1, 2)
    config.export = True

    config.data = ml_collections.ConfigDict()
    config.data.source = "auto"
    config.data.num_pt = 3000
    config.data.num_ft_train = 100
    # The meta-objective's FT val loss is on the whole FT val set: with 100 digits its
    # noise was as large as the differences between neighbouring bins.
    config.data.num_ft_val = 500
    config.data.num_ft_test = 1000
    config.data.pt_batch_size = 32
    # PT batch of each meta-step: with 32 the meta-gradient was noisy enough to walk the
    # distribution off the FT angles once PT had converged.
    config.data.meta_pt_batch_size = 256
    config.data.ft_batch_size = 50

    config.augment = ml_collections.ConfigDict()
    config.augment.bin_angles = (0, 30, 60, 90, 120, 150, 180, 210, 240, 270, 300, 330)
    config.augment.ft_angles = (90, 120)
    # A fixed augmentation under every bin: PT digits moved by up to 2 whole pixels, so
    # that 3000 digits are not memorised within the run, where rotations next to the
    # FT angles became worth having as extra data (README). 0: none.
    config.augment.shift_pixels = 2

    config.model = ml_collections.ConfigDict()
    config.model.architecture = "mlp"
    config.model.hidden_units = (256, 256)

    config.meta = online.default_config()
    config.meta.warmup_steps = 100
    # A meta-step after every PT step: the meta-gradient is informative while PT is
    # still learning, and P=5 gave phi only 200 updates, too few before PT converged.
    config.meta.pt_steps_per_meta_step = 1
    config.meta.num_meta_steps = 1000
    config.meta.pt_learning_rate = 1e-3
    # The FT task has the PT task's classes: FT starts from the PT head itself.
    config.meta.head = "pt_head"
    config.meta.ft_unroll_steps = 1
    config.meta.ft_learning_rate = 1e-2
    config.meta.solver = "neumann"
    config.meta.neumann_terms = 1
    config.meta.neumann_alpha = 1e-2
    config.meta.meta_learning_rate = 0.1
    # Late meta-gradients are mostly noise (PT has fit its 3000 digits and the FT val
    # loss rises): the meta learning rate decays to 0 over the run.
    config.meta.meta_lr_decay = "linear"
    config.meta.log_every = 50
    config.meta.checkpoint_every = 250

    config.finetune = ml_collections.ConfigDict()
    config.finetune.mode = "full"
    config.finetune.epochs = 30
    config.finetune.batch_size = 32
    config.finetune.learning_rate = 1e-3

    if arg == "gpu":
        config.data.source = "tfds"
        config.data.num_pt = 60000
        config.data.num_ft_train = 500
        config.data.num_ft_val = 500
        config.data.num_ft_test = 9000
        config.data.pt_batch_size = 128
        config.model.architecture = "cnn"
        config.data.meta_pt_batch_size = 512
        config.meta.warmup_steps = 1000
        config.meta.pt_steps_per_meta_step = 5
        config.meta.num_meta_steps = 5000
        config.meta.log_every = 100
        config.meta.checkpoint_every = 500
        config.meta.jit_compile = True
    elif arg not in (None, ""):
        raise ValueError(f"Unknown config variant {arg!r}; the only variant is 'gpu'.")
    return config.lock()
