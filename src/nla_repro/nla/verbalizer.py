"""The activation verbalizer (AV): one residual-stream vector in, an explanation out.

- `ActivationVerbalizer` (kind injection): base + LoRA. The prompt holds one marker token
  between `<concept>` and `</concept>`; a forward hook on the input-embedding module replaces
  the marker's embedding with `v * scale / ||v||` (`nla.injection`). Loss on the response
  tokens only.
- `PrefixVerbalizer` (kind prefix): frozen base; `v` goes through an identity-initialized fp32
  `Linear(d, d)`, followed by n learned prefix embeddings initialized from BOS.

Both are `nn.Module`s whose `forward(texts, vectors)` returns the training loss, with the
save/load/validation interface the shared trainer (`nla_repro.training`) drives.
"""

from __future__ import annotations

import abc
from collections.abc import Sequence
from pathlib import Path

import peft
import torch
from safetensors.torch import load_file, save_file
from torch import nn
from torch.nn import functional as F

from nla_repro.generation import Decoded, decode, stop_ids
from nla_repro.models import (
    IGNORE,
    adapt,
    batch_slices,
    pad_batch,
)
from nla_repro.nla.adapters import save_adapter
from nla_repro.nla.injection import Injector, choose_marker, injection_vectors
from nla_repro.nla.pairs import shuffled
from nla_repro.templates import PromptTemplate

PREFIX_FILE = "prefix.safetensors"


def token_logprobs(logits_BKV: torch.Tensor, targets_BK: torch.Tensor) -> torch.Tensor:
    """Log-prob of each target token under the logits that predict it (aligned: column k of
    the logits predicts column k of the targets), 0 where the target is IGNORE: (B, K).
    Through `cross_entropy`, whose backward is one fused softmax-minus-one-hot pass over the
    vocabulary (a gather minus logsumexp took 1.7x its time, forward and backward)."""
    batch, width, vocab = logits_BKV.shape
    nll = F.cross_entropy(
        logits_BKV.float().reshape(batch * width, vocab),
        targets_BK.reshape(-1),
        ignore_index=IGNORE,
        reduction="none",
    )
    return -nll.view(batch, width)


def response_positions(prompt_len: int, width: int) -> torch.Tensor:
    """The positions whose logits predict a response token when every row's response starts
    at `prompt_len` of a `width`-wide batch: the LM head runs there only (`logits_to_keep`),
    never on the prompt, where no token carries loss."""
    return torch.arange(prompt_len - 1, width - 1)


class VerbalizerBase(nn.Module, abc.ABC):
    """What both AV kinds share: response tokenization, per-row loss, validation, generation."""

    tokenizer = None
    max_length: int = 0
    read_tokens: int = 0
    """Non-pad tokens of the last forward (prompt + response): the throughput unit."""

    def _device(self) -> torch.device:
        return next(self.parameters()).device

    def response_ids(self, text: str) -> list[int]:
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        eos = self.tokenizer.eos_token_id
        return ids + ([eos] if eos is not None else [])

    @abc.abstractmethod
    def row_nll(
        self, texts: list[str], vectors_BD: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Summed NLL of each row's response and its token count: (B,), (B,)."""

    def _score(self, logits_BKV, targets_BK, mask_BT) -> tuple[torch.Tensor, torch.Tensor]:
        self.read_tokens = int(mask_BT.sum())
        logp = token_logprobs(logits_BKV, targets_BK)
        return -logp.sum(dim=1), (targets_BK != IGNORE).sum(dim=1)

    def stop_ids(self) -> set[int]:
        """Token ids that end a response (the tokenizer's EOS and the generation config's)."""
        return stop_ids(self.model, self.tokenizer)

    @abc.abstractmethod
    def decode_vectors(
        self, vectors_ND: torch.Tensor, max_new_tokens: int, temperatures: Sequence[float]
    ) -> Decoded:
        """One response per vector (`generation.decode`), at one temperature per row."""

    @torch.no_grad()
    def sample(
        self, vectors_ND: torch.Tensor, max_new_tokens: int, temperature: float
    ) -> tuple[list[list[int]], list[bool]]:
        """One sampled response per vector: its token ids up to and including the first stop
        token, and whether it ended within `max_new_tokens` (False: cut by the cap)."""
        got = self.decode_vectors(vectors_ND, max_new_tokens, [temperature] * len(vectors_ND))
        return got.tokens, got.finished

    def decode(self, responses: list[list[int]]) -> list[str]:
        return [t.strip() for t in self.tokenizer.batch_decode(responses, skip_special_tokens=True)]

    @torch.no_grad()
    def generate(
        self,
        vectors_ND: torch.Tensor,
        max_new_tokens: int = 64,
        temperature: float | Sequence[float] = 0.0,
    ) -> list[str]:
        """One explanation per vector (greedy at temperature 0); `temperature` may give one
        value per row, so greedy outputs and samples share a batch."""
        temps = (
            [float(temperature)] * len(vectors_ND)
            if isinstance(temperature, int | float)
            else list(temperature)
        )
        got = self.decode_vectors(vectors_ND, max_new_tokens, temps)
        return self.tokenizer.batch_decode(got.tokens, skip_special_tokens=True)

    def forward(self, texts: list[str], vectors_BD: torch.Tensor) -> dict:
        nll, n = self.row_nll(texts, vectors_BD)
        return {"loss": nll.sum() / n.sum().clamp_min(1), "tokens": self.read_tokens}

    @torch.no_grad()
    def mean_loss(self, texts: list[str], vectors_ND: torch.Tensor, batch: int) -> float:
        nll = tokens = 0.0
        for s in batch_slices(len(texts), batch):
            row_nll, n = self.row_nll(texts[s], vectors_ND[s])
            nll, tokens = nll + row_nll.sum().item(), tokens + n.sum().item()
        return nll / max(tokens, 1)

    @torch.no_grad()
    def validation(self, texts: list[str], vectors_ND: torch.Tensor, batch: int) -> dict:
        """Loss with the true vectors vs the vectors shuffled across rows: an AV whose gap stays
        near zero ignores the injection and collapses to templates."""
        true = self.mean_loss(texts, vectors_ND, batch)
        other = self.mean_loss(texts, shuffled(vectors_ND), batch) if len(texts) > 1 else true
        return {"val_loss": true, "val_loss_shuffled": other, "vector_use_gap": other - true}


class ActivationVerbalizer(VerbalizerBase):
    """Base LM + LoRA; the vector replaces the marker token's input embedding."""

    kind = "injection"

    def __init__(
        self,
        model: nn.Module,
        tokenizer,
        template: PromptTemplate,
        scale: float | None,
        max_length: int,
    ) -> None:
        super().__init__()
        self.model, self.tokenizer, self.template = model, tokenizer, template
        self.scale, self.max_length = scale, max_length
        self.marker = choose_marker(tokenizer, template)
        self.prompt_ids = tokenizer(template.render(marker=self.marker.char))["input_ids"]
        self.injector = Injector(adapt(model).embed, self.marker.token_id)

    def _inputs(self, responses: list[list[int]]):
        """The prompt followed by each response's token ids, labels on the response only."""
        seqs = [self.prompt_ids + resp for resp in responses]
        labels = [[IGNORE] * len(self.prompt_ids) + resp for resp in responses]
        pad = self.tokenizer.pad_token_id or 0
        padded = pad_batch(seqs, pad, labels=labels, device=self._device())
        return padded.ids_BT, padded.mask_BT, padded.labels_BT

    def _logits(self, ids_BT, mask_BT, vectors_BD) -> torch.Tensor:
        """Logits at the positions that predict response tokens only: (B, T - P, V)."""
        # At the prompt's marker: the response after it may hold the marker character too.
        self.injector.arm(injection_vectors(vectors_BD, self.scale), self.marker.position)
        keep = response_positions(len(self.prompt_ids), ids_BT.shape[1]).to(ids_BT.device)
        try:
            return self.model(
                input_ids=ids_BT, attention_mask=mask_BT, use_cache=False, logits_to_keep=keep
            ).logits
        finally:
            self.injector.arm(None)

    def row_nll(self, texts, vectors_BD):
        room = self.max_length - len(self.prompt_ids)
        ids, mask, labels = self._inputs([self.response_ids(t)[:room] for t in texts])
        targets = labels[:, len(self.prompt_ids) :]
        return self._score(self._logits(ids, mask, vectors_BD), targets, mask)

    def response_logprobs(
        self, responses: list[list[int]], vectors_BD: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Log-prob of each token of each response (token ids as sampled, EOS included) given
        its vector, and the mask of real response tokens: (B, K) each. Differentiable."""
        ids, mask, labels = self._inputs(responses)
        targets = labels[:, len(self.prompt_ids) :]
        logp = token_logprobs(self._logits(ids, mask, vectors_BD), targets)
        self.read_tokens = int(mask.sum())
        return logp, targets != IGNORE

    def decode_vectors(self, vectors_ND, max_new_tokens, temperatures) -> Decoded:
        n = len(vectors_ND)
        ids = torch.tensor([self.prompt_ids] * n, device=self._device())
        self.injector.arm(injection_vectors(vectors_ND, self.scale), self.marker.position)
        try:
            return decode(
                self.model,
                torch.ones_like(ids),
                temperatures,
                max_new_tokens,
                self.stop_ids(),
                input_ids=ids,
            )
        finally:
            self.injector.arm(None)

    def save(self, directory: Path) -> None:
        save_adapter(self.model, directory)

    def load(self, directory: Path) -> None:
        peft.set_peft_model_state_dict(
            self.model, load_file(Path(directory) / "adapter_model.safetensors")
        )

    def describe(self) -> dict:
        return {
            "kind": self.kind,
            "marker": self.marker.char,
            "marker_token_id": self.marker.token_id,
            "marker_position": self.marker.position,
            "prompt_token_ids": self.prompt_ids,
        }


class PrefixVerbalizer(VerbalizerBase):
    """Frozen base; [BOS] [W v] [p_1 .. p_n] then the text, W identity-initialized (fp32),
    p_i initialized from the BOS embedding."""

    kind = "prefix"

    def __init__(
        self, model: nn.Module, tokenizer, n_prefix: int, scale: float | None, max_length: int
    ) -> None:
        super().__init__()
        self.model, self.tokenizer = model.requires_grad_(False), tokenizer
        self.scale, self.max_length = scale, max_length
        self.embed = adapt(model).embed
        d = adapt(model).d_model
        device = next(model.parameters()).device
        self.proj = nn.Linear(d, d, device=device, dtype=torch.float32)
        with torch.no_grad():
            self.proj.weight.copy_(torch.eye(d))
            self.proj.bias.zero_()
        bos = tokenizer.bos_token_id
        self.bos_id = bos
        start = torch.tensor([[bos if bos is not None else tokenizer.eos_token_id]], device=device)
        with torch.no_grad():
            bos_embedding = self.embed(start)[0, 0].float()
        self.prefix = nn.Parameter(bos_embedding.repeat(n_prefix, 1))

    def _soft_prompt(self, vectors_BD: torch.Tensor) -> torch.Tensor:
        """(B, 1 + 1 + n, d): BOS (if the tokenizer has one), projected vector, prefix."""
        dtype = self.embed.weight.dtype
        v = self.proj(injection_vectors(vectors_BD, self.scale).to(self.proj.weight.device))
        parts = [v[:, None], self.prefix[None].expand(len(v), -1, -1)]
        if self.bos_id is not None:
            bos = torch.full((len(v), 1), self.bos_id, device=v.device)
            parts.insert(0, self.embed(bos).float())
        return torch.cat(parts, dim=1).to(dtype)

    def row_nll(self, texts, vectors_BD):
        soft = self._soft_prompt(vectors_BD)
        room = self.max_length - soft.shape[1]
        resp = [self.response_ids(t)[:room] for t in texts]
        pad = self.tokenizer.pad_token_id or 0
        ids, mask, _, labels = pad_batch(resp, pad, labels=resp, device=soft.device)
        embeds = torch.cat([soft, self.embed(ids)], dim=1)
        full_mask = torch.cat(
            [torch.ones(soft.shape[:2], device=soft.device, dtype=mask.dtype), mask], 1
        )
        full_labels = torch.cat(
            [torch.full(soft.shape[:2], IGNORE, device=soft.device, dtype=labels.dtype), labels], 1
        )
        keep = response_positions(soft.shape[1], embeds.shape[1]).to(soft.device)
        logits = self.model(
            inputs_embeds=embeds, attention_mask=full_mask, use_cache=False, logits_to_keep=keep
        ).logits
        return self._score(logits, full_labels[:, soft.shape[1] :], full_mask)

    @torch.no_grad()
    def decode_vectors(self, vectors_ND, max_new_tokens, temperatures) -> Decoded:
        soft = self._soft_prompt(vectors_ND)
        mask = torch.ones(soft.shape[:2], device=soft.device, dtype=torch.long)
        return decode(
            self.model, mask, temperatures, max_new_tokens, self.stop_ids(), inputs_embeds=soft
        )

    def save(self, directory: Path) -> None:
        Path(directory).mkdir(parents=True, exist_ok=True)
        tensors = {
            "proj.weight": self.proj.weight,
            "proj.bias": self.proj.bias,
            "prefix": self.prefix,
        }
        save_file(
            {k: v.detach().cpu().contiguous() for k, v in tensors.items()},
            Path(directory) / PREFIX_FILE,
        )

    def load(self, directory: Path) -> None:
        tensors = load_file(Path(directory) / PREFIX_FILE)
        with torch.no_grad():
            self.proj.weight.copy_(tensors["proj.weight"])
            self.proj.bias.copy_(tensors["proj.bias"])
            self.prefix.copy_(tensors["prefix"])

    def describe(self) -> dict:
        return {"kind": self.kind, "n_prefix": len(self.prefix), "bos_token_id": self.bos_id}
