"""Task runner (invoke). `invoke --list` shows every task; `invoke --help TASK` its options.

Tasks call the project's command line, dvc, docker, pytest and ruff; what differs between
platforms is decided in `nla_repro.platform` (imported only inside the tasks that need it, so
`invoke --list` and `invoke setup` work before the package is installed). Nothing imports
this file.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

from invoke import Context, Exit, task

# The README's two newcomer commands use the same install line; keep them in step.
INSTALL = 'python3 -m pip install torch==2.13.0 -e ".[dev]"'
IMAGE = "nla-repro:latest"
LOCK = "docker/requirements-gpu.txt"
LOCK_CMD = (
    "uv pip compile pyproject.toml --extra hub --generate-hashes --python-version 3.11 "
    f"--python-platform x86_64-manylinux_2_28 --constraint docker/gpu-pins.txt -o {LOCK}"
)


@task(help={"cuda": "keep the installed torch (e.g. a CUDA build) instead of torch==2.13.0 CPU"})
def setup(c: Context, cuda: bool = False) -> None:
    """Install the package and dev tools (CPU torch unless --cuda), then platform settings.

    Platform settings: `python -m nla_repro configure` (Windows: DVC cache links as copies).
    """
    c.run('python3 -m pip install -e ".[dev]"' if cuda else INSTALL, pty=False)
    c.run("python -m nla_repro configure")


BUILD_RECORD = Path("metrics/build.json")  # nla_repro.build_record.BUILD_RECORD


def pinned_threads() -> int:
    """The torch thread count every stage of the published build ran with."""
    import json

    if not BUILD_RECORD.is_file():
        raise Exit(f"{BUILD_RECORD} not found: no published build to match", code=2)
    stages = json.loads(BUILD_RECORD.read_text()).get("stages", {})
    counts = {entry.get("torch_threads") for entry in stages.values()}
    if len(counts) != 1 or not isinstance(next(iter(counts)), int):
        raise Exit(f"{BUILD_RECORD}: the stages ran with thread counts {counts}", code=2)
    return counts.pop()


@task(
    help={
        "profile": "params profile to apply first (default, smoke, gemma-4-e2b-v0.1.dd); "
        "omit to run with params.yaml as it is",
        "stage": "reproduce only this stage and what it depends on",
        "force": "rerun stages even if DVC finds them up to date",
        "deterministic": "run with the torch thread count the published build used "
        "(metrics/build.json), for the exact tier: the same bytes as dvc.lock",
    }
)
def repro(
    c: Context, profile: str = "", stage: str = "", force: bool = False, deterministic: bool = False
) -> None:
    """Rebuild the pipeline with `dvc repro`, optionally after applying a params profile.

    Afterwards `invoke verify` says which published numbers the rebuild reproduced.
    """
    if profile:
        c.run(f"python -m nla_repro profile {shlex.quote(profile)}")
    env = {}
    if deterministic:
        threads = str(pinned_threads())
        env = {"OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads}
        print(f"deterministic: {threads} torch thread(s), as {BUILD_RECORD} records")
    args = ["dvc repro", "--force" if force else "", shlex.quote(stage) if stage else ""]
    c.run(" ".join(a for a in args if a), env=env)


@task(
    help={
        "against": "git ref holding the published numbers (default HEAD)",
        "release": "compare with a release tag instead, e.g. v0.1.00",
        "all_numbers": "list every number, not only the headline ones and the misses",
    }
)
def verify(c: Context, against: str = "", release: str = "", all_numbers: bool = False) -> None:
    """Compare the rebuilt metrics with the published ones: a table and a verdict by tier."""
    args = ["python -m nla_repro verify"]
    if against:
        args.append(f"--against {shlex.quote(against)}")
    if release:
        args.append(f"--release {shlex.quote(release)}")
    if all_numbers:
        args.append("--all")
    c.run(" ".join(args))


@task(help={"k": "only tests matching this pytest -k expression", "fast": "skip slow e2e tests"})
def test(c: Context, k: str = "", fast: bool = False) -> None:
    """Run the test suite."""
    args = ["python3 -m pytest"]
    if k:
        args.append(f"-k {shlex.quote(k)}")
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


@task(
    help={
        "serve": "serve the site with live reload (mkdocs serve) instead of building it",
        "addr": "address to serve on (with --serve)",
    }
)
def docs(c: Context, serve: bool = False, addr: str = "127.0.0.1:8000") -> None:
    """Build the docs site into site/ with `mkdocs build --strict` (any warning fails).

    The API pages, the params reference and the results pages are generated at build time
    (docs/_hooks/nla_docs.py); `--serve` rebuilds them on every change.
    """
    env = {"NO_MKDOCS_2_WARNING": "1"}
    if serve:
        c.run(f"mkdocs serve --strict -a {shlex.quote(addr)}", env=env, pty=True)
    else:
        c.run("mkdocs build --strict", env=env)


def _dvc_transfer(c: Context, verb: str, remote: str, jobs: int) -> None:
    parts = [f"dvc {verb}"]
    if remote:
        parts.append(f"-r {shlex.quote(remote)}")
    if jobs:
        parts.append(f"-j {int(jobs)}")
    cmd = " ".join(parts)
    result = c.run(cmd, warn=True, hide="stdout")
    out = (result.stdout or "") + (result.stderr or "")
    if not result.ok:
        tail = "\n".join(out.strip().splitlines()[-5:])
        raise Exit(
            f"{cmd} failed (exit {result.exited}):\n{tail}\n"
            "Check the remote with `dvc remote list` and `invoke doctor`; an S3 remote needs "
            "`pip install -e '.[s3]'` and AWS credentials in the environment.",
            code=result.exited or 1,
        )
    moved = re.search(r"(\d+) files? (pushed|fetched|added)", out)
    done = f"{moved.group(1)} files {moved.group(2)}" if moved else "everything up to date"
    print(f"dvc {verb}: {done} ({'remote ' + remote if remote else 'default remote'})")


@task(help={"remote": "DVC remote name (default: the default remote)", "jobs": "parallel jobs"})
def push(c: Context, remote: str = "", jobs: int = 0) -> None:
    """Upload every pipeline output's DVC cache to the remote, with a one-line report."""
    _dvc_transfer(c, "push", remote, jobs)


@task(help={"remote": "DVC remote name (default: the default remote)", "jobs": "parallel jobs"})
def pull(c: Context, remote: str = "", jobs: int = 0) -> None:
    """Download this commit's pipeline outputs from the remote instead of recomputing."""
    _dvc_transfer(c, "pull", remote, jobs)


@task(
    help={
        "version": "release version, e.g. v0.1.00 (a git and Hub tag; never moved)",
        "push": "create or reuse the Hub repos, upload each folder in one commit and tag it",
        "org": "Hub user or organization (default: params card.org)",
        "public": "create public repos (default: private)",
    }
)
def release(c: Context, version: str, push: bool = False, org: str = "", public: bool = False):
    """Stage the AV, AR and SAE Hub repos under dist/<version>/ with their generated cards.

    Dry run by default: checks that git and `dvc status` are clean, stages the folders and
    prints the plan (repo ids, files, sizes, hashes). The token comes from HF_TOKEN or your
    `huggingface-cli login` and is never printed.
    """
    args = ["python -m nla_repro release", f"--version {shlex.quote(version)}"]
    if org:
        args.append(f"--org {shlex.quote(org)}")
    if push:
        args.append("--push")
    if public:
        args.append("--public")
    c.run(" ".join(args))


@task(
    help={
        "quick": "small settings: checks that every benchmark runs (not numbers to publish)",
        "only": "run only this benchmark (extract, sae, sft); merged into results.json",
    }
)
def bench(c: Context, quick: bool = False, only: str = "") -> None:
    """Run every benchmark -> benchmarks/results.json, and print the README's table."""
    args = ["python benchmarks/run_all.py"]
    if quick:
        args.append("--quick")
    if only:
        args.append(f"--only {shlex.quote(only)}")
    c.run(" ".join(args))


@task(
    help={
        "profile": "profile to drill (default smoke)",
        "seed": "seed of the kill points (default: random, printed)",
        "keep": "work in this folder and keep its repos and logs",
    }
)
def drill(c: Context, profile: str = "smoke", seed: int = -1, keep: str = "") -> None:
    """Fault drill: SIGKILL each long stage mid-run, rerun, compare with an uninterrupted run."""
    args = ["python tests/fault_drill.py", f"--profile {shlex.quote(profile)}"]
    if seed >= 0:
        args.append(f"--seed {int(seed)}")
    if keep:
        args.append(f"--keep {shlex.quote(keep)}")
    c.run(" ".join(args))


@task
def doctor(c: Context) -> None:
    """Check the machine: versions, CUDA, VRAM, bitsandbytes, DVC remotes, disk (one table)."""
    c.run("python -m nla_repro doctor")


@task(help={"pid": "process id of the stage (or shell) to kill with all its children"})
def kill(c: Context, pid: int) -> None:
    """Kill a process and all its children (taskkill /T on Windows, process group on POSIX)."""
    c.run(f"python -m nla_repro kill {int(pid)}")


@task(help={"tag": f"image tag (default {IMAGE})", "no_cache": "rebuild every layer"})
def docker_build(c: Context, tag: str = IMAGE, no_cache: bool = False) -> None:
    """Build the CUDA container from the Dockerfile (BuildKit: pip cache mounts)."""
    flags = " --no-cache" if no_cache else ""
    c.run(f"docker build{flags} -t {shlex.quote(tag)} .", env={"DOCKER_BUILDKIT": "1"})


@task(
    help={
        "args": 'what the container\'s invoke runs, e.g. "repro --profile gemma-4-e2b-v0.1.dd"',
        "tag": f"image tag (default {IMAGE})",
        "gpus": "docker --gpus value ('all', 'device=0'); empty: no GPU",
    }
)
def docker_run(c: Context, args: str = "--list", tag: str = IMAGE, gpus: str = "all") -> None:
    """Run invoke inside the CUDA container (checkout at /work, cache volumes, GPUs).

    The DVC and Hugging Face caches are named volumes; secrets pass through by name only.
    """
    from nla_repro.platform import docker_run_command

    cmd = docker_run_command(tag, shlex.split(args), Path("."), gpus=gpus)
    c.run(shlex.join(cmd), pty=True)


@task
def lock(c: Context) -> None:
    """Regenerate docker/requirements-gpu.txt, the container's hash-pinned lock (uv).

    Resolved from pyproject.toml with docker/gpu-pins.txt for Linux x86-64, Python 3.11.
    """
    c.run(LOCK_CMD)
