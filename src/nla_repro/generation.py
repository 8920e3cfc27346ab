"""The one decoding loop: every sampled or greedy continuation the pipeline writes (AV
explanations in eval and RL rollouts, the local labeler's and judge's text).

Why not `model.generate`: on a CPU a decode step of a model this size is bound by streaming its
weights, not by arithmetic, so what pays is fewer and fuller steps. The loop
- drops each row from the batch (and from the KV cache) as soon as it has written a stop token
  or hit a stop string, so late steps run on the rows still writing, not on the whole batch;
- takes one temperature per row, so an AV's greedy output and its samples share one batch;
- computes logits at the last position only, and nothing per step it does not use (no logits
  processors, no stopping-criteria objects).
`benchmarks/generation.py` measures it against plain `model.generate` on the same prompts.

Sampling follows `generate`: softmax of logits / temperature (nucleus-filtered when `top_p` is
below 1), one `torch.multinomial` draw per row; temperature 0 is argmax.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from nla_repro.models import position_ids_from_mask, unwrap


def _cache_keyword(model: nn.Module) -> str:
    """The forward's name for the KV cache: `cache` from transformers 5.25, before that
    `past_key_values` (still accepted, with a deprecation warning per call)."""
    params = inspect.signature(type(unwrap(model)).forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def _cache_of(out):
    found = getattr(out, "cache", None)
    return found if found is not None else out.past_key_values


def stop_ids(model: nn.Module, tokenizer) -> set[int]:
    """Token ids that end a continuation: the tokenizer's EOS and the generation config's."""
    found = {tokenizer.eos_token_id}
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    found |= set(eos) if isinstance(eos, list | tuple) else {eos}
    return {int(i) for i in found if i is not None}


@dataclass
class Decoded:
    """What `decode` wrote for each row."""

    tokens: list[list[int]]
    """New token ids per row, up to and including its stop token (or the cap)."""
    finished: list[bool]
    """Whether the row stopped on a stop token or string (False: cut by max_new_tokens)."""


def _choose(logits_BV: torch.Tensor, temperature_B: torch.Tensor, top_p: float) -> torch.Tensor:
    """Next token per row: argmax where the temperature is 0, else a draw."""
    choice = logits_BV.argmax(dim=-1)
    hot = (temperature_B > 0).nonzero().flatten()
    if len(hot):
        scaled = logits_BV[hot].float() / temperature_B[hot, None]
        probs = torch.softmax(scaled, dim=-1)
        if top_p < 1.0:
            sorted_p, order = probs.sort(dim=-1, descending=True)
            # Keep the smallest prefix whose mass reaches top_p (the top token always).
            drop = sorted_p.cumsum(-1) - sorted_p > top_p
            sorted_p = sorted_p.masked_fill(drop, 0.0)
            probs = torch.zeros_like(probs).scatter(-1, order, sorted_p)
        choice[hot] = torch.multinomial(probs, 1)[:, 0]
    return choice


@torch.no_grad()
def decode(
    model: nn.Module,
    attention_mask_BT: torch.Tensor,
    temperatures: Sequence[float],
    max_new_tokens: int,
    stop_ids: set[int],
    *,
    top_p: float = 1.0,
    stop_text=None,
    **prefill,
) -> Decoded:
    """Continue every row of the prefill inputs (`input_ids` or `inputs_embeds`, padded on
    either side, `attention_mask_BT` marking real positions). `stop_text(row, tokens)`, when
    given, ends a row whose text so far holds a stop string. The caller seeds the RNG."""
    n = attention_mask_BT.shape[0]
    device = attention_mask_BT.device
    temps = torch.tensor(list(temperatures), dtype=torch.float32, device=device)
    if len(temps) != n:
        raise ValueError(f"{len(temps)} temperatures for {n} rows")
    tokens: list[list[int]] = [[] for _ in range(n)]
    finished = [False] * n
    if max_new_tokens <= 0 or n == 0:
        return Decoded(tokens, finished)
    mask = attention_mask_BT
    out = model(
        **prefill,
        attention_mask=mask,
        position_ids=position_ids_from_mask(mask),
        use_cache=True,
        logits_to_keep=1,
    )
    cache_key = _cache_keyword(model)
    cache, logits = _cache_of(out), out.logits[:, -1]
    alive = torch.arange(n, device=device)  # original row of each batch row
    for step in range(max_new_tokens):
        next_B = _choose(logits, temps[alive], top_p)
        keep = []
        for b, (row, tok) in enumerate(zip(alive.tolist(), next_B.tolist(), strict=True)):
            tokens[row].append(tok)
            if tok in stop_ids or (stop_text is not None and stop_text(row, tokens[row])):
                finished[row] = True
            else:
                keep.append(b)
        if not keep or step == max_new_tokens - 1:
            break
        if len(keep) < len(alive):
            index = torch.tensor(keep, device=device)
            cache.batch_select_indices(index)
            alive, next_B, mask = alive[index], next_B[index], mask[index]
        mask = torch.cat([mask, mask.new_ones(len(alive), 1)], dim=1)
        out = model(
            input_ids=next_B[:, None],
            attention_mask=mask,
            position_ids=mask.sum(dim=1, keepdim=True) - 1,
            **{cache_key: cache},
            use_cache=True,
        )
        cache, logits = _cache_of(out), out.logits[:, -1]
    return Decoded(tokens, finished)
