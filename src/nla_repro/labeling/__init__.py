"""LLM calls: label backends (`backends`), retries and the quota watchdog (`retry`), asking
until a response parses (`ask`), and the eval's judge and paraphraser (`judge`).

The names below are the public API (`from nla_repro import labeling as L`).
"""

from nla_repro.labeling.ask import ask, ask_until_parsed
from nla_repro.labeling.backends import (
    KEY_ENV,
    REMOTE_BACKENDS,
    SAMPLING_FIELDS,
    AnthropicBackend,
    Backend,
    BackendSettings,
    Completion,
    GeminiBackend,
    GeminiCliBackend,
    LocalBackend,
    OpenAIBackend,
    RemoteBackend,
    make_backend,
)
from nla_repro.labeling.retry import (
    DAILY_QUOTA,
    ProviderError,
    QuotaDeadlineExceeded,
    RetryPolicy,
    call_with_retry,
    classify,
)

__all__ = [
    "DAILY_QUOTA",
    "KEY_ENV",
    "REMOTE_BACKENDS",
    "SAMPLING_FIELDS",
    "AnthropicBackend",
    "Backend",
    "BackendSettings",
    "Completion",
    "GeminiBackend",
    "GeminiCliBackend",
    "LocalBackend",
    "OpenAIBackend",
    "ProviderError",
    "QuotaDeadlineExceeded",
    "RemoteBackend",
    "RetryPolicy",
    "ask",
    "ask_until_parsed",
    "call_with_retry",
    "classify",
    "make_backend",
]
