"""Benchmark of NLA training throughput: AV and AR training tokens/s and peak memory.

Builds the AV and the AR exactly as the sft stages do (params.yaml, models/base), runs a few
warm-up steps and then timed optimizer steps on the training pairs (labels x activations; or
synthetic explanations and random vectors when those are missing), and prints one JSON object
to stdout: tokens/s per model (tokens the model reads per second: AV prompt + response, AR
template), peak RSS, and on CUDA the peak VRAM. The published Gemma-4-E2B NF4 recipe must fit
in 4 GB of VRAM (`vram_target_gb`). Logs go to stderr.

    python benchmarks/sft.py --steps 8 --warmup 2
    python benchmarks/sft.py --profile gemma-4-e2b-v0.1.dd   # on a GPU, with the base stage run
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time

import numpy as np
import torch

from nla_repro import config as C
from nla_repro.models import load_base, read_base_meta
from nla_repro.nla import build_ar, split_pairs, training_pairs
from nla_repro.platform import peak_rss_mb
from nla_repro.schemas import LABELS, activations_schema, read_parquet
from nla_repro.stages.sft_av import build_av
from nla_repro.templates import load_template
from nla_repro.training.sft import make_optimizer

log = logging.getLogger("bench.sft")
VRAM_TARGET_GB = 4.0


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


def time_training(model, cfg: C.TrainConfig, texts, vectors, steps: int, warmup: int) -> dict:
    device = next(model.parameters()).device
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer, opt_name = make_optimizer(params, cfg, device)
    model.train()
    mb = cfg.micro_batch
    tokens = 0
    elapsed = 0.0
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    for step in range(warmup + steps):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        step_tokens = 0
        for micro in range(cfg.grad_accum):
            start = ((step * cfg.grad_accum + micro) * mb) % max(len(texts) - mb + 1, 1)
            out = model(texts[start : start + mb], vectors[start : start + mb].to(device))
            (out["loss"] / cfg.grad_accum).backward()
            step_tokens += out["tokens"]
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if step >= warmup:
            elapsed += time.perf_counter() - t0
            tokens += step_tokens
    result = {
        "tokens_per_s": round(tokens / elapsed, 1),
        "s_per_step": round(elapsed / steps, 3),
        "tokens_timed": tokens,
        "micro_batch": mb,
        "grad_accum": cfg.grad_accum,
        "optimizer": opt_name,
        "trainable_params": sum(p.numel() for p in params),
    }
    if device.type == "cuda":
        result["peak_vram_gb"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 3)
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", help="profile to benchmark (default: params.yaml)")
    parser.add_argument("--steps", type=int, default=8, help="timed optimizer steps")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    parser.add_argument("--rows", type=int, default=256, help="training rows to cycle through")
    parser.add_argument("--only", choices=["av", "ar"], help="benchmark one model")
    args = parser.parse_args()
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
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
    }
    for name in ("av", "ar"):
        if args.only and args.only != name:
            continue
        torch.manual_seed(0)
        model, tokenizer = load_base(C.BASE_DIR, base.quantization, base.compute_dtype, base.device)
        cfg = getattr(params, name)
        template = load_template(cfg.prompt)
        if name == "av":
            nla = build_av(params, model, tokenizer, template)
        else:
            nla = build_ar(model, tokenizer, template, cfg, params.ar_layers)
        log.info("timing %s: %d warm-up + %d steps", name, args.warmup, args.steps)
        report[name] = time_training(nla, cfg, texts, vectors, args.steps, args.warmup)
        del nla, model
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    report["peak_rss_mb"] = peak_rss_mb()
    if torch.cuda.is_available():
        peaks = [report[n].get("peak_vram_gb", 0) for n in ("av", "ar") if n in report]
        report["vram_target_gb"] = VRAM_TARGET_GB
        report["fits_vram_target"] = max(peaks) <= VRAM_TARGET_GB
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
