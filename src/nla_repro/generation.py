"""The one decoding loop: every sampled or greedy continuation the pipeline writes (the
generated corpus documents, AV explanations in eval and RL rollouts, the local labeler's and
judge's text).

Why not `model.generate`: on a CPU a decode step of a model this size is bound by streaming its
weights, not by arithmetic, so what pays is fewer and fuller steps. The loop
- drops each row from the batch (and from the KV cache) as soon as it has written a stop token
  or hit a stop string, so late steps run on the rows still writing, not on the whole batch;
- takes one temperature per row, so an AV's greedy output and its samples share one batch;
- computes logits at the last position only, and nothing per step it does not use (no logits
  processors, no stopping-criteria objects);
- runs a step's linear layers weight-first (`RowsFirstLinear`): with a few rows, MKL's sgemm
  spends most of `x @ W^T` repacking the weight, and `(W @ x^T)^T` repacks the rows instead;
- writes each step's keys and values into buffers sized for the whole call (`ReservedLayer`),
  where the default cache copies itself to append one token.
`benchmarks/generation.py` measures it against plain `model.generate` on the same prompts.

Sampling draws from what `generate` samples from, softmax of logits / temperature
(nucleus-filtered when `top_p` is below 1), by inverse CDF with one uniform number per row
(`draw`), not `torch.multinomial`: the same distribution, another use of the RNG, so a seeded
run writes other samples than `generate` would. Temperature 0 is argmax.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F
from transformers.cache_utils import DynamicLayer

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


ROWS_FIRST_MAX = 64
"""Rows up to which `RowsFirstLinear` multiplies weight-first. Measured on the 2-core AVX2 CPU
(a decode step of the default AV, every weight read once per step): 10-18% less time per
step at 8 and 16 rows, 4% at 48; from about 128 rows the two orders tie."""


class RowsFirstLinear(nn.Linear):
    """nn.Linear whose product with at most ROWS_FIRST_MAX rows (on a CPU, float32) runs as
    `(W @ x^T)^T`: the same dot products, accumulated by another kernel (the last bits may
    differ), with the few rows packed instead of the weight. More rows, other devices and
    dtypes run `F.linear`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // max(x.shape[-1], 1)
        w = self.weight
        if not 0 < rows <= ROWS_FIRST_MAX or w.device.type != "cpu" or w.dtype != x.dtype:
            return F.linear(x, w, self.bias)
        out_RO = torch.mm(w, x.reshape(rows, x.shape[-1]).T).T
        out_RO = out_RO.contiguous() if self.bias is None else out_RO.contiguous() + self.bias
        return out_RO.view(*x.shape[:-1], self.out_features)


@contextlib.contextmanager
def rows_first(model: nn.Module) -> Iterator[None]:
    """Inside the block, every plain float32 `nn.Linear` of `model` on a CPU (a LoRA layer's
    base weight, the LM head) is a `RowsFirstLinear`; quantized and other layers are left
    alone. A decode step's few rows are where it pays; a prefill's many rows fall through."""
    swapped = [
        m
        for m in model.modules()
        if type(m) is nn.Linear
        and m.weight.device.type == "cpu"
        and m.weight.dtype is torch.float32
    ]
    for module in swapped:
        module.__class__ = RowsFirstLinear
    try:
        yield
    finally:
        for module in swapped:
            module.__class__ = nn.Linear


class ReservedLayer(DynamicLayer):
    """A `DynamicLayer` whose keys and values are views of buffers with room for `extra`
    more positions: a decode step writes its token in place, where `DynamicLayer` copies the
    whole cache into a new tensor to append it. The views hold the same values, so attention
    computes the same numbers. Past the room it grows by concatenation, as `DynamicLayer`."""

    @classmethod
    def from_layer(cls, layer: DynamicLayer, extra: int) -> ReservedLayer:
        new = cls()
        new.lazy_initialization(layer.keys, layer.values)
        new._reserve(layer.keys, layer.values, extra)
        return new

    def _reserve(self, keys: torch.Tensor, values: torch.Tensor, extra: int) -> None:
        b, h, n, d = keys.shape
        self._keys = keys.new_empty(b, h, n + extra, d)
        self._values = values.new_empty(b, h, n + extra, values.shape[-1])
        self._keys[:, :, :n] = keys
        self._values[:, :, :n] = values
        self._length = n
        self._views()

    def _views(self) -> None:
        self.keys = self._keys[:, :, : self._length]
        self.values = self._values[:, :, : self._length]

    def update(self, key_states, value_states, *args, **kwargs):
        n, t = self._length, key_states.shape[-2]
        if n + t > self._keys.shape[-2]:
            keys = torch.cat([self.keys, key_states], dim=-2)
            values = torch.cat([self.values, value_states], dim=-2)
            self._reserve(keys, values, 0)
            return self.keys, self.values
        self._keys[:, :, n : n + t] = key_states
        self._values[:, :, n : n + t] = value_states
        self._length = n + t
        self._views()
        return self.keys, self.values

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._keys, self._values = self._keys[indices], self._values[indices]
        self._views()

    def crop(self, tokens_to_remove: int) -> None:
        super().crop(tokens_to_remove)
        self._length = self.keys.shape[-2]
        self._views()


def reserve(cache, extra: int) -> None:
    """Give every plain `DynamicLayer` of `cache` room for `extra` more positions (sliding-
    window, quantized and other layers keep their own update)."""
    layers = getattr(cache, "layers", None)
    if not isinstance(layers, list):
        return
    for i, layer in enumerate(layers):
        if type(layer) is DynamicLayer and layer.is_initialized and layer.keys.numel():
            layers[i] = ReservedLayer.from_layer(layer, extra)


@dataclass
class Decoded:
    """What `decode` wrote for each row."""

    tokens: list[list[int]]
    """New token ids per row, up to and including its stop token (or the cap)."""
    finished: list[bool]
    """Whether the row stopped on a stop token or string (False: cut by max_new_tokens)."""


NUCLEUS_CANDIDATES = 1024
"""Tokens a nucleus (top_p) draw ranks first; the full vocabulary is sorted only for a row
whose top candidates hold less than top_p of the mass (the same set either way)."""


def draw(probs_BV: torch.Tensor) -> torch.Tensor:
    """One token per row, drawn with probability `probs_BV` (rows need not be normalized):
    inverse CDF, one uniform number per row. `torch.multinomial` draws one exponential per
    vocabulary entry (16 x 49k of them cost 17 ms per decode step on a 2-core CPU, a tenth of
    the step); this costs a cumulative sum. The sum is in float64, so the last entries of a
    49k-long CDF keep their width; a zero-probability token has zero width and is never
    drawn."""
    cdf_BV = probs_BV.double().cumsum(dim=-1)
    u_B1 = torch.rand(len(cdf_BV), 1, dtype=torch.float64, device=cdf_BV.device)
    picked = torch.searchsorted(cdf_BV, u_B1 * cdf_BV[:, -1:], right=True)[:, 0]
    return picked.clamp_max(cdf_BV.shape[-1] - 1)


def _nucleus(probs_BV: torch.Tensor, top_p: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The probabilities of each row's nucleus (the smallest prefix, by descending
    probability, whose mass reaches top_p; the top token always), zero elsewhere, and the
    token id of each column: (B, C), (B, C). Ranks the top NUCLEUS_CANDIDATES tokens
    (topk), and sorts the whole row only where those hold less than top_p."""
    n = min(NUCLEUS_CANDIDATES, probs_BV.shape[-1])
    sorted_p, order = probs_BV.topk(n, dim=-1)
    if n < probs_BV.shape[-1] and bool((sorted_p.sum(dim=-1) < top_p).any()):
        sorted_p, order = probs_BV.sort(dim=-1, descending=True)
    drop = sorted_p.cumsum(dim=-1) - sorted_p > top_p
    return sorted_p.masked_fill(drop, 0.0), order


def _choose(logits_BV: torch.Tensor, temperature_B: torch.Tensor, top_p: float) -> torch.Tensor:
    """Next token per row: argmax where the temperature is 0, else a draw from
    softmax(logits / temperature), nucleus-filtered when top_p < 1."""
    choice = logits_BV.argmax(dim=-1)
    hot = (temperature_B > 0).nonzero().flatten()
    if len(hot):
        probs = torch.softmax(logits_BV[hot].float() / temperature_B[hot, None], dim=-1)
        if top_p < 1.0:
            kept, order = _nucleus(probs, top_p)
            choice[hot] = order.gather(-1, draw(kept)[:, None])[:, 0]
        else:
            choice[hot] = draw(probs)
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
    temps = torch.tensor(list(temperatures), dtype=torch.float32, device=attention_mask_BT.device)
    if len(temps) != n:
        raise ValueError(f"{len(temps)} temperatures for {n} rows")
    if max_new_tokens <= 0 or n == 0:
        return Decoded([[] for _ in range(n)], [False] * n)
    with rows_first(model):
        return _decode(
            model, attention_mask_BT, temps, max_new_tokens, stop_ids, top_p, stop_text, prefill
        )


def _decode(model, mask, temps, max_new_tokens, stop_ids, top_p, stop_text, prefill) -> Decoded:
    n, device = mask.shape[0], mask.device
    tokens: list[list[int]] = [[] for _ in range(n)]
    finished = [False] * n
    out = model(
        **prefill,
        attention_mask=mask,
        position_ids=position_ids_from_mask(mask),
        use_cache=True,
        logits_to_keep=1,
    )
    cache_key = _cache_keyword(model)
    cache, logits = _cache_of(out), out.logits[:, -1]
    reserve(cache, max_new_tokens)
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
