"""The one seed-derivation function: its formulas are those every published build used."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from nla_repro.seeds import derive_seed

SRC = Path(__file__).resolve().parents[1] / "src" / "nla_repro"


def test_stage_stream_is_the_published_formula():
    assert derive_seed(3, 2) == 3 * 1_000_003 + 2 * 10_007  # a chunk of label or eval
    assert derive_seed(3, 0, 7) == 3 * 1_000_003 + 7  # an epoch of the SFT batch order
    assert derive_seed(3, 4, 5) == 3 * 1_000_003 + 4 * 10_007 + 5  # SAE epoch, buffer
    assert derive_seed(0) == 0


def test_offset_streams():
    assert derive_seed(11, 2, stream="attempt") == 11 + 2 * 7_919
    assert derive_seed(11, 3, stream="paraphrase") == 11 + 3 * 104_729
    assert derive_seed(11, 16, stream="offset") == 27
    assert derive_seed(11, 1, stream="sample") == 11 + 15_485_863  # eval's evaluated rows


def test_bad_streams_and_arity_are_errors():
    with pytest.raises(ValueError, match="unknown seed stream"):
        derive_seed(0, 1, stream="nope")
    with pytest.raises(ValueError, match="at most 1 indices"):
        derive_seed(0, 1, 2, stream="attempt")


def test_no_module_derives_seeds_with_its_own_constants():
    """Every derived seed goes through derive_seed: the stream multipliers appear only in
    seeds.py."""
    pattern = re.compile(r"\b(1_000_003|10_007|7_?919|104_729|15_485_863)\b")
    offenders = [
        f"{path.relative_to(SRC)}:{n}"
        for path in SRC.rglob("*.py")
        if path.name != "seeds.py"
        for n, line in enumerate(path.read_text().splitlines(), 1)
        if pattern.search(line)
    ]
    assert not offenders, offenders
