"""rl stage: GRPO on the AV, starting from the SFT pair, with the AR trained on the rollouts
-> models/rl/av, models/rl/ar, metrics/rl.json.

The AV and the AR are built as the sft stages build them (same base, LoRA shapes, prompts)
and loaded from models/av and models/ar; the AV gets a second, frozen copy of its SFT adapter
as the KL reference. The trainer is `training.grpo` on the shared training infrastructure:
checkpoints under models/rl/checkpoints/ (both models, the optimizer, the RNG), a relaunch
resumes. The published folders load with `load_av` / `load_ar` like the SFT ones; their
sidecars are the SFT sidecars plus what RL changed.
"""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import yaml

from nla_repro import config as C
from nla_repro.errors import ConfigError
from nla_repro.io import atomic_path, code_commit, sha256_file, write_yaml
from nla_repro.models import SharedBase, load_base, read_base_meta
from nla_repro.nla import build_ar
from nla_repro.nla.adapters import save_adapter, use_fast_lora
from nla_repro.pipeline import code_sha256, stage_view
from nla_repro.stages.sft_av import build_av
from nla_repro.templates import load_template
from nla_repro.training.grpo import POLICY_ADAPTER, REFERENCE_ADAPTER, GRPOTrainer, train
from nla_repro.training.run import Retention, TrainingRun, provenance
from nla_repro.training.sft import NORMALIZATION, split_inputs

SIDECAR = "nla_meta.yaml"


def _sft_sidecar(path: Path) -> dict:
    file = path / SIDECAR
    if not file.is_file():
        raise ConfigError(f"{file}: not found; the rl stage starts from sft_av and sft_ar")
    return yaml.safe_load(file.read_text())


def _files_sha256(path: Path) -> dict:
    return {p.name: sha256_file(p) for p in sorted(path.iterdir()) if p.is_file()}


def build(params: C.Params, cfg: C.RLConfig) -> tuple[GRPOTrainer, dict, dict]:
    """The trainer of `cfg` on this pipeline's SFT pair and vectors (what the stage, the rl
    benchmark and the lever sweep run), with the SFT sidecars and their files' sha256."""
    base = params.base
    if params.av.kind != "injection":
        raise ConfigError("rl: GRPO needs an injection AV (av.kind: injection)")
    sft = {"av": _sft_sidecar(C.AV_DIR), "ar": _sft_sidecar(C.AR_DIR)}
    sft_files = {"av": _files_sha256(C.AV_DIR), "ar": _files_sha256(C.AR_DIR)}
    # Neither model trains a base weight unless a norm is unfrozen: then they share one copy.
    shared = SharedBase(C.BASE_DIR, base.quantization, base.compute_dtype, base.device)
    separate = params.av.unfreeze_norms or params.ar.unfreeze_norms
    model, tokenizer = load_base(*shared.args) if separate else shared.load()
    av = build_av(params, model, tokenizer, load_template(params.av.prompt))
    av.load(C.AV_DIR)
    av.model.load_adapter(C.AV_DIR, adapter_name=REFERENCE_ADAPTER)  # frozen: is_trainable off
    use_fast_lora(av.model)  # the reference adapter's layers and dropouts
    av.model.set_adapter(POLICY_ADAPTER)
    ar_model, ar_tokenizer = load_base(*shared.args) if separate else shared.load()
    template = load_template(params.ar.prompt)
    ar = build_ar(ar_model, ar_tokenizer, template, params.ar, params.ar_layers)
    ar.load(C.AR_DIR)
    # The same pairs and splits the sft stages trained on: RL reads only their vectors.
    pairs = split_inputs(int(read_base_meta(C.BASE_DIR)["d_model"]), params.extract.layer)
    train_vectors = pairs["train"][1]
    val_vectors = pairs["val"][1][: cfg.val_rows or None]
    if not len(train_vectors):
        raise ConfigError("rl: no training vectors (no accepted labels in the train split)")
    formatted = params.label.mode != "source_text"
    trainer = GRPOTrainer(av, ar, train_vectors, val_vectors, cfg, formatted=formatted)
    return trainer, sft, sft_files


def run(params: C.Params) -> dict:
    params = stage_view(params, "rl")
    cfg, base = params.rl, params.base
    trainer, sft, sft_files = build(params, cfg)
    av, ar = trainer.av, trainer.ar
    meta = read_base_meta(C.BASE_DIR)
    sidecar = provenance(
        "nla-rl",
        meta,
        base,
        layer=params.extract.layer,
        d_model=int(meta["d_model"]),
        position_rule=sft["av"]["position_rule"],
        normalization=NORMALIZATION,
        params={"rl": dataclasses.asdict(cfg)},
        inputs_sha256={
            **{str(p): sha256_file(p) for p in (C.LABELS_PATH, C.ACTIVATIONS_PATH)},
            **{f"{C.AV_DIR}/{k}": v for k, v in sft_files["av"].items()},
            **{f"{C.AR_DIR}/{k}": v for k, v in sft_files["ar"].items()},
        },
        code_sha256=code_sha256("rl"),
        label_mode=params.label.mode,
    )
    run_ = TrainingRun("rl", C.RL_DIR, sidecar, Retention(keep_last=None))

    def model_sidecar(role: str, step: int) -> dict:
        """The SFT sidecar (what loading needs: params, prompts, marker, layers) with what RL
        changed: the model name, the RL params and step, the SFT files it started from, and
        this run's code and fingerprint."""
        return {
            **sft[role],
            "model": f"{sft[role]['model']}-rl",
            "stage": "rl",
            "rl_step": step,
            "rl_params": dataclasses.asdict(cfg),
            "ar_trained_in_rl": cfg.train_ar,
            "sft_files_sha256": sft_files[role],
            "code_commit": code_commit(),
            "code_sha256": sidecar["code_sha256"],
            "fingerprint": run_.fingerprint,
        }

    def save_weights(directory: Path, step: int) -> None:
        save_adapter(av.model, directory / "av", adapters=[POLICY_ADAPTER])
        write_yaml(model_sidecar("av", step), directory / "av" / SIDECAR)
        ar.save(directory / "ar")
        write_yaml(model_sidecar("ar", step), directory / "ar" / SIDECAR)

    result = train(trainer, run_, save_weights, C.RL_METRICS)
    publish_curves()
    return result


CURVES = ("train_curve.csv", "val_curve.csv")


def publish_curves() -> None:
    """Each published folder carries its whole training record: the SFT stage's curves under
    their own names, and this run's as rl_*.csv (a release copies both)."""
    for role, sft_dir in (("av", C.AV_DIR), ("ar", C.AR_DIR)):
        for name in CURVES:
            pairs = ((sft_dir / name, name), (C.RL_DIR / name, f"rl_{name}"))
            for source, target in pairs:
                if source.is_file():
                    with atomic_path(C.RL_DIR / role / target) as tmp:
                        shutil.copyfile(source, tmp)
