"""search.sampler=local: neighbours of the front or the best trials, fresh, within the budget, reproducible."""

from __future__ import annotations

import itertools

import optuna
import pytest
from omegaconf import OmegaConf

from qsweep.config import ConfigError, SearchConfig, validate_search
from qsweep.search.local_sampler import PARENT, LocalSampler, pareto_members

WIDTHS = [2, 3, 4, 6, 8]
PARAMS = [f"w:g{i}" for i in range(5)]
BYTES = {p: {w: (i + 1) * 100 * w for w in WIDTHS} for i, p in enumerate(PARAMS)}  # g4 is 5x g0's size


def layout_bytes(params: dict) -> int:
    return sum(BYTES[p][w] for p, w in params.items())


def quality(params: dict) -> float:
    """Wider is better, with an interaction the additive part does not see."""
    return sum((i + 1) * (1 - 2.0 ** -w) for i, w in enumerate(params.values())) - 0.5 * (params["w:g0"] == 2) * (
        params["w:g1"] == 2)


def ask(study: optuna.Study) -> optuna.Trial:
    trial = study.ask()
    for p in PARAMS:
        trial.suggest_categorical(p, WIDTHS)
    return trial


def pareto_study(sampler: LocalSampler, seeds=(8, 4, 2)) -> optuna.Study:
    study = optuna.create_study(directions=["maximize", "minimize"], sampler=sampler)
    for w in seeds:
        study.enqueue_trial({p: w for p in PARAMS})
    return study


def steps_between(parent: dict, child: dict) -> list[int]:
    """The nonzero moves along each param's ordered widths from ``parent`` to ``child``."""
    return sorted(WIDTHS.index(child[p]) - WIDTHS.index(parent[p]) for p in PARAMS if child[p] != parent[p])


def run(study: optuna.Study, n: int, check=None) -> list[optuna.trial.FrozenTrial]:
    """``n`` trials told their (quality, bytes); ``check(study, trial)`` sees each before it is told."""
    for _ in range(n):
        trial = ask(study)
        if check is not None:
            check(study, study._storage.get_trial(trial._trial_id))
        study.tell(trial, [quality(trial.params), layout_bytes(trial.params)])
    return study.trials


def test_before_any_trial_completes_it_draws_at_random():
    study = optuna.create_study(directions=["maximize", "minimize"], sampler=LocalSampler(seed=0))
    first = ask(study)
    study.tell(first, state=optuna.trial.TrialState.PRUNED)
    second = ask(study)
    for t in (first, second):
        assert PARENT not in study._storage.get_trial_system_attrs(t._trial_id)
        assert set(t.params) == set(PARAMS)


def test_each_proposal_is_a_fresh_neighbour_of_a_front_member():
    study = pareto_study(LocalSampler(seed=1, choice_bytes=BYTES))

    def check(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        if trial.number < 3:
            return
        parent = study.trials[trial.system_attrs[PARENT]]
        done = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
        assert parent in pareto_members(done, study.directions)
        # an exchange (one width up, one down) that does not grow the parent, or a single step
        assert steps_between(parent.params, trial.params) in ([-1, 1], [-1], [1])
        if len(steps_between(parent.params, trial.params)) == 2:
            assert layout_bytes(trial.params) <= layout_bytes(parent.params)

    trials = run(study, 40, check)
    proposed = [t for t in trials if PARENT in t.system_attrs]
    assert len(proposed) == 37
    keys = [tuple(sorted(t.params.items())) for t in trials]
    assert len(set(keys)) == len(keys)


def test_a_byte_table_and_budget_keep_every_proposal_within_it():
    budget = layout_bytes({p: 4 for p in PARAMS})
    study = pareto_study(LocalSampler(seed=2, choice_bytes=BYTES, budget_bytes=budget), seeds=(4, 3, 2))
    trials = run(study, 30)
    assert all(layout_bytes(t.params) <= budget for t in trials[3:])
    assert any(max(t.params.values()) > 4 for t in trials[3:])  # the budget, not the seeds' widths, bounds it


def test_the_cost_table_puts_the_nearly_neutral_exchange_first():
    cost = {p: {w: 4.0 ** -w for w in WIDTHS} for p in PARAMS}
    cost["w:g3"] = {w: 1e-6 * 4.0 ** -w for w in WIDTHS}  # g3's width is almost free to lower
    sampler = LocalSampler(seed=3, choice_bytes=BYTES, cost=cost, walk=0.0, temperature=1e-3)
    study = pareto_study(sampler, seeds=(4,))
    run(study, 1)
    child = ask(study).params
    # lower the (almost free) g3, raise one of those whose extra width fits in the bytes g3 gives up (g0, g1)
    assert child["w:g3"] == 3 and sorted(child.values()) == [3, 4, 4, 4, 6]
    assert layout_bytes(child) <= layout_bytes({p: 4 for p in PARAMS})


def test_single_objective_parents_are_the_best_trials_within_the_budget():
    budget = layout_bytes({p: 4 for p in PARAMS})
    sampler = LocalSampler(seed=4, choice_bytes=BYTES, budget_bytes=budget, parents=2)
    study = optuna.create_study(direction="maximize", sampler=sampler)
    study.enqueue_trial({p: 8 for p in PARAMS})  # the best, but over the budget: never a parent
    for w in (4, 3, 2):
        study.enqueue_trial({p: w for p in PARAMS})
    parents = []
    for _ in range(20):
        trial = ask(study)
        parent = study._storage.get_trial_system_attrs(trial._trial_id).get(PARENT)
        if parent is not None:
            parents.append(parent)
            done = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE
                    and layout_bytes(t.params) <= budget]
            best = sorted(done, key=lambda t: -t.value)[:2]
            assert parent in [t.number for t in best]
        study.tell(trial, quality(trial.params))
    assert len(parents) == 16 and 0 not in parents


def test_the_same_seed_proposes_the_same_layouts():
    def history(seed: int) -> list[tuple]:
        trials = run(pareto_study(LocalSampler(seed=seed, choice_bytes=BYTES)), 15)
        return [(tuple(sorted(t.params.items())), t.system_attrs.get(PARENT)) for t in trials]

    assert history(5) == history(5)
    assert history(5) != history(6)


def test_once_every_neighbour_was_tried_it_draws_at_random():
    study = optuna.create_study(direction="maximize", sampler=LocalSampler(seed=0))
    study.enqueue_trial({"w:a": 2, "w:b": 2})
    for _ in range(12):
        trial = study.ask()
        params = {p: trial.suggest_categorical(p, [2, 4]) for p in ("w:a", "w:b")}
        study.tell(trial, sum(params.values()))
    keys = [tuple(sorted(t.params.items())) for t in study.trials]
    assert set(keys) == set(itertools.product([("w:a", 2), ("w:a", 4)], [("w:b", 2), ("w:b", 4)]))
    assert len(keys) == 12  # four layouts exist; after them, random draws repeat them


def test_an_unknown_sampler_is_refused_naming_the_key_value_and_choices():
    s = OmegaConf.merge(OmegaConf.structured(SearchConfig), {"sampler": "locl"})
    with pytest.raises(ConfigError, match=r"search\.sampler='locl' is not allowed; choose one of "
                                          r"\['tpe', 'random', 'nsga2', 'local'\] \(did you mean 'local'\?\)"):
        validate_search(s)
    validate_search(OmegaConf.merge(s, {"sampler": "local"}))
