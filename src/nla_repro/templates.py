"""Versioned prompt templates and the explanation format: the one place for both.

An explanation is 2-3 short features of the text, the last one about the final token (the
extracted position), between <explanation> and </explanation>, one "- " line per feature:

    <explanation>
    - a news report about a flood
    - names a river town
    - final token: "rain", the end of a sentence
    </explanation>
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from importlib import resources

import yaml

from nla_repro.errors import ConfigError

OPEN_TAG, CLOSE_TAG = "<explanation>", "</explanation>"
MIN_FEATURES, MAX_FEATURES = 2, 3
VERDICTS = ("accept", "corrected", "reject")


@dataclass(frozen=True)
class PromptTemplate:
    """A prompt file from nla_repro/prompts/: its text, assistant prefill and sha256."""

    version: str
    prompt: str
    prefill: str
    sha256: str
    local_prompt: str = ""
    """Shorter prompt for the local backend's scaffold (default: prompt)."""
    local_scaffold: tuple[dict, ...] = ()
    """Steps the local backend writes the response in: {text}, {generate: max_tokens} for one
    generated line, {choose: [options]} for the likeliest option."""

    def render(self, local: bool = False, **fields: str) -> str:
        return (self.local_prompt if local and self.local_prompt else self.prompt).format(**fields)


def load_template(version: str) -> PromptTemplate:
    file = resources.files("nla_repro") / "prompts" / f"{version}.yaml"
    if not file.is_file():
        raise ConfigError(f"no prompt template {version!r} in nla_repro/prompts/")
    raw = file.read_bytes()
    data = yaml.safe_load(raw)
    if data.get("version") != version:
        raise ConfigError(f"prompt {version}.yaml says version {data.get('version')!r}")
    return PromptTemplate(
        version=version,
        prompt=data["prompt"],
        prefill=data.get("prefill", ""),
        sha256=hashlib.sha256(raw).hexdigest(),
        local_prompt=data.get("local_prompt", ""),
        local_scaffold=tuple(data.get("local_scaffold", ())),
    )


@dataclass(frozen=True)
class Parsed:
    """An explanation parsed from a response; `error` says why it was rejected."""

    features: tuple[str, ...] = ()
    error: str = ""

    @property
    def ok(self) -> bool:
        return not self.error

    @property
    def text(self) -> str:
        return format_explanation(self.features) if self.ok else ""


def format_explanation(features: tuple[str, ...] | list[str]) -> str:
    return "\n".join([OPEN_TAG, *(f"- {f}" for f in features), CLOSE_TAG])


def parse_explanation(response: str) -> Parsed:
    """Strict: both tags, 2-3 "- " features, the last about the final token."""
    start = response.find(OPEN_TAG)
    if start < 0:
        return Parsed(error="missing <explanation> tag")
    end = response.find(CLOSE_TAG, start)
    if end < 0:
        return Parsed(error="missing closing </explanation> tag")
    body = response[start + len(OPEN_TAG) : end]
    features = tuple(
        re.sub(r"\s+", " ", line.strip()[1:]).strip()
        for line in body.splitlines()
        if line.strip().startswith(("-", "*", "•")) and line.strip()[1:].strip()
    )
    if len(features) < MIN_FEATURES:
        return Parsed(error=f"fewer than {MIN_FEATURES} features ({len(features)})")
    if len(features) > MAX_FEATURES:
        return Parsed(error=f"more than {MAX_FEATURES} features ({len(features)})")
    if not features[-1].lower().startswith("final token"):
        return Parsed(error="last feature is not about the final token")
    return Parsed(features=features)


@dataclass(frozen=True)
class Verdict:
    """The auditor's answer: verdict, reason, and for `corrected` the new explanation."""

    verdict: str = ""
    reason: str = ""
    corrected: Parsed | None = None
    error: str = ""


def parse_verdict(response: str) -> Verdict:
    match = re.search(r"VERDICT:\s*(accept|corrected|reject)", response, re.I)
    if not match:
        return Verdict(error="no VERDICT: accept|corrected|reject line")
    verdict = match.group(1).lower()
    reason_match = re.search(r"REASON:\s*(.+)", response[match.end() :])
    reason = reason_match.group(1).strip() if reason_match else ""
    if verdict == "corrected":
        corrected = parse_explanation(response[match.end() :])
        if not corrected.ok:
            return Verdict(error=f"corrected explanation unusable: {corrected.error}")
        return Verdict(verdict=verdict, reason=reason, corrected=corrected)
    return Verdict(verdict=verdict, reason=reason)


def claims(explanation: str) -> list[str]:
    """The claims of an explanation: its features when it parses, otherwise its non-empty
    lines (tags and bullets stripped), otherwise its sentences."""
    parsed = parse_explanation(explanation)
    if parsed.ok:
        return list(parsed.features)
    body = explanation.replace(OPEN_TAG, "\n").replace(CLOSE_TAG, "\n")
    lines = [re.sub(r"^\s*[-*•]\s*", "", ln).strip() for ln in body.splitlines()]
    lines = [ln for ln in lines if ln]
    if len(lines) == 1:
        lines = [s.strip() for s in re.split(r"(?<=[.!?])\s+", lines[0]) if s.strip()]
    return lines


def join_claims(parts: list[str]) -> str:
    """An explanation made of these claims, in the canonical format."""
    return format_explanation(parts) if parts else ""
