"""Task runner (invoke). `invoke --list` shows every task; `invoke --help TASK` its options.

Tasks only call the project's command line, dvc, pytest and ruff: nothing imports this file.
"""

from __future__ import annotations

from invoke import Context, task

# The README's two newcomer commands use the same install line; keep them in step.
INSTALL = 'python3 -m pip install torch==2.13.0 -e ".[dev]"'


@task(help={"cuda": "keep the installed torch (e.g. a CUDA build) instead of torch==2.13.0 CPU"})
def setup(c: Context, cuda: bool = False) -> None:
    """Install the package with its dev tools (torch 2.13.0 CPU build unless --cuda)."""
    c.run('python3 -m pip install -e ".[dev]"' if cuda else INSTALL, pty=False)


@task(
    help={
        "profile": "params profile to apply first (default, smoke, gemma-4-e2b-v0.1.dd); "
        "omit to run with params.yaml as it is",
        "stage": "reproduce only this stage and what it depends on",
        "force": "rerun stages even if DVC finds them up to date",
    }
)
def repro(c: Context, profile: str = "", stage: str = "", force: bool = False) -> None:
    """Rebuild the pipeline with `dvc repro`, optionally after applying a params profile."""
    if profile:
        c.run(f"python -m nla_repro profile {profile}")
    c.run(" ".join(["dvc repro", "--force" if force else "", stage]).strip())


@task(help={"k": "only tests matching this pytest -k expression", "fast": "skip slow e2e tests"})
def test(c: Context, k: str = "", fast: bool = False) -> None:
    """Run the test suite."""
    args = ["python3 -m pytest"]
    if k:
        args.append(f"-k {k!r}")
    if fast:
        args.append("-m 'not slow'")
    c.run(" ".join(args))


@task(help={"fix": "apply ruff's fixes and formatting instead of only checking"})
def lint(c: Context, fix: bool = False) -> None:
    """ruff lint and format check of src, tests, benchmarks and tasks.py."""
    paths = "src tests benchmarks tasks.py"
    if fix:
        c.run(f"ruff check --fix {paths} && ruff format {paths}")
    else:
        c.run(f"ruff check {paths} && ruff format --check {paths}")
