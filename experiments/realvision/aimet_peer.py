"""AIMET (Qualcomm's AI Model Efficiency Toolkit, ``aimet-torch`` 2.42) as a peer on EfficientNet-Lite0.

The recipe is the AIMET model zoo's for Lite0 (model cards ``efficientnetlite0_w8a8`` / ``_w4a8``): BatchNorm
folded into the convs (``fold_all_batch_norms``), then ``QuantizationSimModel`` with AIMET's default config
(symmetric per-output-channel weights; 8-bit asymmetric per-tensor quantizers on the model input and on op
outputs) and ``tf_enhanced`` (SQNR-searched) ranges; for 4-bit weights AdaRound first (``Adaround.apply_adaround``,
layer by layer, each layer's rounding fitted to the float layer's output on the calibration images), its weight
encodings then frozen in the sim. As the zoo's Lite0 script does by hand, a conv followed by ReLU6 has no
quantizer between the two: AIMET's default config fuses Conv + ReLU6 but misses the 16 depthwise convs.

timm's Lite0 needs rewriting before AIMET takes it (:func:`traceable`): AIMET has no quantized counterpart of
timm's ``Conv2dSame`` (TF "same" padding computed in its forward) or ``BatchNormAct2d`` (BatchNorm with its
activation inside), folds none of the 49 ``BatchNormAct2d``, and ``prepare_model`` cannot trace the dynamic
padding. Each ``Conv2dSame`` becomes a ``ZeroPad2d`` with its padding for a 224x224 input and a plain ``Conv2d``,
each ``BatchNormAct2d`` a ``BatchNorm2d`` followed by its activation; ``prepare_model`` then turns the residual
adds into modules, so their outputs are quantized too. :func:`float_graph` checks that the rewritten, folded
float graph, and every sim with its quantizers removed, give FP32's logits.
"""

from __future__ import annotations

import collections
import copy
import logging
import tempfile
from pathlib import Path

import torch
from torch import nn

AIMET_INSTALL = "pip install -e '.[aimet]'"
FP32_TOL = 1e-3  # max |logit difference| to FP32 allowed for the float graph AIMET quantizes


def available() -> str | None:
    """None when aimet_torch imports, else why not."""
    try:
        import aimet_torch  # noqa: F401
    except Exception as exc:  # ImportError, or a version clash raised at import
        return f"aimet not available ({type(exc).__name__}: {exc}): {AIMET_INSTALL}"
    return None


def _quiet() -> None:
    """AIMET logs every layer it touches at INFO."""
    from aimet_torch.common.utils import AimetLogger

    AimetLogger.set_level_for_all_areas(logging.WARNING)


def _replace(root: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, leaf, new)


def traceable(model: nn.Module, example: torch.Tensor) -> tuple[torch.fx.GraphModule, dict[str, str]]:
    """A copy of timm's ``model`` AIMET can trace, fold and quantize, and the name in it of each Conv2d and
    Linear of ``model`` (a ``Conv2dSame`` named N becomes ``N.conv``). Padding is fixed for ``example``'s size."""
    from aimet_torch.model_preparer import prepare_model
    from timm.layers import BatchNormAct2d, Conv2dSame
    from timm.layers.padding import get_same_padding

    model = copy.deepcopy(model).eval()
    sizes = {}
    hooks = [m.register_forward_pre_hook(lambda m, args, n=n: sizes.__setitem__(n, args[0].shape[-2:]))
             for n, m in model.named_modules() if isinstance(m, Conv2dSame)]
    with torch.no_grad():
        model(example)
    for hook in hooks:
        hook.remove()
    names = {}
    for name, m in list(model.named_modules()):
        if isinstance(m, Conv2dSame):
            pad_h, pad_w = (get_same_padding(size, k, s, d)
                            for size, k, s, d in zip(sizes[name], m.kernel_size, m.stride, m.dilation))
            conv = nn.Conv2d(m.in_channels, m.out_channels, m.kernel_size, m.stride, 0, m.dilation, m.groups,
                             m.bias is not None)
            conv.load_state_dict(m.state_dict())
            pad = nn.ZeroPad2d((pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2))  # as timm's pad_same
            _replace(model, name, nn.Sequential(collections.OrderedDict(pad=pad, conv=conv)))
            names[name] = f"{name}.conv"
        elif isinstance(m, (nn.Conv2d, nn.Linear)):
            names[name] = name
        elif isinstance(m, BatchNormAct2d):
            bn = nn.BatchNorm2d(m.num_features, m.eps, m.momentum)
            bn.load_state_dict(m.state_dict())
            _replace(model, name, nn.Sequential(collections.OrderedDict(bn=bn, drop=m.drop, act=m.act)))
    return prepare_model(model), names


@torch.no_grad()
def _max_diff(model: nn.Module, reference: nn.Module, x: torch.Tensor) -> float:
    return (model(x) - reference(x)).abs().max().item()


def _check(diff: float, what: str) -> float:
    if diff > FP32_TOL:
        raise RuntimeError(f"{what} is not FP32: logits differ by up to {diff:.3g}")
    return diff


def float_graph(model: nn.Module, calib: list[torch.Tensor]) -> tuple[torch.fx.GraphModule, dict[str, str], float]:
    """(graph, names, diff): :func:`traceable`'s graph with its BatchNorms folded, the layer names, and its max
    |logit difference| to ``model`` on the first calibration batch (checked)."""
    from aimet_torch.batch_norm_fold import fold_all_batch_norms

    _quiet()
    example = calib[0][:1]
    graph, names = traceable(model, example)
    fold_all_batch_norms(graph, None, dummy_input=example)
    return graph, names, _check(_max_diff(graph, model, calib[0]), "the folded graph")


def _fused_convs(graph: torch.fx.GraphModule) -> list[str]:
    """The convs whose output goes only to a ReLU6 (through the Identity a folded BatchNorm leaves)."""
    users: dict[torch.fx.Node, list[torch.fx.Node]] = collections.defaultdict(list)
    for node in graph.graph.nodes:
        for arg in node.all_input_nodes:
            users[arg].append(node)

    def module(node):
        return graph.get_submodule(node.target) if node.op == "call_module" else None

    out = []
    for node in graph.graph.nodes:
        if isinstance(module(node), nn.Conv2d):
            nxt = users[node]
            while len(nxt) == 1 and isinstance(module(nxt[0]), nn.Identity):
                nxt = users[nxt[0]]
            if len(nxt) == 1 and isinstance(module(nxt[0]), nn.ReLU6):
                out.append(node.target)
    return out


def _sim(graph: torch.fx.GraphModule, calib: list[torch.Tensor], bits: dict[str, int | None]):
    """AIMET's sim of ``graph`` (8-bit weights and activations, tf_enhanced), weight widths from ``bits`` (None:
    that layer's weight stays float), no quantizer between a conv and its ReLU6; checked against ``graph``."""
    from aimet_torch.common.defs import QuantScheme
    from aimet_torch.quantsim import QuantizationSimModel
    from aimet_torch.utils import remove_all_quantizers

    sim = QuantizationSimModel(graph, calib[0][:1], quant_scheme=QuantScheme.post_training_tf_enhanced,
                               default_param_bw=8, default_output_bw=8)
    for name in _fused_convs(graph):
        sim.model.get_submodule(name).output_quantizers[0] = None
    for name, b in bits.items():
        quantizers = sim.model.get_submodule(name).param_quantizers
        if b is None:
            quantizers["weight"] = None
        else:
            quantizers["weight"].bitwidth = b
    with remove_all_quantizers(sim.model):
        _check(_max_diff(sim.model, graph, calib[0]), "AIMET's sim without quantizers")
    return sim


def _calibrated(sim, calib: list[torch.Tensor]) -> nn.Module:
    def forward(model):
        for batch in calib:
            model(batch)

    sim.compute_encodings(forward)
    return sim.model


def w8a8(model: nn.Module, calib: list[torch.Tensor]) -> tuple[nn.Module, dict]:
    """BatchNorm fold + AIMET's sim at 8-bit weights and activations, calibrated on ``calib``."""
    graph, names, diff = float_graph(model, calib)
    return _calibrated(_sim(graph, calib, {}), calib), {"fp32_max_abs_diff": diff}


def adaround(model: nn.Module, calib: list[torch.Tensor], iterations: int, bits: int = 4,
             widths: dict[str, int | None] | None = None, max_bits: int | None = None) -> tuple[nn.Module, dict]:
    """BatchNorm fold, AdaRound (``iterations`` steps per layer) of each Conv2d / Linear at ``bits`` or its width in
    ``widths`` (keyed by ``model``'s layer names; None keeps the layer float), only of those of at most ``max_bits``
    if given (the others are rounded to nearest by the sim), then AIMET's sim with the AdaRound weight encodings
    frozen and 8-bit activations, calibrated on ``calib``."""
    from aimet_torch.adaround.adaround_weight import Adaround, AdaroundParameters
    from aimet_torch.common.defs import QuantScheme

    graph, names, diff = float_graph(model, calib)
    layer_bits = {names[n]: widths.get(n, bits) if widths else bits for n in names}
    rounded = {n: b for n, b in layer_bits.items() if b is not None and (max_bits is None or b <= max_bits)}
    params = AdaroundParameters(calib, len(calib), default_num_iterations=iterations)
    torch.manual_seed(0)  # AdaRound draws its 32-image batches with torch.randperm: the same draws every run
    with tempfile.TemporaryDirectory() as tmp:
        # the layers left out stay float while AdaRound fits the others (AIMET's ignore list)
        graph_rounded = Adaround.apply_adaround(
            graph, calib[0][:1], params, tmp, "adaround", default_param_bw=bits,
            param_bw_override_list=[(graph.get_submodule(n), b) for n, b in rounded.items()],
            ignore_quant_ops_list=[graph.get_submodule(n) for n in layer_bits if n not in rounded],
            default_quant_scheme=QuantScheme.post_training_tf_enhanced)
        sim = _sim(graph_rounded, calib, layer_bits)
        sim.set_and_freeze_param_encodings(str(Path(tmp) / "adaround.encodings"))
    return _calibrated(sim, calib), {"fp32_max_abs_diff": diff, "adaround_iterations": iterations,
                                     "adaround_layers": len(rounded)}
