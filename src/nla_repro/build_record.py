"""How the published outputs were built, and which reproducibility tier a rebuild is in.

`metrics/build.json` (written by `python -m nla_repro verify --pin`) records, per stage, the
machine class that built the published bytes: device, torch threads, CPU model and vector unit,
torch and the libraries whose release shows in output bytes, and the stage's output hashes.
Every stage run appends the same description of its own machine to `.nla_work/stage_times.jsonl`;
comparing the two gives the tier of each stage's outputs (exact, numerical, gpu), which a stage
prints as it starts, `verify` uses to pick tolerances, and a release records.
Only the CLI, `verify` and release publishing import this module (pipeline.NOT_OUTPUT_CODE).
"""

from __future__ import annotations

import importlib.metadata
import json
import platform
from pathlib import Path
from typing import Any

from nla_repro import config as C
from nla_repro import pipeline
from nla_repro.errors import NlaError

BUILD_RECORD = Path("metrics/build.json")
"""Git-tracked record of how the published outputs were built, written by `verify --pin`."""
TIER_ORDER = ("exact", "numerical", "gpu")
"""Tiers of a rebuilt file, strictest first; a file takes the loosest tier of its stages."""
BYTE_LIBRARIES = ("transformers", "tokenizers", "peft", "safetensors", "numpy", "pyarrow")
"""Libraries whose release shows in an output's bytes, not only in its numbers: transformers
writes its version into config.json, pyarrow into every parquet footer."""
MACHINE_KEYS = ("device", "torch_threads", "cpu_model", "cpu_capability", "torch", *BYTE_LIBRARIES)
"""What a stage row must share with the build record for the exact tier (a key the record
lacks is not compared)."""


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


def loosest_tier(stages: Any, rows: dict[str, dict], record: dict) -> tuple[str, list[str]]:
    """The loosest tier over `stages`, with each stage's reasons."""
    tier, reasons = "exact", []
    for s in stages:
        t, why = stage_tier(rows.get(s), record.get("stages", {}).get(s))
        reasons += [f"{s}: {w}" for w in why]
        tier = max(tier, t, key=TIER_ORDER.index)
    return tier, reasons


def file_tier(stage: str, rows: dict[str, dict], record: dict) -> tuple[str, list[str]]:
    """The loosest tier over `stage` and every stage upstream of it."""
    return loosest_tier(pipeline.upstream(stage), rows, record)


def tier_line(stage: str, params: Any) -> str:
    """One line a stage prints as it starts: the tier its outputs will be in."""
    record = read_record()
    if not record:
        return f"tier: unknown ({BUILD_RECORD} is missing: nothing to compare the build with)"
    rows = stage_rows(params.profile)
    rows[stage] = {**machine_row(), "device": run_device(params)}
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


def run_device(params: Any) -> str:
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


def build_tier(params: Any, root: Path = Path(".")) -> dict:
    """How the outputs in checkout `root` were built, for a release record: the loosest tier
    of the stages run there (stages not run there hold the published bytes)."""
    record = read_record(path=root / BUILD_RECORD)
    if not record:
        return {"tier": "unknown", "reasons": [f"{BUILD_RECORD} is missing"]}
    rows = stage_rows(params.profile, root / C.STAGE_TIMES)
    tier, reasons = loosest_tier(pipeline.stage_names(), rows, record)
    rebuilt = [s for s in pipeline.stage_names() if s in rows]
    return {"tier": tier, "reasons": reasons, "stages_rebuilt_here": rebuilt}
