"""eval stage: the NLA metric suite on held-out rows -> data/eval/rows.parquet,
metrics/eval.json, plots/eval/.

For each labeled row of `eval.split`: the AV writes a greedy explanation and K sampled ones
(mean log-prob of each recorded); the AR reconstructs the vector from the greedy output, each
sample, the source label (replay), N paraphrases of the label, the empty string, another row's
document (unrelated real text), random tokens (gibberish), and the greedy output with each
claim removed; the AV's loss on the label with the true vs a shuffled vector gives the
vector-use gap; the judge grades the greedy output and the label and picks the better one.
Rows are done in chunks under .nla_work/eval/, so an interrupted run resumes. Every number in
metrics/eval.json is computed from rows.parquet (evaluation.compute_metrics).

`python -m nla_repro eval --av DIR --ar DIR --out DIR` evaluates any AV/AR pair, e.g. a
downloaded release, on the base model and data of this pipeline.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import re
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import torch
import yaml
from tqdm import tqdm

from nla_repro import config as C
from nla_repro import evaluation as E
from nla_repro import labelers as L
from nla_repro.errors import ConfigError
from nla_repro.io import (
    ChunkStore,
    fingerprint,
    sha256_file,
    vectors_to_arrow,
    write_json,
    write_parquet,
)
from nla_repro.models import read_base_meta
from nla_repro.nla import (
    ActivationReconstructor,
    VerbalizerBase,
    load_ar,
    load_av,
    shuffled,
    training_pairs,
)
from nla_repro.schemas import (
    EVAL_CONDITIONS,
    LABELS,
    activations_schema,
    eval_rows_schema,
    read_parquet,
    validate,
)
from nla_repro.templates import load_template, parse_explanation

log = logging.getLogger(__name__)

PACKAGE = Path(__file__).resolve().parents[1]
# The code a finished chunk depends on (= the stage's dvc.yaml code deps, test-enforced):
# chunks made by other code are not resumed.
CODE = (
    "stages/eval.py",
    "evaluation.py",
    "plots.py",
    "nla.py",
    "labelers.py",
    "models.py",
    "metrics.py",
    "schemas.py",
    "templates.py",
    "trainer.py",
    *(
        f"prompts/{v}.yaml"
        for v in ("av.v1", "ar.v1", "judge.v1", "judge_pair.v1", "paraphrase.v1")
    ),
)
META_KEY = b"nla_eval"
FINAL_TOKEN_HEAD = re.compile(r'^(final token:\s*"[^"]*",?)\s*(.*)$', re.S)


@dataclass(frozen=True)
class Outputs:
    rows: Path
    metrics: Path
    plots: Path


# ---------------------------------------------------------------------------------------------
# Inputs


def _last_position(acts: pd.DataFrame, split: str) -> np.ndarray:
    rows = acts[(acts["split"] == split) & (acts["position"] == acts["n_tokens"] - 1)]
    return np.stack(rows["vector"].to_list()).astype(np.float64) if len(rows) else np.zeros((0,))


def eval_inputs(params: C.Params, d_model: int) -> tuple[pd.DataFrame, np.ndarray, np.ndarray]:
    """The evaluated rows (doc_id, source_family, text, label, target), the held-out pool
    mean mu, and the train pool (for the nearest-neighbour anchor)."""
    cfg = params.eval
    labels = read_parquet(C.LABELS_PATH, LABELS)
    acts = read_parquet(C.ACTIVATIONS_PATH, activations_schema(d_model))
    pairs = training_pairs(labels, acts, d_model, f"{C.LABELS_PATH} x {C.ACTIVATIONS_PATH}")
    rows = pairs[pairs["split"] == cfg.split].merge(
        labels[["doc_id", "source_family", "text"]], on="doc_id", how="left"
    )
    if cfg.rows:
        rows = rows.head(cfg.rows)
    if len(rows) < 2:
        raise ConfigError(
            f"eval: {len(rows)} labeled {cfg.split} row(s) in {C.LABELS_PATH}; the metrics need "
            "at least 2 (label more rows or raise eval.rows)"
        )
    pool = _last_position(acts, cfg.pool_split)
    train = _last_position(acts, "train")
    if len(pool) == 0 or len(train) == 0:
        raise ConfigError(
            f"eval: no {cfg.pool_split} (pool_split) or train activations at the last "
            f"position in {C.ACTIVATIONS_PATH}"
        )
    rows = rows.rename(columns={"explanation": "label", "vector": "target"})
    return rows[["doc_id", "source_family", "text", "label", "target"]], pool.mean(0), train


def load_pair(params: C.Params, av_dir: Path, ar_dir: Path):
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
    load = {"quantization": base.quantization, "compute_dtype": base.compute_dtype}
    load["device"] = base.device
    return load_av(av_dir, C.BASE_DIR, **load), load_ar(ar_dir, C.BASE_DIR, **load)


def _folder_sha256(path: Path) -> dict:
    return {
        p.name: sha256_file(p)
        for p in sorted(path.iterdir())
        if p.is_file() and p.suffix in (".safetensors", ".yaml", ".json")
    }


# ---------------------------------------------------------------------------------------------
# Model calls


def _batches(n: int, size: int):
    for i in range(0, n, size):
        yield slice(i, min(i + size, n))


@torch.no_grad()
def reconstruct(ar: ActivationReconstructor, texts: list[str], batch: int) -> np.ndarray:
    """AR(text) for every text, (N, d) float32."""
    if not texts:
        return np.zeros((0, ar.head.out_features), np.float32)
    # Each distinct text once: the empty string, claim sets equal to the whole output, repeats.
    unique = list(dict.fromkeys(texts))
    parts = [ar.predict(unique[s]).float().cpu().numpy() for s in _batches(len(unique), batch)]
    found = dict(zip(unique, np.concatenate(parts).astype(np.float32), strict=True))
    return np.stack([found[t] for t in texts])


@torch.no_grad()
def mean_logprob(av: VerbalizerBase, texts: list[str], vectors: torch.Tensor, batch: int):
    """Mean log-prob per token of each text as the AV's complete response (tokens + EOS),
    teacher-forced, given its vector."""
    out = []
    for s in _batches(len(texts), batch):
        nll, n = av.row_nll(texts[s], vectors[s])
        out += (-nll / n.clamp_min(1)).tolist()
    return out


@torch.no_grad()
def summed_nll(av: VerbalizerBase, texts: list[str], vectors: torch.Tensor, batch: int):
    nlls, counts = [], []
    for s in _batches(len(texts), batch):
        nll, n = av.row_nll(texts[s], vectors[s])
        nlls += nll.tolist()
        counts += n.tolist()
    return nlls, counts


@torch.no_grad()
def generate(av: VerbalizerBase, vectors: torch.Tensor, cfg: C.EvalConfig, temperature: float):
    out: list[str] = []
    for s in _batches(len(vectors), cfg.batch_size):
        out += av.generate(vectors[s], cfg.max_new_tokens, temperature)
    return [t.strip() for t in out]


def gibberish(tokenizer, n_tokens: int, rng: np.random.Generator) -> str:
    """Random vocabulary tokens (no special tokens), decoded: text with no content."""
    special = set(tokenizer.all_special_ids)
    ids = [int(i) for i in rng.integers(0, len(tokenizer), size=4 * n_tokens + 8)]
    return tokenizer.decode([i for i in ids if i not in special][:n_tokens]).strip()


# ---------------------------------------------------------------------------------------------
# Judge and paraphraser (the label stage's backends)


@dataclass(frozen=True)
class JudgeScores:
    validity: float = float("nan")
    specificity: float = float("nan")
    error: str = ""


def parse_scores(text: str) -> JudgeScores:
    v = re.search(r"VALIDITY:\s*([1-5])\b", text)
    s = re.search(r"SPECIFICITY:\s*([1-5])\b", text)
    if not (v and s):
        return JudgeScores(error="no VALIDITY: n and SPECIFICITY: n lines")
    return JudgeScores(float(v.group(1)), float(s.group(1)))


@dataclass(frozen=True)
class Preference:
    choice: str = ""
    error: str = ""


def parse_preference(text: str) -> Preference:
    m = re.search(r"PREFERRED:\s*([AB])\b", text)
    return Preference(choice=m.group(1)) if m else Preference(error="no PREFERRED: A|B line")


def judge_backends(params: C.Params):
    """(judge, paraphraser): the same backend, deterministic for the judge and sampling at
    eval.paraphrase_temperature for the paraphraser; (None, None) for judge_backend none."""
    cfg = params.eval
    if cfg.judge_backend == "none":
        return None, None
    policy = L.RetryPolicy(
        max_retries=params.label.max_retries,
        backoff_base_s=params.label.backoff_base_s,
        backoff_max_s=params.label.backoff_max_s,
    )
    judge_cfg = dataclasses.replace(
        params.label,
        backend=cfg.judge_backend,
        labeler_model=cfg.judge_model,
        temperature=0.0,
        max_new_tokens=32,
    )
    judge = L.make_backend(judge_cfg, params.base, C.BASE_DIR, policy)
    paraphraser = _with_cfg(
        judge, dataclasses.replace(judge_cfg, temperature=cfg.paraphrase_temperature)
    )
    return judge, paraphraser


def _with_cfg(backend: L.Backend, cfg) -> L.Backend:
    """The same backend (and loaded model) with other generation settings."""
    other = object.__new__(type(backend))
    other.__dict__.update(backend.__dict__, cfg=cfg)
    return other


def judge(
    backend: L.Backend, rows: pd.DataFrame, explanations: list[str], seed: int, attempts: int
) -> dict[str, list]:
    """Validity and specificity of the AV's output and of the label, and which of the two
    the judge prefers (A/B order drawn per row, so position bias averages out)."""
    scores_t, pair_t = load_template("judge.v1"), load_template("judge_pair.v1")
    texts, labels = rows["text"].tolist(), rows["label"].tolist()
    fields = [
        {"text": t, "explanation": e or "(empty)"}
        for t, e in zip(texts + texts, explanations + labels, strict=True)
    ]
    if isinstance(backend, L.LocalBackend):
        # One question per scale; the scaffold writes "SCALE: n" lines the parser reads.
        questions = _prompt_extra("judge.v1")["local_questions"]
        answers = ["" for _ in fields]
        for scale, question in questions.items():
            asked = [f | {"scale": scale, "question": question} for f in fields]
            for r, comp in enumerate(L.ask(backend, scores_t, asked, seed)):
                answers[r] += comp.text + "\n"
        scores = [parse_scores(a) for a in answers]
    else:
        graded = L.ask_until_parsed(backend, scores_t, fields, parse_scores, attempts, seed)
        scores = [p if p is not None else JudgeScores(error="no response") for p, _, _ in graded]
    rng = np.random.default_rng(seed)
    av_first = rng.random(len(texts)) < 0.5
    pair_fields = [
        {"text": t, "a": e if first else lab, "b": lab if first else e}
        for t, e, lab, first in zip(texts, explanations, labels, av_first, strict=True)
    ]
    prefs = L.ask_until_parsed(backend, pair_t, pair_fields, parse_preference, attempts, seed + 1)
    preferred = []
    for (p, _, _), first in zip(prefs, av_first, strict=True):
        if p is None or p.error:
            preferred.append("")
        else:
            preferred.append("av" if (p.choice == "A") == bool(first) else "label")
    n = len(texts)
    return {
        "judge_validity": [s.validity for s in scores[:n]],
        "judge_specificity": [s.specificity for s in scores[:n]],
        "label_validity": [s.validity for s in scores[n:]],
        "label_specificity": [s.specificity for s in scores[n:]],
        "judge_preferred": preferred,
    }


def _prompt_extra(version: str) -> dict:
    """Keys of a prompt file beyond the template fields (covered by its sha256)."""
    return yaml.safe_load(
        (resources.files("nla_repro") / "prompts" / f"{version}.yaml").read_text()
    )


def paraphrase(backend: L.Backend, labels: list[str], n: int, seed: int, attempts: int):
    """n paraphrases of each label (fewer where the paraphraser failed). The local backend
    rewrites one claim at a time and keeps the final-token line's `final token: "x",` head."""
    template = load_template("paraphrase.v1")
    out: list[list[str]] = [[] for _ in labels]
    for j in range(n):
        s = seed + 104_729 * j
        if isinstance(backend, L.LocalBackend):
            parts = [E.claims(lab) for lab in labels]
            heads, fields, owner = [], [], []
            for r, claims in enumerate(parts):
                for c in claims:
                    m = FINAL_TOKEN_HEAD.match(c)
                    head, rest = (m.group(1), m.group(2)) if m else ("", c)
                    heads.append(head)
                    fields.append({"claim": rest or c})
                    owner.append(r)
            comps = L.ask(backend, template, fields, s)
            rewritten: list[list[str | None]] = [[] for _ in labels]
            for r, head, comp in zip(owner, heads, comps, strict=True):
                text = comp.text.strip() if not comp.error else ""
                rewritten[r].append(f"{head} {text}".strip() if text else None)
            for r, claims in enumerate(rewritten):
                if claims and all(c is not None for c in claims):
                    out[r].append(E.join_claims(claims))
        else:
            results = L.ask_until_parsed(
                backend,
                template,
                [{"explanation": lab} for lab in labels],
                parse_explanation,
                attempts,
                s,
            )
            for r, (parsed, _, _) in enumerate(results):
                if parsed is not None and parsed.ok:
                    out[r].append(parsed.text)
    return out


# ---------------------------------------------------------------------------------------------
# One chunk of rows


def evaluate_chunk(
    rows: pd.DataFrame,
    shuffled_BD: torch.Tensor,
    unrelated: list[str],
    models: tuple,
    mu: np.ndarray,
    params: C.Params,
    judge_upto: int,
    chunk_index: int,
) -> pd.DataFrame:
    """Every per-row column of rows.parquet except the nearest-neighbour anchor."""
    cfg, av, ar, judge_backend, paraphraser = params.eval, *models
    n, k, batch = len(rows), cfg.samples, cfg.batch_size
    targets = np.stack(rows["target"].to_list()).astype(np.float32)
    vectors = torch.from_numpy(targets)
    labels = rows["label"].tolist()
    seed = cfg.seed * 1_000_003 + chunk_index * 10_007

    greedy = generate(av, vectors, cfg, 0.0)
    torch.manual_seed(seed)
    samples = generate(av, vectors.repeat_interleave(k, 0), cfg, cfg.temperature) if k else []
    greedy_lp = mean_logprob(av, greedy, vectors, batch)
    sample_lp = mean_logprob(av, samples, vectors.repeat_interleave(k, 0), batch) if k else []
    nll_true, n_tok = summed_nll(av, labels, vectors, batch)
    nll_shuf, _ = summed_nll(av, labels, shuffled_BD, batch)

    rng = np.random.default_rng(seed)
    gib = [gibberish(av.tokenizer, max(8, len(av.tokenizer(g)["input_ids"])), rng) for g in greedy]
    paras = (
        paraphrase(paraphraser, labels, cfg.paraphrases, seed, params.label.max_attempts)
        if cfg.paraphrases
        else [[] for _ in labels]
    )
    claim_lists = [E.claims(g) for g in greedy]
    # Claim ablations: all claims (canonical form), then each claim left out.
    claim_texts, claim_owner = [], []
    for r, cl in enumerate(claim_lists):
        if cl:
            claim_texts.append(E.join_claims(cl))
            claim_owner.append((r, -1))
            for i in range(len(cl)):
                claim_texts.append(E.join_claims(cl[:i] + cl[i + 1 :]))
                claim_owner.append((r, i))

    # One AR pass over every text of the chunk.
    para_flat = [p for ps in paras for p in ps]
    texts = {
        "greedy": greedy,
        "replay": labels,
        "empty": [""],
        "unrelated": unrelated,
        "gibberish": gib,
        "samples": samples,
        "paraphrases": para_flat,
        "claims": claim_texts,
    }
    flat = [t for ts in texts.values() for t in ts]
    rec_all = reconstruct(ar, flat, batch)
    rec, start = {}, 0
    for name, ts in texts.items():
        rec[name] = rec_all[start : start + len(ts)]
        start += len(ts)
    rec["empty"] = np.repeat(rec["empty"], n, axis=0)

    out = pd.DataFrame({"doc_id": rows["doc_id"].to_numpy()})
    for col in ("source_family", "text", "label", "target"):
        out[col] = rows[col].to_numpy()
    out["explanation"] = greedy
    out["explanation_logprob"] = greedy_lp
    for cond in EVAL_CONDITIONS:
        out[f"rec_{cond}"] = list(rec[cond])
        out[f"cos_{cond}"] = E.cosine_rows(rec[cond], targets)
        out[f"fve_cen_{cond}"] = E.fve_cen_rows(rec[cond], targets, mu)
    target_k = np.repeat(targets, k, axis=0)
    s_cos = E.cosine_rows(rec["samples"], target_k).reshape(n, k) if k else np.zeros((n, 0))
    s_cen = E.fve_cen_rows(rec["samples"], target_k, mu).reshape(n, k) if k else s_cos
    out["samples"] = [samples[r * k : (r + 1) * k] for r in range(n)]
    out["sample_logprob"] = [sample_lp[r * k : (r + 1) * k] for r in range(n)]
    out["sample_cos"] = [s_cos[r].tolist() for r in range(n)]
    out["sample_fve_cen"] = [s_cen[r].tolist() for r in range(n)]
    owners = np.repeat(np.arange(n), [len(p) for p in paras])
    p_cos = E.cosine_rows(rec["paraphrases"], targets[owners]) if len(owners) else []
    p_cen = E.fve_cen_rows(rec["paraphrases"], targets[owners], mu) if len(owners) else []
    out["paraphrases"] = paras
    out["para_cos"] = [
        [float(c) for c, o in zip(p_cos, owners, strict=True) if o == r] for r in range(n)
    ]
    out["para_fve_cen"] = [
        [float(c) for c, o in zip(p_cen, owners, strict=True) if o == r] for r in range(n)
    ]
    # Δmse of a claim = mse without it - mse with all claims; mse_nrm = 2 (1 - cos).
    claim_owner_rows = np.array([r for r, _ in claim_owner], dtype=int)
    c_mse = (
        E.mse_nrm_from_cos(E.cosine_rows(rec["claims"], targets[claim_owner_rows]))
        if claim_texts
        else []
    )
    full = {r: m for (r, i), m in zip(claim_owner, c_mse, strict=True) if i == -1}
    deltas: list[list[float]] = [[] for _ in range(n)]
    for (r, i), m in zip(claim_owner, c_mse, strict=True):
        if i >= 0:
            deltas[r].append(float(m - full[r]))
    out["claims"] = claim_lists
    out["claim_delta_mse"] = deltas
    out["unrelated_text"] = unrelated
    out["gibberish_text"] = gib
    out["nll_true"] = nll_true
    out["nll_shuffled"] = nll_shuf
    out["n_label_tokens"] = np.asarray(n_tok, dtype=np.int64)

    judged = dict.fromkeys(
        ("judge_validity", "judge_specificity", "label_validity", "label_specificity"),
        [float("nan")] * n,
    ) | {"judge_preferred": [""] * n}
    m = max(0, min(n, judge_upto))
    if judge_backend is not None and m:
        got = judge(judge_backend, rows.head(m), greedy[:m], seed, params.label.max_attempts)
        for key, values in got.items():
            judged[key] = values + judged[key][m:]
    for key, values in judged.items():
        out[key] = values
    return out


# ---------------------------------------------------------------------------------------------
# Table I/O: vectors as fixed-size float32 lists, the metric inputs in the parquet metadata


VECTOR_COLUMNS = ("target", *(f"rec_{c}" for c in EVAL_CONDITIONS))
LIST_TYPES = {
    "samples": pa.list_(pa.string()),
    "paraphrases": pa.list_(pa.string()),
    "claims": pa.list_(pa.string()),
    "sample_logprob": pa.list_(pa.float64()),
    "sample_cos": pa.list_(pa.float64()),
    "sample_fve_cen": pa.list_(pa.float64()),
    "para_cos": pa.list_(pa.float64()),
    "para_fve_cen": pa.list_(pa.float64()),
    "claim_delta_mse": pa.list_(pa.float64()),
}


def to_arrow(df: pd.DataFrame, meta: dict | None = None) -> pa.Table:
    arrays, names = [], []
    for col in df.columns:
        if col in VECTOR_COLUMNS:
            arr = vectors_to_arrow(np.stack(df[col].to_list()).astype(np.float32))
        elif col in LIST_TYPES:
            arr = pa.array([list(v) for v in df[col]], type=LIST_TYPES[col])
        else:
            arr = pa.array(df[col].to_numpy())
        arrays.append(arr)
        names.append(col)
    table = pa.Table.from_arrays(arrays, names=names)
    if meta is not None:
        table = table.replace_schema_metadata({META_KEY: json.dumps(meta).encode()})
    return table


def read_rows(path: Path | str, d_model: int) -> tuple[pd.DataFrame, dict]:
    """rows.parquet, validated, and its metadata (mu, rawvar, seeds, models, judge)."""
    table = pq.read_table(path)
    meta = json.loads((table.schema.metadata or {}).get(META_KEY, b"{}"))
    return validate(_from_arrow(table), eval_rows_schema(d_model), path), meta


def _from_arrow(table: pa.Table) -> pd.DataFrame:
    df = table.to_pandas()
    for col in LIST_TYPES:
        if col in df:
            df[col] = [list(v) for v in df[col]]
    return df


# ---------------------------------------------------------------------------------------------
# The stage


def run(
    params: C.Params,
    av_path: str | None = None,
    ar_path: str | None = None,
    out_dir: str | None = None,
    work_root: Path = C.WORK_DIR,
) -> dict:
    from nla_repro.plots import eval_plots

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
    rows, mu, train_pool = eval_inputs(params, d_model)
    pool_stats = json.loads(C.POOL_STATS_PATH.read_text())
    av, ar = load_pair(params, av_dir, ar_dir)
    judge_b, paraphraser = judge_backends(params)

    judge_model = getattr(judge_b, "model", None) if judge_b else None
    meta = {
        "mu": mu.tolist(),
        "mu_pool": cfg.pool_split,
        "rawvar": float(pool_stats["rawvar"]),
        "seed": cfg.seed,
        "n_boot": cfg.n_boot,
        "judge_backend": cfg.judge_backend,
        "judge_model": judge_model,
        "models": {
            "av": {"path": str(av_dir), "files_sha256": _folder_sha256(av_dir)},
            "ar": {"path": str(ar_dir), "files_sha256": _folder_sha256(ar_dir)},
            "base": base_meta["source"]["name"],
        },
        "prompts_sha256": {
            v: load_template(v).sha256 for v in ("judge.v1", "judge_pair.v1", "paraphrase.v1")
        },
        "inputs_sha256": {
            str(p): sha256_file(p) for p in (C.LABELS_PATH, C.ACTIVATIONS_PATH, C.POOL_STATS_PATH)
        },
    }
    code = {m: sha256_file(PACKAGE / m) for m in CODE}
    store = ChunkStore(
        work_root / "eval",
        fingerprint(
            meta,
            code,
            dataclasses.asdict(cfg),
            params.label.max_attempts,
            dataclasses.asdict(params.base),
        ),
    )

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
            params,
            judge_upto - idx.start,
            c,
        )
        store.write(c, to_arrow(part))
        bar.update(len(idx))
        bar.set_postfix(cos=f"{part['cos_greedy'].mean():.3f}")
    bar.close()

    table = _from_arrow(store.read(range(len(chunks))))
    nn_cos, nn_cen = E.nearest_in_pool(np.stack(table["target"].to_list()), train_pool, mu)
    table["nn_cos"], table["nn_fve_cen"] = nn_cos, nn_cen
    table = validate(table, eval_rows_schema(d_model), outputs.rows)
    write_parquet(to_arrow(table, meta), outputs.rows)

    # The published numbers come from the file just written, nothing else.
    written, written_meta = read_rows(outputs.rows, d_model)
    metrics = E.compute_metrics(written, written_meta)
    write_json(metrics, outputs.metrics)
    eval_plots(written, metrics, np.asarray(written_meta["mu"]), outputs.plots)
    store.clear()
    _log_headline(metrics)
    return metrics


def headline(m: dict) -> list[tuple[str, str]]:
    """The numbers a reader looks at first, each with its baseline, as (what, value) rows."""

    def ci(d: dict) -> str:
        lo, hi = d["ci95"]
        return f"{d['mean']:.3f} [{lo:.3f}, {hi:.3f}]" if d["mean"] is not None else "n/a"

    c, ab, idn, div = m["centred"], m["ablation"], m["identity"], m["diversity"]
    k = m["best_of_k"]["k_max"]
    rows = [
        ("rows evaluated", str(m["n"])),
        (
            "round trip cos (raw)",
            f"{ci(c['greedy']['cos'])}; random floor {c['random_floor']['cos']:.3f}",
        ),
        (
            "round trip fve_cen (centred)",
            f"{ci(c['greedy']['fve_cen'])}; random floor {c['random_floor']['fve_cen']:.3f}",
        ),
        ("replay (AR on the label), fve_cen", ci(c["replay"]["fve_cen"])),
        ("paraphrase ceiling, fve_cen", ci(c["paraphrase_ceiling"]["fve_cen"])),
        ("nearest train vector, fve_cen", ci(c["nn_in_pool"]["fve_cen"])),
        (
            "mse_nrm / fve_nrm",
            f"{m['round_trip']['mse_nrm']:.3f} (random 2.0) / "
            f"{m['round_trip']['fve_nrm']:.3f} (mean baseline 0)",
        ),
        ("AR: output - empty, cos", ci(ab["explanation_share"]["cos"])),
        ("AR: output - empty, fve_cen", ci(ab["explanation_share"]["fve_cen"])),
        (
            "identity argmax (centred)",
            f"{idn['centred']['argmax_hits']}/{idn['centred']['n']} "
            f"(chance 1/{idn['centred']['n']}, p={idn['centred']['p_value']:.2g})",
        ),
        (
            "AV vector-use gap, nats",
            f"{m['vector_use']['gap']:.3f} "
            f"[{m['vector_use']['ci95'][0]:.3f}, {m['vector_use']['ci95'][1]:.3f}]",
        ),
        ("unique / empty outputs", f"{div['unique_outputs']}/{div['n']} / {div['empty_outputs']}"),
    ]
    if k:
        rows.insert(5, (f"best of {k}, fve_cen", ci(c[f"best_of_{k}"]["fve_cen"])))
    if m["judge"]["n"]:
        j = m["judge"]
        rows.append(
            (
                f"judge {j['model']}: validity AV / label",
                f"{j['av_validity']['mean']:.2f} / {j['label_validity']['mean']:.2f}",
            )
        )
    rows += [(f"verdict {k}", str(v)) for k, v in m["verdicts"].items()]
    return rows


def _log_headline(m: dict) -> None:
    rows = headline(m)
    width = max(len(a) for a, _ in rows)
    print("\n".join(f"  {a:<{width}}  {b}" for a, b in rows))
