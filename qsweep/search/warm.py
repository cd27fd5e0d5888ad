"""The layouts a new study runs first: uniform ones, then the best-by-sensitivity layouts under size budgets.

Each layer's cost at each width (``search.warm_cost``: ``quant.mixed``'s Fisher-weighted rounding error,
:func:`fisher_noise`, or its output noise alone at a reference width, :func:`layer_noise`)
is summed over a layout; per budget, :func:`~qsweep.quant.knapsack.knapsack` picks one width per group with
the least summed noise whose bytes fit. Its bytes are the planned per-layer bytes; the layout's exact artifact
size is then measured, and where the zip's alignment made it overshoot, the budget handed to the knapsack
shrinks by the overshoot until it fits. Nothing over the study's size budget is enqueued.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping

import optuna
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import DataLoader, Subset

from qsweep.analysis.sensitivity import sensitivity, sensitivity_key
from qsweep.models.cache import cache_dir as resolve_cache_dir
from qsweep.quant.knapsack import knapsack
from qsweep.quant.mixed import WidthPlanner
from qsweep.search.space import FLOAT, SearchSpace
from qsweep.search.trials import LayoutModels

# Images for the per-layer SQNR: enough for a stable ranking, cheap for DeiT-S.
SENSITIVITY_IMAGES = 128
KNAPSACK_UNITS = 20_000  # the knapsack's capacity in units: bytes / unit (rounding is checked against exact bytes)
FIT_TRIES = 8  # knapsack solves per budget before giving up on fitting the exact bytes
COST_ATTR = "qsweep_warm_cost"  # the study's user attr: the warm start's cost per (weight param, width)

Layout = dict[str, dict[str, int]]


def layer_noise(rows: list[Mapping], ref_bits: int) -> Callable[[str, int], float]:
    """``noise(layer, bits)``: relative output-noise power of ``layer`` alone at ``bits``: its output SQNR measured
    alone at ``ref_bits`` (the analysis step's rows), 4x less noise per extra bit (uniform quantization noise)."""
    ref = {r["name"]: 10.0 ** (-float(r["output_sqnr_db"]) / 10.0) for r in rows}

    def noise(name: str, bits: int) -> float:
        return 0.0 if bits == FLOAT else ref.get(name, 0.0) * 4.0 ** (ref_bits - bits)

    return noise


def group_costs(space: SearchSpace, noise: Callable[[str, int], float]) -> dict[str, dict[int, float]]:
    """Each group's summed per-layer cost at each width: what the knapsack minimizes."""
    return {g: {w: sum(noise(n, w) for n in names) for w in space.w_choices} for g, names in space.groups.items()}


def weight_param(space: SearchSpace, group: str) -> str:
    """The Optuna param of ``group``'s weight width."""
    return next(iter(space.params({group: {"w": 0}})))


def cost_table(space: SearchSpace, noise: Callable[[str, int], float]) -> dict[str, dict[int, float]]:
    """:func:`group_costs` by Optuna param (``search.sampler=local`` prefers the moves it calls nearly neutral)."""
    return {weight_param(space, g): by_width for g, by_width in group_costs(space, noise).items()}


def knapsack_layout(space: SearchSpace, models: LayoutModels, noise: Callable[[str, int], float],
                    budget_bytes: int) -> Layout | None:
    """The least-noise layout whose exact artifact size is at most ``budget_bytes`` (None: none fits)."""
    costs = group_costs(space, noise)
    options = {g: {w: (models.choice_bytes(g, w), costs[g][w]) for w in space.w_choices} for g in space.groups}
    smallest = sum(min(size for size, _ in by_width.values()) for by_width in options.values())
    target, tried = budget_bytes - models.fixed_bytes, set()
    for _ in range(FIT_TRIES):
        capacity = max(target, smallest)  # the narrowest layout is measured even where the plan says it cannot fit
        pick = knapsack(options, capacity, unit=max(1, capacity // KNAPSACK_UNITS))
        if frozenset(pick.items()) in tried:
            return None
        tried.add(frozenset(pick.items()))
        layout = space.with_widths({g: pick[g] for g in space.groups})
        size = models.layout_bytes(layout)
        if size <= budget_bytes:
            return layout
        target -= size - budget_bytes
    return None


def warm_start(cfg: DictConfig, study: optuna.Study, space: SearchSpace, models: LayoutModels, job,
               budget_bytes: int | None) -> None:
    """Enqueue the uniform layouts that fit the budget, widest first, then the knapsack layouts."""
    s = cfg.search
    widths = sorted(w for w in space.w_choices if w != FLOAT)
    seeds, over = [], []
    for w in s.warm_start if s.warm_start is not None else widths[::-1]:
        layout = space.uniform(w)
        if budget_bytes is None or models.layout_bytes(layout) <= budget_bytes:
            seeds.append(layout)
        else:
            over.append(w)
    note = f" (W{', W'.join(map(str, over))} over the size budget: not enqueued)" if over else ""
    print(f"warm start: {plural(len(seeds), 'uniform layout')}{note}", flush=True)
    if s.greedy:
        noise = (fisher_noise(cfg, space, job) if s.warm_cost == "fisher"
                 else layer_noise(_sensitivity_rows(cfg, job), cfg.analysis.w_bits))
        # Kept with the study: a resumed or joining worker's local sampler reads it (study.local_sampler).
        study.set_user_attr(COST_ATTR, {p: {str(w): c for w, c in by.items()}
                                        for p, by in cost_table(space, noise).items()})
        seeds += _sensitivity_layouts(cfg, space, models, noise, widths, budget_bytes)
    seen = set()
    for layout in seeds:
        params = space.params(layout)
        key = json.dumps(params, sort_keys=True)
        if key not in seen:
            seen.add(key)
            study.enqueue_trial(params, user_attrs={"seed": "warm start"})


def _sensitivity_layouts(cfg: DictConfig, space: SearchSpace, models: LayoutModels, noise: Callable[[str, int], float],
                         widths: list[int], budget_bytes: int | None) -> list[Layout]:
    """One knapsack layout per budget: ``search.greedy_budget_mb``, else each uniform layout's size between the
    narrowest and the widest width; none over the study's budget, which is one of them."""
    s = cfg.search
    budgets = [round(s.greedy_budget_mb * 1e6)] if s.greedy_budget_mb else [
        models.layout_bytes(space.uniform(w)) for w in widths[1:-1]]
    if budget_bytes is not None:
        budgets = sorted({min(b, budget_bytes) for b in budgets} | {budget_bytes})
    layouts = [layout for b in budgets if (layout := knapsack_layout(space, models, noise, b)) is not None]
    print(f"warm start: {plural(len(layouts), 'layout')} of least summed per-layer cost ({s.warm_cost}, exact knapsack) under "
          f"{', '.join(f'{b / 1e6:.6f}' for b in budgets)} MB", flush=True)
    return layouts


def fisher_noise(cfg: DictConfig, space: SearchSpace, job) -> Callable[[str, int], float]:
    """``noise(layer, bits)``: ``quant.mixed``'s cost of the searched ``layer`` at ``bits`` (float: none), measured
    once by :class:`~qsweep.quant.mixed.WidthPlanner` on the run's calibration data with the recipe's
    ``quant.mixed`` output model, samples and draws."""
    widths = [None if w == FLOAT else w for w in space.w_choices]
    recipe = OmegaConf.merge(cfg.quant, {"mixed": {"enabled": True, "widths": widths, "layers": list(space.layers)}})
    options = WidthPlanner(job.model, recipe, job.calib).options
    return lambda name, bits: options[name][bits][1]


def _sensitivity_rows(cfg: DictConfig, job) -> list:
    """Each layer's output SQNR alone at ``analysis.w_bits`` (cached)."""
    return sensitivity(job.model, cfg.quant, job.calib, first_images(job.loader, SENSITIVITY_IMAGES),
                       job.bundle.num_classes, resolve_cache_dir(cfg.cache_dir),
                       sensitivity_key(job.model, f"{job.fp_key}-first{SENSITIVITY_IMAGES}", cfg.quant,
                                       cfg.analysis.w_bits, cfg.analysis.a_bits),
                       w_bits=cfg.analysis.w_bits, a_bits=cfg.analysis.a_bits, progress=cfg.progress)


def plural(n: int, noun: str) -> str:
    return f"{n} {noun}{'s' if n != 1 else ''}"


def first_images(loader: DataLoader, limit: int) -> DataLoader:
    dataset = loader.dataset
    if len(dataset) > limit:
        dataset = Subset(dataset, range(limit))
    return DataLoader(dataset, batch_size=loader.batch_size, shuffle=False)
