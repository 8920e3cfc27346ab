"""Shared fixtures: tiny random models (Llama, Gemma4 with per-layer embeddings) and a tiny
byte-level BPE tokenizer, all built offline, plus a tiny model directory in the layout the
base stage writes."""

from __future__ import annotations

import os
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


def tiny_gemma4_text_config(n_layers: int = 4) -> transformers.Gemma4TextConfig:
    return transformers.Gemma4TextConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=n_layers,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=16,
        global_head_dim=16,
        hidden_size_per_layer_input=8,  # E-model per-layer embeddings on
        vocab_size_per_layer_input=VOCAB,
        layer_types=["sliding_attention", "full_attention"] * (n_layers // 2),
        sliding_window=8,
        max_position_embeddings=256,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )


def tiny_gemma4_causal(n_layers: int = 4, seed: int = 0) -> transformers.Gemma4ForCausalLM:
    torch.manual_seed(seed)
    return transformers.Gemma4ForCausalLM(tiny_gemma4_text_config(n_layers)).eval()


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
