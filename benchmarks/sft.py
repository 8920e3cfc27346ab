"""Benchmark of NLA training throughput: AV and AR tokens/s against the HF Trainer, and memory.

Builds the AV and the AR exactly as the sft stages do (params.yaml, models/base) and times
their optimizer steps on the training pairs (labels x activations; or synthetic explanations
and random vectors when those are missing). Each runs against the peer a user would otherwise
pick: `transformers.Trainer` on a PEFT LoRA model built from a fresh load of the base (same
LoRA r/alpha/dropout/target_modules, micro batch, max_length, AdamW, lr, weight decay,
gradient clipping, same rows in the same order), trained on the same token sequences,
dynamically padded to the batch max by a small collator:

- AV: a small module whose forward(input_ids, attention_mask, labels, vectors) arms a forward
  hook on the input embeddings that writes the scaled vector at the marker (as the AV's
  injector does) and calls the PEFT model with labels (prompt and pad positions -100), so HF
  computes its causal-LM loss, with logits at every position.
- AR: a small module over the truncated base + LoRA with the same identity-initialized value
  head on the last token and the same loss (mse_nrm).

After a warm-up of each (untimed), timed blocks alternate, ours then the Trainer's, so
machine noise hits both alike; the Trainer's blocks run inside its own train() (our block
runs from its on_step_end callback, outside the Trainer's timed span), so its time is every
step's whole loop: batch fetch and collation, forward, backward, clipping, optimizer step.
Prints one JSON object to stdout: per model, tokens/s of each (non-pad tokens read per second:
AV prompt + response, AR template), their ratio, the mean training loss of the last steps of
each and their ratio (to judge the speed at equal loss: target ours >= 1.3x the Trainer's),
achieved GFLOP/s of each against a torch.mm fp32 peak measured in the same run (as
benchmarks/extract.py), peak RSS (every model of the run), and on CUDA our peak VRAM (over
our warm-up steps, before the peer is loaded). The published Gemma-4-E2B NF4 recipe must fit
in 4 GB of VRAM (`vram_target_gb`). No network: HF_HUB_OFFLINE=1 in this process. Logs go to
stderr.

    python benchmarks/sft.py --steps 8 --warmup 2 --block 2
    python benchmarks/sft.py --steps 1 --warmup 1 --rows 16 --micro-batch 2   # a quick check
    python benchmarks/sft.py --no-peer   # ours only
    python benchmarks/sft.py --profile gemma-4-e2b-v0.1.dd   # on a GPU, with the base stage run
"""

from __future__ import annotations

import os

# Before huggingface_hub is imported (it reads this once): local files only, no Hub calls.
os.environ["HF_HUB_OFFLINE"] = "1"

import argparse
import contextlib
import dataclasses
import json
import logging
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from importlib import metadata

import numpy as np
import peft
import torch
from extract import (  # benchmarks/extract.py
    flops_per_token,
    head_dim,
    machine_record,
    matmul_peak,
)
from torch import nn

from nla_repro import config as C
from nla_repro.metrics import mse_nrm
from nla_repro.models import IGNORE, adapt, load_base, read_base_meta, truncate
from nla_repro.nla import build_ar, split_pairs, training_pairs
from nla_repro.nla.injection import injection_vectors
from nla_repro.platform import peak_rss_mb
from nla_repro.schemas import LABELS, activations_schema, read_parquet
from nla_repro.stages.sft_av import build_av
from nla_repro.templates import load_template
from nla_repro.training.sft import make_optimizer

log = logging.getLogger("bench.sft")
VRAM_TARGET_GB = 4.0
SPEED_TARGET = 1.3  # ours >= 1.3x the HF Trainer's tokens/s ...
LOSS_TOLERANCE = 0.02  # ... at equal loss: ours' last-steps loss at most 2% above the peer's


def training_rows(d_model: int, n: int) -> tuple[list[str], torch.Tensor, str]:
    if C.LABELS_PATH.exists() and C.ACTIVATIONS_PATH.exists():
        labels = read_parquet(C.LABELS_PATH, LABELS)
        acts = read_parquet(C.ACTIVATIONS_PATH, activations_schema(d_model))
        texts, vectors = split_pairs(training_pairs(labels, acts, d_model, "bench"), "train")
        if texts:
            return texts[:n], vectors[:n], "labels x activations (train split)"
    rng = np.random.default_rng(0)
    texts = [
        "<explanation>\n- a short news report about a flood in a river town\n"
        f'- mentions rainfall totals\n- final token: "rain{i}", the end of a sentence\n'
        "</explanation>"
        for i in range(n)
    ]
    vectors = torch.from_numpy(rng.standard_normal((n, d_model)).astype(np.float32)) * 10
    return texts, vectors, "synthetic"


def micro_rows(step: int, micro: int, cfg: C.TrainConfig, n_rows: int) -> slice:
    """The rows of micro-batch `micro` of optimizer step `step` (both models read these)."""
    mb = cfg.micro_batch
    start = ((step * cfg.grad_accum + micro) * mb) % max(n_rows - mb + 1, 1)
    return slice(start, start + mb)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# --- Ours ---------------------------------------------------------------------------------


class OursSteps:
    """Our optimizer step as the sft stage takes it (`training.sft.train`'s step_fn): forward
    on texts + vectors (tokenizing and padding inside), backward, gradient clipping, AdamW.
    The stage's LambdaLR is left out here as on the peer side: both run at a constant lr."""

    def __init__(self, model: nn.Module, cfg: C.TrainConfig, texts, vectors) -> None:
        self.model, self.cfg, self.texts, self.vectors = model, cfg, texts, vectors
        self.device = next(model.parameters()).device
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.optimizer, self.optimizer_name = make_optimizer(self.params, cfg, self.device)
        self.losses: list[float] = []
        self.next_step = 0
        model.train()

    def step(self) -> int:
        """One optimizer step; the tokens it read."""
        tokens, loss_sum = 0, 0.0
        for micro in range(self.cfg.grad_accum):
            rows = micro_rows(self.next_step, micro, self.cfg, len(self.texts))
            out = self.model(self.texts[rows], self.vectors[rows].to(self.device))
            (out["loss"] / self.cfg.grad_accum).backward()
            loss_sum += out["loss"].item()
            tokens += out["tokens"]
        if self.cfg.max_grad_norm:
            torch.nn.utils.clip_grad_norm_(self.params, self.cfg.max_grad_norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.losses.append(loss_sum / self.cfg.grad_accum)
        self.next_step += 1
        return tokens

    def block(self, n: int) -> tuple[float, int]:
        """n steps: (wall seconds, tokens)."""
        sync(self.device)
        t0 = time.perf_counter()
        tokens = sum(self.step() for _ in range(n))
        sync(self.device)
        return time.perf_counter() - t0, tokens


# --- The peer: transformers.Trainer on a PEFT LoRA model -------------------------------------


def peft_lora(model: nn.Module, cfg: C.TrainConfig) -> peft.PeftModel:
    """What a PEFT user writes, with the AV/AR config's LoRA settings."""
    config = peft.LoraConfig(
        r=cfg.lora_r,
        lora_alpha=cfg.lora_alpha,
        lora_dropout=cfg.lora_dropout,
        target_modules=cfg.target_modules,  # a str: PEFT full-matches it as a regex
        bias="none",
    )
    return peft.get_peft_model(model, config)


class InjectedCausalLM(nn.Module):
    """The AV for a Trainer user: a hook on the input embeddings writes the scaled vector at
    the marker position, and the PEFT model computes HF's causal-LM loss from `labels`."""

    def __init__(self, model: peft.PeftModel, marker_position: int, scale: float | None):
        super().__init__()
        self.model, self.position, self.scale = model, marker_position, scale
        self._vectors: torch.Tensor | None = None
        self.tokens_read, self.losses = 0, []
        model.get_input_embeddings().register_forward_hook(self._inject)

    def _inject(self, _module, _args, output: torch.Tensor):
        if self._vectors is None:
            return None
        out = output.clone()
        out[:, self.position] = self._vectors.to(device=out.device, dtype=out.dtype)
        return out

    def forward(self, input_ids, attention_mask, labels, vectors):
        self._vectors = injection_vectors(vectors, self.scale)
        try:
            out = self.model(
                input_ids=input_ids, attention_mask=attention_mask, labels=labels, use_cache=False
            )
        finally:
            self._vectors = None
        self.tokens_read += int(attention_mask.sum())
        self.losses.append(out.loss.detach())
        return out


class LastTokenRegressor(nn.Module):
    """The AR for a Trainer user: the truncated base + LoRA, an identity-initialized fp32
    Linear(d, d) on the last real token, loss mse_nrm."""

    def __init__(self, model: peft.PeftModel, d_model: int):
        super().__init__()
        self.model = model
        self.backbone = model.get_base_model().model  # the LlamaModel: no LM head
        device = next(model.parameters()).device
        self.head = nn.Linear(d_model, d_model, device=device, dtype=torch.float32)
        with torch.no_grad():
            self.head.weight.copy_(torch.eye(d_model))
            self.head.bias.zero_()
        self.tokens_read, self.losses = 0, []

    def forward(self, input_ids, attention_mask, vectors):
        hidden = self.backbone(
            input_ids=input_ids, attention_mask=attention_mask, use_cache=False
        ).last_hidden_state
        last = attention_mask.sum(dim=1) - 1
        pred = self.head(hidden[torch.arange(len(last), device=last.device), last].float())
        loss = mse_nrm(pred, vectors)
        self.tokens_read += int(attention_mask.sum())
        self.losses.append(loss.detach())
        return {"loss": loss}


class PadCollator:
    """Right-pads input_ids (and labels, with -100) to the batch's longest row."""

    def __init__(self, pad_id: int) -> None:
        self.pad_id = pad_id

    def __call__(self, features: list[dict]) -> dict:
        width = max(len(f["input_ids"]) for f in features)
        ids = torch.full((len(features), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        labels = torch.full_like(ids, IGNORE) if "labels" in features[0] else None
        for row, f in enumerate(features):
            n = len(f["input_ids"])
            ids[row, :n] = torch.tensor(f["input_ids"])
            mask[row, :n] = 1
            if labels is not None:
                labels[row, :n] = torch.tensor(f["labels"])
        batch = {
            "input_ids": ids,
            "attention_mask": mask,
            "vectors": torch.stack([f["vectors"] for f in features]),
        }
        if labels is not None:
            batch["labels"] = labels
        return batch


class Alternation:
    """Drives the timed blocks from the Trainer's on_step_end: after the peer's warm-up, our
    first block; then at the end of each peer block (its wall time from the end of our
    previous block), our next block."""

    def __init__(self, ours: OursSteps, peer: nn.Module, warmup: int, blocks: list[int]):
        self.ours, self.peer, self.warmup, self.blocks = ours, peer, warmup, blocks
        self.ours_blocks: list[tuple[float, int]] = []
        self.peer_blocks: list[tuple[float, int]] = []
        self.mark = (0.0, 0)

    def after_peer_step(self, done: int) -> None:
        if done < self.warmup:
            return
        if done > self.warmup:
            if done < self.warmup + sum(self.blocks[: len(self.peer_blocks) + 1]):
                return
            sync(self.ours.device)
            t0, tokens0 = self.mark
            self.peer_blocks.append((time.perf_counter() - t0, self.peer.tokens_read - tokens0))
        if len(self.ours_blocks) < len(self.blocks):
            self.ours_blocks.append(self.ours.block(self.blocks[len(self.ours_blocks)]))
        sync(self.ours.device)
        self.mark = (time.perf_counter(), self.peer.tokens_read)


def run_trainer(peer: nn.Module, features, collator, cfg: C.TrainConfig, alt: Alternation):
    """transformers.Trainer over `features` in order (one epoch = warm-up + timed steps)."""
    from transformers import Trainer, TrainerCallback, TrainingArguments

    class Callback(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            alt.after_peer_step(state.global_step)

    device = alt.ours.device
    steps = alt.warmup + sum(alt.blocks)
    with tempfile.TemporaryDirectory() as tmp:
        args = TrainingArguments(
            output_dir=tmp,
            max_steps=steps,
            per_device_train_batch_size=cfg.micro_batch,
            gradient_accumulation_steps=cfg.grad_accum,
            learning_rate=cfg.lr,
            lr_scheduler_type="constant",
            warmup_steps=0,
            optim="adamw_torch",  # torch.optim.AdamW, as ours (make_optimizer)
            weight_decay=cfg.weight_decay,
            max_grad_norm=cfg.max_grad_norm,
            train_sampling_strategy="sequential",  # the rows in our order
            remove_unused_columns=False,
            logging_strategy="no",
            save_strategy="no",
            eval_strategy="no",
            report_to=[],
            disable_tqdm=True,
            dataloader_num_workers=0,
            dataloader_pin_memory=device.type == "cuda",
            use_cpu=device.type == "cpu",
            seed=cfg.seed,
        )
        trainer = Trainer(
            model=peer,
            args=args,
            data_collator=collator,
            train_dataset=features,
            callbacks=[Callback()],
        )
        # disable_tqdm adds a PrinterCallback that prints the final metrics to stdout, where
        # this benchmark's JSON goes.
        with contextlib.redirect_stdout(sys.stderr):
            trainer.train()
    return args.optim


# --- FLOPs --------------------------------------------------------------------------------


def lora_flops_per_token(model: nn.Module) -> int:
    """Forward FLOPs per token of every LoRA A and B matmul."""
    total = 0
    for module in model.modules():
        lora_a = getattr(module, "lora_A", None)
        if isinstance(lora_a, nn.ModuleDict):
            for key, a in lora_a.items():
                b = module.lora_B[key]
                total += 2 * (a.in_features * a.out_features + b.in_features * b.out_features)
    return total


def train_flops(text_cfg, n_layers: int, lora_ft: int, shapes: list[tuple[int, int, int]]):
    """Analytic FLOPs of forward + backward over micro-batches (rows, padded width, positions
    per row that run the LM head; 0 with a value head on the last token instead). Over every
    padded position, attention over the full T x T (upper bounds, as in extract.py); frozen
    matmuls cost forward + input gradient (2x), LoRA and attention forward + both gradients
    (3x)."""
    d = text_cfg.hidden_size
    total = 0.0
    for rows, width, lm_positions in shapes:
        f = flops_per_token(text_cfg, width)
        attn = f["per_layer"]["attn_scores_values"]
        per_token = n_layers * (2 * (f["layer_total"] - attn) + 3 * attn) + 3 * lora_ft
        total += rows * width * per_token
        total += rows * lm_positions * 2 * f["lm_head"] if lm_positions else rows * 3 * 2 * d * d
    return total


# --- One model ----------------------------------------------------------------------------


def av_sequences(av, texts: list[str]) -> tuple[list[list[int]], list[list[int]]]:
    """The token ids the AV reads per row (prompt + response cut to max_length) and labels."""
    room = av.max_length - len(av.prompt_ids)
    responses = [av.response_ids(t)[:room] for t in texts]
    seqs = [av.prompt_ids + r for r in responses]
    labels = [[IGNORE] * len(av.prompt_ids) + r for r in responses]
    return seqs, labels


def summarize(blocks, losses, n_loss: int, flops: float, peak: float, steps: int) -> dict:
    wall = sum(t for t, _ in blocks)
    tokens = sum(n for _, n in blocks)
    return {
        "tokens_per_s": round(tokens / wall, 1),
        "s_per_step": round(wall / steps, 3),
        "tokens_timed": tokens,
        "block_s": [round(t, 3) for t, _ in blocks],
        "first_step_loss": losses[0],
        "loss_last_steps": statistics.fmean(losses[-n_loss:]),
        "losses": [round(x, 5) for x in losses],
        "gflops": round(flops / wall / 1e9, 2),
        "fraction_of_peak": round(flops / wall / 1e9 / peak, 4),
    }


def bench_model(name: str, params: C.Params, texts, vectors, args, peak_fn: Callable) -> dict:
    base, cfg = params.base, getattr(params, name)
    if args.micro_batch:
        cfg = dataclasses.replace(cfg, micro_batch=args.micro_batch)
    torch.manual_seed(cfg.seed)  # LoRA and head initialisation
    model, tokenizer = load_base(C.BASE_DIR, base.quantization, base.compute_dtype, base.device)
    template = load_template(cfg.prompt)
    text_cfg = model.config.get_text_config()
    if name == "av":
        nla = build_av(params, model, tokenizer, template)
        seqs, labels = av_sequences(nla, texts)
        n_layers = adapt(model).n_layers
    else:
        nla = build_ar(model, tokenizer, template, cfg, params.ar_layers)
        seqs, labels = nla.encode(texts), None
        n_layers = params.ar_layers
    ours = OursSteps(nla, cfg, texts, vectors)
    device = ours.device
    steps = args.steps
    block = min(args.block, steps)
    blocks = [block] * (steps // block) + ([steps % block] if steps % block else [])

    # Micro-batch shapes of the timed steps: (rows, padded width, LM-head positions per row).
    def shapes(lm_head: str) -> list[tuple[int, int, int]]:
        out = []
        for step in range(args.warmup, args.warmup + steps):
            for micro in range(cfg.grad_accum):
                rows = seqs[micro_rows(step, micro, cfg, len(texts))]
                width = max(len(s) for s in rows)
                prompt = len(nla.prompt_ids) if name == "av" else 0
                lm = {"none": 0, "response": width - prompt, "all": width}[lm_head]
                out.append((len(rows), width, lm))
        return out

    log.info("timing %s: %d warm-up + %d steps in blocks of %d", name, args.warmup, steps, block)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    for _ in range(args.warmup):
        ours.step()
    sync(device)
    peak_vram = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None

    peer = None
    if args.peer:
        torch.manual_seed(cfg.seed)  # the same LoRA A initialisation (B starts at zero)
        peer_base, _ = load_base(C.BASE_DIR, base.quantization, base.compute_dtype, base.device)
        if cfg.gradient_checkpointing:  # as ours (nla.adapters.enable_checkpointing)
            peer_base.gradient_checkpointing_enable(
                gradient_checkpointing_kwargs={"use_reentrant": False}
            )
        if name == "av":
            peer = InjectedCausalLM(peft_lora(peer_base, cfg), nla.marker.position, nla.scale)
            features = [
                {"input_ids": s, "labels": lab, "vectors": v}
                for s, lab, v in zip(seqs, labels, vectors, strict=True)
            ]
        else:
            truncate(peer_base, params.ar_layers)
            peer = LastTokenRegressor(peft_lora(peer_base, cfg), adapt(peer_base).d_model)
            features = [{"input_ids": s, "vectors": v} for s, v in zip(seqs, vectors, strict=True)]
        # The Trainer reads the rows in order: each step's micro-batches, as ours reads them.
        ordered = [
            features[i]
            for step in range(args.warmup + steps)
            for micro in range(cfg.grad_accum)
            for i in range(len(texts))[micro_rows(step, micro, cfg, len(texts))]
        ]
        alt = Alternation(ours, peer, args.warmup, blocks)
        pad = tokenizer.pad_token_id or 0
        peer_optim = run_trainer(peer, ordered, PadCollator(pad), cfg, alt)
        ours_blocks, peer_blocks = alt.ours_blocks, alt.peer_blocks
    else:
        ours_blocks = [ours.block(n) for n in blocks]

    peak = peak_fn(max(r * w for r, w, _ in shapes("none")), text_cfg)
    n_loss = max(1, min(args.loss_steps, steps))
    lora_ours = lora_flops_per_token(nla)
    ours_flops = train_flops(
        text_cfg, n_layers, lora_ours, shapes("response" if name == "av" else "none")
    )
    result = {
        **summarize(ours_blocks, ours.losses, n_loss, ours_flops, peak["best_gflops"], steps),
        "micro_batch": cfg.micro_batch,
        "grad_accum": cfg.grad_accum,
        "optimizer": ours.optimizer_name,
        "trainable_params": sum(p.numel() for p in ours.params),
        "train_gflop_timed": round(ours_flops / 1e9, 2),
    }
    if peak_vram is not None:
        result["peak_vram_gb"] = round(peak_vram, 3)
    if peer is not None:
        losses = [float(x) for x in peer.losses]
        ga = cfg.grad_accum
        step_losses = [statistics.fmean(losses[i : i + ga]) for i in range(0, len(losses), ga)]
        peer_flops = train_flops(
            text_cfg,
            n_layers,
            lora_flops_per_token(peer),
            shapes("all" if name == "av" else "none"),
        )
        theirs = summarize(peer_blocks, step_losses, n_loss, peer_flops, peak["best_gflops"], steps)
        theirs |= {
            "trainer": "transformers.Trainer",
            "transformers": metadata.version("transformers"),
            "peft": metadata.version("peft"),
            "optimizer": peer_optim,
            "trainable_params": sum(p.numel() for p in peer.parameters() if p.requires_grad),
            "train_gflop_timed": round(peer_flops / 1e9, 2),
            "model": (
                "PEFT LoRA on a fresh load of the base; an embedding forward hook writes the "
                "scaled vector at the marker; HF causal-LM loss from labels (prompt and pad "
                "-100), logits at every position"
                if name == "av"
                else "PEFT LoRA on a fresh load of the base truncated to the AR's blocks; "
                "identity-initialized Linear(d, d) on the last real token; mse_nrm"
            ),
            "data": "the same token sequences in the same order, pre-tokenized; right-padded to "
            "the batch max by a collator",
        }
        ratio = result["tokens_per_s"] / theirs["tokens_per_s"]
        loss_ratio = result["loss_last_steps"] / theirs["loss_last_steps"]
        pair_ratios = [
            (tp / np_) / (to / no)
            for (to, no), (tp, np_) in zip(ours_blocks, peer_blocks, strict=True)
        ]
        result |= {
            "hf_trainer": theirs,
            "speed_ratio": round(ratio, 4),
            "median_block_speed_ratio": round(statistics.median(pair_ratios), 4),
            "loss_ratio": round(loss_ratio, 4),
            "first_step_loss_abs_diff": abs(ours.losses[0] - step_losses[0]),
            "same_tokens_timed": result["tokens_timed"] == theirs["tokens_timed"],
            "meets_speed_target": ratio >= SPEED_TARGET,
            "meets_loss_target": loss_ratio <= 1 + LOSS_TOLERANCE,
            "meets_target_at_equal_loss": ratio >= SPEED_TARGET
            and loss_ratio <= 1 + LOSS_TOLERANCE,
        }
    result["matmul_peak"] = peak
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", help="profile to benchmark (default: params.yaml)")
    parser.add_argument("--steps", type=int, default=8, help="timed optimizer steps of each")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps of each first")
    parser.add_argument("--block", type=int, default=2, help="steps per alternating block")
    parser.add_argument("--rows", type=int, default=256, help="training rows to cycle through")
    parser.add_argument("--loss-steps", type=int, default=4, help="last steps the loss averages")
    parser.add_argument("--only", choices=["av", "ar"], help="benchmark one model")
    parser.add_argument("--micro-batch", type=int, help="override the config's micro_batch")
    parser.add_argument(
        "--peer",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="time the HF Trainer peer too (--no-peer: ours only)",
    )
    parser.add_argument("--peak-repeats", type=int, default=10, help="torch.mm peak repeats")
    args = parser.parse_args(argv)
    if args.steps < 1 or args.warmup < 1 or args.block < 1:
        parser.error("--steps, --warmup and --block must be >= 1")
    logging.basicConfig(level=logging.INFO, stream=sys.stderr)
    params = C.materialize_profile(args.profile) if args.profile else C.load_params()
    base = params.base
    meta = read_base_meta(C.BASE_DIR)
    texts, vectors, source = training_rows(int(meta["d_model"]), args.rows)
    report: dict = {
        "benchmark": "sft",
        "base_model": meta["source"]["name"],
        "profile": params.profile,
        "quantization": base.quantization,
        "compute_dtype": base.compute_dtype,
        "rows": len(texts),
        "rows_source": source,
        "micro_batch_override": args.micro_batch,
        "steps": args.steps,
        "warmup": args.warmup,
        "block": min(args.block, args.steps),
        "loss_steps": max(1, min(args.loss_steps, args.steps)),
        "lr_schedule": "constant (cfg.lr) for both",
        "timing_statistic": "tokens_per_s: timed tokens / summed wall time of the timed blocks; "
        "median_block_speed_ratio: median over adjacent (ours, peer) block pairs, less "
        "sensitive to load bursts from other processes",
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
    }
    load_before = os.getloadavg()

    def peak_fn(m: int, text_cfg) -> dict:
        return matmul_peak(
            m,
            text_cfg.hidden_size,
            text_cfg.intermediate_size,
            text_cfg.num_key_value_heads * head_dim(text_cfg),
            args.peak_repeats,
        )

    for name in ("av", "ar"):
        if args.only and args.only != name:
            continue
        report[name] = bench_model(name, params, texts, vectors, args, peak_fn)
        if torch.cuda.is_available():
            torch.cuda.empty_cache()  # the models of bench_model are gone
    peaks = [report[n]["matmul_peak"]["best_gflops"] for n in ("av", "ar") if n in report]
    report["matmul_peak_gflops"] = max(peaks)
    report["peak_rss_mb"] = peak_rss_mb()
    report["targets"] = {
        "speed_ratio_vs_hf_trainer": SPEED_TARGET,
        "loss_ratio_max": 1 + LOSS_TOLERANCE,
    }
    if torch.cuda.is_available():
        vram = [report[n].get("peak_vram_gb", 0) for n in ("av", "ar") if n in report]
        report["vram_target_gb"] = VRAM_TARGET_GB
        report["fits_vram_target"] = max(vram) <= VRAM_TARGET_GB
    report["machine"] = machine_record(load_before)
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
