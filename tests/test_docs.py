"""The documentation the project ships: every cited document and anchor exists, the params
reference is generated from config.py, the README stays short, the site builds strictly with
and without the generated model cards.

The reference checker scans every git-tracked (and untracked, not ignored) text file for:

(a) tokens ending in the Markdown suffix that name a file: they must resolve (relative to the
    citing file or to the repo root) to a file of the repo, or lie under a DVC output;
(b) such a token with an anchor (`FILE` + `.md#anchor`): the anchor must be a heading of the
    file (mkdocs or GitHub slug) or an explicit id in it;
(c) the quoted-section form, `FILE` + `.md "Section name"` or `README` `"Section name"`: the
    file must have a heading of that name;
(d) relative Markdown links `[text](path#anchor)` in Markdown files: path and anchor exist.

In Python files only comments and prose strings (docstrings, strings with whitespace) are
read: a bare string literal such as a temporary file's name is a path operand, not a citation.
"""

from __future__ import annotations

import dataclasses
import html
import importlib.util
import io
import re
import shutil
import subprocess
import sys
import tokenize
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal
from urllib.parse import unquote

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
HOOKS = ROOT / "docs" / "_hooks" / "nla_docs.py"
EXCLUDED = {"dvc.lock", "docker/requirements-gpu.txt"}
EXCLUDED_DIRS = ("site/",)
README_MAX_BYTES = 10_240
# Spelled apart so that this file's own synthetic references are not citations.
MD = ".md"
RM = "README"


def load_hooks():
    """docs/_hooks/nla_docs.py as a module (it is not part of the package)."""
    spec = importlib.util.spec_from_file_location("nla_docs_hooks", HOOKS)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


hooks = load_hooks()


# ---------------------------------------------------------------------------------------------
# Slugs and headings


def slug_mkdocs(text: str) -> str:
    """Python-Markdown's toc slug (what mkdocs uses): ASCII-folded, punctuation dropped,
    lowercased, runs of spaces and hyphens made one hyphen."""
    text = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode("ascii")
    text = re.sub(r"[^\w\s-]", "", text).strip().lower()
    return re.sub(r"[-\s]+", "-", text)


def slug_github(text: str) -> str:
    """GitHub's heading anchor: lowercased, punctuation but `-` and `_` dropped (letters of
    any script kept), each space a hyphen."""
    return re.sub(r"[^\w\- ]", "", text.strip().lower()).replace(" ", "-")


def heading_text(raw: str) -> str:
    """A heading's text as rendered: links to their text, code and emphasis marks and HTML
    tags dropped, a closing `#` run and an attr_list `{...}` removed."""
    raw = re.sub(r"\s*\{[^}]*\}\s*$", "", raw)
    raw = re.sub(r"\s+#+\s*$", "", raw)
    raw = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", raw)
    raw = re.sub(r"<[^>]+>", "", raw)
    return raw.replace("`", "").replace("*", "").strip()


FENCE = re.compile(r"^\s*(`{3,}|~{3,})")


def fenced_lines(lines):
    """(line, state) per line: "fence" for a fence marker, "code" inside fenced code,
    "text" elsewhere."""
    fence = None
    for line in lines:
        match = FENCE.match(line)
        if match:
            mark = match.group(1)
            if fence is None:
                fence = mark[0] * len(mark)
            elif mark.startswith(fence):
                fence = None
            yield line, "fence"
        else:
            yield line, "code" if fence else "text"


def headings(markdown: str) -> list[tuple[str, str | None]]:
    """(text, explicit id) of every ATX heading outside fenced code."""
    out = []
    for line, state in fenced_lines(markdown.splitlines()):
        if state == "text" and (m := re.match(r"#{1,6}\s+(.*)", line)):
            explicit = re.search(r"\{[^}]*#([\w.:-]+)[^}]*\}\s*$", m.group(1))
            out.append((heading_text(m.group(1)), explicit.group(1) if explicit else None))
    return out


def anchors(markdown: str) -> set[str]:
    """Every anchor a link into this document may use: mkdocs and GitHub heading slugs with
    their duplicate suffixes (`_1` / `-1`), explicit `{#id}`, and HTML `id`/`name` attrs."""
    found: set[str] = set()
    seen_mk: dict[str, int] = {}
    seen_gh: dict[str, int] = {}
    for text, explicit in headings(markdown):
        if explicit:
            found.add(explicit)
        for slug, seen, sep in (
            (slug_mkdocs(text), seen_mk, "_"),
            (slug_github(text), seen_gh, "-"),
        ):
            n = seen.get(slug, 0)
            found.add(slug if n == 0 else f"{slug}{sep}{n}")
            seen[slug] = n + 1
    found |= set(re.findall(r"""\b(?:id|name)=["']([^"']+)["']""", markdown))
    return found


def normalize_title(text: str) -> str:
    return " ".join(heading_text(text).lower().split())


# ---------------------------------------------------------------------------------------------
# The scanner


@dataclass(frozen=True)
class Problem:
    path: str
    line: int
    kind: str
    what: str

    def __str__(self) -> str:
        return f"{self.path}:{self.line}: {self.kind}: {self.what}"


@dataclass
class Repo:
    """The files a reference may resolve to."""

    root: Path
    files: set[str]
    dvc_outs: tuple[str, ...] = ()
    generated: dict[str, str] = field(default_factory=dict)
    """Docs pages the site generates at build time (the API pages), by repo path."""
    _texts: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.files = self.files | set(self.generated)

    def resolve(self, citing: str, target: str) -> tuple[str | None, bool]:
        """(repo path of the target or None, whether it is a DVC output that may be absent).
        mkdocs.yml names pages relative to docs/."""
        bases = [Path(citing).parent, Path(".")]
        if citing == "mkdocs.yml":
            bases.append(Path("docs"))
        target = target.lstrip("/")
        for base in bases:
            rel = _normpath(base / target)
            if rel is not None and rel in self.files:
                return rel, False
        for base in bases:
            rel = _normpath(base / target)
            if rel is not None and any(rel == o or rel.startswith(o + "/") for o in self.dvc_outs):
                return rel, True
        return None, False

    def exists_dir(self, citing: str, target: str) -> bool:
        rel = _normpath(Path(citing).parent / target)
        return rel is not None and any(f.startswith(rel.rstrip("/") + "/") for f in self.files)

    def text(self, rel: str) -> str:
        if rel in self.generated:
            return self.generated[rel]
        if rel not in self._texts:
            text = (self.root / rel).read_text(encoding="utf-8", errors="replace")
            if rel.startswith("docs/") and "<!-- nla:" in text:
                text = hooks.expand_markers(text, self.root)
            self._texts[rel] = text
        return self._texts[rel]


def _normpath(path: Path) -> str | None:
    parts: list[str] = []
    for part in path.as_posix().split("/"):
        if part in ("", "."):
            continue
        if part == "..":
            if not parts:
                return None
            parts.pop()
        else:
            parts.append(part)
    return "/".join(parts)


URL = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://[^\s)>\]\"'`]*")
MD_TOKEN = re.compile(r"[\w./{}<>*$%@~+-]*[\w-]\.md(?:#[\w.%-]+)?")
QUOTED = re.compile(r'([\w./-]*[\w-]\.md|\bREADME)\b(?!\.),?\s+"([^"\n]{1,100})"')
LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+[\"'][^)]*[\"'])?\s*\)")
LINK_DEF = re.compile(r"^\s{0,3}\[[^\]]+\]:\s*<?(\S+?)>?(?:\s|$)", re.M)
SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:")
TEMPLATE_CHARS = set("{}<>*$%@~+")


def _blank(text: str, pattern: re.Pattern) -> str:
    """`text` with every match of `pattern` replaced by spaces (newlines kept), so offsets
    and line numbers do not move."""
    return pattern.sub(lambda m: re.sub(r"[^\n]", " ", m.group(0)), text)


def prose_regions(path: str, text: str) -> str:
    """The parts of a file that are prose, others blanked: for Python, comments, docstrings
    and strings with whitespace (f-strings included); everything for other files."""
    if not path.endswith(".py"):
        return text
    try:
        tokens = list(tokenize.generate_tokens(io.StringIO(text).readline))
    except (tokenize.TokenError, SyntaxError, IndentationError):
        return text
    lines = text.splitlines(keepends=True)
    starts = [0]
    for line in lines:
        starts.append(starts[-1] + len(line))
    keep = [" " if c != "\n" else "\n" for c in text]
    fstring = getattr(tokenize, "FSTRING_START", None)
    for tok in tokens:
        prose = tok.type == tokenize.COMMENT
        if tok.type == tokenize.STRING or (fstring is not None and tok.type == fstring):
            body = tok.string
            stripped = re.sub(r"^[A-Za-z]*(\"\"\"|'''|\"|')|(\"\"\"|'''|\"|')$", "", body)
            prose = bool(re.search(r"\s", stripped)) or stripped.startswith("docs/")
        if prose:
            (r0, c0), (r1, c1) = tok.start, tok.end
            a, b = starts[r0 - 1] + c0, starts[r1 - 1] + c1
            keep[a:b] = text[a:b]
    return "".join(keep)


def _line(text: str, offset: int) -> int:
    return text.count("\n", 0, offset) + 1


def _strip_code(markdown: str) -> str:
    """Fenced blocks and inline code blanked (for Markdown links, which code does not hold)."""
    out = []
    for line, state in fenced_lines(markdown.splitlines(keepends=True)):
        if state == "fence":
            out.append("\n" if line.endswith("\n") else "")
        else:
            out.append(re.sub(r"[^\n]", " ", line) if state == "code" else line)
    return _blank("".join(out), re.compile(r"`[^`\n]*`"))


def check_anchor(repo: Repo, path: str, line: int, target: str, anchor: str) -> list[Problem]:
    anchor = unquote(anchor).rstrip(".")
    if not anchor or target.endswith("/"):
        return []
    if anchor not in anchors(repo.text(target)):
        known = sorted(a for a in anchors(repo.text(target)) if "-" in a or a.isalpha())[:12]
        return [
            Problem(
                path, line, "missing anchor", f"{target}#{anchor} (anchors: {', '.join(known)})"
            )
        ]
    return []


def scan_file(repo: Repo, path: str) -> list[Problem]:
    try:
        raw = (repo.root / path).read_text(encoding="utf-8")
    except (UnicodeDecodeError, OSError):
        return []
    problems: list[Problem] = []
    text = _blank(prose_regions(path, raw), URL)
    if path.endswith(".md"):
        # Link targets are checked as links, (d) below.
        text = _blank(text, re.compile(r"(?<=\])\([^)\n]*\)"))

    # (a) and (b): file tokens ending in .md, with an optional anchor.
    for m in MD_TOKEN.finditer(text):
        token = m.group(0)
        after = text[m.end() : m.end() + 2]
        if re.match(r"[\w-]|\.\w|/", after) or TEMPLATE_CHARS & set(token):
            continue
        name, _, anchor = token.partition("#")
        name = name.removeprefix("./")
        line = _line(text, m.start())
        target, dvc = repo.resolve(path, name)
        if target is None:
            problems.append(Problem(path, line, "missing document", name))
        elif anchor and not dvc:
            problems += check_anchor(repo, path, line, target, anchor)

    # (c): the quoted-section form.
    for m in QUOTED.finditer(text):
        name, title = m.group(1), m.group(2)
        line = _line(text, m.start())
        target, dvc = repo.resolve(path, "README.md" if name == "README" else name)
        if target is None or dvc:
            continue  # a missing file is reported above (a README without .md is the root's)
        titles = {normalize_title(t) for t, _ in headings(repo.text(target))}
        if normalize_title(title) not in titles:
            problems.append(Problem(path, line, "missing section", f'{target} "{title}"'))

    # (d): relative Markdown links in .md files.
    if path.endswith(".md"):
        body = _strip_code(raw)
        targets = [(m.start(), m.group(1)) for m in LINK.finditer(body)]
        targets += [(m.start(), m.group(1)) for m in LINK_DEF.finditer(body)]
        for offset, href in targets:
            if SCHEME.match(href) or href.startswith("//"):
                continue
            line = _line(body, offset)
            link, _, anchor = unquote(href).partition("#")
            if not link:
                problems += check_anchor(repo, path, line, path, anchor)
                continue
            target, dvc = repo.resolve(path, link) if not link.startswith("/") else (None, False)
            if target is None and not link.startswith("/") and repo.exists_dir(path, link):
                continue
            if target is None or (target != _normpath(Path(path).parent / link) and not dvc):
                problems.append(Problem(path, line, "broken link", href))
            elif anchor and target.endswith(".md") and not dvc:
                problems += check_anchor(repo, path, line, target, anchor)
    return problems


def repo_files(root: Path) -> set[str]:
    """Tracked and untracked-but-not-ignored files that exist, minus generated ones."""
    out = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=root,
        capture_output=True,
        check=True,
    ).stdout.decode()
    files = {f for f in out.split("\0") if f and (root / f).is_file()}
    return {f for f in files if f not in EXCLUDED and not f.startswith(EXCLUDED_DIRS)}


def dvc_outputs(root: Path) -> tuple[str, ...]:
    path = root / "dvc.yaml"
    if not path.exists():
        return ()
    stages = (yaml.safe_load(path.read_text()) or {}).get("stages") or {}
    outs = []
    for stage in stages.values():
        for out in (stage.get("outs") or []) + (stage.get("metrics") or []):
            outs.append(next(iter(out)) if isinstance(out, dict) else str(out))
    return tuple(o.rstrip("/") for o in outs)


def generated_pages(root: Path) -> dict[str, str]:
    """The API pages the docs hook generates for src/nla_repro, by repo path."""
    package = root / "src" / hooks.PACKAGE
    if not package.is_dir():
        return {}
    modules = hooks.package_modules(package)
    uris = hooks.api_uris(modules, package)
    return {f"docs/{uris[m]}": hooks.api_page(m, hooks.submodules(modules, m)) for m in modules}


def scan(root: Path, files: set[str] | None = None) -> list[Problem]:
    files = repo_files(root) if files is None else files
    repo = Repo(root, files, dvc_outputs(root), generated_pages(root))
    problems = []
    for path in sorted(files):
        problems += scan_file(repo, path)
    return problems


# ---------------------------------------------------------------------------------------------
# The repository's references


def test_every_cited_document_section_and_anchor_exists():
    problems = scan(ROOT)
    assert not problems, (
        f"{len(problems)} reference(s) to a document, section or anchor the repo does not "
        "contain:\n" + "\n".join(f"  {p}" for p in problems)
    )


# ---------------------------------------------------------------------------------------------
# The checker itself, on synthetic repos


def test_slugs_follow_mkdocs_and_github():
    from markdown.extensions.toc import slugify

    for text in (
        "Normalization and mse_nrm",
        "Per-claim delta mse",
        "SAE LM loss recovered",
        "Why raw and centred are both reported",
        "Centred score (fve_cen)",
        "Round trip — raw",
        "Δ café",
    ):
        assert slug_mkdocs(text) == slugify(text, "-"), text
    assert slug_mkdocs("Centred score (fve_cen)") == "centred-score-fve_cen"
    assert slug_github("Centred score (fve_cen)") == "centred-score-fve_cen"
    assert slug_mkdocs("Round trip — raw") == "round-trip-raw"
    assert slug_github("Round trip — raw") == "round-trip--raw"
    assert slug_mkdocs("Per-claim Δmse") == "per-claim-mse"
    assert slug_github("Per-claim Δmse") == "per-claim-δmse"


def test_anchors_cover_code_duplicates_explicit_ids_and_html():
    text = "\n".join(
        [
            "# Title",
            "## `av_ignores_vector`",
            "## Notes",
            "## Notes",
            "```",
            "## not a heading",
            "```",
            "## Custom {#my-id}",
            '<a id="extract.layer"></a>',
        ]
    )
    found = anchors(text)
    assert {"title", "av_ignores_vector", "notes", "notes_1", "notes-1", "my-id"} <= found
    assert "extract.layer" in found and "not-a-heading" not in found


def _synthetic_repo(tmp_path: Path) -> Path:
    (tmp_path / "docs").mkdir()
    (tmp_path / "src").mkdir()
    (tmp_path / "README.md").write_text("# Project\n\n## Two commands\n\ntext\n")
    (tmp_path / "docs" / f"guide{MD}").write_text(
        "# Guide\n\n## Metrics\n\n## Round trip\n\n"
        f"[ok](../README{MD}#two-commands) [ok too](#round-trip) [up](../README{MD})\n"
        f"[gone](missing{MD}) [bad anchor](#nowhere) [bad file anchor](../README{MD}#nope)\n"
        "![img](img/missing.png) [dir](../src/) [web](https://example.org/x.md)\n"
        f"`[code](notreal{MD})`\n"
    )
    (tmp_path / "dvc.yaml").write_text("stages:\n  card:\n    outs:\n      - cards\n")
    (tmp_path / "src" / "mod.py").write_text(
        "\n".join(
            [
                f'"""See docs/guide{MD}#metrics and GONE{MD}; docs/guide{MD} "Metrics"."""',
                f'# docs/guide{MD}#nope and docs/guide{MD} "No such section"',
                f'PATH = "notes{MD}"  # a bare path literal: not a citation',
                f'MSG = f"see {{x}}/README{MD} and cards/av/README{MD}"',
                f'ERR = \'{RM} "Two commands" and {RM} "Gone section"\'',
                f"T = 'templates/_common{MD}.j2 and https://example.org/a/B{MD}'",
                "",
            ]
        )
    )
    return tmp_path


def test_scanner_catches_each_kind_of_broken_reference(tmp_path):
    root = _synthetic_repo(tmp_path)
    files = {"README.md", f"docs/guide{MD}", "src/mod.py", "dvc.yaml"}
    problems = [str(p) for p in scan(root, files)]
    expected = [
        f"src/mod.py:1: missing document: GONE{MD}",
        f"src/mod.py:2: missing anchor: docs/guide{MD}#nope",
        f'src/mod.py:2: missing section: docs/guide{MD} "No such section"',
        f'src/mod.py:5: missing section: {RM}{MD} "Gone section"',
        f"docs/guide{MD}:8: broken link: missing{MD}",
        f"docs/guide{MD}:8: missing anchor: docs/guide{MD}#nowhere",
        f"docs/guide{MD}:8: missing anchor: README{MD}#nope",
        f"docs/guide{MD}:9: broken link: img/missing.png",
    ]
    for want in expected:
        assert any(p.startswith(want) for p in problems), (want, problems)
    assert len(problems) == len(expected), problems
    # Not flagged: valid links and anchors, the quoted README section that exists, a bare path
    # literal, a DVC output (cards/), a template file name, URLs, links inside code.
    joined = "\n".join(problems)
    for fine in ("notes", "cards/av", "_common", "example.org", "notreal", "Two commands"):
        assert fine not in joined


def test_the_docs_expand_generated_pages_before_anchors_are_checked(tmp_path):
    # A page whose anchors come from a marker (the params reference) resolves them.
    text = hooks.expand_markers("# Params\n\n<!-- nla:params -->\n", ROOT)
    assert {"extract", "extract.layer", "sae.k"} <= anchors(text)


# ---------------------------------------------------------------------------------------------
# The params reference


@dataclass(frozen=True)
class _Base:
    lr: float = 2e-4
    """Peak learning rate."""
    pattern: str = r"a|b"
    """A regex with a | in it."""


@dataclass(frozen=True)
class _Section(_Base):
    """Section docstring."""

    mode: Literal["x", "y"] = "x"
    """Which mode."""
    tags: list[str] = field(default_factory=lambda: ["t1"])
    """Tags,
    over two lines."""
    cap: int | None = None
    undocumented_lr_override: float = 1.0
    lr: float = 5e-4
    """The section's own lr."""


@dataclass(frozen=True)
class _Params:
    name: str = "default"
    """Top-level name."""
    sec: _Section = field(default_factory=_Section)
    """The section."""


def test_params_renderer_on_a_synthetic_config():
    text = hooks.render_params_reference(
        _Params, {"stages": {"s1": {"params": ["sec"]}, "s2": {"params": ["sec.mode"]}}}
    )
    rows = {re.search(r'id="([^"]+)"', r).group(1): r for r in text.splitlines() if "id=" in r}
    assert set(rows) == {"name", "sec.lr", "sec.pattern", "sec.mode", "sec.tags", "sec.cap"} | {
        "sec.undocumented_lr_override"
    }
    assert "## sec" in text and "Section docstring." in text and "The section." in text
    assert "<code>0.0005</code>" in rows["sec.lr"] and "The section's own lr." in rows["sec.lr"]
    assert "<code>&quot;x&quot; &#124; &quot;y&quot;</code>" in rows["sec.mode"] or (
        '<code>"x" &#124; "y"</code>' in rows["sec.mode"]
    )
    assert "<code>s1</code>, <code>s2</code>" in rows["sec.mode"]
    assert '<code>["t1"]</code>' in rows["sec.tags"] and "Tags, over two lines." in rows["sec.tags"]
    assert "<code>int &#124; null</code>" in rows["sec.cap"]
    assert "<code>null</code>" in rows["sec.cap"]
    assert "(no docstring)" in rows["sec.cap"]
    assert "<code>a&#124;b</code>" in rows["sec.pattern"]
    assert "A regex with a &#124; in it." in rows["sec.pattern"]
    # No raw pipe inside a row but the cell separators: the table keeps its columns.
    assert all(r.count("|") == 6 for r in rows.values())


def test_params_reference_lists_every_field_with_its_default_and_docstring():
    from nla_repro import config as C

    spec = yaml.safe_load((ROOT / "dvc.yaml").read_text())
    text = hooks.render_params_reference(C.Params, spec)
    rows = {}
    for row in text.splitlines():
        if m := re.match(r'\| <a id="([^"]+)"></a>', row):
            rows[m.group(1)] = row
    hints = __import__("typing").get_type_hints(C.Params)
    for top in dataclasses.fields(C.Params):
        section = hints[top.name]
        if not dataclasses.is_dataclass(section):
            assert top.name in rows
            continue
        assert f"\n## {top.name}\n" in text
        for f in dataclasses.fields(section):
            key = f"{top.name}.{f.name}"
            assert key in rows, key
            default = html.escape(hooks.format_default(f), quote=False).replace("|", "&#124;")
            assert f"<code>{default}</code>" in rows[key], key
    # A docstring, read independently of the hook: the line after `layer:` in ExtractConfig.
    source = Path(C.__file__).read_text()
    body = source[source.index("class ExtractConfig") :]
    doc = re.search(r"\n    layer: [^\n]*\n\s+\"\"\"(.*?)\"\"\"", body, re.S).group(1)
    assert " ".join(doc.split()).replace("|", "&#124;") in rows["extract.layer"]


# ---------------------------------------------------------------------------------------------
# README and the site


def test_readme_is_at_most_10_kib():
    size = (ROOT / "README.md").stat().st_size
    assert size <= README_MAX_BYTES, f"README.md is {size} bytes (> {README_MAX_BYTES})"


def test_api_pages_follow_the_package_tree(tmp_path):
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "ns").mkdir()
    for rel in ("__init__.py", "__main__.py", "a.py", "sub/__init__.py", "sub/b.py", "ns/c.py"):
        (pkg / rel).write_text("")
    (pkg / "sub.py").write_text("")  # shadowed by the package sub/
    (pkg / "_private.py").write_text("")
    modules = hooks.package_modules(pkg, "pkg")
    assert modules == ["pkg", "pkg.__main__", "pkg.a", "pkg.sub", "pkg.sub.b"]
    uris = hooks.api_uris(modules, pkg)
    assert uris["pkg"] == "reference/api/index.md"
    assert uris["pkg.sub"] == "reference/api/sub/index.md"
    assert uris["pkg.sub.b"] == "reference/api/sub/b.md"
    nav = hooks.api_nav(modules, uris)
    assert nav[0] == {"Overview": "reference/api/index.md"}
    assert nav[-1] == {
        "sub": [{"(package)": "reference/api/sub/index.md"}, {"b": "reference/api/sub/b.md"}]
    }


def _site_copy(tmp_path: Path) -> Path:
    """The files the site is built from, copied (so a test can add generated cards)."""
    copy = tmp_path / "repo"
    copy.mkdir()
    for name in ("mkdocs.yml", "RELEASE_CALIBRATION.md", "dvc.yaml"):
        if (ROOT / name).exists():
            shutil.copy2(ROOT / name, copy / name)
    shutil.copytree(ROOT / "docs", copy / "docs")
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    shutil.copytree(ROOT / "src" / "nla_repro", copy / "src" / "nla_repro", ignore=ignore)
    return copy


PNG = bytes.fromhex(
    "89504e470d0a1a0a0000000d4948445200000001000000010806000000"
    "1f15c4890000000d49444154789c6360000002000154a24f5d0000000049454e44ae426082"
)


def build_site(repo: Path, out: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "-q", "-d", str(out)],
        cwd=repo,
        capture_output=True,
        text=True,
        env={**__import__("os").environ, "NO_MKDOCS_2_WARNING": "1"},
        timeout=300,
    )


@pytest.mark.parametrize("with_cards", [False, True])
def test_site_builds_strictly_with_and_without_cards(tmp_path, with_cards):
    pytest.importorskip("mkdocs")
    repo = _site_copy(tmp_path)
    if with_cards:
        for kind in ("av", "ar", "sae"):
            folder = repo / "cards" / kind
            (folder / "plots").mkdir(parents=True)
            (folder / "plots" / "round_trip.png").write_bytes(PNG)
            (folder / "README.md").write_text(
                f"---\nlicense: apache-2.0\ntags:\n- {kind}\n---\n\n# card-{kind}-title\n\n"
                "## How to load\n\ntext\n\n![round_trip.png](plots/round_trip.png)\n"
            )
    result = build_site(repo, tmp_path / "site")
    assert result.returncode == 0, result.stdout + result.stderr
    page = (tmp_path / "site" / "results" / "cards" / "index.html").read_text()
    if with_cards:
        assert "card-sae-title" in page and "license: apache-2.0" not in page
        assert (tmp_path / "site/results/cards/av/plots/round_trip.png").read_bytes() == PNG
        assert 'src="av/plots/round_trip.png"' in page
    else:
        assert "dvc repro" in page and "card-av-title" not in page
    params = (tmp_path / "site" / "reference" / "params" / "index.html").read_text()
    assert 'id="extract.layer"' in params
    assert (tmp_path / "site" / "reference" / "api" / "config" / "index.html").exists()


def test_docs_task_builds_strictly_or_serves():
    from invoke import MockContext, Result

    import tasks

    ctx = MockContext(run={"mkdocs build --strict": Result()})
    tasks.docs(ctx)
    assert ctx.run.call_args.args[0] == "mkdocs build --strict"
    ctx = MockContext(run={"mkdocs serve --strict -a 127.0.0.1:8000": Result()})
    tasks.docs(ctx, serve=True)
    assert ctx.run.call_count == 1


def test_ci_installs_chromium_requires_the_browser_test_and_builds_the_site():
    ci = (ROOT / ".ci/run").read_text()
    lines = ci.splitlines()
    assert any("apt-get install" in ln and "chromium" in ln for ln in lines)
    assert "NLA_REQUIRE_BROWSER=1" in ci
    build = next(i for i, ln in enumerate(lines) if ln.startswith("mkdocs build --strict"))
    import tasks

    pytest_line = lines.index(f"{tasks.INSTALL} && python3 -m pytest")
    assert pytest_line < build and "|| exit 1" in lines[build]


def test_code_map_lists_every_module_with_its_first_sentence():
    hooks = load_hooks()
    package = ROOT / "src" / "nla_repro"
    text = hooks.render_code_map(package, from_page="reference/code-map.md")
    shown = set(re.findall(r"\[`([^`]+)`\]", text))
    expected = {
        p.relative_to(package).as_posix()
        for p in package.rglob("*.py")
        if p.name != "__init__.py" and "__pycache__" not in p.parts
    } | {f"{p.parent.relative_to(package).as_posix()}/" for p in package.glob("*/__init__.py")}
    assert shown == expected
    assert re.search(r"\| \[`seeds\.py`\]\(\.\./reference/api/seeds\.md\) \| Every seed", text)
    assert hooks.first_sentence("The SAE (Gao et al. 2024 recipe). More.\n\nNext.") == (
        "The SAE (Gao et al. 2024 recipe)"
    )
    assert hooks.first_sentence("a <b> `<c>` d.") == "a &lt;b&gt; `<c>` d"


def test_readme_code_map_names_every_top_level_module_and_package():
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Code map", 1)[1].split("\n## ", 1)[0]
    listed = set(re.findall(r"^\| `([^`]+)`", section, re.M))
    package = ROOT / "src" / "nla_repro"
    top = {p.name for p in package.glob("*.py") if p.name != "__init__.py"}
    top |= {f"{p.parent.name}/" for p in package.glob("*/__init__.py")}
    data = {
        f"{p.name}/" for p in package.iterdir() if p.is_dir() and not (p / "__init__.py").exists()
    }
    data.discard("__pycache__/")
    assert top <= listed, sorted(top - listed)
    assert listed - top <= {"prompts/", "profiles/", "card_templates/"} | data
