"""``eval.backend=onnxruntime``: the exported QDQ ONNX file run by ONNX Runtime (CPU), checked against the int backend.

ONNX Runtime computes the same graph with its own kernels and optimizations: it quantizes a conv's
float bias to int32 on the grid ``s_x * s_w``, fuses Q/DQ pairs into integer kernels that requantize
with their own rounding, divides by the scale where qsweep multiplies by its reciprocal, and has its
own LayerNorm, softmax and GELU. Each can move a value that lies within float roundoff of a rounding
boundary of the next quantized input by one code; that code step then propagates. With its graph
optimizations off, ORT runs each op as written and reproduces the fake-quant outputs to float roundoff
on layers alone (tests/test_export_onnx.py). The run's tolerance is on predictions: the images whose
ORT top-1 class differs from the int backend's may be at most :data:`MAX_DISAGREEMENT` of those
evaluated (at least one), so the two top-1 accuracies differ by at most that much.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader

from qsweep.errors import QsweepError
from qsweep.evaluate import EvalResult, evaluate

MAX_DISAGREEMENT = 0.005  # of the evaluated images: ORT and the int backend predict >= 99.5 % alike
# Operator sets a QDQ file needs: the standard one (and ONNX Runtime's own, which its optimized files use).
DOMAINS = frozenset({"", "ai.onnx", "com.microsoft"})


class UntrustedOnnxError(QsweepError):
    """An ONNX file asks ONNX Runtime for more than its own tensors and standard operators."""


def _ort():
    try:
        import onnxruntime
    except ImportError:
        raise QsweepError("eval.backend=onnxruntime needs ONNX Runtime: pip install -e '.[onnx]'") from None
    return onnxruntime


def _graphs(graph):
    """``graph`` and every subgraph in its nodes' attributes (If / Loop / Scan bodies)."""
    yield graph
    for node in graph.node:
        for attr in node.attribute:
            for sub in ([attr.g] if attr.HasField("g") else []) + list(attr.graphs):
                yield from _graphs(sub)


def _tensors(graph):
    """Every tensor stored in ``graph``: initializers and node attributes."""
    yield from graph.initializer
    yield from (s.values for s in graph.sparse_initializer)
    for node in graph.node:
        for attr in node.attribute:
            yield from ([attr.t] if attr.HasField("t") else []) + list(attr.tensors)


def check_onnx(data: bytes, path: str | Path) -> None:
    """Refuse an ONNX file whose tensors live in other files (ORT would read any path it names) or whose
    operators come from outside the standard and ONNX Runtime's sets. Parsing a protobuf runs no code."""
    import onnx

    try:
        model = onnx.load_from_string(data)
    except Exception as exc:  # noqa: BLE001 - protobuf's DecodeError and friends
        raise UntrustedOnnxError(f"{path} is not an ONNX model: {exc}") from None
    graphs = list(_graphs(model.graph))
    outside = sorted({n.domain for g in graphs for n in g.node} - DOMAINS) + [f.name for f in model.functions]
    if outside:
        raise UntrustedOnnxError(f"{path} uses operators outside the standard set: {outside}")
    external = [t.name for g in graphs for t in _tensors(g) if t.data_location == onnx.TensorProto.EXTERNAL]
    if external:
        raise UntrustedOnnxError(f"{path} keeps tensors in other files ({external[:3]}), which ONNX Runtime "
                                 "would read from wherever they point; qsweep writes every tensor into the file")


class OrtModel(nn.Module):
    """An ONNX file in an ONNX Runtime CPU session, called like the model it was exported from.

    ``optimize=False`` turns ORT's graph optimizations off (each op runs as written); threads: torch's.
    """

    def __init__(self, path: str | Path, optimize: bool = True, threads: int | None = None):
        super().__init__()
        ort = _ort()
        data = Path(path).read_bytes()
        check_onnx(data, path)  # the bytes checked are the bytes run
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads or torch.get_num_threads()
        options.inter_op_num_threads = 1
        if not optimize:
            options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        self.session = ort.InferenceSession(data, options, providers=["CPUExecutionProvider"])
        self.input_name = self.session.get_inputs()[0].name

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        (out, *_) = self.session.run(None, {self.input_name: x.detach().cpu().float().contiguous().numpy()})
        return torch.from_numpy(out)


@dataclass
class OnnxEval:
    """ORT's accuracy on a file, the int backend's on the same images, and how often their top-1 agree."""

    result: EvalResult
    int_result: EvalResult
    agreement: float  # percent of images with the same top-1 class
    images: int

    @property
    def disagreements(self) -> int:
        return round(self.images * (1 - self.agreement / 100))

    @property
    def allowed(self) -> int:
        """Disagreements the tolerance allows on this many images."""
        return max(1, int(self.images * MAX_DISAGREEMENT))


def _predicting(model: nn.Module, into: list) -> object:
    return model.register_forward_hook(lambda m, args, out: into.append(out.argmax(-1).cpu()))


def evaluate_onnx(path: str | Path, int_model: nn.Module, loader: DataLoader, num_classes: int,
                  device: str | torch.device = "cpu", progress: bool = False) -> OnnxEval:
    """Top-1 / top-5 of the ONNX file in ONNX Runtime, and of ``int_model`` (the int backend), image by image."""
    runner = OrtModel(path)
    preds: dict[str, list[torch.Tensor]] = {"ort": [], "int": []}
    hooks = [_predicting(runner, preds["ort"]), _predicting(int_model, preds["int"])]
    try:
        result = evaluate(runner, loader, num_classes, "cpu", progress, desc="evaluate quantized (onnxruntime)")
        int_result = evaluate(int_model, loader, num_classes, device, progress, desc="evaluate quantized (int)")
    finally:
        for hook in hooks:
            hook.remove()
    ort_top, int_top = torch.cat(preds["ort"]), torch.cat(preds["int"])
    agreement = 100.0 * float((ort_top == int_top).float().mean()) if len(ort_top) else 100.0
    return OnnxEval(result, int_result, agreement, len(ort_top))
