"""The decoding loop (`generation.decode`) against plain `generate`, and the shared base."""

from __future__ import annotations

import peft
import torch
from conftest import tiny_llama, tiny_tokenizer

from nla_repro.generation import decode, draw, stop_ids
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
