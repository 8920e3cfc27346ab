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
from nla_repro.evaluation.chunk import Models, evaluate_chunk
from nla_repro.evaluation.compare import rl_comparison
from nla_repro.evaluation.measures import normalized, stratified_sample
from nla_repro.evaluation.report import eval_report, print_rows
from nla_repro.evaluation.suite import clean_json, compute_metrics
from nla_repro.io import ChunkStore, fingerprint, sha256_file, write_json, write_parquet
from nla_repro.labeling.judge import judge_backends
from nla_repro.models import SharedBase, read_base_meta
from nla_repro.nla import load_ar, load_av, read_pairs, shuffled
from nla_repro.pipeline import StageParams, code_sha256, stage_view
from nla_repro.plots import eval_plots, rl_comparison_plot
from nla_repro.schemas import (
    eval_rows_from_arrow,
    eval_rows_schema,
    eval_rows_to_arrow,
    read_eval_rows,
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


def eval_inputs(cfg: C.EvalConfig, d_model: int, layer: int) -> EvalInputs:
    """The evaluated rows: a seeded random sample of the split's labeled rows stratified by
    source family (all of them when eval.rows is 0), in a seeded random order; and the pools
    the anchors and baselines are computed from."""
    labels, acts, pairs = read_pairs(d_model, layer)
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


def check_trained_here(params: StageParams, path: Path, base_name: str) -> None:
    """Refuse a model trained on another base or layer than this pipeline's."""
    file = path / "nla_meta.yaml"
    if not file.is_file():
        raise ConfigError(f"{file}: not found (is {path} an AV or AR folder?)")
    sidecar = yaml.safe_load(file.read_text())
    if sidecar.get("base_model") != base_name:
        raise ConfigError(
            f"{path}: trained on {sidecar.get('base_model')!r}, but models/base holds "
            f"{base_name!r}; run the base stage for that model first"
        )
    if sidecar.get("layer") != params.extract.layer:
        raise ConfigError(
            f"{path}: reads layer {sidecar.get('layer')}, but extract.layer is "
            f"{params.extract.layer} (the activations would not match)"
        )


@dataclass(frozen=True)
class Plan:
    """Which models one eval run loads and which (AV, AR) pairs it scores."""

    avs: dict[str, Path]
    ars: dict[str, Path]
    pairs: dict[str, tuple[str, str]]
    """Pair name -> (AV name, AR name); `published` is the pair the cards publish."""

    @property
    def compares(self) -> bool:
        return "sft" in self.pairs


PUBLISHED = "published"
SFT_PAIR = "sft"
HELDOUT_AR = "rl_heldout_ar"


def plan(cfg: C.EvalConfig, av_path: str | None, ar_path: str | None) -> Plan:
    """A named pair (`--av/--ar`, eval.av_path/ar_path) alone; by default the rl stage's pair
    (published), the SFT pair, and the RL AV read by the SFT AR (the held-out AR)."""
    av, ar = av_path or cfg.av_path, ar_path or cfg.ar_path
    if av or ar:
        return Plan(
            {"av": Path(av or C.RL_AV_DIR)},
            {"ar": Path(ar or C.RL_AR_DIR)},
            {PUBLISHED: ("av", "ar")},
        )
    return Plan(
        {"rl": C.RL_AV_DIR, "sft": C.AV_DIR},
        {"rl": C.RL_AR_DIR, "sft": C.AR_DIR},
        {PUBLISHED: ("rl", "rl"), SFT_PAIR: ("sft", "sft"), HELDOUT_AR: ("rl", "sft")},
    )


def load_models(params: StageParams, p: Plan, shared: SharedBase) -> tuple[dict, dict]:
    """The plan's AVs and ARs on this pipeline's base (one copy of its weights, `shared`)."""
    name = read_base_meta(C.BASE_DIR)["source"]["name"]
    for path in [*p.avs.values(), *p.ars.values()]:
        check_trained_here(params, path, name)
    avs = {k: load_av(path, C.BASE_DIR, shared) for k, path in p.avs.items()}
    ars = {k: load_ar(path, C.BASE_DIR, shared) for k, path in p.ars.items()}
    return avs, ars


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
    p = plan(cfg, av_path, ar_path)
    outputs = (
        Outputs(Path(out_dir) / "rows.parquet", Path(out_dir) / "eval.json", Path(out_dir))
        if out_dir
        else Outputs(C.EVAL_ROWS, C.EVAL_METRICS, C.EVAL_PLOTS)
    )
    rows_paths = {
        name: outputs.rows if name == PUBLISHED else outputs.rows.with_name(f"{name}_rows.parquet")
        for name in p.pairs
    }
    base_meta = read_base_meta(C.BASE_DIR)
    d_model = int(base_meta["d_model"])
    inputs = eval_inputs(cfg, d_model, params.extract.layer)
    rows, mu = inputs.rows, inputs.mu
    base = params.base
    shared = SharedBase(C.BASE_DIR, base.quantization, base.compute_dtype, base.device)
    avs, ars = load_models(params, p, shared)
    judge_b, paraphraser = judge_backends(cfg, base, C.BASE_DIR, shared)
    models = Models(avs, ars, judge_b, paraphraser)

    common = {
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
        "prompts_sha256": {v: load_template(v).sha256 for v in JUDGE_PROMPTS},
        "inputs_sha256": {str(f): sha256_file(f) for f in (C.LABELS_PATH, C.ACTIVATIONS_PATH)},
    }
    baseline_cols, common["baselines"] = baseline_columns(
        np.stack(rows["target"].to_list()).astype(np.float64),
        inputs.train,
        inputs.train_families,
        inputs.pool,
        mu,
    )
    files = {
        role: {"path": str(path), "files_sha256": _folder_sha256(path)}
        for role, path in [
            *(("av:" + k, v) for k, v in p.avs.items()),
            *(("ar:" + k, v) for k, v in p.ars.items()),
        ]
    }
    metas = {
        name: common
        | {
            "pair": name,
            "models": {
                "av": files[f"av:{av_name}"],
                "ar": files[f"ar:{ar_name}"],
                "base": base_meta["source"]["name"],
            },
        }
        for name, (av_name, ar_name) in p.pairs.items()
    }
    # Chunks made from other models, inputs, code or params are discarded, never resumed.
    key = fingerprint(common, files, p.pairs, code_sha256("eval"), params.declared_values())
    stores = {
        name: ChunkStore(work_root / ("eval" if name == PUBLISHED else f"eval_{name}"), key)
        for name in p.pairs
    }

    n = len(rows)
    targets = torch.from_numpy(np.stack(rows["target"].to_list()).astype(np.float32))
    shuffled_all = shuffled(targets)
    offset = max(1, n // 2)
    unrelated_all = [rows["text"].iloc[(i + offset) % n] for i in range(n)]
    judge_upto = cfg.judge_rows or n
    chunks = [range(i, min(i + cfg.chunk_rows, n)) for i in range(0, n, cfg.chunk_rows)]

    def finished(c: int) -> bool:
        return all(store.done(c) for store in stores.values())

    done = sum(len(c) for i, c in enumerate(chunks) if finished(i))
    bar = tqdm(total=n, initial=done, unit="row", desc=f"eval ({len(p.pairs)} pairs)")
    for c, idx in enumerate(chunks):
        if finished(c):
            continue
        parts = evaluate_chunk(
            rows.iloc[idx.start : idx.stop].reset_index(drop=True),
            shuffled_all[idx.start : idx.stop],
            unrelated_all[idx.start : idx.stop],
            models,
            p.pairs,
            mu,
            cfg,
            judge_upto - idx.start,
            c,
        )
        for name, part in parts.items():
            stores[name].write(c, eval_rows_to_arrow(part))
        bar.update(len(idx))
        bar.set_postfix(cos=f"{parts[PUBLISHED]['cos_greedy'].mean():.3f}")
    bar.close()

    written = {}
    for name, store in stores.items():
        table = eval_rows_from_arrow(store.read(range(len(chunks))))
        for column, values in baseline_cols.items():
            table[column] = values
        table = validate(table, eval_rows_schema(d_model), rows_paths[name])
        write_parquet(eval_rows_to_arrow(table, metas[name]), rows_paths[name])
        # The published numbers come from the files just written, nothing else.
        written[name] = read_eval_rows(rows_paths[name], d_model)
    metrics = eval_metrics(written)
    write_json(metrics, outputs.metrics)
    eval_plots(written[PUBLISHED][0], metrics, np.asarray(common["mu"]), outputs.plots)
    rl_comparison_plot(metrics, outputs.plots)
    for store in stores.values():
        store.clear()
    print_rows(eval_report(metrics))
    return metrics


def eval_metrics(written: dict[str, tuple[pd.DataFrame, dict]]) -> dict:
    """metrics/eval.json from the rows files: the published pair's suite at the top; with the
    SFT pair beside it, `comparison` holds the SFT pair's and the held-out AR's suites, every
    compared number's paired difference, and the ar_collusion verdict (also among the
    verdicts)."""
    rows, meta = written[PUBLISHED]
    metrics = compute_metrics(rows, meta)
    if SFT_PAIR not in written:
        return metrics
    sft_rows, held_rows = written[SFT_PAIR][0], written[HELDOUT_AR][0]
    found = rl_comparison(rows, sft_rows, held_rows, meta)
    metrics["comparison"] = clean_json(
        {
            "pairs": {
                SFT_PAIR: compute_metrics(sft_rows, written[SFT_PAIR][1]),
                HELDOUT_AR: compute_metrics(held_rows, written[HELDOUT_AR][1]),
            },
            **found,
        }
    )
    metrics["verdicts"]["ar_collusion"] = found["ar_collusion"]
    metrics["verdict_evidence"]["ar_collusion"] = found["ar_collusion_evidence"]
    return metrics
