"""Fault drill: SIGKILL each long stage of the pipeline at a random point, rerun `dvc repro`,
and compare every DVC output with an uninterrupted run: nothing lost, nothing duplicated.

Not collected by pytest (the name does not start with test_); it takes about two pipeline runs
plus the reruns (the smoke profile on a busy 2-core machine: about an hour), so run it niced:

    nice -n 19 python tests/fault_drill.py [--profile smoke] [--stages corpus,label,...]
        [--seed N] [--keep DIR] [--reference DIR]
    python tests/fault_drill.py --compare REPO_A REPO_B [--strict]

1. Reference: a fresh git + DVC repo (built as the smoke end-to-end test builds it), one
   uninterrupted `dvc repro`. Stage wall times come from .nla_work/stage_times.jsonl; the drill
   also watches each stage process, to know how long the imports take before the timed part.
   `--reference DIR` reuses the reference of an earlier `--keep DIR`/reference.
2. Drill, in a second fresh repo, for each stage S in order: `dvc repro` of the stages S reads
   from, then `dvc repro -s S` in its own process group, killed with SIGKILL at
   imports + U(0.15, 0.85) x the reference wall time of S after the stage process appeared
   (seeded by --seed). A kill that came too late (the stage had finished) is retried once,
   sooner (the same fraction of how long the stage process lived on the first try), after
   removing S's outputs so that `dvc repro -s -f S` runs it again. When the kill left no
   finished chunk or checkpoint behind, S is started once more and killed right after its first
   save, so that the rerun resumes rather than restarts. Then `dvc repro S`, uninterrupted,
   finishes it (a stale DVC lock is handled as DVC tells the user to). A last `dvc repro`
   builds what is left; `dvc status` must then be clean. Both runs use the same torch thread
   count (OMP_NUM_THREADS), and import the repo's own copy of src/.
3. Every output in dvc.lock, drilled vs reference: same file list, same bytes. The label
   chunks' per-call latency (TIMING_KEYS) is the one column compared by value after removal;
   parquet files are also checked for row count and duplicate keys (doc_id, position);
   safetensors and torch.save files whose bytes differ are reported with whether their tensors
   are equal (still a mismatch: DVC hashes bytes). `--compare A B --strict` diffs two repos
   without removing anything.

Exit code 0 when every stage was killed mid-run, every rerun succeeded, and every output
matches; 1 otherwise. The report is printed as a table and as JSON (also written to
<work dir>/report.json). The work dir is deleted on success unless --keep is given, and kept
on failure.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import psutil
import yaml

# Run as a script, tests/ is on sys.path: the repo is built as the smoke end-to-end test builds
# its own (the same files; git init, profile and commit as there).
from test_pipeline import copy_repo_files

DRILL_STAGES = ("corpus", "label", "extract", "sft_av", "sft_ar", "sae", "eval")
STAGE_TIMES = Path(".nla_work/stage_times.jsonl")

# The one clock reading left in a DVC output: the per-call latency of LLM labels, kept in the
# label chunks (labels.parquet, metrics and sidecars carry none; timings go to
# .nla_work/stage_times.jsonl). Found by diffing two uninterrupted smoke runs in two fresh
# repos (`--compare A B --strict`).
TIMING_KEYS = frozenset({"latency_s"})

KILL_FRACTION = (0.15, 0.85)
POLL_S = 0.25
COMMAND_TIMEOUT_S = 4 * 3600
# Fixed commit dates: the two repos then get the same commit id, which the stages record
# (git_commit in sidecars), so it is not a difference between them.
GIT_DATE = "2000-01-01T00:00:00+00:00"


# --- Repos and commands -------------------------------------------------------------------


def command_env(repo: Path) -> dict[str, str]:
    """The stages import the repo's own copy of src/ (the code DVC hashes as deps), not the
    editable install, so an edit in the working tree during the drill cannot leak into it."""
    path = os.pathsep.join(p for p in (str(repo / "src"), os.environ.get("PYTHONPATH")) if p)
    return os.environ | {
        "PYTHONUNBUFFERED": "1",
        "HF_HUB_OFFLINE": "1",
        "PYTHONPATH": path,
        "GIT_AUTHOR_DATE": GIT_DATE,
        "GIT_COMMITTER_DATE": GIT_DATE,
    }


@dataclass
class Result:
    cmd: str
    rc: int
    wall_s: float
    output: str


def run(cmd: list[str], repo: Path, log: Path | None = None) -> Result:
    """cmd in its own process group, so that an interrupted drill takes the stage process
    DVC started down with it (killing dvc alone would leave that running)."""
    t0 = time.monotonic()
    proc = subprocess.Popen(
        cmd,
        cwd=repo,
        env=command_env(repo),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        out, _ = proc.communicate(timeout=COMMAND_TIMEOUT_S)
    except BaseException:
        kill_group(proc.pid)
        proc.wait()
        raise
    if log:
        log.write_text(out)
    return Result(" ".join(cmd), proc.returncode, round(time.monotonic() - t0, 2), out)


def must(result: Result) -> Result:
    if result.rc != 0:
        raise RuntimeError(f"{result.cmd} failed ({result.rc}):\n{result.output[-4000:]}")
    return result


def build_repo(repo: Path, profile: str) -> None:
    """A fresh git + DVC repo with the project's pipeline and the profile applied, committed."""
    copy_repo_files(repo)
    must(run(["git", "init", "-q"], repo))
    must(run([sys.executable, "-m", "nla_repro", "profile", profile], repo))
    must(run(["git", "add", "-A"], repo))
    must(run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "init"], repo))


def stage_times(repo: Path) -> list[dict]:
    """The rows of the repo's stage_times.jsonl (a torn last line, from a kill mid-append,
    is skipped)."""
    path = repo / STAGE_TIMES
    rows = []
    for line in path.read_text().splitlines() if path.exists() else []:
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


def stage_graph(repo: Path) -> dict[str, dict[str, list[str]]]:
    """stage -> {"deps": [...], "outs": [...]} from dvc.yaml (outs include metrics, plots)."""
    spec = yaml.safe_load((repo / "dvc.yaml").read_text())["stages"]

    def paths(entries: list) -> list[str]:
        return [e if isinstance(e, str) else next(iter(e)) for e in entries or []]

    return {
        name: {
            "deps": paths(s.get("deps")),
            "outs": paths(s.get("outs")) + paths(s.get("metrics")) + paths(s.get("plots")),
        }
        for name, s in spec.items()
    }


def parents(graph: dict, stage: str) -> list[str]:
    """The stages whose outputs `stage` reads."""

    def under(dep: str, out: str) -> bool:
        return dep == out or dep.startswith(out.rstrip("/") + "/")

    return [
        name
        for name, s in graph.items()
        if name != stage and any(under(d, o) for d in graph[stage]["deps"] for o in s["outs"])
    ]


def group_processes(pgid: int) -> list[psutil.Process]:
    found = []
    for proc in psutil.process_iter(["pid", "cmdline"]):
        try:
            if os.getpgid(proc.pid) == pgid:
                found.append(proc)
        except (ProcessLookupError, psutil.Error):
            continue
    return found


def running_stage(pgid: int) -> str | None:
    """The stage whose `python -m nla_repro <stage>` process runs in the group, if any."""
    for proc in group_processes(pgid):
        cmd = proc.info.get("cmdline") or []
        if "nla_repro" in cmd and cmd.index("nla_repro") + 1 < len(cmd):
            return cmd[cmd.index("nla_repro") + 1]
    return None


def kill_group(pgid: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, signal.SIGKILL)


# --- Reference ----------------------------------------------------------------------------


def reference_run(repo: Path, log: Path) -> dict:
    """One uninterrupted `dvc repro`, watching which stage process runs when."""
    seen: dict[str, list[float]] = {}
    t0 = time.monotonic()
    with log.open("w") as out:
        proc = subprocess.Popen(
            ["dvc", "repro"],
            cwd=repo,
            env=command_env(repo),
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            while proc.poll() is None:
                if (stage := running_stage(proc.pid)) is not None:
                    now = time.monotonic()
                    seen.setdefault(stage, [now, now])[1] = now
                time.sleep(POLL_S)
        finally:
            kill_group(proc.pid)  # only if we were interrupted: dvc has exited otherwise
    wall = round(time.monotonic() - t0, 1)
    if proc.returncode != 0:
        raise RuntimeError(f"reference dvc repro failed ({proc.returncode}), see {log}")
    times = {row["stage"]: row["wall_s"] for row in stage_times(repo)}
    return {
        "repo": str(repo),
        "wall_s": wall,
        "stage_wall_s": times,
        "process_s": {s: round(b - a, 1) for s, (a, b) in seen.items()},
    }


def load_reference(repo: Path) -> dict:
    """A reference repo finished earlier (with the reference.json the drill saved beside it,
    else with its stage times only: no import times, so kills are timed from process start)."""
    saved = repo.parent / "reference.json"
    if saved.exists() and json.loads(saved.read_text())["repo"] == str(repo):
        return json.loads(saved.read_text())
    times = {row["stage"]: row["wall_s"] for row in stage_times(repo)}
    if not (repo / "dvc.lock").exists() or not times:
        raise SystemExit(f"--reference {repo}: no dvc.lock or {STAGE_TIMES}; not a finished run")
    return {"repo": str(repo), "wall_s": None, "stage_wall_s": times, "process_s": {}}


# --- Drill --------------------------------------------------------------------------------


@dataclass
class Attempt:
    trigger: str  # timed | first saved progress
    delay_s: float  # from the stage process appearing to the kill
    landed: str  # mid-stage | stage finished, dvc still committing | finished before kill
    chunks_on_disk: int  # finished chunk / shard files under .nla_work at the kill
    checkpoints_on_disk: list[str]
    lock_files: dict[str, str]
    stage_lived_s: float | None = None  # how long the stage process ran, when it ended first


@dataclass
class StageDrill:
    stage: str
    ref_wall_s: float
    import_s: float
    fraction: float
    attempts: list[Attempt] = field(default_factory=list)
    rerun_rc: int | None = None
    rerun_wall_s: float | None = None
    rerun_ran_stage: bool | None = None
    lock: str = ""
    resume_log: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    @property
    def landed_mid_stage(self) -> bool:
        return any(a.landed == "mid-stage" for a in self.attempts)

    @property
    def resumed_from_saved(self) -> bool:
        """Whether the last kill left finished chunks or checkpoints for the rerun."""
        last = self.attempts[-1] if self.attempts else None
        return bool(
            last
            and last.landed != "finished before kill"
            and (last.chunks_on_disk or last.checkpoints_on_disk)
        )


def progress_on_disk(repo: Path, graph: dict, stage: str) -> tuple[int, list[str]]:
    """What a rerun can resume from: finished chunks (.nla_work/<stage>/, and label's persisted
    data/label_chunks) and checkpoints (models/*/checkpoints/step_*)."""
    places = [repo / ".nla_work" / stage]
    places += [repo / out for out in graph[stage]["outs"] if out.endswith("_chunks")]
    # Not the half-written ones inside atomic_path's ".<name>.*.tmp" folders.
    chunks = sum(
        1
        for place in places
        for path in place.rglob("chunk_*.parquet")
        if not any(part.startswith(".") for part in path.relative_to(place).parts)
    )
    checkpoints = sorted(
        str(p.relative_to(repo))
        for out in graph[stage]["outs"]
        for p in (repo / out / "checkpoints").glob("step_*")
    )
    return chunks, checkpoints


def lock_files(repo: Path) -> dict[str, str]:
    found = {}
    for name in ("lock", "rwlock"):
        path = repo / ".dvc/tmp" / name
        if path.exists():
            found[name] = path.read_text()[:300]
    return found


def kill_attempt(
    repo: Path,
    graph: dict,
    drill: StageDrill,
    log: Path,
    delay_s: float | None,
    force: bool = False,
) -> Attempt:
    """`dvc repro -s S` in its own process group, SIGKILLed delay_s after the stage process
    appeared, or (delay_s None) as soon as it has saved a new chunk or checkpoint."""
    finished_before = sum(1 for r in stage_times(repo) if r["stage"] == drill.stage)
    baseline = progress_on_disk(repo, graph, drill.stage)
    cmd = ["dvc", "repro", "-s", *(["-f"] if force else []), drill.stage]
    with log.open("w") as out:
        proc = subprocess.Popen(
            cmd,
            cwd=repo,
            env=command_env(repo),
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    lived = None
    try:
        while proc.poll() is None and running_stage(proc.pid) != drill.stage:
            time.sleep(POLL_S / 5)
        appeared = time.monotonic()
        deadline = appeared + (delay_s if delay_s is not None else COMMAND_TIMEOUT_S)
        while proc.poll() is None and time.monotonic() < deadline:
            if delay_s is None and progress_on_disk(repo, graph, drill.stage) != baseline:
                break
            if delay_s is None:
                time.sleep(POLL_S / 5)  # a chunk can be followed by the next within a second
                continue
            if lived is None and running_stage(proc.pid) != drill.stage:
                lived = time.monotonic() - appeared
            time.sleep(min(POLL_S, max(deadline - time.monotonic(), 0)))
        stage_alive = running_stage(proc.pid) == drill.stage
        dvc_alive = proc.poll() is None
        killed_at = time.monotonic() - appeared
        if lived is None and not stage_alive:
            lived = killed_at
    finally:
        kill_group(proc.pid)
        proc.wait()
    finished = sum(1 for r in stage_times(repo) if r["stage"] == drill.stage) > finished_before
    if stage_alive and not finished:
        landed = "mid-stage"
    elif dvc_alive:
        landed = "stage finished, dvc still committing"
    else:
        landed = "finished before kill"
    chunks, checkpoints = progress_on_disk(repo, graph, drill.stage)
    return Attempt(
        "timed" if delay_s is not None else "first saved progress",
        round(delay_s if delay_s is not None else killed_at, 1),
        landed,
        chunks,
        checkpoints,
        lock_files(repo),
        round(lived, 1) if lived is not None else None,
    )


def rerun_stage(repo: Path, drill: StageDrill, log: Path) -> None:
    """`dvc repro S` as a user would rerun it. If DVC refuses because of a lock, that is a
    finding; the stale lock is removed only when DVC's own message says to."""
    result = run(["dvc", "repro", drill.stage], repo, log)
    if m := re.search(r"remove '([^']*rwlock)' and try again", result.output):
        pids = [int(p) for p in re.findall(r"\(PID (\d+)\)", result.output)]
        alive = [p for p in pids if psutil.pid_exists(p)]
        drill.lock = f"refused: rwlock blocked by dead PIDs {pids}; removed as DVC says"
        if alive:
            drill.lock = f"refused: rwlock blocked by live PIDs {alive}"
        else:
            path = Path(m.group(1))
            (path if path.is_absolute() else repo / path).unlink(missing_ok=True)
            result = run(["dvc", "repro", drill.stage], repo, log)
    elif "Unable to acquire lock" in result.output:
        drill.lock = "refused: 'Unable to acquire lock' (repo lock after the kill)"
    elif "had been killed. Auto removed it from the lock file" in result.output:
        drill.lock = "DVC removed the killed PID from .dvc/tmp/rwlock itself"
    else:
        drill.lock = "no stale lock reported"
    drill.rerun_rc, drill.rerun_wall_s = result.rc, result.wall_s
    drill.rerun_ran_stage = f"Running stage '{drill.stage}'" in result.output
    drill.resume_log = [
        line.strip()[:160] for line in result.output.splitlines() if "resum" in line.lower()
    ][:3]
    if result.rc != 0:
        drill.problems.append(f"rerun failed ({result.rc}): {result.output[-600:]}")


def remove_outputs(repo: Path, graph: dict, stage: str) -> None:
    """So that a stage that finished before the kill runs again from scratch on the retry."""
    for out in graph[stage]["outs"]:
        path = repo / out
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)
    shutil.rmtree(repo / ".nla_work" / stage, ignore_errors=True)


def drill_stage(repo: Path, graph: dict, drill: StageDrill, logs: Path) -> None:
    if ups := parents(graph, drill.stage):
        must(run(["dvc", "repro", *ups], repo, logs / f"{drill.stage}.upstream.log"))
    delay = drill.import_s + drill.fraction * drill.ref_wall_s
    for attempt in (1, 2):
        log = logs / f"{drill.stage}.kill{attempt}.log"
        drill.attempts.append(kill_attempt(repo, graph, drill, log, delay, force=attempt > 1))
        if drill.attempts[-1].landed == "mid-stage":
            break
        remove_outputs(repo, graph, drill.stage)
        # Sooner: the same fraction of how long the stage process lived this time (this
        # machine's load now, not the reference's), else half the delay.
        lived = drill.attempts[-1].stage_lived_s
        delay = min(drill.fraction * lived, delay / 2) if lived else delay / 2
    if not drill.landed_mid_stage:
        drill.problems.append(
            "not exercised: the kill never landed while the stage ran "
            f"({', '.join(a.landed for a in drill.attempts)})"
        )
    last = drill.attempts[-1]
    if last.landed == "mid-stage" and not (last.chunks_on_disk or last.checkpoints_on_disk):
        # A kill before anything was saved only tests a restart from scratch; resuming
        # (where a chunk could be lost or done twice) needs a kill after the first save.
        log = logs / f"{drill.stage}.kill_after_save.log"
        drill.attempts.append(kill_attempt(repo, graph, drill, log, None))
    rerun_stage(repo, drill, logs / f"{drill.stage}.rerun.log")


# --- Comparison ---------------------------------------------------------------------------


@dataclass
class FileCheck:
    stage: str
    path: str
    how: str  # identical | equal without timing keys | mismatch | lost | extra
    detail: str = ""

    @property
    def ok(self) -> bool:
        return self.how not in ("mismatch", "lost", "extra")


def same(a: object, b: object) -> bool:
    """Deep equality with NaN == NaN (metrics can be NaN by design)."""
    if isinstance(a, float) and isinstance(b, float):
        return a == b or (math.isnan(a) and math.isnan(b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, list | tuple) and isinstance(b, list | tuple):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    return a == b


def diff_paths(a: object, b: object, strip: frozenset[str], prefix: str = "") -> list[str]:
    """Key paths where two parsed JSON / YAML documents differ, ignoring keys in strip."""
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for key in sorted(set(a) | set(b), key=str):
            if key in strip:
                continue
            where = f"{prefix}.{key}" if prefix else str(key)
            if key not in a or key not in b:
                out.append(f"{where} (only in {'drill' if key in b else 'reference'})")
            else:
                out += diff_paths(a[key], b[key], strip, where)
        return out
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        pairs = enumerate(zip(a, b, strict=True))
        return [p for i, (x, y) in pairs for p in diff_paths(x, y, strip, f"{prefix}[{i}]")]
    return [] if same(a, b) else [prefix or "<root>"]


def structured_timing_keys(doc: object) -> set[str]:
    if isinstance(doc, dict):
        return {k for k in doc if k in TIMING_KEYS}.union(
            *(structured_timing_keys(v) for v in doc.values())
        )
    if isinstance(doc, list):
        return set().union(*(structured_timing_keys(v) for v in doc))
    return set()


def ignored_note(keys: list[str]) -> str:
    return f"ignored {keys}"


def compare_structured(a: Path, b: Path, strip: frozenset[str]) -> tuple[str, str]:
    load = json.loads if a.suffix == ".json" else yaml.safe_load
    da, db = load(a.read_text()), load(b.read_text())
    if diffs := diff_paths(da, db, strip):
        return "mismatch", "differs at " + ", ".join(diffs[:8])
    keys = sorted(structured_timing_keys(da) | structured_timing_keys(db))
    if not keys:  # equal values, other bytes (key order, float format): DVC sees a change
        return "mismatch", "equal values, different bytes"
    return "equal without timing keys", ignored_note(keys)


def metadata_diffs(a: dict | None, b: dict | None, strip: frozenset[str]) -> list[str]:
    """Key paths where two parquet key-value metadata differ (JSON values compared parsed)."""
    a, b = a or {}, b or {}
    out = []
    for key in sorted(set(a) | set(b)):
        name = key.decode(errors="replace")
        if key not in a or key not in b:
            out.append(f"{name} (only in {'drill' if key in b else 'reference'})")
            continue
        try:
            out += diff_paths(json.loads(a[key]), json.loads(b[key]), strip, name)
        except json.JSONDecodeError:
            out += [] if a[key] == b[key] else [name]
    return out


def key_columns(columns: list[str]) -> list[str]:
    return [c for c in ("doc_id", "position") if c in columns] if "doc_id" in columns else []


def compare_parquet(a: Path, b: Path, strip: frozenset[str], identical: bool) -> tuple[str, str]:
    import pyarrow.parquet as pq

    ta, tb = pq.read_table(a), pq.read_table(b)
    keys = key_columns(tb.column_names)
    notes = []
    if keys:
        frame = tb.select(keys).to_pandas()
        if dup := int(frame.duplicated().sum()):
            return "mismatch", f"{dup} duplicated {'+'.join(keys)} rows in the drilled file"
        notes.append(f"no duplicate {'+'.join(keys)}")
    if ta.num_rows != tb.num_rows:
        return "mismatch", f"{tb.num_rows} rows vs {ta.num_rows} in the reference"
    if identical:
        return "identical", f"{tb.num_rows} rows, " + ", ".join(notes)
    if ta.column_names != tb.column_names:
        return "mismatch", f"columns {tb.column_names} vs {ta.column_names}"
    if meta := metadata_diffs(ta.schema.metadata, tb.schema.metadata, strip):
        return "mismatch", "metadata differs at " + ", ".join(meta[:8])
    ignored = [c for c in ta.column_names if c in strip]
    if not ignored:
        return "mismatch", "equal columns and metadata, different bytes"
    differ = [
        c
        for c in ta.column_names
        if c not in strip and not same(ta.column(c).to_pylist(), tb.column(c).to_pylist())
    ]
    if differ:
        if keys and set(map(tuple, ta.select(keys).to_pylist())) == set(
            map(tuple, tb.select(keys).to_pylist())
        ):
            notes.append("same keys, other order or values")
        return "mismatch", f"columns differ: {differ}; " + ", ".join(notes)
    note = ignored_note(ignored)
    return "equal without timing keys", f"{tb.num_rows} rows, {note}, " + ", ".join(notes)


def csv_difference(a: Path, b: Path) -> str:
    import pandas as pd

    fa, fb = pd.read_csv(a), pd.read_csv(b)
    if list(fa.columns) != list(fb.columns) or len(fa) != len(fb):
        return f"shape {fb.shape} vs {fa.shape}, columns {list(fb.columns)}"
    return f"columns differ: {[c for c in fa.columns if not fa[c].equals(fb[c])]}"


def safetensors_difference(a: Path, b: Path) -> str:
    from safetensors import safe_open

    with safe_open(str(a), "pt") as fa, safe_open(str(b), "pt") as fb:
        names_a, names_b = set(fa.keys()), set(fb.keys())
        if names_a != names_b:
            return f"tensor names differ: {sorted(names_a ^ names_b)}"
        if differ := [k for k in sorted(names_a) if not fa.get_tensor(k).equal(fb.get_tensor(k))]:
            return f"tensors differ: {differ[:8]}"
        if fa.metadata() != fb.metadata():
            return "tensors equal, header metadata differs"
    return "tensors and metadata equal, bytes differ"


def torch_difference(a: Path, b: Path) -> str:
    """Optimizer and trainer state (torch.save): whether the loaded values are equal."""
    import torch

    def equal(x: object, y: object) -> bool:
        if isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor):
            return x.dtype == y.dtype and x.shape == y.shape and bool(torch.equal(x, y))
        if isinstance(x, dict) and isinstance(y, dict):
            return x.keys() == y.keys() and all(equal(x[k], y[k]) for k in x)
        if isinstance(x, list | tuple) and isinstance(y, list | tuple):
            return len(x) == len(y) and all(equal(u, v) for u, v in zip(x, y, strict=True))
        return same(x, y)

    xa, xb = (torch.load(p, map_location="cpu", weights_only=True) for p in (a, b))
    return "loaded values equal, bytes differ" if equal(xa, xb) else "loaded state differs"


def text_difference(a: Path, b: Path) -> str:
    la, lb = a.read_text().splitlines(), b.read_text().splitlines()
    if len(la) != len(lb):
        return f"{len(lb)} lines vs {len(la)} in the reference"
    i = next((i for i, (x, y) in enumerate(zip(la, lb, strict=True)) if x != y), None)
    return (
        "same lines, bytes differ"
        if i is None
        else f"line {i + 1}: {lb[i][:120]!r} vs {la[i][:120]!r}"
    )


EXPLAIN = {
    ".csv": csv_difference,
    ".safetensors": safetensors_difference,
    ".pt": torch_difference,
    ".md": text_difference,
}


def compare_file(a: Path, b: Path, strip: frozenset[str]) -> tuple[str, str]:
    """(how, detail). Only bytes count (DVC hashes bytes): a differing file is a mismatch,
    explained by what differs in it, unless all it differs in is a TIMING_KEYS field."""
    identical = a.read_bytes() == b.read_bytes()
    if a.suffix == ".parquet":  # the row checks run on identical files too
        return compare_parquet(a, b, strip, identical)
    if identical:
        return "identical", ""
    if a.suffix in (".json", ".yaml", ".yml"):
        return compare_structured(a, b, strip)
    explain = EXPLAIN.get(a.suffix)
    sizes = f"bytes differ ({a.stat().st_size} vs {b.stat().st_size} B)"
    return "mismatch", explain(a, b) if explain else sizes


def lock_outs(repo: Path) -> dict[str, list[str]]:
    lock = yaml.safe_load((repo / "dvc.lock").read_text())["stages"]
    return {name: [o["path"] for o in s.get("outs", [])] for name, s in lock.items()}


def files_of(repo: Path, out: str) -> set[str]:
    path = repo / out
    if path.is_dir():
        return {p.relative_to(repo).as_posix() for p in path.rglob("*") if p.is_file()}
    return {out} if path.exists() else set()


def compare_repos(ref: Path, drilled: Path, strict: bool = False) -> list[FileCheck]:
    """Every output dvc.lock lists, drilled vs reference. strict: no timing keys removed."""
    strip = frozenset() if strict else TIMING_KEYS
    ref_outs, drill_outs = lock_outs(ref), lock_outs(drilled)
    checks = []
    for stage in sorted(set(ref_outs) | set(drill_outs)):
        if ref_outs.get(stage) != drill_outs.get(stage):
            checks.append(FileCheck(stage, "dvc.lock", "mismatch", f"outs {drill_outs.get(stage)}"))
            continue
        for out in ref_outs[stage]:
            fa, fb = files_of(ref, out), files_of(drilled, out)
            checks += [FileCheck(stage, p, "lost") for p in sorted(fa - fb)]
            checks += [FileCheck(stage, p, "extra") for p in sorted(fb - fa)]
            for p in sorted(fa & fb):
                try:
                    how, detail = compare_file(ref / p, drilled / p, strip)
                except Exception as err:  # an unreadable drilled file is a mismatch
                    how, detail = "mismatch", f"{type(err).__name__}: {err}"
                checks.append(FileCheck(stage, p, how, detail))
    return checks


# --- Report -------------------------------------------------------------------------------


def lock_summary(lock: str) -> str:
    if lock.startswith("refused"):
        return "REFUSED"
    return "auto-removed" if lock.startswith("DVC removed") else ("none" if lock else "")


def table(drills: list[StageDrill], checks: list[FileCheck]) -> str:
    head = ("stage", "ref s", "kill at s", "frac", "landed", "saved at kill", "lock")
    head += ("rerun s", "files", "mismatches")
    rows = [head]
    stages = [d.stage for d in drills] + sorted(
        {c.stage for c in checks} - {d.stage for d in drills}
    )
    by = {d.stage: d for d in drills}
    for s in stages:
        mine = [c for c in checks if c.stage == s]
        bad = sum(not c.ok for c in mine)
        d = by.get(s)
        if d is None:
            rows.append((s, "", "", "", "(not drilled)", "", "", "", str(len(mine)), str(bad)))
            continue
        last = d.attempts[-1] if d.attempts else None
        saved = (
            f"{last.chunks_on_disk} chunks, {len(last.checkpoints_on_disk)} ckpt" if last else ""
        )
        rows.append(
            (
                s,
                f"{d.ref_wall_s:.0f}",
                "/".join(
                    f"{a.delay_s:.1f}{'' if a.trigger == 'timed' else '*'}" for a in d.attempts
                ),
                f"{d.fraction:.2f}",
                "; ".join(a.landed for a in d.attempts),
                saved,
                lock_summary(d.lock),
                f"{d.rerun_wall_s:.0f}" if d.rerun_wall_s is not None else "",
                str(len(mine)),
                str(bad),
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    lines = ["  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)) for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    lines.append("kill at s: after the stage process appeared; * = right after its first save")
    for c in checks:
        if not c.ok:
            lines.append(f"MISMATCH {c.stage}: {c.path}: {c.how} {c.detail}")
    for d in drills:
        lines += [f"PROBLEM {d.stage}: {p}" for p in d.problems]
    return "\n".join(lines)


def summarize_checks(checks: list[FileCheck]) -> dict:
    return {
        "files_compared": len(checks),
        "identical": sum(c.how == "identical" for c in checks),
        "equal_without_timing_keys": {
            c.path: c.detail for c in checks if c.how == "equal without timing keys"
        },
        "mismatches": [asdict(c) for c in checks if not c.ok],
        "parquet": {c.path: c.detail for c in checks if c.path.endswith(".parquet")},
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--profile", default="smoke")
    p.add_argument("--stages", default=",".join(DRILL_STAGES), help="comma-separated, in order")
    p.add_argument("--seed", type=int, default=None, help="kill points (default: random)")
    p.add_argument("--keep", type=Path, help="work here and keep the repos and logs")
    p.add_argument("--reference", type=Path, help="reuse this finished reference repo")
    p.add_argument("--compare", nargs=2, type=Path, metavar=("REF", "OTHER"))
    p.add_argument("--strict", action="store_true", help="--compare without removing timings")
    args = p.parse_args(argv)

    if args.compare:
        checks = compare_repos(*args.compare, strict=args.strict)
        print(json.dumps(summarize_checks(checks), indent=2))
        print(table([], checks))
        return 0 if all(c.ok for c in checks) else 1

    # A terminated drill must not leave its dvc process groups running: exit through the
    # finally blocks that kill them.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    started = time.monotonic()
    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(2**31)
    stages = [s for s in args.stages.split(",") if s]
    work = args.keep or Path(tempfile.mkdtemp(prefix="nla_fault_drill_"))
    work.mkdir(parents=True, exist_ok=True)
    logs = work / "logs"
    logs.mkdir(exist_ok=True)
    print(f"fault drill: seed {seed}, profile {args.profile}, work dir {work}", flush=True)

    # Pinned for both runs (see ref_threads below); the default follows the CPU affinity.
    os.environ.setdefault("OMP_NUM_THREADS", str(len(os.sched_getaffinity(0))))
    if args.reference:
        reference = load_reference(args.reference.resolve())
    else:
        build_repo(work / "reference", args.profile)
        print("reference: dvc repro ...", flush=True)
        reference = reference_run(work / "reference", logs / "reference.log")
        (work / "reference.json").write_text(json.dumps(reference, indent=2))
    ref = Path(reference["repo"])
    # The drill runs with the reference's torch thread count: a float reduction split over
    # another number of threads may round differently, which is no resume bug.
    ref_threads = {r["stage"]: r.get("torch_threads") for r in stage_times(ref)}
    if counts := {t for t in ref_threads.values() if t}:
        os.environ["OMP_NUM_THREADS"] = str(max(counts))
    graph = stage_graph(ref)
    if unknown := [s for s in stages if s not in graph]:
        raise SystemExit(f"--stages: unknown {unknown}; dvc.yaml has {sorted(graph)}")

    repo = work / "drill"
    build_repo(repo, args.profile)
    rng = random.Random(seed)
    drills = []
    for stage in stages:
        wall = float(reference["stage_wall_s"][stage])
        process = reference["process_s"].get(stage)
        import_s = max(process - wall, 0.0) if process else 0.0
        drill = StageDrill(stage, wall, round(import_s, 1), round(rng.uniform(*KILL_FRACTION), 3))
        when = f"{drill.import_s:.1f} s imports + {drill.fraction:.2f} x {wall:.1f} s"
        print(f"drill {stage}: kill at {when}", flush=True)
        drill_stage(repo, graph, drill, logs)
        drills.append(drill)
        landed = [a.landed for a in drill.attempts]
        print(f"  {landed}, rerun {drill.rerun_wall_s} s, {drill.lock}", flush=True)

    problems = []
    final = run(["dvc", "repro"], repo, logs / "final.log")
    if final.rc != 0:
        problems.append(f"final dvc repro failed ({final.rc}), see {logs / 'final.log'}")
    status = run(["dvc", "status"], repo)
    clean = status.rc == 0 and "Data and pipelines are up to date." in status.output
    if not clean:
        problems.append(f"dvc status after the drill is not clean: {status.output[-400:]}")
    checks = compare_repos(ref, repo) if final.rc == 0 else []
    drill_threads = {r["stage"]: r.get("torch_threads") for r in stage_times(repo)}
    if other := {s: t for s, t in drill_threads.items() if t != ref_threads.get(s)}:
        problems.append(f"torch threads differ from the reference's {ref_threads}: {other}")
    passed = not problems and all(c.ok for c in checks) and all(not d.problems for d in drills)
    report = {
        "passed": passed,
        "seed": seed,
        "profile": args.profile,
        "work_dir": str(work),
        "reference": reference,
        "stages": [
            asdict(d)
            | {"landed_mid_stage": d.landed_mid_stage, "resumed_from_saved": d.resumed_from_saved}
            for d in drills
        ],
        "final_repro": {
            "rc": final.rc,
            "wall_s": final.wall_s,
            "stages_run": re.findall(r"Running stage '([^']+)'", final.output),
        },
        "dvc_status_clean": clean,
        "torch_threads": {"reference": ref_threads, "drill": drill_threads},
        "problems": problems,
        "timing_keys_ignored": sorted(TIMING_KEYS),
        "comparison": summarize_checks(checks),
        "total_wall_s": round(time.monotonic() - started, 1),
    }
    (work / "report.json").write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))
    print(table(drills, checks))
    for problem in problems:
        print(f"PROBLEM: {problem}")
    print(f"{'PASSED' if passed else 'FAILED'} in {report['total_wall_s']:.0f} s")
    if passed and not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    elif not passed:
        print(f"kept for inspection: {work}")
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
