"""Asking a backend: a template rendered per row, in the backend's batches, and asking
again until each response parses."""

from __future__ import annotations

import dataclasses

from nla_repro.labeling.backends import Backend, Completion
from nla_repro.seeds import derive_seed


def ask(backend: Backend, template, rows: list[dict], seed: int) -> list[Completion]:
    """Responses to the template rendered for each row, in batches of the backend's size;
    the local backend writes inside the template's scaffold when it has one."""
    out: list[Completion] = []
    for i in range(0, len(rows), backend.batch_size):
        batch = rows[i : i + backend.batch_size]
        batch_seed = derive_seed(seed, i, stream="offset")
        if backend.scaffolded and template.local_scaffold:
            prompts = [template.render(local=True, **r) for r in batch]
            out += backend.complete_scaffold(prompts, template.local_scaffold, batch, batch_seed)
        else:
            prompts = [template.render(**r) for r in batch]
            out += backend.complete(prompts, template.prefill, batch_seed)
    return out


def ask_until_parsed(backend, template, rows: list[dict], parse, max_attempts, seed) -> list:
    """Ask until each response parses or max_attempts runs out: (parsed, completion, tries).
    `parse(text)` returns an object whose `.error` is empty when the response is usable."""
    results: list[tuple | None] = [None] * len(rows)
    tries = [0] * len(rows)
    spent = [(0, 0, 0.0)] * len(rows)  # tokens and latency of every attempt: all are billed
    pending = list(range(len(rows)))
    for attempt in range(max_attempts):
        comps = ask(
            backend,
            template,
            [rows[i] for i in pending],
            derive_seed(seed, attempt, stream="attempt"),
        )
        still = []
        for i, comp in zip(pending, comps, strict=True):
            tries[i] += comp.attempts
            n_in, n_out, secs = spent[i]
            spent[i] = (n_in + comp.input_tokens, n_out + comp.output_tokens, secs + comp.latency_s)
            comp = dataclasses.replace(
                comp, input_tokens=spent[i][0], output_tokens=spent[i][1], latency_s=spent[i][2]
            )
            parsed = parse(comp.text) if not comp.error else None
            results[i] = (parsed, comp, tries[i])
            if parsed is None or parsed.error:
                still.append(i)
        pending = still
        if not pending:
            break
    return results
