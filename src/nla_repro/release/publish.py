"""`release`: stage the AV, AR and SAE as Hub repos under dist/<version>/, then (with push)
upload each in one commit and tag that commit with the version.

Preflight refuses a release that would not match `dvc.lock`: a dirty git tree, stale `dvc
status`, missing metrics or cards, a malformed version, or a version tagged at another commit.
Staging is deterministic (no timestamps), so a re-run of the same version stages the same
bytes and `SHA256SUMS`; pushing compares those with the Hub tag's and never moves a tag.
The Hub token comes from HF_TOKEN (or the `huggingface-cli login`); it is never printed.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nla_repro import config as C
from nla_repro.build_record import build_tier
from nla_repro.errors import NlaError
from nla_repro.evaluation.registry import SOURCES, bar_rows
from nla_repro.io import atomic_path, sha256_file, write_text, write_yaml
from nla_repro.release import cards
from nla_repro.secrets import get_secret, redact

SUMS = "SHA256SUMS"
# What each released folder holds, from the model folders (checkpoints stay behind).
# The AV and AR curves: SFT's (train_curve, val_curve) and the rl stage's (rl_*).
NLA_CURVES = ("train_curve.csv", "val_curve.csv", "rl_train_curve.csv", "rl_val_curve.csv")
MODEL_FILES = {
    "av": ("adapter_config.json", "adapter_model.safetensors", *NLA_CURVES),
    "ar": ("adapter_config.json", "adapter_model.safetensors", "head.safetensors", *NLA_CURVES),
    "sae": ("cfg.json", "sae_weights.safetensors", "sparsity.safetensors", "train_curve.csv"),
}
# Every parquet the released models were built or measured from (their sha256 is recorded).
INPUT_PARQUETS = (C.CORPUS_PATH, C.LABELS_PATH, C.ACTIVATIONS_PATH, C.EVAL_ROWS)


class ReleaseError(NlaError):
    """The release cannot go ahead; the message says what to do."""


@dataclass
class StagedFile:
    path: str
    """Path inside the repo folder."""
    size: int
    sha256: str


@dataclass
class Plan:
    """What a release uploads: one Hub repo per model, and the files of each."""

    version: str
    commit: str
    private: bool
    repos: dict[str, str] = field(default_factory=dict)
    """kind -> repo id."""
    folders: dict[str, Path] = field(default_factory=dict)
    files: dict[str, list[StagedFile]] = field(default_factory=dict)
    missed_bars: list[str] = field(default_factory=list)
    """The NLA quality bars this build misses (name, value, bar), said before any upload."""
    verified: dict = field(default_factory=dict)
    """build_record.build_tier: the tier these outputs were built at, and why."""

    def describe(self) -> str:
        lines = [f"release {self.version} of commit {self.commit[:12]}:"]
        if self.verified:
            why = "; ".join(self.verified.get("reasons", [])[:3])
            lines.append(
                f"  built at the {self.verified['tier']} tier" + (f" ({why})" if why else "")
            )
        if self.missed_bars:
            lines.append(
                f"  WARNING: this build MISSES {len(self.missed_bars)} NLA quality bar(s); the "
                f"cards say so and the release record lists them:"
            )
            lines += [f"    - {bar}" for bar in self.missed_bars]
        for kind, repo in self.repos.items():
            files = self.files[kind]
            total = sum(f.size for f in files)
            visibility = "private" if self.private else "public"
            lines.append(
                f"  {repo} ({visibility}) <- {self.folders[kind]}: {len(files)} files, "
                f"{total / 1e6:.2f} MB"
            )
            lines += [f"    {f.path:<34} {f.size:>12,} B  sha256 {f.sha256[:16]}" for f in files]
        return "\n".join(lines)


def _git(root: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["git", *args], cwd=root, capture_output=True, text=True)


def preflight(version: str, root: Path | str = ".") -> str:
    """The HEAD commit, when the checkout can be released as `version`; else ReleaseError
    listing every problem and what to do about it."""
    root = Path(root)
    problems = []
    if not cards.VERSION_TAG.fullmatch(version):
        problems.append(f"version {version!r} is not of the form vMAJOR.MINOR.PATCH (v0.1.00)")
    head = _git(root, "rev-parse", "HEAD")
    if head.returncode != 0:
        raise ReleaseError(f"{root}: not a git repository with a commit (git rev-parse HEAD)")
    commit = head.stdout.strip()
    dirty = _git(root, "status", "--porcelain").stdout.splitlines()
    if dirty:
        shown = ", ".join(line[3:] for line in dirty[:5]) + (" ..." if len(dirty) > 5 else "")
        problems.append(
            f"git tree is not clean ({len(dirty)} changed or untracked: {shown}); commit or "
            "stash them, so the release names a commit that rebuilds it"
        )
    status = subprocess.run(["dvc", "status", "--json"], cwd=root, capture_output=True, text=True)
    if status.returncode != 0:
        problems.append(f"`dvc status` failed: {redact(status.stderr.strip()[-500:])}")
    else:
        stale = json.loads(status.stdout or "{}")
        if stale:
            problems.append(
                f"`dvc status` is not clean (stages {', '.join(sorted(stale))} differ from "
                "dvc.lock); run `dvc repro` (or `dvc pull` for cached outputs) and commit "
                "dvc.lock"
            )
    for path in [
        *SOURCES.values(),
        *(C.CARDS_DIR / k / "README.md" for k in cards.KINDS),
    ]:
        if not (root / path).exists():
            problems.append(f"{path} is missing; run `dvc repro` (the card stage writes cards/)")
    tagged = _git(root, "rev-list", "-n", "1", f"refs/tags/{version}")
    if tagged.returncode == 0 and tagged.stdout.strip() != commit:
        problems.append(
            f"{version} is already tagged at commit {tagged.stdout.strip()[:12]}, not HEAD; "
            "choose a new version (a tag is never moved)"
        )
    if problems:
        raise ReleaseError("release refused:\n" + "\n".join(f"  - {p}" for p in problems))
    return commit


def _release_meta(kind: str, sidecar: dict, repos: dict, record: dict, headline: dict) -> dict:
    return {
        **sidecar,
        "release": {
            "version": record["version"],
            "repo_id": repos[kind],
            "pair": {k: v for k, v in repos.items() if k != kind},
            **{k: v for k, v in record.items() if k != "version"},
            "headline": headline,
        },
    }


def stage(
    params: C.Params,
    version: str,
    commit: str,
    org: str,
    private: bool = True,
    root: Path | str = ".",
    dist: Path | str | None = None,
) -> Plan:
    """Write dist/<version>/{av,ar,sae}/ with weights, config, card, plots, nla_meta.yaml and
    SHA256SUMS; return the plan. The folder is rebuilt from scratch each time."""
    root = Path(root)
    inputs = cards.read_inputs(params, root)
    names = cards.repo_names(params, inputs.sidecars["av"]["base_model"])
    repos = {kind: f"{org}/{name}" for kind, name in names.items()}
    out = Path(dist) if dist is not None else root / C.DIST_DIR / version
    missed = [r for r in bar_rows(inputs.metrics) if r["met"] == "NO"]
    plan = Plan(version, commit, private, repos)
    plan.missed_bars = [f"{r['name']}: {r['value']} (bar {r['target']})" for r in missed]
    plan.verified = build_tier(params, root)
    # Hashed once for all three folders (the parquets can be large).
    record = {
        "version": version,
        "git_commit": commit,
        "quality_bars_missed": [r["key"] for r in missed],
        "reproducibility": plan.verified,
        "dvc_lock_sha256": sha256_file(root / "dvc.lock"),
        "inputs_sha256": {
            str(p): sha256_file(root / p) for p in INPUT_PARQUETS if (root / p).exists()
        },
    }
    with atomic_path(out) as tmp:
        cards.write_cards(inputs, tmp / "cards", org, version)
        for kind in cards.KINDS:
            folder = tmp / kind
            shutil.move(tmp / "cards" / kind, folder)
            model_dir = root / cards.MODEL_DIRS[kind]
            for name in MODEL_FILES[kind]:
                if not (model_dir / name).exists():
                    raise ReleaseError(f"{model_dir / name}: not found; run `dvc repro`")
                shutil.copyfile(model_dir / name, folder / name)
            if kind in ("av", "ar"):
                # Hub users load the adapter on the named base, not this machine's path.
                config = json.loads((folder / "adapter_config.json").read_text())
                config["base_model_name_or_path"] = inputs.sidecars[kind]["base_model"]
                write_text(
                    json.dumps(config, indent=2, sort_keys=True) + "\n",
                    folder / "adapter_config.json",
                )
            headline = cards.headline_values(kind, inputs.metrics)
            meta = _release_meta(kind, inputs.sidecars[kind], repos, record, headline)
            write_yaml(meta, folder / "nla_meta.yaml")
            files = sorted(p for p in folder.rglob("*") if p.is_file())
            staged = [
                StagedFile(p.relative_to(folder).as_posix(), p.stat().st_size, sha256_file(p))
                for p in files
            ]
            write_text("".join(f"{f.sha256}  {f.path}\n" for f in staged), folder / SUMS)
            sums = folder / SUMS
            staged.append(StagedFile(SUMS, sums.stat().st_size, sha256_file(sums)))
            plan.files[kind] = sorted(staged, key=lambda f: f.path)
            plan.folders[kind] = out / kind
        (tmp / "cards").rmdir()
    return plan


def hub_api(endpoint: str | None = None) -> Any:
    """HfApi with the token from HF_TOKEN, or the stored login when it is unset."""
    from huggingface_hub import HfApi

    token = get_secret("HF_TOKEN") or get_secret("HUGGING_FACE_HUB_TOKEN")
    return HfApi(endpoint=endpoint, token=token)


def _hub_call(what: str, fn: Callable, *args, **kwargs) -> Any:
    try:
        return fn(*args, **kwargs)
    except Exception as err:  # the Hub client raises many types; the message is what matters
        raise ReleaseError(f"{what} failed: {redact(f'{type(err).__name__}: {err}')}") from None


def push(plan: Plan, api: Any, log: Callable[[str], None] = print) -> dict[str, str]:
    """Create or reuse each repo, upload its folder in one commit and tag that commit with the
    version. A repo whose tag exists with the same SHA256SUMS is left alone; one whose tag
    holds other files is an error (tags are never moved). Returns kind -> tagged commit."""
    tagged = {}
    for kind, repo in plan.repos.items():
        folder = plan.folders[kind]
        _hub_call(
            f"create_repo {repo}",
            api.create_repo,
            repo,
            private=plan.private,
            repo_type="model",
            exist_ok=True,
        )
        refs = _hub_call(f"list_repo_refs {repo}", api.list_repo_refs, repo, repo_type="model")
        existing = {t.name: t.target_commit for t in refs.tags}
        if plan.version in existing:
            remote = _hub_call(
                f"download {repo}@{plan.version}/{SUMS}",
                api.hf_hub_download,
                repo_id=repo,
                filename=SUMS,
                revision=plan.version,
                repo_type="model",
            )
            if Path(remote).read_text() != (folder / SUMS).read_text():
                raise ReleaseError(
                    f"{repo} already has tag {plan.version} with different files (its {SUMS} "
                    f"differs from {folder / SUMS}); release a new version instead"
                )
            log(f"{repo}: {plan.version} already released with these files; nothing to do")
            tagged[kind] = existing[plan.version]
            continue
        info = _hub_call(
            f"upload_folder {repo}",
            api.upload_folder,
            repo_id=repo,
            folder_path=str(folder),
            repo_type="model",
            commit_message=f"nla-repro {plan.version} ({plan.commit[:12]})",
        )
        _hub_call(
            f"create_tag {repo}",
            api.create_tag,
            repo,
            tag=plan.version,
            revision=info.oid,
            repo_type="model",
            tag_message=f"nla-repro {plan.version} from commit {plan.commit}",
        )
        log(
            f"{repo}: uploaded {len(plan.files[kind])} files in commit {info.oid[:12]}, "
            f"tagged {plan.version}"
        )
        tagged[kind] = info.oid
    return tagged


def release(
    params: C.Params,
    version: str,
    org: str | None = None,
    do_push: bool = False,
    private: bool = True,
    root: Path | str = ".",
    api: Any = None,
    log: Callable[[str], None] = print,
) -> Plan:
    """Preflight, stage, print the plan; with do_push upload, tag on the Hub and tag git."""
    root = Path(root)
    org = params.card.org if org is None else org
    C.check_hub_name(org, "--org", "Hub user/org name")
    commit = preflight(version, root)
    plan = stage(params, version, commit, org, private, root)
    log(plan.describe())
    if not do_push:
        log("dry run: nothing was uploaded; add --push to create the repos and upload")
        return plan
    push(plan, api if api is not None else hub_api(), log)
    if _git(root, "rev-parse", "-q", "--verify", f"refs/tags/{version}").returncode != 0:
        message = f"nla-repro release {version}: " + ", ".join(plan.repos.values())
        tag = _git(root, "tag", "-a", version, "-m", message)
        if tag.returncode != 0:  # e.g. no git identity configured: a lightweight tag needs none
            tag = _git(root, "tag", version)
        if tag.returncode != 0:
            raise ReleaseError(f"git tag {version} failed: {tag.stderr.strip()}")
        log(f"git tag {version} -> {commit[:12]} (push it: git push origin {version})")
    return plan
