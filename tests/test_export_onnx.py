"""``export.format=onnx`` / ``eval.backend=onnxruntime``: the QDQ graph is qsweep's model, run by ONNX Runtime.

Tolerance. ONNX Runtime may move a value that lies within float roundoff of a rounding boundary of a
quantized input by one code: its optimizations quantize conv biases to int32, its fused integer kernels
requantize with their own rounding, its QuantizeLinear divides by the scale where qsweep multiplies by the
reciprocal, and its LayerNorm / softmax / GELU are its own. So ORT's logits may differ from fake-quant's by
what one code step on every input feature of the last quantized layer (the head) would cause,
``|dy_j| <= s_a * sum_k |W_jk|``, plus float roundoff (1e-5 of the largest logit): :func:`assert_within_one_step`.
With ORT's graph optimizations off each op runs as written, and on these models ORT then reproduces
fake-quant to float roundoff alone. A run checks predictions instead (qsweep.onnx_runtime.MAX_DISAGREEMENT).
"""

from __future__ import annotations

import json
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient
from torch import nn

onnx = pytest.importorskip("onnx", reason="export.format=onnx needs onnx: pip install -e '.[onnx]'")
pytest.importorskip("onnxruntime", reason="eval.backend=onnxruntime needs ONNX Runtime: pip install -e '.[onnx]'")

import qsweep  # noqa: E402
from onnx import numpy_helper  # noqa: E402
from qsweep.config import ConfigError, compose_shipped, validate  # noqa: E402
from qsweep.onnx_export import OnnxExportError, export_onnx  # noqa: E402
from qsweep.onnx_runtime import OrtModel, UntrustedOnnxError, check_onnx  # noqa: E402
from qsweep.quant.intkernel import to_int_backend  # noqa: E402
from qsweep.quant.modules import QuantConv2d, quant_layers  # noqa: E402

ROUNDOFF = 1e-5  # of the largest logit
TP = onnx.TensorProto


def ort_int8_kernels_saturate() -> bool:
    """ONNX Runtime's fused uint8 x int8 kernels on an x86 CPU without VNNI add pairs of products in int16
    (VPMADDUBSW), which saturates at 8-bit weights: its optimized graph then leaves the fake-quant model by more
    than one output step (documented by ORT; measured here on an AVX2-only AMD EPYC: 2x the step at W8, exact at
    W4). Its unoptimized graph is checked on every machine."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return " avx2" in flags and not any(f in flags for f in (" avx512_vnni", " avx_vnni", " amx_int8"))


def recipe(w_bits: int, **extra) -> dict:
    """Per-channel symmetric weights, per-tensor affine 8-bit inputs, nearest rounding; ``extra`` on top."""
    base = {"weight": {"bits": w_bits, "granularity": "per_channel"}, "act": {"bits": 8, "symmetric": False},
            "gptq": {"enabled": False}, "rotate": {"enabled": False}}
    for key, value in extra.items():
        base[key] = {**base.get(key, {}), **value} if isinstance(value, dict) else value
    return base


def conv_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.Conv2d(8, 16, 3, stride=2, padding=1, bias=False), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10)).eval()


def tiny_vit() -> nn.Module:
    import timm

    torch.manual_seed(0)
    return timm.create_model("vit_tiny_patch16_224", img_size=16, patch_size=4, embed_dim=32, depth=2,
                             num_heads=2, num_classes=10).eval()


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(OrderedDict(fc1=nn.Linear(32, 64), act=nn.GELU(), fc2=nn.Linear(64, 48),
                                     head=nn.Linear(48, 10))).eval()


def images(n: int, seed: int, size: int = 16) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def exported(qmodel: nn.Module, example: torch.Tensor, tmp_path, name: str = "model.onnx"):
    path = export_onnx(qmodel, example, tmp_path / name)
    return path, onnx.load(str(path))


def assert_within_one_step(y: torch.Tensor, fake: torch.Tensor, head) -> None:
    bound = head.act.scale * head.weight.abs().sum(1) + ROUNDOFF * fake.abs().max()
    assert ((y - fake).abs() <= bound).all(), f"max |ORT - fake| {(y - fake).abs().max():.3g}, bound {bound.min():.3g}"


def initializers(model) -> dict[str, object]:
    return {t.name: t for t in model.graph.initializer}


# The ViT recipe exercises smoothing's divisors, Hadamard rotation and attention's own quantizers at once.
VIT_EXTRA = {"smooth": {"enabled": True}, "rotate": {"enabled": True}, "vit": {"attn_matmul": True}}


@pytest.mark.parametrize("w_bits", [8, 4])
@pytest.mark.parametrize("build, extra", [(conv_net, {}), (tiny_vit, VIT_EXTRA)], ids=["convnet", "vit"])
def test_onnx_runtime_computes_the_fake_quant_model(tmp_path, build, extra, w_bits):
    model = build()
    qmodel = qsweep.quantize(model, recipe(w_bits, **extra), [images(16, 0), images(16, 1)])
    path, _ = exported(qmodel, images(2, 2), tmp_path)
    x = images(48, 3)
    with torch.no_grad():
        fake = qmodel(x)
    head = quant_layers(qmodel)["head" if build is tiny_vit else "7"]
    for optimize in (True, False) if w_bits < 8 or not ort_int8_kernels_saturate() else (False,):
        y = OrtModel(path, optimize=optimize)(x)
        assert_within_one_step(y, fake, head)
    if build is conv_net:  # ops as written: codes as qsweep's, float roundoff alone
        unoptimized = OrtModel(path, optimize=False)(x)
        torch.testing.assert_close(unoptimized, fake, rtol=0, atol=ROUNDOFF * float(fake.abs().max()))
    y = OrtModel(path)(images(3, 4))  # any batch size
    assert y.shape == (3, 10)


@pytest.mark.parametrize("w_bits, dtype", [(8, TP.INT8), (4, TP.INT4)], ids=["W8-INT8", "W4-INT4"])
def test_the_file_holds_qsweeps_codes_scales_and_zero_points(tmp_path, w_bits, dtype):
    qmodel = qsweep.quantize(conv_net(), recipe(w_bits), [images(16, 0)])
    _, model = exported(qmodel, images(2, 2), tmp_path)
    tensors = initializers(model)
    nodes = {n.name: n for n in model.graph.node}
    layers = quant_layers(qmodel)
    assert sum(n.op_type == "QuantizeLinear" for n in model.graph.node) == len(layers)
    for name, layer in layers.items():
        q = layer.qweight
        codes = tensors[f"{name}.weight_quantized"]
        assert codes.data_type == dtype
        expected = q.codes.reshape(q.shape).numpy()
        expected = expected if isinstance(layer, QuantConv2d) else expected.T  # a Linear's [in, out] for MatMul
        np.testing.assert_array_equal(numpy_helper.to_array(codes).astype(np.int16), expected)
        np.testing.assert_array_equal(numpy_helper.to_array(tensors[f"{name}.weight_scale"]), q.scale.reshape(-1))
        assert not numpy_helper.to_array(tensors[f"{name}.weight_zero_point"]).astype(int).any()  # symmetric
        (axis,) = [a.i for a in nodes[f"{name}.weight_dequantize"].attribute if a.name == "axis"]
        assert axis == (0 if isinstance(layer, QuantConv2d) else 1)
        zp = tensors[f"{name}.input_zero_point"]
        assert zp.data_type == TP.UINT8 and numpy_helper.to_array(zp) == int(layer.act.zero_point)
        assert numpy_helper.to_array(tensors[f"{name}.input_scale"]) == np.float32(layer.act.scale)
        quantize = nodes[f"{name}.input_quantize"]
        assert list(quantize.input[1:]) == [f"{name}.input_scale", f"{name}.input_zero_point"]


def test_weights_below_8_bits_are_int4_or_int8_codes_and_the_run_reports_the_packed_size(tmp_path):
    layers = {"fc1": {"w_bits": 3}, "fc2": {"w_bits": 6}}  # head: the recipe's 4 bits
    qmodel = qsweep.quantize(mlp(), recipe(4, layers=layers), [torch.randn(16, 32)])
    _, model = exported(qmodel, torch.randn(2, 32), tmp_path)
    tensors = initializers(model)
    for name, (dtype, bytes_per_code) in {"fc1": (TP.INT4, 0.5), "fc2": (TP.INT8, 1), "head": (TP.INT4, 0.5)}.items():
        codes = tensors[f"{name}.weight_quantized"]
        assert codes.data_type == dtype
        assert len(codes.raw_data) == int(np.prod(codes.dims) * bytes_per_code)
    x = torch.randn(40, 32)
    with torch.no_grad():
        fake = qmodel(x)
    assert_within_one_step(OrtModel(tmp_path / "model.onnx")(x), fake, qmodel.head)


@pytest.mark.parametrize("bits, symmetric, zp_type, clipped", [
    (8, True, TP.INT8, False), (4, False, TP.UINT4, False), (6, False, TP.UINT8, True), (16, True, TP.INT16, False),
    (12, False, TP.UINT16, True)])
def test_activation_grids_map_to_the_onnx_type_of_their_width(tmp_path, bits, symmetric, zp_type, clipped):
    torch.manual_seed(0)
    layer = nn.Sequential(OrderedDict(fc=nn.Linear(24, 12))).eval()
    rec = recipe(8, act={"bits": bits, "symmetric": symmetric})
    qmodel = qsweep.quantize(layer, rec, [torch.randn(32, 24)])
    _, model = exported(qmodel, torch.randn(2, 24), tmp_path)
    assert initializers(model)["fc.input_zero_point"].data_type == zp_type
    assert any(n.op_type == "Clip" for n in model.graph.node) == clipped  # narrower than its type: clipped first
    x = 1.5 * torch.randn(64, 24)  # beyond the calibrated range too: the grid's ends are hit
    with torch.no_grad():
        fake = qmodel(x)
    y = OrtModel(tmp_path / "model.onnx", optimize=False)(x)
    torch.testing.assert_close(y, fake, rtol=0, atol=ROUNDOFF * float(fake.abs().max()))


def test_per_group_weights_are_blocked_dequantization(tmp_path):
    qmodel = qsweep.quantize(mlp(), recipe(4, weight={"granularity": "per_group", "group_size": 16}),
                             [torch.randn(16, 32)])
    _, model = exported(qmodel, torch.randn(2, 32), tmp_path)
    (node,) = [n for n in model.graph.node if n.name == "fc2.weight_dequantize"]
    assert {a.name: a.i for a in node.attribute} == {"axis": 0, "block_size": 16}
    assert list(initializers(model)["fc2.weight_scale"].dims) == [64 // 16, 48]
    x = torch.randn(40, 32)
    with torch.no_grad():
        fake = qmodel(x)
    assert_within_one_step(OrtModel(tmp_path / "model.onnx")(x), fake, qmodel.head)


@pytest.mark.parametrize("build, extra, named, why", [
    (mlp, {"act": {"granularity": "per_token"}}, "'fc1'", "per-token"),
    (conv_net, {"layers": {"3": {"w_granularity": "per_group", "group_size": 8}}}, "'3'", "per-group"),
    (tiny_vit, {"vit": {"attn_matmul": True, "softmax_quantizer": "log2"}}, "softmax_quant'", "log2"),
])
def test_what_has_no_qdq_form_is_refused_naming_the_module(tmp_path, build, extra, named, why):
    shape = (2, 32) if build is mlp else (2, 3, 16, 16)
    qmodel = qsweep.quantize(build(), recipe(8, **extra), [torch.randn(8, *shape[1:])])
    with pytest.raises(OnnxExportError, match=why) as refused:
        export_onnx(qmodel, torch.randn(*shape), tmp_path / "model.onnx")
    assert named in str(refused.value) and "export.format=onnx" in str(refused.value)
    assert not list(tmp_path.iterdir())  # nothing written


def test_the_int_backend_model_is_refused(tmp_path):
    qmodel = qsweep.quantize(mlp(), recipe(8), [torch.randn(8, 32)])
    with pytest.raises(OnnxExportError, match="integer-backend module"):
        export_onnx(to_int_backend(qmodel)[0], torch.randn(2, 32), tmp_path / "model.onnx")


@pytest.mark.parametrize("overrides, message", [
    (["export.format=tflite"], r"export.format='tflite' is not allowed; choose one of \['torch', 'onnx'\]"),
    (["eval.backend=onnxrt"], r"eval.backend='onnxrt' is not allowed; choose one of \['auto', 'fake', 'int', "
                           r"'onnxruntime'\] \(did you mean 'onnxruntime'\?\)"),
    (["eval.backend=onnxruntime"], r"eval.backend='onnxruntime' evaluates the exported ONNX model: set "
                                   r"export.format=onnx"),
    (["export.format=onnx", "export.enabled=false", "eval.backend=onnxruntime"], r"export.enabled=False"),
    (["export.format=onnx", "eval.backend=int"], r"eval.backend='int' with export.format='onnx'"),
    (["export.format=onnx", "quant.intops=ivit"], r"quant.intops='ivit' is not allowed with export.format='onnx'"),
    (["export.format=onnx", "eval.backend=onnxruntime", "mode=search"], r"not allowed with mode=search"),
])
def test_bad_format_or_backend_values_are_clear_errors(overrides, message):
    with pytest.raises(ConfigError, match=message):
        validate(compose_shipped(overrides))


def test_export_format_onnx_with_auto_backend_validates():
    cfg = validate(compose_shipped(["export.format=onnx"]))
    assert cfg.export.format == "onnx" and cfg.eval.backend == "auto"


def test_a_file_whose_tensors_live_elsewhere_is_refused(tmp_path):
    helper = onnx.helper
    weight = numpy_helper.from_array(np.ones((2, 2), np.float32), "w")
    onnx.external_data_helper.set_external_data(weight, location="../../etc/passwd")
    weight.ClearField("raw_data")
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TP.FLOAT, [1, 2])],
                              [helper.make_tensor_value_info("y", TP.FLOAT, [1, 2])], [weight])
    with pytest.raises(UntrustedOnnxError, match="keeps tensors in other files"):
        check_onnx(helper.make_model(graph).SerializeToString(), "crafted.onnx")


@pytest.mark.slow
@pytest.mark.usefixtures("mlflow_store")  # tmp_path/mlflow.db starts migrated (see conftest.py)
def test_the_cli_exports_onnx_and_reports_onnx_runtimes_top1(tmp_path, monkeypatch, capsys, digits_vit):
    from test_hostile_inputs import cli

    store = f"sqlite:///{tmp_path}/mlflow.db"
    outcome = cli(tmp_path, monkeypatch, capsys, "export.format=onnx", "eval.backend=onnxruntime",
                  common=("progress=false", f"tracking.uri={store}"))
    assert outcome.code == 0, outcome.err[-3000:]
    result = json.loads((outcome.run_dir / "result.json").read_text())
    assert result["artifact"] == str(outcome.run_dir / "quantized.onnx")
    assert not (outcome.run_dir / "quantized.pt2").exists()
    assert result["artifact_top1"] == result["top1"]  # the reported top-1 is ORT's on the written file
    assert result["onnx_agreement"] >= 99.5 and abs(result["top1"] - result["int_top1"]) <= 0.5
    # the size is the bit-packed artifact's; the ONNX file carries the graph and INT4 / float tensors besides
    assert 0 < result["size_mb"] < result["onnx_size_mb"] == (outcome.run_dir / "quantized.onnx").stat().st_size / 1e6
    assert "onnxruntime       same top-1 as int on" in outcome.out
    model = MlflowClient(store).get_logged_model(result["mlflow_model_id"])  # the Models column: the ONNX file
    assert model.model_type == "onnx" and model.status == "READY"
    assert [a.path for a in MlflowClient(store).list_logged_model_artifacts(model.model_id)] == ["quantized.onnx"]
