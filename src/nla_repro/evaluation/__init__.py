"""Evaluating an NLA pair.

- `measures`: the metric functions (cosines, centred scores, intervals, identity, best-of-K,
  diversity), pure.
- `suite`: metrics/eval.json from the per-row table, and the verdicts.
- `chunk`: every model call for a slice of the evaluated rows.
- `registry`: every published metric declared once, and the quality bars.
- `report`: the console report that closes the eval.
"""
