"""Label backends behind one interface: `local` (the base instruct model through its chat
template, batched; the offline default), `anthropic`, `openai` and `gemini` through their
official SDKs (imported only when chosen; their own retries are off so that one policy,
`labeling.retry`, governs all), and the `gemini` CLI as a subprocess. Keys come from the
environment only; every error message is redacted.

A backend's generation settings are a `BackendSettings`; `backend.with_settings(...)` derives
a backend with other sampling settings that shares the loaded model or client."""

from __future__ import annotations

import copy
import dataclasses
import json
import re
import subprocess
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from nla_repro import platform
from nla_repro.errors import ConfigError
from nla_repro.generation import decode, stop_ids
from nla_repro.labeling.retry import (
    ProviderError,
    RetryPolicy,
    _StatusError,
    call_with_retry,
    classify,
)
from nla_repro.models import (
    SharedBase,
    load_base,
    pad_batch,
    position_ids_from_mask,
    read_base_meta,
    render_chat,
)
from nla_repro.secrets import get_secret
from nla_repro.seeds import derive_seed

KEY_ENV = {
    "anthropic": ("ANTHROPIC_API_KEY",),
    "openai": ("OPENAI_API_KEY",),
    "gemini": ("GEMINI_API_KEY", "GOOGLE_API_KEY"),
}


@dataclass
class Completion:
    """One response; `error` is set (and text empty) when the response was unusable."""

    text: str
    input_tokens: int = 0
    output_tokens: int = 0
    latency_s: float = 0.0
    attempts: int = 1
    error: str = ""


@dataclass(frozen=True)
class BackendSettings:
    """How a backend generates (the label stage fills it from `label.*`, the eval's judge and
    paraphraser from `eval.judge_*`)."""

    batch_size: int = 16
    """Prompts per `complete` call (the local backend generates them together)."""
    max_new_tokens: int = 96
    """Length cap of one response, in tokens."""
    temperature: float = 0.7
    """Sampling temperature (0: greedy; the anthropic SDK 2.x takes none)."""
    base_url: str | None = None
    """Provider endpoint override (a proxy, a batch gateway, a test server)."""
    timeout_s: float = 60.0
    """Timeout of one provider request."""

    @classmethod
    def of(cls, cfg: Any) -> BackendSettings:
        """The settings fields of any config that has them (LabelConfig does)."""
        return cls(**{f.name: getattr(cfg, f.name) for f in dataclasses.fields(cls)})


SAMPLING_FIELDS = ("batch_size", "max_new_tokens", "temperature")
"""Settings `with_settings` may change: they do not touch the loaded model or the client."""


class Backend(ABC):
    """Completes prompts. `batch_size` prompts go to `complete` at once."""

    name: str
    model: str
    batch_size: int = 1
    settings: BackendSettings
    scaffolded: bool = False
    """True for a backend too small to follow a free-form format: it writes inside a
    template's `local_scaffold` (fixed text, one generated line per field, choices) and the
    judge asks it one scale at a time."""

    def with_settings(self, **changes: Any) -> Backend:
        """The same backend (sharing its loaded model or client) with other sampling
        settings, e.g. `judge.with_settings(temperature=0.9)` for a paraphraser."""
        unknown = sorted(set(changes) - set(SAMPLING_FIELDS))
        if unknown:
            raise ValueError(f"with_settings: {unknown} cannot change; only {SAMPLING_FIELDS}")
        other = copy.copy(self)
        other.settings = dataclasses.replace(self.settings, **changes)
        other.batch_size = other.settings.batch_size
        return other

    @abstractmethod
    def complete(self, prompts: list[str], prefill: str, seed: int) -> list[Completion]:
        """One Completion per prompt, in order. Backends that support it (local, anthropic)
        send the prefill as the start of the response; the others ignore it."""


class LocalBackend(Backend):
    """The base instruct model through its chat template, batched, left-padded."""

    name = "local"
    scaffolded = True

    def __init__(self, model, tokenizer, name: str, settings: BackendSettings) -> None:
        self.lm, self.tokenizer, self.model = model, tokenizer, name
        self.batch_size, self.settings = settings.batch_size, settings
        self.tokenizer.padding_side = "left"
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token

    def _chat(self, prompts: list[str]) -> list[str]:
        return [render_chat(self.tokenizer, p) for p in prompts]

    def _generate(
        self, contexts: list[str], max_new_tokens: int, seed: int, one_line: bool = False
    ) -> tuple[list[str], list[int], list[int]]:
        """Continuations of the contexts, with input and output token counts."""
        enc = self.tokenizer(contexts, return_tensors="pt", padding=True, add_special_tokens=False)
        enc = enc.to(self.lm.device)
        sample = self.settings.temperature > 0
        stop = None
        if one_line:

            def stop(_row: int, tokens: list[int]) -> bool:
                return "\n" in self.tokenizer.decode(tokens, skip_special_tokens=True)

        torch.manual_seed(seed)
        got = decode(
            self.lm,
            enc["attention_mask"],
            [self.settings.temperature if sample else 0.0] * len(contexts),
            max_new_tokens,
            stop_ids(self.lm, self.tokenizer),
            top_p=0.95 if sample else 1.0,
            stop_text=stop,
            input_ids=enc["input_ids"],
        )
        texts = self.tokenizer.batch_decode(got.tokens, skip_special_tokens=True)
        if one_line:
            texts = [t.split("\n")[0].strip() for t in texts]
        n_in = enc["attention_mask"].sum(dim=1).tolist()
        pad = self.tokenizer.pad_token_id
        n_out = [sum(t != pad for t in row) for row in got.tokens]
        return texts, [int(i) for i in n_in], n_out

    def _last_logits(self, seqs: list[list[int]], keep: int) -> torch.Tensor:
        """Logits of the last `keep` positions of each sequence, (B, keep, V) fp32: left
        padded, positions from the mask, the LM head on those positions only (a judge
        prompt is hundreds of tokens; full logits would be B x T x vocab floats)."""
        pad = self.tokenizer.pad_token_id
        ids, mask, _, _ = pad_batch(seqs, pad, "left", device=self.lm.device)
        out = self.lm(
            input_ids=ids,
            attention_mask=mask,
            position_ids=position_ids_from_mask(mask),
            use_cache=False,
            logits_to_keep=keep,
        )
        return out.logits.float().cpu()

    @torch.inference_mode()
    def _choose(self, contexts: list[str], options: list[str]) -> list[str]:
        """The option with the highest log-probability after each context."""
        scores = torch.empty(len(contexts), len(options))
        ctx_ids = [self.tokenizer(c, add_special_tokens=False).input_ids for c in contexts]
        option_ids = [self.tokenizer(o, add_special_tokens=False).input_ids for o in options]
        if all(len(o) == 1 for o in option_ids):
            # Single-token options (a 1-5 score, A/B): one forward, next-token log-probs.
            logp = self._next_token_logprobs(ctx_ids)
            return [options[i] for i in logp[:, [o[0] for o in option_ids]].argmax(1).tolist()]
        for k, opt in enumerate(option_ids):
            logp = self._last_logits([c + opt for c in ctx_ids], len(opt) + 1)[:, :-1]
            picked = logp.log_softmax(-1)[:, torch.arange(len(opt)), torch.tensor(opt)]
            scores[:, k] = picked.sum(dim=1)
        return [options[i] for i in scores.argmax(dim=1).tolist()]

    def _next_token_logprobs(self, ctx_ids: list[list[int]]) -> torch.Tensor:
        return self._last_logits(ctx_ids, 1)[:, -1].log_softmax(-1)

    def complete(self, prompts: list[str], prefill: str, seed: int) -> list[Completion]:
        start = time.perf_counter()
        contexts = [c + prefill for c in self._chat(prompts)]
        texts, n_in, n_out = self._generate(contexts, self.settings.max_new_tokens, seed)
        latency = (time.perf_counter() - start) / len(prompts)
        return [
            Completion(prefill + t, i, o, latency)
            for t, i, o in zip(texts, n_in, n_out, strict=True)
        ]

    def complete_scaffold(
        self, prompts: list[str], scaffold: tuple[dict, ...], fields: list[dict], seed: int
    ) -> list[Completion]:
        """Write each response inside a scaffold: fixed text, generated lines, choices."""
        start = time.perf_counter()
        base = self._chat(prompts)
        written = [""] * len(prompts)
        errors = [""] * len(prompts)
        n_in, n_out = [0] * len(prompts), [0] * len(prompts)
        for step, spec in enumerate(scaffold):
            contexts = [b + w for b, w in zip(base, written, strict=True)]
            if "text" in spec:
                added = [spec["text"].format(**f) for f in fields]
            elif "generate" in spec:
                step_seed = derive_seed(seed, step, stream="offset")
                added, n_in, outs = self._generate(contexts, spec["generate"], step_seed, True)
                n_out = [a + b for a, b in zip(n_out, outs, strict=True)]
                # A feature the model left blank would pass the format check on scaffold alone.
                for r, a in enumerate(added):
                    if not a.strip() and not errors[r]:
                        errors[r] = f"empty generated line at scaffold step {step}"
            else:
                added = self._choose(contexts, list(spec["choose"]))
            written = [w + a for w, a in zip(written, added, strict=True)]
        latency = (time.perf_counter() - start) / len(prompts)
        return [
            Completion("" if e else w, i, o, latency, error=e)
            for w, i, o, e in zip(written, n_in, n_out, errors, strict=True)
        ]


class RemoteBackend(Backend):
    """One request per prompt through `_call`, under the retry policy."""

    def __init__(self, model: str, settings: BackendSettings, policy: RetryPolicy) -> None:
        self.model, self.settings, self.policy = model, settings, policy

    @abstractmethod
    def _request(self, prompt: str, prefill: str) -> Any:
        """One request; raises the SDK's error (or a ProviderError) on failure."""

    @abstractmethod
    def _parse(self, response: Any, prefill: str) -> Completion:
        """Text and token counts of a successful response."""

    def _call(self, prompt: str, prefill: str) -> Completion:
        response = self._request(prompt, prefill)
        try:
            return self._parse(response, prefill)
        except (AttributeError, TypeError, IndexError, KeyError, ValueError) as err:
            # A 200 of an unexpected shape: retried, then recorded; never a crash.
            raise ProviderError("malformed", f"unexpected response: {err!r}") from None

    def complete(self, prompts: list[str], prefill: str, seed: int) -> list[Completion]:
        out = []
        for prompt in prompts:
            start = time.perf_counter()
            try:
                comp, attempts = call_with_retry(
                    lambda p=prompt: self._call(p, prefill), self.policy
                )
            except ProviderError as err:
                if err.kind != "malformed":
                    raise  # the stage stops; finished chunks stay, a rerun resumes
                comp = Completion("", error=f"malformed response: {err}")
                attempts = self.policy.max_retries + 1
            comp.attempts, comp.latency_s = attempts, time.perf_counter() - start
            out.append(comp)
        return out


def _api_key(backend: str) -> str:
    for name in KEY_ENV[backend]:
        if key := get_secret(name):
            return key
    raise ConfigError(f"label.backend={backend} needs {' or '.join(KEY_ENV[backend])} set")


class AnthropicBackend(RemoteBackend):
    name = "anthropic"

    def __init__(self, model: str, settings: BackendSettings, policy: RetryPolicy) -> None:
        super().__init__(model, settings, policy)
        import anthropic

        self.client = anthropic.Anthropic(
            api_key=_api_key("anthropic"),
            base_url=settings.base_url,
            max_retries=0,
            timeout=settings.timeout_s,
        )

    def _request(self, prompt: str, prefill: str) -> Any:
        messages: list[dict] = [{"role": "user", "content": prompt}]
        if prefill.strip():  # the API refuses a prefill that ends in whitespace
            messages.append({"role": "assistant", "content": prefill.rstrip()})
        # No temperature: the anthropic SDK (2.x) has no sampling parameters any more, and
        # passing one is a TypeError before any request is sent.
        return self.client.messages.create(
            model=self.model, max_tokens=self.settings.max_new_tokens, messages=messages
        )

    def _parse(self, r: Any, prefill: str) -> Completion:
        text = "".join(b.text for b in r.content if getattr(b, "type", "") == "text")
        return Completion(prefill.rstrip() + text, r.usage.input_tokens, r.usage.output_tokens)


class OpenAIBackend(RemoteBackend):
    name = "openai"

    def __init__(self, model: str, settings: BackendSettings, policy: RetryPolicy) -> None:
        super().__init__(model, settings, policy)
        import openai

        self.client = openai.OpenAI(
            api_key=_api_key("openai"),
            base_url=settings.base_url,
            max_retries=0,
            timeout=settings.timeout_s,
        )

    def _request(self, prompt: str, prefill: str) -> Any:
        return self.client.chat.completions.create(
            model=self.model,
            messages=[{"role": "user", "content": prompt}],
            max_completion_tokens=self.settings.max_new_tokens,
            temperature=self.settings.temperature,
        )

    def _parse(self, r: Any, prefill: str) -> Completion:
        text = r.choices[0].message.content or ""
        return Completion(text, r.usage.prompt_tokens, r.usage.completion_tokens)


class GeminiBackend(RemoteBackend):
    name = "gemini"

    def __init__(self, model: str, settings: BackendSettings, policy: RetryPolicy) -> None:
        super().__init__(model, settings, policy)
        from google import genai
        from google.genai import types

        self.types = types
        self.client = genai.Client(
            api_key=_api_key("gemini"),
            http_options=types.HttpOptions(
                base_url=settings.base_url, timeout=int(settings.timeout_s * 1000)
            ),
        )

    def _request(self, prompt: str, prefill: str) -> Any:
        return self.client.models.generate_content(
            model=self.model,
            contents=prompt,
            config=self.types.GenerateContentConfig(
                max_output_tokens=self.settings.max_new_tokens,
                temperature=self.settings.temperature,
            ),
        )

    def _parse(self, r: Any, prefill: str) -> Completion:
        if not r.candidates:  # blocked or empty: nothing to parse
            raise ValueError("response has no candidates")
        usage = r.usage_metadata
        return Completion(
            r.text or "",
            int(getattr(usage, "prompt_token_count", 0) or 0),
            int(getattr(usage, "candidates_token_count", 0) or 0),
        )


class GeminiCliBackend(RemoteBackend):
    """The `gemini` command line as a subprocess (resolved through PATH, .CMD shims too)."""

    name = "gemini-cli"

    def __init__(self, model: str, settings: BackendSettings, policy: RetryPolicy) -> None:
        super().__init__(model, settings, policy)
        self.exe = platform.resolve_cli("gemini")

    def _request(self, prompt: str, prefill: str) -> Any:
        # The prompt goes on stdin (headless mode when stdin is not a terminal): as an argument,
        # a multi-line prompt would be cut and its quotes mangled by cmd.exe running the
        # Windows gemini.CMD shim.
        cmd = [self.exe, "--model", self.model, "--output-format", "json"]
        proc = subprocess.run(
            cmd,
            input=prompt,
            capture_output=True,
            text=True,
            timeout=self.settings.timeout_s,
            encoding="utf-8",
        )
        if proc.returncode != 0:
            message = (proc.stderr or proc.stdout).strip()[-500:]
            status = 429 if re.search(r"\b429\b|RESOURCE_EXHAUSTED|quota", message, re.I) else 500
            raise ProviderError(
                classify(_StatusError(status, message)).kind, f"gemini CLI: {message}"
            )
        return proc.stdout

    def _parse(self, stdout: Any, prefill: str) -> Completion:
        data = json.loads(stdout)
        tokens = next(iter(data.get("stats", {}).get("models", {}).values()), {}).get("tokens", {})
        return Completion(
            data["response"], int(tokens.get("prompt", 0)), int(tokens.get("candidates", 0))
        )


REMOTE_BACKENDS: dict[str, type[RemoteBackend]] = {
    "anthropic": AnthropicBackend,
    "openai": OpenAIBackend,
    "gemini": GeminiBackend,
    "gemini-cli": GeminiCliBackend,
}


def make_backend(
    kind: str,
    model: str | None,
    settings: BackendSettings,
    base,
    base_dir: Path,
    policy: RetryPolicy,
    shared: SharedBase | None = None,
) -> Backend:
    """The backend `kind` for provider model `model` (local: the base model in `base_dir`,
    loaded with `base`'s quantization, dtype and device, or a copy of `shared` that shares
    its weights; `model` is ignored)."""
    if kind == "local":
        if shared is not None:
            lm, tokenizer = shared.load()
        else:
            lm, tokenizer = load_base(base_dir, base.quantization, base.compute_dtype, base.device)
        return LocalBackend(lm, tokenizer, read_base_meta(base_dir)["source"]["name"], settings)
    if kind not in REMOTE_BACKENDS:
        raise ConfigError(f"unknown backend {kind!r}; known: local, {', '.join(REMOTE_BACKENDS)}")
    if not model:
        raise ConfigError(f"backend {kind} needs a provider model name")
    return REMOTE_BACKENDS[kind](model, settings, policy)
