"""The exact multiple-choice knapsack: one width per layer, the least summed cost under a byte budget.

Dynamic programming over the bytes counted in units (rounded to nearest; exact with ``unit=1``), then
checked against the exact bytes: when rounding let the sum exceed the budget, the capacity shrinks one
unit at a time.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np


def knapsack(options: Mapping[str, Mapping[int, tuple[int, float]]], budget_bytes: int,
             unit: int = 256) -> dict[str, int] | None:
    """The width per layer minimizing the summed cost with the summed bytes <= ``budget_bytes``.

    ``options[layer][bits] = (bytes, cost)``. Returns None when even the smallest choices do not fit.
    """
    def size(pick: Mapping[str, int]) -> int:
        return sum(options[layer][bits][0] for layer, bits in pick.items())

    smallest = {layer: min(by_bits, key=lambda b: by_bits[b][0]) for layer, by_bits in options.items()}
    if size(smallest) > budget_bytes:
        return None
    # Rounding moves each layer's bytes by at most half a unit, so any fitting layout fits this capacity.
    cap = (2 * budget_bytes + len(options) * unit) // (2 * unit)
    while cap >= 0:
        pick = _solve(options, cap, unit)
        if pick is None:
            break
        if size(pick) <= budget_bytes:
            return pick
        cap -= 1
    return smallest


def _solve(options: Mapping[str, Mapping[int, tuple[int, float]]], cap: int, unit: int) -> dict[str, int] | None:
    """Dynamic programming over ``cap`` units: the least summed cost for each number of units used."""
    best = np.full(cap + 1, np.inf)
    best[0] = 0.0
    picks = []
    for layer, by_bits in options.items():
        choices = sorted(by_bits.items())
        nxt = np.full(cap + 1, np.inf)
        pick = np.full(cap + 1, -1, dtype=np.int16)
        for j, (_, (size, cost)) in enumerate(choices):
            w = round(size / unit)
            if w > cap:
                continue
            cand = np.full(cap + 1, np.inf)
            cand[w:] = best[:cap + 1 - w] + cost
            better = cand < nxt
            nxt[better], pick[better] = cand[better], j
        best = nxt
        picks.append((layer, choices, pick))
    end = int(np.argmin(best))
    if not np.isfinite(best[end]):
        return None
    out: dict[str, int] = {}
    for layer, choices, pick in reversed(picks):
        bits, (size, _) = choices[int(pick[end])]
        out[layer] = bits
        end -= round(size / unit)
    return out
