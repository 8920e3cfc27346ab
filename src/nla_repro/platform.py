"""Everything platform-specific, in one place (Windows workarounds included)."""

from __future__ import annotations

import contextlib
import os
import platform as _platform
import shutil
import signal
import subprocess
from pathlib import Path

from nla_repro.errors import NlaError, SourceError
from nla_repro.secrets import SECRET_ENV_VARS


def peak_rss_mb() -> float | None:
    """Peak resident memory of this process so far, in MiB (ru_maxrss is KiB on Linux, bytes on
    macOS; Windows has no resource module: None)."""
    try:
        import resource
    except ImportError:
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return round(peak / 2**20 if _platform.system() == "Darwin" else peak / 1024, 1)


def resolve_cli(name: str) -> str:
    """Full path of a command-line tool found on PATH.

    shutil.which applies PATHEXT on Windows, so npm-installed tools such as `gemini` resolve to
    their `gemini.CMD` shim; calling the bare name through subprocess would not find it there.
    """
    path = shutil.which(name)
    if path is None:
        raise SourceError(f"command {name!r} not found on PATH")
    return path


def system_name(system: str | None = None) -> str:
    """ "Windows", "Linux" or "Darwin" (or the `system` a test simulates)."""
    return system or _platform.system()


def long_run_env(base: dict | None = None, system: str | None = None) -> dict:
    """Environment for long runs: output unbuffered (progress reaches logs and DVC as it
    happens); on Windows, tolerate the second OpenMP runtime that torch and numpy/MKL both load
    (`KMP_DUPLICATE_LIB_OK`, else the process aborts) and silence the Hub's symlink warning
    (Windows without developer mode cannot make symlinks; the Hub copies instead)."""
    env = dict(os.environ if base is None else base)
    env["PYTHONUNBUFFERED"] = "1"
    if system_name(system) == "Windows":
        env["KMP_DUPLICATE_LIB_OK"] = "TRUE"
        env["HF_HUB_DISABLE_SYMLINKS_WARNING"] = "1"
    return env


def dvc_cache_type(system: str | None = None) -> str | None:
    """DVC cache link type to configure: `copy` on Windows, where DVC's default reflink/
    hardlink/symlink attempts fail or need admin rights; None keeps DVC's default."""
    return "copy" if system_name(system) == "Windows" else None


def kill_tree_command(pid: int, system: str | None = None) -> tuple[list[str], dict] | None:
    """On Windows, the command that kills a process and all its children, and the environment
    to run it in: `taskkill /F /T /PID n` with MSYS_NO_PATHCONV=1, because Git Bash would
    otherwise rewrite `/F` and `/T` into Windows paths. None on POSIX (process groups)."""
    if system_name(system) != "Windows":
        return None
    return [resolve_cli("taskkill"), "/F", "/T", "/PID", str(pid)], long_run_env(
        {**os.environ, "MSYS_NO_PATHCONV": "1"}, "Windows"
    )


def kill_tree(pid: int, system: str | None = None, run=subprocess.run) -> list[int]:
    """Kill a process and every process below it (a DVC stage and the workers it spawned).
    Returns the pids signalled. POSIX: the whole process group when `pid` leads one, else the
    process and its descendants found through psutil."""
    windows = kill_tree_command(pid, system)
    if windows is not None:
        cmd, env = windows
        done = run(cmd, env=env, capture_output=True, text=True)
        if done.returncode != 0:
            raise SourceError(f"taskkill could not kill {pid}: {done.stderr.strip()}")
        return [pid]
    import psutil

    try:
        proc = psutil.Process(pid)
    except psutil.NoSuchProcess:
        raise SourceError(f"no process with pid {pid}") from None
    if os.getpgid(pid) == pid:
        members = [p for p in psutil.process_iter() if _pgid(p) == pid]
        os.killpg(pid, signal.SIGKILL)
        return sorted(p.pid for p in members)
    victims = [*proc.children(recursive=True), proc]
    for p in victims:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.kill()
    return sorted(p.pid for p in victims)


def _pgid(proc) -> int | None:
    try:
        return os.getpgid(proc.pid)
    except (ProcessLookupError, PermissionError):
        return None


def docker_run_command(
    image: str, args: list[str], workdir: Path, gpus: str = "all", system: str | None = None
) -> list[str]:
    """`docker run` for the CUDA container: the checkout mounted at /work, named volumes for
    the DVC and Hugging Face caches, GPUs, and secrets passed by name (their values stay in the
    caller's environment, never on the command line)."""
    mount = str(workdir.resolve())
    if system_name(system) == "Windows":
        mount = mount.replace("\\", "/")  # Docker Desktop takes C:/path
    cmd = [resolve_cli("docker"), "run", "--rm", "-it"]
    if gpus:
        cmd += ["--gpus", gpus]
    cmd += [
        "-v",
        f"{mount}:/work",
        "-v",
        "nla-dvc-cache:/cache/dvc",
        "-v",
        "nla-hf-cache:/cache/huggingface",
        "-e",
        "PYTHONUNBUFFERED=1",
    ]
    for name in SECRET_ENV_VARS:
        cmd += ["-e", name]  # by name: docker copies the value from this environment, if set
    return [*cmd, image, *args]


def _version(module: str) -> str:
    try:
        from importlib.metadata import version

        return version(module)
    except Exception:
        return "not installed"


def remote_check(name: str, url: str, dvc_dir: Path) -> tuple[str, str]:
    """(value, status) of one DVC remote: a local directory must exist or be creatable, an
    HTTP(S) remote must answer, an S3 remote needs the dvc-s3 plugin (`.[s3]`)."""
    if url.startswith(("http://", "https://")):
        import urllib.request

        try:
            urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=5)
            return f"{name}: {url} answers", "ok"
        except Exception as err:
            return f"{name}: {url} unreachable ({type(err).__name__})", "warn"
    if url.startswith("s3://"):
        ok = _version("dvc-s3") != "not installed"
        return f"{name}: {url}", "ok" if ok else "warn: pip install -e '.[s3]'"
    if "://" in url:
        return f"{name}: {url} (not checked)", "ok"
    path = (dvc_dir / url).resolve() if not Path(url).is_absolute() else Path(url)
    if path.is_dir():
        return f"{name}: {path}", "ok" if os.access(path, os.W_OK) else "warn: not writable"
    parent = next((p for p in path.parents if p.exists()), None)
    creatable = parent is not None and os.access(parent, os.W_OK)
    return f"{name}: {path} (created on first push)", "ok" if creatable else "fail"


def doctor_rows(repo: Path = Path(".")) -> list[tuple[str, str, str]]:
    """(check, value, status) rows: versions, CUDA and VRAM, bitsandbytes backend, DVC remotes,
    free disk. Status is ok, warn: <what to do>, or fail."""
    import sys

    import torch

    rows = [
        ("platform", f"{_platform.system()} {_platform.release()} ({_platform.machine()})", "ok"),
        ("python", sys.version.split()[0], "ok" if sys.version_info >= (3, 11) else "fail"),
    ]
    for pkg in ("torch", "transformers", "peft", "accelerate", "bitsandbytes", "dvc", "invoke"):
        value = _version(pkg)
        rows.append((pkg, value, "fail" if value == "not installed" else "ok"))
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(i)
            vram = f"{props.total_memory / 2**30:.1f} GiB"
            rows.append((f"cuda:{i}", f"{props.name}, {vram}, CUDA {torch.version.cuda}", "ok"))
    else:
        rows.append(("cuda", "not available (CPU build or no driver)", "warn: CPU only"))
    rows.append(_bitsandbytes_row(torch))
    dvc_dir = repo / ".dvc"
    remotes = _dvc_remotes(dvc_dir)
    if not remotes:
        rows.append(("dvc remote", "none configured", "warn: dvc remote add -d NAME URL"))
    for name, url in remotes:
        value, status = remote_check(name, url, dvc_dir)
        rows.append(("dvc remote", value, status))
    free = shutil.disk_usage(repo.resolve()).free / 2**30
    rows.append(("free disk", f"{free:.1f} GiB at {repo.resolve()}", "ok" if free > 10 else "warn"))
    return rows


def _bitsandbytes_row(torch) -> tuple[str, str, str]:
    try:
        import bitsandbytes.functional as bnbf

        device = "cuda" if torch.cuda.is_available() else "cpu"
        bnbf.quantize_4bit(torch.randn(64, 64, device=device), quant_type="nf4")
        return ("bitsandbytes backend", f"{device}: nf4 quantization works", "ok")
    except Exception as err:
        return ("bitsandbytes backend", f"nf4 failed ({type(err).__name__})", "warn")


def _dvc_remotes(dvc_dir: Path) -> list[tuple[str, str]]:
    """(name, url) of the remotes in .dvc/config and .dvc/config.local (local wins)."""
    import configparser

    found: dict[str, str] = {}
    for file in (dvc_dir / "config", dvc_dir / "config.local"):
        cfg = configparser.ConfigParser()
        cfg.read(file)
        for section in cfg.sections():
            if section.startswith("'remote \"") and "url" in cfg[section]:
                found[section.split('"')[1]] = cfg[section]["url"]
    return sorted(found.items())


def format_table(rows: list[tuple]) -> str:
    """Rows of cells as aligned plain-text columns (the first row is usually the header)."""
    cells = [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(cells[0]) - 1)]
    return "\n".join(
        "  ".join([*(c.ljust(w) for c, w in zip(r, widths, strict=False)), r[-1]]).rstrip()
        for r in cells
    )


def configure_commands(system: str | None = None) -> list[list[str]]:
    """Commands that set this platform's repository settings (run by `invoke setup`)."""
    cache_type = dvc_cache_type(system)
    if cache_type is None:
        return []
    return [[resolve_cli("dvc"), "config", "--local", "cache.type", cache_type]]


# --- One live process per stage --------------------------------------------------------------

LOCK_DIR = Path(".nla_work/locks")
"""Where a running stage records that it owns its outputs (one JSON file per stage)."""
SHELLS = frozenset({"sh", "bash", "dash", "zsh"})
"""Parents that only run the stage command (DVC's `sh -c`): the stage watches their parent too."""


class StageBusyError(NlaError):
    """Another live process is running the same stage and writing its outputs."""


class StageInterrupted(NlaError):
    """The stage got SIGTERM (a kill, or its parent went away) and stopped before finishing."""


def _process_start(pid: int) -> float | None:
    import psutil

    try:
        return psutil.Process(pid).create_time()
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return None


def _owner_alive(owner: dict) -> bool:
    """Whether the process a lock names still runs (same pid and start time, so a reused pid
    is not mistaken for it). A lock from another host is taken as alive: it cannot be checked."""
    if owner.get("host") != _platform.node():
        return True
    started = _process_start(int(owner.get("pid", -1)))
    return started is not None and abs(started - float(owner.get("started", 0))) < 1.0


@contextlib.contextmanager
def stage_lock(stage: str, lock_dir: Path = LOCK_DIR):
    """Hold `lock_dir/<stage>.lock` while the stage runs. A live owner makes this raise
    StageBusyError naming its pid (a second trainer would write the same outputs); a lock whose
    process is gone (killed with SIGKILL, machine rebooted) is reported and taken over."""
    import json
    import logging
    import sys
    import time

    lock_dir.mkdir(parents=True, exist_ok=True)
    path = lock_dir / f"{stage}.lock"
    me = {
        "pid": os.getpid(),
        "started": _process_start(os.getpid()),
        "host": _platform.node(),
        "argv": sys.argv,
        "since_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    for _ in range(3):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            try:
                owner = json.loads(path.read_text() or "{}")
            except (OSError, ValueError):
                owner = {}  # half-written by a process killed at that instant: stale
            if owner and _owner_alive(owner):
                pid = owner.get("pid")
                raise StageBusyError(
                    f"stage {stage} is already running: process {pid} on {owner.get('host')} "
                    f"(since {owner.get('since_utc')}, {' '.join(owner.get('argv', []))}) holds "
                    f"{path} and writes this stage's outputs. Wait for it, or stop it with "
                    f"`python -m nla_repro kill {pid}` and run again."
                ) from None
            logging.getLogger("nla_repro").warning(
                "%s: process %s is gone (killed?); taking over its stale lock",
                path,
                owner.get("pid", "?"),
            )
            path.unlink(missing_ok=True)
            continue
        with os.fdopen(fd, "w") as f:
            json.dump(me, f)
        break
    else:
        raise StageBusyError(f"{path}: could not take the lock (another process keeps taking it)")
    try:
        yield path
    finally:
        with contextlib.suppress(OSError, ValueError):
            if json.loads(path.read_text()).get("pid") == os.getpid():
                path.unlink()


def raise_on_sigterm() -> None:
    """Turn SIGTERM into StageInterrupted in the main thread, so a killed stage unwinds like an
    error: temporary outputs are removed, checkpoints stay for the resume, and the CLI exits
    non-zero with one line instead of dying mid-write."""

    def handler(signum, frame):
        raise StageInterrupted(
            "stopped by SIGTERM (killed, or the process that started it ended); finished "
            "outputs are untouched and a rerun resumes from the last checkpoint"
        )

    signal.signal(signal.SIGTERM, handler)


def watched_parents() -> list:
    """The processes whose end should end this stage: the parent and, when the parent is only
    a shell running the command (DVC runs `sh -c`), the shell's parent too."""
    import psutil

    chain, proc = [], psutil.Process(os.getpid())
    for _ in range(2):
        proc = proc.parent()
        if proc is None or proc.pid <= 1:
            break
        chain.append(proc)
        if proc.name() not in SHELLS:
            break
    return chain


def exit_with_parent(interval_s: float = 2.0) -> bool:
    """When this stage runs under DVC (DVC_STAGE set) or NLA_EXIT_WITH_PARENT=1, watch its
    parent in a daemon thread and SIGTERM this process once the parent is gone: killing
    `dvc repro` with SIGKILL must not leave a trainer running, re-parented to init. Returns
    whether it watches (a stage started by hand under nohup keeps running)."""
    import threading

    if not (os.environ.get("DVC_STAGE") or os.environ.get("NLA_EXIT_WITH_PARENT") == "1"):
        return False
    if _platform.system() == "Windows":
        return False  # no SIGTERM delivery to self; the Job Object of `kill` covers Windows
    parents = watched_parents()
    if not parents:
        return False

    import psutil

    def alive(proc) -> bool:
        try:  # a killed parent stays a zombie until its own parent reaps it
            return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            return False

    def watch() -> None:
        import time

        while all(alive(p) for p in parents):
            time.sleep(interval_s)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch, name="exit-with-parent", daemon=True).start()
    return True
