"""Training pairs: accepted labels joined with the activation they explain."""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch

from nla_repro.errors import DataValidationError
from nla_repro.schemas import pairs_schema, validate


def training_pairs(
    labels: pd.DataFrame, activations: pd.DataFrame, d_model: int, where: str
) -> pd.DataFrame:
    """Accepted or corrected labels joined with the activation at the position they explain
    (the document's last extracted token), validated against the pairs schema."""
    usable = labels[labels["status"] != "rejected"]
    last = activations[activations["position"] == activations["n_tokens"] - 1]
    merged = usable.merge(
        last[["doc_id", "position", "vector"]], on="doc_id", how="left", validate="one_to_one"
    )
    missing = merged["position"].isna().to_numpy()
    if missing.any():
        rows = usable.index[missing].tolist()[:8]
        raise DataValidationError(
            f"{where}: {int(missing.sum())} labeled document(s) have no activation at their last "
            f"token (labels.parquet rows {rows}, column doc_id, e.g. "
            f"{merged.loc[missing, 'doc_id'].iloc[0]!r}); rerun extract with positions: last"
        )
    pairs = pd.DataFrame(
        {
            "doc_id": merged["doc_id"],
            "split": merged["split"],
            "position": merged["position"].astype("int32"),
            "explanation": merged["explanation"],
            "vector": merged["vector"],
        }
    )
    return validate(pairs, pairs_schema(d_model), where)


def split_pairs(pairs: pd.DataFrame, split: str) -> tuple[list[str], torch.Tensor]:
    rows = pairs[pairs["split"] == split]
    vectors = np.stack(rows["vector"].to_list()) if len(rows) else np.zeros((0, 0), np.float32)
    return rows["explanation"].tolist(), torch.from_numpy(vectors.astype(np.float32))


def shuffled(vectors_ND: torch.Tensor) -> torch.Tensor:
    """Every row gets another row's vector (a cyclic shift: no row keeps its own)."""
    return vectors_ND.roll(1, dims=0)
