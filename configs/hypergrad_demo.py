"""Per-example PT weights learned by hypergradient on a noisy linear regression.

Run from the repository root (a few seconds on 2 CPU cores):

    python -m trainers.hypergrad_demo --config=configs/hypergrad_demo.py

This config is the binary's default, so `python -m trainers.hypergrad_demo` is the
same run. TensorBoard summaries go to `--workdir` (default runs/hypergrad_demo).
Override any field with `--config.<field>=<value>`, e.g.
`--config.solver=neumann --config.num_meta_steps=50`.

PT is weighted ridge regression on examples of which `corrupt_fraction` have
corrupted targets; FT is a few full-network SGD steps on a small clean set whose
validation loss drives the weights. FT sees fewer examples than there are
features, so it cannot undo a bad PT solution on its own: the FT validation loss
depends on which PT examples were trusted, which is what the weights learn.
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.seed = 0
    config.dtype = "float32"  # or "float64"

    # Problem: y = X theta* + label_noise * eps; corrupted targets are replaced.
    config.num_pt_examples = 200
    config.num_features = 20
    config.num_outputs = 10  # targets per example; see the library's docstring for why > 1
    config.corrupt_fraction = 0.3
    config.corruption = "flip"  # "flip": y -> -y;  "shift": y -> y + corruption_scale * eps
    config.corruption_scale = 3.0  # only for corruption="shift"
    config.label_noise = 0.1
    config.num_ft_train = 10  # < num_features: FT alone cannot recover theta*
    config.num_ft_val = 200

    # PT: weighted mean squared error + ridge_l2 * ||theta||^2.
    config.ridge_l2 = 0.01
    config.pt_optimizer = "sgd"  # or "adam"
    config.pt_learning_rate = 0.2
    config.pt_warmup_steps = 100  # plain PT (all weights 1) before the first meta-step
    config.pt_steps_per_meta_step = 10  # P

    # FT: K differentiable SGD steps on a copy of theta (full-network FT).
    config.ft_unroll_steps = 5  # K
    config.ft_learning_rate = 0.05

    # Implicit PT part: p ~ H^{-1} v.
    config.solver = "cg"  # "cg", "neumann" or "identity"
    config.cg_max_iters = 20
    config.cg_tol = 1e-6
    config.cg_damping = 0.0
    config.neumann_terms = 20
    config.neumann_alpha = 0.1  # also the Identity solver's alpha
    config.hvp_mode = "reverse_over_reverse"  # or "forward_over_reverse"

    # Meta-optimisation: Adam on phi, weights w = 2 * sigmoid(phi).
    config.num_meta_steps = 100  # T
    config.meta_learning_rate = 0.1
    config.log_every = 1  # meta-steps between progress lines and TensorBoard writes

    return config.lock()
