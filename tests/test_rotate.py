"""quant.rotate: online Hadamard input rotation; orthogonal, exact in float, exported and run on int
kernels as is, seen by GPTQ and AdaRound, config errors."""

import copy

import pytest
import torch
from scipy.linalg import hadamard as scipy_hadamard

import qsweep
from qsweep.config import ConfigError, quant_recipe
from qsweep.export import artifact_form, export_program, load_program
from qsweep.quant.calibrate import QuantizeTimings
from qsweep.quant.modules import quant_layers
from qsweep.quant.plan import resolve_plan
from qsweep.quant.rotate import hadamard, hadamard_matrix, rotate_linears, rotation_block
from qsweep.quant.rotate_residual import rotate_residual
from outlier_mlp import OutlierMLP, assert_exported_and_int_match, make_batches, output_error

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def model():
    torch.manual_seed(0)
    return OutlierMLP().eval()


W4A8 = {"weight": {"bits": 4, "granularity": "per_channel"}, "act": {"bits": 8}}
ROTATE = {"enabled": True, "block_size": 32}


@pytest.mark.parametrize("block", [2, 8, 64])
def test_the_rotation_is_an_orthogonal_block_hadamard(block):
    r = hadamard_matrix(block, torch.float64)
    torch.testing.assert_close(r @ r.T, torch.eye(block, dtype=torch.float64))
    torch.testing.assert_close(r, torch.tensor(scipy_hadamard(block), dtype=torch.float64) / block ** 0.5)
    x = torch.randn(2, 5, 3 * block, dtype=torch.float64)
    torch.testing.assert_close(hadamard(x, block), x @ torch.block_diag(r, r, r))


def test_block_is_the_largest_power_of_two_dividing_in_features():
    assert rotation_block(384, 128) == 128
    assert rotation_block(384, 512) == 128
    assert rotation_block(1536, 512) == 512
    assert rotation_block(96, 64) == 32
    assert rotation_block(33, 64) is None


def test_the_rewrite_is_exact_in_float(model):
    rotated = copy.deepcopy(model)
    blocks = rotate_linears(rotated, resolve_plan(rotated, quant_recipe(W4A8)), 32)
    assert blocks == {"fc1": 32, "fc2": 32}
    x = make_batches()[0]
    with torch.no_grad():
        h = rotated.norm(x)
        torch.testing.assert_close(rotated.fc1(hadamard(h, 32)), model.fc1(model.norm(x)), rtol=1e-5, atol=1e-5)


def test_rotation_spreads_activation_outliers_and_lowers_the_output_error(model):
    batches = make_batches()
    recipe = {"weight": {"bits": 8}, "act": {"bits": 6}}
    plain = qsweep.quantize(model, recipe, batches)
    rotated = qsweep.quantize(model, {**recipe, "rotate": ROTATE}, batches)
    assert {n: m.input_rotation for n, m in quant_layers(rotated).items()} == {"fc1": 32, "fc2": 32}
    assert output_error(rotated, model, batches) < 0.5 * output_error(plain, model, batches)


def test_export_and_int_kernels_reproduce_the_fake_quant_model(model, tmp_path):
    batches = make_batches()
    q = qsweep.quantize(model, {"weight": {"bits": 8}, "act": {"bits": 8}, "smooth": {"enabled": True},
                                "rotate": ROTATE}, batches)
    x = batches[1]
    int_model = assert_exported_and_int_match(q, x, tmp_path / "m.pt2")
    with torch.no_grad():
        int_loaded = load_program(export_program(q, x, tmp_path / "int.pt2", kernels="int"))
        assert torch.equal(int_loaded(x), int_model(x))


def test_the_artifact_stores_no_rotation(model):
    batches = make_batches()
    plain = artifact_form(qsweep.quantize(model, W4A8, batches)).state_dict()
    rotated = artifact_form(qsweep.quantize(model, {**W4A8, "rotate": ROTATE}, batches)).state_dict()
    assert plain.keys() == rotated.keys()
    assert all(plain[k].shape == rotated[k].shape for k in plain)


@pytest.mark.parametrize("kernels", ["fake", "int"])
def test_the_exported_program_holds_no_rotation_matrix(model, tmp_path, kernels):
    batches = make_batches()

    def stored(recipe, name):
        q = qsweep.quantize(model, recipe, batches)
        with torch.no_grad():
            q(batches[0])  # eager runs cache the matrix; the traced program must build its own
            program = torch.export.load(export_program(q, batches[1], tmp_path / name, kernels=kernels))
        tensors = {**program.state_dict, **program.constants}
        return sorted((k, tuple(t.shape)) for k, t in tensors.items() if isinstance(t, torch.Tensor))

    assert stored({**W4A8, "rotate": ROTATE}, "rotated.pt2") == stored(W4A8, "plain.pt2")


def test_gptq_and_adaround_round_the_rotated_weight(model):
    batches = make_batches()
    recipe = {**W4A8, "rotate": ROTATE}
    nearest = qsweep.quantize(model, recipe, batches)
    timings = QuantizeTimings()
    # GPTQ checks its float weight against the codes: an unrotated reference would raise.
    rounded = qsweep.quantize(model, {**recipe, "gptq": {"enabled": True}}, batches, timings=timings)
    assert set(timings.reconstruct["gptq"]["layers"]) == {"fc1", "fc2"}
    assert output_error(rounded, model, batches) < output_error(nearest, model, batches)
    ada = qsweep.quantize(model, recipe, batches, adaround={"mode": "layer", "iters": 20, "num_samples": 4})
    assert output_error(ada, model, batches) < 1.5 * output_error(nearest, model, batches)


@pytest.mark.parametrize("bad", [0, 1, 48, 100])
def test_a_bad_block_size_names_the_key_value_and_choices(bad):
    with pytest.raises(ConfigError, match=rf"quant\.rotate\.block_size={bad} is not allowed; use a power of two"):
        quant_recipe({"rotate": {"enabled": True, "block_size": bad}})


# quant.rotate.residual: a timm ViT's residual stream rotated offline.

def tiny_vit(**kwargs):
    import timm

    torch.manual_seed(0)
    vit = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=2,
                            num_classes=10, **kwargs).eval()
    with torch.no_grad():  # LayerNorm affines and LayerScales far from identity: the folds must carry them
        for p in vit.parameters():
            if p.dim() == 1:
                p.add_(0.3 * torch.randn_like(p))
    return vit


RESIDUAL = {"rotate": {"enabled": True, "residual": True}}
VITS = {"token": {}, "avg pool, fc_norm": {"global_pool": "avg", "fc_norm": True}, "layer scale": {"init_values": 0.1},
        "registers": {"reg_tokens": 2}}


@pytest.mark.parametrize("kwargs", VITS.values(), ids=VITS.keys())
def test_the_residual_rotation_is_exact_in_float(kwargs):
    vit = tiny_vit(**kwargs).double()
    rotated = copy.deepcopy(vit)
    offline, reason = rotate_residual(rotated, quant_recipe(RESIDUAL), 32)
    assert reason is None
    readers = {f"blocks.{i}.{n}" for i in range(2) for n in ("attn.qkv", "attn.proj", "mlp.fc1")}
    assert set(offline) == readers | {"head"}
    assert not any(isinstance(m, torch.nn.LayerNorm) for m in rotated.modules())
    x = torch.randn(3, 3, 32, 32, dtype=torch.double)
    with torch.no_grad():
        torch.testing.assert_close(rotated(x), vit(x), rtol=0, atol=1e-12)
        # the stream itself is rotated: the block's output is not the float model's
        assert not torch.allclose(rotated.blocks[0](rotated.patch_embed(x)), vit.blocks[0](vit.patch_embed(x)))


def test_only_fc2_is_rotated_online_and_int_kernels_and_the_artifact_reproduce_it(tmp_path):
    from qsweep.quant.intkernel import to_int_backend

    vit = tiny_vit()
    batches = [torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(i)) for i in range(3)]
    timings = QuantizeTimings()
    q = qsweep.quantize(vit, {**W4A8, **RESIDUAL}, batches, timings=timings)
    online = {n: m.input_rotation for n, m in quant_layers(q).items() if m.input_rotation}
    assert online == {"blocks.0.mlp.fc2": 64, "blocks.1.mlp.fc2": 64}
    assert timings.rotation["residual"] is None and "head" in timings.rotation["offline"]
    x = batches[1]
    with torch.no_grad():
        expected = q(x)
        assert torch.equal(load_program(export_program(q, x, tmp_path / "q.pt2"))(x), expected)
        int_model, fallbacks = to_int_backend(q)
        assert not fallbacks
        torch.testing.assert_close(int_model(x), expected, rtol=1e-4, atol=1e-4 * float(expected.abs().max()))
    # rotating offline stores nothing more: the LayerNorms' affines went into the weights
    plain = artifact_form(qsweep.quantize(vit, W4A8, batches)).state_dict()
    folded = artifact_form(q).state_dict()
    assert set(folded) == {k for k in plain if ".norm" not in k and not k.startswith("norm.")}
    assert all(plain[k].shape == folded[k].shape for k in folded)


def test_the_rotation_stays_online_where_it_cannot_be_folded(model):
    batches = make_batches()
    timings = QuantizeTimings()
    q = qsweep.quantize(model, {**W4A8, **RESIDUAL}, batches, timings=timings)
    assert timings.rotation["residual"] == "OutlierMLP is not a timm VisionTransformer"
    assert {n: m.input_rotation for n, m in quant_layers(q).items()} == {"fc1": 32, "fc2": 64}  # as online
    vit = tiny_vit()
    _, reason = rotate_residual(copy.deepcopy(vit), quant_recipe({**RESIDUAL, "vit": {"post_ln": "reparam"}}), 32)
    assert "post_ln" in reason


def test_online_false_keeps_only_the_folded_rotations_where_the_stream_was_folded(model):
    vit = tiny_vit()
    batches = [torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(i)) for i in range(2)]
    folded_only = {**W4A8, "rotate": {"enabled": True, "residual": True, "online": False}}
    q = qsweep.quantize(vit, folded_only, batches)
    assert not any(m.input_rotation for m in quant_layers(q).values())
    q = qsweep.quantize(model, folded_only, make_batches())  # nothing folded: every rotation stays online
    assert {n: m.input_rotation for n, m in quant_layers(q).items()} == {"fc1": 32, "fc2": 64}


def test_adaround_learns_against_the_float_model_rotated_like_its_layers():
    vit = tiny_vit()
    batches = [torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(i)) for i in range(4)]
    x = torch.randn(16, 3, 32, 32, generator=torch.Generator().manual_seed(99))
    recipe = {**W4A8, **RESIDUAL}
    nearest = qsweep.quantize(vit, recipe, batches)
    # against the unrotated float model the rotated writers' targets are wrong: AdaRound ends worse than nearest
    learned = qsweep.quantize(vit, recipe, batches, adaround={"mode": "layer", "iters": 50, "num_samples": 16})
    with torch.no_grad():
        ref = vit(x)
        assert ((learned(x) - ref) ** 2).mean() < ((nearest(x) - ref) ** 2).mean()
