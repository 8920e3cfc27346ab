"""Benchmark of the rl stage: rollout tokens/s, train tokens/s, seconds per step, peak RSS.

Builds the GRPO trainer exactly as the rl stage does (params.yaml, models/base, the SFT pair in
models/av and models/ar, the train vectors), runs warm-up steps and then timed steps, and
prints one JSON object to stdout. Rollout tokens are the sampled response tokens (the AR's
scoring pass is in the rollout time); train tokens are what the policy, its reference
and the live AR read in the update. Needs the pipeline up to sft_ar (`dvc repro sft_ar`).
Logs go to stderr.

    python benchmarks/rl.py --steps 4 --warmup 1
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
import time

import torch

from nla_repro import config as C
from nla_repro.platform import peak_rss_mb
from nla_repro.stages.rl import build

log = logging.getLogger("bench.rl")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=4, help="timed steps")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps first")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(name)s: %(message)s")
    params = C.load_params()
    cfg = dataclasses.replace(params.rl, max_steps=args.steps + args.warmup)
    for path in (C.AV_DIR, C.AR_DIR, C.ACTIVATIONS_PATH, C.LABELS_PATH):
        if not path.exists():
            log.error("%s: not found; run `dvc repro sft_ar sft_av` first", path)
            return 1
    trainer, _, _ = build(params, cfg)
    for step in range(args.warmup):
        trainer.step(step)
    timings, started = [], time.perf_counter()
    for step in range(args.warmup, args.warmup + args.steps):
        trainer.step(step)
        timings.append(trainer.last_timing)
    wall = time.perf_counter() - started

    def rate(tokens: str, seconds: str) -> float:
        return sum(t[tokens] for t in timings) / max(sum(t[seconds] for t in timings), 1e-9)

    report = {
        "benchmark": "rl",
        "profile": params.profile,
        "device": params.base.device,
        "threads": torch.get_num_threads(),
        "group_size": cfg.group_size,
        "vectors_per_step": cfg.vectors_per_step,
        "rollouts_per_step": cfg.group_size * cfg.vectors_per_step,
        "max_new_tokens": cfg.max_new_tokens,
        "train_ar": cfg.train_ar,
        "steps_timed": args.steps,
        "seconds_per_step": round(wall / args.steps, 2),
        "rollout_tokens_per_s": round(rate("rollout_tokens", "rollout_s"), 1),
        "train_tokens_per_s": round(rate("train_tokens", "train_s"), 1),
        "rollout_share_of_step": round(
            sum(t["rollout_s"] for t in timings)
            / max(sum(t["rollout_s"] + t["train_s"] for t in timings), 1e-9),
            3,
        ),
        "peak_rss_mb": round(peak_rss_mb(), 1),
    }
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
