"""One chunk of the eval: every model call for a slice of the evaluated rows.

For each row: the AV writes a greedy explanation and K sampled ones (mean log-prob of each
recorded); the AR reconstructs the vector from the greedy output, each sample, the source
label (replay), N paraphrases of the label, the empty string, another row's document
(unrelated real text), random tokens (gibberish), and the greedy output with each claim
removed; the AV's loss on the label with the true vs a shuffled vector gives the vector-use
gap; the judge grades the greedy output and the label and picks the better one. The result
is every per-row column of data/eval/rows.parquet (`schemas.eval_rows_schema`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch

from nla_repro import config as C
from nla_repro.evaluation.measures import cosine_rows, fve_cen_rows, mse_nrm_from_cos
from nla_repro.labeling.judge import judge, paraphrase
from nla_repro.models import batch_slices
from nla_repro.nla import ActivationReconstructor, VerbalizerBase
from nla_repro.schemas import EVAL_CONDITIONS
from nla_repro.seeds import derive_seed
from nla_repro.templates import claims, join_claims


def length_order(lengths: list[int]) -> list[int]:
    """Indices by token length (stable): batches cut from this order hold texts of similar
    length, so little of each forward is padding."""
    return sorted(range(len(lengths)), key=lengths.__getitem__)


@torch.no_grad()
def reconstruct(
    ar: ActivationReconstructor, texts: list[str], batch: int, known: dict | None = None
) -> np.ndarray:
    """AR(text) for every text, (N, d) float32. Each distinct text is read once (the empty
    string, claim sets equal to the whole output, and, through `known`, the texts another
    pair of the chunk already gave this AR), in batches of similar length."""
    known = {} if known is None else known
    if not texts:
        return np.zeros((0, ar.head.out_features), np.float32)
    todo = [t for t in dict.fromkeys(texts) if t not in known]
    order = length_order([len(ids) for ids in ar.encode(todo)])
    for s in batch_slices(len(order), batch):
        part = [todo[i] for i in order[s]]
        known.update(zip(part, ar.predict(part).float().cpu().numpy(), strict=True))
    return np.stack([known[t] for t in texts]).astype(np.float32)


@torch.no_grad()
def response_nll(
    av: VerbalizerBase, texts: list[str], vectors: torch.Tensor, batch: int
) -> tuple[list[float], list[int]]:
    """Summed NLL of each text as the AV's complete response (tokens + EOS), teacher-forced
    given its vector, and its token count; in batches of similar length."""
    nlls, counts = [0.0] * len(texts), [0] * len(texts)
    order = length_order([len(av.response_ids(t)) for t in texts])
    for s in batch_slices(len(order), batch):
        idx = order[s]
        nll, n = av.row_nll([texts[i] for i in idx], vectors[idx])
        for i, a, b in zip(idx, nll.tolist(), n.tolist(), strict=True):
            nlls[i], counts[i] = a, b
    return nlls, counts


@torch.no_grad()
def write(av: VerbalizerBase, vectors: torch.Tensor, cfg: C.EvalConfig, seed: int):
    """Each row's greedy output and its K samples: `batch_size` rows per decode call, their
    greedy and sampled continuations in one batch (the decode loop takes one temperature
    per row), seeded once for the chunk."""
    k = cfg.samples
    torch.manual_seed(seed)
    greedy: list[str] = []
    samples: list[str] = []
    for s in batch_slices(len(vectors), cfg.batch_size):
        v = vectors[s]
        both = torch.cat([v, v.repeat_interleave(k, 0)])
        temps = [0.0] * len(v) + [cfg.temperature] * (len(v) * k)
        out = [t.strip() for t in av.generate(both, cfg.max_new_tokens, temps)]
        greedy += out[: len(v)]
        samples += out[len(v) :]
    return greedy, samples


def gibberish(tokenizer, n_tokens: int, rng: np.random.Generator) -> str:
    """Random vocabulary tokens (no special tokens), decoded: text with no content."""
    special = set(tokenizer.all_special_ids)
    ids = [int(i) for i in rng.integers(0, len(tokenizer), size=4 * n_tokens + 8)]
    return tokenizer.decode([i for i in ids if i not in special][:n_tokens]).strip()


@dataclass
class AVOutputs:
    """What one AV wrote and scored for a chunk's rows (its half of the eval)."""

    greedy: list[str]
    greedy_lp: list[float]
    samples: list[str]
    sample_lp: list[float]
    nll_true: list[float]
    nll_shuffled: list[float]
    n_label_tokens: list[int]
    gibberish: list[str]


def av_outputs(
    av: VerbalizerBase, rows: pd.DataFrame, shuffled_BD: torch.Tensor, cfg: C.EvalConfig, seed: int
) -> AVOutputs:
    """The AV's greedy output, K samples, their mean log-probs, the label's loss under the
    true and a shuffled vector, and a gibberish control as long as each greedy output."""
    k, batch = cfg.samples, cfg.batch_size
    vectors = torch.from_numpy(np.stack(rows["target"].to_list()).astype(np.float32))
    labels = rows["label"].tolist()
    greedy, samples = write(av, vectors, cfg, seed)
    # Every teacher-forced pass of the chunk in one length-ordered set: the outputs' own
    # log-probs, the label under its true and under a shuffled vector.
    n, n_s = len(greedy), len(samples)
    texts = greedy + samples + labels + labels
    scored = torch.cat([vectors, vectors.repeat_interleave(k, 0), vectors, shuffled_BD])
    nll, n_tok = response_nll(av, texts, scored, batch)
    mean_lp = [-a / max(b, 1) for a, b in zip(nll, n_tok, strict=True)]
    greedy_lp, sample_lp = mean_lp[:n], mean_lp[n : n + n_s]
    nll_true, nll_shuf = nll[n + n_s : 2 * n + n_s], nll[2 * n + n_s :]
    n_tok = n_tok[n + n_s : 2 * n + n_s]
    rng = np.random.default_rng(seed)
    gib = [gibberish(av.tokenizer, max(8, len(av.tokenizer(g)["input_ids"])), rng) for g in greedy]
    return AVOutputs(greedy, greedy_lp, samples, sample_lp, nll_true, nll_shuf, n_tok, gib)


def ar_frame(
    ar: ActivationReconstructor,
    rows: pd.DataFrame,
    av_out: AVOutputs,
    paras: list[list[str]],
    unrelated: list[str],
    mu: np.ndarray,
    cfg: C.EvalConfig,
    known: dict | None = None,
) -> pd.DataFrame:
    """Every per-row column of rows.parquet but the judge's and the baselines', for one AV's
    outputs read by one AR (`known`: that AR's reconstructions so far in this chunk)."""
    n, k = len(rows), cfg.samples
    targets = np.stack(rows["target"].to_list()).astype(np.float32)
    greedy, samples = av_out.greedy, av_out.samples
    claim_lists = [claims(g) for g in greedy]
    # Claim ablations: all claims (canonical form), then each claim left out.
    claim_texts, claim_owner = [], []
    for r, cl in enumerate(claim_lists):
        if cl:
            claim_texts.append(join_claims(cl))
            claim_owner.append((r, -1))
            for i in range(len(cl)):
                claim_texts.append(join_claims(cl[:i] + cl[i + 1 :]))
                claim_owner.append((r, i))

    # One AR pass over every text of the chunk.
    para_flat = [p for ps in paras for p in ps]
    texts = {
        "greedy": greedy,
        "replay": rows["label"].tolist(),
        "empty": [""],
        "unrelated": unrelated,
        "gibberish": av_out.gibberish,
        "samples": samples,
        "paraphrases": para_flat,
        "claims": claim_texts,
    }
    flat = [t for ts in texts.values() for t in ts]
    rec_all = reconstruct(ar, flat, cfg.batch_size, known)
    rec, start = {}, 0
    for name, ts in texts.items():
        rec[name] = rec_all[start : start + len(ts)]
        start += len(ts)
    rec["empty"] = np.repeat(rec["empty"], n, axis=0)

    out = pd.DataFrame({"doc_id": rows["doc_id"].to_numpy()})
    for col in ("source_family", "text", "label", "target"):
        out[col] = rows[col].to_numpy()
    out["explanation"] = greedy
    out["explanation_logprob"] = av_out.greedy_lp
    for cond in EVAL_CONDITIONS:
        out[f"rec_{cond}"] = list(rec[cond])
        out[f"cos_{cond}"] = cosine_rows(rec[cond], targets)
        out[f"fve_cen_{cond}"] = fve_cen_rows(rec[cond], targets, mu)
    target_k = np.repeat(targets, k, axis=0)
    s_cos = cosine_rows(rec["samples"], target_k).reshape(n, k) if k else np.zeros((n, 0))
    s_cen = fve_cen_rows(rec["samples"], target_k, mu).reshape(n, k) if k else s_cos
    out["samples"] = [samples[r * k : (r + 1) * k] for r in range(n)]
    out["sample_logprob"] = [av_out.sample_lp[r * k : (r + 1) * k] for r in range(n)]
    out["sample_cos"] = [s_cos[r].tolist() for r in range(n)]
    out["sample_fve_cen"] = [s_cen[r].tolist() for r in range(n)]
    owners = np.repeat(np.arange(n), [len(p) for p in paras])
    p_cos = cosine_rows(rec["paraphrases"], targets[owners]) if len(owners) else []
    p_cen = fve_cen_rows(rec["paraphrases"], targets[owners], mu) if len(owners) else []
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
        mse_nrm_from_cos(cosine_rows(rec["claims"], targets[claim_owner_rows]))
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
    out["gibberish_text"] = av_out.gibberish
    out["nll_true"] = av_out.nll_true
    out["nll_shuffled"] = av_out.nll_shuffled
    out["n_label_tokens"] = np.asarray(av_out.n_label_tokens, dtype=np.int64)
    return out


def judge_columns(
    judge_backend, rows: pd.DataFrame, greedy: list[str], judge_upto: int, seed: int, cfg
) -> dict:
    """The judge's grades of the first `judge_upto` rows' outputs and labels (NaN / "" for
    the rest, and for all rows without a judge)."""
    n = len(rows)
    judged = dict.fromkeys(
        ("judge_validity", "judge_specificity", "label_validity", "label_specificity"),
        [float("nan")] * n,
    ) | {"judge_preferred": [""] * n}
    m = max(0, min(n, judge_upto))
    if judge_backend is not None and m:
        got = judge(judge_backend, rows.head(m), greedy[:m], seed, cfg.judge_max_attempts)
        for key, values in got.items():
            judged[key] = values + judged[key][m:]
    return judged


@dataclass
class Models:
    """The models of one eval run: AVs and ARs by name, the judge and the paraphraser."""

    avs: dict[str, VerbalizerBase]
    ars: dict[str, ActivationReconstructor]
    judge: object = None
    paraphraser: object = None


def evaluate_chunk(
    rows: pd.DataFrame,
    shuffled_BD: torch.Tensor,
    unrelated: list[str],
    models: Models,
    pairs: dict[str, tuple[str, str]],
    mu: np.ndarray,
    cfg: C.EvalConfig,
    judge_upto: int,
    chunk_index: int,
) -> dict[str, pd.DataFrame]:
    """For each pair name -> (AV name, AR name): every per-row column of its rows.parquet
    except the baselines'. Each AV writes and is judged once, however many ARs read it; the
    label's paraphrases are shared by all pairs. Seeds depend on the chunk only, so a pair
    scores the same rows alike whichever pairs run beside it."""
    labels = rows["label"].tolist()
    seed = derive_seed(cfg.seed, chunk_index)
    paras = (
        paraphrase(models.paraphraser, labels, cfg.paraphrases, seed, cfg.judge_max_attempts)
        if cfg.paraphrases
        else [[] for _ in labels]
    )
    outputs: dict[str, AVOutputs] = {}
    judged: dict[str, dict] = {}
    known: dict[str, dict] = {name: {} for name in models.ars}
    frames = {}
    for name, (av_name, ar_name) in pairs.items():
        if av_name not in outputs:
            outputs[av_name] = av_outputs(models.avs[av_name], rows, shuffled_BD, cfg, seed)
            judged[av_name] = judge_columns(
                models.judge, rows, outputs[av_name].greedy, judge_upto, seed, cfg
            )
        out = ar_frame(
            models.ars[ar_name], rows, outputs[av_name], paras, unrelated, mu, cfg, known[ar_name]
        )
        for key, values in judged[av_name].items():
            out[key] = values
        frames[name] = out
    return frames
