"""The decoding loop (`generation.decode`) against plain `generate`, and the shared base."""

from __future__ import annotations

import peft
import pytest
import torch
from conftest import tiny_llama, tiny_tokenizer
from torch import nn
from transformers.cache_utils import DynamicLayer

from nla_repro.generation import (
    ROWS_FIRST_MAX,
    ReservedLayer,
    RowsFirstLinear,
    decode,
    draw,
    rows_first,
    stop_ids,
)
from nla_repro.models import SharedBase, load_base, pad_batch, shared_copy


def _model(seed: int = 0):
    model = tiny_llama(seed=seed).eval()
    # Sharp logits: greedy choices far from ties, so a batch-shape change cannot flip one.
    with torch.no_grad():
        model.lm_head.weight.mul_(8.0)
    return model


def _plain_greedy(model, ids, mask, n_new, pad):
    out = model.generate(
        input_ids=ids,
        attention_mask=mask,
        max_new_tokens=n_new,
        do_sample=False,
        pad_token_id=pad,
        eos_token_id=None,
    )
    return out[:, ids.shape[1] :].tolist()


def test_greedy_decode_matches_generate_on_left_padded_prompts():
    model, tok = _model(), tiny_tokenizer()
    prompts = [[5, 6, 7, 8, 9], [10, 11], [12, 13, 14]]
    padded = pad_batch(prompts, tok.pad_token_id or 0, "left")
    want = _plain_greedy(model, padded.ids_BT, padded.mask_BT, 6, tok.pad_token_id or 0)
    got = decode(model, padded.mask_BT, [0.0] * 3, 6, set(), input_ids=padded.ids_BT)
    assert got.tokens == want
    assert got.finished == [False] * 3  # no stop id: every row ran to the cap
    # Each row alone gives the same continuation as in the batch (positions from the mask).
    for row, prompt in enumerate(prompts):
        ids = torch.tensor([prompt])
        alone = decode(model, torch.ones_like(ids), [0.0], 6, set(), input_ids=ids)
        assert alone.tokens[0] == want[row]


def test_rows_leave_the_batch_at_their_stop_token_without_changing_the_others():
    model = _model()
    ids = torch.tensor([[5, 6, 7], [8, 9, 10], [11, 12, 13]])
    free = decode(model, torch.ones_like(ids), [0.0] * 3, 8, set(), input_ids=ids)
    stop = free.tokens[1][2]  # the third token row 1 writes ends it there
    got = decode(model, torch.ones_like(ids), [0.0] * 3, 8, {stop}, input_ids=ids)
    end = free.tokens[1].index(stop)
    assert got.tokens[1] == free.tokens[1][: end + 1] and got.finished[1]
    for row in (0, 2):
        # Other rows stop at their own first `stop`, and agree with the free run up to it.
        cut = free.tokens[row].index(stop) + 1 if stop in free.tokens[row] else 8
        assert got.tokens[row] == free.tokens[row][:cut]
        assert got.finished[row] == (stop in free.tokens[row])


def test_one_temperature_per_row_greedy_rows_unaffected_by_sampled_rows():
    model = _model()
    ids = torch.tensor([[5, 6, 7]] * 4)
    greedy = decode(model, torch.ones_like(ids), [0.0] * 4, 6, set(), input_ids=ids)
    torch.manual_seed(0)
    mixed = decode(model, torch.ones_like(ids), [0.0, 1.0, 0.0, 5.0], 6, set(), input_ids=ids)
    assert mixed.tokens[0] == greedy.tokens[0] and mixed.tokens[2] == greedy.tokens[2]
    torch.manual_seed(0)
    again = decode(model, torch.ones_like(ids), [0.0, 1.0, 0.0, 5.0], 6, set(), input_ids=ids)
    assert again.tokens == mixed.tokens  # seeded: reproducible
    torch.manual_seed(1)
    hot = decode(model, torch.ones_like(ids), [50.0] * 4, 6, set(), input_ids=ids)
    assert hot.tokens != greedy.tokens  # a high temperature really samples


def test_top_p_near_zero_is_greedy_and_stop_text_ends_a_row():
    model = _model()
    ids = torch.tensor([[5, 6, 7], [9, 10, 11]])
    greedy = decode(model, torch.ones_like(ids), [0.0, 0.0], 5, set(), input_ids=ids)
    torch.manual_seed(3)
    nucleus = decode(model, torch.ones_like(ids), [1.0, 1.0], 5, set(), top_p=1e-6, input_ids=ids)
    assert nucleus.tokens == greedy.tokens
    got = decode(
        model,
        torch.ones_like(ids),
        [0.0, 0.0],
        5,
        set(),
        stop_text=lambda row, toks: row == 0 and len(toks) == 2,
        input_ids=ids,
    )
    assert got.tokens[0] == greedy.tokens[0][:2] and got.finished == [True, False]
    assert got.tokens[1] == greedy.tokens[1]


def test_stop_ids_read_tokenizer_and_generation_config():
    model, tok = _model(), tiny_tokenizer()
    model.generation_config.eos_token_id = [7, 9]
    assert stop_ids(model, tok) == {7, 9} | ({tok.eos_token_id} - {None})


def test_shared_copy_shares_every_weight_and_keeps_peft_and_truncation_apart(tmp_path):
    from conftest import save_model_dir

    base_dir = save_model_dir(tiny_llama(), tmp_path / "base")
    shared = SharedBase(base_dir)
    a, _ = shared.load()
    b, _ = shared.load()
    pa = dict(a.named_parameters())
    assert all(p.data_ptr() == pa[n].data_ptr() for n, p in b.named_parameters())
    fresh, _ = load_base(base_dir)
    ids = torch.tensor([[3, 4, 5, 6]])
    with torch.no_grad():
        want = fresh(input_ids=ids).logits
        cfg = peft.LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False)
        wrapped = peft.get_peft_model(a, cfg)
        b.model.layers = b.model.layers[:1]
        assert not torch.equal(wrapped(input_ids=ids).logits, want)  # LoRA on a only
        c, _ = shared.load()
        assert torch.equal(c(input_ids=ids).logits, want)  # the original is untouched
    assert len(c.model.layers) == len(fresh.model.layers)
    copy_ = shared_copy(fresh)
    assert copy_.lm_head.weight is fresh.lm_head.weight


def test_draw_follows_the_probabilities_and_never_picks_a_zero():
    probs = torch.tensor([[0.5, 0.0, 0.3, 0.2], [0.0, 0.0, 0.0, 2.0]])  # row 2 unnormalized
    torch.manual_seed(0)
    n = 40_000
    picks = torch.stack([draw(probs) for _ in range(n)])  # (n, 2)
    share = torch.bincount(picks[:, 0], minlength=4).double() / n
    # 4 standard errors of a share of 0.5 at n = 40k is 0.01.
    assert torch.allclose(share, torch.tensor([0.5, 0.0, 0.3, 0.2], dtype=torch.float64), atol=0.01)
    assert (picks[:, 1] == 3).all()
    assert not (picks[:, 0] == 1).any()


def test_nucleus_from_the_top_candidates_equals_the_full_sort(monkeypatch):
    from nla_repro import generation

    torch.manual_seed(0)
    probs = torch.softmax(torch.randn(3, 50) * 3, dim=-1)
    full_kept, full_order = generation._nucleus(probs, 0.9)  # 50 <= 1024: one topk of all
    for candidates in (8, 40):
        monkeypatch.setattr(generation, "NUCLEUS_CANDIDATES", candidates)
        kept, order = generation._nucleus(probs, 0.9)
        for r in range(3):
            want = set(full_order[r][full_kept[r] > 0].tolist())
            assert set(order[r][kept[r] > 0].tolist()) == want
    # The nucleus is the smallest prefix reaching 0.9: without its last token it falls short.
    size = int((full_kept[0] > 0).sum())
    assert full_kept[0][: size - 1].sum() < 0.9 <= full_kept[0][:size].sum() + 1e-6


@pytest.mark.parametrize("rows", [1, 7, ROWS_FIRST_MAX, ROWS_FIRST_MAX + 1])
@pytest.mark.parametrize("bias", [False, True])
def test_rows_first_linear_computes_the_linear_layer(rows, bias):
    torch.manual_seed(0)
    layer = nn.Linear(24, 40, bias=bias)
    x = torch.randn(rows, 1, 24)
    want = layer(x)
    layer.__class__ = RowsFirstLinear
    got = layer(x)
    assert got.shape == want.shape and got.is_contiguous()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    # The weight gets its gradient through either product.
    (grad,) = torch.autograd.grad(got.square().sum(), layer.weight)
    layer.__class__ = nn.Linear
    (want_grad,) = torch.autograd.grad(layer(x).square().sum(), layer.weight)
    torch.testing.assert_close(grad, want_grad, rtol=1e-4, atol=1e-4)


def test_rows_first_swaps_plain_float32_linears_only_and_always_swaps_back():
    model = _model()
    plain = [m for m in model.modules() if type(m) is nn.Linear]
    half = nn.Linear(4, 4).to(torch.bfloat16)
    model.add_module("half_precision", half)
    with pytest.raises(RuntimeError, match="boom"), rows_first(model):
        assert all(type(m) is RowsFirstLinear for m in plain)
        assert type(half) is nn.Linear
        raise RuntimeError("boom")
    assert all(type(m) is nn.Linear for m in plain)


def test_reserved_layer_returns_what_the_dynamic_layer_returns():
    torch.manual_seed(0)
    prompt_k, prompt_v = torch.randn(3, 2, 5, 4), torch.randn(3, 2, 5, 4)
    dynamic = DynamicLayer()
    dynamic.update(prompt_k, prompt_v)
    reserved = ReservedLayer.from_layer(dynamic, extra=2)
    assert torch.equal(reserved.keys, dynamic.keys) and reserved.get_seq_length() == 5
    # Two steps fit the room, the third grows past it; a row leaves in between.
    for step in range(3):
        k, v = torch.randn(3 - (step > 0), 2, 1, 4), torch.randn(3 - (step > 0), 2, 1, 4)
        if step == 1:
            index = torch.tensor([0, 2])
            dynamic.batch_select_indices(index)
            reserved.batch_select_indices(index)
        got, want = reserved.update(k, v), dynamic.update(k, v)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
        assert reserved.get_seq_length() == dynamic.get_seq_length() == 6 + step
        assert reserved.get_mask_sizes(1) == dynamic.get_mask_sizes(1)
    reserved.crop(-2)
    dynamic.crop(-2)
    assert torch.equal(reserved.keys, dynamic.keys) and reserved.get_seq_length() == 6


def test_decode_writes_the_same_tokens_through_the_reserved_cache_and_the_dynamic_one(monkeypatch):
    model = _model()
    ids = torch.tensor([[5, 6, 7, 8], [9, 10, 11, 12], [13, 14, 15, 16]])
    got = decode(model, torch.ones_like(ids), [0.0] * 3, 7, set(), input_ids=ids)
    monkeypatch.setattr("nla_repro.generation.reserve", lambda cache, extra: None)
    plain = decode(model, torch.ones_like(ids), [0.0] * 3, 7, set(), input_ids=ids)
    assert got.tokens == plain.tokens and all(len(t) == 7 for t in got.tokens)
