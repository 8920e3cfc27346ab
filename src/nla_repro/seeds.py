"""Every seed the pipeline derives from a params seed comes from `derive_seed`.

A stage has one `seed` param; what it seeds (a chunk, an epoch, a retry, a paraphrase) is
derived from it here, so no module invents its own arithmetic and two streams never share a
formula by accident. The formulas are those the published builds used (changing one would
change every sampled output, so they are fixed; a test pins them):

- stream `stage`: `seed * 1_000_003 + a * 10_007 + b` for indices (a, b), missing ones 0:
  per chunk (`a` = chunk index: label, eval), per epoch and buffer (SFT batch order, SAE
  shard order and batch shuffle), per generation batch (corpus).
- stream `attempt`: `seed + 7_919 * attempt`, a retry of a prompt that did not parse.
- stream `paraphrase`: `seed + 104_729 * j`, the j-th paraphrase of a label.
- stream `offset`: `seed + i`, a batch starting at row i, a scaffold step, a second pass
  (auditor, pairwise judge) of the same rows.
- stream `sample`: `seed + 15_485_863 * i`, the i-th sample a stage draws from its rows
  (i = 1: the rows eval evaluates and their order).
- stream `rollout`: `seed + 32_452_843 * step`, the sampling of one RL step's rollouts.
"""

from __future__ import annotations

STREAMS: dict[str, tuple[int, ...]] = {
    "stage": (1_000_003, 10_007, 1),
    "attempt": (1, 7_919),
    "paraphrase": (1, 104_729),
    "offset": (1, 1),
    "sample": (1, 15_485_863),
    "rollout": (1, 32_452_843),
}
"""Multipliers of (seed, index_0, index_1, ...) per stream."""


def derive_seed(seed: int, *indices: int, stream: str = "stage") -> int:
    """The seed of one piece of work: `seed` and `indices` combined by `stream`'s formula."""
    try:
        weights = STREAMS[stream]
    except KeyError:
        raise ValueError(f"unknown seed stream {stream!r}; known: {sorted(STREAMS)}") from None
    if len(indices) >= len(weights):
        raise ValueError(f"seed stream {stream!r} takes at most {len(weights) - 1} indices")
    return sum(w * int(v) for w, v in zip(weights, (seed, *indices), strict=False))
