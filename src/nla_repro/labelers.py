"""Labeling backends behind one interface, with retries, backoff and a quota watchdog.

Backends: `local` (the base instruct model through its chat template, batched; the offline
default), `anthropic`, `openai` and `gemini` through their official SDKs (imported only when
chosen; their own retries are off so that one policy here governs all), and the `gemini` CLI
as a subprocess. Keys come from the environment only; every error message is redacted.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import random
import re
import subprocess
import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from nla_repro import platform
from nla_repro.errors import ConfigError, NlaError
from nla_repro.models import load_base, read_base_meta
from nla_repro.secrets import get_secret, redact

log = logging.getLogger(__name__)

KEY_ENV = {
    "anthropic": ("ANTHROPIC_API_KEY",),
    "openai": ("OPENAI_API_KEY",),
    "gemini": ("GEMINI_API_KEY", "GOOGLE_API_KEY"),
}
# A 429 whose text says the quota is per day will not clear in seconds: wait, then resume.
DAILY_QUOTA = re.compile(r"per[ _-]?day|daily|PerDay", re.I)


@dataclass
class Completion:
    """One response; `error` is set (and text empty) when the response was unusable."""

    text: str
    input_tokens: int = 0
    output_tokens: int = 0
    latency_s: float = 0.0
    attempts: int = 1
    error: str = ""


class ProviderError(NlaError):
    """A failed call, classified: rate_limit, quota, transient, malformed or fatal."""

    def __init__(self, kind: str, message: str, retry_after: float | None = None) -> None:
        super().__init__(redact(message))
        self.kind = kind
        self.retry_after = retry_after


class QuotaDeadlineExceeded(NlaError):
    """The daily quota did not come back before label.quota_deadline_h."""


def _retry_after(err: Exception) -> float | None:
    headers = getattr(getattr(err, "response", None), "headers", None) or {}
    value = headers.get("retry-after") if hasattr(headers, "get") else None
    try:
        return float(value) if value is not None else None
    except ValueError:
        return None


def classify(err: Exception) -> ProviderError:
    """Map an SDK, HTTP or subprocess error to what the retry policy should do with it."""
    if isinstance(err, ProviderError):
        return err
    name = type(err).__name__
    status = getattr(err, "status_code", None) or getattr(err, "code", None)
    message = f"{name}: {err}"
    if status == 429 or "RESOURCE_EXHAUSTED" in message:
        kind = "quota" if DAILY_QUOTA.search(message) else "rate_limit"
        return ProviderError(kind, message, _retry_after(err))
    if isinstance(status, int) and status >= 500:
        return ProviderError("transient", message, _retry_after(err))
    if isinstance(err, TimeoutError | subprocess.TimeoutExpired) or re.search(
        r"Timeout|Connection|ReadError|RemoteProtocol", name
    ):
        return ProviderError("transient", message)
    if isinstance(err, json.JSONDecodeError | ValueError | KeyError | IndexError) or re.search(
        r"Decode|Validation|ResponseValidation", name
    ):
        return ProviderError("malformed", message)
    return ProviderError("fatal", message)


@dataclass
class RetryPolicy:
    max_retries: int = 5
    """Retries of a rate-limited, failed or malformed call before giving up."""
    backoff_base_s: float = 1.0
    """First backoff; doubles per retry, with 50-150% jitter."""
    backoff_max_s: float = 60.0
    """Cap of one backoff."""
    quota_wait_s: float = 900.0
    """Wait after a daily-quota error before trying again."""
    deadline: float = float("inf")
    """Epoch seconds after which a quota wait gives up."""
    rng: random.Random = field(default_factory=lambda: random.Random(0))
    sleep: Callable[[float], None] = time.sleep
    now: Callable[[], float] = time.time


def call_with_retry(fn: Callable[[], Any], policy: RetryPolicy) -> tuple[Any, int]:
    """(result, attempts). Raises ProviderError when retries run out or the error is fatal,
    QuotaDeadlineExceeded when the quota does not return before the deadline."""
    attempt = 0
    failures = 0
    while True:
        attempt += 1
        try:
            return fn(), attempt
        except Exception as raw:
            err = classify(raw)
        if err.kind == "fatal":
            raise err
        if err.kind == "quota":
            if policy.now() + policy.quota_wait_s > policy.deadline:
                raise QuotaDeadlineExceeded(
                    f"daily quota exhausted and the deadline passes before it returns: {err}"
                )
            log.warning("daily quota exhausted; waiting %.0f s, then resuming", policy.quota_wait_s)
            policy.sleep(policy.quota_wait_s)
            continue
        failures += 1
        if failures > policy.max_retries:
            raise err
        backoff = min(policy.backoff_max_s, policy.backoff_base_s * 2 ** (failures - 1))
        delay = backoff * (0.5 + policy.rng.random())
        if err.retry_after is not None:  # the server's wait is a floor; jitter never cuts it
            # ... but a wait longer than the quota watchdog's is capped at that.
            delay = min(max(delay, err.retry_after), policy.quota_wait_s)
        log.info("%s (%s); retry %d in %.1f s", err.kind, err, failures, delay)
        policy.sleep(delay)


class Backend(ABC):
    """Completes prompts. `batch_size` prompts go to `complete` at once."""

    name: str
    model: str
    batch_size: int = 1

    @abstractmethod
    def complete(self, prompts: list[str], prefill: str, seed: int) -> list[Completion]:
        """One Completion per prompt, in order. Backends that support it (local, anthropic)
        send the prefill as the start of the response; the others ignore it."""


class LocalBackend(Backend):
    """The base instruct model through its chat template, batched, left-padded."""

    name = "local"

    def __init__(self, model, tokenizer, name: str, cfg) -> None:
        self.lm, self.tokenizer, self.model = model, tokenizer, name
        self.batch_size, self.cfg = cfg.batch_size, cfg
        self.tokenizer.padding_side = "left"
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token

    def _chat(self, prompts: list[str]) -> list[str]:
        return [
            self.tokenizer.apply_chat_template(
                [{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True
            )
            for p in prompts
        ]

    def _generate(
        self, contexts: list[str], max_new_tokens: int, seed: int, one_line: bool = False
    ) -> tuple[list[str], list[int], list[int]]:
        """Continuations of the contexts, with input and output token counts."""
        enc = self.tokenizer(contexts, return_tensors="pt", padding=True, add_special_tokens=False)
        enc = enc.to(self.lm.device)
        sample = self.cfg.temperature > 0
        torch.manual_seed(seed)
        with torch.inference_mode():
            out = self.lm.generate(
                **enc,
                max_new_tokens=max_new_tokens,
                do_sample=sample,
                temperature=self.cfg.temperature if sample else None,
                top_p=0.95 if sample else None,
                pad_token_id=self.tokenizer.pad_token_id,
                stop_strings=["\n"] if one_line else None,
                tokenizer=self.tokenizer if one_line else None,
            )
        new = out[:, enc["input_ids"].shape[1] :]
        texts = self.tokenizer.batch_decode(new, skip_special_tokens=True)
        if one_line:
            texts = [t.split("\n")[0].strip() for t in texts]
        n_in = enc["attention_mask"].sum(dim=1).tolist()
        n_out = (new != self.tokenizer.pad_token_id).sum(dim=1).tolist()
        return texts, [int(i) for i in n_in], [int(o) for o in n_out]

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
        for k, option in enumerate(options):
            opt = self.tokenizer(option, add_special_tokens=False).input_ids
            seqs = [c + opt for c in ctx_ids]
            width = max(len(q) for q in seqs)
            ids = torch.full((len(seqs), width), self.tokenizer.pad_token_id)
            mask = torch.zeros_like(ids)
            for r, q in enumerate(seqs):
                ids[r, : len(q)], mask[r, : len(q)] = torch.tensor(q), 1
            logp = self.lm(input_ids=ids.to(self.lm.device), attention_mask=mask.to(self.lm.device))
            logp = logp.logits.float().log_softmax(-1).cpu()
            for r, c in enumerate(ctx_ids):
                positions = torch.arange(len(c) - 1, len(c) - 1 + len(opt))
                scores[r, k] = logp[r, positions, torch.tensor(opt)].sum()
        return [options[i] for i in scores.argmax(dim=1).tolist()]

    def _next_token_logprobs(self, ctx_ids: list[list[int]]) -> torch.Tensor:
        width = max(len(c) for c in ctx_ids)
        ids = torch.full((len(ctx_ids), width), self.tokenizer.pad_token_id)
        mask = torch.zeros_like(ids)
        for r, c in enumerate(ctx_ids):
            ids[r, : len(c)], mask[r, : len(c)] = torch.tensor(c), 1
        dev = self.lm.device
        logits = self.lm(input_ids=ids.to(dev), attention_mask=mask.to(dev)).logits
        last = torch.tensor([len(c) - 1 for c in ctx_ids])
        return logits.float().cpu()[torch.arange(len(ctx_ids)), last].log_softmax(-1)

    def complete(self, prompts: list[str], prefill: str, seed: int) -> list[Completion]:
        start = time.perf_counter()
        contexts = [c + prefill for c in self._chat(prompts)]
        texts, n_in, n_out = self._generate(contexts, self.cfg.max_new_tokens, seed)
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
                added, n_in, outs = self._generate(contexts, spec["generate"], seed + step, True)
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

    def __init__(self, model: str, cfg, policy: RetryPolicy) -> None:
        self.model, self.cfg, self.policy = model, cfg, policy

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

    def __init__(self, model: str, cfg, policy: RetryPolicy) -> None:
        super().__init__(model, cfg, policy)
        import anthropic

        self.client = anthropic.Anthropic(
            api_key=_api_key("anthropic"),
            base_url=cfg.base_url,
            max_retries=0,
            timeout=cfg.timeout_s,
        )

    def _request(self, prompt: str, prefill: str) -> Any:
        messages: list[dict] = [{"role": "user", "content": prompt}]
        if prefill.strip():  # the API refuses a prefill that ends in whitespace
            messages.append({"role": "assistant", "content": prefill.rstrip()})
        # No temperature: the anthropic SDK (2.x) has no sampling parameters any more, and
        # passing one is a TypeError before any request is sent.
        return self.client.messages.create(
            model=self.model, max_tokens=self.cfg.max_new_tokens, messages=messages
        )

    def _parse(self, r: Any, prefill: str) -> Completion:
        text = "".join(b.text for b in r.content if getattr(b, "type", "") == "text")
        return Completion(prefill.rstrip() + text, r.usage.input_tokens, r.usage.output_tokens)


class OpenAIBackend(RemoteBackend):
    name = "openai"

    def __init__(self, model: str, cfg, policy: RetryPolicy) -> None:
        super().__init__(model, cfg, policy)
        import openai

        self.client = openai.OpenAI(
            api_key=_api_key("openai"),
            base_url=cfg.base_url,
            max_retries=0,
            timeout=cfg.timeout_s,
        )

    def _request(self, prompt: str, prefill: str) -> Any:
        return self.client.chat.completions.create(
            model=self.model,
            messages=[{"role": "user", "content": prompt}],
            max_completion_tokens=self.cfg.max_new_tokens,
            temperature=self.cfg.temperature,
        )

    def _parse(self, r: Any, prefill: str) -> Completion:
        text = r.choices[0].message.content or ""
        return Completion(text, r.usage.prompt_tokens, r.usage.completion_tokens)


class GeminiBackend(RemoteBackend):
    name = "gemini"

    def __init__(self, model: str, cfg, policy: RetryPolicy) -> None:
        super().__init__(model, cfg, policy)
        from google import genai
        from google.genai import types

        self.types = types
        self.client = genai.Client(
            api_key=_api_key("gemini"),
            http_options=types.HttpOptions(
                base_url=cfg.base_url, timeout=int(cfg.timeout_s * 1000)
            ),
        )

    def _request(self, prompt: str, prefill: str) -> Any:
        return self.client.models.generate_content(
            model=self.model,
            contents=prompt,
            config=self.types.GenerateContentConfig(
                max_output_tokens=self.cfg.max_new_tokens, temperature=self.cfg.temperature
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

    def __init__(self, model: str, cfg, policy: RetryPolicy) -> None:
        super().__init__(model, cfg, policy)
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
            timeout=self.cfg.timeout_s,
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


class _StatusError(Exception):
    def __init__(self, status_code: int, message: str) -> None:
        super().__init__(message)
        self.status_code = status_code


REMOTE_BACKENDS: dict[str, type[RemoteBackend]] = {
    "anthropic": AnthropicBackend,
    "openai": OpenAIBackend,
    "gemini": GeminiBackend,
    "gemini-cli": GeminiCliBackend,
}


def make_backend(cfg, base, base_dir: Path, policy: RetryPolicy) -> Backend:
    """The backend `cfg.backend` for model `cfg.labeler_model` (local: the base model in
    `base_dir`, loaded with `base`'s quantization, dtype and device)."""
    if cfg.backend == "local":
        model, tokenizer = load_base(base_dir, base.quantization, base.compute_dtype, base.device)
        return LocalBackend(model, tokenizer, read_base_meta(base_dir)["source"]["name"], cfg)
    return REMOTE_BACKENDS[cfg.backend](cfg.labeler_model, cfg, policy)


def ask(backend: Backend, template, rows: list[dict], seed: int) -> list[Completion]:
    """Responses to the template rendered for each row, in batches of the backend's size;
    the local backend writes inside the template's scaffold when it has one."""
    out: list[Completion] = []
    for i in range(0, len(rows), backend.batch_size):
        batch = rows[i : i + backend.batch_size]
        if isinstance(backend, LocalBackend) and template.local_scaffold:
            prompts = [template.render(local=True, **r) for r in batch]
            out += backend.complete_scaffold(prompts, template.local_scaffold, batch, seed + i)
        else:
            prompts = [template.render(**r) for r in batch]
            out += backend.complete(prompts, template.prefill, seed + i)
    return out


def ask_until_parsed(backend, template, rows: list[dict], parse, max_attempts, seed) -> list:
    """Ask until each response parses or max_attempts runs out: (parsed, completion, tries).
    `parse(text)` returns an object whose `.error` is empty when the response is usable."""
    results: list[tuple | None] = [None] * len(rows)
    tries = [0] * len(rows)
    spent = [(0, 0, 0.0)] * len(rows)  # tokens and latency of every attempt: all are billed
    pending = list(range(len(rows)))
    for attempt in range(max_attempts):
        comps = ask(backend, template, [rows[i] for i in pending], seed + 7919 * attempt)
        still = []
        for i, comp in zip(pending, comps, strict=True):
            tries[i] += comp.attempts
            n_in, n_out, secs = spent[i]
            spent[i] = (n_in + comp.input_tokens, n_out + comp.output_tokens, secs + comp.latency_s)
            comp = dataclasses.replace(
                comp, input_tokens=spent[i][0], output_tokens=spent[i][1], latency_s=spent[i][2]
            )
            parsed = parse(comp.text) if not comp.error else None
            results[i] = (parsed, comp, tries[i])
            if parsed is None or parsed.error:
                still.append(i)
        pending = still
        if not pending:
            break
    return results
