"""sae stage: a TopK SAE on token activations at layer L -> models/sae/, metrics/sae.json.

1. Activations: every token of the train split's documents and of the held-out split, except
   special tokens, in resumable shards under .nla_work/sae/ (`sae.activations`).
2. Training streams the shards through a shuffle buffer; checkpoints under
   models/sae/checkpoints/ (persisted); a relaunch resumes from the last one with the same
   data order and ends with the same weights (`sae.training.train_run`).
3. Metrics on the held-out tokens (explained variance, FVU, MSE, L0, dead/alive latents,
   feature density) and the LM loss recovered when the reconstruction replaces block L's
   output on held-out documents (clean vs SAE vs zero-ablation).
4. Weights in SAELens's layout at the top of models/sae/.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator
from pathlib import Path

import torch

from nla_repro import config as C
from nla_repro.evaluation.registry import report_rows
from nla_repro.evaluation.report import print_rows
from nla_repro.io import sha256_file, write_json, write_yaml
from nla_repro.models import adapt, load_base, read_base_meta, tokenize
from nla_repro.pipeline import code_sha256, stage_view
from nla_repro.plots import sae_plots
from nla_repro.sae.activations import token_activations
from nla_repro.sae.evaluation import evaluate, lm_loss_recovered
from nla_repro.sae.files import save_sae
from nla_repro.sae.model import TopKSAE
from nla_repro.sae.training import RETENTION, train_run
from nla_repro.schemas import CORPUS, read_parquet
from nla_repro.training.run import TrainingRun, provenance


def hook_names(model, layer: int) -> dict:
    """Where block L's output lives: TransformerLens/SAELens hook name and HF module name."""
    arch = adapt(model)
    module = next(name for name, mod in model.named_modules() if mod is arch.layers[layer])
    return {"hook_name": f"blocks.{layer}.hook_resid_post", "hf_hook_name": module}


def run(params: C.Params, work_root: Path = C.WORK_DIR, out_dir: Path = C.SAE_DIR) -> dict:
    params = stage_view(params, "sae")
    cfg, base = params.sae, params.base
    layer = params.sae_layer
    corpus = read_parquet(C.CORPUS_PATH, CORPUS)
    meta = read_base_meta(C.BASE_DIR)
    C.check_layer(layer, meta["n_layers"], meta["source"]["name"], "sae.layer")
    model, tokenizer = load_base(C.BASE_DIR, base.quantization, base.compute_dtype, base.device)
    device = next(model.parameters()).device
    arch = adapt(model)
    d_sae = cfg.width(arch.d_model)
    dtype = getattr(torch, cfg.dtype)
    corpus_sha = sha256_file(C.CORPUS_PATH)
    code_sha = code_sha256("sae")

    # 1. Token activations of the train and held-out splits, in shards.
    key = (corpus_sha, meta["files"], base.quantization, base.compute_dtype, code_sha)
    data = token_activations(model, tokenizer, corpus, cfg, layer, work_root / "sae", key)
    max_norm = data.max_norm
    train_data, eval_data = data.shards["train"], data.shards[cfg.eval_split]
    n_train = int((data.norms["train"] <= max_norm).sum())
    if n_train < cfg.batch_size:
        raise C.ConfigError(
            f"sae: {n_train} training tokens, fewer than sae.batch_size={cfg.batch_size}"
        )

    # 2. Train (or resume).
    sidecar = provenance(
        "nla-sae",
        meta,
        base,
        layer=layer,
        d_model=arch.d_model,
        position_rule="every token but special tokens; norm outliers dropped",
        normalization="none (raw residual stream)",
        params=dataclasses.asdict(cfg),
        inputs_sha256={str(C.CORPUS_PATH): corpus_sha},
        code_sha256=code_sha,
        d_sae=d_sae,
        outlier_max_norm=max_norm if math.isfinite(max_norm) else None,
    )
    run_ = TrainingRun("sae", out_dir, sidecar, RETENTION)
    sae = TopKSAE(arch.d_model, d_sae, cfg.k, seed=cfg.seed).to(device=device, dtype=dtype)
    trainer, history, timing = train_run(sae, train_data, cfg, run_, device)
    sae.eval()

    # 3. Metrics on held-out tokens and documents.
    def capped() -> Iterator[torch.Tensor]:
        left = cfg.eval_tokens or math.inf
        for part in eval_data:
            if left <= 0:
                return
            part = part[: int(min(left, len(part)))].to(device)
            left -= len(part)
            yield part

    held_out = evaluate(sae, capped())
    train_stats = evaluate(sae, (p.to(device) for p in train_data))
    n_docs = min(cfg.loss_docs, len(data.tokens[cfg.eval_split]))
    loss = (
        lm_loss_recovered(
            model,
            lambda h: sae(h.to(dtype)),
            data.tokens[cfg.eval_split][:n_docs],
            set(tokenizer.all_special_ids),
            layer,
            tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0,
            max_norm,
            cfg.extract_batch,
        )
        if n_docs
        else None
    )
    density = held_out.density
    dead_train = int(trainer.dead.dead.sum())
    metrics = {
        "n_tokens": held_out.n,
        "split": cfg.eval_split,
        "explained_variance": held_out.explained_variance,
        "fvu": held_out.fvu,
        "fvu_uncentred": held_out.fvu_uncentred,
        "mse": held_out.mse,
        "l0": held_out.l0,
        "latents": {
            "d_sae": d_sae,
            "k": cfg.k,
            "dead_training_window": dead_train,
            "alive_training_window": d_sae - dead_train,
            "dead_window_tokens": cfg.dead_tokens,
            "never_fired_held_out": int((held_out.fires == 0).sum()),
            "density_median": float(density.median()),
            "density_max": float(density.max()),
        },
        "loss_recovered": loss,
        "train_split": {
            "explained_variance": train_stats.explained_variance,
            "n_tokens": train_stats.n,
        },
        "tokens": {
            "train_available": n_train,
            "train_outliers_dropped": int(len(data.norms["train"]) - n_train),
            "held_out_outliers_dropped": int((data.norms[cfg.eval_split] > max_norm).sum()),
            "outlier_max_norm": max_norm if math.isfinite(max_norm) else None,
            "median_norm": data.median_norm,
            "trained": trainer.step * cfg.batch_size,
            "epochs": trainer.step * cfg.batch_size / n_train,
        },
        "training": {
            "steps": trainer.step,
            "batch_size": cfg.batch_size,
            "lr": trainer.settings.lr,
            "final_fvu_batch": history["train"][-1]["fvu"] if history["train"] else None,
        },
    }

    # 4. Publish: weights at the top of models/sae, metrics, curve, plots.
    names = hook_names(model, layer)
    sae_meta = {
        "model_name": meta["source"]["name"],
        **names,
        "hook_head_index": None,
        "context_size": cfg.max_length,
        "prepend_bos": tokenize(tokenizer, ["x"], 8)[0][0] == tokenizer.bos_token_id,
        "dataset_path": str(C.CORPUS_PATH),
        "nla_repro_layer": layer,
    }
    save_sae(sae, out_dir, sae_meta, density=density)
    headline = {k: metrics[k] for k in ("explained_variance", "fvu", "mse", "l0")}
    write_yaml(run_.meta(trainer.step, **names, headline=headline), out_dir / "nla_meta.yaml")
    run_.write_curves(history, validation=False)
    sae_plots(density.numpy(), history["train"], metrics, C.SAE_PLOTS)
    write_json(metrics, C.SAE_METRICS)
    data.clear()
    print_rows(report_rows("report:sae", {"sae": metrics}))
    return metrics | {"timing": timing}
