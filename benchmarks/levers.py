"""Lever sweep: what each training lever does to the embedded default's NLA.

Trains short AV and AR runs on the pipeline's labels and activations (params.yaml plus one
override per lever) exactly as the sft stages do (`build_av` / `build_ar`, `stage_run`,
`trainer.train`), into a temporary folder, and records each run's validation curve: the AV's
vector-use gap (loss with shuffled minus true vectors) and the AR's content gap (mse_nrm on
empty strings minus on the true explanations), with wall time and tokens/s. `--compare-rev`
adds the full eval of an earlier commit's default (e.g. the two-pass local labels) read from
git. Writes `benchmarks/levers.json` (temporary name, then renamed), which the card stage
renders into RELEASE_CALIBRATION.md; prints the JSON. Logs go to stderr.

    python benchmarks/levers.py --compare-rev 0a0d4e1
    python benchmarks/levers.py --only av:default,av:lr_x5     # a subset
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from nla_repro import config as C
from nla_repro.io import sha256_file, write_json
from nla_repro.models import load_base
from nla_repro.nla import build_ar
from nla_repro.stages.sft_av import build_av
from nla_repro.templates import load_template
from nla_repro.training.sft import stage_run, train

log = logging.getLogger("bench.levers")
OUT = Path("benchmarks/levers.json")
ATTENTION_ONLY = r".*layers\.\d+\.self_attn\.(q|k|v|o)_proj"

# name -> (model, overrides of params.av / params.ar, fraction of the training rows, what it is)
LEVERS: dict[str, tuple[str, dict, float, str]] = {
    "av:default": ("av", {}, 1.0, "the default AV (params.yaml)"),
    "av:embed_norm": (
        "av",
        {"injection_scale": "embed_norm"},
        1.0,
        "injection at the mean embedding norm instead of the raw vector",
    ),
    "av:lr_div2.5": ("av", {"lr_div": 2.5}, 1.0, "learning rate / 2.5"),
    "av:r4_attention": (
        "av",
        {"lora_r": 4, "lora_alpha": 8.0, "target_modules": ATTENTION_ONLY},
        1.0,
        "LoRA r=4 on attention only (default: r=16 on attention + MLP)",
    ),
    "av:half_rows": ("av", {}, 0.5, "half the training rows (corpus size)"),
    "ar:default": ("ar", {}, 1.0, "the default AR (params.yaml)"),
    "ar:r4_attention": (
        "ar",
        {"lora_r": 4, "lora_alpha": 8.0, "target_modules": ATTENTION_ONLY},
        1.0,
        "AR LoRA r=4 on attention only",
    ),
}


def lever_config(cfg: C.TrainConfig, overrides: dict, steps: int, val_rows: int) -> C.TrainConfig:
    """The stage's config with one lever moved, shortened to `steps` (validation at a third,
    two thirds and the end; one checkpoint at the end)."""
    changes = {k: v for k, v in overrides.items() if k not in ("lr_mul", "lr_div")}
    factor = overrides.get("lr_mul", 1) / overrides.get("lr_div", 1)
    if factor != 1:
        changes |= {"lr": cfg.lr * factor, "min_lr": cfg.min_lr * factor}
    interval = max(steps // 3, 1)
    changes |= {
        "max_steps": steps,
        "eval_interval": interval,
        "save_interval": steps,
        "release_step": 0,
        "warmup_steps": min(cfg.warmup_steps, steps // 4),
        "val_rows": val_rows,
    }
    return dataclasses.replace(cfg, **changes)


def run_lever(params: C.Params, name: str, steps: int, val_rows: int, out_root: Path) -> dict:
    kind, overrides, fraction, what = LEVERS[name]
    cfg = lever_config(getattr(params, kind), overrides, steps, val_rows)
    params = dataclasses.replace(params, **{kind: cfg})
    model, tokenizer = load_base(
        C.BASE_DIR, params.base.quantization, params.base.compute_dtype, params.base.device
    )
    torch.manual_seed(cfg.seed)
    template = load_template(cfg.prompt)
    if kind == "av":
        net = build_av(params, model, tokenizer, template)
    else:
        net = build_ar(model, tokenizer, template, cfg, params.ar_layers)
    out_dir = out_root / name.replace(":", "_")
    run, pairs = stage_run(params, kind, out_dir, net.describe())
    texts, vectors = pairs["train"]
    keep = max(int(len(texts) * fraction), cfg.micro_batch)
    started = time.perf_counter()
    metrics = train(
        net, texts[:keep], vectors[:keep], *pairs["val"], cfg, run, out_dir / "metrics.json"
    )
    curve = [
        row
        for row in _read_csv(out_dir / "val_curve.csv")
        if row["step"] in {0, *range(cfg.eval_interval, steps + 1, cfg.eval_interval), steps}
    ]
    return {
        "name": name,
        "model": kind,
        "what": what,
        "overrides": overrides,
        "train_rows": keep,
        "steps": steps,
        "val": curve,
        "tokens_per_s_median": metrics["timing"]["tokens_per_s_median"],
        "wall_s": round(time.perf_counter() - started, 1),
    }


def _read_csv(path: Path) -> list[dict]:
    import csv

    with path.open() as f:
        return [
            {k: (int(v) if k == "step" else float(v)) for k, v in row.items()}
            for row in csv.DictReader(f)
        ]


def from_git(rev: str) -> dict:
    """The full eval and AV training summary of an earlier commit's pipeline, from git."""

    def show(path: str) -> dict:
        text = subprocess.run(
            ["git", "show", f"{rev}:{path}"], capture_output=True, text=True, check=True
        ).stdout
        return json.loads(text)

    ev, label, sft_av = (
        show("metrics/eval.json"),
        show("metrics/label.json"),
        show("metrics/sft_av.json"),
    )
    commit = subprocess.run(
        ["git", "rev-parse", "--short", rev], capture_output=True, text=True, check=True
    ).stdout.strip()
    return {
        "rev": commit,
        "label_mode": label["mode"],
        "label_backend": label["backend"],
        "labels_accepted": label["accepted"],
        "av_steps": sft_av["released_step"],
        "av_train_rows": sft_av["train_rows"],
        "eval_n": ev["n"],
        "vector_use_gap": ev["vector_use"]["gap"],
        "explanation_share_cos": ev["ablation"]["explanation_share"]["cos"]["mean"],
        "explanation_share_fve_cen": ev["ablation"]["explanation_share"]["fve_cen"]["mean"],
        "identity_centred": ev["identity"]["centred"]["argmax_accuracy"],
        "unique_rate": ev["diversity"]["unique_rate"],
    }


def main() -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=36, help="optimizer steps per lever")
    parser.add_argument("--val-rows", type=int, default=32, help="validation rows per pass")
    parser.add_argument("--only", help="comma-separated lever names: " + ", ".join(LEVERS))
    parser.add_argument("--compare-rev", help="git revision of an earlier default to include")
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(name)s: %(message)s")
    names = args.only.split(",") if args.only else list(LEVERS)
    unknown = [n for n in names if n not in LEVERS]
    if unknown:
        parser.error(f"unknown lever(s) {unknown}; known: {', '.join(LEVERS)}")
    params = C.load_params()
    commit = subprocess.run(
        ["git", "describe", "--always", "--dirty"], capture_output=True, text=True
    ).stdout.strip()
    result = {
        "profile": params.profile,
        "label_mode": params.label.mode,
        "commit": commit,
        "date_utc": time.strftime("%Y-%m-%d", time.gmtime()),
        "machine": f"{platform.processor() or platform.machine()}, "
        f"{torch.get_num_threads()} threads, torch {torch.__version__}",
        "inputs_sha256": {str(p): sha256_file(p) for p in (C.LABELS_PATH, C.ACTIVATIONS_PATH)},
        "steps": args.steps,
        "val_rows": args.val_rows,
        "levers": [],
    }
    with tempfile.TemporaryDirectory(prefix="levers-") as tmp:
        for name in names:
            log.info("lever %s", name)
            result["levers"].append(run_lever(params, name, args.steps, args.val_rows, Path(tmp)))
    if args.compare_rev:
        result["earlier_default"] = from_git(args.compare_rev)
    write_json(result, args.out)
    return result


if __name__ == "__main__":
    print(json.dumps(main(), indent=2))
