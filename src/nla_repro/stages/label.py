"""label stage: an explanation per document -> data/labels.parquet, metrics/label.json.

The labeler sees each text exactly as the extractor does (cut at extract.max_length tokens),
so "the final token" is the extracted position. Two passes: the labeler writes the
explanation, the auditor accepts, corrects or rejects it. Rows are labeled in chunks under
data/label_chunks/ (a persisted DVC output): a relaunch skips finished chunks, and the final
parquet is the deterministic merge of the chunks in corpus order.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import random
import time
from pathlib import Path

import pandas as pd
import pyarrow as pa
import transformers
from tqdm import tqdm

from nla_repro import config as C
from nla_repro import labeling as L
from nla_repro.errors import NlaError
from nla_repro.io import ChunkStore, fingerprint, sha256_file, write_json, write_parquet
from nla_repro.models import read_base_meta, tokenize
from nla_repro.pipeline import stage_view
from nla_repro.schemas import CORPUS, LABELS, read_parquet, validate
from nla_repro.seeds import derive_seed
from nla_repro.templates import load_template, parse_explanation, parse_verdict

log = logging.getLogger(__name__)

# Knobs that change how the stage waits or stops, not what a finished row contains.
RUNTIME_ONLY = {
    "base_url",
    "max_retries",
    "backoff_base_s",
    "backoff_max_s",
    "timeout_s",
    "quota_wait_s",
    "quota_deadline_h",
    "max_cost_usd",
    "max_rows",
    "price_in_per_mtok",
    "price_out_per_mtok",
}


class LabelingStopped(NlaError):
    """The stage stopped early (quota deadline, provider outage); a rerun resumes."""


def shown_texts(tokenizer, texts: list[str], max_length: int) -> tuple[list[str], list[str]]:
    """Each text as the extractor sees it, and its final token as text."""
    ids = tokenize(tokenizer, texts, max_length)
    shown = [tokenizer.decode(t, skip_special_tokens=True).strip() for t in ids]
    final = [tokenizer.decode(t[-1:]).strip() or repr(tokenizer.decode(t[-1:])) for t in ids]
    return shown, final


def label_rows(
    rows: pd.DataFrame, backends: dict, cfg: C.LabelConfig, templates: tuple, seed: int
) -> dict:
    """Columns of the labeled rows, in the order of `rows`."""
    labeler_t, auditor_t = templates
    n = len(rows)
    out: dict[str, list] = collections.defaultdict(list)
    if cfg.mode == "source_text":
        out["explanation"] = rows["text"].tolist()
        out["status"], out["verdict"], out["reason"] = ["accepted"] * n, ["none"] * n, [""] * n
        out["labeler_response"] = [""] * n
        for key in ("attempts", "input_tokens", "output_tokens"):
            out[key] = [0] * n
        out["latency_s"] = [0.0] * n
        return out

    fields = [
        {"text": t, "final_token": f}
        for t, f in zip(rows["text"], rows["final_token"], strict=True)
    ]
    first = L.ask_until_parsed(
        backends["labeler"], labeler_t, fields, parse_explanation, cfg.max_attempts, seed
    )
    audits: dict[int, tuple] = {}
    if cfg.mode == "two-pass":
        ok = [i for i, (p, _, _) in enumerate(first) if p is not None and p.ok]
        audit_fields = [fields[i] | {"explanation": first[i][0].text} for i in ok]
        results = L.ask_until_parsed(
            backends["auditor"],
            auditor_t,
            audit_fields,
            parse_verdict,
            cfg.max_attempts,
            derive_seed(seed, 1, stream="offset"),
        )
        audits = dict(zip(ok, results, strict=True))

    for i, (parsed, comp, tries) in enumerate(first):
        explanation, status, verdict, reason = "", "rejected", "none", ""
        in_tok, out_tok, latency = comp.input_tokens, comp.output_tokens, comp.latency_s
        if parsed is None or not parsed.ok:
            reason = f"labeler: {comp.error or parsed.error}"
        elif cfg.mode == "single-pass":
            explanation, status = parsed.text, "accepted"
        else:
            audit, acomp, atries = audits[i]
            tries += atries
            in_tok, out_tok = in_tok + acomp.input_tokens, out_tok + acomp.output_tokens
            latency += acomp.latency_s
            if audit is None or audit.error:
                reason = f"auditor: {acomp.error or audit.error}"
            else:
                verdict, reason = audit.verdict, audit.reason
                if audit.verdict == "accept":
                    explanation, status = parsed.text, "accepted"
                elif audit.verdict == "corrected":
                    explanation, status = audit.corrected.text, "corrected"
        out["explanation"].append(explanation)
        out["status"].append(status)
        out["verdict"].append(verdict)
        out["reason"].append(reason)
        out["labeler_response"].append(comp.text)
        out["attempts"].append(tries)
        out["input_tokens"].append(in_tok)
        out["output_tokens"].append(out_tok)
        out["latency_s"].append(latency)
    return out


def estimated_cost(cfg: C.LabelConfig, input_tokens: int, output_tokens: int) -> float:
    return (input_tokens * cfg.price_in_per_mtok + output_tokens * cfg.price_out_per_mtok) / 1e6


def run(params: C.Params, chunk_root: Path = C.LABEL_CHUNKS_DIR) -> dict:
    params = stage_view(params, "label")
    cfg = params.label
    corpus = read_parquet(C.CORPUS_PATH, CORPUS)
    rows = corpus[corpus["split"].isin(cfg.splits)].reset_index(drop=True)
    n_selected = len(rows)
    n_wanted = min(cfg.max_rows or n_selected, n_selected)
    tokenizer = transformers.AutoTokenizer.from_pretrained(C.BASE_DIR)
    rows["text"], rows["final_token"] = shown_texts(
        tokenizer, rows["text"].tolist(), params.extract.max_length
    )
    labeler_t, auditor_t = load_template(cfg.labeler_prompt), load_template(cfg.auditor_prompt)
    meta = read_base_meta(C.BASE_DIR)
    local_name = meta["source"]["name"]
    labeler_model = local_name if cfg.backend == "local" else cfg.labeler_model
    auditor_model = (
        labeler_model if cfg.backend == "local" else (cfg.auditor_model or cfg.labeler_model)
    )
    if cfg.mode == "source_text":
        labeler_model = auditor_model = "none"
    elif cfg.mode == "single-pass":
        auditor_model = "none"

    content_cfg = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in RUNTIME_ONLY}
    store = ChunkStore(
        chunk_root,
        fingerprint(
            sha256_file(C.CORPUS_PATH),
            meta["files"],
            content_cfg,
            labeler_t.sha256,
            auditor_t.sha256,
            params.extract.max_length,
            params.base.quantization,
            params.base.compute_dtype,
        ),
    )
    # Chunks always cover whole chunk_size slices of all selected rows, so a later, larger
    # max_rows finds its finished chunks complete; the output is trimmed to max_rows.
    chunks = [
        range(i, min(i + cfg.chunk_size, n_selected)) for i in range(0, n_wanted, cfg.chunk_size)
    ]
    policy = L.RetryPolicy(
        max_retries=cfg.max_retries,
        backoff_base_s=cfg.backoff_base_s,
        backoff_max_s=cfg.backoff_max_s,
        quota_wait_s=cfg.quota_wait_s,
        deadline=time.time() + cfg.quota_deadline_h * 3600,
        rng=random.Random(cfg.seed),
    )
    backends: dict = {}
    done = [c for c in range(len(chunks)) if store.done(c)]
    spent = (
        store.read(done).to_pandas()
        if done
        else pd.DataFrame(columns=["input_tokens", "output_tokens"])
    )
    cost = estimated_cost(cfg, int(spent["input_tokens"].sum()), int(spent["output_tokens"].sum()))
    stopped_by = "max_rows" if n_wanted < n_selected else ""
    total = chunks[-1].stop if chunks else 0
    initial = sum(len(chunks[c]) for c in done)
    bar = tqdm(total=total, initial=initial, unit="row", desc="label")
    try:
        for c, chunk in enumerate(chunks):
            if store.done(c):
                continue
            if cfg.max_cost_usd and cost >= cfg.max_cost_usd:
                stopped_by = "max_cost_usd"
                log.warning("label: estimated cost $%.4f reached the cap; stopping", cost)
                break
            if not backends and cfg.mode != "source_text":
                settings = L.BackendSettings.of(cfg)
                labeler = L.make_backend(
                    cfg.backend, labeler_model, settings, params.base, C.BASE_DIR, policy
                )
                auditor = labeler
                if (
                    cfg.backend != "local"
                    and auditor_model != labeler_model
                    and cfg.mode == "two-pass"
                ):
                    auditor = L.make_backend(
                        cfg.backend, auditor_model, settings, params.base, C.BASE_DIR, policy
                    )
                backends = {"labeler": labeler, "auditor": auditor}
            part = rows.iloc[chunk.start : chunk.stop]
            seed = derive_seed(cfg.seed, c)
            cols = label_rows(part, backends, cfg, (labeler_t, auditor_t), seed)
            table = pa.table(
                {
                    "doc_id": part["doc_id"].tolist(),
                    "split": part["split"].tolist(),
                    "source_family": part["source_family"].tolist(),
                    "text": part["text"].tolist(),
                    "final_token": part["final_token"].tolist(),
                    **cols,
                    "mode": [cfg.mode] * len(part),
                    "backend": [cfg.backend] * len(part),
                    "labeler_model": [labeler_model] * len(part),
                    "auditor_model": [auditor_model] * len(part),
                    "labeler_prompt_sha256": [labeler_t.sha256] * len(part),
                    "auditor_prompt_sha256": [auditor_t.sha256] * len(part),
                }
            )
            store.write(c, table)
            cost += estimated_cost(cfg, sum(cols["input_tokens"]), sum(cols["output_tokens"]))
            bar.update(len(part))
    except (L.QuotaDeadlineExceeded, L.ProviderError) as err:
        finished = sum(1 for c in range(len(chunks)) if store.done(c))
        raise LabelingStopped(
            f"label stopped after {finished}/{len(chunks)} chunks: {err}. Finished chunks are "
            f"kept in {chunk_root}; rerun `dvc repro label` to resume."
        ) from None
    finally:
        bar.close()

    done = [c for c in range(len(chunks)) if store.done(c)]
    chunks_table = store.read(done) if done else None
    # labels.parquet gets the schema's columns only, so equal labels make an equal file: the
    # per-call latency (a clock reading) stays in the chunks and goes to stage_times.jsonl,
    # and the `created_at` of chunks from older versions is dropped.
    labels = (
        chunks_table.select(list(LABELS.columns)).to_pandas().iloc[:n_wanted]
        if chunks_table is not None
        else pd.DataFrame()
    )
    latency = chunks_table.column("latency_s").to_pylist()[:n_wanted] if chunks_table else []
    labels = validate(labels.reset_index(drop=True), LABELS, C.LABELS_PATH)
    summary = summarize(labels, cfg, n_selected, cost, stopped_by, labeler_model, auditor_model)
    write_parquet(pa.Table.from_pandas(labels, preserve_index=False), C.LABELS_PATH)
    write_json(summary, C.LABEL_METRICS_PATH)
    log.info(
        "label: %d rows: %d accepted, %d corrected, %d rejected; est. cost $%.4f; rejections: %s",
        summary["n_rows"],
        summary["accepted"],
        summary["corrected"],
        summary["rejected"],
        summary["estimated_cost_usd"],
        summary["rejection_reasons"] or "none",
    )
    timing = {"llm_latency_s_total": round(sum(latency), 2)} if cfg.mode != "source_text" else {}
    return summary | {"timing": timing}


def summarize(labels, cfg, n_selected, cost, stopped_by, labeler_model, auditor_model) -> dict:
    status = labels["status"].value_counts() if len(labels) else {}
    reasons = (
        collections.Counter(
            r.split(":")[0] + ": " + r.split(":", 1)[1].strip()[:60] if ":" in r else r
            for r in labels.loc[labels["status"] == "rejected", "reason"]
        )
        if len(labels)
        else collections.Counter()
    )
    return {
        "mode": cfg.mode,
        "backend": cfg.backend,
        "labeler_model": labeler_model,
        "auditor_model": auditor_model,
        "n_selected": int(n_selected),
        "n_rows": len(labels),
        "accepted": int(status.get("accepted", 0)),
        "corrected": int(status.get("corrected", 0)),
        "rejected": int(status.get("rejected", 0)),
        "rejection_reasons": dict(reasons.most_common(10)),
        "attempts_mean": float(labels["attempts"].mean()) if len(labels) else 0.0,
        "input_tokens": int(labels["input_tokens"].sum()) if len(labels) else 0,
        "output_tokens": int(labels["output_tokens"].sum()) if len(labels) else 0,
        "estimated_cost_usd": round(cost, 6),
        "stopped_by": stopped_by or "complete",
    }
