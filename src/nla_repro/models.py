"""Base model loading, the architecture adapter, and residual capture with early exit.

The one place that knows where an architecture keeps its decoder blocks, input embeddings
and final norm. Layer `L` always means the output of decoder block `L` (0-based), which is
HF `hidden_states[L + 1]`; `residual_at_layer` hooks block `L` and stops the forward there.
"""

from __future__ import annotations

import contextlib
import copy
import itertools
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import torch
import transformers
import yaml
from torch import nn

from nla_repro.errors import ConfigError, SourceError

# Where each architecture keeps its text decoder (the module holding layers/embed/norm),
# as attribute paths from the top-level model. First match wins.
DECODER_PATHS: dict[str, tuple[str, ...]] = {
    "LlamaForCausalLM": ("model",),
    "MistralForCausalLM": ("model",),
    "Qwen2ForCausalLM": ("model",),
    "Gemma3ForCausalLM": ("model",),
    "Gemma4ForCausalLM": ("model",),
    "Gemma3ForConditionalGeneration": ("model.language_model",),
    "Gemma4ForConditionalGeneration": ("model.language_model",),
}
FALLBACK_DECODER_PATHS = ("model.language_model", "model", "language_model.model")


@dataclass(frozen=True)
class Arch:
    """The parts of a decoder-only LM that the NLA code touches."""

    decoder: nn.Module
    """The text decoder (embeddings, blocks, final norm; no LM head)."""
    layers: nn.ModuleList
    """Decoder blocks, in order."""
    embed: nn.Module
    """Input-embedding module (for Gemma it multiplies by sqrt(d) itself)."""
    final_norm: nn.Module
    """Norm applied after the last block."""
    d_model: int
    """Residual-stream width."""
    n_layers: int
    """Number of decoder blocks."""


def _get_path(obj: object, path: str) -> object | None:
    for name in path.split("."):
        obj = getattr(obj, name, None)
        if obj is None:
            return None
    return obj


def shared_copy(model: nn.Module) -> nn.Module:
    """A copy of the module tree whose parameters and buffers are the same tensors: PEFT can
    wrap it and `truncate` can cut it without touching the original, and the weights are in
    memory once."""
    memo = {id(t): t for t in itertools.chain(model.parameters(), model.buffers())}
    return copy.deepcopy(model, memo)


class SharedBase:
    """The frozen base of a process that runs several models on it (eval: two AVs, two ARs
    and the judge; rl: the AV and the AR): loaded once, each `load()` a `shared_copy`, so a
    135M-parameter base costs its weights once instead of five times. Only for models that
    never train a base weight (the caller decides); a quantized base is loaded per call
    (its packed weights are not safe to share through a deep copy)."""

    def __init__(
        self,
        model_dir: Path | str,
        quantization: str = "none",
        compute_dtype: str = "float32",
        device: str = "auto",
    ) -> None:
        self.args = (model_dir, quantization, compute_dtype, device)
        self._loaded: tuple[nn.Module, transformers.PreTrainedTokenizerBase] | None = None

    def load(self) -> tuple[nn.Module, transformers.PreTrainedTokenizerBase]:
        if self.args[1] != "none":
            return load_base(*self.args)
        if self._loaded is None:
            self._loaded = load_base(*self.args)
        model, tokenizer = self._loaded
        return shared_copy(model), copy.deepcopy(tokenizer)


def unwrap(model: nn.Module) -> nn.Module:
    """The transformers model inside a PEFT wrapper, or the model itself."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def adapt(model: nn.Module) -> Arch:
    model = unwrap(model)
    name = type(model).__name__
    for path in DECODER_PATHS.get(name, FALLBACK_DECODER_PATHS):
        decoder = _get_path(model, path)
        if decoder is not None and isinstance(getattr(decoder, "layers", None), nn.ModuleList):
            break
    else:
        raise ConfigError(f"architecture {name}: no decoder block list found")
    text_config = model.config.get_text_config()
    return Arch(
        decoder=decoder,
        layers=decoder.layers,
        embed=decoder.embed_tokens,
        final_norm=decoder.norm,
        d_model=int(text_config.hidden_size),
        n_layers=len(decoder.layers),
    )


def truncate(model: nn.Module, num_layers: int) -> Arch:
    """Keep decoder blocks 0..num_layers-1 and make the final norm the identity, in place, so
    the decoder's output is block num_layers-1's residual stream (= HF
    hidden_states[num_layers])."""
    arch = adapt(model)
    if not 0 < num_layers <= arch.n_layers:
        raise ConfigError(f"cannot keep {num_layers} blocks of a {arch.n_layers}-block model")
    arch.decoder.layers = nn.ModuleList(list(arch.layers)[:num_layers])
    arch.decoder.norm = nn.Identity()
    return adapt(model)


def norm_module_names(model: nn.Module) -> list[str]:
    """Full names of the decoder's RMSNorm modules that hold weights (what unfreeze_norms
    trains), as named from the top-level model."""
    model = unwrap(model)
    decoder = adapt(model).decoder
    prefix = next(name for name, mod in model.named_modules() if mod is decoder)
    return [
        f"{prefix}.{name}" if prefix else name
        for name, mod in decoder.named_modules()
        if type(mod).__name__.endswith("RMSNorm") and any(True for _ in mod.parameters())
    ]


class _StopForward(Exception):
    """Raised by the capture hook to skip every block after the captured one."""


@contextlib.contextmanager
def capture_layer(model: nn.Module, layer: int, stop: bool = True) -> Iterator[dict]:
    """Inside the context, a forward of `model` stores block `layer`'s output in the yielded
    dict under "hidden" and, with stop=True, ends the forward right there."""
    arch = adapt(model)
    store: dict = {}

    def hook(_module: nn.Module, _args: tuple, output: object) -> None:
        # Llama-family blocks return a tuple, Gemma-4 blocks a tensor.
        store["hidden"] = output[0] if isinstance(output, tuple) else output
        if stop:
            raise _StopForward

    handle = arch.layers[layer].register_forward_hook(hook)
    try:
        yield store
    finally:
        handle.remove()


def tokenize(tokenizer, texts: list[str], max_length: int) -> list[list[int]]:
    """Token ids as every stage sees a document: special tokens added, cut at max_length."""
    return tokenizer(texts, add_special_tokens=True, truncation=True, max_length=max_length)[
        "input_ids"
    ]


IGNORE = -100
"""Label of a position that carries no loss (the cross-entropy ignore index)."""


class Padded(NamedTuple):
    """A padded batch of token sequences."""

    ids_BT: torch.Tensor
    """Token ids, pad_id where there is no token."""
    mask_BT: torch.Tensor
    """1 on real tokens, 0 on padding."""
    offsets: list[int]
    """Per row: the column of its first real token (0 with right padding)."""
    labels_BT: torch.Tensor | None
    """The `labels` sequences padded the same way with IGNORE, when given."""


def pad_batch(
    seqs: list[list[int]],
    pad_id: int,
    side: str = "right",
    labels: list[list[int]] | None = None,
    device: torch.device | str | None = None,
) -> Padded:
    """The one padding helper: token lists -> ids, mask, offsets (and labels) on `device`.
    Position ids come from the mask (`position_ids_from_mask`), so either side gives the same
    activations as unpadded inputs."""
    if side not in ("right", "left"):
        raise ValueError(f"padding side must be 'right' or 'left', got {side!r}")
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    lab = torch.full_like(ids, IGNORE) if labels is not None else None
    offsets = []
    for row, tokens in enumerate(seqs):
        start = width - len(tokens) if side == "left" else 0
        ids[row, start : start + len(tokens)] = torch.tensor(tokens, dtype=torch.long)
        mask[row, start : start + len(tokens)] = 1
        if lab is not None:
            row_labels = labels[row]
            lab[row, start : start + len(row_labels)] = torch.tensor(row_labels, dtype=torch.long)
        offsets.append(start)
    if device is not None:
        ids, mask = ids.to(device), mask.to(device)
        lab = lab.to(device) if lab is not None else None
    return Padded(ids, mask, offsets, lab)


def batch_slices(n: int, size: int) -> Iterator[slice]:
    """slice(0, size), slice(size, 2 size), ... covering range(n)."""
    for start in range(0, n, size):
        yield slice(start, min(start + size, n))


def render_chat(tokenizer, prompt: str) -> str:
    """One user turn through the tokenizer's chat template, ready for the assistant's reply.
    Templates that know `enable_thinking` (Qwen3-style) get it False: otherwise the model
    spends its whole generation budget inside a think block."""
    extra = {"enable_thinking": False} if "enable_thinking" in _chat_template(tokenizer) else {}
    return tokenizer.apply_chat_template(
        [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True, **extra
    )


def _chat_template(tokenizer) -> str:
    template = getattr(tokenizer, "chat_template", None) or ""
    return template if isinstance(template, str) else " ".join(map(str, template.values()))


def position_ids_from_mask(attention_mask_BT: torch.Tensor) -> torch.Tensor:
    """Positions counted over real tokens only, so left padding does not shift them."""
    return (attention_mask_BT.long().cumsum(-1) - 1).clamp(min=0)


@torch.inference_mode()
def residual_at_layer(
    model: nn.Module,
    input_ids_BT: torch.Tensor,
    attention_mask_BT: torch.Tensor,
    layer: int,
) -> torch.Tensor:
    """Block `layer`'s output for a padded batch: (B, T, d). No block after `layer` runs."""
    with capture_layer(model, layer, stop=True) as store, contextlib.suppress(_StopForward):
        model(
            input_ids=input_ids_BT,
            attention_mask=attention_mask_BT,
            position_ids=position_ids_from_mask(attention_mask_BT),
            use_cache=False,
        )
    if "hidden" not in store:
        raise RuntimeError(f"block {layer} did not run during the forward pass")
    return store["hidden"]


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda:0" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"base.device={device!r} but torch sees no CUDA device")
    return torch.device(device)


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def read_base_meta(model_dir: Path | str) -> dict:
    path = Path(model_dir) / "base_meta.yaml"
    if not path.exists():
        raise SourceError(f"{path}: not found (run the base stage: dvc repro base)")
    return yaml.safe_load(path.read_text())


def load_kwargs(quantization: str, compute_dtype: str, device: torch.device) -> dict:
    """from_pretrained kwargs: dtype, and for nf4 the bitsandbytes config and device map.

    On CUDA the device map is an integer index: a "cuda:0" string map breaks bitsandbytes
    placement on some platforms (Windows among them).
    """
    dtype = DTYPES[compute_dtype]
    kwargs: dict = {"dtype": dtype}
    if quantization == "nf4":
        kwargs["quantization_config"] = transformers.BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=dtype,
        )
        kwargs["device_map"] = {"": device.index or 0} if device.type == "cuda" else {"": "cpu"}
    return kwargs


def load_base(
    model_dir: Path | str,
    quantization: str = "none",
    compute_dtype: str = "float32",
    device: str = "auto",
) -> tuple[nn.Module, transformers.PreTrainedTokenizerBase]:
    """Load the frozen base written by the base stage, in eval mode, gradients off."""
    model_dir = Path(model_dir)
    meta = read_base_meta(model_dir)
    cls = getattr(transformers, meta["architecture"])
    dev = resolve_device(device)
    kwargs = load_kwargs(quantization, compute_dtype, dev)
    model = cls.from_pretrained(model_dir, use_safetensors=True, **kwargs)
    if quantization != "nf4":
        model.to(dev)
    model.eval().requires_grad_(False)
    tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
    return model, tokenizer
