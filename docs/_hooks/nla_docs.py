"""mkdocs hooks of the nla-repro docs site (named in mkdocs.yml `hooks:`).

What the site generates at build time instead of holding a copy:

- the API reference: one page per module of `src/nla_repro`, found by walking the package
  on disk (so the pages follow the package when modules move), each a mkdocstrings
  `::: nla_repro.<module>` block, with a nav section that mirrors the package tree;
- the params reference (`<!-- nla:params -->`): every section and field of
  `nla_repro.config.Params` with its type, default, field docstring and the stages whose
  `dvc.yaml` params name it;
- the calibration record (`<!-- nla:calibration -->`): `RELEASE_CALIBRATION.md` as the card
  stage last wrote it;
- the model cards (`<!-- nla:cards -->`): `cards/{av,ar,sae}/README.md` (a DVC output) with
  front matter stripped and their plots copied into the site, or how to make them;
- the code map (`<!-- nla:code-map -->`): one line per module of the package, the first
  sentence of its docstring, linked to its API page.

The rendering functions are plain functions of their inputs (tested in tests/test_docs.py);
only the `on_*` functions know about mkdocs. Nothing here imports torch: `nla_repro.config`
is light, and mkdocstrings reads the other modules' source statically (griffe).
"""

from __future__ import annotations

import ast
import dataclasses
import html
import importlib
import inspect
import itertools
import json
import re
import sys
import textwrap
import types
import typing
from pathlib import Path
from typing import Any

PACKAGE = "nla_repro"
API_DIR = "reference/api"
API_NAV_TITLE = "API reference"
CARD_KINDS = ("av", "ar", "sae")
CARD_TITLES = {
    "av": "Activation verbalizer (AV)",
    "ar": "Activation reconstructor (AR)",
    "sae": "Sparse autoencoder (SAE)",
}
MARKERS = ("params", "calibration", "cards", "code-map")
MARKER = re.compile(r"^<!-- nla:(" + "|".join(MARKERS) + r") -->[ \t]*$", re.M)


# ---------------------------------------------------------------------------------------------
# The params reference


def field_docstrings(cls: type) -> dict[str, str]:
    """Attribute docstrings of a class and its bases: the string literal right after each
    annotated field in the class body (Python keeps none of them at run time). A subclass's
    docstring of a field it redefines wins over its base's."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if klass is object:
            continue
        try:
            source = textwrap.dedent(inspect.getsource(klass))
        except (OSError, TypeError):
            continue
        tree = ast.parse(source)
        node = next(
            (n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == klass.__name__),
            None,
        )
        if node is None:
            continue
        body = node.body
        for stmt, after in itertools.pairwise(body):
            if (
                isinstance(stmt, ast.AnnAssign)
                and isinstance(stmt.target, ast.Name)
                and isinstance(after, ast.Expr)
                and isinstance(after.value, ast.Constant)
                and isinstance(after.value.value, str)
            ):
                docs[stmt.target.id] = inspect.cleandoc(after.value.value)
    return docs


def class_docstring(cls: type) -> str:
    """The docstring written in the class body (not the signature dataclasses invent)."""
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    except (OSError, TypeError):
        return ""
    node = next((n for n in tree.body if isinstance(n, ast.ClassDef)), None)
    return (ast.get_docstring(node) or "") if node else ""


def format_type(hint: Any) -> str:
    """A type hint as params.yaml users read it: `int`, `str | None`, `"last" | "random"`."""
    origin = typing.get_origin(hint)
    if hint is type(None):
        return "null"
    if origin is typing.Literal:
        return " | ".join(json.dumps(a) for a in typing.get_args(hint))
    if origin in (typing.Union, types.UnionType):
        return " | ".join(format_type(a) for a in typing.get_args(hint))
    if origin is list:
        (item,) = typing.get_args(hint) or (Any,)
        return f"list[{format_type(item)}]"
    if origin is dict:
        key, value = typing.get_args(hint) or (Any, Any)
        return f"dict[{format_type(key)}, {format_type(value)}]"
    if isinstance(hint, type):
        return hint.__name__
    return str(hint).replace("typing.", "")


def format_default(field: dataclasses.Field) -> str:
    """The default as it reads in params.yaml (YAML scalars; lists as flow sequences)."""
    if field.default is not dataclasses.MISSING:
        value = field.default
    elif field.default_factory is not dataclasses.MISSING:
        value = field.default_factory()
    else:
        return "(required)"
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list | tuple | dict):
        return json.dumps(value)
    return str(value)


def _cell(text: str) -> str:
    """One table cell from Markdown prose: a single line; code spans become HTML `<code>` and
    pipes `&#124;`, so neither the table nor a code span breaks on a `|`."""
    parts = re.split(r"(`[^`]*`)", " ".join(text.split()))
    out = []
    for i, part in enumerate(parts):
        if i % 2:
            out.append(_code(part[1:-1]))
        else:
            out.append(part.replace("|", "&#124;"))
    return "".join(out)


def _code(text: str, css: str = "") -> str:
    """Literal text as an HTML code element (table-safe)."""
    body = html.escape(" ".join(text.split()), quote=False).replace("|", "&#124;")
    return f'<code class="{css}">{body}</code>' if css else f"<code>{body}</code>"


def stage_params(dvc_yaml: dict | None) -> dict[str, list[str]]:
    """dvc.yaml `params` entries (a section or a dotted key) -> the stages that name them."""
    out: dict[str, list[str]] = {}
    for stage, spec in ((dvc_yaml or {}).get("stages") or {}).items():
        for key in spec.get("params") or []:
            key = next(iter(key)) if isinstance(key, dict) else str(key)
            out.setdefault(key, []).append(stage)
    return out


def render_params_reference(params_cls: type, dvc_yaml: dict | None = None) -> str:
    """Markdown tables of every field of `params_cls` (nla_repro.config.Params): one `##`
    section per stage section (a dataclass-typed field), top-level scalars first. Each row:
    the dotted key (with an HTML anchor of the same name), type, default, docstring, and the
    stages whose dvc.yaml params name the key or its section."""
    hints = typing.get_type_hints(params_cls)
    docs = field_docstrings(params_cls)
    readers = stage_params(dvc_yaml)
    order = list((dvc_yaml or {}).get("stages") or {})
    fields = dataclasses.fields(params_cls)
    scalars = [f for f in fields if not dataclasses.is_dataclass(hints[f.name])]
    sections = [f for f in fields if dataclasses.is_dataclass(hints[f.name])]
    with_stages = dvc_yaml is not None
    head = "| key | type | default | description |" + (" stages |" if with_stages else "")
    rule = "|---|---|---|---|" + ("---|" if with_stages else "")

    def row(key: str, hint: Any, field: dataclasses.Field, doc: str, section: str) -> str:
        cells = [
            f'<a id="{key}"></a>{_code(key, "nla-key")}',
            _code(format_type(hint)),
            _code(format_default(field)),
            _cell(doc) or "(no docstring)",
        ]
        if with_stages:
            named = {*readers.get(key, []), *readers.get(section, [])}
            cells.append(", ".join(_code(s) for s in order if s in named))
        return "| " + " | ".join(cells) + " |"

    out: list[str] = []
    if scalars:
        out += ["## Top level", "", head, rule]
        out += [row(f.name, hints[f.name], f, docs.get(f.name, ""), f.name) for f in scalars]
        out.append("")
    for sec in sections:
        cls = hints[sec.name]
        out += [f"## {sec.name}", ""]
        intro = [docs.get(sec.name, ""), class_docstring(cls)]
        shared = [
            b.__name__
            for b in cls.__mro__[1:]
            if dataclasses.is_dataclass(b) and b is not object and b.__module__ == cls.__module__
        ]
        if shared:
            intro.append(f"Fields shared through `{'`, `'.join(shared)}` are listed too.")
        text = " ".join(" ".join(t.split()) for t in intro if t)
        out += [f"`{cls.__name__}`: {_cell(text)}" if text else f"`{cls.__name__}`", ""]
        sub_hints = typing.get_type_hints(cls)
        sub_docs = field_docstrings(cls)
        out += [head, rule]
        for f in dataclasses.fields(cls):
            key = f"{sec.name}.{f.name}"
            out.append(row(key, sub_hints[f.name], f, sub_docs.get(f.name, ""), sec.name))
        out.append("")
    return "\n".join(out).rstrip() + "\n"


def load_params_class(root: Path) -> type:
    """nla_repro.config.Params from this checkout's src/ (installed or not)."""
    src = str(root / "src")
    if src not in sys.path:
        sys.path.insert(0, src)
    name = f"{PACKAGE}.config"
    # `mkdocs serve` rebuilds in one process: read the file as it is now.
    module = importlib.reload(sys.modules[name]) if name in sys.modules else None
    return (module or importlib.import_module(name)).Params


# ---------------------------------------------------------------------------------------------
# Included generated documents


def shift_headings(markdown: str, by: int = 1) -> str:
    """Demote ATX headings by `by` levels (outside fenced code), so an included document's
    `#` title sits under the page's own."""
    out, fence = [], None
    for line in markdown.splitlines():
        stripped = line.lstrip()
        match = re.match(r"(`{3,}|~{3,})", stripped)
        if match and (fence is None or stripped.startswith(fence)):
            fence = None if fence else match.group(1)
        elif fence is None and re.match(r"#{1,6} ", line):
            line = "#" * by + line
        out.append(line)
    return "\n".join(out) + ("\n" if markdown.endswith("\n") else "")


def strip_front_matter(markdown: str) -> str:
    """Drop a leading YAML front-matter block (`---` ... `---`)."""
    match = re.match(r"\A---\s*\n.*?\n---\s*\n", markdown, re.S)
    return markdown[match.end() :] if match else markdown


def render_calibration(root: Path) -> str:
    path = root / "RELEASE_CALIBRATION.md"
    if not path.exists():
        return (
            '!!! warning "RELEASE_CALIBRATION.md is missing"\n'
            "    The card stage writes it: `dvc repro card`.\n"
        )
    return shift_headings(path.read_text(encoding="utf-8"))


def card_plots(root: Path) -> list[tuple[str, Path]]:
    """(site path, file) of every plot beside a generated card."""
    out = []
    for kind in CARD_KINDS:
        plots = root / "cards" / kind / "plots"
        if (root / "cards" / kind / "README.md").exists() and plots.is_dir():
            for png in sorted(plots.iterdir()):
                if png.is_file():
                    out.append((f"results/cards/{kind}/plots/{png.name}", png))
    return out


def render_cards(root: Path) -> str:
    """The three generated model cards, or how to make them."""
    present = [k for k in CARD_KINDS if (root / "cards" / k / "README.md").exists()]
    if not present:
        return (
            '!!! note "No cards in this checkout"\n'
            "    `cards/` is a DVC output (git-ignored). Make it with `dvc repro` (the whole\n"
            "    pipeline, about 34 minutes on a CPU) or fetch it with `dvc pull` from a remote\n"
            "    that holds this commit's outputs, then rebuild the site (`invoke docs`).\n"
        )
    out = []
    for kind in present:
        text = strip_front_matter((root / "cards" / kind / "README.md").read_text("utf-8"))
        text = re.sub(r"\]\(plots/", f"](cards/{kind}/plots/", text)
        out += [f"## {CARD_TITLES[kind]}", "", shift_headings(text, 2), ""]
    missing = [k for k in CARD_KINDS if k not in present]
    if missing:
        out.append(f"Not built in this checkout: {', '.join(missing)} (`dvc repro card`).")
    return "\n".join(out)


def expand_markers(markdown: str, root: Path) -> str:
    """Replace every `<!-- nla:NAME -->` line with what it stands for."""

    def replace(match: re.Match) -> str:
        name = match.group(1)
        if name == "params":
            import yaml

            dvc = root / "dvc.yaml"
            spec = yaml.safe_load(dvc.read_text()) if dvc.exists() else None
            return render_params_reference(load_params_class(root), spec)
        if name == "calibration":
            return render_calibration(root)
        if name == "code-map":
            return render_code_map(root / "src" / PACKAGE, from_page="reference/code-map.md")
        return render_cards(root)

    return MARKER.sub(replace, markdown)


# ---------------------------------------------------------------------------------------------
# The API reference


def package_modules(package_dir: Path, name: str = PACKAGE) -> list[str]:
    """Dotted names of the package and every module below it, in import precedence: a
    directory with `__init__.py` wins over a same-named `.py` file, which wins over a
    directory without one (not a regular package: not documented). `__init__` is the
    package itself; caches and data folders are skipped."""
    out = [name]
    entries = sorted(package_dir.iterdir(), key=lambda p: p.name)
    packages = {p.name for p in entries if p.is_dir() and (p / "__init__.py").is_file()}
    for path in entries:
        if path.name.startswith((".", "_")) and path.name != "__main__.py":
            continue
        if path.is_dir() and path.name in packages and path.name.isidentifier():
            out += package_modules(path, f"{name}.{path.name}")
        elif path.suffix == ".py" and path.stem.isidentifier() and path.stem not in packages:
            out.append(f"{name}.{path.stem}")
    return out


def api_uris(modules: list[str], package_dir: Path) -> dict[str, str]:
    """Docs path of each module's page, mirroring the tree: a package's page is its
    folder's index page (the top package's is the API overview)."""
    out = {}
    for module in modules:
        rel = "/".join(module.split(".")[1:])
        if not rel:
            out[module] = f"{API_DIR}/index.md"
        elif (package_dir / rel / "__init__.py").is_file():
            out[module] = f"{API_DIR}/{rel}/index.md"
        else:
            out[module] = f"{API_DIR}/{rel}.md"
    return out


def submodules(modules: list[str], parent: str) -> list[str]:
    """The direct children of `parent` among `modules`."""
    depth = parent.count(".") + 1
    return [m for m in modules if m.startswith(parent + ".") and m.count(".") == depth]


def first_sentence(text: str) -> str:
    """The first sentence of a docstring, on one line (a period that ends an abbreviation
    such as "et al." does not end it)."""
    flat = " ".join(text.strip().split("\n\n")[0].split())  # the first paragraph
    match = re.match(r"(.+?(?<!\bal)\.)(\s+[A-Z`(\-0-9]|$)", flat)
    sentence = (match.group(1) if match else flat).rstrip(".")
    # `<version>` outside code would be read as an HTML tag; inside backticks it is literal.
    parts = sentence.split("`")
    return "`".join(p if i % 2 else html.escape(p, quote=False) for i, p in enumerate(parts))


def render_code_map(package_dir: Path, from_page: str) -> str:
    """A table of every module: its path, what its docstring says first, its API page."""
    modules = package_modules(package_dir)
    uris = api_uris(modules, package_dir)
    depth = from_page.count("/")
    rows = ["| module | what |", "|---|---|"]
    for module in modules:
        rel = "/".join(module.split(".")[1:])
        path = package_dir / rel / "__init__.py"
        if not path.is_file():
            path = package_dir / f"{rel}.py" if rel else package_dir / "__init__.py"
        doc = ast.get_docstring(ast.parse(path.read_text())) or ""
        shown = f"{rel}/" if path.name == "__init__.py" and rel else (f"{rel}.py" if rel else "")
        if not shown:
            continue
        link = "../" * depth + uris[module]
        rows.append(f"| [`{shown}`]({link}) | {_cell(first_sentence(doc))} |")
    return "\n".join(rows)


def api_page(module: str, children: list[str] | None = None) -> str:
    lines = [f"# `{module}`", "", f"::: {module}", ""]
    if children:
        lines[3:3] = ["", "Modules: " + ", ".join(f"`{c}`" for c in children), ""]
    return "\n".join(lines)


def api_nav(modules: list[str], uris: dict[str, str]) -> list:
    """Nested nav entries that mirror the package tree."""

    def entry(module: str) -> Any:
        kids = submodules(modules, module)
        if not kids:
            return {module.rsplit(".", 1)[-1]: uris[module]}
        return {module.rsplit(".", 1)[-1]: [{"(package)": uris[module]}, *(entry(k) for k in kids)]}

    top = modules[0]
    return [{"Overview": uris[top]}, *(entry(k) for k in submodules(modules, top))]


# ---------------------------------------------------------------------------------------------
# mkdocs hooks


def _root(config) -> Path:
    return Path(config.config_file_path).resolve().parent


def _replace_nav(nav: list, title: str, value: Any) -> bool:
    for i, item in enumerate(nav):
        if isinstance(item, dict):
            (key, sub), *_ = item.items()
            if key == title:
                nav[i] = {key: value}
                return True
            if isinstance(sub, list) and _replace_nav(sub, title, value):
                return True
    return False


def on_config(config):
    root = _root(config)
    package_dir = root / "src" / PACKAGE
    modules = package_modules(package_dir)
    uris = api_uris(modules, package_dir)
    config.extra["nla_api"] = {"modules": modules, "uris": uris}
    if config.nav is not None:
        _replace_nav(config.nav, API_NAV_TITLE, api_nav(modules, uris))
    return config


def on_files(files, config):
    from mkdocs.structure.files import File

    root = _root(config)
    api = config.extra["nla_api"]
    modules = api["modules"]
    for module in modules:
        page = api_page(module, submodules(modules, module))
        files.append(File.generated(config, api["uris"][module], content=page))
    for uri, path in card_plots(root):
        files.append(File.generated(config, uri, abs_src_path=str(path)))
    return files


def on_page_markdown(markdown, page, config, files):
    if "<!-- nla:" not in markdown:
        return markdown
    return expand_markers(markdown, _root(config))
