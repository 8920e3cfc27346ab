"""Predictors that read no explanation, scored on the same rows as the round trip.

A round trip v -> AV -> text -> AR -> v_hat is only worth its text if it beats what a
reconstruction gets without one. Each predictor here writes a vector per evaluated row, and
the eval scores it with the same metrics as the AR's output (raw cos, fve_cen, fve_nrm):

- `mean_direction`: always the train pool's mean vector (a constant; reads nothing).
- `centroid`: the mean train vector of the source family whose centroid is nearest v
  (centred cosine). It sees v only through which of k families it resembles (k = the
  families in the train pool, stated in the metrics): a text-free coarse summary.
- `nearest_train`: the train vector nearest v (centred cosine). An oracle: it picks with
  the target itself, so it bounds what a lookup of training activations could reach.
- the random floor: per row, the mean score of every held-out pool vector (what an
  unrelated activation of the same pool scores).

Every predicted vector is written to data/eval/rows.parquet, so metrics/eval.json is
recomputed from that file alone.
"""

from __future__ import annotations

import numpy as np

from nla_repro.evaluation.measures import cosine_matrix


def family_centroids(train_ND: np.ndarray, families_N) -> tuple[list[str], np.ndarray]:
    """Families (sorted) and the mean train vector of each, (k, d)."""
    fam = np.asarray(families_N)
    names = sorted(set(fam.tolist()))
    return names, np.stack([train_ND[fam == f].mean(axis=0) for f in names])


def nearest_rows(targets_ND: np.ndarray, candidates_MD: np.ndarray, mu_D) -> np.ndarray:
    """Per target, the index of the candidate with the highest centred cosine."""
    return cosine_matrix(targets_ND, candidates_MD, mu_D).argmax(axis=1)


def pool_floor(targets_ND: np.ndarray, pool_MD: np.ndarray, mu_D) -> tuple[np.ndarray, ...]:
    """Per target, the mean raw cosine and mean fve_cen of every pool vector."""
    raw = cosine_matrix(targets_ND, pool_MD).mean(axis=1)
    cen = 0.5 * (1 + cosine_matrix(targets_ND, pool_MD, mu_D)).mean(axis=1)
    return raw, cen


def baseline_columns(
    targets_ND: np.ndarray,
    train_ND: np.ndarray,
    train_families_N,
    pool_MD: np.ndarray,
    mu_D: np.ndarray,
) -> tuple[dict[str, list | np.ndarray], dict]:
    """The per-row columns of the text-free predictors and the random floor, and what the
    metadata records of them (the centroids' families)."""
    n = len(targets_ND)
    families, centroids_KD = family_centroids(train_ND, train_families_N)
    picked = nearest_rows(targets_ND, centroids_KD, mu_D)
    nearest = nearest_rows(targets_ND, train_ND, mu_D)
    floor_cos, floor_cen = pool_floor(targets_ND, pool_MD, mu_D)
    mean_D = train_ND.mean(axis=0).astype(np.float32)
    columns = {
        "rec_mean_direction": [mean_D] * n,
        "rec_centroid": list(centroids_KD[picked].astype(np.float32)),
        "centroid_family": [families[i] for i in picked],
        "rec_nearest_train": list(train_ND[nearest].astype(np.float32)),
        "floor_cos": floor_cos,
        "floor_fve_cen": floor_cen,
    }
    meta = {
        "centroid_families": families,
        "centroid_k": len(families),
        "train_pool_n": len(train_ND),
        "floor_pool_n": len(pool_MD),
    }
    return columns, meta
