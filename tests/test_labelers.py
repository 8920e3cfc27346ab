"""Remote labeling backends against a scripted local HTTP server (never a real provider), the
gemini CLI through a fake executable, and the label stage end to end: retries, backoff, the
quota watchdog, budgets, resume after an outage, and secrets that never leave the process."""

from __future__ import annotations

import collections
import json
import logging
import os
import random
import re
import stat
import subprocess
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
from conftest import SAMPLE_TEXTS, save_model_dir, tiny_llama, write_corpus

from nla_repro import config as C
from nla_repro import labeling as L
from nla_repro import platform
from nla_repro.__main__ import main
from nla_repro.errors import ConfigError, SourceError
from nla_repro.labeling.retry import _StatusError
from nla_repro.schemas import LABELS, read_parquet
from nla_repro.secrets import redact
from nla_repro.templates import format_explanation, load_template, parse_explanation, parse_verdict

SENTINEL = "sk-SENTINEL-1234567890"
KEY_VARS = ("ANTHROPIC_API_KEY", "OPENAI_API_KEY", "GEMINI_API_KEY")
PROVIDERS = ("anthropic", "openai", "gemini")
TIMEOUT_S = 0.5
MAX_REQUESTS = 300  # a runaway retry loop hits this cap (then only 500s) instead of spinning

# ---------------------------------------------------------------------------------------------
# The scripted server


@dataclass
class Reply:
    """What the server answers to one request; rendered in the wire format of the provider."""

    status: int = 200
    text: str = ""
    input_tokens: int = 7
    output_tokens: int = 3
    message: str = ""
    google_status: str = ""
    headers: dict[str, str] = field(default_factory=dict)
    delay: float = 0.0
    truncate: bool = False
    raw: dict | None = None  # a 200 body sent as it is, instead of the provider's format


def ok(text: str, input_tokens: int = 7, output_tokens: int = 3) -> Reply:
    return Reply(text=text, input_tokens=input_tokens, output_tokens=output_tokens)


def rate_limited(retry_after: str = "7") -> Reply:
    return Reply(429, message="rate limit exceeded", headers={"retry-after": retry_after})


def daily_quota() -> Reply:
    return Reply(
        429,
        message="Quota exceeded for quota metric 'requests per day'",
        google_status="RESOURCE_EXHAUSTED",
    )


def server_error() -> Reply:
    return Reply(500, message="internal error")


def unauthorized() -> Reply:
    return Reply(401, message="invalid api key")


def too_slow() -> Reply:
    return Reply(text="too late", delay=TIMEOUT_S + 1.0)


def truncated() -> Reply:
    return Reply(text="cut off", truncate=True)


@dataclass
class Request:
    path: str
    headers: dict[str, str]  # lower-cased names
    body: Any

    @property
    def provider(self) -> str:
        if self.path.endswith("/messages"):
            return "anthropic"
        if self.path.endswith("/chat/completions"):
            return "openai"
        return "gemini" if self.path.endswith(":generateContent") else "unknown"

    @property
    def model(self) -> str:
        if self.provider == "gemini":
            return re.search(r"/models/([^/:]+):generateContent$", self.path).group(1)
        return self.body["model"]

    @property
    def prompt(self) -> str:
        if self.provider == "gemini":
            return self.body["contents"][0]["parts"][0]["text"]
        return self.body["messages"][0]["content"]

    @property
    def prefill(self) -> str:
        """The assistant prefill (Anthropic only): the last message when it is the assistant's."""
        last = self.body["messages"][-1] if self.provider == "anthropic" else {}
        return last["content"] if last.get("role") == "assistant" else ""

    @property
    def max_tokens(self) -> int:
        if self.provider == "gemini":
            return self.body["generationConfig"]["maxOutputTokens"]
        return self.body["max_tokens" if self.provider == "anthropic" else "max_completion_tokens"]

    @property
    def key(self) -> str:
        h = self.headers
        return h.get("x-goog-api-key") or h.get("x-api-key") or h.get("authorization", "")


def wire(req: Request, reply: Reply) -> dict:
    """A successful response body in the provider's format."""
    text, n_in, n_out = reply.text, reply.input_tokens, reply.output_tokens
    if req.provider == "anthropic":
        # The model continues the prefill: the API returns only what comes after it.
        if req.prefill and text.startswith(req.prefill):
            text = text[len(req.prefill) :]
        return {
            "id": "msg_test",
            "type": "message",
            "role": "assistant",
            "model": req.model,
            "content": [{"type": "text", "text": text}],
            "stop_reason": "end_turn",
            "stop_sequence": None,
            "usage": {"input_tokens": n_in, "output_tokens": n_out},
        }
    if req.provider == "openai":
        return {
            "id": "chatcmpl-test",
            "object": "chat.completion",
            "created": 0,
            "model": req.model,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": text},
                    "finish_reason": "stop",
                }
            ],
            "usage": {
                "prompt_tokens": n_in,
                "completion_tokens": n_out,
                "total_tokens": n_in + n_out,
            },
        }
    return {
        "candidates": [
            {"content": {"role": "model", "parts": [{"text": text}]}, "finishReason": "STOP"}
        ],
        "usageMetadata": {
            "promptTokenCount": n_in,
            "candidatesTokenCount": n_out,
            "totalTokenCount": n_in + n_out,
        },
    }


class _Handler(BaseHTTPRequestHandler):
    def do_POST(self) -> None:
        raw = self.rfile.read(int(self.headers.get("content-length") or 0))
        self.server.owner.answer(self, raw)

    def log_message(self, *args) -> None:
        pass


class ScriptedServer:
    """Answers each request with the next queued Reply, else with `responder(request)`.

    Every request is recorded. Error bodies echo the request's credential back, as a careless
    proxy might, so that tests see whether the key leaks anywhere on the client side.
    """

    def __init__(self) -> None:
        self.queue: collections.deque[Reply] = collections.deque()
        self.responder: Callable[[Request], Reply] | None = None
        self.requests: list[Request] = []
        self.errors: list[str] = []
        self.echoed = 0
        self.lock = threading.Lock()
        self.closing = threading.Event()
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        self.httpd.daemon_threads = True
        self.httpd.owner = self
        self.url = f"http://127.0.0.1:{self.httpd.server_port}"
        self.thread = threading.Thread(
            target=self.httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True
        )

    def script(self, *replies: Reply) -> None:
        self.queue.extend(replies)

    def answer(self, handler: BaseHTTPRequestHandler, raw: bytes) -> None:
        try:
            body = json.loads(raw)
        except ValueError:
            body = None
        req = Request(handler.path, {k.lower(): v for k, v in handler.headers.items()}, body)
        with self.lock:
            self.requests.append(req)
            try:
                if len(self.requests) > MAX_REQUESTS:
                    reply = Reply(500, message="test server: request cap reached")
                elif self.queue:
                    reply = self.queue.popleft()
                elif self.responder:
                    reply = self.responder(req)
                else:
                    reply = Reply(500, message="test server: script exhausted")
                status, payload = reply.status, self.render(req, reply)
            except Exception as err:  # a bug in a test's responder: fail the test, not hang it
                self.errors.append(repr(err))
                status, payload, reply = 500, b"{}", Reply(500)
        if reply.delay:
            self.closing.wait(reply.delay)
        try:
            handler.send_response(status)
            for name, value in reply.headers.items():
                handler.send_header(name, value)
            handler.send_header("content-type", "application/json")
            handler.send_header("content-length", str(len(payload)))
            handler.end_headers()
            handler.wfile.write(payload)
        except OSError:
            pass  # the client timed out and hung up

    def render(self, req: Request, reply: Reply) -> bytes:
        if reply.status == 200:
            data = json.dumps(reply.raw if reply.raw is not None else wire(req, reply)).encode()
            return data[: len(data) // 2] if reply.truncate else data
        self.echoed += SENTINEL in req.key
        error = {"code": reply.status, "message": f"{reply.message} (key: {req.key})"}
        if reply.google_status:
            error["status"] = reply.google_status
        return json.dumps({"error": error}).encode()

    def __enter__(self) -> ScriptedServer:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.closing.set()
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(timeout=5)


@pytest.fixture
def keys(monkeypatch) -> str:
    for name in KEY_VARS:
        monkeypatch.setenv(name, SENTINEL)
    monkeypatch.delenv("GOOGLE_API_KEY", raising=False)
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    return SENTINEL


@pytest.fixture
def server(keys):
    with ScriptedServer() as srv:
        yield srv
    assert not srv.errors, srv.errors


class FixedRng:
    """random() always returns `value`: jitter factor 0.5 + value."""

    def __init__(self, value: float) -> None:
        self.value = value

    def random(self) -> float:
        return self.value


def recording_policy(sleeps: list[float], **overrides) -> L.RetryPolicy:
    """No real waiting: sleeps are recorded. Jitter factor 1.0 unless rng is overridden."""
    kw = {
        "max_retries": 2,
        "backoff_base_s": 1.0,
        "backoff_max_s": 60.0,
        "quota_wait_s": 900.0,
        "rng": FixedRng(0.5),
        "sleep": sleeps.append,
    }
    return L.RetryPolicy(**(kw | overrides))


def base_url(server: ScriptedServer, provider: str) -> str:
    # Each SDK appends its own path: OpenAI's base includes the version, the others add it.
    return server.url + "/v1" if provider == "openai" else server.url


def make_backend(provider: str, server: ScriptedServer, policy: L.RetryPolicy, model="test-model"):
    cfg = C.LabelConfig(
        backend=provider,
        labeler_model=model,
        base_url=base_url(server, provider),
        timeout_s=TIMEOUT_S,
        max_new_tokens=64,
        temperature=0.0,
    )
    return L.REMOTE_BACKENDS[provider](model, cfg, policy)


def key_sent(req: Request) -> bool:
    if req.provider == "gemini":
        return req.headers.get("x-goog-api-key") == SENTINEL
    if req.provider == "openai":
        return req.headers.get("authorization") == f"Bearer {SENTINEL}"
    # Anthropic SDKs sent x-api-key; this SDK version sends Authorization: Bearer.
    return SENTINEL in req.headers.get("x-api-key", "") + req.headers.get("authorization", "")


# ---------------------------------------------------------------------------------------------
# SDK backends


@pytest.mark.parametrize("provider", PROVIDERS)
def test_valid_response_gives_text_tokens_and_sends_model_and_key(server, provider):
    sleeps: list[float] = []
    backend = make_backend(provider, server, recording_policy(sleeps), model="model-x7")
    server.script(ok("hello from the server", input_tokens=12, output_tokens=5))
    (comp,) = backend.complete(["Say hello."], "", seed=0)
    assert (comp.text, comp.input_tokens, comp.output_tokens) == ("hello from the server", 12, 5)
    assert comp.attempts == 1 and comp.error == "" and comp.latency_s > 0
    assert sleeps == []
    (req,) = server.requests
    expected_path = {
        "anthropic": r"/v1/messages",
        "openai": r"/v1/chat/completions",
        "gemini": r"/v1(beta)?/models/model-x7:generateContent",
    }[provider]
    assert re.fullmatch(expected_path, req.path), req.path
    assert req.model == "model-x7"
    assert req.prompt == "Say hello."
    assert req.max_tokens == 64
    assert key_sent(req), req.headers
    if provider != "gemini":  # Stainless SDKs: their own retries are off
        assert req.headers["x-stainless-retry-count"] == "0"


@pytest.mark.parametrize("provider", PROVIDERS)
def test_rate_limit_server_error_and_timeout_are_retried_with_growing_backoff(server, provider):
    sleeps: list[float] = []
    backend = make_backend(provider, server, recording_policy(sleeps, max_retries=3))
    server.script(rate_limited("7"), server_error(), too_slow(), ok("finally"))
    (comp,) = backend.complete(["p"], "", seed=0)
    assert comp.text == "finally" and comp.error == ""
    assert comp.attempts == 4 and len(server.requests) == 4
    # retry-after (7 s) for the 429, then the doubling backoff: 2 s, 4 s (jitter factor 1).
    assert sleeps == [7.0, 2.0, 4.0]
    assert TIMEOUT_S <= comp.latency_s < TIMEOUT_S + 1.0  # the timeout cut the slow reply short


@pytest.mark.parametrize("provider", PROVIDERS)
def test_retry_after_is_a_floor_even_with_the_smallest_jitter(server, provider):
    sleeps: list[float] = []
    backend = make_backend(provider, server, recording_policy(sleeps, rng=FixedRng(0.0)))
    server.script(rate_limited("7"), ok("done"))
    assert backend.complete(["p"], "", seed=0)[0].text == "done"
    assert sleeps == [7.0]  # not 3.5: retrying before retry-after only earns another 429


def test_backoff_doubles_is_capped_and_jitter_stays_within_half_to_one_and_a_half():
    def failing(n: int):
        calls = iter(range(n + 1))

        def fn():
            if next(calls) < n:
                raise _StatusError(503, "unavailable")
            return "ok"

        return fn

    sleeps: list[float] = []
    policy = recording_policy(sleeps, max_retries=6, backoff_max_s=10.0)
    assert L.call_with_retry(failing(6), policy) == ("ok", 7)
    assert sleeps == [1.0, 2.0, 4.0, 8.0, 10.0, 10.0]

    sleeps.clear()
    policy = recording_policy(sleeps, max_retries=6, backoff_max_s=10.0, rng=random.Random(3))
    L.call_with_retry(failing(6), policy)
    for delay, backoff in zip(sleeps, [1, 2, 4, 8, 10, 10], strict=True):
        assert 0.5 * backoff <= delay <= 1.5 * backoff
    assert len(set(sleeps)) == len(sleeps)  # jittered, not constant


@pytest.mark.parametrize("provider", PROVIDERS)
def test_truncated_json_is_retried_then_recorded_as_an_error_without_crashing(server, provider):
    sleeps: list[float] = []
    backend = make_backend(provider, server, recording_policy(sleeps))
    server.script(truncated(), ok("whole"))
    (comp,) = backend.complete(["a"], "", seed=0)
    assert (comp.text, comp.error, comp.attempts) == ("whole", "", 2)

    server.requests.clear()
    server.script(truncated(), truncated(), truncated(), ok("next prompt is fine"))
    first, second = backend.complete(["b", "c"], "", seed=0)
    assert first.text == "" and first.error.startswith("malformed response:")
    assert first.attempts == 3 and (first.input_tokens, first.output_tokens) == (0, 0)
    assert second.text == "next prompt is fine" and second.error == ""
    assert [r.prompt for r in server.requests] == ["b", "b", "b", "c"]


@pytest.mark.parametrize("provider", PROVIDERS)
def test_persistent_server_error_raises_after_max_retries(server, provider):
    sleeps: list[float] = []
    backend = make_backend(provider, server, recording_policy(sleeps))
    server.responder = lambda req: server_error()
    with pytest.raises(L.ProviderError) as info:
        backend.complete(["p"], "", seed=0)
    assert info.value.kind == "transient"
    assert len(server.requests) == 3 and sleeps == [1.0, 2.0]
    assert SENTINEL not in str(info.value) and "***" in str(info.value)  # echoed key, redacted


@pytest.mark.parametrize("provider", PROVIDERS)
def test_unauthorized_is_fatal_without_retry(server, provider):
    sleeps: list[float] = []
    backend = make_backend(provider, server, recording_policy(sleeps))
    server.script(unauthorized(), ok("never reached"))
    with pytest.raises(L.ProviderError) as info:
        backend.complete(["p"], "", seed=0)
    assert info.value.kind == "fatal" and "401" in str(info.value)
    assert len(server.requests) == 1 and sleeps == []


@pytest.mark.parametrize("provider", PROVIDERS)
def test_daily_quota_waits_for_the_watchdog_then_resumes(server, provider):
    sleeps: list[float] = []
    backend = make_backend(provider, server, recording_policy(sleeps, max_retries=0))
    # Quota waits do not use up retries: three in a row with max_retries=0 still resume.
    server.script(daily_quota(), daily_quota(), daily_quota(), ok("back again"))
    (comp,) = backend.complete(["p"], "", seed=0)
    assert comp.text == "back again" and comp.attempts == 4
    assert sleeps == [900.0, 900.0, 900.0]


@pytest.mark.parametrize("provider", PROVIDERS)
def test_daily_quota_past_the_deadline_stops(server, provider):
    sleeps: list[float] = []
    policy = recording_policy(sleeps, deadline=1000.0, now=lambda: 500.0)  # 500 + 900 > 1000
    backend = make_backend(provider, server, policy)
    server.script(daily_quota(), ok("never reached"))
    with pytest.raises(L.QuotaDeadlineExceeded) as info:
        backend.complete(["p"], "", seed=0)
    assert "quota" in str(info.value) and SENTINEL not in str(info.value)
    assert len(server.requests) == 1 and sleeps == []


def test_anthropic_prefill_is_sent_without_trailing_whitespace_and_starts_the_text(server):
    backend = make_backend("anthropic", server, recording_policy([]))
    prefill = load_template("labeler.v1").prefill
    assert prefill != prefill.rstrip()  # the template's prefill does end in whitespace
    server.script(ok(prefill.rstrip() + " a flood report\n- final token: rain\n</explanation>"))
    (comp,) = backend.complete(["label this"], prefill, seed=0)
    (req,) = server.requests
    assert req.body["messages"] == [
        {"role": "user", "content": "label this"},
        {"role": "assistant", "content": prefill.rstrip()},
    ]
    assert comp.text.startswith(prefill.rstrip())
    assert parse_explanation(comp.text).features == ("a flood report", "final token: rain")

    server.requests.clear()
    server.script(ok("no prefill"))
    assert backend.complete(["q"], "  \n", seed=0)[0].text == "no prefill"
    assert [m["role"] for m in server.requests[0].body["messages"]] == ["user"]


@pytest.mark.parametrize("provider", PROVIDERS)
def test_missing_api_key_is_a_config_error_naming_the_variable(monkeypatch, provider):
    for name in (*KEY_VARS, "GOOGLE_API_KEY"):
        monkeypatch.delenv(name, raising=False)
    cfg = C.LabelConfig(backend=provider, labeler_model="m", base_url="http://127.0.0.1:9")
    with pytest.raises(ConfigError, match=L.KEY_ENV[provider][0]):
        L.REMOTE_BACKENDS[provider]("m", cfg, L.RetryPolicy())


# ---------------------------------------------------------------------------------------------
# classify


class _Headers(dict):
    pass


class _Response:
    def __init__(self, headers: dict[str, str]) -> None:
        self.headers = _Headers(headers)


class _ApiError(Exception):
    def __init__(self, message: str, status_code=None, code=None, headers=None) -> None:
        super().__init__(message)
        if status_code is not None:
            self.status_code = status_code
        if code is not None:
            self.code = code
        self.response = _Response(headers or {})


class APIConnectionError(Exception):
    pass


class ReadTimeout(Exception):
    pass


class APIResponseValidationError(Exception):
    pass


@pytest.mark.parametrize(
    ("err", "kind", "retry_after"),
    [
        (_ApiError("slow down", status_code=429, headers={"retry-after": "3"}), "rate_limit", 3.0),
        (_ApiError("requests per minute", code=429), "rate_limit", None),
        (_ApiError("429 RESOURCE_EXHAUSTED. quotaId: X-PerDay", code=429), "quota", None),
        (_ApiError("Quota exceeded for quota metric 'requests per day'", 429), "quota", None),
        (_ApiError("daily limit reached", status_code=429), "quota", None),
        (_ApiError("RESOURCE_EXHAUSTED"), "rate_limit", None),
        (_ApiError("overloaded", status_code=529), "transient", None),
        (_ApiError("unavailable", code=503, headers={"retry-after": "2"}), "transient", 2.0),
        (
            _ApiError("x", status_code=429, headers={"retry-after": "Wed, 21 Oct"}),
            "rate_limit",
            None,
        ),
        (_ApiError("bad key", status_code=401), "fatal", None),
        (_ApiError("bad request", status_code=400), "fatal", None),
        (_ApiError("not found", code=404), "fatal", None),
        (TimeoutError("timed out"), "transient", None),
        (subprocess.TimeoutExpired(["gemini"], 1.0), "transient", None),
        (APIConnectionError("refused"), "transient", None),
        (ReadTimeout("read"), "transient", None),
        (json.JSONDecodeError("Expecting value", "{", 1), "malformed", None),
        (KeyError("response"), "malformed", None),
        (IndexError("list index out of range"), "malformed", None),
        (APIResponseValidationError("bad shape"), "malformed", None),
        (RuntimeError("something else"), "fatal", None),
    ],
)
def test_classify(err, kind, retry_after):
    got = L.classify(err)
    assert (got.kind, got.retry_after) == (kind, retry_after)
    assert type(err).__name__ in str(got)


def test_classify_passes_provider_errors_through_and_redacts(keys):
    mine = L.ProviderError("rate_limit", "already classified", retry_after=1.0)
    assert L.classify(mine) is mine
    got = L.classify(_ApiError(f"bad key {SENTINEL}", status_code=401))
    assert got.kind == "fatal" and SENTINEL not in str(got) and "bad key ***" in str(got)
    assert SENTINEL not in repr(got.args)


# ---------------------------------------------------------------------------------------------
# Secrets


def test_redact_replaces_every_secret_value(keys, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_other_token_value")
    text = f"a {SENTINEL} b hf_other_token_value c {SENTINEL}"
    assert redact(text) == "a *** b *** c ***"
    assert redact("nothing secret") == "nothing secret"
    err = L.ProviderError("transient", f"500 from proxy, key={SENTINEL}")
    assert SENTINEL not in str(err) and "key=***" in str(err)


# ---------------------------------------------------------------------------------------------
# The label stage end to end

LABELER_HEAD = load_template("labeler.v1").prompt.splitlines()[0]
AUDITOR_HEAD = load_template("auditor.v1").prompt.splitlines()[0]
LABELER_TOKENS, AUDITOR_TOKENS = (40, 12), (60, 4)
REJECT_REASON = "the features are not in the text"
NO_TAGS = "Sure. The text is about something, and it ends with a word."
NO_VERDICT = "Looks fine to me."


def good_label(i: int) -> str:
    return f"<explanation>\n- a short text, number {i}\n- final token: the end\n</explanation>"


def corrected_label(i: int) -> str:
    return f"<explanation>\n- fixed text {i}\n- final token: fixed\n</explanation>"


def labeler(text: str) -> Reply:
    return ok(text, *LABELER_TOKENS)


def auditor(text: str) -> Reply:
    return ok(text, *AUDITOR_TOKENS)


def role_and_doc(req: Request) -> tuple[str, int]:
    prompt = req.prompt
    role = "auditor" if prompt.startswith(AUDITOR_HEAD) else "labeler"
    assert role == "auditor" or prompt.startswith(LABELER_HEAD)
    text = re.search(r"^Text: (.*)$", prompt, re.M).group(1)
    return role, SAMPLE_TEXTS.index(text)


class StageScript:
    """Replies per (role, doc index) in order; when a row's list runs out, a good answer."""

    def __init__(self, script: dict[tuple[str, int], list[Reply]] | None = None) -> None:
        self.script = {k: collections.deque(v) for k, v in (script or {}).items()}
        self.down: Callable[[int], bool] = lambda i: False  # docs that get 500s (an outage)
        self.seen: list[tuple[str, int]] = []
        self.models: dict[str, set[str]] = collections.defaultdict(set)

    def __call__(self, req: Request) -> Reply:
        role, i = role_and_doc(req)
        self.seen.append((role, i))
        self.models[role].add(req.model)
        if self.down(i):
            return server_error()
        queued = self.script.get((role, i))
        if queued:
            return queued.popleft()
        return labeler(good_label(i)) if role == "labeler" else auditor("VERDICT: accept")


def write_params(server: ScriptedServer, provider: str = "openai", **label) -> None:
    settings = {
        "mode": "two-pass",
        "backend": provider,
        "labeler_model": "lab-model",
        "auditor_model": "aud-model",
        "base_url": base_url(server, provider),
        "chunk_size": 3,
        "max_attempts": 3,
        "max_retries": 2,
        "backoff_base_s": 0.001,
        "backoff_max_s": 0.002,
        "timeout_s": 5.0,
        "quota_wait_s": 0.001,
    }
    cfg = C.LabelConfig(**(settings | label))
    params = replace(
        C.Params(),
        base=replace(C.BaseConfig(), device="cpu"),
        label=cfg,
        # the scripted server answers by the whole text: no cut at the default's 24 tokens
        extract=replace(C.ExtractConfig(), max_length=128),
    )
    C.PARAMS_FILE.write_text(C.dump_params(params))


def setup_stage(root: Path, server: ScriptedServer, provider: str = "openai", **label) -> None:
    """A repo with models/base (its tokenizer shows the texts), the corpus and params.yaml."""
    save_model_dir(tiny_llama(), root / C.BASE_DIR)
    write_corpus(root)
    write_params(server, provider, **label)


def corpus_ids() -> list[str]:
    return pd.read_parquet(C.CORPUS_PATH)["doc_id"].tolist()


def read_labels() -> pd.DataFrame:
    return read_parquet(C.LABELS_PATH, LABELS)


def read_metrics() -> dict:
    return json.loads(C.LABEL_METRICS_PATH.read_text())


def chunk_files() -> list[Path]:
    return sorted(C.LABEL_CHUNKS_DIR.rglob("chunk_*.parquet"))


def as_seen(provider: str, prefill: str, text: str) -> str:
    """The completion text the backend returns for a scripted reply (Anthropic prefills)."""
    if provider != "anthropic" or not prefill.strip() or text.startswith(prefill.rstrip()):
        return text
    return prefill.rstrip() + text


def mixed_script() -> StageScript:
    """Every row's fate: retries, re-asks, auditor verdicts. max_retries=2, max_attempts=3."""
    bad_json = [truncated()] * 3  # one call that stays malformed through its retries
    return StageScript(
        {
            ("auditor", 1): [auditor(f"VERDICT: reject\nREASON: {REJECT_REASON}")],
            ("labeler", 1): [rate_limited("0"), labeler(good_label(1))],
            ("labeler", 2): [server_error(), labeler(good_label(2))],
            ("auditor", 2): [auditor(f"VERDICT: corrected\n{corrected_label(2)}")],
            ("labeler", 3): [labeler(NO_TAGS), labeler(good_label(3))],
            ("labeler", 4): [*bad_json, labeler(good_label(4))],
            ("auditor", 4): [daily_quota(), auditor("VERDICT: accept")],
            ("labeler", 5): [labeler(NO_TAGS)] * 3,
            ("auditor", 6): [auditor(NO_VERDICT)] * 3,
            ("labeler", 7): bad_json * 3,
        }
    )


# Responses with usage per row of the mixed script (429s, 500s and cut-off JSON carry none).
BILLED = {0: (1, 1), 1: (1, 1), 2: (1, 1), 3: (2, 1), 4: (1, 1), 5: (3, 0), 6: (1, 3), 7: (0, 0)}
REASKED = {i for i, (n_lab, n_aud) in BILLED.items() if n_lab > 1 or n_aud > 1}


def billed_tokens(i: int) -> tuple[int, int]:
    n_lab, n_aud = BILLED[i]
    return (
        n_lab * LABELER_TOKENS[0] + n_aud * AUDITOR_TOKENS[0],
        n_lab * LABELER_TOKENS[1] + n_aud * AUDITOR_TOKENS[1],
    )


def expected_rows(provider: str) -> list[dict]:
    lab_prefill = load_template("labeler.v1").prefill
    aud_prefill = load_template("auditor.v1").prefill
    no_tags = as_seen(provider, lab_prefill, NO_TAGS)
    no_verdict = as_seen(provider, aud_prefill, NO_VERDICT)
    rows = [
        ("accepted", "accept", "", good_label(0), 2),
        ("rejected", "reject", REJECT_REASON, "", 3),
        ("corrected", "corrected", "", corrected_label(2), 3),
        ("accepted", "accept", "", good_label(3), 3),  # re-asked once (no tags)
        ("accepted", "accept", "", good_label(4), 6),  # 3 malformed + 1; quota wait + 1
        ("rejected", "none", f"labeler: {parse_explanation(no_tags).error}", "", 3),
        ("rejected", "none", f"auditor: {parse_verdict(no_verdict).error}", "", 4),
        ("rejected", "none", "labeler: malformed response:", "", 9),
    ]
    out = []
    for i, (status, verdict, reason, label, attempts) in enumerate(rows):
        parsed = parse_explanation(label) if label else None
        out.append(
            {
                "status": status,
                "verdict": verdict,
                "reason": reason,
                "explanation": format_explanation(parsed.features) if parsed else "",
                "attempts": attempts,
                "input_tokens": billed_tokens(i)[0],
                "output_tokens": billed_tokens(i)[1],
                "labeler_response": {5: no_tags, 7: ""}.get(i, good_label(i)),
            }
        )
    return out


# Requests per (role, doc) of the mixed script: any extra or missing call changes this.
MIXED_REQUESTS = {
    **{("labeler", i): n for i, n in enumerate([1, 2, 2, 2, 4, 3, 1, 9])},
    **{("auditor", i): n for i, n in {0: 1, 1: 1, 2: 1, 3: 1, 4: 2, 6: 3}.items()},
}


@pytest.mark.parametrize("provider", PROVIDERS)
def test_label_stage_against_a_flaky_provider(in_tmp, server, provider):
    setup_stage(in_tmp, server, provider)
    server.responder = script = mixed_script()
    assert main(["label"]) == 0

    labels = read_labels()
    assert labels["doc_id"].tolist() == corpus_ids()  # every row once, in corpus order
    expected = expected_rows(provider)
    for i, want in enumerate(expected):
        row = labels.iloc[i]
        for column, value in want.items():
            if column == "reason" and i == 7:
                assert row["reason"].startswith(value), row["reason"]
            elif column.endswith("_tokens") and i in REASKED:
                continue  # see test_tokens_of_every_billed_response_are_counted
            else:
                assert row[column] == value, (i, column, row[column])
    assert (labels["labeler_model"] == "lab-model").all()
    assert (labels["auditor_model"] == "aud-model").all()
    assert (labels["backend"] == provider).all() and (labels["mode"] == "two-pass").all()
    assert collections.Counter(script.seen) == MIXED_REQUESTS
    assert script.models == {"labeler": {"lab-model"}, "auditor": {"aud-model"}}
    assert all(key_sent(r) for r in server.requests)

    m = read_metrics()
    assert (m["n_selected"], m["n_rows"]) == (8, 8)
    assert (m["accepted"], m["corrected"], m["rejected"]) == (3, 1, 4)
    assert m["accepted"] + m["corrected"] + m["rejected"] == m["n_rows"]
    assert sum(m["rejection_reasons"].values()) == m["rejected"]
    assert m["input_tokens"] == labels["input_tokens"].sum()
    assert m["output_tokens"] == labels["output_tokens"].sum()
    assert m["attempts_mean"] == pytest.approx(sum(r["attempts"] for r in expected) / 8)
    assert (m["stopped_by"], m["estimated_cost_usd"]) == ("complete", 0.0)
    assert (m["backend"], m["labeler_model"], m["auditor_model"]) == (
        provider,
        "lab-model",
        "aud-model",
    )


def test_tokens_of_every_billed_response_are_counted(in_tmp, server):
    setup_stage(in_tmp, server)
    server.responder = mixed_script()
    assert main(["label"]) == 0
    labels = read_labels()
    for i in sorted(REASKED):
        got = (labels["input_tokens"].iloc[i], labels["output_tokens"].iloc[i])
        assert got == billed_tokens(i), i
    m = read_metrics()
    assert m["input_tokens"] == sum(billed_tokens(i)[0] for i in BILLED)
    assert m["output_tokens"] == sum(billed_tokens(i)[1] for i in BILLED)


def test_outage_stops_with_exit_2_keeps_chunks_and_a_rerun_resumes(in_tmp, server, capsys):
    setup_stage(in_tmp, server)
    server.responder = script = StageScript()
    script.down = lambda i: i >= 3  # the first chunk (rows 0-2) succeeds, then 500s forever
    assert main(["label"]) == 2
    err = capsys.readouterr().err
    assert "label stopped after 1/3 chunks" in err and "rerun" in err
    assert "500" in err  # the provider's error, quoted
    (kept,) = chunk_files()
    assert kept.name == "chunk_000000.parquet" and not C.LABELS_PATH.exists()
    kept_bytes = kept.read_bytes()
    assert collections.Counter(script.seen)[("labeler", 3)] == 3  # 1 + max_retries, then stop

    script.down = lambda i: False  # the provider recovers
    script.seen.clear()
    assert main(["label"]) == 0
    assert {i for _, i in script.seen} == {3, 4, 5, 6, 7}  # finished chunk not re-requested
    assert collections.Counter(script.seen) == {
        (role, i): 1 for role in ("labeler", "auditor") for i in range(3, 8)
    }
    assert kept.read_bytes() == kept_bytes
    labels = read_labels()
    assert labels["doc_id"].tolist() == corpus_ids()
    assert (labels["status"] == "accepted").all()
    assert read_metrics()["n_rows"] == 8 and len(chunk_files()) == 3


def test_quota_deadline_stops_the_stage_for_a_rerun(in_tmp, server, capsys):
    setup_stage(in_tmp, server, quota_deadline_h=0.0, quota_wait_s=3600.0)
    server.script(daily_quota())
    server.responder = StageScript()
    assert main(["label"]) == 2
    err = capsys.readouterr().err
    assert "daily quota" in err and "rerun" in err
    assert len(server.requests) == 1 and chunk_files() == []


def test_max_rows_stops_cleanly(in_tmp, server):
    setup_stage(in_tmp, server, max_rows=5)
    server.responder = script = StageScript()
    assert main(["label"]) == 0
    assert read_labels()["doc_id"].tolist() == corpus_ids()[:5]
    m = read_metrics()
    assert (m["stopped_by"], m["n_selected"], m["n_rows"]) == ("max_rows", 8, 5)
    # Whole chunks (chunk_size 3) are labeled so a larger max_rows can reuse them: rows 0..5.
    assert {i for _, i in script.seen} == set(range(6))


def test_max_cost_stops_cleanly_and_a_rerun_without_the_cap_finishes(in_tmp, server):
    # Per row 100 input + 16 output tokens at $1000/Mtok: $0.116; a chunk of 3 rows: $0.348.
    prices = {"price_in_per_mtok": 1000.0, "price_out_per_mtok": 1000.0}
    setup_stage(in_tmp, server, max_cost_usd=0.3, **prices)
    server.responder = script = StageScript()
    assert main(["label"]) == 0
    assert read_labels()["doc_id"].tolist() == corpus_ids()[:3]
    m = read_metrics()
    assert m["stopped_by"] == "max_cost_usd" and m["n_rows"] == 3
    assert m["estimated_cost_usd"] == pytest.approx(0.348)
    assert {i for _, i in script.seen} == {0, 1, 2}

    script.seen.clear()
    write_params(server, **prices)  # the cap is runtime-only: the chunks are reused
    assert main(["label"]) == 0
    assert {i for _, i in script.seen} == {3, 4, 5, 6, 7}
    m = read_metrics()
    assert m["stopped_by"] == "complete" and m["n_rows"] == 8
    assert m["estimated_cost_usd"] == pytest.approx(8 * 0.116)
    assert read_labels()["doc_id"].tolist() == corpus_ids()


def test_the_api_key_reaches_no_file_output_or_log(in_tmp, server, capsys, caplog):
    caplog.set_level(logging.DEBUG)
    setup_stage(in_tmp, server)
    server.responder = script = mixed_script()
    assert main(["label"]) == 0
    # A second corpus and an outage: the stop message carries the (echoed) provider error.
    write_corpus(in_tmp, SAMPLE_TEXTS[::-1])
    script.down = lambda i: True
    assert main(["label"]) == 2
    assert server.echoed > 0  # the key did come back inside error bodies
    assert {r.name.split(".")[0] for r in caplog.records} >= {"nla_repro", "openai"}

    out, err = capsys.readouterr()
    assert "***" in err  # the stop message quoted the provider's error, redacted
    for text in (out, err, caplog.text):
        assert SENTINEL not in text
    for record in caplog.records:
        assert SENTINEL not in record.getMessage()
        assert SENTINEL not in str(record.exc_info or "")
    files = [p for p in in_tmp.rglob("*") if p.is_file()]
    assert C.LABELS_PATH.resolve() in {p.resolve() for p in files}
    for path in files:
        assert SENTINEL.encode() not in path.read_bytes(), path
    for path in [C.LABELS_PATH, *chunk_files()]:
        cells = pd.read_parquet(path).astype(str).to_numpy().ravel()
        assert not any(SENTINEL in cell for cell in cells), path


# ---------------------------------------------------------------------------------------------
# gemini CLI

FAKE_GEMINI = """#!{python}
import json, sys
state = {state!r}
with open(state) as f:
    data = json.load(f)
data["calls"].append(sys.argv[1:])
data["stdin"].append(sys.stdin.read())
step = data["script"].pop(0) if data["script"] else {{"rc": 3, "stderr": "script exhausted"}}
with open(state, "w") as f:
    json.dump(data, f)
sys.stdout.write(step.get("stdout", ""))
sys.stderr.write(step.get("stderr", ""))
sys.exit(step.get("rc", 0))
"""


class FakeGemini:
    """A `gemini` executable on PATH that plays scripted steps and records its arguments."""

    def __init__(self, root: Path) -> None:
        self.bin = root / "bin"
        self.bin.mkdir()
        self.state = root / "gemini_state.json"
        self.path = self.bin / "gemini"
        self.path.write_text(FAKE_GEMINI.format(python=sys.executable, state=str(self.state)))
        self.path.chmod(self.path.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
        self.script()

    def script(self, *steps: dict) -> None:
        old = json.loads(self.state.read_text()) if self.state.exists() else {}
        calls, stdin = old.get("calls", []), old.get("stdin", [])
        self.state.write_text(json.dumps({"calls": calls, "stdin": stdin, "script": list(steps)}))

    @property
    def calls(self) -> list[list[str]]:
        return json.loads(self.state.read_text())["calls"]

    @property
    def stdin(self) -> list[str]:
        return json.loads(self.state.read_text())["stdin"]


def cli_ok(text: str, model: str = "gemini-test", prompt: int = 11, candidates: int = 4) -> dict:
    stats = {"models": {model: {"tokens": {"prompt": prompt, "candidates": candidates}}}}
    return {"rc": 0, "stdout": json.dumps({"response": text, "stats": stats})}


def cli_fail(message: str) -> dict:
    return {"rc": 1, "stderr": message}


@pytest.fixture
def fake_gemini(tmp_path, monkeypatch, keys) -> FakeGemini:
    fake = FakeGemini(tmp_path)
    monkeypatch.setenv("PATH", f"{fake.bin}{os.pathsep}{os.environ.get('PATH', '')}")
    return fake


def cli_backend(sleeps: list[float], **policy) -> L.GeminiCliBackend:
    cfg = C.LabelConfig(backend="gemini-cli", labeler_model="gemini-test", timeout_s=10.0)
    return L.GeminiCliBackend("gemini-test", cfg, recording_policy(sleeps, **policy))


def test_gemini_cli_returns_text_and_tokens(fake_gemini):
    backend = cli_backend([])
    assert backend.exe == str(fake_gemini.path)
    fake_gemini.script(cli_ok("VERDICT: accept", prompt=21, candidates=6))
    (comp,) = backend.complete(["Check this.\nText: x"], "VERDICT:", seed=0)
    assert (comp.text, comp.input_tokens, comp.output_tokens) == ("VERDICT: accept", 21, 6)
    assert comp.attempts == 1 and comp.error == ""
    # The prompt goes on stdin: a multi-line argument would be cut and mangled by cmd.exe
    # when the Windows gemini.CMD shim runs it.
    assert fake_gemini.calls == [["--model", "gemini-test", "--output-format", "json"]]
    assert fake_gemini.stdin == ["Check this.\nText: x"]


@pytest.mark.parametrize(
    ("message", "kind"),
    [
        ("Error: [429 Too Many Requests] rate limit, requests per minute", "rate_limit"),
        ("Error: RESOURCE_EXHAUSTED: Quota exceeded for quota metric 'requests per day'", "quota"),
        ("Error: 500 Internal Server Error", "transient"),
        ("Error: something went wrong", "transient"),
    ],
)
def test_gemini_cli_failures_are_classified(fake_gemini, message, kind):
    fake_gemini.script(cli_fail(f"{message} (key {SENTINEL})"))
    with pytest.raises(L.ProviderError) as info:
        cli_backend([])._call("p", "")
    assert info.value.kind == kind
    assert "gemini CLI" in str(info.value) and SENTINEL not in str(info.value)


def test_gemini_cli_is_retried_then_succeeds_and_bad_output_is_malformed(fake_gemini):
    sleeps: list[float] = []
    backend = cli_backend(sleeps, max_retries=3)
    fake_gemini.script(
        cli_fail("429 Too Many Requests"),
        cli_fail("500 backend error"),
        {"rc": 0, "stdout": "not json at all"},
        cli_ok("finally"),
    )
    (comp,) = backend.complete(["p"], "", seed=0)
    assert comp.text == "finally" and comp.attempts == 4
    assert sleeps == [1.0, 2.0, 4.0]

    fake_gemini.script({"rc": 0, "stdout": "{}"})  # JSON without "response"
    with pytest.raises(L.ProviderError) as info:
        backend._call("p", "")
    assert info.value.kind == "malformed" and "KeyError('response')" in str(info.value)


def test_missing_gemini_cli_is_a_source_error_naming_the_command(tmp_path, monkeypatch):
    empty = tmp_path / "empty"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))
    with pytest.raises(SourceError, match="'gemini'"):
        platform.resolve_cli("gemini")
    with pytest.raises(SourceError, match="'gemini'"):
        cli_backend([])


def test_resolve_cli_finds_the_cmd_shim_on_windows(tmp_path, monkeypatch):
    # An executable without extension first on PATH, the npm shim gemini.CMD second.
    plain, shim_dir = tmp_path / "plain", tmp_path / "npm"
    plain.mkdir()
    shim_dir.mkdir()
    for path in (plain / "gemini", shim_dir / "gemini.CMD"):
        path.write_text("@echo off\n")
        path.chmod(0o755)
    monkeypatch.chdir(tmp_path)  # which() searches the current directory first on Windows
    monkeypatch.setenv("PATH", f"{plain}{os.pathsep}{shim_dir}")
    assert platform.resolve_cli("gemini") == str(plain / "gemini")  # POSIX: the bare name

    with monkeypatch.context() as m:
        # Simulated Windows for shutil.which (Python 3.11): sys.platform turns on the PATHEXT
        # search, and PATH and PATHEXT are split on os.pathsep, which is ";" there. X_OK is
        # ignored on Windows; here the files are executable so os.access passes as it would.
        m.setattr(sys, "platform", "win32")
        m.setattr(os, "pathsep", ";")
        m.setenv("PATHEXT", ".COM;.EXE;.BAT;.CMD")
        m.setenv("PATH", f"{plain};{shim_dir}")
        resolved = platform.resolve_cli("gemini")
    assert resolved == str(shim_dir / "gemini.CMD")


@pytest.mark.parametrize("provider", ["anthropic", "openai", "gemini"])
def test_a_200_of_unexpected_shape_is_malformed_not_fatal(server, provider):
    # Valid JSON of the wrong shape: retried as malformed, then recorded; the run goes on.
    sleeps: list[float] = []
    backend = make_backend(provider, server, recording_policy(sleeps))
    server.script(*[Reply(raw={"unexpected": True})] * 3, ok("fine again"))
    first, second = backend.complete(["p1", "p2"], "", seed=0)
    assert first.error.startswith("malformed response") and first.text == ""
    assert second.text == "fine again" and not second.error


def test_single_token_choices_in_one_forward_match_scoring_each_option(tokenizer):
    import torch
    from conftest import CHAT_TEMPLATE

    tokenizer.chat_template = CHAT_TEMPLATE
    backend = L.LocalBackend(tiny_llama(seed=3), tokenizer, "tiny", C.LabelConfig())
    contexts = ["Score: ", "A much longer context to pad the batch. Score: ", "x"]
    options = ["1", "2", "3", "4", "5"]
    ids = [tokenizer(o, add_special_tokens=False).input_ids for o in options]
    assert all(len(i) == 1 for i in ids)  # the fast path applies
    expected, table = [], []
    for c in contexts:  # each context alone, unpadded, each option scored by a full forward
        scores = []
        for o in ids:
            seq = tokenizer(c, add_special_tokens=False).input_ids + o
            with torch.no_grad():
                logp = backend.lm(input_ids=torch.tensor([seq])).logits.log_softmax(-1)
            scores.append(float(logp[0, len(seq) - 2, o[0]]))
        table.append(scores)
        expected.append(options[max(range(len(options)), key=scores.__getitem__)])
    ctx_ids = [tokenizer(c, add_special_tokens=False).input_ids for c in contexts]
    with torch.no_grad():
        batched = backend._next_token_logprobs(ctx_ids)[:, [o[0] for o in ids]]
    torch.testing.assert_close(batched, torch.tensor(table), atol=1e-4, rtol=1e-4)
    assert backend._choose(contexts, options) == expected


def test_with_settings_derives_a_backend_that_shares_the_model(tokenizer):
    from conftest import CHAT_TEMPLATE

    tokenizer.chat_template = CHAT_TEMPLATE
    judge = L.LocalBackend(tiny_llama(), tokenizer, "tiny", L.BackendSettings(temperature=0.0))
    paraphraser = judge.with_settings(temperature=0.9, batch_size=3)
    assert paraphraser.lm is judge.lm and paraphraser.tokenizer is judge.tokenizer
    assert paraphraser.settings.temperature == 0.9 and paraphraser.batch_size == 3
    assert judge.settings.temperature == 0.0 and judge.batch_size == 16  # unchanged
    assert paraphraser.scaffolded and type(paraphraser) is L.LocalBackend
    with pytest.raises(ValueError, match="cannot change"):
        judge.with_settings(base_url="http://elsewhere")


def test_make_backend_names_unknown_kinds_and_missing_models():
    with pytest.raises(ConfigError, match="unknown backend 'nope'"):
        L.make_backend("nope", "m", L.BackendSettings(), None, Path("."), L.RetryPolicy())
    with pytest.raises(ConfigError, match="needs a provider model name"):
        L.make_backend("openai", None, L.BackendSettings(), None, Path("."), L.RetryPolicy())
