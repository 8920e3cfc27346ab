"""AV injection, prefix AV, AR and the training pairs, on tiny random models."""

from __future__ import annotations

import numpy as np
import pandas as pd
import peft
import pytest
import torch
from conftest import TINY_MODELS, tiny_llama, tiny_tokenizer
from torch import nn

from nla_repro import config as C
from nla_repro.errors import DataValidationError
from nla_repro.metrics import mse_nrm
from nla_repro.models import adapt, residual_at_layer
from nla_repro.nla import (
    ActivationVerbalizer,
    InjectionError,
    PrefixVerbalizer,
    build_ar,
    choose_marker,
    injection_vectors,
    lora,
    mean_embedding_norm,
    training_pairs,
)
from nla_repro.nla.adapters import FusedLoraLinear, LoraDropout, stock_peft_layers, use_fast_lora
from nla_repro.templates import load_template

TEXTS = ["a flood in a river town", "code that adds two numbers", "the fox jumps", "bees and sun"]


def make_av(model=None, scale=None, **cfg) -> ActivationVerbalizer:
    model = model if model is not None else tiny_llama()
    av_cfg = C.AVConfig(**{"lora_r": 4, "lora_alpha": 8, "lora_dropout": 0.0, **cfg})
    return ActivationVerbalizer(
        lora(model, av_cfg, av_cfg.unfreeze_norms),
        tiny_tokenizer(),
        load_template("av.v1"),
        scale,
        64,
    )


def vectors(n: int, d: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed)) * 5


def test_marker_is_one_token_between_stable_neighbours():
    tok = tiny_tokenizer()
    template = load_template("av.v1")
    marker = choose_marker(tok, template)
    ids = tok(template.render(marker=marker.char))["input_ids"]
    assert ids.count(marker.token_id) == 1 and ids[marker.position] == marker.token_id
    assert tok.decode([marker.token_id]) == marker.char
    # The tokens around the marker are the same whatever the marker is.
    other = tok(template.render(marker="#"))["input_ids"]
    assert len(other) == len(ids)
    assert [i for i, (a, b) in enumerate(zip(ids, other, strict=True)) if a != b] == [
        marker.position
    ]


@pytest.mark.parametrize("name", sorted(TINY_MODELS))
def test_injected_vector_changes_the_output_distribution(name):
    av = make_av(TINY_MODELS[name]())
    av.eval()
    d = adapt(av.model).d_model
    texts = TEXTS[:2]
    with torch.no_grad():
        real, _ = av.row_nll(texts, vectors(2, d, 0))
        zero, _ = av.row_nll(texts, torch.zeros(2, d) + 1e-3)
        rand, _ = av.row_nll(texts, vectors(2, d, 1))
        again, _ = av.row_nll(texts, vectors(2, d, 0))
    assert not torch.allclose(real, zero) and not torch.allclose(real, rand)
    torch.testing.assert_close(real, again)


def test_injection_writes_the_scaled_vector_at_the_marker_only():
    av = make_av(scale=7.0)
    embed = adapt(av.model).embed
    seen = {}
    handle = embed.register_forward_hook(lambda m, a, out: seen.setdefault("out", out))
    ids = torch.tensor([av.prompt_ids])
    v = vectors(1, 32)
    av.injector.arm(injection_vectors(v, 7.0))
    # Hooks run in registration order: the injector's output is what later hooks see.
    av.injector.handle.remove()
    av.injector.handle = embed.register_forward_hook(av.injector._hook, with_kwargs=True)
    handle.remove()
    out = embed(ids)
    pos = av.marker.position
    torch.testing.assert_close(out[0, pos].norm(), torch.tensor(7.0))
    torch.testing.assert_close(out[0, pos] / 7.0, v[0] / v[0].norm())
    plain = embed.weight[ids[0]]
    keep = [i for i in range(ids.shape[1]) if i != pos]
    torch.testing.assert_close(out[0, keep], plain[keep])


def test_hook_raises_on_missing_or_duplicated_marker_and_passes_decode_steps():
    av = make_av()
    m = av.marker.token_id
    embed = adapt(av.model).embed
    prompt = torch.tensor([av.prompt_ids])
    av.injector.arm(vectors(1, 32))
    with pytest.raises(InjectionError, match="0 marker"):
        embed(torch.tensor([[5, 6, 7]]))
    av.injector.arm(vectors(1, 32))
    with pytest.raises(InjectionError, match="2 marker"):
        embed(torch.tensor([[5, m, 7, m]]))
    av.injector.arm(vectors(2, 32))
    with pytest.raises(InjectionError, match=r"2 rows|1 rows"):
        embed(prompt)
    av.injector.arm(None)
    with pytest.raises(InjectionError, match="no vector is armed"):
        embed(prompt)
    # A prefill with the marker, then cached decode steps without it: untouched.
    av.injector.arm(vectors(1, 32))
    embed(prompt)
    step = torch.tensor([[9]])
    torch.testing.assert_close(embed(step), embed.weight[step])
    # The model may write the marker character itself: a decode step, not a second prompt.
    written = torch.tensor([[m]])
    torch.testing.assert_close(embed(written), embed.weight[written])
    with pytest.raises(InjectionError, match="not re-armed"):
        embed(prompt)


def test_generation_uses_the_vector_through_the_kv_cache():
    av = make_av(scale=None)
    av.eval()
    d = 32
    torch.manual_seed(0)
    # A LoRA that reads the injected embedding strongly makes outputs vector-dependent.
    for name, p in av.model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.5)
    a = av.generate(vectors(3, d, 0) * 20, max_new_tokens=6)
    b = av.generate(vectors(3, d, 0) * 20, max_new_tokens=6)
    c = av.generate(vectors(3, d, 5) * 20, max_new_tokens=6)
    assert a == b and len(a) == 3
    assert a != c


def test_embed_norm_scale_is_the_mean_row_norm_including_gemma_scaling():
    llama = tiny_llama()
    w = adapt(llama).embed.weight
    assert mean_embedding_norm(adapt(llama).embed, w.shape[0], chunk=7) == pytest.approx(
        w.norm(dim=-1).mean().item(), rel=1e-5
    )
    gemma = TINY_MODELS["gemma4_causal"]()
    embed = adapt(gemma).embed
    raw = embed.weight.norm(dim=-1).mean().item()
    assert mean_embedding_norm(embed, embed.weight.shape[0]) == pytest.approx(
        raw * 32**0.5, rel=1e-3
    )


@pytest.mark.parametrize("name", sorted(TINY_MODELS))
def test_ar_with_identity_head_equals_the_base_hidden_state_at_layer_l(name):
    layer = 2
    base = TINY_MODELS[name]()
    copy = TINY_MODELS[name]()
    tok = tiny_tokenizer()
    cfg = C.ARConfig(lora_r=4, lora_alpha=8, max_length=64)
    ar = build_ar(copy, tok, load_template("ar.v1"), cfg, layer + 1)
    ar.eval()
    texts = ["a flood in town", "bees"]
    with torch.no_grad():
        pred = ar.predict(texts)
    for i, seq in enumerate(ar.encode(texts)):
        # Special tokens as the tokenizer adds them (BOS kept where it adds one).
        rendered = load_template("ar.v1").render(explanation=texts[i])
        assert seq == tok(rendered, add_special_tokens=True)["input_ids"]
        ids = torch.tensor([seq])
        ref = residual_at_layer(base, ids, torch.ones_like(ids), layer)[0, -1]
        torch.testing.assert_close(pred[i], ref.float(), atol=1e-4, rtol=1e-4)
    assert len(adapt(ar.model).layers) == layer + 1


def test_ar_template_keeps_its_tail_when_the_explanation_is_cut():
    tok = tiny_tokenizer()
    ar = build_ar(tiny_llama(), tok, load_template("ar.v1"), C.ARConfig(lora_r=2, max_length=24), 3)
    full = tok(load_template("ar.v1").render(explanation="x"))["input_ids"]
    (ids,) = ar.encode(["the quick brown fox " * 20])
    assert len(ids) == 24 and ids[-3:] == full[-3:] and ids[0] == full[0]


def train_steps(model, texts, vecs, steps=12, lr=5e-3):
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    losses = []
    for _ in range(steps):
        loss = model(texts, vecs)["loss"]
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses


def test_a_few_steps_lower_av_and_ar_loss():
    torch.manual_seed(0)
    vecs = vectors(4, 32)
    # A random tiny LM starts near uniform (ln 320 = 5.77 nats) and moves slowly.
    av_losses = train_steps(make_av(), TEXTS, vecs, steps=12, lr=1e-2)
    assert av_losses[-1] < av_losses[0] - 0.2
    ar = build_ar(tiny_llama(), tiny_tokenizer(), load_template("ar.v1"), C.ARConfig(lora_r=4), 3)
    ar_losses = train_steps(ar, TEXTS, vecs)
    assert ar_losses[-1] < ar_losses[0] - 0.2


def test_prefix_av_starts_from_identity_and_bos_and_trains_only_its_own_parameters():
    model = tiny_llama()
    tok = tiny_tokenizer()
    av = PrefixVerbalizer(model, tok, n_prefix=3, scale=None, max_length=64)
    trainable = {n for n, p in av.named_parameters() if p.requires_grad}
    assert trainable == {"proj.weight", "proj.bias", "prefix"}
    v = vectors(2, 32)
    torch.testing.assert_close(av.proj(v), v)
    bos = adapt(model).embed.weight[tok.bos_token_id]
    torch.testing.assert_close(av.prefix, bos.repeat(3, 1))
    soft = av._soft_prompt(v)
    assert soft.shape == (2, 1 + 1 + 3, 32)
    torch.testing.assert_close(soft[:, 1], v)
    frozen = adapt(model).layers[0].mlp.up_proj.weight.clone()
    losses = train_steps(av, TEXTS, vectors(4, 32), steps=15, lr=2e-2)
    assert losses[-1] < losses[0]
    assert torch.equal(adapt(model).layers[0].mlp.up_proj.weight, frozen)
    with torch.no_grad():
        a, _ = av.row_nll(TEXTS[:2], v)
        b, _ = av.row_nll(TEXTS[:2], vectors(2, 32, 3))
    assert not torch.allclose(a, b)
    assert len(av.generate(v, max_new_tokens=4)) == 2


def test_av_adapter_with_unfrozen_norms_reloads_with_peft(tmp_path):
    av = make_av(unfreeze_norms=True)
    names = [n for n, p in av.model.named_parameters() if p.requires_grad]
    assert any("input_layernorm" in n for n in names)
    train_steps(av, TEXTS, vectors(4, 32), steps=3)
    av.eval()
    av.save(tmp_path)
    fresh = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path).eval()
    ids = torch.tensor([[1, 5, 6, 7, 8]])
    torch.testing.assert_close(fresh(input_ids=ids).logits, av.model(input_ids=ids).logits)
    norm = adapt(fresh).layers[0].input_layernorm
    assert not torch.allclose(norm(torch.ones(1, 32)), torch.ones(1, 32))


def _labels_and_acts(d=8):
    labels = pd.DataFrame(
        {
            "doc_id": ["a", "b", "c"],
            "split": ["train", "val", "train"],
            "explanation": ["x", "y", ""],
            "status": ["accepted", "corrected", "rejected"],
        }
    )
    acts = pd.DataFrame(
        {
            "doc_id": ["a", "a", "b", "c"],
            "position": np.array([1, 3, 2, 0], dtype=np.int32),
            "n_tokens": np.array([4, 4, 3, 1], dtype=np.int32),
            "vector": [np.full(d, i, dtype=np.float32) for i in range(4)],
        }
    )
    return labels, acts


def test_training_pairs_join_labels_with_the_last_token_and_drop_rejected():
    labels, acts = _labels_and_acts()
    pairs = training_pairs(labels, acts, 8, "test")
    assert pairs["doc_id"].tolist() == ["a", "b"]
    assert pairs["position"].tolist() == [3, 2]
    assert [float(v[0]) for v in pairs["vector"]] == [1.0, 2.0]


def test_training_pairs_name_the_labeled_doc_without_an_activation():
    labels, acts = _labels_and_acts()
    acts = acts[acts["doc_id"] != "b"]
    with pytest.raises(DataValidationError, match=r"rows \[1\], column doc_id.*'b'"):
        training_pairs(labels, acts, 8, "labels x acts")


def test_mse_nrm_is_two_for_orthogonal_and_zero_for_parallel():
    a = torch.tensor([[3.0, 0.0], [1.0, 1.0]])
    b = torch.tensor([[0.0, 2.0], [5.0, 5.0]])
    assert mse_nrm(a[:1], b[:1]).item() == pytest.approx(2.0)
    assert mse_nrm(a[1:], b[1:]).item() == pytest.approx(0.0, abs=1e-6)


def test_lora_dropout_drops_p_of_the_elements_and_keeps_the_expectation():
    drop = LoraDropout(0.05)
    assert drop.keep_below == 62259 and drop.scale == 65536 / 62259
    torch.manual_seed(0)
    x = torch.full((400_000,), 2.0, requires_grad=True)
    y = drop(x)
    dropped = (y == 0).float().mean().item()
    # n = 4e5 draws of p = 0.05: sd 3.4e-4, so 0.05 +- 0.002 holds unless the masks are wrong.
    assert abs(dropped - 0.05) < 0.002
    kept = torch.tensor(2.0 * drop.scale, dtype=torch.float32).item()
    assert set(torch.unique(y).tolist()) == {0.0, kept}
    assert abs(y.mean().item() - 2.0) < 0.01
    # The gradient is the same mask times the same scale.
    (grad,) = torch.autograd.grad(y.sum(), x)
    torch.testing.assert_close(grad, y.detach() / 2.0)
    # Masks differ between calls, follow the seed, and eval mode is the identity.
    torch.manual_seed(0)
    assert torch.equal(drop(x), y) and not torch.equal(drop(x), y)
    assert drop.eval()(x) is x


@pytest.mark.parametrize("training", [False, True])
def test_fused_lora_layer_matches_peft_forward_and_backward(training):
    model = make_av(tiny_llama(), lora_dropout=0.1).model.train(training)
    layers = [m for m in model.modules() if isinstance(m, FusedLoraLinear)]
    assert len(layers) == 4 * 7  # every targeted projection of the 4 blocks
    assert all(isinstance(m.lora_dropout["default"], LoraDropout) for m in layers)
    with torch.no_grad():  # B starts at zero: give the branch something to add
        for m in layers:
            m.lora_B["default"].weight.normal_(0, 0.1)
    ids = torch.randint(3, 100, (2, 9), generator=torch.Generator().manual_seed(1))

    def run():
        torch.manual_seed(3)
        out = model(input_ids=ids).logits
        params = [p for p in model.parameters() if p.requires_grad]
        return out, torch.autograd.grad(out.square().mean(), params)

    with stock_peft_layers(model):
        assert not any(isinstance(m, FusedLoraLinear) for m in model.modules())
        out_peft, grads_peft = run()
    assert all(type(m) is FusedLoraLinear for m in layers)
    out_fused, grads_fused = run()
    torch.testing.assert_close(out_fused, out_peft, rtol=1e-4, atol=1e-5)
    for got, want in zip(grads_fused, grads_peft, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-6)
    # With the adapter off, the layers are the base's.
    with model.disable_adapter():
        base_out = model(input_ids=ids).logits
    assert not torch.allclose(base_out, out_fused, atol=1e-3)


def test_fused_lora_layer_leaves_a_b_bias_and_a_half_precision_base_to_peft_rules():
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(12, 10))
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["0"], lora_bias=True)
    model = peft.get_peft_model(base, config)
    use_fast_lora(model)
    layer = model.base_model.model[0]
    assert type(layer) is FusedLoraLinear
    with torch.no_grad():
        layer.lora_B["default"].weight.normal_(0, 0.5)
        layer.lora_B["default"].bias.normal_(0, 0.5)
    x = torch.randn(3, 12)
    got = model(x)
    with stock_peft_layers(model):
        want = model(x)
    # B's bias is added (PEFT's forward ran); without it the outputs would differ by it.
    torch.testing.assert_close(got, want)
    assert not torch.allclose(got - layer.lora_B["default"].bias * layer.scaling["default"], want)
    # A bfloat16 base with float32 adapters: the branch in float32, the result in bfloat16.
    model2 = peft.get_peft_model(
        nn.Sequential(nn.Linear(12, 10)), peft.LoraConfig(r=4, target_modules=["0"])
    )
    use_fast_lora(model2)
    layer2 = model2.base_model.model[0]
    layer2.base_layer.to(torch.bfloat16)
    with torch.no_grad():
        layer2.lora_B["default"].weight.normal_(0, 0.5)
    xb = x.to(torch.bfloat16)
    out = model2(xb)
    with stock_peft_layers(model2):
        ref = model2(xb)
    assert out.dtype == ref.dtype == torch.bfloat16
    torch.testing.assert_close(out, ref, rtol=2e-2, atol=2e-2)
