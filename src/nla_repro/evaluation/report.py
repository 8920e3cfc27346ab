"""The console report that closes the eval and sae stages (and so `dvc repro`): every metric
the registry shows at `report` (or `report:sae`) with its interval, n and baseline, then the
verdicts and the quality bars."""

from __future__ import annotations

from nla_repro.evaluation.registry import bar_rows, report_rows


def eval_report(metrics: dict) -> list[tuple[str, str]]:
    """(what, value) rows of the eval's closing table: headline numbers, verdicts, bars."""
    rows = report_rows("report", {"eval": metrics})
    rows += [(f"verdict {name}", str(value)) for name, value in metrics["verdicts"].items()]
    rows += [
        (f"quality bar: {b['name']}", f"{b['value']} ({b['target']}): {b['met']}")
        for b in bar_rows({"eval": metrics})
    ]
    return rows


def print_rows(rows: list[tuple[str, str]]) -> None:
    width = max(len(a) for a, _ in rows)
    print("\n".join(f"  {a:<{width}}  {b}" for a, b in rows))
