"""eval stage: the NLA metric suite on held-out rows -> data/eval/rows.parquet,
metrics/eval.json, plots/eval/.

The evaluated rows are the labeled rows of `eval.split` (all of them, or a seeded random
sample stratified by source family), in a seeded random order; each chunk of `eval.chunk_rows` rows
goes through every model call (`evaluation.chunk`) and is kept under .nla_work/eval/, so an
interrupted run resumes. The chunks are fingerprinted with everything the rows depend on
(the models' files, the inputs, the stage's code and its declared params), so a change that
reruns the stage also discards its saved chunks. Every number in metrics/eval.json is
computed from rows.parquet as written (`evaluation.suite.compute_metrics`), the text-free
baselines included (`evaluation.baselines`: their predictions are columns of that file).

`python -m nla_repro eval --av DIR --ar DIR --out DIR` evaluates any AV/AR pair, e.g. a
downloaded release, on the base model and data of this pipeline.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import yaml
from tqdm import tqdm

from nla_repro import config as C
from nla_repro.errors import ConfigError
from nla_repro.evaluation.baselines import baseline_columns
from nla_repro.evaluation.chunk import evaluate_chunk
from nla_repro.evaluation.measures import normalized, stratified_sample
from nla_repro.evaluation.report import eval_report, print_rows
from nla_repro.evaluation.suite import compute_metrics
from nla_repro.io import ChunkStore, fingerprint, sha256_file, write_json, write_parquet
from nla_repro.labeling.judge import judge_backends
from nla_repro.models import read_base_meta
from nla_repro.nla import load_ar, load_av, shuffled, training_pairs
from nla_repro.pipeline import StageParams, code_sha256, stage_view
from nla_repro.plots import eval_plots
from nla_repro.schemas import (
    LABELS,
    activations_schema,
    eval_rows_from_arrow,
    eval_rows_schema,
    eval_rows_to_arrow,
    read_eval_rows,
    read_parquet,
    validate,
)
from nla_repro.seeds import derive_seed
from nla_repro.templates import load_template

JUDGE_PROMPTS = ("judge.v1", "judge_pair.v1", "paraphrase.v1")


@dataclass(frozen=True)
class Outputs:
    rows: Path
    metrics: Path
    plots: Path


def _last_position(acts: pd.DataFrame, split: str) -> tuple[np.ndarray, np.ndarray]:
    """The doc_ids and vectors (float64) of one split's last-position activations."""
    rows = acts[(acts["split"] == split) & (acts["position"] == acts["n_tokens"] - 1)]
    vectors = np.stack(rows["vector"].to_list()).astype(np.float64) if len(rows) else None
    return rows["doc_id"].to_numpy(), vectors


@dataclass(frozen=True)
class EvalInputs:
    rows: pd.DataFrame
    """The evaluated rows (doc_id, source_family, text, label, target), in evaluation order."""
    mu: np.ndarray
    """Mean of the held-out pool (`eval.pool_split`): the centre of every centred score."""
    pool: np.ndarray
    """The held-out pool's vectors (the random floor)."""
    train: np.ndarray
    """The train pool's vectors (the text-free predictors, the nearest-train oracle)."""
    train_families: np.ndarray
    """Source family of each train vector."""
    split_rows: int
    """Labeled rows of the split, of which `rows` is a sample (or all)."""


def eval_inputs(cfg: C.EvalConfig, d_model: int) -> EvalInputs:
    """The evaluated rows: a seeded random sample of the split's labeled rows stratified by
    source family (all of them when eval.rows is 0), in a seeded random order; and the pools
    the anchors and baselines are computed from."""
    labels = read_parquet(C.LABELS_PATH, LABELS)
    acts = read_parquet(C.ACTIVATIONS_PATH, activations_schema(d_model))
    pairs = training_pairs(labels, acts, d_model, f"{C.LABELS_PATH} x {C.ACTIVATIONS_PATH}")
    split = pairs[pairs["split"] == cfg.split].merge(
        labels[["doc_id", "source_family", "text"]], on="doc_id", how="left"
    )
    split = split.sort_values("doc_id", kind="stable").reset_index(drop=True)
    order = stratified_sample(
        split["source_family"].to_numpy(), cfg.rows, derive_seed(cfg.seed, 1, stream="sample")
    )
    rows = split.iloc[order].reset_index(drop=True)
    if len(rows) < 2:
        raise ConfigError(
            f"eval: {len(rows)} labeled {cfg.split} row(s) in {C.LABELS_PATH}; the metrics need "
            "at least 2 (label more rows or raise eval.rows)"
        )
    _, pool = _last_position(acts, cfg.pool_split)
    train_ids, train = _last_position(acts, "train")
    if pool is None or train is None:
        raise ConfigError(
            f"eval: no {cfg.pool_split} (pool_split) or train activations at the last "
            f"position in {C.ACTIVATIONS_PATH}"
        )
    family = labels.set_index("doc_id")["source_family"]
    train_families = family.reindex(train_ids).fillna("unlabeled").to_numpy()
    rows = rows.rename(columns={"explanation": "label", "vector": "target"})
    return EvalInputs(
        rows[["doc_id", "source_family", "text", "label", "target"]],
        pool.mean(0),
        pool,
        train,
        train_families,
        len(split),
    )


def load_pair(params: StageParams, av_dir: Path, ar_dir: Path):
    """The AV and AR on this pipeline's base; refuse a pair trained on another base/layer."""
    base = params.base
    meta = read_base_meta(C.BASE_DIR)
    for path in (av_dir, ar_dir):
        sidecar = yaml.safe_load((path / "nla_meta.yaml").read_text())
        if sidecar.get("base_model") != meta["source"]["name"]:
            raise ConfigError(
                f"{path}: trained on {sidecar.get('base_model')!r}, but models/base holds "
                f"{meta['source']['name']!r}; run the base stage for that model first"
            )
        if sidecar.get("layer") != params.extract.layer:
            raise ConfigError(
                f"{path}: reads layer {sidecar.get('layer')}, but extract.layer is "
                f"{params.extract.layer} (the activations would not match)"
            )
    load = {
        "quantization": base.quantization,
        "compute_dtype": base.compute_dtype,
        "device": base.device,
    }
    return load_av(av_dir, C.BASE_DIR, **load), load_ar(ar_dir, C.BASE_DIR, **load)


def _folder_sha256(path: Path) -> dict:
    return {
        p.name: sha256_file(p)
        for p in sorted(path.iterdir())
        if p.is_file() and p.suffix in (".safetensors", ".yaml", ".json")
    }


def run(
    params: C.Params,
    av_path: str | None = None,
    ar_path: str | None = None,
    out_dir: str | None = None,
    work_root: Path = C.WORK_DIR,
) -> dict:
    params = stage_view(params, "eval")
    cfg = params.eval
    av_dir = Path(av_path or cfg.av_path or C.AV_DIR)
    ar_dir = Path(ar_path or cfg.ar_path or C.AR_DIR)
    outputs = (
        Outputs(Path(out_dir) / "rows.parquet", Path(out_dir) / "eval.json", Path(out_dir))
        if out_dir
        else Outputs(C.EVAL_ROWS, C.EVAL_METRICS, C.EVAL_PLOTS)
    )
    base_meta = read_base_meta(C.BASE_DIR)
    d_model = int(base_meta["d_model"])
    inputs = eval_inputs(cfg, d_model)
    rows, mu = inputs.rows, inputs.mu
    av, ar = load_pair(params, av_dir, ar_dir)
    judge_b, paraphraser = judge_backends(cfg, params.base, C.BASE_DIR)

    meta = {
        "mu": mu.tolist(),
        "mu_pool": cfg.pool_split,
        # fve_nrm's centre: the mean of norm(v) over the train pool.
        "train_mean_nrm": normalized(inputs.train).mean(axis=0).tolist(),
        "split_rows": inputs.split_rows,
        "sample": "all rows"
        if len(rows) == inputs.split_rows
        else "a random sample (stratified by source family)",
        "seed": cfg.seed,
        "n_boot": cfg.n_boot,
        "judge_backend": cfg.judge_backend,
        "judge_model": judge_b.model if judge_b else None,
        "models": {
            "av": {"path": str(av_dir), "files_sha256": _folder_sha256(av_dir)},
            "ar": {"path": str(ar_dir), "files_sha256": _folder_sha256(ar_dir)},
            "base": base_meta["source"]["name"],
        },
        "prompts_sha256": {v: load_template(v).sha256 for v in JUDGE_PROMPTS},
        "inputs_sha256": {str(p): sha256_file(p) for p in (C.LABELS_PATH, C.ACTIVATIONS_PATH)},
    }
    baseline_cols, meta["baselines"] = baseline_columns(
        np.stack(rows["target"].to_list()).astype(np.float64),
        inputs.train,
        inputs.train_families,
        inputs.pool,
        mu,
    )
    # Chunks made from other models, inputs, code or params are discarded, never resumed.
    key = fingerprint(meta, code_sha256("eval"), params.declared_values())
    store = ChunkStore(work_root / "eval", key)

    n = len(rows)
    targets = torch.from_numpy(np.stack(rows["target"].to_list()).astype(np.float32))
    shuffled_all = shuffled(targets)
    offset = max(1, n // 2)
    unrelated_all = [rows["text"].iloc[(i + offset) % n] for i in range(n)]
    judge_upto = cfg.judge_rows or n
    chunks = [range(i, min(i + cfg.chunk_rows, n)) for i in range(0, n, cfg.chunk_rows)]
    done = sum(len(c) for i, c in enumerate(chunks) if store.done(i))
    bar = tqdm(total=n, initial=done, unit="row", desc="eval")
    for c, idx in enumerate(chunks):
        if store.done(c):
            continue
        part = evaluate_chunk(
            rows.iloc[idx.start : idx.stop].reset_index(drop=True),
            shuffled_all[idx.start : idx.stop],
            unrelated_all[idx.start : idx.stop],
            (av, ar, judge_b, paraphraser),
            mu,
            cfg,
            judge_upto - idx.start,
            c,
        )
        store.write(c, eval_rows_to_arrow(part))
        bar.update(len(idx))
        bar.set_postfix(cos=f"{part['cos_greedy'].mean():.3f}")
    bar.close()

    table = eval_rows_from_arrow(store.read(range(len(chunks))))
    for column, values in baseline_cols.items():
        table[column] = values
    table = validate(table, eval_rows_schema(d_model), outputs.rows)
    write_parquet(eval_rows_to_arrow(table, meta), outputs.rows)

    # The published numbers come from the file just written, nothing else.
    written, written_meta = read_eval_rows(outputs.rows, d_model)
    metrics = compute_metrics(written, written_meta)
    write_json(metrics, outputs.metrics)
    eval_plots(written, metrics, np.asarray(written_meta["mu"]), outputs.plots)
    store.clear()
    print_rows(eval_report(metrics))
    return metrics
