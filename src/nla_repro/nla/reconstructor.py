"""The activation reconstructor (AR): an explanation in, the vector it came from out.

Blocks 0..L of the base (+ LoRA), final norm = identity, an identity-initialized `Linear(d, d)`
value head (fp32) on the last token of the AR template; loss `mse_nrm`.
"""

from __future__ import annotations

from pathlib import Path

import peft
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from nla_repro.errors import ConfigError
from nla_repro.metrics import mse_nrm, mse_nrm_rows
from nla_repro.models import (
    adapt,
    batch_slices,
    pad_batch,
    truncate,
)
from nla_repro.nla.adapters import enable_checkpointing, lora, save_adapter, template_record
from nla_repro.templates import PromptTemplate

HEAD_FILE = "head.safetensors"


class ActivationReconstructor(nn.Module):
    """Blocks 0..L of the base (+ LoRA), final norm = identity, `Linear(d, d)` value head
    (identity at init, fp32) on the last token of the AR template."""

    def __init__(self, model: nn.Module, tokenizer, template: PromptTemplate, max_length: int):
        super().__init__()
        self.model, self.tokenizer, self.template = model, tokenizer, template
        self.max_length, self.read_tokens = max_length, 0
        arch = adapt(model)
        if not isinstance(arch.final_norm, nn.Identity):
            raise ConfigError("ActivationReconstructor needs a truncated base (models.truncate)")
        device = next(model.parameters()).device
        self.head = nn.Linear(arch.d_model, arch.d_model, device=device, dtype=torch.float32)
        with torch.no_grad():
            self.head.weight.copy_(torch.eye(arch.d_model))
            self.head.bias.zero_()

    def encode(self, texts: list[str]) -> list[list[int]]:
        """Template token ids with special tokens (BOS kept). An over-long sequence loses the
        explanation's end, never the template's tail, so the last token is always the
        template's last."""
        suffix = self.template.prompt.split("{explanation}", 1)[1]
        tail = len(self.tokenizer(suffix, add_special_tokens=False)["input_ids"])
        out = []
        for text in texts:
            ids = self.tokenizer(self.template.render(explanation=text))["input_ids"]
            if len(ids) > self.max_length:
                ids = ids[: self.max_length - tail] + ids[-tail:]
            out.append(ids)
        return out

    def predict(self, texts: list[str]) -> torch.Tensor:
        """Reconstructed vectors (B, d), fp32."""
        seqs = self.encode(texts)
        pad = self.tokenizer.pad_token_id or 0
        ids, mask, _, _ = pad_batch(seqs, pad, device=next(self.head.parameters()).device)
        hidden = adapt(self.model).decoder(input_ids=ids, attention_mask=mask, use_cache=False)
        hidden_BTD = hidden.last_hidden_state if hasattr(hidden, "last_hidden_state") else hidden[0]
        last = mask.sum(dim=1) - 1
        self.read_tokens = int(mask.sum())
        return self.head(hidden_BTD[torch.arange(len(seqs)), last].float())

    def forward(self, texts: list[str], vectors_BD: torch.Tensor) -> dict:
        pred = self.predict(texts)
        return {"loss": mse_nrm(pred, vectors_BD.to(pred.device)), "tokens": self.read_tokens}

    @torch.no_grad()
    def mean_mse(self, texts: list[str], vectors_ND: torch.Tensor, batch: int) -> float:
        rows = [
            mse_nrm_rows(self.predict(texts[s]), vectors_ND[s].to(self.head.weight.device))
            for s in batch_slices(len(texts), batch)
        ]
        return torch.cat(rows).mean().item()

    @torch.no_grad()
    def validation(self, texts: list[str], vectors_ND: torch.Tensor, batch: int) -> dict:
        """mse_nrm on the true explanations vs on empty strings: an AR whose gap stays near
        zero is content-blind (it predicts the mean direction whatever it reads)."""
        true = self.mean_mse(texts, vectors_ND, batch)
        empty = self.mean_mse([""] * len(texts), vectors_ND, batch)
        return {"val_mse": true, "val_mse_empty": empty, "content_gap": empty - true}

    def save(self, directory: Path) -> None:
        save_adapter(self.model, directory)
        state = {k: v.detach().cpu().contiguous() for k, v in self.head.state_dict().items()}
        save_file(state, Path(directory) / HEAD_FILE)

    def load(self, directory: Path) -> None:
        directory = Path(directory)
        peft.set_peft_model_state_dict(
            self.model, load_file(directory / "adapter_model.safetensors")
        )
        self.head.load_state_dict(load_file(directory / HEAD_FILE))

    def describe(self) -> dict:
        return {
            "ar_num_layers": adapt(self.model).n_layers,
            "templates": {"ar": template_record(self.template)},
        }


def build_ar(model: nn.Module, tokenizer, template: PromptTemplate, cfg, num_layers: int):
    """Truncate the base, wrap it in LoRA and add the value head."""
    enable_checkpointing(model, cfg.gradient_checkpointing)
    truncate(model, num_layers)
    return ActivationReconstructor(
        lora(model, cfg, cfg.unfreeze_norms), tokenizer, template, cfg.max_length
    )
