"""The two NLA models around a frozen base LM, and the pairs they train on.

- `verbalizer`: the AV (injection and prefix kinds), `injection`: how it receives its vector.
- `reconstructor`: the AR (blocks 0..L + LoRA + a value head).
- `pairs`: labels joined with activations; `adapters`: LoRA and adapter files;
  `loading`: a trained pair from its folders (the pipeline's or a release's).

The names below are the public API (`from nla_repro.nla import load_av, load_ar`).
"""

from nla_repro.nla.adapters import enable_checkpointing, lora, save_adapter, template_record
from nla_repro.nla.injection import (
    MARKER_CANDIDATES,
    InjectionError,
    Injector,
    Marker,
    choose_marker,
    injection_vectors,
    mean_embedding_norm,
)
from nla_repro.nla.loading import load_ar, load_av
from nla_repro.nla.pairs import read_pairs, shuffled, split_pairs, training_pairs
from nla_repro.nla.reconstructor import HEAD_FILE, ActivationReconstructor, build_ar
from nla_repro.nla.verbalizer import (
    PREFIX_FILE,
    ActivationVerbalizer,
    PrefixVerbalizer,
    VerbalizerBase,
    token_logprobs,
)

__all__ = [
    "HEAD_FILE",
    "MARKER_CANDIDATES",
    "PREFIX_FILE",
    "ActivationReconstructor",
    "ActivationVerbalizer",
    "InjectionError",
    "Injector",
    "Marker",
    "PrefixVerbalizer",
    "VerbalizerBase",
    "build_ar",
    "choose_marker",
    "enable_checkpointing",
    "injection_vectors",
    "load_ar",
    "load_av",
    "lora",
    "mean_embedding_norm",
    "read_pairs",
    "save_adapter",
    "shuffled",
    "split_pairs",
    "template_record",
    "token_logprobs",
    "training_pairs",
]
