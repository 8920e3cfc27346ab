"""What the AV and the AR share: LoRA wrapping, adapter files, checkpointing, prompt records."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import peft
import torch
from peft.tuners.lora.layer import Linear as PeftLoraLinear
from torch import nn
from torch.nn import functional as F

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
        tuned = peft.get_peft_model(model, config)
    except ValueError as err:
        raise ConfigError(f"LoRA target_modules {cfg.target_modules!r}: {err}") from None
    use_fast_lora(tuned)
    return tuned


class _KeepMasked(torch.autograd.Function):
    """y = x * keep, with `keep` rebuilt from the saved 16-bit draws in backward (2 bytes an
    element held for backward, not a float mask's 4)."""

    @staticmethod
    def forward(ctx, x, draws, keep_below: int):
        ctx.save_for_backward(draws)
        ctx.keep_below = keep_below
        return x.mul(_keep_mask(draws, keep_below, x.dtype))

    @staticmethod
    def backward(ctx, grad):
        (draws,) = ctx.saved_tensors
        return grad.mul(_keep_mask(draws, ctx.keep_below, grad.dtype)), None, None


def _keep_mask(draws: torch.Tensor, keep_below: int, dtype: torch.dtype) -> torch.Tensor:
    """1.0 where a draw (int16, read as unsigned) is below `keep_below`, else 0.0; arithmetic
    on integer-valued floats, since CPU kernels on bool masks run several times slower."""
    return draws.to(dtype).neg_().add_(keep_below - 32768).clamp_(0, 1)


class LoraDropout(nn.Module):
    """Inverted dropout on the LoRA branch's input, as `nn.Dropout(p)` but with its keep mask
    from 16-bit slices of 64-bit random words: one random word per 4 elements instead of one
    Bernoulli draw per element, and no bool mask (on CPU, `nn.Dropout` took 2.5 ms of a LoRA
    module's forward and backward at 8 x 64 x 576, this 1.2 ms; a LoRA AV step has 210 of
    them). p is rounded to a multiple of 1/65536 and the kept values scaled by the exact
    inverse of the keep probability, so the branch's expectation is unchanged."""

    def __init__(self, p: float) -> None:
        super().__init__()
        self.p = p
        self.keep_below = round((1 - p) * 65536)
        self.scale = 65536 / self.keep_below

    def masked(self, x: torch.Tensor) -> tuple[torch.Tensor, float]:
        """x with the dropped elements zeroed, unscaled, and the scale inverted dropout
        applies (1 in eval mode): the fused LoRA layer folds it into its own scaling."""
        if not self.training or self.p == 0:
            return x, 1.0
        n = x.numel()
        # Full-range int64 words: every one of their 16-bit slices is uniform.
        words = torch.randint(-(2**63), 2**63 - 1, ((n + 3) // 4,), device=x.device)
        draws = words.view(torch.int16)[:n].view(x.shape)
        return _KeepMasked.apply(x, draws, self.keep_below), self.scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dropped, scale = self.masked(x)
        return dropped if scale == 1.0 else dropped * scale

    def extra_repr(self) -> str:
        return f"p={self.p}"


class FusedLoraLinear(PeftLoraLinear):
    """PEFT's LoRA Linear with the branch fused: `addmm(W x, A drop(x), B^T, alpha=scaling)`
    computes the B product, the scaling (the dropout's too) and the sum in one BLAS call
    where PEFT runs a matmul, a multiply and an add over the full output (and their
    backward passes): fewer full-size passes in training, fewer ops a decode step. The same
    arithmetic up to float rounding, with PEFT's dtype rule (the branch runs in the adapter's
    dtype, the sum comes back in the base output's); PEFT's own forward runs whenever the fused
    one does not apply (adapters off or merged, several active, a LoRA variant, a bias on B,
    extra arguments)."""

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        active = self.active_adapters
        name = active[0] if len(active) == 1 else None
        if (
            args
            or kwargs
            or name is None
            or self.disable_adapters
            or self.merged
            or name not in self.lora_A
            or name in self.lora_variant
            or self.lora_B[name].bias is not None
        ):
            return super().forward(x, *args, **kwargs)
        a, b = self.lora_A[name].weight, self.lora_B[name].weight
        base = self.base_layer(x)
        x = x.to(a.dtype)
        dropout, scale = self.lora_dropout[name], 1.0
        if isinstance(dropout, LoraDropout):
            dropped, scale = dropout.masked(x)  # its scale joins addmm's alpha
        else:
            dropped = dropout(x)
        low_rank = F.linear(dropped, a)
        fused = torch.addmm(
            base.reshape(-1, base.shape[-1]).to(a.dtype),
            low_rank.reshape(-1, low_rank.shape[-1]),
            b.t(),
            alpha=self.scaling[name] * scale,
        )
        return fused.view(base.shape).to(base.dtype)


@contextlib.contextmanager
def stock_peft_layers(model: nn.Module) -> Iterator[None]:
    """Inside the block, `model`'s fused LoRA layers run PEFT's own forward (what a PEFT user
    runs: the benchmarks' peers; the fused layer's tests)."""
    fused = [m for m in model.modules() if type(m) is FusedLoraLinear]
    for module in fused:
        module.__class__ = PeftLoraLinear
    try:
        yield
    finally:
        for module in fused:
            module.__class__ = FusedLoraLinear


def use_fast_lora(model: nn.Module) -> None:
    """Every plain PEFT LoRA Linear of `model` runs the fused forward (`FusedLoraLinear`),
    and every LoRA dropout (PEFT's `nn.Dropout`, one per adapter) becomes a `LoraDropout`
    of the same p; adapters without dropout keep PEFT's identity. Call again after
    `load_adapter`: a new adapter brings its own dropout modules."""
    for module in model.modules():
        if type(module) is PeftLoraLinear:
            module.__class__ = FusedLoraLinear
        dropouts = getattr(module, "lora_dropout", None)
        if not isinstance(dropouts, nn.ModuleDict):
            continue
        for name, layer in dropouts.items():
            if isinstance(layer, nn.Dropout) and layer.p > 0:
                dropouts[name] = LoraDropout(layer.p).train(layer.training)


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
