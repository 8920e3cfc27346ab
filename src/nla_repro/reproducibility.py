"""Did a rebuild reproduce the published numbers? `python -m nla_repro verify`.

The published numbers are the metrics files of a git ref (default HEAD, or a release tag);
the rebuilt ones are those in the working tree. Every numeric leaf of every file is compared
under the tolerance of the tier the rebuild is in:

- exact: every stage behind the file ran on the machine class the published build records
  in `metrics/build.json` (torch threads, CPU capability, torch version, device): bytes equal,
  tolerance 0.
- numerical: another thread count, CPU capability or torch version: within TOLERANCES, which
  come from measured run-to-run variation (docs/operations/reproducibility.md).
- gpu: CUDA on either side: TOLERANCES times GPU_FACTOR, declared rather than measured.
- judge: numbers from a judge or labeling provider (eval `judge.*`, `label.json` with a remote
  backend): reported, never failed.

The command exits non-zero when a headline number (a registry metric shown in a model-index or
the calibration record) is outside its tolerance, or, in the exact tier, when any leaf differs.
Only the CLI imports this module (pipeline.NOT_OUTPUT_CODE): it changes no output.
"""

from __future__ import annotations

import json
import math
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nla_repro import config as C
from nla_repro import pipeline
from nla_repro.build_record import (
    BUILD_RECORD,
    TIER_ORDER,
    file_tier,
    lock_outs,
    read_record,
    stage_rows,
)
from nla_repro.errors import NlaError

GPU_FACTOR = 10.0
"""GPU tolerances are the numerical ones times this: declared, not measured (no GPU in CI)."""


@dataclass(frozen=True)
class Tolerance:
    """|rebuilt - published| <= abs + rel * |published| passes."""

    abs: float
    rel: float

    def bound(self, published: float) -> float:
        return self.abs + self.rel * abs(published)


# Numerical-tier tolerances by metrics file and dotted-path prefix (the longest prefix wins).
# Measured on the default, each against the one-thread pin of the same commit: a from-scratch
# rebuild with two torch threads on the same machine, and the earlier two-thread pin built on
# an Intel CPU. At each number, each bound is at least 3x the largest difference either run
# showed there, rounded up (docs/operations/reproducibility.md has the table,
# the measured maxima and the method; `python benchmarks/tolerances.py` measures a rebuild).
TOLERANCES: dict[tuple[str, str], Tolerance] = {
    # Corpus and labels were bit-equal in both runs: any difference is a real change.
    ("data/corpus_stats.json", ""): Tolerance(0.0, 0.0),
    ("metrics/label.json", ""): Tolerance(0.0, 0.0),
    ("data/pool_stats.json", ""): Tolerance(2e-5, 1e-4),
    ("metrics/sft_av.json", ""): Tolerance(2e-6, 1e-5),
    ("metrics/sft_ar.json", ""): Tolerance(1e-6, 1e-5),
    ("metrics/rl.json", ""): Tolerance(3e-6, 1e-4),
    ("metrics/eval.json", ""): Tolerance(1e-5, 1e-4),
    # The SAE trains from a shuffled token stream in float32: reductions in another order move
    # its numbers ~1e-3 relative, its loss-recovered pass and latent densities most.
    ("metrics/sae.json", ""): Tolerance(2e-3, 5e-3),
    ("metrics/sae.json", "loss_recovered."): Tolerance(1e-2, 2e-2),
    ("metrics/sae.json", "latents."): Tolerance(3.0, 0.0),  # counts of latents
    ("metrics/sae.json", "latents.density"): Tolerance(1e-3, 8e-2),
}


# --- Where the numbers are -------------------------------------------------------------------


def metric_files() -> dict[str, str]:
    """Every JSON output DVC does not cache (metrics/*.json, pool and corpus stats), mapped to
    the stage that writes it: the files git holds and a rebuild rewrites."""
    return {
        out: stage
        for stage in pipeline.stage_names()
        for out, cached in pipeline.stage_outs(stage).items()
        if out.endswith(".json") and not cached
    }


def flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    """Every leaf of a JSON value by dotted path (`round_trip.cos.mean`, `per_family[3].n`)."""
    if isinstance(value, dict):
        out: dict[str, Any] = {}
        for key, item in value.items():
            out.update(flatten(item, f"{prefix}.{key}" if prefix else str(key)))
        return out
    if isinstance(value, list):
        out = {}
        for i, item in enumerate(value):
            out.update(flatten(item, f"{prefix}[{i}]"))
        return out
    return {prefix: value}


def is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def headline_paths() -> dict[tuple[str, str], str]:
    """(metrics file, dotted path) of every number a card's model-index or the calibration
    record publishes, with its registry name."""
    from nla_repro.evaluation.registry import METRICS, PATH_ARGS, SOURCES

    k = 0
    source, path = PATH_ARGS["k"]
    if SOURCES[source].exists():
        with open(SOURCES[source]) as f:
            k = flatten(json.load(f)).get(path, 0) or 0
    out = {}
    for m in METRICS:
        if any(s.startswith(("index:", "calibration")) for s in m.shown):
            filled = m.path.format(k=k)
            out[(SOURCES[m.source].as_posix(), filled)] = m.name.format(k=k)
    return out


def tolerance_for(file: str, path: str) -> Tolerance:
    best, length = Tolerance(0.0, 0.0), -1
    for (f, prefix), tol in TOLERANCES.items():
        if f == file and path.startswith(prefix) and len(prefix) > length:
            best, length = tol, len(prefix)
    return best


def judge_leaf(file: str, path: str, rebuilt: dict) -> bool:
    """Numbers a judge model or a labeling provider produced: reported, never failed."""
    if file == C.EVAL_METRICS.as_posix():
        return path == "judge" or path.startswith(("judge.", "judge["))
    if file == C.LABEL_METRICS_PATH.as_posix():
        return rebuilt.get("backend", "local") != "local"
    return False


# --- The comparison ------------------------------------------------------------------------------


@dataclass
class Leaf:
    file: str
    path: str
    published: Any
    rebuilt: Any
    tier: str
    tolerance: float | None
    """The allowed |Δ| (None: text, compared for equality)."""
    headline: str | None = None

    @property
    def delta(self) -> float | None:
        if is_number(self.published) and is_number(self.rebuilt):
            return abs(float(self.rebuilt) - float(self.published))
        return None

    @property
    def reproduced(self) -> bool:
        if self.tier == "judge":
            return True
        d = self.delta
        if d is None:
            return self.published == self.rebuilt
        if math.isnan(d):
            return False
        return d <= (self.tolerance or 0.0)


@dataclass(frozen=True)
class Output:
    """One output of dvc.lock: its hash at the ref and in the working tree."""

    stage: str
    path: str
    published: str
    rebuilt: str | None
    tier: str

    @property
    def equal(self) -> bool:
        return self.published == self.rebuilt


@dataclass
class Report:
    against: str
    leaves: list[Leaf] = field(default_factory=list)
    tiers: dict[str, tuple[str, list[str]]] = field(default_factory=dict)
    """file -> (tier, reasons)."""
    missing: list[str] = field(default_factory=list)
    """Files the ref has and the working tree does not."""
    outputs: list[Output] = field(default_factory=list)
    """Every output hash of the ref's dvc.lock against the working tree's."""

    @property
    def failures(self) -> list[Leaf]:
        """Leaves that make verify fail: a headline out of tolerance, or any number that
        differs in a file of the exact tier."""
        return [
            leaf
            for leaf in self.leaves
            if not leaf.reproduced
            and leaf.delta is not None
            and (leaf.headline is not None or leaf.tier == "exact")
        ]

    @property
    def hash_failures(self) -> list[Output]:
        """Outputs of exact-tier stages whose bytes differ: the exact tier promises equal bytes."""
        return [o for o in self.outputs if o.tier == "exact" and not o.equal]

    @property
    def ok(self) -> bool:
        return not self.failures and not self.missing and not self.hash_failures

    @property
    def tier(self) -> str:
        tiers = [t for t, _ in self.tiers.values()] + [o.tier for o in self.outputs]
        return max(tiers or ["exact"], key=TIER_ORDER.index)

    def summary(self) -> dict:
        numbers = [leaf for leaf in self.leaves if leaf.delta is not None]
        return {
            "against": self.against,
            "tier": self.tier,
            "reproduced": self.ok,
            "numbers": len(numbers),
            "numbers_within_tolerance": sum(leaf.reproduced for leaf in numbers),
            "headline": sum(leaf.headline is not None for leaf in numbers),
            "headline_within_tolerance": sum(
                leaf.reproduced for leaf in numbers if leaf.headline is not None
            ),
            "judge_numbers": sum(leaf.tier == "judge" for leaf in numbers),
            "outputs": len(self.outputs),
            "outputs_equal": sum(o.equal for o in self.outputs),
            "missing": self.missing,
        }


def git_show(ref: str, path: str) -> str | None:
    done = subprocess.run(["git", "show", f"{ref}:{path}"], capture_output=True, text=True)
    return done.stdout if done.returncode == 0 else None


def resolve_ref(against: str | None, release: str | None) -> str:
    ref = release or against or "HEAD"
    done = subprocess.run(
        ["git", "rev-parse", "--verify", "--quiet", f"{ref}^{{commit}}"],
        capture_output=True,
        text=True,
    )
    if done.returncode != 0:
        what = f"release {ref}: no git tag {ref} (releases are tagged by `invoke release --push`)"
        raise NlaError(what if release else f"{ref}: not a git commit, tag or branch here")
    return ref


def compare(params: Any, ref: str = "HEAD") -> Report:
    """Compare the working tree's metrics files with those at `ref`."""
    published_record = read_record(git_show(ref, BUILD_RECORD.as_posix()) or '{"stages": {}}')
    rows = stage_rows(params.profile)
    heads = headline_paths()
    report = Report(against=ref)
    for file, stage in metric_files().items():
        text = git_show(ref, file)
        if text is None:
            continue  # the ref predates this file
        if not Path(file).is_file():
            report.missing.append(file)
            continue
        try:
            published, rebuilt = json.loads(text), json.loads(Path(file).read_text())
        except ValueError as err:
            raise NlaError(f"{file}: not valid JSON ({err})") from None
        tier, reasons = file_tier(stage, rows, published_record)
        report.tiers[file] = (tier, reasons)
        old, new = flatten(published), flatten(rebuilt)
        for path in [*old, *(p for p in new if p not in old)]:
            leaf_tier = "judge" if judge_leaf(file, path, rebuilt) else tier
            p, r = old.get(path), new.get(path)
            tol = None
            if is_number(p):
                t = tolerance_for(file, path)
                bound = 0.0 if leaf_tier == "exact" else t.bound(float(p))
                tol = bound * (GPU_FACTOR if leaf_tier == "gpu" else 1.0)
            report.leaves.append(Leaf(file, path, p, r, leaf_tier, tol, heads.get((file, path))))
    report.outputs = compare_outputs(ref, rows, published_record)
    return report


def compare_outputs(ref: str, rows: dict[str, dict], record: dict) -> list[Output]:
    """Each output hash in the ref's dvc.lock against the working tree's dvc.lock (written by
    the rebuild's `dvc repro`), with the tier of its stage; empty when either lock is absent."""
    published_text, lock = git_show(ref, "dvc.lock"), Path("dvc.lock")
    if published_text is None or not lock.is_file():
        return []
    rebuilt = lock_outs(lock.read_text())
    return [
        Output(
            stage, path, md5, rebuilt.get(stage, {}).get(path), file_tier(stage, rows, record)[0]
        )
        for stage, outs in lock_outs(published_text).items()
        for path, md5 in outs.items()
    ]


def _fmt(value: Any) -> str:
    if is_number(value):
        return f"{value:.6g}" if isinstance(value, float) else str(value)
    return "—" if value is None else str(value)[:24]


def render(report: Report, everything: bool = False, limit: int = 40) -> str:
    """The table verify prints: headline numbers, then every number that is not reproduced."""
    from nla_repro.platform import format_table

    lines = [f"verify: the working tree against {report.against}"]
    for file, (tier, reasons) in report.tiers.items():
        lines.append(f"  {file}: {tier}" + (f" ({'; '.join(reasons[:3])})" if reasons else ""))
    for file in report.missing:
        lines.append(f"  {file}: MISSING (rebuild it, or `python -m nla_repro restore`)")
    shown = [
        leaf
        for leaf in report.leaves
        if leaf.delta is not None and (everything or leaf.headline or not leaf.reproduced)
    ]
    rows = [("metric", "published", "rebuilt", "|Δ|", "tolerance", "tier", "reproduced")]
    for leaf in shown[: None if everything else limit]:
        rows.append(
            (
                leaf.headline or f"{leaf.file}:{leaf.path}",
                _fmt(leaf.published),
                _fmt(leaf.rebuilt),
                _fmt(leaf.delta),
                "reported" if leaf.tier == "judge" else _fmt(leaf.tolerance),
                leaf.tier,
                "yes" if leaf.reproduced else "NO",
            )
        )
    lines.append(format_table(rows))
    if len(shown) > len(rows) - 1:
        lines.append(f"... {len(shown) - len(rows) + 1} more rows (--all lists every number)")
    s = report.summary()
    if report.outputs:
        moved = [o for o in report.outputs if not o.equal]
        lines.append(
            f"outputs: {s['outputs_equal']}/{s['outputs']} hashes in dvc.lock equal the published"
            + (": moved " + ", ".join(f"{o.path} ({o.tier})" for o in moved[:8]) if moved else "")
            + (f" and {len(moved) - 8} more" if len(moved) > 8 else "")
        )
    text_diffs = [leaf for leaf in report.leaves if leaf.delta is None and not leaf.reproduced]
    lines.append(
        f"{s['numbers_within_tolerance']}/{s['numbers']} numbers within tolerance, "
        f"{s['headline_within_tolerance']}/{s['headline']} headline numbers; "
        f"{s['judge_numbers']} judge/provider numbers reported only; "
        f"{len(text_diffs)} text leaves differ (hashes, provenance)"
    )
    lines.append(
        f"verdict: {'REPRODUCED' if report.ok else 'NOT REPRODUCED'} at the {report.tier} tier"
    )
    return "\n".join(lines)
