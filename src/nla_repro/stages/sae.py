"""sae stage: a TopK SAE on token activations at layer L -> models/sae/, metrics/sae.json.

1. Activations: every token of the train split's documents and of the held-out split, except
   special tokens, read at block L (the forward stops there) and written in shards of about
   `shard_tokens` tokens under .nla_work/sae/ (a relaunch keeps finished shards). Tokens
   whose norm exceeds `outlier_norm` x the median train-token norm are dropped at read time
   (the first position of a SmolLM2 document is an attention sink with ~100x the median norm).
2. Training streams the shards through a shuffle buffer of `shuffle_shards` shards, so memory
   holds a few shards, never the corpus. Checkpoints under models/sae/checkpoints/ (persisted);
   a relaunch resumes from the last one with the same data order and ends with the same
   weights.
3. Metrics on the held-out tokens (explained variance, FVU, MSE, L0, dead/alive latents,
   feature density) and the LM loss recovered when the reconstruction replaces block L's
   output on held-out documents (clean vs SAE vs zero-ablation).
4. Weights in SAELens's layout at the top of models/sae/.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import platform
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from tqdm import tqdm

from nla_repro import config as C
from nla_repro.io import (
    ChunkStore,
    atomic_path,
    code_commit,
    fingerprint,
    save_torch_state,
    sha256_file,
    vectors_from_table,
    vectors_to_arrow,
    write_json,
    write_text,
    write_yaml,
)
from nla_repro.models import adapt, load_base, read_base_meta, residual_at_layer, tokenize
from nla_repro.plots import sae_plots
from nla_repro.sae import (
    TopKSAE,
    Trainer,
    TrainSettings,
    evaluate,
    init_b_dec,
    load_sae,
    loss_recovered,
    next_token_loss,
    save_sae,
    shuffled_batches,
    splice_layer,
)
from nla_repro.schemas import CORPUS, read_parquet
from nla_repro.stages.extract import pad_batch
from nla_repro.trainer import CHECKPOINTS, Run, _curves_csv, checkpoint_dir, complete_checkpoints

log = logging.getLogger(__name__)

PACKAGE = Path(__file__).resolve().parents[1]
CODE = ("stages/sae.py", "sae.py", "models.py", "plots.py", "trainer.py")
STATE_FILE = "trainer_state.pt"


# --- 1. Token activations in shards -----------------------------------------------------


def plan_shards(lengths: list[int], batch_size: int, shard_tokens: int) -> list[list[list[int]]]:
    """Documents (indices) in batches (longest first: less padding), batches in shards of at
    least shard_tokens tokens (the last may be smaller)."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    shards: list[list[list[int]]] = [[]]
    count = 0
    for batch in batches:
        if count >= shard_tokens:
            shards.append([])
            count = 0
        shards[-1].append(batch)
        count += sum(lengths[i] for i in batch)
    return shards if shards[0] else []


def collect(
    model, tokens: list[list[int]], special: set[int], layer: int, pad_id: int, store, shards, desc
) -> None:
    """Write each missing shard: (row, position, token_id, norm, vector) of every non-special
    token of its documents."""
    total = sum(len(tokens[i]) for s in shards for b in s for i in b)
    done = sum(len(tokens[i]) for c, s in enumerate(shards) if store.done(c) for b in s for i in b)
    bar = tqdm(total=total, initial=done, unit="tok", unit_scale=True, desc=desc)
    device = next(model.parameters()).device
    for c, shard in enumerate(shards):
        if store.done(c):
            continue
        parts = []
        for batch in shard:
            ids, mask, _ = pad_batch([tokens[i] for i in batch], pad_id, "right")
            hidden_BTD = residual_at_layer(model, ids.to(device), mask.to(device), layer)
            keep = mask.bool() & ~torch.isin(ids, torch.tensor(sorted(special), dtype=ids.dtype))
            rows_B, pos = keep.nonzero(as_tuple=True)
            vecs = hidden_BTD[keep.to(device)].float().cpu()
            parts.append(
                pa.table(
                    {
                        "row": pa.array(torch.tensor(batch)[rows_B].numpy(), pa.int64()),
                        "position": pa.array(pos.numpy(), pa.int32()),
                        "token_id": pa.array(ids[keep].numpy(), pa.int64()),
                        "norm": pa.array(vecs.norm(dim=1).numpy(), pa.float32()),
                        "vector": vectors_to_arrow(vecs.numpy()),
                    }
                )
            )
            bar.update(sum(len(tokens[i]) for i in batch))
        store.write(c, pa.concat_tables(parts))
    bar.close()


class Shards:
    """The finished shards of one split, read one at a time, outliers dropped."""

    def __init__(
        self, store: ChunkStore, n: int, dtype: torch.dtype, max_norm: float = math.inf
    ) -> None:
        self.store, self.n, self.max_norm, self.dtype = store, n, max_norm, dtype

    def norms(self) -> np.ndarray:
        parts = [pq.read_table(self.store.path(c), columns=["norm"]) for c in range(self.n)]
        return np.concatenate([p.column("norm").to_numpy() for p in parts]) if parts else []

    def load(self, c: int) -> torch.Tensor:
        table = pq.read_table(self.store.path(c))
        vecs = torch.tensor(vectors_from_table(table))
        keep = torch.from_numpy(table.column("norm").to_numpy() <= self.max_norm)
        return vecs[keep].to(self.dtype)

    def __iter__(self) -> Iterator[torch.Tensor]:
        return (self.load(c) for c in range(self.n))

    def buffers(self, epoch: int, per_buffer: int, seed: int) -> Iterator[torch.Tensor]:
        """Epoch `epoch`: shards in a seeded order, `per_buffer` at a time, concatenated."""
        gen = torch.Generator().manual_seed(seed * 7919 + epoch)
        order = torch.randperm(self.n, generator=gen).tolist()
        for i in range(0, len(order), per_buffer):
            yield torch.cat([self.load(c) for c in order[i : i + per_buffer]])


@dataclasses.dataclass
class TokenData:
    """The token activations of the train split and of the held-out split, on disk."""

    tokens: dict[str, list[list[int]]]
    """Token ids per document, by split."""
    shards: dict[str, Shards]
    """Shards by split, outliers dropped at read time."""
    norms: dict[str, np.ndarray]
    """Every collected token's norm (outliers included), by split."""
    median_norm: float
    """Median train-token norm."""
    max_norm: float
    """Tokens above this norm are dropped (inf: none)."""

    def clear(self) -> None:
        for shards in self.shards.values():
            shards.store.clear()


def token_activations(
    model, tokenizer, corpus, cfg: C.SAEConfig, layer: int, root: Path, key: tuple
) -> TokenData:
    """Collect (or resume collecting) the train and `cfg.eval_split` token activations into
    shards under root/<split>/, keyed by everything they depend on (`key`)."""
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    special = set(tokenizer.all_special_ids)
    dtype = getattr(torch, cfg.dtype)
    tokens, shards = {}, {}
    for split in ("train", cfg.eval_split):
        docs = corpus[corpus["split"] == split]
        if docs.empty:
            raise C.ConfigError(f"sae: {C.CORPUS_PATH} has no {split!r} documents")
        tokens[split] = tokenize(tokenizer, docs["text"].tolist(), cfg.max_length)
        plan = plan_shards([len(t) for t in tokens[split]], cfg.extract_batch, cfg.shard_tokens)
        parts = (*key, layer, split, cfg.max_length, cfg.extract_batch, cfg.shard_tokens)
        store = ChunkStore(root / split, fingerprint(*parts))
        collect(model, tokens[split], special, layer, pad_id, store, plan, f"sae acts {split}")
        shards[split] = Shards(store, len(plan), dtype)
    norms = {split: shards[split].norms() for split in shards}
    median = float(np.median(norms["train"]))
    max_norm = cfg.outlier_norm * median if cfg.outlier_norm is not None else math.inf
    for split in shards:
        shards[split].max_norm = max_norm
    return TokenData(tokens, shards, norms, median, max_norm)


# --- 2. Training with checkpoints -------------------------------------------------------


def save_checkpoint(sae, trainer: Trainer, history: list, run: Run, tokens_per_step: int) -> None:
    """checkpoints/step_N/: weights (SAELens layout), trainer state (optimizer, schedule,
    dead-latent counters), curve so far, sidecar with the fingerprint. Older ones are
    removed: a resumed SAE run needs only the newest."""
    final = checkpoint_dir(run, trainer.step)
    with atomic_path(final) as tmp:
        tmp.mkdir()
        save_sae(sae, tmp, {})
        save_torch_state(trainer.state_dict(), tmp / STATE_FILE)
        (tmp / "history.json").write_text(json.dumps(history))
        meta = {
            "step": trainer.step,
            "tokens": trainer.step * tokens_per_step,
            "fingerprint": run.fingerprint,
        }
        write_yaml(meta, tmp / "nla_meta.yaml")
    for other in (run.out_dir / CHECKPOINTS).glob("step_*"):
        if other != final:
            shutil.rmtree(other, ignore_errors=True)


def train(sae: TopKSAE, train_shards: Shards, cfg: C.SAEConfig, run: Run, device) -> tuple:
    """Train (or resume) to ceil(tokens / batch_size) steps. Returns (trainer, history, rates):
    rates are this run's tokens/s per logging window, kept out of history so that the
    checkpoints and curves do not depend on the clock."""
    settings = TrainSettings.resolve(
        sae,
        batch_size=cfg.batch_size,
        lr=cfg.lr,
        warmup_steps=cfg.warmup_steps,
        max_grad_norm=cfg.max_grad_norm,
        k_aux=cfg.k_aux,
        aux_coef=cfg.aux_coef,
        dead_tokens=cfg.dead_tokens,
    )
    trainer = Trainer(sae, settings)
    history: list[dict] = []
    checkpoints = complete_checkpoints(run)
    batches = shuffled_batches(
        lambda e: train_shards.buffers(e, cfg.shuffle_shards, cfg.seed), cfg.batch_size, cfg.seed
    )
    if checkpoints:
        _, latest = checkpoints[-1]
        loaded, _ = load_sae(latest)
        sae.load_state_dict(loaded.to(sae.W_dec.dtype).state_dict())
        trainer.load_state_dict(torch.load(latest / STATE_FILE, weights_only=True))
        history = json.loads((latest / "history.json").read_text())
        log.info("sae: resuming from %s (step %d)", latest, trainer.step)
        for _ in range(trainer.step):  # the data order is a pure function: skip what was seen
            next(batches)
    else:
        first = next(train_shards.buffers(0, cfg.shuffle_shards, cfg.seed))
        gen = torch.Generator().manual_seed(cfg.seed)
        init_b_dec(sae, first[torch.randperm(len(first), generator=gen)[: cfg.gm_sample]])
    steps = math.ceil(cfg.tokens / cfg.batch_size)
    bar = tqdm(
        total=steps * cfg.batch_size,
        initial=trainer.step * cfg.batch_size,
        unit="tok",
        unit_scale=True,
        desc="sae train",
    )
    window_t0, window_tokens = time.perf_counter(), 0
    rates: list[float] = []
    while trainer.step < steps:
        x = next(batches).to(device)
        info = trainer.train_step(x)
        bar.update(len(x))
        window_tokens += len(x)
        done = trainer.step
        if done % cfg.log_every == 0 or done == steps:
            rate = window_tokens / max(time.perf_counter() - window_t0, 1e-9)
            rates.append(rate)
            dead = int(trainer.dead.dead.sum())
            history.append(
                {
                    "step": done,
                    "tokens": done * cfg.batch_size,
                    "fvu": info["fvu"],
                    "aux": info["aux"],
                    "lr": info["lr"],
                    "dead": dead,
                }
            )
            bar.set_postfix(fvu=f"{info['fvu']:.3f}", dead=dead, tok_s=f"{rate:.0f}")
            window_t0, window_tokens = time.perf_counter(), 0
        if done % cfg.checkpoint_every == 0 or done == steps:
            save_checkpoint(sae, trainer, history, run, cfg.batch_size)
    bar.close()
    return trainer, history, rates


# --- 3. Metrics -------------------------------------------------------------------------


def lm_loss_recovered(
    model, reconstruct, tokens, special, layer, pad_id, max_norm: float, batch_size: int
) -> dict:
    """Next-token loss on held-out documents: clean, with block L's output replaced by
    `reconstruct(h)` (the SAE), and replaced by zeros, at every position the SAE is trained on
    (special tokens and norm outliers keep their clean value, and are counted)."""
    device = next(model.parameters()).device
    totals = {"clean": 0.0, "sae": 0.0, "zero": 0.0}
    counts = {"predicted": 0, "spliced": 0, "kept": 0}

    def swap(fn, count: bool):
        def replace(h_ND: torch.Tensor) -> torch.Tensor:
            outlier = h_ND.float().norm(dim=1) > max_norm
            if count:
                counts["spliced"] += int((~outlier).sum())
                counts["kept"] -= int((~outlier).sum())
            return torch.where(outlier.unsqueeze(1), h_ND, fn(h_ND).to(h_ND.dtype))

        return replace

    for start in range(0, len(tokens), batch_size):
        batch = tokens[start : start + batch_size]
        ids, mask, _ = pad_batch(batch, pad_id, "right")
        ids, mask = ids.to(device), mask.to(device)
        specials = torch.tensor(sorted(special), dtype=ids.dtype, device=device)
        splice_BT = mask.bool() & ~torch.isin(ids, specials)
        counts["kept"] += int(mask.sum())
        loss, n = next_token_loss(model, ids, mask)
        totals["clean"] += loss
        counts["predicted"] += n
        for name, fn in (("sae", reconstruct), ("zero", torch.zeros_like)):
            with splice_layer(model, layer, swap(fn, count=name == "sae"), splice_BT):
                totals[name] += next_token_loss(model, ids, mask)[0]
    mean = {k: v / max(counts["predicted"], 1) for k, v in totals.items()}
    return {
        "clean": mean["clean"],
        "sae": mean["sae"],
        "zero_ablation": mean["zero"],
        "recovered": loss_recovered(mean["clean"], mean["sae"], mean["zero"]),
        "docs": len(tokens),
        "predicted_tokens": counts["predicted"],
        "spliced_tokens": counts["spliced"],
        "kept_clean_tokens": counts["kept"],
    }


# --- The stage --------------------------------------------------------------------------


def hook_names(model, layer: int) -> dict:
    """Where block L's output lives: TransformerLens/SAELens hook name and HF module name."""
    arch = adapt(model)
    module = next(name for name, mod in model.named_modules() if mod is arch.layers[layer])
    return {"hook_name": f"blocks.{layer}.hook_resid_post", "hf_hook_name": module}


def run(params: C.Params, work_root: Path = C.WORK_DIR, out_dir: Path = C.SAE_DIR) -> dict:
    cfg, base = params.sae, params.base
    layer = params.sae_layer
    corpus = read_parquet(C.CORPUS_PATH, CORPUS)
    meta = read_base_meta(C.BASE_DIR)
    C.check_layer(layer, meta["n_layers"], meta["source"]["name"], "sae.layer")
    model, tokenizer = load_base(C.BASE_DIR, base.quantization, base.compute_dtype, base.device)
    device = next(model.parameters()).device
    arch = adapt(model)
    d_sae = cfg.width(arch.d_model)
    dtype = getattr(torch, cfg.dtype)
    corpus_sha = sha256_file(C.CORPUS_PATH)
    code_sha = {name: sha256_file(PACKAGE / name) for name in CODE}

    # 1. Token activations of the train and held-out splits, in shards.
    key = (
        corpus_sha,
        meta["files"],
        base.quantization,
        base.compute_dtype,
        code_sha["stages/sae.py"],
        code_sha["models.py"],
    )
    data = token_activations(model, tokenizer, corpus, cfg, layer, work_root / "sae", key)
    max_norm = data.max_norm
    train_data, eval_data = data.shards["train"], data.shards[cfg.eval_split]
    n_train = int((data.norms["train"] <= max_norm).sum())
    if n_train < cfg.batch_size:
        raise C.ConfigError(
            f"sae: {n_train} training tokens, fewer than sae.batch_size={cfg.batch_size}"
        )

    # 2. Train (or resume).
    sidecar = {
        "model": "nla-sae",
        "base_model": meta["source"]["name"],
        "base_source": meta["source"],
        "architecture": meta["architecture"],
        "d_model": arch.d_model,
        "d_sae": d_sae,
        "layer": layer,
        "hidden_states_index": layer + 1,
        "position_rule": "every token but special tokens; norm outliers dropped",
        "outlier_max_norm": max_norm if math.isfinite(max_norm) else None,
        "normalization": "none (raw residual stream)",
        "quantization": base.quantization,
        "compute_dtype": base.compute_dtype,
        "params": dataclasses.asdict(cfg),
        "inputs_sha256": {str(C.CORPUS_PATH): corpus_sha},
        "base_files_sha256": meta["files"],
        "code_sha256": code_sha,
    }
    run_ = Run(
        name="sae",
        out_dir=out_dir,
        metrics_path=C.SAE_METRICS,
        fingerprint=fingerprint(sidecar)[:32],
        sidecar=sidecar,
    )
    sae = TopKSAE(arch.d_model, d_sae, cfg.k, seed=cfg.seed).to(device=device, dtype=dtype)
    train_t0 = time.perf_counter()
    trainer, history, rates = train(sae, train_data, cfg, run_, device)
    train_wall = time.perf_counter() - train_t0
    sae.eval()

    # 3. Metrics on held-out tokens and documents.
    def capped() -> Iterator[torch.Tensor]:
        left = cfg.eval_tokens or math.inf
        for part in eval_data:
            if left <= 0:
                return
            part = part[: int(min(left, len(part)))].to(device)
            left -= len(part)
            yield part

    held_out = evaluate(sae, capped())
    train_stats = evaluate(sae, (p.to(device) for p in train_data))
    n_docs = min(cfg.loss_docs, len(data.tokens[cfg.eval_split]))
    loss = (
        lm_loss_recovered(
            model,
            lambda h: sae(h.to(dtype)),
            data.tokens[cfg.eval_split][:n_docs],
            set(tokenizer.all_special_ids),
            layer,
            tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0,
            max_norm,
            cfg.extract_batch,
        )
        if n_docs
        else None
    )
    density = held_out.density
    dead_train = int(trainer.dead.dead.sum())
    metrics = {
        "n_tokens": held_out.n,
        "split": cfg.eval_split,
        "explained_variance": held_out.explained_variance,
        "fvu": held_out.fvu,
        "fvu_uncentred": held_out.fvu_uncentred,
        "mse": held_out.mse,
        "l0": held_out.l0,
        "latents": {
            "d_sae": d_sae,
            "k": cfg.k,
            "dead_training_window": dead_train,
            "alive_training_window": d_sae - dead_train,
            "dead_window_tokens": cfg.dead_tokens,
            "never_fired_held_out": int((held_out.fires == 0).sum()),
            "density_median": float(density.median()),
            "density_max": float(density.max()),
        },
        "loss_recovered": loss,
        "train_split": {
            "explained_variance": train_stats.explained_variance,
            "n_tokens": train_stats.n,
        },
        "tokens": {
            "train_available": n_train,
            "train_outliers_dropped": int(len(data.norms["train"]) - n_train),
            "held_out_outliers_dropped": int((data.norms[cfg.eval_split] > max_norm).sum()),
            "outlier_max_norm": max_norm if math.isfinite(max_norm) else None,
            "median_norm": data.median_norm,
            "trained": trainer.step * cfg.batch_size,
            "epochs": trainer.step * cfg.batch_size / n_train,
        },
        "training": {
            "steps": trainer.step,
            "batch_size": cfg.batch_size,
            "lr": trainer.settings.lr,
            "final_fvu_batch": history[-1]["fvu"] if history else None,
        },
    }

    # 4. Publish: weights at the top of models/sae, metrics, curve, plots.
    names = hook_names(model, layer)
    sae_meta = {
        "model_name": meta["source"]["name"],
        **names,
        "hook_head_index": None,
        "context_size": cfg.max_length,
        "prepend_bos": tokenize(tokenizer, ["x"], 8)[0][0] == tokenizer.bos_token_id,
        "dataset_path": str(C.CORPUS_PATH),
        "nla_repro_layer": layer,
    }
    save_sae(sae, out_dir, sae_meta, density=density)
    headline = {k: metrics[k] for k in ("explained_variance", "fvu", "mse", "l0")}
    write_yaml(
        {
            **sidecar,
            **names,
            "step": trainer.step,
            "headline": headline,
            "code_commit": code_commit(),
        }
        | {"fingerprint": run_.fingerprint, "torch": str(torch.__version__)}
        | {"python": platform.python_version()},
        out_dir / "nla_meta.yaml",
    )
    write_text(_curves_csv(history), out_dir / "train_curve.csv")
    sae_plots(density.numpy(), history, metrics, C.SAE_PLOTS)
    write_json(metrics, C.SAE_METRICS)
    data.clear()
    _print_summary(metrics)
    timing = {
        "tokens_per_s_median": float(np.median(rates)) if rates else None,
        "train_wall_s": round(train_wall, 1),
    }
    return metrics | {"timing": timing}


def _print_summary(m: dict) -> None:
    loss = m["loss_recovered"] or {}
    rows = [
        ("held-out tokens", f"{m['n_tokens']} ({m['split']})"),
        ("explained variance", f"{m['explained_variance']:.4f}"),
        ("FVU centred / uncentred", f"{m['fvu']:.4f} / {m['fvu_uncentred']:.4f}"),
        ("L0", f"{m['l0']:.1f}"),
        ("dead latents (window)", f"{m['latents']['dead_training_window']}"),
        ("never fired (held-out)", f"{m['latents']['never_fired_held_out']}"),
        (
            "LM loss clean / SAE / zero",
            f"{loss.get('clean', float('nan')):.3f} / {loss.get('sae', float('nan')):.3f} / "
            f"{loss.get('zero_ablation', float('nan')):.3f}",
        ),
        ("loss recovered", f"{loss.get('recovered')}"),
    ]
    width = max(len(r[0]) for r in rows)
    print("\n".join(f"{name:<{width}}  {value}" for name, value in rows))
