"""Secrets come from the environment only and never reach a log, a file or an exception.

`redact` is applied to every message this package prints or stores that could carry text
from a provider or a subprocess.
"""

from __future__ import annotations

import os

SECRET_ENV_VARS = (
    "HF_TOKEN",
    "HUGGING_FACE_HUB_TOKEN",
    "ANTHROPIC_API_KEY",
    "OPENAI_API_KEY",
    "GEMINI_API_KEY",
    "GOOGLE_API_KEY",
)


def get_secret(name: str) -> str | None:
    value = os.environ.get(name, "").strip()
    return value or None


def redact(text: str) -> str:
    """The text with the value of every secret environment variable replaced by ***."""
    for name in SECRET_ENV_VARS:
        value = get_secret(name)
        if value and len(value) >= 4:
            text = text.replace(value, "***")
    return text
