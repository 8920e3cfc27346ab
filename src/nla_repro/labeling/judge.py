"""The LLM judge and the paraphraser of the eval stage, on the label backends.

- `judge`: validity and specificity (1-5) of the AV's output and of the label, and which of
  the two the judge prefers (A/B order drawn per row, so position bias averages out).
- `paraphrase`: n paraphrases of each label, for the paraphrase ceiling.

Both run on any backend; a `scaffolded` backend (the local 135M model, which cannot follow
the formats on its own) is asked one scale at a time and rewrites one claim at a time.
`judge_backends(eval_cfg, ...)` builds both from the eval's own `judge_*` params: the
paraphraser is the judge's backend derived with the paraphrase temperature.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np
import pandas as pd
import yaml

from nla_repro.labeling.ask import ask, ask_until_parsed
from nla_repro.labeling.backends import Backend, BackendSettings, make_backend
from nla_repro.labeling.retry import RetryPolicy
from nla_repro.seeds import derive_seed
from nla_repro.templates import claims, join_claims, load_template, parse_explanation


def judge_backends(cfg, base, base_dir: Path, shared=None) -> tuple[Backend | None, Backend | None]:
    """(judge, paraphraser) from the eval params `cfg` (an EvalConfig): the judge greedy, the
    paraphraser the same backend sampling at `paraphrase_temperature`; (None, None) for
    judge_backend none."""
    if cfg.judge_backend == "none":
        return None, None
    policy = RetryPolicy(
        max_retries=cfg.judge_max_retries,
        backoff_base_s=cfg.judge_backoff_base_s,
        backoff_max_s=cfg.judge_backoff_max_s,
    )
    settings = BackendSettings(
        batch_size=cfg.judge_batch_size,
        max_new_tokens=cfg.judge_max_new_tokens,
        temperature=0.0,
        base_url=cfg.judge_base_url,
        timeout_s=cfg.judge_timeout_s,
    )
    judge_b = make_backend(
        cfg.judge_backend, cfg.judge_model, settings, base, base_dir, policy, shared
    )
    return judge_b, judge_b.with_settings(temperature=cfg.paraphrase_temperature)


FINAL_TOKEN_HEAD = re.compile(r'^(final token:\s*"[^"]*",?)\s*(.*)$', re.S)


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


def judge(
    backend: Backend, rows: pd.DataFrame, explanations: list[str], seed: int, attempts: int
) -> dict[str, list]:
    """Validity and specificity of the AV's output and of the label, and which of the two
    the judge prefers (A/B order drawn per row, so position bias averages out)."""
    scores_t, pair_t = load_template("judge.v1"), load_template("judge_pair.v1")
    texts, labels = rows["text"].tolist(), rows["label"].tolist()
    fields = [
        {"text": t, "explanation": e or "(empty)"}
        for t, e in zip(texts + texts, explanations + labels, strict=True)
    ]
    if backend.scaffolded:
        # One question per scale; the scaffold writes "SCALE: n" lines the parser reads.
        questions = _prompt_extra("judge.v1")["local_questions"]
        answers = ["" for _ in fields]
        for scale, question in questions.items():
            asked = [f | {"scale": scale, "question": question} for f in fields]
            for r, comp in enumerate(ask(backend, scores_t, asked, seed)):
                answers[r] += comp.text + "\n"
        scores = [parse_scores(a) for a in answers]
    else:
        graded = ask_until_parsed(backend, scores_t, fields, parse_scores, attempts, seed)
        scores = [p if p is not None else JudgeScores(error="no response") for p, _, _ in graded]
    rng = np.random.default_rng(seed)
    av_first = rng.random(len(texts)) < 0.5
    pair_fields = [
        {"text": t, "a": e if first else lab, "b": lab if first else e}
        for t, e, lab, first in zip(texts, explanations, labels, av_first, strict=True)
    ]
    prefs = ask_until_parsed(
        backend,
        pair_t,
        pair_fields,
        parse_preference,
        attempts,
        derive_seed(seed, 1, stream="offset"),
    )
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


def paraphrase(backend: Backend, labels: list[str], n: int, seed: int, attempts: int):
    """n paraphrases of each label (fewer where the paraphraser failed). The local backend
    rewrites one claim at a time and keeps the final-token line's `final token: "x",` head."""
    template = load_template("paraphrase.v1")
    out: list[list[str]] = [[] for _ in labels]
    for j in range(n):
        s = derive_seed(seed, j, stream="paraphrase")
        if backend.scaffolded:
            parts = [claims(lab) for lab in labels]
            heads, fields, owner = [], [], []
            for r, row_claims in enumerate(parts):
                for c in row_claims:
                    m = FINAL_TOKEN_HEAD.match(c)
                    head, rest = (m.group(1), m.group(2)) if m else ("", c)
                    heads.append(head)
                    fields.append({"claim": rest or c})
                    owner.append(r)
            comps = ask(backend, template, fields, s)
            rewritten: list[list[str | None]] = [[] for _ in labels]
            for r, head, comp in zip(owner, heads, comps, strict=True):
                text = comp.text.strip() if not comp.error else ""
                rewritten[r].append(f"{head} {text}".strip() if text else None)
            for r, new_claims in enumerate(rewritten):
                if new_claims and all(c is not None for c in new_claims):
                    out[r].append(join_claims(new_claims))
        else:
            results = ask_until_parsed(
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
