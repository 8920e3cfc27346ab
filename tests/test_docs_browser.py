"""The docs site in a real browser: build it, serve it on localhost, click through it.

Drives Debian's Chromium (/usr/bin/chromium) through Playwright's Python API with
`executable_path` (Playwright never downloads a browser here), headless, with a fresh profile
and no network beyond localhost. Every page visited must load without console errors, failed
requests or 4xx/5xx responses, and nothing may be fetched from outside the site. Screenshots
go to the test's tmp folder, and to .nla_work/docs_screenshots/ when NLA_DOCS_SCREENSHOTS is
set. Without /usr/bin/chromium (or Playwright) the test skips, unless NLA_REQUIRE_BROWSER=1
(CI), where it fails.
"""

from __future__ import annotations

import functools
import http.server
import os
import re
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]  # Playwright adds --headless itself (headless=True)
TIMEOUT_MS = 15_000


def _unavailable(reason: str):
    if os.environ.get("NLA_REQUIRE_BROWSER") == "1":
        pytest.fail(f"NLA_REQUIRE_BROWSER=1 but {reason}")
    pytest.skip(reason)


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("site")
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "-q", "-d", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return out


@pytest.fixture(scope="module")
def server(site):
    handler = functools.partial(_QuietHandler, directory=str(site))
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass


class Watch:
    """Console errors, page errors, failed and non-local requests, error responses."""

    def __init__(self, page, base: str) -> None:
        self.base, self.problems = base, []
        page.on("console", self._console)
        page.on("pageerror", lambda err: self.problems.append(f"page error: {err}"))
        page.on("requestfailed", self._failed)
        page.on("response", self._response)
        page.on("request", self._request)

    def _console(self, msg) -> None:
        if msg.type == "error":
            self.problems.append(f"console error: {msg.text} ({msg.location.get('url')})")

    def _failed(self, request) -> None:
        self.problems.append(f"request failed: {request.url} ({request.failure})")

    def _response(self, response) -> None:
        if response.status >= 400:
            self.problems.append(f"HTTP {response.status}: {response.url}")

    def _request(self, request) -> None:
        if not request.url.startswith((self.base, "data:", "blob:", "about:")):
            self.problems.append(f"request outside the site: {request.url}")


def test_site_in_chromium(server, tmp_path):
    if not CHROMIUM.exists():
        _unavailable(f"{CHROMIUM} is missing (apt-get install chromium)")
    try:
        from playwright.sync_api import expect, sync_playwright
    except ImportError:
        _unavailable("playwright is not installed (pip install -e '.[dev]')")

    shots = tmp_path / "screenshots"
    shots.mkdir()
    calibration_title = _first_heading(ROOT / "RELEASE_CALIBRATION.md")

    with sync_playwright() as p:
        context = p.chromium.launch_persistent_context(
            str(tmp_path / "profile"),
            executable_path=str(CHROMIUM),
            headless=True,
            args=CHROMIUM_ARGS,
            viewport={"width": 1400, "height": 900},
            service_workers="block",
        )
        try:
            page = context.pages[0] if context.pages else context.new_page()
            page.set_default_timeout(TIMEOUT_MS)
            watch = Watch(page, server)

            def shot(name: str) -> None:
                page.wait_for_load_state("networkidle")
                page.screenshot(path=str(shots / f"{name}.png"), full_page=False)

            # Home: material's styles loaded (the header is styled), nav tabs present.
            page.goto(server + "/")
            expect(page.locator("h1").first).to_have_text(re.compile("nla-repro"))
            header_bg = page.evaluate(
                "getComputedStyle(document.querySelector('.md-header')).backgroundColor"
            )
            assert header_bg not in ("", "rgba(0, 0, 0, 0)"), "theme CSS did not load"
            tabs = page.locator(".md-tabs__link")
            assert tabs.count() >= 5
            shot("01-home")

            # Concepts -> Metrics, through the navigation.
            page.locator(".md-tabs__link", has_text="Concepts").click()
            page.wait_for_url(re.compile(r"/concepts/"))
            page.locator("nav.md-nav--primary a.md-nav__link", has_text="Metrics").first.click()
            page.wait_for_url(re.compile(r"/concepts/metrics/$"))
            expect(page.locator("h1").first).to_have_text(re.compile(r"^Metrics"))
            expect(page.locator("h2#round-trip")).to_be_visible()
            shot("02-metrics")

            # Reference -> Params: generated from config.py.
            page.locator(".md-tabs__link", has_text="Reference").click()
            page.wait_for_url(re.compile(r"/reference/params/$"))
            expect(page.locator("h1").first).to_have_text(re.compile(r"^Params reference"))
            row = page.locator("tr", has=page.locator('[id="extract.layer"]'))
            expect(row).to_contain_text("extract.layer")
            expect(row).to_contain_text("Decoder block")
            shot("03-params")

            # An API page from the Reference section's nav (mkdocstrings, from the docstrings).
            page.locator("nav.md-nav--primary a.md-nav__link", has_text="config").first.click()
            page.wait_for_url(re.compile(r"/reference/api/config/$"))
            expect(page.locator("h1").first).to_contain_text("nla_repro.config")
            expect(page.locator('[id="nla_repro.config.Params"]')).to_be_attached()
            shot("04-api-config")

            # Results -> Calibration: RELEASE_CALIBRATION.md included at build time.
            page.locator(".md-tabs__link", has_text="Results").click()
            page.wait_for_url(re.compile(r"/results/calibration/$"))
            expect(page.locator("h1").first).to_have_text(re.compile(r"^Calibration record"))
            if calibration_title:
                expect(page.locator("article h2").first).to_contain_text(calibration_title[:40])
            assert page.locator("article table").count() >= 3
            shot("05-calibration")
            # Its baselines table: the constant the round trip is read against, on screen.
            page.locator(
                "article :is(h2, h3)", has_text="Baselines"
            ).first.scroll_into_view_if_needed()
            constant = page.locator("article tr", has_text="Mean direction (a constant)").first
            expect(constant).to_be_visible()
            expect(constant).to_contain_text("baseline")
            shot("05b-calibration-baselines")

            # Search (lunr in a web worker, served by the site itself: works offline).
            search = page.locator("input.md-search__input")
            search.click()
            search.press_sequentially("paraphrase ceiling", delay=40)  # key events, as typed
            results = page.locator(".md-search-result__item")
            expect(results.first).to_be_visible()
            expect(results.first).to_contain_text(re.compile("paraphrase", re.I))
            assert results.count() >= 1
            shot("06-search")
            results.first.locator("a").first.click()
            page.wait_for_load_state("networkidle")
            expect(page.locator("article")).to_contain_text(re.compile("paraphrase ceiling", re.I))
            shot("07-search-hit")

            assert not watch.problems, "\n".join(watch.problems)
        finally:
            context.close()

    names = sorted(p.name for p in shots.glob("*.png"))
    assert len(names) == 8 and all((shots / n).stat().st_size > 5_000 for n in names)
    if os.environ.get("NLA_DOCS_SCREENSHOTS"):
        keep = ROOT / ".nla_work" / "docs_screenshots"
        keep.mkdir(parents=True, exist_ok=True)
        for name in names:
            shutil.copy2(shots / name, keep / name)


def _first_heading(path: Path) -> str:
    if not path.exists():
        return ""
    match = re.search(r"^# (.+)$", path.read_text(encoding="utf-8"), re.M)
    return match.group(1).strip() if match else ""
