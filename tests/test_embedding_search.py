"""Embedding tables as searched layers: a table's width set by ``quant.layers``, planned by ``quant.mixed`` and
searched by a study's layouts exactly as a fresh quantization of that layout computes it."""

from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

import qsweep
from qsweep.config import ConfigError, RootConfig, quant_recipe
from qsweep.export import artifact_bytes
from qsweep.quant.embedding import QuantEmbedding, quant_embeddings
from qsweep.quant.mixed import WidthPlanner, with_widths
from qsweep.search.space import FLOAT, SearchSpace
from qsweep.search.study import layer_names_of
from qsweep.search.trials import LayoutModels
from test_embedding_quant import TinyText, token_ids


def recipe(bits: int | None = 8, layers: dict | None = None, **extra) -> dict:
    return {"weight": {"bits": 8, "granularity": "per_channel"}, "act": {"bits": 8},
            "embeddings": {"bits": bits}, "layers": layers or {}, **extra}


def test_quant_layers_sets_a_tables_width_or_keeps_it_float():
    q = qsweep.quantize(TinyText(), recipe(8, {"tokens": {"w_bits": 4}, "positions": {"w_bits": None}}),
                        [token_ids(16, 0)])
    assert quant_embeddings(q)["tokens"].w_bits == 4
    assert type(q.positions) is nn.Embedding
    assert q.head.w_bits == 8  # the rule names a table only
    codes = quant_embeddings(q)["tokens"].qweight.codes
    assert int(codes.min()) >= -8 and int(codes.max()) <= 7


def test_a_rule_naming_a_table_is_an_error_while_tables_stay_float():
    with pytest.raises(ConfigError, match="quant.layers pattern 'tokens' matches no Linear/Conv2d"):
        qsweep.quantize(TinyText(), recipe(None, {"tokens": {"w_bits": 4}}), [token_ids(16, 0)])


def test_the_search_space_holds_the_quantized_tables_without_activation_widths():
    cfg = OmegaConf.merge(OmegaConf.structured(RootConfig), {"quant": recipe(8)})
    model = TinyText()
    names = layer_names_of(model, cfg)
    assert names == ["tokens", "positions", "head"]
    assert layer_names_of(model, OmegaConf.merge(cfg, {"quant": {"embeddings": {"bits": None}}})) == ["head"]
    space = SearchSpace.build(names, OmegaConf.merge(cfg.search, {"w_bits": [4, 8], "a_bits": [6, 8],
                                                                  "allow_float": True}), model=model)
    assert space.tables == {"tokens", "positions"}
    layout = space.with_widths({"tokens": 4, "positions": FLOAT, "head": 8})
    assert layout == {"tokens": {"w": 4}, "positions": {"w": FLOAT}, "head": {"w": 8, "a": 8}}
    assert space.overrides(layout) == {"tokens": {"w_bits": 4}, "positions": {"w_bits": None},
                                       "head": {"w_bits": 8, "a_bits": 8}}


def test_a_layout_with_tables_is_the_model_and_artifact_of_a_fresh_quantization():
    model, calib = TinyText(), [token_ids(16, 0)]
    base = quant_recipe(recipe(8))
    cfg = OmegaConf.merge(OmegaConf.structured(RootConfig), {"quant": recipe(8)})
    space = SearchSpace.build(layer_names_of(model, cfg), OmegaConf.merge(cfg.search, {"w_bits": [3, 4, 8],
                                                                                     "allow_float": True}), model=model)
    models = LayoutModels(model, base, calib, space)
    for widths in ({"tokens": 3, "positions": 8, "head": 4}, {"tokens": FLOAT, "positions": 4, "head": 8},
                   {"tokens": 8, "positions": 3, "head": FLOAT}, {"tokens": 8, "positions": 8, "head": 8}):
        layout = space.with_widths(widths)
        ours = models.apply(layout)
        fresh = qsweep.quantize(model, {**OmegaConf.to_container(base), "layers": space.overrides(layout)}, calib)
        for name in ("tokens", "positions"):
            assert type(ours.get_submodule(name)) is type(fresh.get_submodule(name))
            assert torch.equal(ours.get_submodule(name).weight, fresh.get_submodule(name).weight)
        assert models.size_bytes() == artifact_bytes(fresh, "fake")
    x = token_ids(32, 1)
    assert torch.equal(ours(x), fresh(x))  # the widest layout is calibrated as a fresh run is (activations once)
    assert models.choice_bytes("tokens", 3) < models.choice_bytes("tokens", 8) < models.choice_bytes("tokens", FLOAT)


def test_quant_mixed_prices_tables_by_their_fisher_cost_and_its_layout_reproduces():
    model, calib = TinyText(), [token_ids(16, s) for s in range(2)]
    mixed = {"enabled": True, "widths": [2, 4, 8, None], "layers": ["*"], "fisher": "categorical", "num_samples": 16}
    planner = WidthPlanner(model, recipe(8, mixed=mixed), calib)
    assert set(planner.layers) == {"tokens", "positions", "head"}
    for name in ("tokens", "positions"):
        costs = [planner.options[name][b][1] for b in (2, 4, 8)]
        assert costs[0] > costs[1] > costs[2] > 0 and planner.options[name][FLOAT][1] == 0
    budget = planner.exact(dict.fromkeys(planner.layers, 4))
    pick = planner.choose(budget)
    assert pick["bytes"] <= budget
    chosen = qsweep.quantize(model, with_widths(quant_recipe(recipe(8, mixed=mixed)), pick["widths"]), calib)
    assert artifact_bytes(chosen, pick["kernels"]) == pick["bytes"]
    for name, bits in pick["widths"].items():
        module = chosen.get_submodule(name)
        assert (getattr(module, "w_bits", None) == bits) if bits else not isinstance(module, QuantEmbedding)
