"""sft_av stage: train the activation verbalizer -> models/av/, metrics/sft_av.json.

Injection kind: base + LoRA; the vector replaces the marker token's embedding and the AV
learns to write the label's explanation. Prefix kind: frozen base, a projection of the vector
and learned prefix embeddings, trained on the label texts (use label mode source_text for the
prefix-adapter recipe). Checkpoints under models/av/checkpoints/; a relaunch resumes.
"""

from __future__ import annotations

import logging

import torch

from nla_repro import config as C
from nla_repro.models import adapt, load_base
from nla_repro.nla import (
    ActivationVerbalizer,
    PrefixVerbalizer,
    enable_checkpointing,
    lora,
    mean_embedding_norm,
    template_record,
)
from nla_repro.pipeline import stage_view
from nla_repro.templates import PromptTemplate, load_template
from nla_repro.training.sft import stage_run, train

log = logging.getLogger(__name__)


def resolve_scale(scale, model) -> float | None:
    """The injection scale as a number (embed_norm measured on this model), or None (raw)."""
    if scale == "embed_norm":
        arch = adapt(model)
        return mean_embedding_norm(arch.embed, arch.embed.num_embeddings)
    return None if scale is None else float(scale)


def build_av(params: C.Params, model, tokenizer, template: PromptTemplate):
    cfg = params.av
    scale = resolve_scale(cfg.injection_scale, model)
    enable_checkpointing(model, cfg.gradient_checkpointing)
    if cfg.kind == "prefix":
        return PrefixVerbalizer(model, tokenizer, cfg.n_prefix, scale, cfg.max_length)
    return ActivationVerbalizer(
        lora(model, cfg, cfg.unfreeze_norms), tokenizer, template, scale, cfg.max_length
    )


def run(params: C.Params) -> dict:
    params = stage_view(params, "sft_av")
    cfg, base = params.av, params.base
    model, tokenizer = load_base(C.BASE_DIR, base.quantization, base.compute_dtype, base.device)
    torch.manual_seed(cfg.seed)  # LoRA, head and prefix initialisation
    template = load_template(cfg.prompt)
    av = build_av(params, model, tokenizer, template)
    extra = {
        "av": av.describe(),
        "injection_scale": cfg.injection_scale,
        "injection_scale_resolved": av.scale,
        "templates": {"av": template_record(template)},
    }
    run_, pairs = stage_run(params, "av", C.AV_DIR, extra)
    return train(av, *pairs["train"], *pairs["val"], cfg, run_, C.SFT_METRICS["av"])
