"""Training pairs: accepted labels joined with the activation they explain."""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch

from nla_repro import config as C
from nla_repro.errors import DataValidationError
from nla_repro.schemas import LABELS, activations_schema, pairs_schema, read_parquet, validate


def read_pairs(d_model: int, layer: int) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """(labels, activations, training pairs) as every NLA stage reads them: both files
    validated, the activations checked to come from `layer` (params extract.layer: data
    extracted at another layer would otherwise train and be published as this one)."""
    labels = read_parquet(C.LABELS_PATH, LABELS)
    acts = read_parquet(C.ACTIVATIONS_PATH, activations_schema(d_model))
    wrong = np.flatnonzero(acts["layer"].to_numpy() != layer)
    if len(wrong):
        found = sorted(set(acts["layer"].iloc[wrong].tolist()))
        raise DataValidationError(
            f"{C.ACTIVATIONS_PATH}: column 'layer' is {found} at row(s) "
            f"{', '.join(map(str, wrong[:8].tolist()))}"
            f"{f' and {len(wrong) - 8} more' if len(wrong) > 8 else ''}, but params "
            f"extract.layer is {layer}: rerun extract (`dvc repro extract`) or set "
            f"extract.layer to the layer the file was extracted at"
        )
    pairs = training_pairs(labels, acts, d_model, f"{C.LABELS_PATH} x {C.ACTIVATIONS_PATH}")
    return labels, acts, pairs


def training_pairs(
    labels: pd.DataFrame, activations: pd.DataFrame, d_model: int, where: str
) -> pd.DataFrame:
    """Accepted or corrected labels joined with the activation at the position they explain
    (the document's last extracted token), validated against the pairs schema."""
    usable = labels[labels["status"] != "rejected"]
    last = activations[activations["position"] == activations["n_tokens"] - 1]
    twice = last["doc_id"].duplicated(keep=False).to_numpy()
    if twice.any():
        raise DataValidationError(
            f"{where}: {int(twice.sum())} activation rows claim the last token of the same "
            f"document (column doc_id {last['doc_id'][twice].iloc[0]!r}, activation rows "
            f"{last.index[twice].tolist()[:8]}): a document has one last token"
        )
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
