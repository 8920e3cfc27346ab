"""Loading a trained pair: the pipeline's own folders or a downloaded release."""

from __future__ import annotations

from pathlib import Path

import peft
import yaml
from safetensors.torch import load_file

from nla_repro.errors import ConfigError
from nla_repro.models import SharedBase, load_base, truncate
from nla_repro.nla.adapters import use_fast_lora
from nla_repro.nla.reconstructor import HEAD_FILE, ActivationReconstructor
from nla_repro.nla.verbalizer import ActivationVerbalizer, PrefixVerbalizer, VerbalizerBase
from nla_repro.templates import PromptTemplate, load_template


def _read_meta(path: Path) -> dict:
    file = Path(path) / "nla_meta.yaml"
    if not file.exists():
        raise ConfigError(f"{file}: not found (is {path} an sft_av / sft_ar output folder?)")
    return yaml.safe_load(file.read_text())


def _template(meta: dict, role: str) -> PromptTemplate:
    recorded = meta["templates"][role]
    template = load_template(recorded["version"])
    if template.sha256 != recorded["sha256"]:
        raise ConfigError(
            f"prompt {recorded['version']} changed since this {role.upper()} was trained "
            f"(sha256 {template.sha256[:12]} vs recorded {recorded['sha256'][:12]})"
        )
    return template


def _base(base_dir: Path | str, shared: SharedBase | None, load: dict):
    return shared.load() if shared is not None else load_base(base_dir, **load)


def load_av(
    path: Path | str, base_dir: Path | str, shared: SharedBase | None = None, **load
) -> VerbalizerBase:
    """A trained AV from its folder (adapter or prefix weights + nla_meta.yaml), on the base
    in `base_dir`; `load` goes to models.load_base (quantization, compute_dtype, device);
    with `shared`, on a copy of that base sharing its weights (inference only)."""
    path = Path(path)
    meta = _read_meta(path)
    model, tokenizer = _base(base_dir, shared, load)
    params, scale = meta["params"], meta["injection_scale_resolved"]
    if meta["av"]["kind"] == "prefix":
        av: VerbalizerBase = PrefixVerbalizer(
            model, tokenizer, params["n_prefix"], scale, params["max_length"]
        )
        av.load(path)
    else:
        tuned = peft.PeftModel.from_pretrained(model, path)
        use_fast_lora(tuned)
        av = ActivationVerbalizer(
            tuned, tokenizer, _template(meta, "av"), scale, params["max_length"]
        )
        if av.marker.token_id != meta["av"]["marker_token_id"]:
            raise ConfigError(
                f"{path}: marker token {av.marker.token_id} under this tokenizer, but the AV "
                f"was trained with {meta['av']['marker_token_id']}"
            )
    return av.eval()


def load_ar(
    path: Path | str, base_dir: Path | str, shared: SharedBase | None = None, **load
) -> ActivationReconstructor:
    """A trained AR from its folder (adapter + head.safetensors + nla_meta.yaml); `shared`
    as for `load_av`."""
    path = Path(path)
    meta = _read_meta(path)
    model, tokenizer = _base(base_dir, shared, load)
    truncate(model, meta["ar_num_layers"])
    tuned = peft.PeftModel.from_pretrained(model, path)
    use_fast_lora(tuned)
    ar = ActivationReconstructor(
        tuned, tokenizer, _template(meta, "ar"), meta["params"]["max_length"]
    )
    ar.head.load_state_dict(load_file(path / HEAD_FILE))
    return ar.eval()
