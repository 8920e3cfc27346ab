"""sft_ar stage: train the activation reconstructor -> models/ar/, metrics/sft_ar.json.

Blocks 0..L of the base (+ LoRA, final norm = identity) read the AR template around an
explanation; an identity-initialized Linear(d, d) head on the last token predicts the vector;
loss mse_nrm. Checkpoints under models/ar/checkpoints/; a relaunch resumes.
"""

from __future__ import annotations

import torch

from nla_repro import config as C
from nla_repro.models import load_base, read_base_meta
from nla_repro.nla import build_ar
from nla_repro.pipeline import stage_view
from nla_repro.templates import load_template
from nla_repro.training.sft import stage_run, train


def run(params: C.Params) -> dict:
    params = stage_view(params, "sft_ar")
    cfg, base = params.ar, params.base
    meta = read_base_meta(C.BASE_DIR)
    num_layers = params.ar_layers
    if num_layers > meta["n_layers"]:
        raise C.ConfigError(
            f"ar.num_layers={num_layers}: {meta['source']['name']} has {meta['n_layers']} blocks"
        )
    model, tokenizer = load_base(C.BASE_DIR, base.quantization, base.compute_dtype, base.device)
    torch.manual_seed(cfg.seed)  # LoRA, head and prefix initialisation
    ar = build_ar(model, tokenizer, load_template(cfg.prompt), cfg, num_layers)
    run_, pairs = stage_run(params, "ar", C.AR_DIR, ar.describe())
    return train(ar, *pairs["train"], *pairs["val"], cfg, run_, C.SFT_METRICS["ar"])
