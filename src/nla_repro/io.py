"""Files: atomic writes, resumable chunk stores, vector columns, sidecars and hashes.

Every stage output goes through `atomic_path`: it is written under a temporary name in the
same directory and renamed into place only when complete, so a crash never leaves a
half-written file where a finished one is expected.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import yaml

from nla_repro.errors import NlaError

VECTOR_COLUMN = "vector"


@contextlib.contextmanager
def atomic_path(final: Path | str) -> Iterator[Path]:
    """Yield a temporary path beside `final` (file or directory); rename it into place on
    success, remove it on failure."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent))
    target = tmp / final.name
    try:
        yield target
        if final.is_dir() and not final.is_symlink():
            shutil.rmtree(final)
        os.replace(target, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def write_parquet(table: pa.Table, path: Path | str) -> None:
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp)


def write_text(text: str, path: Path | str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8", newline="\n")


def write_json(data: Any, path: Path | str) -> None:
    """Strict JSON: a NaN or inf anywhere is an error naming the key, never a bare `NaN`
    (which is not JSON, and which a metrics file must never hold)."""
    bad = _non_finite(data)
    if bad is not None:
        raise NlaError(f"{path}: not written: {bad} is not a finite number")
    write_text(json.dumps(data, indent=2, sort_keys=False, allow_nan=False) + "\n", path)


def _non_finite(obj: Any, key: str = "") -> str | None:
    """Dotted key of the first NaN or inf in `obj`, or None."""
    if isinstance(obj, float) and not np.isfinite(obj):
        return key or "the value"
    items = (
        obj.items()
        if isinstance(obj, dict)
        else enumerate(obj)
        if isinstance(obj, list | tuple)
        else ()
    )
    for k, v in items:
        found = _non_finite(v, f"{key}.{k}" if key else str(k))
        if found is not None:
            return found
    return None


def write_yaml(data: Any, path: Path | str) -> None:
    write_text(yaml.safe_dump(data, sort_keys=False, allow_unicode=True), path)


def _interned(obj: Any) -> Any:
    if isinstance(obj, str):
        return sys.intern(obj)
    if isinstance(obj, dict):
        return type(obj)((_interned(k), _interned(v)) for k, v in obj.items())
    if isinstance(obj, list | tuple):
        return type(obj)(_interned(v) for v in obj)
    return obj


def save_torch_state(state: Any, path: Path | str) -> None:
    """torch.save of optimizer / trainer state (tensors and plain containers), byte-equal for
    equal state. Pickle memoizes by object identity: a key like "step" is one object when the
    optimizer made it and another when a resumed run read it back, which changes the bytes and
    DVC's hash. Interning every string makes equal strings one object either way."""
    import torch

    torch.save(_interned(state), path)


def sha256_file(path: Path | str, block: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(block):
            digest.update(chunk)
    return digest.hexdigest()


def sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


# Pathspecs from the repo root, so the answer does not depend on the directory asked from.
CODE_PATHS = (":(top)src", ":(top)pyproject.toml")


def code_pathspecs(top: Path) -> tuple[str, ...]:
    """The files of repo `top` whose change can change an output: the code deps its dvc.yaml
    declares for the stages (under src/), and pyproject.toml (the dependency pins). Without a
    dvc.yaml: CODE_PATHS less the modules in pipeline.NOT_OUTPUT_CODE (the CLI, params
    parsing, the platform layer)."""
    from nla_repro import pipeline  # pipeline imports this module

    code = set()
    if (top / "dvc.yaml").is_file():
        stages = (yaml.safe_load((top / "dvc.yaml").read_text()) or {}).get("stages") or {}
        for stage in stages.values():
            for dep in stage.get("deps", []):
                dep = dep if isinstance(dep, str) else next(iter(dep))
                if dep.startswith("src/"):
                    code.add(f":(top){dep}")
    if code:
        return (*sorted(code), ":(top)pyproject.toml")
    return CODE_PATHS + tuple(
        f":(top,exclude){pipeline.PACKAGE_PREFIX}{name}"
        for name in sorted(pipeline.NOT_OUTPUT_CODE)
    )


def code_commit(cwd: Path | str = ".") -> str | None:
    """Newest commit that changed code a stage runs (code_pathspecs) in the repo the stage
    runs in, with '-dirty' when that code has uncommitted changes; HEAD where no commit
    touched it. Unlike HEAD it stays put across a commit that only records results (dvc.lock,
    metrics, README) or changes only the CLI, release or verify code, so rebuilding that
    commit writes the same sidecars and the same hashes."""

    def git(*args: str) -> str:
        return subprocess.run(
            ["git", *args], cwd=cwd, capture_output=True, text=True, check=True
        ).stdout.strip()

    try:
        paths = code_pathspecs(Path(git("rev-parse", "--show-toplevel")))
        commit = git("log", "-1", "--format=%H", "--", *paths) or git("rev-parse", "HEAD")
        dirty = git("status", "--porcelain", "--untracked-files=no", "--", *paths)
    except (OSError, subprocess.CalledProcessError):
        return None
    return commit + ("-dirty" if dirty else "")


def vectors_to_arrow(vectors_ND: np.ndarray) -> pa.FixedSizeListArray:
    vectors_ND = np.ascontiguousarray(vectors_ND, dtype=np.float32)
    d = vectors_ND.shape[1]
    return pa.FixedSizeListArray.from_arrays(pa.array(vectors_ND.reshape(-1)), d)


def vectors_from_table(table: pa.Table, column: str = VECTOR_COLUMN) -> np.ndarray:
    """The vector column as one (n, d) float32 array, without a per-row Python loop."""
    col = table.column(column).combine_chunks()
    if not pa.types.is_fixed_size_list(col.type):
        raise TypeError(f"column {column!r} is {col.type}, not a fixed-size list")
    d = col.type.list_size
    return col.flatten().to_numpy(zero_copy_only=False).reshape(-1, d)


class ChunkStore:
    """Finished pieces of a long stage, kept on disk so a rerun resumes where it stopped.

    The store lives in a directory named by a fingerprint of everything the result depends
    on (inputs, params, code version): a rerun with other inputs never reuses stale chunks.
    Each chunk is a parquet file written atomically; a chunk file exists only if complete.
    """

    def __init__(self, directory: Path | str, fingerprint: str) -> None:
        self.stage_dir = Path(directory)
        self.dir = self.stage_dir / fingerprint[:16]
        # Chunks of other fingerprints are stale: their inputs or params changed.
        if self.stage_dir.exists():
            for old in self.stage_dir.iterdir():
                if old != self.dir:
                    shutil.rmtree(old, ignore_errors=True)
        self.dir.mkdir(parents=True, exist_ok=True)

    def path(self, index: int) -> Path:
        return self.dir / f"chunk_{index:06d}.parquet"

    def done(self, index: int) -> bool:
        return self.path(index).exists()

    def write(self, index: int, table: pa.Table) -> None:
        write_parquet(table, self.path(index))

    def read(self, indices: range | list[int]) -> pa.Table:
        return pa.concat_tables([pq.read_table(self.path(i)) for i in indices])

    def clear(self) -> None:
        shutil.rmtree(self.stage_dir, ignore_errors=True)


def fingerprint(*parts: Any) -> str:
    """sha256 of a JSON rendering of the parts (dicts, strings, numbers)."""
    return sha256_text(json.dumps(parts, sort_keys=True, default=str))
