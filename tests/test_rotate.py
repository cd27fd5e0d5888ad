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
