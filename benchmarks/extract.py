"""Benchmark of the extract stage's early-exit residual capture against a plain HF forward.

Runs this project's extractor (`extract_batch`: hook on block L, forward stopped there), a
plain `model(..., output_hidden_states=True)` and TransformerLens's
`run_with_cache(names_filter="blocks.L.hook_resid_post", stop_at_layer=L + 1)` (the call
SAELens's activation store makes) on the same padded batches, interleaved, and prints one JSON
object to stdout: tokens/s of each and the ratios, the analytic FLOP limit of the HF ratio
(full forward / blocks 0..L), achieved GFLOP/s of each against a torch.mm fp32 peak measured
in the same run, the largest difference between their vectors, and pass/fail booleans. When
TransformerLens cannot build the model offline, its entry says why (`skipped`) and the rest
still runs. No network: HF_HUB_OFFLINE=1 in this process. Logs go to stderr.

    python benchmarks/extract.py --n-texts 64 --batch-size 16 --max-length 128 --repeats 3
"""

from __future__ import annotations

import os

# Before huggingface_hub is imported (it reads this once): local files only, no Hub calls.
os.environ["HF_HUB_OFFLINE"] = "1"

import argparse
import contextlib
import json
import logging
import platform
import random
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from transformers import PretrainedConfig

from nla_repro.models import adapt, load_base, pad_batch, read_base_meta, tokenize
from nla_repro.platform import peak_rss_mb
from nla_repro.stages.extract import extract_batch

log = logging.getLogger("bench.extract")

LIMIT_TARGET = 0.90
PEAK_TARGET = 0.85
CORPUS = Path("data/corpus.parquet")

VOCAB = (
    "the a model reads every token and writes a vector into the residual stream while each "
    "layer adds what it has computed from attention over earlier positions small networks "
    "learn simple rules quickly but larger ones keep more facts about the world in their "
    "weights river mountain city train morning evening letter garden window music paper"
)


def synthetic_texts(n: int, min_words: int, seed: int = 0) -> list[str]:
    """Deterministic English-looking sentences, used when there is no corpus."""
    rng = random.Random(seed)
    vocab = VOCAB.split()
    texts = []
    for _ in range(n):
        words: list[str] = []
        while len(words) < min_words:
            sentence = [rng.choice(vocab) for _ in range(rng.randint(6, 14))]
            words += [sentence[0].capitalize(), *sentence[1:-1], sentence[-1] + "."]
        texts.append(" ".join(words))
    return texts


def load_texts(n: int, max_length: int, concat: bool = True) -> tuple[list[str], str]:
    """n texts. With concat, each is at least ~max_length tokens: corpus docs are short (tens
    of tokens), so a text is corpus docs joined from a rotating start, which gives timing
    enough tokens per batch to be stable. Without, the docs as they are, cycled to n."""
    min_chars = max_length * 8  # > 4-5 chars/token of English; the tokenizer truncates
    if CORPUS.exists():
        import pandas as pd

        docs = pd.read_parquet(CORPUS, columns=["text"])["text"].tolist()
        if docs and not concat:
            return [docs[i % len(docs)] for i in range(n)], f"{CORPUS} ({len(docs)} docs, as is)"
        if docs:
            texts = []
            for i in range(n):
                parts, size, j = [], 0, i
                while size < min_chars:
                    parts.append(docs[j % len(docs)])
                    size += len(parts[-1]) + 1
                    j += 1
                texts.append(" ".join(parts))
            return texts, f"{CORPUS} ({len(docs)} docs, concatenated to >= max_length tokens)"
    min_words = max_length * 2 if concat else 24
    return synthetic_texts(n, min_words), f"synthetic (seed 0, >= {min_words} words each)"


def machine_record(load_before: tuple[float, float, float]) -> dict:
    """The machine a benchmark ran on and the 1-minute load average around it (`load_before`:
    `os.getloadavg()` when it started). The run alone adds about torch_threads; more means
    other processes competed."""
    return {
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch_interop_threads": torch.get_num_interop_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "processor": platform.processor() or platform.machine(),
        "loadavg_1m_before": round(load_before[0], 2),
        "loadavg_1m_after": round(os.getloadavg()[0], 2),
    }


def timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def matmul_peak(m: int, d: int, ff: int, kv: int, repeats: int) -> dict:
    """Best fp32 torch.mm GFLOP/s over the model's linear-layer shapes, both as plain
    (M,K)@(K,N) and as nn.Linear computes it, x @ W.T with W stored (N,K)."""
    shapes = {"d->ff": (d, ff), "ff->d": (ff, d), "d->d": (d, d), "d->kv": (d, kv)}
    results = {}
    for name, (k, n) in shapes.items():
        a = torch.randn(m, k)
        layouts = {"mm": torch.randn(k, n), "linear_wT": torch.randn(n, k).t()}
        for layout, b in layouts.items():
            torch.mm(a, b)  # warm-up: first call pays for allocation and kernel selection
            best = min(timed(lambda a=a, b=b: torch.mm(a, b)) for _ in range(repeats))
            results[f"{name} {layout} ({m}x{k} @ {k}x{n})"] = round(2 * m * k * n / best / 1e9, 2)
    return {"best_gflops": max(results.values()), "per_shape_gflops": results}


def head_dim(cfg: PretrainedConfig) -> int:
    return getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads


def flops_per_token(cfg: PretrainedConfig, t_attn: float) -> dict:
    """Analytic forward FLOPs per token: 2 * (matmul parameters), plus attention scores and
    values (2*T*d each) at context length t_attn. Norms, RoPE, SiLU are left out (< 1%)."""
    d = cfg.hidden_size
    ff = cfg.intermediate_size
    q_dim = cfg.num_attention_heads * head_dim(cfg)
    kv_dim = cfg.num_key_value_heads * head_dim(cfg)
    layer = {
        "q_proj": 2 * d * q_dim,
        "k_proj": 2 * d * kv_dim,
        "v_proj": 2 * d * kv_dim,
        "o_proj": 2 * q_dim * d,
        "gate_proj": 2 * d * ff,
        "up_proj": 2 * d * ff,
        "down_proj": 2 * ff * d,
        "attn_scores_values": 4 * t_attn * q_dim,
    }
    total = sum(layer.values())
    return {"per_layer": layer, "layer_total": total, "lm_head": 2 * d * cfg.vocab_size}


def short_error(err: Exception) -> str:
    """One line for the result; TransformerLens's unknown-name ValueError lists every official
    name: keep the sentence, not the list."""
    text = str(err).split(" Valid official model names")[0].strip().splitlines()
    return f"{type(err).__name__}: {(text[0] if text else '')[:200]}"


def build_transformer_lens(model_dir: str, hf_model, tokenizer, official_name: str | None):
    """A HookedTransformer holding the loaded HF model's weights, built offline, and how it
    was built; (None, {"skipped": why}) when it cannot be.

    First `HookedTransformer.from_pretrained(official_name, hf_model=..., tokenizer=...)` with
    from_pretrained's default processing. SmolLM2 is not among TransformerLens's official
    names, so that raises; then the same steps from_pretrained runs, on the local model folder
    (TransformerLens's loaders take a local path with a config.json: the architecture, Llama
    here, comes from that config): get_pretrained_model_config, get_pretrained_state_dict with
    hf_model, HookedTransformer(cfg, tokenizer), load_and_process_state_dict."""
    try:
        import transformer_lens
        from transformer_lens import HookedTransformer
        from transformer_lens import loading_from_pretrained as tl_loading
    except Exception as err:  # not installed or broken: say so, do not fail the benchmark
        return None, {"skipped": f"import transformer_lens: {type(err).__name__}: {err}"}
    version = getattr(transformer_lens, "__version__", None)
    if version is None:
        from importlib import metadata

        version = metadata.version("transformer_lens")
    info: dict = {"version": version}
    # fold_ln etc. left at from_pretrained's defaults; with RMSNorm they leave the residual
    # stream unchanged (folding moves the norm weights into the next linears; centring the
    # writing weights applies to LayerNorm only), so hook_resid_post is HF's hidden state.
    processing = {
        "fold_ln": True,
        "center_writing_weights": True,
        "center_unembed": True,
        "fold_value_biases": True,
    }
    # from_pretrained prints a line to stdout; stdout is this benchmark's JSON.
    with contextlib.redirect_stdout(sys.stderr):
        if official_name:
            try:
                model = HookedTransformer.from_pretrained(
                    official_name,
                    hf_model=hf_model,
                    tokenizer=tokenizer,
                    device="cpu",
                    dtype=hf_model.dtype,
                    **processing,
                )
                info["built_with"] = f"HookedTransformer.from_pretrained({official_name!r})"
                return model.eval(), info
            except Exception as err:
                info["from_pretrained_error"] = short_error(err)
        try:
            cfg = tl_loading.get_pretrained_model_config(
                model_dir, fold_ln=True, device="cpu", dtype=hf_model.dtype
            )
            state = tl_loading.get_pretrained_state_dict(
                model_dir, cfg, hf_model, dtype=hf_model.dtype
            )
            model = HookedTransformer(cfg, tokenizer, move_to_device=False)
            model.load_and_process_state_dict(state, **processing)
            model.move_model_modules_to_device()
        except Exception as err:
            why = info.pop("from_pretrained_error", None)
            reason = f"local build: {short_error(err)}"
            info["skipped"] = f"from_pretrained: {why}; {reason}" if why else reason
            return None, info
    info["built_with"] = (
        f"from_pretrained's steps on the local folder {model_dir} "
        "(get_pretrained_model_config, get_pretrained_state_dict(hf_model=...), "
        "HookedTransformer(cfg, tokenizer), load_and_process_state_dict)"
    )
    info["architecture"] = cfg.original_architecture
    info["normalization_type"] = cfg.normalization_type
    info["processing"] = processing
    return model.eval(), info


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model-dir", default="models/base")
    p.add_argument("--layer", type=int, default=20)
    p.add_argument("--n-texts", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--padding-side", choices=("right", "left"), default="right")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument(
        "--concat",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="join corpus docs up to --max-length tokens (--no-concat: the docs as they are)",
    )
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--peak-repeats", type=int, default=10)
    p.add_argument(
        "--transformer-lens",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also time TransformerLens run_with_cache (--no-transformer-lens: HF only)",
    )
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(message)s")
    torch.set_num_threads(args.threads)

    model, tokenizer = load_base(args.model_dir, device="cpu")
    arch = adapt(model)
    cfg = model.config.get_text_config()
    if not 0 <= args.layer < arch.n_layers:
        p.error(f"--layer {args.layer}: model has {arch.n_layers} blocks")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    hook_name = f"blocks.{args.layer}.hook_resid_post"
    if args.transformer_lens:
        meta = read_base_meta(args.model_dir)
        official = (meta.get("source") or {}).get("name")
        tl_model, tl_info = build_transformer_lens(args.model_dir, model, tokenizer, official)
        if tl_model is None:
            log.warning("TransformerLens skipped: %s", tl_info["skipped"])
    else:
        tl_model, tl_info = None, {"skipped": "--no-transformer-lens"}

    texts, source = load_texts(args.n_texts, args.max_length, args.concat)
    tok_s = min(timed(lambda: tokenize(tokenizer, texts, args.max_length)) for _ in range(3))
    tokens = tokenize(tokenizer, texts, args.max_length)
    # Same ordering as the stage: longest first, so each batch pads little.
    order = sorted(range(len(tokens)), key=lambda i: (-len(tokens[i]), i))
    batches = [
        [tokens[i] for i in order[s : s + args.batch_size]]
        for s in range(0, len(order), args.batch_size)
    ]
    positions = [[[len(t) - 1] for t in b] for b in batches]  # the default rule: last token
    widths = [max(len(t) for t in b) for b in batches]
    real = sum(len(t) for t in tokens)
    padded = sum(w * len(b) for w, b in zip(widths, batches, strict=True))

    def run_extractor(b: list[list[int]], pos: list[list[int]]) -> np.ndarray:
        return extract_batch(model, b, pos, args.layer, pad_id, args.padding_side)

    def run_hf(b: list[list[int]], pos: list[list[int]]) -> np.ndarray:
        ids, mask, offsets, _ = pad_batch(b, pad_id, args.padding_side)
        hidden = model(
            input_ids=ids, attention_mask=mask, output_hidden_states=True, use_cache=False
        ).hidden_states[args.layer + 1]
        rows = [r for r, ps in enumerate(pos) for _ in ps]
        cols = [offsets[r] + q for r, ps in enumerate(pos) for q in ps]
        return hidden[rows, cols].float().cpu().numpy()

    def run_tl(b: list[list[int]], pos: list[list[int]]) -> np.ndarray:
        ids, mask, offsets, _ = pad_batch(b, pad_id, args.padding_side)
        _, cache = tl_model.run_with_cache(
            ids, attention_mask=mask, names_filter=hook_name, stop_at_layer=args.layer + 1
        )
        rows = [r for r, ps in enumerate(pos) for _ in ps]
        cols = [offsets[r] + q for r, ps in enumerate(pos) for q in ps]
        return cache[hook_name][rows, cols].float().cpu().numpy()

    runners = {"extractor": run_extractor, "hf": run_hf}
    if tl_model is not None:
        runners["transformer_lens"] = run_tl
    names = list(runners)
    # times[name][batch] = wall seconds of that batch in each repeat.
    times = {name: [[] for _ in batches] for name in runners}
    load_before = os.getloadavg()
    with torch.inference_mode():
        # Warm-up on one batch each: allocator growth and MKL/oneDNN kernel selection.
        for fn in runners.values():
            fn(batches[0], positions[0])
        diff = {name: 0.0 for name in names[1:]}  # vs the extractor's vectors
        scale = 0.0  # largest |value| read, for a relative difference
        for r in range(args.repeats):
            for i, (b, pos) in enumerate(zip(batches, positions, strict=True)):
                # Interleave per batch and rotate the order, so that bursts of load from
                # other processes on a shared machine hit every method alike; the per-batch
                # minimum over repeats then filters out the bursts.
                out = {}
                k = (r + i) % len(names)
                for name in names[k:] + names[:k]:
                    start = time.perf_counter()
                    out[name] = runners[name](b, pos)
                    times[name][i].append(time.perf_counter() - start)
                # All must read the same vectors, or the speed comparison means nothing.
                for name in diff:
                    gap = float(np.abs(out["extractor"] - out[name]).max())
                    diff[name] = max(diff[name], gap)
                scale = max(scale, float(np.abs(out["extractor"]).max()))
            log.info(
                "repeat %d: %s",
                r,
                ", ".join(f"{n} {sum(t[-1] for t in times[n]):.2f} s" for n in names),
            )
        max_diff = diff["hf"]
        # Rows of the model's matmuls: the largest batch's padded tokens.
        peak = matmul_peak(
            max(w * len(b) for w, b in zip(widths, batches, strict=True)),
            cfg.hidden_size,
            cfg.intermediate_size,
            cfg.num_key_value_heads * head_dim(cfg),
            args.peak_repeats,
        )

    # FLOPs over every padded position (the kernels compute them), attention over the full
    # padded T x T: an upper bound, as the causal SDPA kernel skips about half of it.
    L1 = args.layer + 1
    ext_flops = full_flops = 0.0
    for w, b in zip(widths, batches, strict=True):
        f = flops_per_token(cfg, w)
        ext_flops += len(b) * w * L1 * f["layer_total"]
        full_flops += len(b) * w * (arch.n_layers * f["layer_total"] + f["lm_head"])
    mean_w = sum(w * len(b) for w, b in zip(widths, batches, strict=True)) / len(tokens)
    f_mean = flops_per_token(cfg, mean_w)
    limit = full_flops / ext_flops

    best = {k: sum(min(t) for t in v) for k, v in times.items()}
    median = {k: sum(statistics.median(t) for t in v) for k, v in times.items()}
    passes = {
        k: [round(sum(t[r] for t in v), 3) for r in range(args.repeats)] for k, v in times.items()
    }
    tps = {k: real / v for k, v in best.items()}
    ratio = tps["extractor"] / tps["hf"]
    gflops_ext = ext_flops / best["extractor"] / 1e9
    if tl_model is not None:
        # stop_at_layer=L+1: TransformerLens computes blocks 0..L, the extractor's FLOPs.
        gflops_tl = ext_flops / best["transformer_lens"] / 1e9
        tl_info |= {
            "call": f"run_with_cache(ids, attention_mask=mask, names_filter={hook_name!r}, "
            f"stop_at_layer={args.layer + 1})",
            "tokens_per_s": round(tps["transformer_lens"], 1),
            "median_tokens_per_s": round(real / median["transformer_lens"], 1),
            "best_pass_s": round(best["transformer_lens"], 3),
            "pass_s": passes["transformer_lens"],
            "gflops": round(gflops_tl, 2),
            "fraction_of_peak": round(gflops_tl / peak["best_gflops"], 4),
            "extractor_speedup_ratio": round(tps["extractor"] / tps["transformer_lens"], 4),
            "median_extractor_speedup_ratio": round(
                median["transformer_lens"] / median["extractor"], 4
            ),
            "flop_limit_ratio": 1.0,  # same blocks computed
            "correctness_max_abs_diff_vs_extractor": diff["transformer_lens"],
            "correctness_max_rel_diff_vs_extractor": diff["transformer_lens"] / max(scale, 1e-30),
        }
    result = {
        "extractor_tokens_per_s": round(tps["extractor"], 1),
        "hf_full_forward_tokens_per_s": round(tps["hf"], 1),
        "speedup_ratio": round(ratio, 4),
        "flop_limit_ratio": round(limit, 4),
        "fraction_of_limit": round(ratio / limit, 4),
        "extractor_gflops": round(gflops_ext, 2),
        "hf_full_forward_gflops": round(full_flops / best["hf"] / 1e9, 2),
        "hf_full_forward_fraction_of_peak": round(
            full_flops / best["hf"] / 1e9 / peak["best_gflops"], 4
        ),
        "matmul_peak_gflops": peak["best_gflops"],
        "fraction_of_peak": round(gflops_ext / peak["best_gflops"], 4),
        "meets_limit_target": ratio / limit >= LIMIT_TARGET,
        "meets_peak_target": gflops_ext / peak["best_gflops"] >= PEAK_TARGET,
        "targets": {"fraction_of_limit": LIMIT_TARGET, "fraction_of_peak": PEAK_TARGET},
        "timing": {
            "statistic": "sum over batches of each batch's min wall time over repeats",
            "extractor_best_pass_s": round(best["extractor"], 3),
            "hf_best_pass_s": round(best["hf"], 3),
            "extractor_pass_s": passes["extractor"],
            "hf_pass_s": passes["hf"],
            "extractor_median_tokens_per_s": round(real / median["extractor"], 1),
            "hf_median_tokens_per_s": round(real / median["hf"], 1),
            "median_speedup_ratio": round(median["hf"] / median["extractor"], 4),
        },
        "flops": {
            "per_token_per_layer_at_mean_padded_len": f_mean["per_layer"],
            "per_token_layer_total": f_mean["layer_total"],
            "per_token_lm_head": f_mean["lm_head"],
            "per_token_blocks_0_to_L": L1 * f_mean["layer_total"],
            "per_token_full_forward": arch.n_layers * f_mean["layer_total"] + f_mean["lm_head"],
            "attention_context_len": round(mean_w, 2),
            "extractor_total_gflop": round(ext_flops / 1e9, 2),
            "full_forward_total_gflop": round(full_flops / 1e9, 2),
            "counted_over": "padded tokens (what the kernels compute)",
        },
        "matmul_peak": peak,
        "correctness_max_abs_diff_vs_hf_hidden_states": max_diff,
        "correctness_max_abs_value": scale,
        "transformer_lens": tl_info,
        "peak_rss_mb": peak_rss_mb(),
        "data": {
            "text_source": source,
            "n_texts": len(tokens),
            "n_batches": len(batches),
            "real_tokens": real,
            "padded_tokens": padded,
            "pad_fraction": round(1 - real / padded, 4),
            "mean_real_len": round(real / len(tokens), 2),
            "tokenize_tokens_per_s": round(real / tok_s, 1),
        },
        "params": {
            "model_dir": args.model_dir,
            "layer": args.layer,
            "hidden_states_index": args.layer + 1,
            "n_layers": arch.n_layers,
            "d_model": arch.d_model,
            "n_texts": args.n_texts,
            "batch_size": args.batch_size,
            "max_length": args.max_length,
            "padding_side": args.padding_side,
            "repeats": args.repeats,
            "concat": args.concat,
            "positions": "last token of each text",
            "dtype": str(model.dtype),
            "attn_implementation": getattr(cfg, "_attn_implementation", None),
            "hf_call": "model(input_ids, attention_mask, output_hidden_states=True, "
            "use_cache=False)",
        },
        "machine": machine_record(load_before),
    }
    return result


if __name__ == "__main__":
    print(json.dumps(main(), indent=2))
