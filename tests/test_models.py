import re
from pathlib import Path

import pytest
import torch
import transformers
from conftest import VOCAB, save_model_dir, tiny_gemma4_conditional, tiny_llama

from nla_repro.errors import ConfigError
from nla_repro.models import (
    adapt,
    capture_layer,
    load_base,
    load_kwargs,
    position_ids_from_mask,
    residual_at_layer,
    resolve_device,
)


def test_adapter_finds_blocks_embeddings_and_norm(tiny_model):
    arch = adapt(tiny_model)
    name = type(tiny_model).__name__
    decoder = tiny_model.model.language_model if "Conditional" in name else tiny_model.model
    assert arch.layers is decoder.layers and arch.embed is decoder.embed_tokens
    assert arch.final_norm is decoder.norm
    assert (arch.n_layers, arch.d_model) == (4, 32)


def test_gemma4_embedding_scales_by_sqrt_d():
    # The AV injection (a later stage) relies on knowing that Gemma's embedding scales itself.
    arch = adapt(tiny_gemma4_conditional())
    ids = torch.tensor([[5, 6]])
    raw = arch.embed.weight[ids]
    torch.testing.assert_close(arch.embed(ids), raw * 32**0.5)


def test_adapter_sees_through_a_peft_wrapper():
    peft = pytest.importorskip("peft")
    model = tiny_llama()
    wrapped = peft.get_peft_model(model, peft.LoraConfig(r=2, target_modules=["q_proj"]))
    assert adapt(wrapped).layers is model.model.layers


def test_capture_without_stop_keeps_the_full_forward():
    model = tiny_llama()
    ids = torch.tensor([[5, 6, 7]])
    with capture_layer(model, 1, stop=False) as store, torch.no_grad():
        out = model(input_ids=ids, output_hidden_states=True)
    torch.testing.assert_close(store["hidden"], out.hidden_states[2])
    assert out.logits.shape == (1, 3, VOCAB)


def test_capture_hook_is_removed_afterwards():
    model = tiny_llama()
    residual_at_layer(model, torch.tensor([[5, 6]]), torch.ones(1, 2, dtype=torch.long), 1)
    assert all(not block._forward_hooks for block in adapt(model).layers)


def test_position_ids_ignore_left_padding():
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    assert position_ids_from_mask(mask).tolist() == [[0, 0, 0, 1, 2], [0, 1, 2, 3, 4]]


def test_resolve_device_and_nf4_device_map():
    assert resolve_device("cpu") == torch.device("cpu")
    if not torch.cuda.is_available():
        assert resolve_device("auto") == torch.device("cpu")
        with pytest.raises(ConfigError, match="no CUDA device"):
            resolve_device("cuda:0")
    kwargs = load_kwargs("nf4", "bfloat16", torch.device("cuda:1"))
    assert kwargs["device_map"] == {"": 1} and kwargs["dtype"] is torch.bfloat16
    q = kwargs["quantization_config"]
    assert (q.load_in_4bit, q.bnb_4bit_quant_type, q.bnb_4bit_use_double_quant) == (
        True,
        "nf4",
        True,
    )
    assert q.bnb_4bit_compute_dtype == torch.bfloat16
    assert load_kwargs("nf4", "float32", torch.device("cuda"))["device_map"] == {"": 0}
    assert "quantization_config" not in load_kwargs("none", "float32", torch.device("cpu"))


def test_nf4_base_loads_and_runs_on_cpu(tmp_path: Path):
    pytest.importorskip("bitsandbytes")
    # bitsandbytes' CPU kernels need in_features >= its 64-wide quantization block.
    save_model_dir(tiny_llama(n_layers=3, width=128), tmp_path)
    ids, mask = torch.tensor([[5, 6, 7, 8, 9]]), torch.ones(1, 5, dtype=torch.long)
    full, _ = load_base(tmp_path, "none", "float32", "cpu")
    nf4, _ = load_base(tmp_path, "nf4", "float32", "cpu")
    import bitsandbytes as bnb

    assert isinstance(nf4.model.layers[0].self_attn.q_proj, bnb.nn.Linear4bit)
    assert not any(p.requires_grad for p in nf4.parameters())
    h_full = residual_at_layer(full, ids, mask, 1)
    h_nf4 = residual_at_layer(nf4, ids, mask, 1)
    cos = torch.nn.functional.cosine_similarity(h_full, h_nf4, dim=-1)
    assert (cos > 0.95).all()  # close to full precision ...
    assert not torch.allclose(h_full, h_nf4, atol=1e-4)  # ... but really quantized


def test_gemma3_text_model_is_adapted_and_captured():
    torch.manual_seed(0)
    config = transformers.Gemma3TextConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=16,
        sliding_window=8,
    )
    model = transformers.Gemma3ForCausalLM(config).eval()
    arch = adapt(model)
    assert (arch.n_layers, arch.d_model) == (2, 32) and arch.layers is model.model.layers
    ids = torch.tensor([[3, 4, 5, 6]])
    with torch.no_grad():
        ref = model(input_ids=ids, output_hidden_states=True).hidden_states[1]
    torch.testing.assert_close(residual_at_layer(model, ids, torch.ones_like(ids), 0), ref)


def test_unknown_architecture_is_a_clear_error():
    class Odd(torch.nn.Module):
        config = tiny_llama().config

    with pytest.raises(ConfigError, match="architecture Odd: no decoder block list found"):
        adapt(Odd())


def test_pad_batch_pads_either_side_with_offsets_and_labels():
    from nla_repro.models import IGNORE, pad_batch

    right = pad_batch([[5, 6, 7], [8]], pad_id=0, labels=[[-1, 6, 7], [8]])
    assert right.ids_BT.tolist() == [[5, 6, 7], [8, 0, 0]]
    assert right.mask_BT.tolist() == [[1, 1, 1], [1, 0, 0]] and right.offsets == [0, 0]
    assert right.labels_BT.tolist() == [[-1, 6, 7], [8, IGNORE, IGNORE]]
    left = pad_batch([[5, 6, 7], [8]], pad_id=0, side="left")
    assert left.ids_BT.tolist() == [[5, 6, 7], [0, 0, 8]] and left.offsets == [0, 2]
    assert left.labels_BT is None
    with pytest.raises(ValueError, match="padding side"):
        pad_batch([[1]], 0, side="middle")


def test_render_chat_turns_thinking_off_only_where_the_template_knows_it(tokenizer):
    from nla_repro.models import render_chat

    plain = (
        "{% for m in messages %}<|{{ m.role }}|>{{ m.content }}\n{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>{% endif %}"
    )
    qwen3_like = plain.replace(
        "<|assistant|>{% endif %}",
        "<|assistant|>{% if enable_thinking is defined and not enable_thinking %}"
        "<think>\n\n</think>\n\n{% endif %}{% endif %}",
    )
    tokenizer.chat_template = plain
    assert render_chat(tokenizer, "hi") == "<|user|>hi\n<|assistant|>"
    tokenizer.chat_template = qwen3_like
    assert render_chat(tokenizer, "hi") == "<|user|>hi\n<|assistant|><think>\n\n</think>\n\n"


def test_chat_templates_and_padding_are_written_once():
    """One chat-rendering function and one padding helper (models.py) serve every stage."""
    src = Path(__file__).resolve().parents[1] / "src" / "nla_repro"
    hand_padding = re.compile(r"torch\.full\(\(len\([^)]*\),\s*width\)")
    for path in src.rglob("*.py"):
        text = path.read_text()
        if path.name != "models.py":
            assert "apply_chat_template(" not in text, path
            assert not hand_padding.search(text), path
