"""TopK SAE: recovery of known sparse directions, decoder norms, dead-latent accounting."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from conftest import TINY_MODELS, save_model_dir, tree_sha256, write_corpus

from nla_repro import config as C
from nla_repro.__main__ import main
from nla_repro.io import ChunkStore
from nla_repro.models import pad_batch, residual_at_layer, tokenize
from nla_repro.sae import (
    DeadLatents,
    TopKSAE,
    evaluate,
    fit,
    geometric_median,
    lm_loss_recovered,
    load_sae,
    loss_recovered,
    next_token_loss,
    save_sae,
    scaled_lr,
    shuffled_batches,
    splice_layer,
)
from nla_repro.sae.activations import Shards
from nla_repro.sae.training import Trainer
from nla_repro.stages import sae as sae_stage


def sparse_data(n: int, d: int, n_dirs: int, k: int, seed: int = 0):
    """n vectors, each a positive combination of k of n_dirs known unit directions."""
    gen = torch.Generator().manual_seed(seed)
    dirs = torch.randn(n_dirs, d, generator=gen)
    dirs /= dirs.norm(dim=1, keepdim=True)
    idx = torch.stack([torch.randperm(n_dirs, generator=gen)[:k] for _ in range(n)])
    coef = torch.rand(n, k, generator=gen) * 2 + 0.5
    x = (coef.unsqueeze(-1) * dirs[idx]).sum(dim=1)
    return x, dirs


def test_recovers_known_sparse_directions():
    x, dirs = sparse_data(n=8000, d=32, n_dirs=48, k=3)
    sae = TopKSAE(d_model=32, d_sae=96, k=3, seed=0)
    fit(sae, x, batch_size=256, tokens=160_000, lr=3e-3, warmup_steps=20, dead_tokens=2000)
    cos = dirs @ sae.W_dec.detach().T  # (true, latent): decoder rows are unit norm
    best = cos.max(dim=1).values
    assert (best > 0.9).all(), best.sort().values[:5]
    stats = evaluate(sae, x)
    assert stats.explained_variance > 0.95 and stats.l0 <= 3
    assert stats.fvu == pytest.approx(1 - stats.explained_variance)


def test_decoder_rows_stay_unit_norm_and_steps_move_only_their_direction():
    x, _ = sparse_data(n=512, d=16, n_dirs=20, k=2)
    sae = TopKSAE(d_model=16, d_sae=40, k=2)
    assert torch.equal(sae.W_enc, sae.W_dec)  # tied init
    fit(sae, x, batch_size=64, tokens=2048, lr=1e-2)
    norms = sae.W_dec.detach().norm(dim=1)
    torch.testing.assert_close(norms, torch.ones(40))
    loss = sae(x[:64]).pow(2).sum()
    loss.backward()
    sae.remove_parallel_grad()
    parallel = (sae.W_dec.grad * sae.W_dec).sum(dim=1)
    assert parallel.abs().max() < 1e-5


def test_dead_latent_accounting_matches_a_hand_count():
    tracker = DeadLatents(d_sae=5, window=4)
    # Batch 1 (2 tokens): latents 0 and 1 fire; 2 is selected with a zero activation.
    tracker.update(torch.tensor([[0, 2], [1, 2]]), torch.tensor([[1.0, 0.0], [0.5, 0.0]]))
    assert tracker.since_fired.tolist() == [0, 0, 2, 2, 2]
    # Batch 2 (3 tokens): latent 3 fires.
    tracker.update(torch.tensor([[3], [3], [0]]), torch.tensor([[1.0], [2.0], [0.0]]))
    assert tracker.since_fired.tolist() == [3, 3, 5, 0, 5]
    assert tracker.dead.tolist() == [False, False, True, False, True]


def test_decode_by_gather_equals_the_dense_product():
    sae = TopKSAE(d_model=8, d_sae=24, k=4, seed=3)
    x = torch.randn(10, 8)
    acts, idx = sae.encode(x)
    dense = sae.to_dense(acts, idx)
    assert ((dense > 0).sum(dim=1) <= 4).all()
    torch.testing.assert_close(sae.decode(acts, idx), dense @ sae.W_dec + sae.b_dec)


def test_geometric_median_resists_outliers_and_lr_scales_with_width():
    x = torch.cat([torch.zeros(50, 3), torch.full((5, 3), 1000.0)])
    assert geometric_median(x).norm() < 1.0 < x.mean(dim=0).norm()
    assert scaled_lr(2**14) == pytest.approx(2e-4)
    assert scaled_lr(4 * 2**14) == pytest.approx(1e-4)


def test_sparse_encoder_backward_equals_dense_autograd():
    torch.manual_seed(0)
    sae = TopKSAE(d_model=12, d_sae=40, k=5, seed=1)
    with torch.no_grad():
        sae.b_enc.uniform_(-0.5, 0.5)
        sae.b_dec.normal_()
    weights = torch.randn(9, 12)

    def dense_forward(x):
        acts, idx = sae.pre_acts(x).topk(sae.k, dim=-1, sorted=False)
        return sae.decode(acts, idx)

    grads = []
    for forward in (sae.forward, dense_forward):
        sae.zero_grad()
        x = torch.randn(9, 12, generator=torch.Generator().manual_seed(2), requires_grad=True)
        (forward(x) * weights).sum().backward()
        grads.append({n: p.grad.clone() for n, p in sae.named_parameters()} | {"x": x.grad})
    assert set(grads[0]) == {"W_enc", "W_dec", "b_enc", "b_dec", "x"}
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], atol=1e-5, rtol=1e-5)
    assert (grads[0]["W_enc"].abs().sum(dim=1) > 0).sum() <= 9 * 5  # only selected latents


# --- The stage: token activations, streaming, splice, SAELens layout, resume ---------------

WORDS = ["river", "town", "rain", "council", "bike", "lanes", "fox", "dog", "sun", "bees", "ice"]
STAGE_TEXTS = [
    f"Note {i}: " + " ".join(WORDS[(i * 7 + j * (1 + i % 5)) % len(WORDS)] for j in range(9))
    for i in range(48)
]


def stage_params(**overrides) -> C.Params:
    small = dict(
        layer=2, max_length=32, k=4, expansion=2, batch_size=32, tokens=640, shard_tokens=48,
        checkpoint_every=5, log_every=2, gm_sample=64, dead_tokens=256,
    )  # fmt: skip
    cfg = replace(C.materialize_profile("smoke").sae, **(small | overrides))
    return replace(C.Params(), sae=cfg, base=replace(C.BaseConfig(), device="cpu"))


def setup_stage_repo(root, model_name: str = "llama"):
    save_model_dir(TINY_MODELS[model_name](), root / "models" / "base")
    write_corpus(root, STAGE_TEXTS)


def test_sae_stage_end_to_end_writes_a_folder_saelens_loads(in_tmp, tokenizer):
    setup_stage_repo(in_tmp)
    metrics = sae_stage.run(stage_params())

    saved = json.loads(C.SAE_METRICS.read_text())
    timing = metrics.pop("timing")  # returned for stage_times.jsonl, never written to an output
    assert saved == json.loads(json.dumps(metrics))
    assert timing["tokens_per_s_median"] > 0 and "tokens_per_s" not in str(saved)
    assert 0 < saved["l0"] <= 4 and saved["latents"]["d_sae"] == 64
    assert saved["tokens"]["trained"] == 20 * 32  # ceil(640 / 32) steps
    loss = saved["loss_recovered"]
    assert loss["zero_ablation"] > loss["clean"] and loss["recovered"] is not None
    assert loss["spliced_tokens"] > 0
    # Every non-special token of the held-out split was scored (none is an outlier here).
    corpus = pq.read_table(C.CORPUS_PATH).to_pandas()
    test_docs = corpus[corpus["split"] == "test"]["text"].tolist()
    special = set(tokenizer.all_special_ids)
    n_test = sum(t not in special for ids in tokenize(tokenizer, test_docs, 32) for t in ids)
    assert saved["n_tokens"] == n_test and saved["tokens"]["held_out_outliers_dropped"] == 0
    assert (C.SAE_PLOTS / "density.png").stat().st_size > 0
    assert (C.SAE_DIR / "train_curve.csv").read_text().startswith("step,tokens,fvu")
    assert not (in_tmp / C.WORK_DIR / "sae" / "train").exists()  # shards removed when done

    import sae_lens

    theirs = sae_lens.SAE.load_from_disk(str(C.SAE_DIR))
    ours, cfg = load_sae(C.SAE_DIR)
    assert cfg["metadata"]["hook_name"] == "blocks.2.hook_resid_post"
    assert cfg["metadata"]["hf_hook_name"] == "model.layers.2"
    x = torch.randn(16, 32) * 3
    torch.testing.assert_close(theirs(x), ours(x), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(theirs.encode(x), ours.to_dense(*ours.encode(x)))


def test_killed_sae_training_resumes_to_the_same_weights(in_tmp, monkeypatch):
    setup_stage_repo(in_tmp)
    # A new process starts torch's global RNG at a random seed: so do these runs.
    torch.manual_seed(12345)
    sae_stage.run(stage_params())
    clean, clean_plots = tree_sha256(C.SAE_DIR), tree_sha256(C.SAE_PLOTS)
    clean_metrics = C.SAE_METRICS.read_bytes()
    shutil.rmtree(C.SAE_DIR)

    calls = {"n": 0}
    step = Trainer.train_step

    def dies_at_step_12(self, x):
        calls["n"] += 1
        if calls["n"] == 12:
            raise KeyboardInterrupt
        return step(self, x)

    monkeypatch.setattr(Trainer, "train_step", dies_at_step_12)
    torch.manual_seed(999)
    with pytest.raises(KeyboardInterrupt):
        sae_stage.run(stage_params())
    assert [p.name for p in (C.SAE_DIR / "checkpoints").iterdir()] == ["step_10"]
    monkeypatch.setattr(Trainer, "train_step", step)
    calls["n"] = 0
    counting = step

    def counted(self, x):
        calls["n"] += 1
        return counting(self, x)

    monkeypatch.setattr(Trainer, "train_step", counted)
    torch.manual_seed(4242)
    resumed = sae_stage.run(stage_params())
    assert calls["n"] == 10  # steps 11..20 only
    # Every byte of the DVC outputs equal (weights, checkpoints, curve, sidecar, metrics, plots):
    # nothing in them depends on the clock or on having been interrupted.
    assert tree_sha256(C.SAE_DIR) == clean and tree_sha256(C.SAE_PLOTS) == clean_plots
    assert C.SAE_METRICS.read_bytes() == clean_metrics
    assert resumed["explained_variance"] == json.loads(clean_metrics)["explained_variance"]


def test_changed_params_do_not_resume_a_stale_checkpoint(in_tmp):
    setup_stage_repo(in_tmp)
    sae_stage.run(stage_params())
    first = (C.SAE_DIR / "sae_weights.safetensors").read_bytes()
    sae_stage.run(stage_params(seed=1))
    assert (C.SAE_DIR / "sae_weights.safetensors").read_bytes() != first
    assert [p.name for p in (C.SAE_DIR / "checkpoints").iterdir()] == ["step_20"]


def test_shuffled_stream_sees_every_vector_once_per_epoch_and_holds_one_buffer():
    sizes = (7, 5, 9)
    data = [torch.arange(n, dtype=torch.float32)[:, None] + 100 * b for b, n in enumerate(sizes)]
    seen_buffers = []

    def buffers(epoch):
        for b in torch.randperm(3, generator=torch.Generator().manual_seed(epoch)).tolist():
            seen_buffers.append(len(data[b]))
            yield data[b]

    stream = shuffled_batches(buffers, batch_size=4, seed=0)
    first_epoch = torch.cat([next(stream) for _ in range(5)]).flatten()  # 20 of 21 vectors
    everything = torch.cat(data).flatten()
    assert len(set(first_epoch.tolist())) == 20
    assert set(first_epoch.tolist()) <= set(everything.tolist())
    again = shuffled_batches(buffers, batch_size=4, seed=0)
    assert torch.equal(torch.cat([next(again) for _ in range(5)]).flatten(), first_epoch)
    assert max(seen_buffers) == 9  # one buffer at a time, never the whole data


def test_outlier_tokens_are_dropped_at_read_time(tmp_path):
    import pyarrow as pa

    from nla_repro.io import vectors_to_arrow

    store = ChunkStore(tmp_path / "s", "fp")
    vecs = np.ones((4, 3), dtype=np.float32) * np.array([[1], [1], [1], [100]], dtype=np.float32)
    norms = np.linalg.norm(vecs, axis=1).astype(np.float32)
    table = pa.table({"norm": pa.array(norms), "vector": vectors_to_arrow(vecs)})
    store.write(0, table)
    shards = Shards(store, 1, torch.float32, max_norm=10 * float(np.median(norms)))
    assert len(shards.load(0)) == 3
    np.testing.assert_allclose(shards.norms(), norms)
    assert len(Shards(store, 1, torch.float32).load(0)) == 4


@pytest.mark.parametrize("model_name", sorted(TINY_MODELS))
def test_identity_splice_recovers_all_the_loss_and_zeros_cost_some(tokenizer, model_name):
    model = TINY_MODELS[model_name]()
    tokens = tokenize(tokenizer, STAGE_TEXTS[:6], 32)
    ids, mask, _, _ = pad_batch(tokens, tokenizer.pad_token_id, "right")
    identity = torch.nn.Identity()
    out = lm_loss_recovered(
        model, identity, tokens, set(tokenizer.all_special_ids), 2, 0, float("inf"), 4
    )
    assert out["sae"] == out["clean"] and out["recovered"] == 1.0
    assert out["zero_ablation"] != out["clean"]
    # The splice really replaces block 2's output, at the masked positions only.
    splice = torch.zeros_like(mask, dtype=torch.bool)
    splice[:, 1] = True
    with splice_layer(model, 2, lambda h: h * 0 + 7.0, splice):
        hidden = residual_at_layer(model, ids, mask, 2)
    clean = residual_at_layer(model, ids, mask, 2)
    assert (hidden[:, 1] == 7.0).all() and torch.equal(hidden[:, 2:], clean[:, 2:])
    assert next_token_loss(model, ids, mask)[1] == int((mask[:, 1:] * mask[:, :-1]).sum())


def test_loss_recovered_formula_and_a_bad_reconstruction():
    assert loss_recovered(2.0, 2.0, 6.0) == 1.0
    assert loss_recovered(2.0, 6.0, 6.0) == 0.0
    assert loss_recovered(2.0, 3.0, 6.0) == pytest.approx(0.75)
    assert loss_recovered(2.0, 3.0, 2.0) is None


def test_load_sae_names_the_file_and_the_bad_tensor(tmp_path):
    sae = TopKSAE(8, 16, 2)
    save_sae(sae, tmp_path, {"model_name": "x"})
    cfg = json.loads((tmp_path / "cfg.json").read_text())
    cfg["d_sae"] = 12
    (tmp_path / "cfg.json").write_text(json.dumps(cfg))
    from nla_repro.errors import SourceError

    with pytest.raises(SourceError, match=r"sae_weights.safetensors: W_enc has shape \(8, 16\)"):
        load_sae(tmp_path)
    with pytest.raises(SourceError, match=r"cfg\.json: not found"):
        load_sae(tmp_path / "missing")


def test_sae_layer_out_of_range_exits_nonzero_without_output(in_tmp, capsys):
    setup_stage_repo(in_tmp)
    C.PARAMS_FILE.write_text(C.dump_params(stage_params(layer=4)))
    assert main(["sae"]) == 2
    assert "sae.layer=4 is out of range" in capsys.readouterr().err
    assert not C.SAE_DIR.exists() and not C.SAE_METRICS.exists()


def test_bfloat16_training_runs_and_saves_bfloat16(in_tmp):
    setup_stage_repo(in_tmp)
    metrics = sae_stage.run(stage_params(dtype="bfloat16", tokens=320))
    sae, cfg = load_sae(C.SAE_DIR)
    assert cfg["dtype"] == "bfloat16" and sae.W_dec.dtype == torch.bfloat16
    assert 0 < metrics["l0"] <= 4
