"""TopK sparse autoencoders on the residual stream.

- `model`: the TopK SAE (k-sparse encoder backward, fused sparse decoder).
- `training`: its trainer, on the shared training infrastructure (`nla_repro.training.run`).
- `evaluation`: explained variance, FVU, MSE, L0, firing counts, LM loss recovered.
- `activations`: token activations in resumable shards, streamed through a shuffle buffer.
- `files`: SAELens's layout (`sae_lens.SAE.load_from_disk` loads our folders).

The names below are the public API (`from nla_repro.sae import load_sae`).
"""

from nla_repro.sae.evaluation import (
    SAEStats,
    StatsAccumulator,
    evaluate,
    lm_loss_recovered,
    loss_recovered,
    next_token_loss,
    splice_layer,
)
from nla_repro.sae.files import CFG_FILE, SPARSITY_FILE, WEIGHTS_FILE, load_sae, save_sae
from nla_repro.sae.model import TopKSAE, geometric_median, sparse_decode
from nla_repro.sae.training import (
    DeadLatents,
    Trainer,
    TrainSettings,
    fit,
    init_b_dec,
    scaled_lr,
    shuffled_batches,
    training_loss,
)

__all__ = [
    "CFG_FILE",
    "SPARSITY_FILE",
    "WEIGHTS_FILE",
    "DeadLatents",
    "SAEStats",
    "StatsAccumulator",
    "TopKSAE",
    "TrainSettings",
    "Trainer",
    "evaluate",
    "fit",
    "geometric_median",
    "init_b_dec",
    "lm_loss_recovered",
    "load_sae",
    "loss_recovered",
    "next_token_loss",
    "save_sae",
    "scaled_lr",
    "shuffled_batches",
    "sparse_decode",
    "splice_layer",
    "training_loss",
]
