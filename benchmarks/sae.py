"""Benchmark of SAE training: this project's TopK SAE against SAELens's TopK trainer.

Both train on the same token activations (the sae stage's: every non-special token of the
train split at layer L of models/base, norm outliers dropped; synthetic k-sparse data when the
pipeline has not run), with the same width, k, batch size, Adam learning rate, warmup, gradient
clipping, b_dec initialization (geometric median) and the same batches in the same order. The
SAELens step is its `SAETrainer._train_step` (training_forward_pass with the AuxK loss on dead
latents, firing statistics, backward, clip, Adam step). Timed blocks of steps alternate between
the two so machine noise hits both alike (the first block is warm-up, untimed). Prints one
JSON object: tokens/s of each and their ratio, explained variance of each on held-out tokens
after the same number of tokens, and pass/fail against the target (>= 5x SAELens's tokens/s
at equal or better explained variance), and the roofline: the dense encoder forward (B x d @ d x
d_sae, the only part of a step that must touch every latent) at the best fp32 torch.mm GFLOP/s
measured in the same run at this batch (extract.py's `matmul_peak`), its share of our step, and
our step's fraction of that roofline (encoder FLOPs / peak / step time). Logs go to stderr.

    python benchmarks/sae.py                 # params.yaml's sae config, its sae.tokens
    python benchmarks/sae.py --tokens 307200 --expansion 8
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

from nla_repro import config as C
from nla_repro.platform import peak_rss_mb
from nla_repro.sae import (
    TopKSAE,
    Trainer,
    TrainSettings,
    evaluate,
    geometric_median,
    scaled_lr,
    shuffled_batches,
)

sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/: extract.py's helpers
from extract import matmul_peak, timed

log = logging.getLogger("bench.sae")
SPEED_TARGET = 5.0
EV_TOLERANCE = 0.005  # "equal" explained variance: within half a point


def stage_activations(params: C.Params) -> tuple[torch.Tensor, torch.Tensor, str]:
    """Train and held-out token activations exactly as the sae stage collects them."""
    from nla_repro.models import load_base
    from nla_repro.sae.activations import token_activations
    from nla_repro.schemas import CORPUS, read_parquet

    corpus = read_parquet(C.CORPUS_PATH, CORPUS)
    model, tokenizer = load_base(C.BASE_DIR, params.base.quantization, params.base.compute_dtype)
    with tempfile.TemporaryDirectory() as tmp:
        data = token_activations(
            model, tokenizer, corpus, params.sae, params.sae_layer, Path(tmp), ("bench",)
        )
        splits = ("train", params.sae.eval_split)
        train, held_out = (torch.cat(list(data.shards[s])) for s in splits)
    return train.float(), held_out.float(), f"sae stage activations, layer {params.sae_layer}"


def synthetic_activations(d: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, str]:
    gen = torch.Generator().manual_seed(seed)
    dirs = torch.randn(4 * d, d, generator=gen)
    dirs /= dirs.norm(dim=1, keepdim=True)
    n = 40_000
    idx = torch.stack([torch.randperm(4 * d, generator=gen)[:16] for _ in range(n)])
    x = (torch.rand(n, 16, 1, generator=gen) * dirs[idx]).sum(dim=1) * 10 + 3
    return x[:30_000], x[30_000:], "synthetic 16-sparse combinations"


def saelens_step_fn(sae, opt, sched, dead_window_steps: int):
    """One step of SAELens's SAETrainer._train_step (no logging, no autocast)."""
    from sae_lens.saes.sae import TrainStepInput

    since_fired = torch.zeros(sae.cfg.d_sae)
    state = {"steps": 0}

    def step(x: torch.Tensor) -> None:
        sae.train()
        out = sae.training_forward_pass(
            step_input=TrainStepInput(
                sae_in=x,
                dead_neuron_mask=(since_fired > dead_window_steps).bool(),
                coefficients={},
                n_training_steps=state["steps"],
                is_logging_step=False,
            )
        )
        with torch.no_grad():
            did_fire = out.feature_acts.bool().float().sum(-2).bool()
            if did_fire.is_sparse:
                did_fire = did_fire.to_dense()
            since_fired.add_(1)
            since_fired[did_fire] = 0
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(sae.parameters(), 1.0)
        opt.step()
        opt.zero_grad()
        sched.step()
        state["steps"] += 1

    return step


@torch.no_grad()
def explained_variance(forward, x_ND: torch.Tensor, batch: int = 4096) -> float:
    sq_err = 0.0
    for start in range(0, len(x_ND), batch):
        x = x_ND[start : start + batch]
        sq_err += (x - forward(x)).double().pow(2).sum().item()
    total = (x_ND.double() - x_ND.double().mean(dim=0)).pow(2).sum().item()
    return 1.0 - sq_err / total


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--params", type=Path, default=C.PARAMS_FILE)
    parser.add_argument("--tokens", type=int, help="training tokens for each (default sae.tokens)")
    parser.add_argument("--block", type=int, default=10, help="steps per alternating timed block")
    parser.add_argument("--k", type=int, help="override sae.k")
    parser.add_argument("--expansion", type=int, help="override sae.expansion")
    parser.add_argument("--batch-size", type=int, help="override sae.batch_size")
    parser.add_argument("--synthetic", action="store_true", help="skip the pipeline's data")
    parser.add_argument("--peak-repeats", type=int, default=10, help="torch.mm peak repeats")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, stream=sys.stderr)

    import sae_lens
    from sae_lens.saes.topk_sae import TopKTrainingSAE, TopKTrainingSAEConfig

    params = C.load_params(args.params) if args.params.exists() else C.Params()
    have_pipeline = C.BASE_DIR.exists() and C.CORPUS_PATH.exists()
    if have_pipeline and not args.synthetic:
        train, held_out, source = stage_activations(params)
    else:
        train, held_out, source = synthetic_activations(64)
    d = train.shape[1]
    cfg = params.sae
    k = args.k or cfg.k
    d_sae = (args.expansion * d) if args.expansion else cfg.width(d)
    batch = args.batch_size or cfg.batch_size
    lr = cfg.lr if cfg.lr is not None else scaled_lr(d_sae)
    steps = max((args.tokens or cfg.tokens) // batch, 1)
    log.info("%s: %d train / %d held-out tokens, d=%d", source, len(train), len(held_out), d)

    torch.manual_seed(cfg.seed)
    b_dec = geometric_median(train[torch.randperm(len(train))[: cfg.gm_sample]])
    ours = TopKSAE(d, d_sae, k, seed=cfg.seed)
    with torch.no_grad():
        ours.b_dec.copy_(b_dec)
    settings = TrainSettings.resolve(
        ours,
        batch_size=batch,
        lr=lr,
        warmup_steps=cfg.warmup_steps,
        aux_coef=cfg.aux_coef,
        dead_tokens=cfg.dead_tokens,
    )
    trainer = Trainer(ours, settings)

    theirs = TopKTrainingSAE(TopKTrainingSAEConfig(d_in=d, d_sae=d_sae, k=k))
    with torch.no_grad():
        theirs.b_dec.copy_(b_dec)
    opt = torch.optim.Adam(theirs.parameters(), lr=lr)
    warm = max(cfg.warmup_steps, 1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warm))
    their_step = saelens_step_fn(theirs, opt, sched, max(cfg.dead_tokens // batch, 1))

    sparse_error = None
    try:
        probe = TopKTrainingSAE(
            TopKTrainingSAEConfig(d_in=d, d_sae=d_sae, k=k, use_sparse_activations=True)
        )
        popt = torch.optim.Adam(probe.parameters(), lr=lr)
        psched = torch.optim.lr_scheduler.LambdaLR(popt, lambda s: 1.0)
        saelens_step_fn(probe, popt, psched, -1)(train[:batch])  # every latent "dead": AuxK on
    except Exception as err:  # report why SAELens's sparse mode cannot be timed here
        sparse_error = f"{type(err).__name__}: {str(err).splitlines()[0][:200]}"

    batches = shuffled_batches(lambda e: [train], batch, cfg.seed)
    timed_s = {"ours": 0.0, "saelens": 0.0}
    runners = {"ours": trainer.train_step, "saelens": their_step}
    # The first block warms both up and is not timed; later blocks alternate the two on the
    # same batches.
    for start in range(0, steps, args.block):
        block = [next(batches) for _ in range(min(args.block, steps - start))]
        for name, fn in runners.items():
            t0 = time.perf_counter()
            for x in block:
                fn(x)
            if start:
                timed_s[name] += time.perf_counter() - t0
    timed_steps = steps - min(args.block, steps)
    rates = {name: timed_steps * batch / max(t, 1e-9) for name, t in timed_s.items()}

    # The roofline: the encoder forward alone (as the step computes it) and the matmul peak.
    x = train[:batch]
    with torch.no_grad():
        xc, w_enc, b_enc = x - ours.b_dec, ours.W_enc.detach(), ours.b_enc.detach()

        def encoder() -> object:  # as _SparseTopKEncode.forward computes it
            return torch.addmm(b_enc, xc, w_enc.T).relu_().topk(k, dim=-1, sorted=False)

        encoder_s = min(timed(encoder) for _ in range(10))
        matmul_s = min(timed(lambda: torch.addmm(b_enc, xc, w_enc.T)) for _ in range(10))
        peak = matmul_peak(batch, d, d_sae, d, args.peak_repeats)
    encoder_gflop = 2 * batch * d * d_sae / 1e9
    step_s = batch / rates["ours"]
    roofline = {
        "encoder_forward_gflop_per_step": round(encoder_gflop, 3),
        "matmul_peak_gflops": peak["best_gflops"],
        "matmul_peak": peak,
        "encoder_matmul_gflops": round(encoder_gflop / matmul_s, 2),
        "encoder_matmul_fraction_of_peak": round(encoder_gflop / matmul_s / peak["best_gflops"], 4),
        "encoder_forward_with_relu_topk_s": round(encoder_s, 5),
        "ours_step_s": round(step_s, 5),
        "encoder_forward_share_of_ours_step": round(encoder_s / step_s, 4),
        "roofline_step_s": round(encoder_gflop / peak["best_gflops"], 5),
        "ours_fraction_of_roofline": round(encoder_gflop / peak["best_gflops"] / step_s, 4),
        "saelens_fraction_of_roofline": round(
            encoder_gflop / peak["best_gflops"] / (batch / rates["saelens"]), 4
        ),
    }

    ours.eval()
    ev_ours = evaluate(ours, held_out).explained_variance
    theirs.eval()
    ev_theirs = explained_variance(theirs, held_out)
    ratio = rates["ours"] / rates["saelens"]
    result = {
        "benchmark": "sae",
        "data": source,
        "train_tokens_available": len(train),
        "held_out_tokens": len(held_out),
        "config": {"d_model": d, "d_sae": d_sae, "k": k, "batch_size": batch, "lr": lr},
        "tokens_trained_each": steps * batch,
        "timed_steps_each": timed_steps,
        "ours": {"tokens_per_s": round(rates["ours"]), "explained_variance": ev_ours},
        "saelens": {
            "version": sae_lens.__version__,
            "tokens_per_s": round(rates["saelens"]),
            "explained_variance": ev_theirs,
            "mode": "dense activations (default); rescale_acts_by_decoder_norm=True",
            "sparse_activations_mode_error": sparse_error,
        },
        "speed_ratio": round(ratio, 2),
        "roofline": roofline,
        "ev_difference": ev_ours - ev_theirs,
        "peak_rss_mb": peak_rss_mb(),  # both trainers, one after the other
        "targets": {"speed_ratio": SPEED_TARGET, "ev_tolerance": EV_TOLERANCE},
        "pass": {
            "speed": ratio >= SPEED_TARGET,
            "explained_variance": ev_ours >= ev_theirs - EV_TOLERANCE,
        },
        "machine": {
            "platform": platform.platform(),
            "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "torch": str(torch.__version__),
        },
    }
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
