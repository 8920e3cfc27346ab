"""How far a rebuild on another thread count moved each metrics file, against verify's tolerances.

Reads the report `python -m nla_repro verify` writes (.nla_work/verify.json, every number of
every metrics file with its published and rebuilt value) after a rebuild in the numerical
tier, and prints per file: numbers compared, numbers that moved, the largest |Δ| and the
largest |Δ| / |published|, and the largest share of its tolerance a number used. This is how
the numerical-tier tolerances (nla_repro.reproducibility.TOLERANCES) were set: at each
number each bound is at least 3x the largest difference two rebuilds of the default showed
against the one-thread pin (docs/operations/reproducibility.md).

    python -m nla_repro verify --against <the other build's commit>
    python benchmarks/tolerances.py [--report .nla_work/verify.json]
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path

from nla_repro.reproducibility import is_number


def summarize(leaves: list[dict]) -> list[dict]:
    by_file: dict[str, list[dict]] = defaultdict(list)
    for leaf in leaves:
        if leaf["tier"] != "judge" and is_number(leaf["published"]):
            by_file[leaf["file"]].append(leaf)
    rows = []
    for file, group in sorted(by_file.items()):
        deltas = [
            (abs(leaf["rebuilt"] - leaf["published"]), leaf)
            for leaf in group
            if is_number(leaf["rebuilt"])
        ]
        moved = [(d, leaf) for d, leaf in deltas if d > 0]
        worst = max(moved, key=lambda x: x[0], default=(0.0, None))
        rel = max((d / abs(leaf["published"]) for d, leaf in moved if leaf["published"]), default=0)
        used = max((d / leaf["tolerance"] for d, leaf in moved if leaf["tolerance"]), default=0.0)
        rows.append(
            {
                "file": file,
                "numbers": len(group),
                "moved": len(moved),
                "max_abs_delta": worst[0],
                "max_abs_delta_at": worst[1]["path"] if worst[1] else None,
                "max_rel_delta": rel,
                "max_share_of_tolerance": used,
            }
        )
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--report", type=Path, default=Path(".nla_work/verify.json"))
    args = parser.parse_args()
    if not args.report.is_file():
        print(f"{args.report}: not found; run `python -m nla_repro verify` first", file=sys.stderr)
        return 1
    report = json.loads(args.report.read_text())
    print(f"against {report['against']}, tier {report['tier']}")
    print("| file | numbers | moved | max abs Δ (at) | max rel Δ | max share of tolerance |")
    print("|---|---|---|---|---|---|")
    for r in summarize(report["leaves"]):
        print(
            f"| {r['file']} | {r['numbers']} | {r['moved']} | {r['max_abs_delta']:.3g}"
            f" ({r['max_abs_delta_at']}) | {r['max_rel_delta']:.3g} |"
            f" {r['max_share_of_tolerance']:.3g} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
