"""Griffe extension (mkdocs.yml, mkdocstrings `extensions`): keep prose docstrings prose.

The package's docstrings are free prose rendered as Markdown. Bracketed text such as
`[BOS] [W v] [p_1 .. p_n]` (a sequence layout) reads to Markdown as a reference link, which
mkdocs-autorefs then reports as a missing cross-reference target. This extension escapes the
opening brackets of such pairs when the target is not a Python identifier path, outside code
spans and fenced blocks; a real cross-reference like `[Params][nla_repro.config.Params]` is
left alone (and still checked).
"""

from __future__ import annotations

import re

from griffe import Extension

IDENTIFIER = re.compile(r"`?[A-Za-z_][\w.]*`?")
PAIR = re.compile(r"(?<!\\)\[([^\[\]\n]*)\](\s?)\[([^\[\]\n]*)\]")
CODE = re.compile(r"(```.*?```|~~~.*?~~~|`[^`\n]*`)", re.S)


def _escape_pairs(text: str) -> str:
    def fix(match: re.Match) -> str:
        title, space, target = match.groups()
        ref = target or title
        if IDENTIFIER.fullmatch(ref.strip()):
            return match.group(0)
        return f"\\[{title}]{space}\\[{target}]"

    return PAIR.sub(fix, text)


def escape_prose_references(text: str) -> str:
    """`text` with non-identifier `[a][b]` / `[a] [b]` pairs escaped outside code."""
    parts = CODE.split(text)
    return "".join(p if i % 2 else _escape_pairs(p) for i, p in enumerate(parts))


class ProseDocstrings(Extension):
    """Escape reference-like brackets in every docstring before it is rendered."""

    def on_instance(self, *, obj, **kwargs) -> None:  # griffe >= 1.0 event
        if obj.docstring is not None:
            obj.docstring.value = escape_prose_references(obj.docstring.value)
