"""Everything platform-specific, in one place (Windows workarounds included)."""

from __future__ import annotations

import shutil

from nla_repro.errors import SourceError


def resolve_cli(name: str) -> str:
    """Full path of a command-line tool found on PATH.

    shutil.which applies PATHEXT on Windows, so npm-installed tools such as `gemini` resolve to
    their `gemini.CMD` shim; calling the bare name through subprocess would not find it there.
    """
    path = shutil.which(name)
    if path is None:
        raise SourceError(f"command {name!r} not found on PATH")
    return path
