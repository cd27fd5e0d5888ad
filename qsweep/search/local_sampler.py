"""``search.sampler=local``: spend trials next to the best layouts found, not anywhere in the space.

A layout is one width per group: Optuna categorical params whose choices are numbers, in order. For each trial
the sampler picks a parent, the member of the Pareto front (several objectives) or of the ``parents`` best trials
(one objective) with the fewest children so far, and proposes a neighbour of it: mostly an *exchange* (one param
one width up, another one width down), which keeps the size near the parent's; with probability ``walk`` a single
step up or down, which walks along the front. Given the bytes of every (param, width) an exchange never grows the
parent, and no proposal exceeds ``budget_bytes``. Given the per-(param, width) cost the warm start's knapsack
minimized, a move is drawn with probability ∝ exp(-Δcost / (``temperature`` x the parent's cost)): first the moves
that additive cost calls nearly neutral, since where it is wrong is where measuring can beat the knapsack.
No layout is proposed twice; before any trial is complete, and once every neighbour of every parent was tried,
params are drawn at random.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import optuna
from optuna.distributions import BaseDistribution, CategoricalDistribution
from optuna.study import StudyDirection
from optuna.trial import FrozenTrial, TrialState

Table = Mapping[str, Mapping[Any, float]]  # param -> choice -> bytes or cost
Move = tuple[tuple[str, int], ...]  # (param, +1 | -1) steps along its ordered choices
PARENT = "local_parent"  # the trial system attr naming the trial a proposal is a neighbour of
WALK = 0.2
TEMPERATURE = 0.05
PARENTS = 3


class LocalSampler(optuna.samplers.BaseSampler):
    """Neighbours of the front (or the best trials); see the module doc. ``choice_bytes`` / ``cost``: per
    (param, width); ``fixed_bytes``: what every layout has besides them; ``budget_bytes``: the hard size budget."""

    def __init__(self, seed: int | None = None, *, choice_bytes: Table | None = None, fixed_bytes: int = 0,
                 budget_bytes: int | None = None, cost: Table | None = None, walk: float = WALK,
                 temperature: float = TEMPERATURE, parents: int = PARENTS):
        self._rng = np.random.RandomState(seed)
        self._random = optuna.samplers.RandomSampler(seed=seed)
        self.choice_bytes, self.fixed_bytes, self.budget_bytes = choice_bytes, fixed_bytes, budget_bytes
        self.cost, self.walk, self.temperature, self.parents = cost, walk, temperature, parents

    def reseed_rng(self) -> None:
        self._rng.seed()
        self._random.reseed_rng()

    def infer_relative_search_space(self, study: optuna.Study, trial: FrozenTrial) -> dict[str, BaseDistribution]:
        """The ordered categorical params of the complete trials."""
        space: dict[str, BaseDistribution] = {}
        for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
            for name, dist in t.distributions.items():
                if isinstance(dist, CategoricalDistribution) and all(
                        isinstance(c, (int, float)) and not isinstance(c, bool) for c in dist.choices):
                    space.setdefault(name, dist)
        return space

    def sample_relative(self, study: optuna.Study, trial: FrozenTrial,
                        search_space: dict[str, BaseDistribution]) -> dict[str, Any]:
        """A fresh neighbour of a parent (empty: draw at random); the trial records its parent's number."""
        if not search_space:
            return {}
        trials = study.get_trials(deepcopy=False)
        tried = {layout_key(t, search_space) for t in trials}
        children = Counter(t.system_attrs.get(PARENT) for t in trials)
        for parent in self._parents(study, trials, children):
            params = self._neighbour(parent, search_space, tried)
            if params is not None:
                study._storage.set_trial_system_attr(trial._trial_id, PARENT, parent.number)
                return params
        return {}

    def sample_independent(self, study: optuna.Study, trial: FrozenTrial, param_name: str,
                           param_distribution: BaseDistribution) -> Any:
        return self._random.sample_independent(study, trial, param_name, param_distribution)

    def _parents(self, study: optuna.Study, trials: Sequence[FrozenTrial], children: Counter) -> list[FrozenTrial]:
        """The front (or the best few), fewest children first, ties in random order."""
        done = [t for t in trials if t.state == TrialState.COMPLETE and all(v <= 0 for v in t.constraints.values())
                and self._fits(t.params)]
        if len(study.directions) > 1:
            pool = pareto_members(done, study.directions)
        else:
            sign = -1 if study.direction == StudyDirection.MAXIMIZE else 1
            pool = sorted(done, key=lambda t: sign * t.value)[:self.parents]
        pool = [pool[i] for i in self._rng.permutation(len(pool))]
        return sorted(pool, key=lambda t: children[t.number])

    def _neighbour(self, parent: FrozenTrial, space: dict[str, BaseDistribution],
                   tried: set[tuple]) -> dict[str, Any] | None:
        """A fresh neighbour: an exchange, or (``walk``) a step up or down; the other kind where none is left."""
        params = {n: v for n, v in parent.params.items() if n in space}
        ladders = {n: sorted(space[n].choices) for n in params}
        steps = [(n, s) for n in params for s in (1, -1) if 0 <= ladders[n].index(params[n]) + s < len(ladders[n])]
        ups = [((n, s),) for n, s in steps if s > 0]
        downs = [((n, s),) for n, s in steps if s < 0]
        exchanges = [(u, d) for (u,) in ups for (d,) in downs if u[0] != d[0]]
        walks = [ups, downs] if self._rng.rand() < 0.5 else [downs, ups]
        kinds = walks + [exchanges] if self._rng.rand() < self.walk else [exchanges] + walks
        for moves in kinds:
            found = self._draw(params, ladders, moves, tried, exchange=moves is exchanges)
            if found is not None:
                return found
        return None

    def _draw(self, params: dict[str, Any], ladders: dict[str, list], moves: list[Move], tried: set[tuple],
              exchange: bool) -> dict[str, Any] | None:
        """One of ``moves`` from ``params`` that fits and was not tried, drawn by its weight."""
        parent_bytes = self._bytes(params)
        moves = [m for m in moves if self._allowed(params, ladders, m, parent_bytes, exchange)]
        weights = self._weights(params, ladders, moves)
        while moves:
            i = self._rng.choice(len(moves), p=weights / weights.sum())
            child = apply_move(params, ladders, moves[i])
            if key_of(child) not in tried:
                return child
            moves.pop(i)
            weights = np.delete(weights, i)
        return None

    def _allowed(self, params: dict[str, Any], ladders: dict[str, list], move: Move, parent_bytes: float,
                 exchange: bool) -> bool:
        """Within the budget; an exchange also no larger than its parent."""
        if self.choice_bytes is None:
            return True
        size = self._bytes(apply_move(params, ladders, move))
        return (self.budget_bytes is None or size <= self.budget_bytes) and not (exchange and size > parent_bytes)

    def _weights(self, params: dict[str, Any], ladders: dict[str, list], moves: list[Move]) -> np.ndarray:
        """exp(-Δcost / (temperature x the parent's cost)) per move; equal without a cost."""
        if self.cost is None or not moves:
            return np.ones(len(moves))
        base = self._cost(params)
        delta = np.array([self._cost(apply_move(params, ladders, m)) - base for m in moves])
        scale = self.temperature * max(base, np.finfo(float).tiny)
        return np.exp(-(delta - delta.min()) / scale) + np.finfo(float).tiny

    def _bytes(self, params: Mapping[str, Any]) -> float:
        table = self.choice_bytes or {}
        return self.fixed_bytes + sum(table[n][v] for n, v in params.items() if n in table)

    def _cost(self, params: Mapping[str, Any]) -> float:
        table = self.cost or {}
        return math.fsum(table[n][v] for n, v in params.items() if n in table)

    def _fits(self, params: Mapping[str, Any]) -> bool:
        return self.choice_bytes is None or self.budget_bytes is None or self._bytes(params) <= self.budget_bytes


def apply_move(params: Mapping[str, Any], ladders: Mapping[str, list], move: Move) -> dict[str, Any]:
    child = dict(params)
    for name, step in move:
        ladder = ladders[name]
        child[name] = ladder[ladder.index(child[name]) + step]
    return child


def key_of(params: Mapping[str, Any]) -> tuple:
    return tuple(sorted(params.items()))


def layout_key(trial: FrozenTrial, names: Mapping[str, Any]) -> tuple:
    """The params in ``names`` a trial was given or will be (an enqueued trial's are still its fixed params)."""
    return key_of({n: v for n, v in {**trial.system_attrs.get("fixed_params", {}), **trial.params}.items()
                   if n in names})


def pareto_members(trials: Sequence[FrozenTrial], directions: Sequence[StudyDirection]) -> list[FrozenTrial]:
    """The trials no other beats on every objective (equal ones do not beat each other)."""
    signs = [-1.0 if d == StudyDirection.MAXIMIZE else 1.0 for d in directions]
    points = [tuple(s * v for s, v in zip(signs, t.values)) for t in trials]

    def beaten(p: tuple) -> bool:
        return any(q != p and all(a <= b for a, b in zip(q, p)) for q in points)

    return [t for t, p in zip(trials, points) if not beaten(p)]
