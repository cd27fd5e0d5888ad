"""quant.vit.post_ln pairs found by structure: exact folds kept, folds into a post-norm residual undone."""

import copy

import pytest
import torch
import torchvision
from torch import nn

import qsweep
from qsweep.config import quant_recipe
from qsweep.quant.modules import QuantLinear
from qsweep.quant.vit import apply_vit, model_output, pre_norm_pairs, relative_error
from test_vit import runner


def tiny_torchvision_vit():
    torch.manual_seed(0)
    model = torchvision.models.VisionTransformer(image_size=16, patch_size=4, num_layers=2, num_heads=2,
                                                 hidden_dim=16, mlp_dim=32, num_classes=10).eval()
    nn.init.normal_(model.heads.head.weight)  # torchvision zero-inits the head: the output would not move
    return model


@pytest.mark.parametrize("mode", ["reparam", "smooth"])
def test_torchvision_vit_mlp_norms_fold_exactly(mode):
    model = tiny_torchvision_vit()
    batches = [torch.randn(8, 3, 16, 16, generator=torch.Generator().manual_seed(i)) for i in range(2)]
    run = runner(model, batches)
    pairs = pre_norm_pairs(model, run)
    # ln_1 feeds nn.MultiheadAttention (its in_proj is no Linear module): only ln_2 -> mlp.0 pairs.
    assert [(n, r) for n, _, r in pairs] == [
        (f"encoder.layers.encoder_layer_{i}.ln_2", [model.encoder.layers[i].mlp[0]]) for i in range(2)]
    ref = model_output(model, run)
    assert apply_vit(model, quant_recipe({"vit": {"post_ln": mode}}), run) == {}
    assert relative_error(model_output(model, run), ref) < 1e-5


def tiny_bert():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=64, max_position_embeddings=16)
    return transformers.BertModel(config).eval()


def test_bert_post_norms_are_skipped_and_left_untouched():
    model = tiny_bert()
    before = copy.deepcopy(model.state_dict())
    batches = [{"input_ids": torch.randint(0, 50, (4, 12), generator=torch.Generator().manual_seed(i))}
               for i in range(2)]
    run = runner(model, batches)
    found = [n for n, _, _ in pre_norm_pairs(model, run)]
    assert found == ["embeddings.LayerNorm", "encoder.layer.0.attention.output.LayerNorm",
                     "encoder.layer.0.output.LayerNorm", "encoder.layer.1.attention.output.LayerNorm"]
    skipped = apply_vit(model, quant_recipe({"vit": {"post_ln": "reparam"}}), run)
    assert list(skipped) == found
    assert all("changes the model output" in why and "residual" in why for why in skipped.values())
    assert skipped["encoder.layer.0.attention.output.LayerNorm"].startswith(
        "folding into ['encoder.layer.0.intermediate.dense']")
    after = model.state_dict()  # every fold undone exactly; no bias left behind
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)


def test_bert_quantizes_with_post_ln_on():
    model = tiny_bert()
    batches = [{"input_ids": torch.randint(0, 50, (4, 12), generator=torch.Generator().manual_seed(i))}
               for i in range(2)]
    recipe = {"weight": {"bits": 8, "granularity": "per_channel"}, "act": {"bits": 8}, "vit": {"post_ln": "smooth"}}
    qmodel = qsweep.quantize(model, recipe, batches)
    assert any(isinstance(m, QuantLinear) for m in qmodel.modules())
    ref = model_output(model, runner(model, batches))
    assert relative_error(model_output(qmodel, runner(qmodel, batches)), ref) < 0.1


class NonAffine(nn.Module):
    def __init__(self):
        super().__init__()
        self.norm = nn.LayerNorm(8, elementwise_affine=False)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        return self.fc(self.norm(x))


def test_non_affine_norm_is_skipped_with_reason():
    model = NonAffine().eval()
    skipped = apply_vit(model, quant_recipe({"vit": {"post_ln": "reparam"}}), runner(model, [torch.randn(5, 8)]))
    assert skipped == {"norm": "elementwise_affine=False: no LayerNorm affine to fold into"}
