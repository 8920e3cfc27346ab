"""`release`: preflight refusals, the staged folders and their plan, the Hub boundary (faked),
idempotent re-runs, and the token never shown."""

import hashlib
import json
import os
import shutil
import subprocess
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml
from conftest import files_under, listed_files, write_finished_pipeline
from invoke import MockContext, Result

import tasks
from nla_repro import config as C
from nla_repro.__main__ import main
from nla_repro.release import cards
from nla_repro.release import publish as release
from nla_repro.stages import card as card_stage

SENTINEL = "hf_SENTINELtoken0123456789"
COPY_STAGE = {
    "stages": {
        "copy": {
            "cmd": "python -c \"import shutil; shutil.copy('in.txt', 'out.txt')\"",
            "deps": ["in.txt"],
            "outs": [{"out.txt": {"cache": False}}],
        }
    }
}


def sh(root: Path, *cmd: str) -> str:
    env = os.environ | {"DVC_NO_ANALYTICS": "1"}
    proc = subprocess.run(cmd, cwd=root, capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout


def commit(root: Path, message: str) -> None:
    sh(root, "git", "add", "-A")
    sh(root, "git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", message)


@pytest.fixture(scope="module")
def template_repo(tmp_path_factory):
    """A committed git + DVC repo holding a finished pipeline and a clean `dvc status`."""
    root = tmp_path_factory.mktemp("template") / "repo"
    root.mkdir()
    write_finished_pipeline(root)
    cwd = Path.cwd()
    os.chdir(root)
    try:
        card_stage.run(C.Params())
    finally:
        os.chdir(cwd)
    sh(root, "git", "init", "-q")
    sh(root, "dvc", "init", "-q")
    (root / "dvc.yaml").write_text(yaml.safe_dump(COPY_STAGE))
    (root / "in.txt").write_text("one\n")
    (root / "params.yaml").write_text(C.dump_params(C.Params()))
    (root / ".gitignore").write_text("/dist/\n")
    sh(root, "dvc", "repro", "-q")
    commit(root, "pipeline")
    return root


@pytest.fixture
def repo(template_repo, tmp_path, monkeypatch):
    root = tmp_path / "repo"
    shutil.copytree(template_repo, root, symlinks=True)
    monkeypatch.setenv("HF_TOKEN", SENTINEL)
    return root


def head(root: Path) -> str:
    return sh(root, "git", "rev-parse", "HEAD").strip()


class FakeHub:
    """The HfApi calls a release makes, in memory: repos, commits by oid, tags."""

    def __init__(self, tmp: Path, fail_upload: str | None = None):
        self.tmp, self.fail_upload = tmp, fail_upload
        self.calls: list[tuple] = []
        self.commits: dict[str, dict[str, bytes]] = {}
        self.tags: dict[str, dict[str, str]] = {}

    def create_repo(self, repo_id, private=None, repo_type=None, exist_ok=False):
        self.calls.append(("create_repo", repo_id, private, exist_ok))
        self.tags.setdefault(repo_id, {})

    def list_repo_refs(self, repo_id, repo_type=None):
        tags = [SimpleNamespace(name=t, target_commit=o) for t, o in self.tags[repo_id].items()]
        return SimpleNamespace(tags=tags)

    def upload_folder(self, repo_id, folder_path, repo_type=None, commit_message=None):
        if self.fail_upload:
            raise RuntimeError(self.fail_upload)
        files = {p: (Path(folder_path) / p).read_bytes() for p in files_under(Path(folder_path))}
        oid = hashlib.sha1(repr(sorted(files.items())).encode()).hexdigest()
        self.commits[oid] = files
        self.calls.append(("upload_folder", repo_id, oid))
        return SimpleNamespace(oid=oid, commit_url=f"https://hub/{repo_id}/commit/{oid}")

    def create_tag(self, repo_id, tag, revision=None, repo_type=None, tag_message=None):
        assert tag not in self.tags[repo_id], "a tag is never moved"
        self.tags[repo_id][tag] = revision
        self.calls.append(("create_tag", repo_id, tag, revision))

    def hf_hub_download(self, repo_id, filename, revision=None, repo_type=None):
        out = self.tmp / f"dl-{len(self.calls)}-{filename}"
        out.write_bytes(self.commits[self.tags[repo_id][revision]][filename])
        return str(out)


def test_dry_run_stages_exactly_the_files_it_lists(repo):
    lines: list[str] = []
    plan = release.release(C.Params(), "v0.1.00", org="me", root=repo, log=lines.append)
    output = "\n".join(lines)
    assert "dry run: nothing was uploaded" in output
    dist = repo / "dist/v0.1.00"
    listed = listed_files(output)
    assert set(listed) == {f"me/nla-smollm2-135m-instruct-l20-{k}" for k in cards.KINDS}
    for kind in cards.KINDS:
        assert listed[plan.repos[kind]] == files_under(dist / kind), kind
    assert files_under(dist / "ar") == {
        "README.md",
        "SHA256SUMS",
        "adapter_config.json",
        "adapter_model.safetensors",
        "head.safetensors",
        "nla_meta.yaml",
        "train_curve.csv",
        "val_curve.csv",
        "rl_train_curve.csv",
        "rl_val_curve.csv",
        "plots/ablation.png",
        "plots/identity.png",
        "plots/round_trip.png",
    }
    assert "cfg.json" in files_under(dist / "sae") and "checkpoints" not in output
    # SHA256SUMS covers every other file, with the right digests.
    for kind in cards.KINDS:
        sums = dict(
            reversed(line.split("  "))
            for line in (dist / kind / "SHA256SUMS").read_text().split("\n")[:-1]
        )
        assert set(sums) == files_under(dist / kind) - {"SHA256SUMS"}
        for path, digest in sums.items():
            assert hashlib.sha256((dist / kind / path).read_bytes()).hexdigest() == digest
    meta = yaml.safe_load((dist / "av/nla_meta.yaml").read_text())
    assert meta["release"]["version"] == "v0.1.00" and meta["release"]["git_commit"] == head(repo)
    assert meta["av"]["marker_token_id"] == 1234  # the sidecar travels with the release
    # The tier its numbers were built at (this fake checkout has no build record: unknown).
    assert meta["release"]["reproducibility"]["tier"] == "unknown"
    assert "built at the unknown tier" in output
    parquets = meta["release"]["inputs_sha256"]
    assert set(parquets) == {str(p) for p in release.INPUT_PARQUETS}
    for path, digest in parquets.items():
        assert hashlib.sha256((repo / path).read_bytes()).hexdigest() == digest
    ev = json.loads((repo / C.EVAL_METRICS).read_text())
    assert meta["release"]["headline"]["vector_use_gap"] == ev["vector_use"]["gap"]
    adapter = json.loads((dist / "av/adapter_config.json").read_text())
    assert adapter["base_model_name_or_path"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    card = (dist / "av/README.md").read_text()
    assert 'snapshot_download("me/nla-smollm2-135m-instruct-l20-av")' in card
    assert "release v0.1.00" in card
    assert "v0.1.00" not in sh(repo, "git", "tag")  # a dry run tags nothing
    # Staging is deterministic: a second dry run writes the same bytes.
    before = (dist / "sae/SHA256SUMS").read_text()
    release.release(C.Params(), "v0.1.00", org="me", root=repo, log=lambda _: None)
    assert (dist / "sae/SHA256SUMS").read_text() == before


def test_push_uploads_each_folder_once_and_tags_the_upload_commit(repo, tmp_path):
    hub = FakeHub(tmp_path)
    lines: list[str] = []
    plan = release.release(
        C.Params(), "v0.1.00", org="me", do_push=True, root=repo, api=hub, log=lines.append
    )
    uploads = {c[1]: c[2] for c in hub.calls if c[0] == "upload_folder"}
    tags = {c[1]: (c[2], c[3]) for c in hub.calls if c[0] == "create_tag"}
    assert set(uploads) == set(plan.repos.values()) == set(tags)
    for repo_id, oid in uploads.items():
        assert tags[repo_id] == ("v0.1.00", oid)
        assert set(hub.commits[oid]) == files_under(plan.folders[repo_id.rsplit("-", 1)[1]])
    creates = [c for c in hub.calls if c[0] == "create_repo"]
    assert len(creates) == 3 and all(c[2] is True and c[3] is True for c in creates)
    assert sh(repo, "git", "tag").split() == ["v0.1.00"]
    # Same version again: the tag is at HEAD and the Hub holds the same files: nothing moves.
    before = len(hub.calls)
    again: list[str] = []
    release.release(
        C.Params(), "v0.1.00", org="me", do_push=True, root=repo, api=hub, log=again.append
    )
    new = [c[0] for c in hub.calls[before:]]
    assert "upload_folder" not in new and "create_tag" not in new
    assert sum("already released with these files" in line for line in again) == 3


def test_push_never_moves_a_tag_that_holds_other_files(repo, tmp_path):
    hub = FakeHub(tmp_path)
    release.release(C.Params(), "v0.1.00", org="me", do_push=True, root=repo, api=hub)
    sh(repo, "git", "tag", "-d", "v0.1.00")
    (repo / "in.txt").write_text("two\n")
    sh(repo, "dvc", "repro", "-q")
    commit(repo, "new inputs")  # a new commit: the staged nla_meta.yaml names it
    before = len(hub.calls)
    with pytest.raises(
        release.ReleaseError, match=r"already has tag v0\.1\.00 with different files"
    ):
        release.release(C.Params(), "v0.1.00", org="me", do_push=True, root=repo, api=hub)
    assert not [c for c in hub.calls[before:] if c[0] in ("upload_folder", "create_tag")]


def test_preflight_refuses_with_what_to_do(repo):
    with pytest.raises(release.ReleaseError, match=r"not of the form vMAJOR\.MINOR\.PATCH"):
        release.preflight("0.1", repo)
    (repo / "notes.txt").write_text("scratch")
    with pytest.raises(release.ReleaseError, match=r"git tree is not clean .*notes\.txt.*commit"):
        release.preflight("v0.1.00", repo)
    (repo / "notes.txt").unlink()
    (repo / "in.txt").write_text("changed\n")
    commit(repo, "input changed, not reproduced")
    with pytest.raises(
        release.ReleaseError, match=r"`dvc status` is not clean \(stages copy.*dvc repro"
    ):
        release.preflight("v0.1.00", repo)
    sh(repo, "dvc", "repro", "-q")
    commit(repo, "reproduced")
    assert release.preflight("v0.1.00", repo) == head(repo)
    shutil.rmtree(repo / "cards/sae")
    commit(repo, "lost a card")
    with pytest.raises(release.ReleaseError, match=r"cards/sae/README\.md is missing"):
        release.preflight("v0.1.00", repo)
    sh(repo, "git", "tag", "v0.1.01", "HEAD~1")
    with pytest.raises(release.ReleaseError, match=r"v0\.1\.01 is already tagged at commit"):
        release.preflight("v0.1.01", repo)
    assert not (repo / "dist").exists()


def test_the_token_never_appears_in_output_errors_or_staged_files(
    repo, tmp_path, monkeypatch, capsys
):
    monkeypatch.chdir(repo)
    assert main(["release", "--version", "v0.1.00", "--org", "me"]) == 0
    assert release.hub_api().token == SENTINEL  # used, from the environment
    leaky = FakeHub(tmp_path, fail_upload=f"401 Unauthorized: token {SENTINEL} rejected")
    monkeypatch.setattr(release, "hub_api", lambda endpoint=None: leaky)
    assert main(["release", "--version", "v0.1.00", "--org", "me", "--push"]) == 2
    out = capsys.readouterr()
    assert "upload_folder me/nla-smollm2-135m-instruct-l20-av failed" in out.err
    assert "token *** rejected" in out.err
    assert SENTINEL not in out.out + out.err
    for path in (repo / "dist").rglob("*"):
        if path.is_file():
            assert SENTINEL.encode() not in path.read_bytes(), path


def test_release_task_calls_the_cli_with_its_flags():
    cmd = "python -m nla_repro release --version v0.1.00 --org me --push --public"
    ctx = MockContext(
        run={cmd: Result(), "python -m nla_repro release --version v0.1.00": Result()}
    )
    tasks.release(ctx, version="v0.1.00", push=True, org="me", public=True)
    tasks.release(ctx, version="v0.1.00")
    assert ctx.run.call_count == 2
