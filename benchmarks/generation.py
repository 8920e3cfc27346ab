"""Benchmark of the AV's decoding loop (`nla_repro.generation.decode`) against plain HF `generate`.

Loads the RL-trained AV the way the pipeline does (`load_av(models/rl/av, models/base)` with
params.yaml's base settings) and times two batch shapes, on the same vectors and seeds:
- eval: the first eval.batch_size test-split last-position vectors of data/activations.parquet;
  each row's greedy output plus eval.samples samples at eval.temperature. Ours is one
  `av.generate(cat([v, v.repeat_interleave(k)]), max_new, [0]*n + [T]*(n*k))` call (what
  evaluation/chunk.py runs); plain is what the code did before: `model.generate` greedy on the
  n rows, then `model.generate(do_sample=True, temperature=T, top_p=None, top_k=None)` on the
  n*k rows, the injector armed around each call and PEFT's own LoRA layers swapped back in
  (`stock_peft_layers`: ours runs the fused LoRA forward of `use_fast_lora`).
- rl: rl.vectors_per_step train vectors, each repeated rl.group_size times, sampled at
  rl.temperature (ours: `av.sample`, what the GRPO rollout runs; plain: the old `sample`).
After one warm-up of each, timed blocks alternate ours, plain, ours, plain, ... for --repeats,
torch seeded identically before every block. Generated tokens are counted up to and including
each row's first stop token (plain generate's padding after it stripped). Prints one JSON
object to stdout: tokens/s of both and their ratio (target >= 1.5), median block times,
achieved GFLOP/s against a torch.mm fp32 peak measured in the same run (extract.py's
`matmul_peak` and `flops_per_token`), and how many greedy rows the two wrote identically.
Needs the pipeline up to rl (`dvc repro rl`). Logs go to stderr.

    python benchmarks/generation.py --repeats 3
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from nla_repro import config as C
from nla_repro.generation import Decoded
from nla_repro.models import adapt
from nla_repro.nla import injection_vectors, load_av
from nla_repro.nla.adapters import stock_peft_layers
from nla_repro.platform import peak_rss_mb

sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/: extract.py's helpers
from extract import flops_per_token, head_dim, machine_record, matmul_peak

log = logging.getLogger("bench.generation")

SPEEDUP_TARGET = 1.5


def last_position_vectors(split: str, n: int) -> torch.Tensor:
    """The first n last-position vectors of a split, in file order (as eval's
    `_last_position` selects them)."""
    acts = pd.read_parquet(C.ACTIVATIONS_PATH, columns=["split", "position", "n_tokens", "vector"])
    rows = acts[(acts["split"] == split) & (acts["position"] == acts["n_tokens"] - 1)]
    if len(rows) < n:
        raise SystemExit(
            f"{C.ACTIVATIONS_PATH}: {len(rows)} {split} rows at the last position, {n} needed"
        )
    return torch.from_numpy(np.stack(rows["vector"].to_list()[:n]).astype(np.float32))


def strip_after_stop(rows: list[list[int]], stops: set[int]) -> tuple[list[list[int]], list[bool]]:
    """Each row up to and including its first stop token, and whether it had one (what the
    old `sample` did with generate's padded output)."""
    out, finished = [], []
    for row in rows:
        end = next((i for i, t in enumerate(row) if t in stops), None)
        out.append(row if end is None else row[: end + 1])
        finished.append(end is not None)
    return out, finished


class Plain:
    """The AV's generation before `generation.decode`: `model.generate` per temperature, the
    injector armed around each call."""

    def __init__(self, av) -> None:
        self.av = av
        self.pad = av.tokenizer.pad_token_id or 0
        self.stops = av.stop_ids()

    def generate_ids(self, vectors_ND: torch.Tensor, max_new: int, temperature: float):
        av = self.av
        ids = torch.tensor([av.prompt_ids] * len(vectors_ND), device=av._device())
        av.injector.arm(injection_vectors(vectors_ND, av.scale))
        try:
            with stock_peft_layers(av.model):  # PEFT's LoRA forward, as a PEFT user runs it
                out = av.model.generate(
                    input_ids=ids,
                    attention_mask=torch.ones_like(ids),
                    max_new_tokens=max_new,
                    do_sample=temperature > 0,
                    temperature=temperature if temperature > 0 else None,
                    top_p=None,
                    top_k=None,
                    pad_token_id=self.pad,
                )
        finally:
            av.injector.arm(None)
        return out[:, ids.shape[1] :]

    def generate(self, vectors_ND, max_new: int, temperature: float):
        """The old `generate`: texts of the whole padded continuation; also the ids."""
        new = self.generate_ids(vectors_ND, max_new, temperature)
        return self.av.tokenizer.batch_decode(new, skip_special_tokens=True), new

    def sample(self, vectors_ND, max_new: int, temperature: float):
        """The old `sample`: each row up to its first stop token; also the ids."""
        new = self.generate_ids(vectors_ND, max_new, temperature)
        tokens, finished = strip_after_stop(new.tolist(), self.stops)
        return (tokens, finished), new


class Captured:
    """Records the `Decoded` of every `decode_vectors` call on an AV, so that a timed
    `av.generate` (which returns texts only) can be counted in tokens."""

    def __init__(self, av) -> None:
        self.av, self.seen = av, []
        original = av.decode_vectors

        def recording(*args, **kwargs) -> Decoded:
            got = original(*args, **kwargs)
            self.seen.append(got)
            return got

        av.decode_vectors = recording  # an instance attribute: shadows the method

    def pop(self) -> Decoded:
        got = self.seen[-1]
        self.seen.clear()
        return got

    def close(self) -> None:
        del self.av.decode_vectors


def row_flops(cfg, n_layers: int, prompt: int, generated: int) -> float:
    """Forward FLOPs of one row (extract.py's per-token model): the prompt and every generated
    token but the last go through the blocks (the last is written, never read); one LM-head
    row per generated token. Attention at the row's final context length: an upper bound."""
    if generated == 0:
        return 0.0
    positions = prompt + generated - 1
    f = flops_per_token(cfg, positions)
    return positions * n_layers * f["layer_total"] + generated * f["lm_head"]


def summarize(
    times: list[float], tokens: list[int], flops: list[float], peak_gflops: float
) -> dict:
    rates = [t / s for t, s in zip(tokens, times, strict=True)]
    best = max(range(len(times)), key=lambda i: rates[i])
    gflops = flops[best] / times[best] / 1e9
    return {
        "tokens_per_s": round(rates[best], 1),
        "median_tokens_per_s": round(statistics.median(rates), 1),
        "generated_tokens": tokens[best],
        "generated_tokens_per_block": tokens,
        "best_block_s": round(times[best], 3),
        "median_block_s": round(statistics.median(times), 3),
        "block_s": [round(t, 3) for t in times],
        "gflops": round(gflops, 2),
        "fraction_of_peak": round(gflops / peak_gflops, 4),
        "useful_gflop": round(flops[best] / 1e9, 3),
    }


def run_shape(
    name: str,
    ours: Callable[[], tuple[list[list[int]], object]],
    plain: Callable[[], tuple[list[list[int]], object]],
    repeats: int,
    seed: int,
    flops_of: Callable[[list[list[int]]], float],
) -> dict:
    """Warm-up of each, then `repeats` of (ours, plain), each block seeded alike. Each runner
    returns (tokens per row up to the stop, anything to keep from the last block)."""
    runners = {"ours": ours, "plain": plain}
    times = {k: [] for k in runners}
    tokens = {k: [] for k in runners}
    flops = {k: [] for k in runners}
    kept = {}
    with torch.no_grad():
        for fn in runners.values():
            torch.manual_seed(seed)
            fn()
        for r in range(repeats):
            for key, fn in runners.items():
                torch.manual_seed(seed)
                start = time.perf_counter()
                rows, extra = fn()
                times[key].append(time.perf_counter() - start)
                tokens[key].append(sum(len(row) for row in rows))
                flops[key].append(flops_of(rows))
                kept[key] = (rows, extra)
            log.info(
                "%s repeat %d: ours %.2f s (%d tokens), plain %.2f s (%d tokens)",
                name,
                r,
                times["ours"][-1],
                tokens["ours"][-1],
                times["plain"][-1],
                tokens["plain"][-1],
            )
    return {"times": times, "tokens": tokens, "flops": flops, "kept": kept}


def shape_report(got: dict, peak: dict, rows: int, stops_finished: dict) -> dict:
    out = {
        k: summarize(got["times"][k], got["tokens"][k], got["flops"][k], peak["best_gflops"])
        for k in ("ours", "plain")
    }
    for k in out:
        out[k]["finished_rows"] = stops_finished[k]
        out[k]["mean_tokens_per_row"] = round(out[k]["generated_tokens"] / rows, 2)
    ratio = out["ours"]["tokens_per_s"] / out["plain"]["tokens_per_s"]
    median = out["ours"]["median_tokens_per_s"] / out["plain"]["median_tokens_per_s"]
    return {
        "rows": rows,
        "ours": out["ours"],
        "plain": out["plain"],
        "speedup_ratio": round(ratio, 4),
        "median_speedup_ratio": round(median, 4),
        "meets_speedup_target": ratio >= SPEEDUP_TARGET,
        "matmul_peak_gflops": peak["best_gflops"],
        "matmul_peak": peak,
    }


def main(argv: list[str] | None = None) -> dict:
    params = C.load_params()
    ev, rl = params.eval, params.rl
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--av-dir", type=Path, default=C.RL_AV_DIR)
    p.add_argument("--base-dir", type=Path, default=C.BASE_DIR)
    p.add_argument(
        "--rows", type=int, default=ev.batch_size, help="eval shape: vectors (eval.batch_size)"
    )
    p.add_argument(
        "--rl-vectors",
        type=int,
        default=rl.vectors_per_step,
        help="rl shape: vectors, each rl.group_size times (rl.vectors_per_step)",
    )
    p.add_argument("--shapes", nargs="+", choices=("eval", "rl"), default=["eval", "rl"])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--peak-repeats", type=int, default=10)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(message)s")
    torch.set_num_threads(args.threads)
    if args.repeats < 1 or args.rows < 1 or args.rl_vectors < 1:
        p.error("--repeats, --rows and --rl-vectors must be >= 1")
    for path in (args.av_dir, C.ACTIVATIONS_PATH):
        if not path.exists():
            p.error(f"{path}: not found; run `dvc repro rl` first")

    load = {
        "quantization": params.base.quantization,
        "compute_dtype": params.base.compute_dtype,
        "device": params.base.device,
    }
    av = load_av(args.av_dir, args.base_dir, **load)
    device = av._device()
    cfg = av.model.config.get_text_config()
    n_layers = adapt(av.model).n_layers
    prompt = len(av.prompt_ids)
    plain = Plain(av)
    stops = plain.stops

    def flops_of(rows: list[list[int]]) -> float:
        return sum(row_flops(cfg, n_layers, prompt, len(r)) for r in rows)

    def peak_for(rows: int) -> dict:
        """torch.mm peak at the GEMM rows this shape runs: the decode steps (one row each)
        and the prefill (the prompt of each row); the roofline is the better of the two."""
        kv = cfg.num_key_value_heads * head_dim(cfg)
        d, ff = cfg.hidden_size, cfg.intermediate_size
        with torch.no_grad():
            at = {
                "decode": matmul_peak(rows, d, ff, kv, args.peak_repeats),
                "prefill": matmul_peak(rows * prompt, d, ff, kv, args.peak_repeats),
            }
        return {
            "best_gflops": max(v["best_gflops"] for v in at.values()),
            "gemm_rows": {"decode": rows, "prefill": rows * prompt},
            "per_shape_gflops": {k: v["per_shape_gflops"] for k, v in at.items()},
        }

    load_before = os.getloadavg()
    captured = Captured(av)
    shapes: dict[str, dict] = {}
    try:
        if "eval" in args.shapes:
            n, k, temp, max_new = args.rows, ev.samples, ev.temperature, ev.max_new_tokens
            v = last_position_vectors(ev.split, n).to(device)
            both = torch.cat([v, v.repeat_interleave(k, 0)])
            temps: Sequence[float] = [0.0] * n + [temp] * (n * k)

            def ours_eval():
                texts = av.generate(both, max_new, temps)
                return captured.pop().tokens, texts

            def plain_eval():
                greedy, greedy_ids = plain.generate(v, max_new, 0.0)
                sampled, sampled_ids = plain.generate(v.repeat_interleave(k, 0), max_new, temp)
                ids = greedy_ids.tolist() + sampled_ids.tolist()
                return strip_after_stop(ids, stops)[0], (greedy + sampled, greedy_ids.shape[1])

            got = run_shape("eval", ours_eval, plain_eval, args.repeats, args.seed, flops_of)
            ours_rows, ours_texts = got["kept"]["ours"]
            plain_rows, (plain_texts, _) = got["kept"]["plain"]
            finished = {
                key: sum(bool(r) and r[-1] in stops for r in rows)
                for key, rows in (("ours", ours_rows), ("plain", plain_rows))
            }
            report = shape_report(got, peak_for(len(both)), len(both), finished)
            report.update(
                {
                    "vectors": n,
                    "greedy_rows": n,
                    "sampled_rows": n * k,
                    "samples_per_vector": k,
                    "temperature": temp,
                    "max_new_tokens": max_new,
                    "greedy_identical_token_rows": sum(
                        a == b for a, b in zip(ours_rows[:n], plain_rows[:n], strict=True)
                    ),
                    "greedy_identical_text_rows": sum(
                        a.strip() == b.strip()
                        for a, b in zip(ours_texts[:n], plain_texts[:n], strict=True)
                    ),
                    "ours_call": "av.generate(cat([v, v.repeat_interleave(k)]), max_new, "
                    "[0.0]*n + [T]*(n*k))",
                    "plain_calls": "model.generate greedy on n rows, then do_sample=True, "
                    "temperature=T, top_p=None, top_k=None on n*k rows",
                }
            )
            shapes["eval"] = report
        if "rl" in args.shapes:
            g, temp, max_new = rl.group_size, rl.temperature, rl.max_new_tokens
            v = last_position_vectors("train", args.rl_vectors).to(device)
            group = v.repeat_interleave(g, 0)

            def ours_rl():
                tokens, done = av.sample(group, max_new, temp)
                return tokens, done

            def plain_rl():
                (tokens, done), _ = plain.sample(group, max_new, temp)
                return tokens, done

            got = run_shape("rl", ours_rl, plain_rl, args.repeats, args.seed, flops_of)
            finished = {key: sum(got["kept"][key][1]) for key in ("ours", "plain")}
            report = shape_report(got, peak_for(len(group)), len(group), finished)
            report.update(
                {
                    "vectors": args.rl_vectors,
                    "group_size": g,
                    "temperature": temp,
                    "max_new_tokens": max_new,
                    "ours_call": "av.sample(vectors.repeat_interleave(group_size), max_new, T)",
                    "plain_calls": "model.generate do_sample=True, temperature=T, top_p=None, "
                    "top_k=None, then each row cut after its first stop token",
                }
            )
            shapes["rl"] = report
    finally:
        captured.close()

    result: dict = {"benchmark": "generation"}
    for name, s in shapes.items():
        prefix = "" if name == "eval" else f"{name}_"
        result |= {
            f"{prefix}ours_tokens_per_s": s["ours"]["tokens_per_s"],
            f"{prefix}plain_generate_tokens_per_s": s["plain"]["tokens_per_s"],
            f"{prefix}speedup_ratio": s["speedup_ratio"],
            f"{prefix}fraction_of_peak": s["ours"]["fraction_of_peak"],
            f"{prefix}plain_fraction_of_peak": s["plain"]["fraction_of_peak"],
            f"{prefix}matmul_peak_gflops": s["matmul_peak_gflops"],
            f"meets_{prefix}speedup_target": s["meets_speedup_target"],
        }
    if "eval" in shapes:
        result["greedy_identical_rows"] = shapes["eval"]["greedy_identical_token_rows"]
        result["greedy_rows"] = shapes["eval"]["greedy_rows"]
    result |= {
        "targets": {"speedup_ratio": SPEEDUP_TARGET},
        "shapes": shapes,
        "timing": {
            "statistic": "tokens/s of each method's fastest block (median: of its median "
            "block); blocks alternate ours, plain after one warm-up each, seeded alike",
            "repeats": args.repeats,
        },
        "flops": {
            "model": "extract.py flops_per_token: 2 x matmul parameters per token per block, "
            "plus attention at the row's final context length (an upper bound); per row, "
            "prompt + generated - 1 positions through the blocks, one LM-head row per "
            "generated token",
            "per_token_layer_total_at_prompt_len": flops_per_token(cfg, prompt)["layer_total"],
            "per_token_lm_head": flops_per_token(cfg, prompt)["lm_head"],
            "n_layers": n_layers,
            "counted_over": "useful tokens only (plain generate's steps on finished rows and "
            "its padding are work it does, not counted)",
        },
        "peak_rss_mb": peak_rss_mb(),
        "params": {
            "av_dir": str(args.av_dir),
            "base_dir": str(args.base_dir),
            "prompt_tokens": prompt,
            "stop_ids": sorted(stops),
            "pad_token_id": plain.pad,
            "seed": args.seed,
            "shapes": args.shapes,
            "vectors": f"first rows of {C.ACTIVATIONS_PATH} at the last position "
            f"(eval: split {ev.split}; rl: split train)",
            "dtype": str(av.model.dtype),
            "resolved_device": str(device),
            "attn_implementation": getattr(cfg, "_attn_implementation", None),
            **load,
        },
        "machine": machine_record(load_before),
    }
    return result


if __name__ == "__main__":
    print(json.dumps(main(), indent=2))
