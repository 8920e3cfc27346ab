"""How the AV receives its vector: a marker token whose input embedding a forward hook
replaces with `v * scale / ||v||` (or the raw vector)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from nla_repro.errors import ConfigError, NlaError
from nla_repro.templates import PromptTemplate

# Rare characters tried in order as the AV's marker; the first that is exactly one token
# with the same neighbouring tokens as another candidate wins. ASCII ones last: byte-level
# tokenizers with few merges (and tiny test tokenizers) only have those as single tokens.
MARKER_CANDIDATES = ("◆", "¤", "§", "¶", "†", "‡", "※", "◊", "⌘", "♮", "~", "^", "`", "|", "@")


class InjectionError(NlaError):
    """The prompt does not hold exactly one marker token per injected vector."""


@dataclass(frozen=True)
class Marker:
    char: str
    """The marker character as it appears in the prompt."""
    token_id: int
    """Its single token id."""
    position: int
    """Its index in the tokenized prompt."""


def choose_marker(tokenizer, template: PromptTemplate) -> Marker:
    """The first candidate that tokenizes to exactly one token, occurs once, and leaves the
    neighbouring tokens as another candidate does (so `<concept>`/`</concept>` are stable)."""
    encoded = {
        c: tokenizer(template.render(marker=c), add_special_tokens=True)["input_ids"]
        for c in MARKER_CANDIDATES
    }

    def single_slot(a: list[int], b: list[int]) -> int | None:
        if len(a) != len(b):
            return None
        diff = [i for i, (x, y) in enumerate(zip(a, b, strict=True)) if x != y]
        return diff[0] if len(diff) == 1 else None

    for char, ids in encoded.items():
        for other, other_ids in encoded.items():
            slot = single_slot(ids, other_ids) if other != char else None
            if slot is None:
                continue
            token = ids[slot]
            if ids.count(token) == 1 and tokenizer.decode([token]) == char:
                return Marker(char=char, token_id=int(token), position=slot)
    raise ConfigError(
        f"prompt {template.version}: no marker candidate {MARKER_CANDIDATES} is a single token "
        "with stable neighbours under this tokenizer"
    )


def injection_vectors(vectors_BD: torch.Tensor, scale: float | None) -> torch.Tensor:
    """`v * scale / ||v||` in fp32, or the raw vector when scale is None."""
    v = vectors_BD.float()
    if scale is None:
        return v
    return v * scale / v.norm(dim=-1, keepdim=True).clamp_min(1e-12)


@torch.no_grad()
def mean_embedding_norm(embed: nn.Module, vocab_size: int, chunk: int = 4096) -> float:
    """Mean row norm of the embedding module's output (Gemma's includes its sqrt(d) scale)."""
    device = next(embed.parameters()).device
    total = 0.0
    for start in range(0, vocab_size, chunk):
        ids = torch.arange(start, min(start + chunk, vocab_size), device=device)
        total += embed(ids[None])[0].float().norm(dim=-1).sum().item()
    return total / vocab_size


class Injector:
    """Forward hook on the input embeddings that writes one vector per row at the marker.

    Armed with (B, d) vectors, the first forward must hold exactly one marker per row; later
    decode steps (one new token per row, reading the KV cache) pass through, even when the
    token the model just wrote is the marker character. A marker with nothing armed, or a
    second multi-token forward holding a marker without re-arming, raises.
    """

    def __init__(self, embed: nn.Module, marker_id: int) -> None:
        self.marker_id = marker_id
        self.vectors_BD: torch.Tensor | None = None
        self.done = False
        self.position: int | None = None
        self.handle = embed.register_forward_hook(self._hook, with_kwargs=True)

    def arm(self, vectors_BD: torch.Tensor | None, position: int | None = None) -> None:
        """Write these vectors at the next forward: at the one marker of each row, or, with
        `position`, at that index of every row (which must hold the marker): a teacher-forced
        response may itself contain the marker character after the prompt's."""
        self.vectors_BD, self.done, self.position = vectors_BD, False, position

    def _hook(self, _module, args: tuple, kwargs: dict, output: torch.Tensor):
        ids = args[0] if args else kwargs.get("input", kwargs.get("input_ids"))
        is_marker = ids == self.marker_id
        if self.vectors_BD is None or self.done:
            decoding = self.done and ids.shape[1] == 1
            if is_marker.any() and not decoding:
                why = "no vector is armed" if self.vectors_BD is None else "it was not re-armed"
                raise InjectionError(f"marker token {self.marker_id} in the input but {why}")
            return None
        if ids.shape[0] != self.vectors_BD.shape[0]:
            raise InjectionError(f"{ids.shape[0]} rows but {self.vectors_BD.shape[0]} vectors")
        if self.position is not None:
            bad = (~is_marker[:, self.position]).nonzero().flatten().tolist()
            if bad:
                raise InjectionError(
                    f"row {bad[0]}: no marker token (id {self.marker_id}) at position "
                    f"{self.position}"
                )
            rows = torch.arange(ids.shape[0], device=ids.device)
            cols = torch.full_like(rows, self.position)
        else:
            counts = is_marker.sum(dim=1)
            bad = (counts != 1).nonzero().flatten().tolist()
            if bad:
                raise InjectionError(
                    f"row {bad[0]} holds {int(counts[bad[0]])} marker tokens (id "
                    f"{self.marker_id}); expected exactly one per injected vector"
                )
            rows, cols = is_marker.nonzero(as_tuple=True)
        out = output.clone()
        out[rows, cols] = self.vectors_BD.to(device=out.device, dtype=out.dtype)
        self.done = True
        return out
