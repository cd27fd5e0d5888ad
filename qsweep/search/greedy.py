"""A sensitivity-guided layout under a size budget, to seed the study.

Each layer's sensitivity is the output SQNR measured with that layer alone quantized at a
reference width (the analysis step's cached table). Uniform quantization noise power falls by
4x per extra bit, so the noise of a layer at ``b`` bits is ``n_ref * 4**(b_ref - b)``. Starting
from the widest layout, the group whose next narrower width adds the least noise per byte
saved is narrowed, until the layout fits the budget.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

from qsweep.search.space import FLOAT, SearchSpace


def layer_noise(rows: list[Mapping], ref_bits: int) -> Callable[[str, int], float]:
    """``noise(layer, bits)``: relative output-noise power of ``layer`` alone at ``bits``."""
    ref = {r["name"]: 10.0 ** (-float(r["output_sqnr_db"]) / 10.0) for r in rows}

    def noise(name: str, bits: int) -> float:
        return 0.0 if bits == FLOAT else ref.get(name, 0.0) * 4.0 ** (ref_bits - bits)

    return noise


def greedy_layout(space: SearchSpace, noise: Callable[[str, int], float],
                  size_of: Callable[[dict], float], budget_mb: float) -> dict[str, dict[str, int]]:
    """The least-noise layout found by narrowing one group at a time until ``size_of(layout) <= budget_mb``.

    Stops at the narrowest layout if the budget cannot be met.
    """
    widths = sorted(w for w in space.w_choices if w != FLOAT)
    layout = space.uniform(widths[-1])

    def group_noise(group: str, bits: int) -> float:
        return sum(noise(name, bits) for name in space.groups[group])

    size = size_of(layout)
    while size > budget_mb:
        best = None
        for group, choice in layout.items():
            i = widths.index(choice["w"])
            if i == 0:
                continue
            narrower = {**layout, group: {**choice, "w": widths[i - 1]}}
            saved = size - size_of(narrower)
            if saved <= 0:
                continue
            cost = (group_noise(group, widths[i - 1]) - group_noise(group, choice["w"])) / saved
            if best is None or cost < best[0]:
                best = (cost, narrower)
        if best is None:
            break
        layout = best[1]
        size = size_of(layout)
    return layout
