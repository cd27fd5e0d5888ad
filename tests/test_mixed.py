"""quant.mixed: per-layer widths under an exact artifact-size budget, from the Fisher information."""

from __future__ import annotations

import pytest
import timm
import torch
from torch import nn

import qsweep
from qsweep.config import ConfigError, quant_recipe
from qsweep.export import artifact_bytes
from qsweep.quant.calibrate import QuantizeTimings, prepare
from qsweep.quant.mixed import choose_widths, fisher_diagonals, single_samples
from qsweep.quant.modules import quant_layers


@pytest.fixture(scope="module")
def cnn():
    """A small EfficientNet (depthwise convs, BatchNorm, TF-style blocks) with seeded weights and inputs."""
    torch.manual_seed(0)
    model = timm.create_model("test_efficientnet", pretrained=False, num_classes=10).eval()
    return model, list(torch.randn(16, 3, 48, 48).split(4))


def recipe(**mixed):
    return {"weight": {"bits": 4, "observer": "mse"}, "bias_correction": {"enabled": False},
            "mixed": {"enabled": True, "num_samples": 8, **mixed}}


@pytest.mark.parametrize("kernels", ["int", "fake"])
def test_the_chosen_layout_fits_the_budget_in_the_exact_bytes_of_the_artifact(cnn, kernels):
    model, batches = cnn
    timings = QuantizeTimings()
    q = qsweep.quantize(model, recipe(budget_fraction=0.6, kernels=kernels), batches, timings=timings)
    chosen = timings.mixed
    assert chosen["bytes"] == artifact_bytes(q, kernels) <= chosen["budget_bytes"]
    assert chosen["budget_bytes"] == int(0.6 * chosen["uniform_bytes"][8])
    # the quantized model has the widths chosen, and uses more than one of them
    assert {n: m.w_bits for n, m in quant_layers(q).items()} == chosen["widths"]
    assert len(set(chosen["widths"].values())) > 1


def test_a_larger_budget_never_chooses_fewer_bits_in_all(cnn):
    model, batches = cnn
    bits = []
    for fraction in (0.57, 0.65, 0.8, 1.0):
        widths = choose_widths(model, quant_recipe(recipe(budget_fraction=fraction)), batches)["widths"]
        bits.append(sum(widths.values()))
    assert bits == sorted(bits)
    assert set(widths.values()) == {8}  # the whole widest layout fits, and it rounds least


def test_layers_outside_quant_mixed_layers_keep_the_recipe_width(cnn):
    model, batches = cnn
    widths = choose_widths(model, quant_recipe(recipe(layers=["@depthwise"], budget_fraction=1.0)), batches)["widths"]
    prepared = timm.create_model("test_efficientnet", pretrained=False, num_classes=10)
    prepared.load_state_dict(model.state_dict())
    prepare(prepared, quant_recipe(recipe()), batches)
    depthwise = {n for n, m in quant_layers(prepared).items() if getattr(m, "groups", 1) > 1 and m.weight.shape[1] == 1}
    assert set(widths) == depthwise and depthwise


def test_an_absolute_budget_in_mb(cnn):
    model, batches = cnn
    report = choose_widths(model, quant_recipe(recipe(budget_mb=0.085)), batches)
    assert report["budget_bytes"] == 85_000 and report["bytes"] <= 85_000


def test_float_is_a_choice_for_the_layers_that_need_it_most(cnn):
    model, batches = cnn
    timings = QuantizeTimings()
    q = qsweep.quantize(model, recipe(widths=[8, None], budget_fraction=1.1), batches, timings=timings)
    chosen = timings.mixed
    floats = {n for n, b in chosen["widths"].items() if b is None}
    assert floats and len(floats) < len(chosen["widths"])
    assert chosen["bytes"] == artifact_bytes(q, "int") <= chosen["budget_bytes"] == int(1.1 * chosen["uniform_bytes"][8])
    layers = quant_layers(q)
    assert all(n not in layers for n in floats)  # kept in float, weight and input, as quant.skip keeps a layer
    assert all(layers[n].w_bits == 8 for n in set(layers) - floats)
    everything = choose_widths(model, quant_recipe(recipe(widths=[8, None], budget_fraction=4.0)), batches)
    assert set(everything["widths"].values()) == {None}  # room for every float weight: nothing is rounded


def linear_fisher(samples: int, draws: int, fisher: str = "categorical"):
    """A bias-free ``Linear(5, 3)`` prepared at 8 bits on ``samples`` seeded inputs: the inputs, its float
    weight, its quantized layers and the Fisher diagonal of ``fisher``'s output model."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 3, bias=False))
    x = torch.randn(samples, 5)
    floats: dict[str, torch.Tensor] = {}
    prepare(model, quant_recipe({"weight": {"bits": 8}, "act": {"bits": None}}), [x], float_weights=floats)
    layers = quant_layers(model)
    diagonal = fisher_diagonals(model, layers, {n: w.detach() for n, w in floats.items()},
                                single_samples([x], samples), draws=draws, seed=0, fisher=fisher)["0"]
    return x, floats["0"].detach(), layers, diagonal


def test_fisher_diagonal_of_a_softmax_classifier_matches_its_closed_form():
    """For logits ``W x``, ``E_y[(d log p(y|x) / dW_ij)^2] = p_i (1 - p_i) x_j^2`` (y drawn from p)."""
    x, weight, layers, fisher = linear_fisher(2, draws=6000)
    p = torch.softmax(x @ weight.T, dim=1)
    expected = ((p * (1 - p)).T @ x.pow(2)) / 2
    assert torch.allclose(fisher, expected, rtol=0.1, atol=1e-3)
    # the layer computes with its quantized weight and input quantizer again afterwards
    assert layers["0"].weight.requires_grad is False


def test_gaussian_fisher_diagonal_of_a_linear_model_matches_its_closed_form():
    """For outputs ``W x`` as the mean of a unit Gaussian, ``E_eps[(d log N(y; Wx, I) / dW_ij)^2] = x_j^2``."""
    x, _, _, fisher = linear_fisher(4, draws=3000, fisher="gaussian")
    assert torch.allclose(fisher, x.pow(2).mean(0).expand(3, 5), rtol=0.1, atol=1e-3)


def tiny_bert():
    """A random two-layer ``BertModel`` (its output a ModelOutput with ``last_hidden_state``) and token batches."""
    import transformers

    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=64, max_position_embeddings=16)
    model = transformers.BertModel(config, add_pooling_layer=False).eval()
    ids = torch.randint(1, 64, (16, 12))
    mask = torch.ones_like(ids)
    mask[::2, 8:] = 0  # padded sentences, as a tokenizer's batches have
    return model, [{"input_ids": i, "attention_mask": m} for i, m in zip(ids.split(4), mask.split(4))]


def test_gaussian_fisher_chooses_widths_for_a_model_without_class_logits():
    model, batches = tiny_bert()
    timings = QuantizeTimings()
    # 0.9: its float embedding tables are most of the artifact, so all-3-bit is 0.83 of all-8-bit
    q = qsweep.quantize(model, recipe(fisher="gaussian", budget_fraction=0.9, kernels="fake"), batches,
                        timings=timings)
    chosen = timings.mixed
    assert chosen["bytes"] == artifact_bytes(q, "fake") <= chosen["budget_bytes"]
    assert {n: m.w_bits for n, m in quant_layers(q).items()} == chosen["widths"]
    assert len(set(chosen["widths"].values())) > 1


def test_categorical_fisher_reads_the_logits_of_a_model_output():
    from hf_tiny import tiny_vit

    model = tiny_vit()  # returns an ImageClassifierOutput
    batches = list(torch.randn(8, 1, 16, 16).split(4))
    report = choose_widths(model, quant_recipe(recipe(budget_fraction=0.9, kernels="fake")), batches)
    assert report["bytes"] <= report["budget_bytes"] and len(set(report["widths"].values())) > 1


def test_categorical_fisher_on_a_model_without_logits_says_to_use_gaussian():
    model, batches = tiny_bert()
    with pytest.raises(ConfigError, match="quant.mixed.fisher=gaussian"):
        choose_widths(model, quant_recipe(recipe()), batches)


def test_single_samples_splits_tuples_and_dicts():
    batches = [(torch.arange(6).reshape(3, 2), torch.tensor([0, 1, 2])), (torch.zeros(2, 2), torch.ones(2))]
    out = single_samples(batches, 4)
    assert len(out) == 4 and all(s[0].shape == (1, 2) for s in out) and out[3][1].item() == 1.0
    dicts = single_samples([{"input_ids": torch.ones(2, 3)}], 5)
    assert len(dicts) == 2 and dicts[0]["input_ids"].shape == (1, 3)


@pytest.mark.parametrize("mixed, message", [
    ({"budget_fraction": 0.01}, "quant.mixed: the budget"),
    ({"widths": [3, 9]}, "quant.mixed.widths"),
    ({"widths": []}, "quant.mixed.widths"),
    ({"budget_fraction": 5.0}, "quant.mixed.budget_fraction"),
    ({"widths": [None]}, "quant.mixed.widths"),
    ({"layers": ["blocks.99.*"]}, "quant.mixed.layers"),
    ({"layers": ["@pointwise"]}, "quant.mixed.layers"),
    ({"kernels": "onnx"}, "quant.mixed.kernels"),
    ({"fisher": "poisson"}, r"quant.mixed.fisher='poisson' is not allowed; choose one of \['categorical', 'gau"),
])
def test_bad_mixed_settings_are_refused_naming_the_key(cnn, mixed, message):
    model, batches = cnn
    with pytest.raises(ConfigError, match=message):
        qsweep.quantize(model, recipe(**mixed), batches)
