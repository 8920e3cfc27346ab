"""Retries for provider calls: errors classified (rate limit, daily quota, transient,
malformed, fatal), jittered exponential backoff that honours `retry-after`, and a quota
watchdog that waits for a daily quota to return until a deadline."""

from __future__ import annotations

import json
import logging
import random
import re
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from nla_repro.errors import NlaError
from nla_repro.secrets import redact

log = logging.getLogger(__name__)


# A 429 whose text says the quota is per day will not clear in seconds: wait, then resume.
DAILY_QUOTA = re.compile(r"per[ _-]?day|daily|PerDay", re.I)


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


class _StatusError(Exception):
    def __init__(self, status_code: int, message: str) -> None:
        super().__init__(message)
        self.status_code = status_code
