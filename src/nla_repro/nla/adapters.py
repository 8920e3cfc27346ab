"""What the AV and the AR share: LoRA wrapping, adapter files, checkpointing, prompt records."""

from __future__ import annotations

from pathlib import Path

import peft
from torch import nn

from nla_repro.errors import ConfigError
from nla_repro.models import (
    norm_module_names,
)
from nla_repro.templates import PromptTemplate


def lora(model: nn.Module, cfg, unfreeze_norms: bool) -> peft.PeftModel:
    """Wrap the base in LoRA adapters; trained RMSNorms ride along as modules_to_save, so the
    saved folder reloads with `peft.PeftModel.from_pretrained` alone."""
    config = peft.LoraConfig(
        r=cfg.lora_r,
        lora_alpha=cfg.lora_alpha,
        lora_dropout=cfg.lora_dropout,
        target_modules=cfg.target_modules,
        modules_to_save=norm_module_names(model) if unfreeze_norms else None,
        bias="none",
    )
    try:
        return peft.get_peft_model(model, config)
    except ValueError as err:
        raise ConfigError(f"LoRA target_modules {cfg.target_modules!r}: {err}") from None


def save_adapter(model: peft.PeftModel, directory: Path, adapters: list[str] | None = None) -> None:
    """adapter_config.json + adapter_model.safetensors (of `adapters` only, when the model
    holds others, e.g. a frozen reference copy). PEFT also writes a README.md full of
    "[More Information Needed]"; the card stage writes the real card, so it is dropped."""
    model.save_pretrained(directory, safe_serialization=True, selected_adapters=adapters)
    (Path(directory) / "README.md").unlink(missing_ok=True)


def enable_checkpointing(model: nn.Module, on: bool) -> None:
    """Gradient checkpointing (non-reentrant: frozen embeddings need no input-grad hook)."""
    if on:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def template_record(template: PromptTemplate) -> dict:
    """How a sidecar names a prompt: version, sha256 and text."""
    return {"version": template.version, "sha256": template.sha256, "text": template.prompt}
