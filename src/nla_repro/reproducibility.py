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

import importlib.metadata
import json
import math
import platform
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nla_repro import config as C
from nla_repro import pipeline
from nla_repro.errors import NlaError

BUILD_RECORD = Path("metrics/build.json")
"""Git-tracked record of how the published outputs were built, written by `verify --pin`."""
TIER_ORDER = ("exact", "numerical", "gpu")
"""Tiers of a rebuilt file, strictest first; a file takes the loosest tier of its stages."""
GPU_FACTOR = 10.0
"""GPU tolerances are the numerical ones times this: declared, not measured (no GPU in CI)."""
BYTE_LIBRARIES = ("transformers", "tokenizers", "peft", "safetensors", "numpy", "pyarrow")
"""Libraries whose release shows in an output's bytes, not only in its numbers: transformers
writes its version into config.json, pyarrow into every parquet footer."""
MACHINE_KEYS = ("device", "torch_threads", "cpu_model", "cpu_capability", "torch", *BYTE_LIBRARIES)
"""What a stage row must share with the build record for the exact tier (a key the record
lacks is not compared)."""


@dataclass(frozen=True)
class Tolerance:
    """|rebuilt - published| <= abs + rel * |published| passes."""

    abs: float
    rel: float

    def bound(self, published: float) -> float:
        return self.abs + self.rel * abs(published)


# Numerical-tier tolerances by metrics file and dotted-path prefix (the longest prefix wins).
# Measured: the default built from scratch twice, with one and with two torch threads on the
# same machine; each bound is at least 3x the largest difference seen in its group, rounded up
# (docs/operations/reproducibility.md has the table, the measured maxima and the method).
TOLERANCES: dict[tuple[str, str], Tolerance] = {
    ("data/corpus_stats.json", ""): Tolerance(0.0, 0.0),
    ("metrics/label.json", ""): Tolerance(0.0, 0.0),
    ("data/pool_stats.json", ""): Tolerance(1e-6, 1e-5),
    ("metrics/sft_av.json", ""): Tolerance(1e-3, 1e-3),
    ("metrics/sft_ar.json", ""): Tolerance(1e-3, 1e-3),
    ("metrics/rl.json", ""): Tolerance(0.05, 0.05),
    ("metrics/sae.json", ""): Tolerance(1e-3, 1e-3),
    ("metrics/eval.json", ""): Tolerance(0.05, 0.05),
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


# --- How the outputs were built ----------------------------------------------------------------


def machine_row() -> dict[str, Any]:
    """What decides the last bits of a stage's numbers on this machine."""
    import torch

    return {
        "torch_threads": torch.get_num_threads(),
        "cpu_model": cpu_model(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "torch": torch.__version__,
        **{name: _version(name) for name in BYTE_LIBRARIES},
        "python": platform.python_version(),
    }


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def cpu_model() -> str:
    """The CPU's model name: two CPUs with the same vector unit (AVX-512 on Intel and on AMD)
    may still take other kernel paths, so the exact tier also asks for the same model."""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text(errors="replace").splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def stage_rows(profile: str, path: Path = C.STAGE_TIMES) -> dict[str, dict]:
    """The latest row of each stage run here with `profile` (.nla_work/stage_times.jsonl)."""
    rows: dict[str, dict] = {}
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                row = json.loads(line)
            except ValueError:
                continue  # a line cut by a crash mid-write
            if isinstance(row, dict) and row.get("profile") == profile and "stage" in row:
                rows[row["stage"]] = row
    return rows


def read_record(text: str | None = None, path: Path = BUILD_RECORD) -> dict:
    if text is None:
        if not path.is_file():
            return {}
        text = path.read_text()
    try:
        record = json.loads(text)
    except ValueError as err:
        raise NlaError(f"{path}: not valid JSON ({err}); rewrite it with `verify --pin`") from None
    if not isinstance(record, dict) or not isinstance(record.get("stages"), dict):
        raise NlaError(f"{path}: no 'stages' mapping; rewrite it with `verify --pin`")
    return record


def stage_tier(row: dict | None, pinned: dict | None) -> tuple[str, list[str]]:
    """Tier of one stage's outputs: how `row` (the rebuild; None: not rebuilt here, so the
    published bytes) differs from `pinned` (the build record's entry)."""
    if row is None:
        return "exact", []
    if pinned is None:
        return "numerical", ["not in the build record"]
    device = str(row.get("device", "cpu"))
    if device.startswith("cuda") or str(pinned.get("device", "cpu")).startswith("cuda"):
        return "gpu", [f"device {device} (published: {pinned.get('device', 'cpu')})"]
    reasons = [
        f"{key} {row.get(key)} (published: {pinned.get(key)})"
        for key in MACHINE_KEYS
        if key in pinned and row.get(key) != pinned.get(key)
    ]
    return ("numerical" if reasons else "exact"), reasons


def file_tier(stage: str, rows: dict[str, dict], record: dict) -> tuple[str, list[str]]:
    """The loosest tier over `stage` and every stage upstream of it."""
    tier, reasons = "exact", []
    for s in pipeline.upstream(stage):
        t, why = stage_tier(rows.get(s), record.get("stages", {}).get(s))
        reasons += [f"{s}: {w}" for w in why]
        if TIER_ORDER.index(t) > TIER_ORDER.index(tier):
            tier = t
    return tier, reasons


def tier_line(stage: str, params: Any) -> str:
    """One line a stage prints as it starts: the tier its outputs will be in."""
    record = read_record()
    if not record:
        return f"tier: unknown ({BUILD_RECORD} is missing: nothing to compare the build with)"
    rows = stage_rows(params.profile)
    rows[stage] = {**machine_row(), "device": _device(params)}
    if record.get("profile") != params.profile:
        return (
            f"tier: numerical at best (profile {params.profile}; {BUILD_RECORD} records the "
            f"build of profile {record.get('profile')})"
        )
    tier, reasons = file_tier(stage, rows, record)
    if tier == "exact":
        return f"tier: exact ({stage} and the stages before it run as the published build did)"
    hint = (
        f"; `invoke repro --deterministic` pins {pinned_threads(record)} torch thread(s)"
        if tier == "numerical"
        else ""
    )
    return f"tier: {tier} ({'; '.join(reasons)}): numbers within tolerance, hashes differ{hint}"


def _device(params: Any) -> str:
    import torch

    device = params.base.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    return device


def pinned_threads(record: dict) -> int | None:
    """The one thread count every stage of the build record ran with (None: they differ)."""
    counts = {s.get("torch_threads") for s in record.get("stages", {}).values()}
    return counts.pop() if len(counts) == 1 else None


def lock_outs(lock_text: str) -> dict[str, dict[str, str]]:
    """Each stage's output hashes in a dvc.lock text: stage -> path -> md5."""
    import yaml

    lock = yaml.safe_load(lock_text) or {}
    return {
        stage: {o["path"]: o.get("md5", "") for o in entry.get("outs", [])}
        for stage, entry in (lock.get("stages") or {}).items()
    }


def pin(params: Any, lock_path: Path = Path("dvc.lock"), path: Path = BUILD_RECORD) -> dict:
    """Write the build record from this machine's stage rows and dvc.lock (after `dvc repro`
    rebuilt every stage here): what the exact tier is measured against."""
    from nla_repro.io import write_json

    rows = stage_rows(params.profile)
    stages = pipeline.stage_names()
    missing = [s for s in stages if s not in rows]
    if missing:
        raise NlaError(
            f"{C.STAGE_TIMES}: no run of {', '.join(missing)} with profile {params.profile}; "
            f"pin after a full `dvc repro` on this machine"
        )
    if not lock_path.is_file():
        raise NlaError(f"{lock_path}: not found; run `dvc repro` first")
    outs = lock_outs(lock_path.read_text())
    record = {
        "profile": params.profile,
        "stages": {
            s: {
                "device": rows[s].get("device", "cpu"),
                **{k: rows[s].get(k) for k in MACHINE_KEYS if k != "device"},
                "python": rows[s].get("python"),
                "started_utc": rows[s].get("started_utc"),
                "outs": outs.get(s, {}),
            }
            for s in stages
        },
    }
    write_json(record, path)
    return record


def record_mismatches(record: dict, lock_text: str) -> list[str]:
    """Where the build record and a dvc.lock disagree on an output hash (empty: they agree)."""
    outs, bad = lock_outs(lock_text), []
    for stage, entry in record.get("stages", {}).items():
        for out, md5 in entry.get("outs", {}).items():
            if outs.get(stage, {}).get(out) != md5:
                bad.append(f"{stage}: {out} {md5} in the record, {outs.get(stage, {}).get(out)}")
    for stage in outs:
        if stage not in record.get("stages", {}):
            bad.append(f"{stage}: in dvc.lock, not in the record")
    return bad


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


def build_tier(params: Any, root: Path = Path(".")) -> dict:
    """How the outputs in checkout `root` were built, for a release record: the loosest tier
    of the stages run there (stages not run there hold the published bytes)."""
    record = read_record(path=root / BUILD_RECORD)
    if not record:
        return {"tier": "unknown", "reasons": [f"{BUILD_RECORD} is missing"]}
    rows = stage_rows(params.profile, root / C.STAGE_TIMES)
    tier, reasons = "exact", []
    for stage in pipeline.stage_names():
        t, why = stage_tier(rows.get(stage), record["stages"].get(stage))
        reasons += [f"{stage}: {w}" for w in why]
        tier = max(tier, t, key=TIER_ORDER.index)
    rebuilt = [s for s in pipeline.stage_names() if s in rows]
    return {"tier": tier, "reasons": reasons, "stages_rebuilt_here": rebuilt}
