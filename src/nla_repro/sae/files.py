"""The SAE's files in SAELens's layout (`cfg.json` + `sae_weights.safetensors`, architecture
"topk"), so `sae_lens.SAE.load_from_disk(folder)` loads them (tested)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from nla_repro.errors import SourceError
from nla_repro.io import (
    atomic_path,
    write_json,
)
from nla_repro.sae.model import TopKSAE

WEIGHTS_FILE = "sae_weights.safetensors"


CFG_FILE = "cfg.json"


SPARSITY_FILE = "sparsity.safetensors"


# The SAELens config format the files follow (6.x: architecture + metadata dict).
SAELENS_FORMAT_VERSION = "6.0.0"


def save_sae(sae: TopKSAE, folder: Path | str, metadata: dict, density=None) -> None:
    """`sae_weights.safetensors` (W_enc as (d_in, d_sae), W_dec as (d_sae, d_in), b_enc,
    b_dec) and `cfg.json` as SAELens reads them; `sparsity.safetensors` (log10 feature
    density, SAELens's name) when a density is given. Each file written atomically."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {
        "W_enc": sae.W_enc.detach().T.contiguous().cpu(),
        "W_dec": sae.W_dec.detach().contiguous().cpu(),
        "b_enc": sae.b_enc.detach().contiguous().cpu(),
        "b_dec": sae.b_dec.detach().contiguous().cpu(),
    }
    with atomic_path(folder / WEIGHTS_FILE) as tmp:
        save_file(tensors, str(tmp))
    dtype = str(sae.W_dec.dtype).removeprefix("torch.")
    cfg = {
        "architecture": "topk",
        "d_in": sae.d_model,
        "d_sae": sae.d_sae,
        "k": sae.k,
        "dtype": dtype,
        "device": "cpu",
        "apply_b_dec_to_input": True,
        "normalize_activations": "none",
        "reshape_activations": "none",
        # Decoder rows are unit norm already: nothing to rescale or fold.
        "rescale_acts_by_decoder_norm": False,
        "metadata": {"sae_lens_version": SAELENS_FORMAT_VERSION, **metadata},
    }
    write_json(cfg, folder / CFG_FILE)
    if density is not None:
        log_density = torch.as_tensor(density, dtype=torch.float32).clamp_min(1e-10).log10()
        with atomic_path(folder / SPARSITY_FILE) as tmp:
            save_file({"sparsity": log_density.contiguous()}, str(tmp))


def load_sae(folder: Path | str) -> tuple[TopKSAE, dict]:
    """An SAE saved by `save_sae` (or by SAELens with architecture topk and no activation
    normalization), and its cfg. Errors name the file and what is wrong."""
    folder = Path(folder)
    cfg_path, weights_path = folder / CFG_FILE, folder / WEIGHTS_FILE
    for path in (cfg_path, weights_path):
        if not path.exists():
            raise SourceError(f"{path}: not found (an SAE folder has {CFG_FILE}, {WEIGHTS_FILE})")
    cfg = json.loads(cfg_path.read_text())
    if cfg.get("architecture") != "topk":
        raise SourceError(f"{cfg_path}: architecture {cfg.get('architecture')!r}, not 'topk'")
    if cfg.get("normalize_activations", "none") != "none" or cfg.get(
        "rescale_acts_by_decoder_norm"
    ):
        raise SourceError(f"{cfg_path}: activation normalization or decoder-norm rescaling")
    d_in, d_sae, k = int(cfg["d_in"]), int(cfg["d_sae"]), int(cfg["k"])
    tensors = load_file(str(weights_path))
    shapes = {"W_enc": (d_in, d_sae), "W_dec": (d_sae, d_in), "b_enc": (d_sae,), "b_dec": (d_in,)}
    for name, shape in shapes.items():
        got = tuple(tensors[name].shape) if name in tensors else None
        if got != shape:
            raise SourceError(f"{weights_path}: {name} has shape {got}, {CFG_FILE} says {shape}")
    sae = TopKSAE(d_in, d_sae, k)
    with torch.no_grad():
        sae.W_enc.copy_(tensors["W_enc"].T)
        sae.W_dec.copy_(tensors["W_dec"])
        sae.b_enc.copy_(tensors["b_enc"])
        sae.b_dec.copy_(tensors["b_dec"])
    return sae.to(tensors["W_dec"].dtype), cfg
