"""RL lever sweep: what each GRPO lever does to the quality bars of the embedded default.

Each lever is a short rl run (params.yaml's `rl` with one change, `--steps` steps) from the
pipeline's SFT pair, built and stepped exactly as the rl stage does (`stages.rl.build`), then
scored on the eval split's rows: the RL AV's greedy outputs read by its live AR and by the
held-out SFT AR, against the mean direction, the text-free centroid, the random floor and the
empty string, with paired 95% intervals, and each quality bar these numbers decide (the
vector-use gap, which needs the AV's label losses, is left to the eval stage). The `sft` row
scores the SFT pair itself (0 steps). Writes benchmarks/rl_levers.json (temporary name, then
renamed), which the card stage renders into RELEASE_CALIBRATION.md; prints the JSON.

    python benchmarks/rl_levers.py                    # every lever, 20 steps each
    python benchmarks/rl_levers.py --only sft,default --steps 4
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

from nla_repro import config as C
from nla_repro.evaluation.baselines import baseline_columns
from nla_repro.evaluation.chunk import reconstruct, write
from nla_repro.evaluation.measures import (
    cosine_rows,
    diversity,
    fve_cen_rows,
    identity,
    paired_difference,
)
from nla_repro.evaluation.registry import BY_KEY, QUALITY_BARS, lead_key
from nla_repro.io import sha256_file, write_json
from nla_repro.models import read_base_meta
from nla_repro.nla import load_ar
from nla_repro.stages.eval import eval_inputs
from nla_repro.stages.rl import build

log = logging.getLogger("bench.rl_levers")
OUT = Path("benchmarks/rl_levers.json")

# name -> (overrides of params.rl, what it is); `sft` trains nothing.
LEVERS: dict[str, tuple[dict, str]] = {
    "sft": ({}, "the SFT pair, before RL (0 steps)"),
    "default": ({}, "params.yaml's rl section"),
    "group_8": ({"group_size": 8, "vectors_per_step": 2}, "group of 8 (2 vectors: same rollouts)"),
    "av_lr_x4": ({"av_lr_mul": 4.0}, "AV learning rate x 4"),
    "kl_0.1": ({"kl_coef": 0.1}, "KL coefficient 0.1 (default 0.01)"),
    "log_mse": ({"reward": "log_mse"}, "reward -log mse_nrm instead of -mse_nrm"),
    "frozen_ar": ({"train_ar": False}, "the AR frozen at SFT (rewards from the SFT AR)"),
}


def lever_config(cfg: C.RLConfig, overrides: dict, steps: int) -> C.RLConfig:
    changes = {k: v for k, v in overrides.items() if k != "av_lr_mul"}
    if "av_lr_mul" in overrides:
        changes["av_lr"] = cfg.av_lr * overrides["av_lr_mul"]
    return dataclasses.replace(cfg, **changes, max_steps=steps, save_interval=steps)


def score(av, ars: dict, params: C.Params, inputs, baselines: dict) -> dict:
    """Greedy round trip under each AR: the numbers the quality bars read, with intervals."""
    cfg = params.eval
    rows, mu = inputs.rows, inputs.mu
    targets = np.stack(rows["target"].to_list()).astype(np.float64)
    vectors = torch.from_numpy(targets.astype(np.float32))
    texts = write(av, vectors, dataclasses.replace(cfg, samples=0), cfg.seed)[0]
    seed, n_boot = cfg.seed, cfg.n_boot
    out = {"n": len(rows), "diversity": diversity(texts)}
    for name, ar in ars.items():
        rec = reconstruct(ar, texts, cfg.batch_size).astype(np.float64)
        empty = np.repeat(reconstruct(ar, [""], 1).astype(np.float64), len(rows), axis=0)
        cos, cen = cosine_rows(rec, targets), fve_cen_rows(rec, targets, mu)
        found = {
            "round_trip_cos": {"mean": float(cos.mean())},
            "round_trip_fve_cen": {"mean": float(cen.mean())},
            "identity_argmax_accuracy": {"mean": identity(rec, targets, mu)["argmax_accuracy"]},
            lead_key("empty", "cos"): paired_difference(
                cos, cosine_rows(empty, targets), seed, n_boot
            ),
            lead_key("empty", "fve_cen"): paired_difference(
                cen, fve_cen_rows(empty, targets, mu), seed, n_boot
            ),
            lead_key("random_floor", "cos"): paired_difference(
                cos, baselines["floor_cos"], seed, n_boot
            ),
            lead_key("random_floor", "fve_cen"): paired_difference(
                cen, baselines["floor_fve_cen"], seed, n_boot
            ),
        }
        for base in ("mean_direction", "centroid"):
            pred = np.stack(baselines[f"rec_{base}"]).astype(np.float64)
            found[lead_key(base, "cos")] = paired_difference(
                cos, cosine_rows(pred, targets), seed, n_boot
            )
            found[lead_key(base, "fve_cen")] = paired_difference(
                cen, fve_cen_rows(pred, targets, mu), seed, n_boot
            )
        found["unique_output_rate"] = {"mean": out["diversity"]["unique_rate"]}
        found["empty_output_rate"] = {"mean": out["diversity"]["empty_rate"]}
        found["eval_n"] = {"mean": len(rows)}
        bars = {}
        for bar in QUALITY_BARS:
            if bar.metric in found:
                got = found[bar.metric]
                bars[bar.metric] = bar.met(got["mean"], got.get("ci95"), bar.threshold)
        out[name] = {"numbers": found, "bars_met": bars, "bars_met_count": sum(bars.values())}
    out["mean_words"] = float(np.mean([len(t.split()) for t in texts]))
    return out


def run_lever(params: C.Params, name: str, steps: int, inputs, baselines, sft_ar) -> dict:
    overrides, what = LEVERS[name]
    cfg = lever_config(params.rl, overrides, steps)
    trainer, _, _ = build(params, cfg)
    started = time.perf_counter()
    for step in range(0 if name == "sft" else steps):
        trainer.step(step)
    train_s = time.perf_counter() - started
    trainer.av.eval()
    trainer.ar.eval()
    with torch.no_grad():
        scored = score(
            trainer.av, {"live_ar": trainer.ar, "heldout_ar": sft_ar}, params, inputs, baselines
        )
    return {
        "name": name,
        "what": what,
        "overrides": overrides,
        "steps": 0 if name == "sft" else steps,
        "score": scored,
        "train_s": round(train_s, 1),
        "wall_s": round(time.perf_counter() - started, 1),
    }


def main() -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=20, help="RL steps per lever")
    parser.add_argument("--only", help="comma-separated lever names: " + ", ".join(LEVERS))
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(name)s: %(message)s")
    names = args.only.split(",") if args.only else list(LEVERS)
    unknown = [n for n in names if n not in LEVERS]
    if unknown:
        parser.error(f"unknown lever(s) {unknown}; known: {', '.join(LEVERS)}")
    params = C.load_params()
    d_model = int(read_base_meta(C.BASE_DIR)["d_model"])
    inputs = eval_inputs(params.eval, d_model, params.extract.layer)
    targets = np.stack(inputs.rows["target"].to_list()).astype(np.float64)
    baselines, _ = baseline_columns(
        targets, inputs.train, inputs.train_families, inputs.pool, inputs.mu
    )
    load = {
        "quantization": params.base.quantization,
        "compute_dtype": params.base.compute_dtype,
        "device": params.base.device,
    }
    sft_ar = load_ar(C.AR_DIR, C.BASE_DIR, **load)
    commit = subprocess.run(
        ["git", "describe", "--always", "--dirty"], capture_output=True, text=True
    ).stdout.strip()
    result = {
        "profile": params.profile,
        "commit": commit,
        "date_utc": time.strftime("%Y-%m-%d", time.gmtime()),
        "machine": f"{platform.processor() or platform.machine()}, "
        f"{torch.get_num_threads()} threads, torch {torch.__version__}",
        "inputs_sha256": {
            str(p): sha256_file(p)
            for p in (C.LABELS_PATH, C.ACTIVATIONS_PATH, C.AV_DIR / "adapter_model.safetensors")
        },
        "split": params.eval.split,
        "steps": args.steps,
        "pipeline_rl_steps": params.rl.max_steps,
        "bars": [b.metric for b in QUALITY_BARS if b.metric != "vector_use_gap"],
        "bar_names": {b.metric: BY_KEY[b.metric].name for b in QUALITY_BARS},
        "levers": [],
    }
    for name in names:
        log.info("lever %s", name)
        result["levers"].append(run_lever(params, name, args.steps, inputs, baselines, sft_ar))
        write_json(result, args.out)  # after each lever: an interrupted sweep keeps its runs
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
