"""Token activations for the SAE: every non-special token of a split's documents, read at
block L (the forward stops there), written in resumable shards of about `shard_tokens` tokens
and streamed back one shard at a time (memory holds a few shards, never the corpus). Tokens
whose norm exceeds `outlier_norm` x the median train-token norm are dropped at read time (the
first position of a SmolLM2 document is an attention sink with ~100x the median norm)."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from tqdm import tqdm

from nla_repro import config as C
from nla_repro.io import (
    ChunkStore,
    fingerprint,
    vectors_from_table,
    vectors_to_arrow,
)
from nla_repro.models import pad_batch, residual_at_layer, tokenize
from nla_repro.seeds import derive_seed


def plan_shards(lengths: list[int], batch_size: int, shard_tokens: int) -> list[list[list[int]]]:
    """Documents (indices) in batches (longest first: less padding), batches in shards of at
    least shard_tokens tokens (the last may be smaller)."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    shards: list[list[list[int]]] = [[]]
    count = 0
    for batch in batches:
        if count >= shard_tokens:
            shards.append([])
            count = 0
        shards[-1].append(batch)
        count += sum(lengths[i] for i in batch)
    return shards if shards[0] else []


def collect(
    model, tokens: list[list[int]], special: set[int], layer: int, pad_id: int, store, shards, desc
) -> None:
    """Write each missing shard: (row, position, token_id, norm, vector) of every non-special
    token of its documents."""
    total = sum(len(tokens[i]) for s in shards for b in s for i in b)
    done = sum(len(tokens[i]) for c, s in enumerate(shards) if store.done(c) for b in s for i in b)
    bar = tqdm(total=total, initial=done, unit="tok", unit_scale=True, desc=desc)
    device = next(model.parameters()).device
    for c, shard in enumerate(shards):
        if store.done(c):
            continue
        parts = []
        for batch in shard:
            ids, mask, _, _ = pad_batch([tokens[i] for i in batch], pad_id, "right")
            hidden_BTD = residual_at_layer(model, ids.to(device), mask.to(device), layer)
            keep = mask.bool() & ~torch.isin(ids, torch.tensor(sorted(special), dtype=ids.dtype))
            rows_B, pos = keep.nonzero(as_tuple=True)
            vecs = hidden_BTD[keep.to(device)].float().cpu()
            parts.append(
                pa.table(
                    {
                        "row": pa.array(torch.tensor(batch)[rows_B].numpy(), pa.int64()),
                        "position": pa.array(pos.numpy(), pa.int32()),
                        "token_id": pa.array(ids[keep].numpy(), pa.int64()),
                        "norm": pa.array(vecs.norm(dim=1).numpy(), pa.float32()),
                        "vector": vectors_to_arrow(vecs.numpy()),
                    }
                )
            )
            bar.update(sum(len(tokens[i]) for i in batch))
        store.write(c, pa.concat_tables(parts))
    bar.close()


class Shards:
    """The finished shards of one split, read one at a time, outliers dropped."""

    def __init__(
        self, store: ChunkStore, n: int, dtype: torch.dtype, max_norm: float = math.inf
    ) -> None:
        self.store, self.n, self.max_norm, self.dtype = store, n, max_norm, dtype

    def norms(self) -> np.ndarray:
        parts = [pq.read_table(self.store.path(c), columns=["norm"]) for c in range(self.n)]
        return np.concatenate([p.column("norm").to_numpy() for p in parts]) if parts else []

    def load(self, c: int) -> torch.Tensor:
        table = pq.read_table(self.store.path(c))
        vecs = torch.tensor(vectors_from_table(table))
        keep = torch.from_numpy(table.column("norm").to_numpy() <= self.max_norm)
        return vecs[keep].to(self.dtype)

    def __iter__(self) -> Iterator[torch.Tensor]:
        return (self.load(c) for c in range(self.n))

    def buffers(self, epoch: int, per_buffer: int, seed: int) -> Iterator[torch.Tensor]:
        """Epoch `epoch`: shards in a seeded order, `per_buffer` at a time, concatenated."""
        gen = torch.Generator().manual_seed(derive_seed(seed, 0, epoch))
        order = torch.randperm(self.n, generator=gen).tolist()
        for i in range(0, len(order), per_buffer):
            yield torch.cat([self.load(c) for c in order[i : i + per_buffer]])


@dataclasses.dataclass
class TokenData:
    """The token activations of the train split and of the held-out split, on disk."""

    tokens: dict[str, list[list[int]]]
    """Token ids per document, by split."""
    shards: dict[str, Shards]
    """Shards by split, outliers dropped at read time."""
    norms: dict[str, np.ndarray]
    """Every collected token's norm (outliers included), by split."""
    median_norm: float
    """Median train-token norm."""
    max_norm: float
    """Tokens above this norm are dropped (inf: none)."""

    def clear(self) -> None:
        for shards in self.shards.values():
            shards.store.clear()


def token_activations(
    model, tokenizer, corpus, cfg: C.SAEConfig, layer: int, root: Path, key: tuple
) -> TokenData:
    """Collect (or resume collecting) the train and `cfg.eval_split` token activations into
    shards under root/<split>/, keyed by everything they depend on (`key`)."""
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    special = set(tokenizer.all_special_ids)
    dtype = getattr(torch, cfg.dtype)
    tokens, shards = {}, {}
    for split in ("train", cfg.eval_split):
        docs = corpus[corpus["split"] == split]
        if docs.empty:
            raise C.ConfigError(f"sae: {C.CORPUS_PATH} has no {split!r} documents")
        tokens[split] = tokenize(tokenizer, docs["text"].tolist(), cfg.max_length)
        plan = plan_shards([len(t) for t in tokens[split]], cfg.extract_batch, cfg.shard_tokens)
        parts = (*key, layer, split, cfg.max_length, cfg.extract_batch, cfg.shard_tokens)
        store = ChunkStore(root / split, fingerprint(*parts))
        collect(model, tokens[split], special, layer, pad_id, store, plan, f"sae acts {split}")
        shards[split] = Shards(store, len(plan), dtype)
    norms = {split: shards[split].norms() for split in shards}
    median = float(np.median(norms["train"]))
    max_norm = cfg.outlier_norm * median if cfg.outlier_norm is not None else math.inf
    for split in shards:
        shards[split].max_norm = max_norm
    return TokenData(tokens, shards, norms, median, max_norm)
