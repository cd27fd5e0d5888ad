"""The exact multiple-choice knapsack against brute force."""

import itertools
import random

from qsweep.quant.knapsack import knapsack


def brute_force(options, budget):
    layers = list(options)
    best = None
    for combo in itertools.product(*(sorted(options[layer]) for layer in layers)):
        size = sum(options[layer][b][0] for layer, b in zip(layers, combo))
        cost = sum(options[layer][b][1] for layer, b in zip(layers, combo))
        if size <= budget and (best is None or cost < best):
            best = cost
    return best


def test_knapsack_finds_the_least_cost_within_the_exact_budget():
    rng = random.Random(0)
    for _ in range(150):
        options = {f"layer{i}": {b: (rng.randint(40, 3000) * b, rng.random() * 4.0 ** (8 - b)) for b in (2, 4, 8)}
                   for i in range(4)}
        budget = rng.randint(300, 40000)
        for unit in (1, 64):  # coarse units round the bytes; the answer must still fit the exact budget
            pick = knapsack(options, budget, unit=unit)
            best = brute_force(options, budget)
            if best is None:
                assert pick is None
                continue
            assert sum(options[k][b][0] for k, b in pick.items()) <= budget
            cost = sum(options[k][b][1] for k, b in pick.items())
            if unit == 1:
                assert abs(cost - best) < 1e-9


def test_knapsack_budget_of_a_uniform_layout_fits_it_exactly():
    options = {f"layer{i}": {4: (1000 + 37 * i, 1.0), 8: (2000 + 74 * i, 0.0)} for i in range(6)}
    exact = sum(o[4][0] for o in options.values())
    assert knapsack(options, exact) == {name: 4 for name in options}
    assert knapsack(options, exact - 1) is None
