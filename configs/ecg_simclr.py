"""SimCLR pre-training on 12-lead ECG with a meta-learned augmentation pipeline.

Run from the repository root (the synthetic default, 2 CPU cores):

    python -m trainers.run_benchmark --config=configs/ecg_simclr.py \
        --workdir=runs/ecg_simclr

Variants (after the colon):
  smoke  a tiny run of every method (CI, about a minute);
  paper  the paper's model (ResNet-18, channels 32/64/128/256, kernel 15) and
         schedule on the synthetic records (a GPU run);
  ptbxl  PTB-XL's 100 Hz records: --config.data.dir=<the PTB-XL directory>, the
         paper's model and schedule.

Methods: No PT; SimCLR with the augmentation pipeline frozen at its initial
value; SimCLR with the pipeline meta-learned through the FT-val loss of a
5-label diagnosis head. Each is fine-tuned on N labelled records (linear and
full FT) and tested on fold 10. Override fields with --config.<field>=<value>.
"""

import ml_collections

from metapt_tf.training import online


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.experiment = "ecg_simclr"
    config.seeds = (0, 1, 2)
    config.methods = ("no_pt", "simclr_fixed", "simclr_meta")
    config.num_labelled = (10, 25, 50, 100, 500)  # N labelled FT records
    config.export = True
    config.temperature = 0.5

    config.data = ml_collections.ConfigDict()
    config.data.source = "synthetic"  # or "ptbxl" (data.dir)
    config.data.dir = ""
    config.data.num_records = 3000  # synthetic only; fold 10 (a tenth) is the test set
    config.data.seed = 0
    config.data.duration_s = 10.0  # synthetic only: seconds per record at 100 Hz
    config.data.length = 1024
    config.data.max_test_records = 0  # 0: the whole test fold
    config.data.pt_batch_size = 64
    config.data.ft_batch_size = 32

    config.model = ml_collections.ConfigDict()
    config.model.channels = (16, 32, 64, 128)
    config.model.blocks = (1, 1, 1, 1)
    config.model.kernel_size = 15
    config.model.projection_hidden = 128
    config.model.projection_out = 64

    config.augment = ml_collections.ConfigDict()
    # g = s^2 at the start: a strong warp (the local speed of a view through its signal
    # ranges 0.02-4.0, 5th-95th percentile, on the synthetic records), far more than the
    # labels' QRS widths and rates vary; the fixed-augmentation baseline keeps it.
    config.augment.initial_warp_scale = 4.0
    config.augment.initial_noise_scale = 0.05
    config.augment.max_mask_fraction = 0.5
    config.augment.max_noise_scale = 0.1
    config.augment.warp_channels = 16
    config.augment.warp_conv_layers = 4
    # The magnitude network's meta learning rate, as a multiple of meta.meta_learning_rate
    # (the scalars g, noise scale and mask strength take meta.meta_learning_rate itself).
    # Slow, as in the paper's code (1e-4 for the network, 1 for the warp scale): at the
    # scalars' rate the network's noisy meta-gradients swung the warp from seed to seed.
    config.augment.network_meta_lr_scale = 0.01

    config.meta = online.default_config()
    config.meta.warmup_steps = 60
    config.meta.pt_steps_per_meta_step = 2
    config.meta.num_meta_steps = 60
    config.meta.pt_learning_rate = 1e-3
    config.meta.head = "persistent"
    config.meta.ft_unroll_steps = 1
    config.meta.ft_learning_rate = 1e-2
    config.meta.solver = "neumann"
    config.meta.neumann_terms = 1
    config.meta.neumann_alpha = 1e-3
    config.meta.meta_optimizer = "adam"
    config.meta.meta_learning_rate = 5e-2  # g moves by up to ~3 in the 60 meta-steps
    config.meta.log_every = 10
    config.meta.checkpoint_every = 25

    config.finetune = ml_collections.ConfigDict()
    config.finetune.modes = ("linear", "full")
    # Each mode's budget: about `steps` updates whatever N (whole epochs), Adam at
    # `learning_rate`. The linear probe trains on features computed once, so a
    # budget that fits it costs little; 150 updates at 1e-3 left it far from fit.
    config.finetune.linear = ml_collections.ConfigDict({"steps": 1000, "learning_rate": 1e-2})
    config.finetune.full = ml_collections.ConfigDict({"steps": 150, "learning_rate": 1e-3})

    if arg == "smoke":
        config.seeds = (0,)
        config.num_labelled = (10, 25)
        config.data.num_records = 120
        config.data.length = 256
        config.data.duration_s = 2.5
        config.data.pt_batch_size = 8
        config.data.ft_batch_size = 8
        # At least 16 channels: TF 2.21's oneDNN CPU convolutions corrupt memory with
        # 1-D convolutions of 8 channels or fewer at small batches (see the README).
        config.model.channels, config.model.blocks = (16, 16), (1, 1)
        config.model.kernel_size = 5
        config.model.projection_hidden = config.model.projection_out = 8
        config.augment.warp_channels, config.augment.warp_conv_layers = 16, 2
        config.meta.warmup_steps = 2
        config.meta.pt_steps_per_meta_step = 1
        config.meta.num_meta_steps = 2
        config.meta.log_every = config.meta.checkpoint_every = 1
        config.finetune.linear.steps = config.finetune.full.steps = 2
    elif arg in ("paper", "ptbxl"):
        config.model.channels, config.model.blocks = (32, 64, 128, 256), (2, 2, 2, 2)
        config.model.projection_hidden, config.model.projection_out = 256, 128
        config.augment.warp_channels = 32
        config.data.pt_batch_size = 256
        config.meta.warmup_steps = 1000
        config.meta.pt_steps_per_meta_step = 10
        config.meta.num_meta_steps = 2000
        config.meta.log_every = 50
        config.meta.checkpoint_every = 100
        config.finetune.full.steps = 1000
        if arg == "ptbxl":
            config.data.source = "ptbxl"
        else:
            config.data.num_records = 21837  # PTB-XL's size
    elif arg not in (None, ""):
        raise ValueError(
            f"Unknown config variant {arg!r}; the variants are 'smoke', 'paper' and 'ptbxl'."
        )
    return config.lock()
