"""The two NLA models around a frozen base LM, and the pairs they train on.

- `ActivationVerbalizer` (AV, kind injection): base + LoRA. The prompt holds one marker token
  between `<concept>` and `</concept>`; a forward hook on the input-embedding module replaces
  the marker's embedding with `v * scale / ||v||`. Loss on the response tokens only.
- `PrefixVerbalizer` (AV, kind prefix): frozen base; `v` goes through an identity-initialized
  fp32 `Linear(d, d)`, followed by n learned prefix embeddings initialized from BOS.
- `ActivationReconstructor` (AR): blocks 0..L of the base + LoRA, final norm = identity, an
  identity-initialized `Linear(d, d)` value head on the last token of the AR template.

All three are `nn.Module`s whose `forward(texts, vectors)` returns the training loss, with the
same save/load/validate interface, so one trainer (trainer.py) drives them.
"""

from __future__ import annotations

import abc
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import peft
import torch
import yaml
from safetensors.torch import load_file, save_file
from torch import nn

from nla_repro.errors import ConfigError, DataValidationError, NlaError
from nla_repro.metrics import mse_nrm, mse_nrm_rows
from nla_repro.models import adapt, load_base, norm_module_names, truncate
from nla_repro.schemas import pairs_schema, validate
from nla_repro.templates import PromptTemplate, load_template

log = logging.getLogger(__name__)

# Rare characters tried in order as the AV's marker; the first that is exactly one token
# with the same neighbouring tokens as another candidate wins. ASCII ones last: byte-level
# tokenizers with few merges (and tiny test tokenizers) only have those as single tokens.
MARKER_CANDIDATES = ("◆", "¤", "§", "¶", "†", "‡", "※", "◊", "⌘", "♮", "~", "^", "`", "|", "@")
IGNORE = -100
HEAD_FILE = "head.safetensors"
PREFIX_FILE = "prefix.safetensors"


class InjectionError(NlaError):
    """The prompt does not hold exactly one marker token per injected vector."""


# ---------------------------------------------------------------------------------------------
# Training pairs


def training_pairs(
    labels: pd.DataFrame, activations: pd.DataFrame, d_model: int, where: str
) -> pd.DataFrame:
    """Accepted or corrected labels joined with the activation at the position they explain
    (the document's last extracted token), validated against the pairs schema."""
    usable = labels[labels["status"] != "rejected"]
    last = activations[activations["position"] == activations["n_tokens"] - 1]
    merged = usable.merge(
        last[["doc_id", "position", "vector"]], on="doc_id", how="left", validate="one_to_one"
    )
    missing = merged["position"].isna().to_numpy()
    if missing.any():
        rows = usable.index[missing].tolist()[:8]
        raise DataValidationError(
            f"{where}: {int(missing.sum())} labeled document(s) have no activation at their last "
            f"token (labels.parquet rows {rows}, column doc_id, e.g. "
            f"{merged.loc[missing, 'doc_id'].iloc[0]!r}); rerun extract with positions: last"
        )
    pairs = pd.DataFrame(
        {
            "doc_id": merged["doc_id"],
            "split": merged["split"],
            "position": merged["position"].astype("int32"),
            "explanation": merged["explanation"],
            "vector": merged["vector"],
        }
    )
    return validate(pairs, pairs_schema(d_model), where)


def split_pairs(pairs: pd.DataFrame, split: str) -> tuple[list[str], torch.Tensor]:
    rows = pairs[pairs["split"] == split]
    vectors = np.stack(rows["vector"].to_list()) if len(rows) else np.zeros((0, 0), np.float32)
    return rows["explanation"].tolist(), torch.from_numpy(vectors.astype(np.float32))


# ---------------------------------------------------------------------------------------------
# Marker and injection


@dataclass(frozen=True)
class Marker:
    char: str
    """The marker character as it appears in the prompt."""
    token_id: int
    """Its single token id."""
    position: int
    """Its index in the tokenized prompt."""


def choose_marker(tokenizer, template: PromptTemplate) -> Marker:
    """The first candidate that tokenizes to exactly one token, occurs once, and leaves the
    neighbouring tokens as another candidate does (so `<concept>`/`</concept>` are stable)."""
    encoded = {
        c: tokenizer(template.render(marker=c), add_special_tokens=True)["input_ids"]
        for c in MARKER_CANDIDATES
    }

    def single_slot(a: list[int], b: list[int]) -> int | None:
        if len(a) != len(b):
            return None
        diff = [i for i, (x, y) in enumerate(zip(a, b, strict=True)) if x != y]
        return diff[0] if len(diff) == 1 else None

    for char, ids in encoded.items():
        for other, other_ids in encoded.items():
            slot = single_slot(ids, other_ids) if other != char else None
            if slot is None:
                continue
            token = ids[slot]
            if ids.count(token) == 1 and tokenizer.decode([token]) == char:
                return Marker(char=char, token_id=int(token), position=slot)
    raise ConfigError(
        f"prompt {template.version}: no marker candidate {MARKER_CANDIDATES} is a single token "
        "with stable neighbours under this tokenizer"
    )


def injection_vectors(vectors_BD: torch.Tensor, scale: float | None) -> torch.Tensor:
    """`v * scale / ||v||` in fp32, or the raw vector when scale is None."""
    v = vectors_BD.float()
    if scale is None:
        return v
    return v * scale / v.norm(dim=-1, keepdim=True).clamp_min(1e-12)


@torch.no_grad()
def mean_embedding_norm(embed: nn.Module, vocab_size: int, chunk: int = 4096) -> float:
    """Mean row norm of the embedding module's output (Gemma's includes its sqrt(d) scale)."""
    device = next(embed.parameters()).device
    total = 0.0
    for start in range(0, vocab_size, chunk):
        ids = torch.arange(start, min(start + chunk, vocab_size), device=device)
        total += embed(ids[None])[0].float().norm(dim=-1).sum().item()
    return total / vocab_size


class Injector:
    """Forward hook on the input embeddings that writes one vector per row at the marker.

    Armed with (B, d) vectors, the first forward must hold exactly one marker per row; later
    decode steps (one new token per row, reading the KV cache) pass through, even when the
    token the model just wrote is the marker character. A marker with nothing armed, or a
    second multi-token forward holding a marker without re-arming, raises.
    """

    def __init__(self, embed: nn.Module, marker_id: int) -> None:
        self.marker_id = marker_id
        self.vectors_BD: torch.Tensor | None = None
        self.done = False
        self.handle = embed.register_forward_hook(self._hook, with_kwargs=True)

    def arm(self, vectors_BD: torch.Tensor | None) -> None:
        self.vectors_BD, self.done = vectors_BD, False

    def _hook(self, _module, args: tuple, kwargs: dict, output: torch.Tensor):
        ids = args[0] if args else kwargs.get("input", kwargs.get("input_ids"))
        is_marker = ids == self.marker_id
        if self.vectors_BD is None or self.done:
            decoding = self.done and ids.shape[1] == 1
            if is_marker.any() and not decoding:
                why = "no vector is armed" if self.vectors_BD is None else "it was not re-armed"
                raise InjectionError(f"marker token {self.marker_id} in the input but {why}")
            return None
        if ids.shape[0] != self.vectors_BD.shape[0]:
            raise InjectionError(f"{ids.shape[0]} rows but {self.vectors_BD.shape[0]} vectors")
        counts = is_marker.sum(dim=1)
        bad = (counts != 1).nonzero().flatten().tolist()
        if bad:
            raise InjectionError(
                f"row {bad[0]} holds {int(counts[bad[0]])} marker tokens (id {self.marker_id}); "
                "expected exactly one per injected vector"
            )
        rows, cols = is_marker.nonzero(as_tuple=True)
        out = output.clone()
        out[rows, cols] = self.vectors_BD.to(device=out.device, dtype=out.dtype)
        self.done = True
        return out


# ---------------------------------------------------------------------------------------------
# Shared pieces


def lora(model: nn.Module, cfg, unfreeze_norms: bool) -> peft.PeftModel:
    """Wrap the base in LoRA adapters; trained RMSNorms ride along as modules_to_save, so the
    saved folder reloads with `peft.PeftModel.from_pretrained` alone."""
    config = peft.LoraConfig(
        r=cfg.lora_r,
        lora_alpha=cfg.lora_alpha,
        lora_dropout=cfg.lora_dropout,
        target_modules=cfg.target_modules,
        modules_to_save=norm_module_names(model) if unfreeze_norms else None,
        bias="none",
    )
    try:
        return peft.get_peft_model(model, config)
    except ValueError as err:
        raise ConfigError(f"LoRA target_modules {cfg.target_modules!r}: {err}") from None


def save_adapter(model: peft.PeftModel, directory: Path) -> None:
    """adapter_config.json + adapter_model.safetensors. PEFT also writes a README.md full of
    "[More Information Needed]"; the card stage writes the real card, so it is dropped."""
    model.save_pretrained(directory, safe_serialization=True)
    (Path(directory) / "README.md").unlink(missing_ok=True)


def token_logprobs(logits_BTV: torch.Tensor, labels_BT: torch.Tensor) -> torch.Tensor:
    """Log-prob of each next token where labels are set (0 elsewhere): (B, T-1)."""
    logits = logits_BTV[:, :-1].float()
    targets = labels_BT[:, 1:]
    mask = targets != IGNORE
    logp = torch.log_softmax(logits, dim=-1).gather(-1, targets.clamp_min(0)[..., None])[..., 0]
    return logp * mask


def pad_right(seqs: list[list[int]], labels: list[list[int]], pad_id: int, device):
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    lab = torch.full_like(ids, IGNORE)
    mask = torch.zeros_like(ids)
    for r, (s, lbl) in enumerate(zip(seqs, labels, strict=True)):
        ids[r, : len(s)], lab[r, : len(lbl)], mask[r, : len(s)] = (
            torch.tensor(s),
            torch.tensor(lbl),
            1,
        )
    return ids.to(device), mask.to(device), lab.to(device)


def _batches(n: int, size: int):
    for start in range(0, n, size):
        yield slice(start, min(start + size, n))


def shuffled(vectors_ND: torch.Tensor) -> torch.Tensor:
    """Every row gets another row's vector (a cyclic shift: no row keeps its own)."""
    return vectors_ND.roll(1, dims=0)


class VerbalizerBase(nn.Module, abc.ABC):
    """What both AV kinds share: response tokenization, per-row loss, validation, generation."""

    tokenizer = None
    max_length: int = 0
    read_tokens: int = 0
    """Non-pad tokens of the last forward (prompt + response): the throughput unit."""

    def _device(self) -> torch.device:
        return next(self.parameters()).device

    def response_ids(self, text: str) -> list[int]:
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        eos = self.tokenizer.eos_token_id
        return ids + ([eos] if eos is not None else [])

    @abc.abstractmethod
    def row_nll(
        self, texts: list[str], vectors_BD: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Summed NLL of each row's response and its token count: (B,), (B,)."""

    def _score(self, logits_BTV, labels_BT, mask_BT) -> tuple[torch.Tensor, torch.Tensor]:
        self.read_tokens = int(mask_BT.sum())
        logp = token_logprobs(logits_BTV, labels_BT)
        return -logp.sum(dim=1), (labels_BT[:, 1:] != IGNORE).sum(dim=1)

    def _generate(self, max_new_tokens: int, temperature: float, **inputs) -> torch.Tensor:
        return self.model.generate(
            **inputs,
            max_new_tokens=max_new_tokens,
            do_sample=temperature > 0,
            temperature=temperature if temperature > 0 else None,
            top_p=None,
            top_k=None,
            pad_token_id=self.tokenizer.pad_token_id or 0,
        )

    def forward(self, texts: list[str], vectors_BD: torch.Tensor) -> dict:
        nll, n = self.row_nll(texts, vectors_BD)
        return {"loss": nll.sum() / n.sum().clamp_min(1), "tokens": self.read_tokens}

    @torch.no_grad()
    def mean_loss(self, texts: list[str], vectors_ND: torch.Tensor, batch: int) -> float:
        nll = tokens = 0.0
        for s in _batches(len(texts), batch):
            row_nll, n = self.row_nll(texts[s], vectors_ND[s])
            nll, tokens = nll + row_nll.sum().item(), tokens + n.sum().item()
        return nll / max(tokens, 1)

    @torch.no_grad()
    def validation(self, texts: list[str], vectors_ND: torch.Tensor, batch: int) -> dict:
        """Loss with the true vectors vs the vectors shuffled across rows: an AV whose gap stays
        near zero ignores the injection and collapses to templates."""
        true = self.mean_loss(texts, vectors_ND, batch)
        other = self.mean_loss(texts, shuffled(vectors_ND), batch) if len(texts) > 1 else true
        return {"val_loss": true, "val_loss_shuffled": other, "vector_use_gap": other - true}


# ---------------------------------------------------------------------------------------------
# AV, injection kind


class ActivationVerbalizer(VerbalizerBase):
    """Base LM + LoRA; the vector replaces the marker token's input embedding."""

    kind = "injection"

    def __init__(
        self,
        model: nn.Module,
        tokenizer,
        template: PromptTemplate,
        scale: float | None,
        max_length: int,
    ) -> None:
        super().__init__()
        self.model, self.tokenizer, self.template = model, tokenizer, template
        self.scale, self.max_length = scale, max_length
        self.marker = choose_marker(tokenizer, template)
        self.prompt_ids = tokenizer(template.render(marker=self.marker.char))["input_ids"]
        self.injector = Injector(adapt(model).embed, self.marker.token_id)

    def _inputs(self, texts: list[str]):
        seqs, labels = [], []
        room = self.max_length - len(self.prompt_ids)
        for text in texts:
            resp = self.response_ids(text)[:room]
            seqs.append(self.prompt_ids + resp)
            labels.append([IGNORE] * len(self.prompt_ids) + resp)
        pad = self.tokenizer.pad_token_id or 0
        return pad_right(seqs, labels, pad, self._device())

    def row_nll(self, texts, vectors_BD):
        ids, mask, labels = self._inputs(texts)
        self.injector.arm(injection_vectors(vectors_BD, self.scale))
        try:
            logits = self.model(input_ids=ids, attention_mask=mask, use_cache=False).logits
        finally:
            self.injector.arm(None)
        return self._score(logits, labels, mask)

    @torch.no_grad()
    def generate(
        self, vectors_ND: torch.Tensor, max_new_tokens: int = 64, temperature: float = 0.0
    ) -> list[str]:
        """One explanation per vector (greedy at temperature 0)."""
        n = len(vectors_ND)
        ids = torch.tensor([self.prompt_ids] * n, device=self._device())
        self.injector.arm(injection_vectors(vectors_ND, self.scale))
        try:
            out = self._generate(
                max_new_tokens, temperature, input_ids=ids, attention_mask=torch.ones_like(ids)
            )
        finally:
            self.injector.arm(None)
        return self.tokenizer.batch_decode(out[:, ids.shape[1] :], skip_special_tokens=True)

    def save(self, directory: Path) -> None:
        save_adapter(self.model, directory)

    def load(self, directory: Path) -> None:
        peft.set_peft_model_state_dict(
            self.model, load_file(Path(directory) / "adapter_model.safetensors")
        )

    def describe(self) -> dict:
        return {
            "kind": self.kind,
            "marker": self.marker.char,
            "marker_token_id": self.marker.token_id,
            "marker_position": self.marker.position,
            "prompt_token_ids": self.prompt_ids,
        }


# ---------------------------------------------------------------------------------------------
# AV, prefix kind


class PrefixVerbalizer(VerbalizerBase):
    """Frozen base; [BOS] [W v] [p_1 .. p_n] then the text, W identity-initialized (fp32),
    p_i initialized from the BOS embedding."""

    kind = "prefix"

    def __init__(
        self, model: nn.Module, tokenizer, n_prefix: int, scale: float | None, max_length: int
    ) -> None:
        super().__init__()
        self.model, self.tokenizer = model.requires_grad_(False), tokenizer
        self.scale, self.max_length = scale, max_length
        self.embed = adapt(model).embed
        d = adapt(model).d_model
        device = next(model.parameters()).device
        self.proj = nn.Linear(d, d, device=device, dtype=torch.float32)
        with torch.no_grad():
            self.proj.weight.copy_(torch.eye(d))
            self.proj.bias.zero_()
        bos = tokenizer.bos_token_id
        self.bos_id = bos
        start = torch.tensor([[bos if bos is not None else tokenizer.eos_token_id]], device=device)
        with torch.no_grad():
            bos_embedding = self.embed(start)[0, 0].float()
        self.prefix = nn.Parameter(bos_embedding.repeat(n_prefix, 1))

    def _soft_prompt(self, vectors_BD: torch.Tensor) -> torch.Tensor:
        """(B, 1 + 1 + n, d): BOS (if the tokenizer has one), projected vector, prefix."""
        dtype = self.embed.weight.dtype
        v = self.proj(injection_vectors(vectors_BD, self.scale).to(self.proj.weight.device))
        parts = [v[:, None], self.prefix[None].expand(len(v), -1, -1)]
        if self.bos_id is not None:
            bos = torch.full((len(v), 1), self.bos_id, device=v.device)
            parts.insert(0, self.embed(bos).float())
        return torch.cat(parts, dim=1).to(dtype)

    def row_nll(self, texts, vectors_BD):
        soft = self._soft_prompt(vectors_BD)
        room = self.max_length - soft.shape[1]
        resp = [self.response_ids(t)[:room] for t in texts]
        pad = self.tokenizer.pad_token_id or 0
        ids, mask, labels = pad_right(resp, resp, pad, soft.device)
        embeds = torch.cat([soft, self.embed(ids)], dim=1)
        full_mask = torch.cat(
            [torch.ones(soft.shape[:2], device=soft.device, dtype=mask.dtype), mask], 1
        )
        full_labels = torch.cat(
            [torch.full(soft.shape[:2], IGNORE, device=soft.device, dtype=labels.dtype), labels], 1
        )
        logits = self.model(inputs_embeds=embeds, attention_mask=full_mask, use_cache=False).logits
        return self._score(logits, full_labels, full_mask)

    @torch.no_grad()
    def generate(
        self, vectors_ND: torch.Tensor, max_new_tokens: int = 64, temperature: float = 0.0
    ) -> list[str]:
        soft = self._soft_prompt(vectors_ND)
        mask = torch.ones(soft.shape[:2], device=soft.device, dtype=torch.long)
        out = self._generate(max_new_tokens, temperature, inputs_embeds=soft, attention_mask=mask)
        return self.tokenizer.batch_decode(out, skip_special_tokens=True)

    def save(self, directory: Path) -> None:
        Path(directory).mkdir(parents=True, exist_ok=True)
        tensors = {
            "proj.weight": self.proj.weight,
            "proj.bias": self.proj.bias,
            "prefix": self.prefix,
        }
        save_file(
            {k: v.detach().cpu().contiguous() for k, v in tensors.items()},
            Path(directory) / PREFIX_FILE,
        )

    def load(self, directory: Path) -> None:
        tensors = load_file(Path(directory) / PREFIX_FILE)
        with torch.no_grad():
            self.proj.weight.copy_(tensors["proj.weight"])
            self.proj.bias.copy_(tensors["proj.bias"])
            self.prefix.copy_(tensors["prefix"])

    def describe(self) -> dict:
        return {"kind": self.kind, "n_prefix": len(self.prefix), "bos_token_id": self.bos_id}


# ---------------------------------------------------------------------------------------------
# AR


class ActivationReconstructor(nn.Module):
    """Blocks 0..L of the base (+ LoRA), final norm = identity, `Linear(d, d)` value head
    (identity at init, fp32) on the last token of the AR template."""

    def __init__(self, model: nn.Module, tokenizer, template: PromptTemplate, max_length: int):
        super().__init__()
        self.model, self.tokenizer, self.template = model, tokenizer, template
        self.max_length, self.read_tokens = max_length, 0
        arch = adapt(model)
        if not isinstance(arch.final_norm, nn.Identity):
            raise ConfigError("ActivationReconstructor needs a truncated base (models.truncate)")
        device = next(model.parameters()).device
        self.head = nn.Linear(arch.d_model, arch.d_model, device=device, dtype=torch.float32)
        with torch.no_grad():
            self.head.weight.copy_(torch.eye(arch.d_model))
            self.head.bias.zero_()

    def encode(self, texts: list[str]) -> list[list[int]]:
        """Template token ids with special tokens (BOS kept). An over-long sequence loses the
        explanation's end, never the template's tail, so the last token is always the
        template's last."""
        suffix = self.template.prompt.split("{explanation}", 1)[1]
        tail = len(self.tokenizer(suffix, add_special_tokens=False)["input_ids"])
        out = []
        for text in texts:
            ids = self.tokenizer(self.template.render(explanation=text))["input_ids"]
            if len(ids) > self.max_length:
                ids = ids[: self.max_length - tail] + ids[-tail:]
            out.append(ids)
        return out

    def predict(self, texts: list[str]) -> torch.Tensor:
        """Reconstructed vectors (B, d), fp32."""
        seqs = self.encode(texts)
        pad = self.tokenizer.pad_token_id or 0
        ids, mask, _ = pad_right(seqs, seqs, pad, next(self.head.parameters()).device)
        hidden = adapt(self.model).decoder(input_ids=ids, attention_mask=mask, use_cache=False)
        hidden_BTD = hidden.last_hidden_state if hasattr(hidden, "last_hidden_state") else hidden[0]
        last = mask.sum(dim=1) - 1
        self.read_tokens = int(mask.sum())
        return self.head(hidden_BTD[torch.arange(len(seqs)), last].float())

    def forward(self, texts: list[str], vectors_BD: torch.Tensor) -> dict:
        pred = self.predict(texts)
        return {"loss": mse_nrm(pred, vectors_BD.to(pred.device)), "tokens": self.read_tokens}

    @torch.no_grad()
    def mean_mse(self, texts: list[str], vectors_ND: torch.Tensor, batch: int) -> float:
        rows = [
            mse_nrm_rows(self.predict(texts[s]), vectors_ND[s].to(self.head.weight.device))
            for s in _batches(len(texts), batch)
        ]
        return torch.cat(rows).mean().item()

    @torch.no_grad()
    def validation(self, texts: list[str], vectors_ND: torch.Tensor, batch: int) -> dict:
        """mse_nrm on the true explanations vs on empty strings: an AR whose gap stays near
        zero is content-blind (it predicts the mean direction whatever it reads)."""
        true = self.mean_mse(texts, vectors_ND, batch)
        empty = self.mean_mse([""] * len(texts), vectors_ND, batch)
        return {"val_mse": true, "val_mse_empty": empty, "content_gap": empty - true}

    def save(self, directory: Path) -> None:
        save_adapter(self.model, directory)
        state = {k: v.detach().cpu().contiguous() for k, v in self.head.state_dict().items()}
        save_file(state, Path(directory) / HEAD_FILE)

    def load(self, directory: Path) -> None:
        directory = Path(directory)
        peft.set_peft_model_state_dict(
            self.model, load_file(directory / "adapter_model.safetensors")
        )
        self.head.load_state_dict(load_file(directory / HEAD_FILE))

    def describe(self) -> dict:
        return {
            "ar_num_layers": adapt(self.model).n_layers,
            "templates": {"ar": template_record(self.template)},
        }


def template_record(template: PromptTemplate) -> dict:
    """How a sidecar names a prompt: version, sha256 and text."""
    return {"version": template.version, "sha256": template.sha256, "text": template.prompt}


def enable_checkpointing(model: nn.Module, on: bool) -> None:
    """Gradient checkpointing (non-reentrant: frozen embeddings need no input-grad hook)."""
    if on:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def build_ar(model: nn.Module, tokenizer, template: PromptTemplate, cfg, num_layers: int):
    """Truncate the base, wrap it in LoRA and add the value head."""
    enable_checkpointing(model, cfg.gradient_checkpointing)
    truncate(model, num_layers)
    return ActivationReconstructor(
        lora(model, cfg, cfg.unfreeze_norms), tokenizer, template, cfg.max_length
    )


# ---------------------------------------------------------------------------------------------
# Loading a trained pair (the pipeline's own, or a downloaded release folder)


def _read_meta(path: Path) -> dict:
    file = Path(path) / "nla_meta.yaml"
    if not file.exists():
        raise ConfigError(f"{file}: not found (is {path} an sft_av / sft_ar output folder?)")
    return yaml.safe_load(file.read_text())


def _template(meta: dict, role: str) -> PromptTemplate:
    recorded = meta["templates"][role]
    template = load_template(recorded["version"])
    if template.sha256 != recorded["sha256"]:
        raise ConfigError(
            f"prompt {recorded['version']} changed since this {role.upper()} was trained "
            f"(sha256 {template.sha256[:12]} vs recorded {recorded['sha256'][:12]})"
        )
    return template


def load_av(path: Path | str, base_dir: Path | str, **load) -> VerbalizerBase:
    """A trained AV from its folder (adapter or prefix weights + nla_meta.yaml), on the base
    in `base_dir`; `load` goes to models.load_base (quantization, compute_dtype, device)."""
    path = Path(path)
    meta = _read_meta(path)
    model, tokenizer = load_base(base_dir, **load)
    params, scale = meta["params"], meta["injection_scale_resolved"]
    if meta["av"]["kind"] == "prefix":
        av: VerbalizerBase = PrefixVerbalizer(
            model, tokenizer, params["n_prefix"], scale, params["max_length"]
        )
        av.load(path)
    else:
        tuned = peft.PeftModel.from_pretrained(model, path)
        av = ActivationVerbalizer(
            tuned, tokenizer, _template(meta, "av"), scale, params["max_length"]
        )
        if av.marker.token_id != meta["av"]["marker_token_id"]:
            raise ConfigError(
                f"{path}: marker token {av.marker.token_id} under this tokenizer, but the AV "
                f"was trained with {meta['av']['marker_token_id']}"
            )
    return av.eval()


def load_ar(path: Path | str, base_dir: Path | str, **load) -> ActivationReconstructor:
    """A trained AR from its folder (adapter + head.safetensors + nla_meta.yaml)."""
    path = Path(path)
    meta = _read_meta(path)
    model, tokenizer = load_base(base_dir, **load)
    truncate(model, meta["ar_num_layers"])
    tuned = peft.PeftModel.from_pretrained(model, path)
    ar = ActivationReconstructor(
        tuned, tokenizer, _template(meta, "ar"), meta["params"]["max_length"]
    )
    ar.head.load_state_dict(load_file(path / HEAD_FILE))
    return ar.eval()
