"""The stage graph as DVC runs it, read from `dvc.yaml`: the one place where each stage's code
deps and params are declared.

DVC reruns a stage when one of its declared deps or params changes; a stage's resumable state
(label and eval chunks, training checkpoints, SAE shards) must be invalidated by exactly the
same changes. So the code reads the declarations instead of repeating them:

- `code_sha256(stage)`: sha256 of each `src/nla_repro/...` dep of the stage (the code its
  checkpoints and chunks are fingerprinted with). A test checks that these deps are the
  stage's import closure.
- `stage_view(params, stage)`: the params as the stage may read them. Reading a param that
  `dvc.yaml` does not declare for the stage is an error (`UndeclaredParamError`), so a param
  that changes a stage's output can never be missing from what reruns it;
  `view.declared_values()` is what chunk fingerprints hash.

Outside a pipeline checkout (no `dvc.yaml` in the working directory or beside the package)
nothing is known: every package file counts as code and every param may be read.
"""

from __future__ import annotations

import ast
import dataclasses
import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from nla_repro.errors import NlaError
from nla_repro.io import sha256_file

PACKAGE = Path(__file__).resolve().parent
PACKAGE_PREFIX = "src/nla_repro/"
DVC_FILE = Path("dvc.yaml")
PLACEMENT = frozenset({"base.device"})
"""Params that decide where a stage runs, not what it computes; any stage may read them."""
NOT_OUTPUT_CODE = frozenset(
    {
        "__init__.py",
        "stages/__init__.py",
        "__main__.py",
        "build_record.py",
        "config.py",
        "errors.py",
        "pipeline.py",
        "platform.py",
        "reproducibility.py",
        "secrets.py",
    }
)
"""Modules stages import that cannot change a stage's output by themselves: package markers,
the CLI, params parsing and validation (DVC tracks the params' values), error types, this
module, the platform description, `verify` and its build record, and secret redaction. They
are not code deps, so editing them reruns nothing."""


class UndeclaredParamError(NlaError):
    """A stage read a param that dvc.yaml does not declare for it."""


@dataclass(frozen=True)
class StageSpec:
    """What dvc.yaml declares for one stage."""

    name: str
    code: tuple[str, ...] | None
    """Package-relative code deps (`stages/eval.py`, `prompts/judge.v1.yaml`); None: unknown."""
    params: tuple[str, ...] | None
    """Dotted param keys (`eval`, `base.quantization`); None: unknown."""


def dvc_file() -> Path | None:
    """dvc.yaml of the pipeline being run: the working directory's, else the checkout's the
    package was installed from (an editable install)."""
    for candidate in (DVC_FILE, PACKAGE.parents[1] / DVC_FILE):
        if candidate.is_file():
            return candidate
    return None


@functools.lru_cache(maxsize=8)
def _read_stages(path: str, mtime_ns: int) -> dict:
    stages = (yaml.safe_load(Path(path).read_text()) or {}).get("stages", {})
    return stages if isinstance(stages, dict) else {}


def stage_spec(name: str) -> StageSpec:
    path = dvc_file()
    if path is None:
        return StageSpec(name, None, None)
    stages = _read_stages(str(path.resolve()), path.stat().st_mtime_ns)
    if name not in stages:
        raise NlaError(f"{path}: no stage {name!r} (stages: {', '.join(stages)})")
    stage = stages[name]
    deps = [d if isinstance(d, str) else next(iter(d)) for d in stage.get("deps", [])]
    code = tuple(d.removeprefix(PACKAGE_PREFIX) for d in deps if d.startswith(PACKAGE_PREFIX))
    params = []
    for entry in stage.get("params", []):
        params += list(entry) if isinstance(entry, dict) else [entry]
    return StageSpec(name, code, tuple(params))


def _stages() -> dict:
    path = dvc_file()
    if path is None:
        raise NlaError("no dvc.yaml here or in the checkout the package runs from")
    return _read_stages(str(path.resolve()), path.stat().st_mtime_ns)


def stage_names() -> list[str]:
    """The stages of dvc.yaml, in file order (upstream first)."""
    return list(_stages())


def stage_outs(name: str) -> dict[str, bool]:
    """Every output path of stage `name` (outs, metrics, plots) and whether DVC caches it."""
    stage = _stages().get(name)
    if stage is None:
        raise NlaError(f"dvc.yaml: no stage {name!r} (stages: {', '.join(_stages())})")
    outs = {}
    for kind in ("outs", "metrics", "plots"):
        for entry in stage.get(kind, []):
            if isinstance(entry, dict):
                (out, opts), *_ = entry.items()
                outs[out] = bool((opts or {}).get("cache", True))
            else:
                outs[entry] = True
    return outs


def upstream(name: str) -> list[str]:
    """Stage `name` and every stage whose outputs it reads, directly or not (file order)."""
    stages = _stages()
    producer = {out: s for s in stages for out in stage_outs(s)}
    todo, seen = [name], {name}
    while todo:
        stage = stages[todo.pop()]
        for dep in stage.get("deps", []):
            dep = dep if isinstance(dep, str) else next(iter(dep))
            for out, s in producer.items():
                if s not in seen and (dep == out or dep.startswith(out.rstrip("/") + "/")):
                    seen.add(s)
                    todo.append(s)
    return [s for s in stages if s in seen]


def code_sha256(name: str) -> dict[str, str]:
    """sha256 of each code dep of stage `name`, keyed by its package-relative path, from the
    package that runs (every package file when dvc.yaml is not known)."""
    code = stage_spec(name).code
    if code is None:
        files = sorted(
            p.relative_to(PACKAGE).as_posix()
            for p in PACKAGE.rglob("*")
            if p.is_file() and "__pycache__" not in p.parts
        )
    else:
        files = list(code)
    return {f: sha256_file(PACKAGE / f) for f in files}


# --- The params a stage may read ------------------------------------------------------------


def stage_view(params: Any, name: str) -> StageParams:
    """`params` (a config.Params) restricted to what dvc.yaml declares for stage `name`."""
    if isinstance(params, StageParams):
        if params._stage != name:
            raise NlaError(f"params viewed for stage {params._stage!r} passed to {name!r}")
        return params
    return StageParams(params, name, stage_spec(name).params)


class StageParams:
    """Read access to the declared params of one stage. A whole section (`eval`) comes back as
    the config dataclass itself; a partly declared section as a view of its declared fields.
    Derived properties of Params (`sae_layer`, `ar_layers`) are computed through the view, so
    the params they read are checked too."""

    def __init__(self, params: Any, stage: str, declared: tuple[str, ...] | None) -> None:
        self._params, self._stage = params, stage
        self._declared = None if declared is None else frozenset(declared)

    @property
    def full(self) -> Any:
        """The unrestricted Params (to pass to code outside the stage, e.g. sidecars)."""
        return self._params

    def _allowed(self, key: str) -> bool:
        if self._declared is None or key in PLACEMENT:
            return True
        parts = key.split(".")
        return any(".".join(parts[: i + 1]) in self._declared for i in range(len(parts)))

    def _check(self, key: str) -> None:
        if not self._allowed(key):
            raise UndeclaredParamError(
                f"stage {self._stage} reads params {key}, which dvc.yaml does not list among "
                f"the stage's params: declare it there (a change to it must rerun the stage)"
            )

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):
            raise AttributeError(name)
        derived = _through_view(type(self._params), name, self)
        if derived is not _FIELD:
            return derived
        value = getattr(self._params, name)
        if self._allowed(name):
            return value
        if dataclasses.is_dataclass(value):  # fields are checked one by one
            return _SectionView(self, name, value)
        self._check(name)  # raises
        return value

    def declared_values(self) -> dict[str, Any]:
        """Each declared key and its value (sections as dicts): what a stage's resumable
        state is fingerprinted with."""
        keys = (
            self._declared
            if self._declared is not None
            else [f.name for f in dataclasses.fields(self._params)]
        )
        out = {}
        for key in sorted(keys):
            node = self._params
            for part in key.split("."):
                node = getattr(node, part)
            out[key] = dataclasses.asdict(node) if dataclasses.is_dataclass(node) else node
        return out


_FIELD = object()


def _through_view(cls: type, name: str, view: Any) -> Any:
    """A property or method of `cls` evaluated on (bound to) the view, so the fields it reads
    are checked too; _FIELD when `name` is a plain field."""
    attr = getattr(cls, name, None)
    if isinstance(attr, property):
        return attr.fget(view)
    if callable(attr):
        return attr.__get__(view)
    return _FIELD


class _SectionView:
    """The declared fields of a partly declared section (e.g. `base.quantization`)."""

    def __init__(self, owner: StageParams, section: str, value: Any) -> None:
        self._owner, self._section, self._value = owner, section, value

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):
            raise AttributeError(name)
        derived = _through_view(type(self._value), name, self)
        if derived is not _FIELD:
            return derived
        self._owner._check(f"{self._section}.{name}")
        return getattr(self._value, name)


# --- Import closure (what a stage's code deps must cover) -----------------------------------


def import_closure(module: str) -> set[str]:
    """Package-relative files of every nla_repro module `module` imports, directly or not, at
    any depth and wherever in the file (lazy imports included), with the packages' __init__."""
    seen: set[str] = set()
    todo = [module]
    while todo:
        name = todo.pop()
        path = _module_file(name)
        if path is None:
            continue
        rel = path.relative_to(PACKAGE).as_posix()
        if rel in seen:
            continue
        seen.add(rel)
        parts = name.split(".")
        todo += [".".join(parts[:i]) for i in range(2, len(parts))]  # parent packages
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                todo += [a.name for a in node.names if a.name.startswith("nla_repro")]
            elif isinstance(node, ast.ImportFrom) and node.module:
                base = node.module
                if node.level:
                    pkg = parts if path.name == "__init__.py" else parts[:-1]
                    base = ".".join([*pkg[: len(pkg) - node.level + 1], node.module])
                if base.startswith("nla_repro"):
                    todo.append(base)
                    todo += [f"{base}.{a.name}" for a in node.names]
    return seen


def _module_file(name: str) -> Path | None:
    if not (name == "nla_repro" or name.startswith("nla_repro.")):
        return None
    parts = name.split(".")[1:]
    if not parts:
        return PACKAGE / "__init__.py"
    rel = Path(*parts)
    for candidate in (PACKAGE / rel / "__init__.py", PACKAGE / rel.with_suffix(".py")):
        if candidate.is_file():
            return candidate
    return None


# --- The outputs DVC does not cache ----------------------------------------------------------

LAST_GOOD = Path(".nla_work/last_good")
"""Copies of each stage's `cache: false` outputs from its last successful run. DVC deletes a
stage's outputs before running it and keeps no copy of these, so without this a failed rerun
would leave them deleted; `python -m nla_repro restore` puts them back."""


def uncached_outs(name: str) -> list[str]:
    return [out for out, cached in stage_outs(name).items() if not cached]


def keep_last_good(name: str, root: Path = LAST_GOOD) -> list[str]:
    """After stage `name` succeeded: copy its uncached outputs under `root` (temp name, then
    rename, so an interrupted copy never replaces a good one)."""
    import os
    import shutil

    kept = []
    for out in uncached_outs(name):
        src, dst = Path(out), root / out
        if not src.exists():
            continue
        dst.parent.mkdir(parents=True, exist_ok=True)
        tmp = dst.with_name(dst.name + ".partial")
        shutil.rmtree(tmp, ignore_errors=True) if tmp.is_dir() else tmp.unlink(missing_ok=True)
        if src.is_dir():
            shutil.copytree(src, tmp)
        else:
            shutil.copy2(src, tmp)
        if dst.is_dir():
            shutil.rmtree(dst)
        os.replace(tmp, dst)
        kept.append(out)
    return kept


def restore_outputs(names: list[str] | None = None, root: Path = LAST_GOOD) -> list[tuple]:
    """Put back every missing uncached output of `names` (default: every stage) from its last
    good copy, else from git HEAD. Returns (path, source, md5 matches dvc.lock: bool | None)
    per output restored; outputs that exist are left alone."""
    import hashlib
    import shutil
    import subprocess

    lock = {}
    if Path("dvc.lock").is_file():
        stages = (yaml.safe_load(Path("dvc.lock").read_text()) or {}).get("stages") or {}
        lock = {o["path"]: o.get("md5") for e in stages.values() for o in e.get("outs", [])}
    done = []
    for name in names or stage_names():
        for out in uncached_outs(name):
            path, copy = Path(out), root / out
            if path.exists():
                continue
            path.parent.mkdir(parents=True, exist_ok=True)
            if copy.is_file():
                shutil.copy2(copy, path)
                source = f"{copy} (the last successful {name} run)"
            elif copy.is_dir():
                shutil.copytree(copy, path)
                source = f"{copy} (the last successful {name} run)"
            else:
                shown = subprocess.run(["git", "show", f"HEAD:{out}"], capture_output=True)
                if shown.returncode != 0:
                    done.append((out, "nowhere: no last good copy and not in git HEAD", None))
                    continue
                path.write_bytes(shown.stdout)
                source = "git HEAD"
            md5 = hashlib.md5(path.read_bytes()).hexdigest() if path.is_file() else None
            done.append((out, source, None if out not in lock else md5 == lock[out]))
    return done
