"""``export.format=onnx``: a quantized model as an ONNX graph in QDQ form, for ONNX Runtime and its peers.

Every quantized input becomes ``QuantizeLinear -> DequantizeLinear`` with the layer's calibrated scale
and zero point, every quantized weight an integer initializer read by ``DequantizeLinear`` (per-tensor,
per output channel with its axis, or per input group as ONNX's blocked quantization), then the float op.
The codes are qsweep's own: nothing is re-rounded. The rest of the model is exported as float ops.

How: a copy of the model whose quantized layers put a ``qsweep::Marker`` node where a tensor is
quantized is traced by torch's TorchScript ONNX exporter (the dynamo exporter needs onnxscript and
custom translations for the same); :func:`_replace_markers` then swaps each marker for the Q/DQ nodes
and initializers built here with the ``onnx`` API, at opset 21 (4-bit and 16-bit integer types).

Grids. Signed (symmetric) grids map to ``INT*``, unsigned (affine) ones to ``UINT*``, full range (qsweep
has no narrow-range grid). 4-, 8- and 16-bit activations use the type of that width; other widths the
next wider type behind a ``Clip`` to the grid's ends, which gives the same codes. Weights of 2 to 4 bits
are stored as ``INT4`` / ``UINT4``, of 5 to 8 bits as ``INT8`` / ``UINT8``: the file is bigger than
qsweep's bit-packed artifact for 2-, 3-, 5-, 6- and 7-bit layers, whose true size is the artifact's
(:func:`qsweep.export.artifact_bytes`). What has no QDQ form is refused naming the module and why.
"""

from __future__ import annotations

import copy
import io
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from qsweep.errors import QsweepError
from qsweep.files import atomic_write, ensure_space
from qsweep.quant.grid import Grid
from qsweep.quant.intkernel import IntAttention, IntGemm
from qsweep.quant.embedding import QuantEmbedding
from qsweep.quant.intops import IntBlock, IntGELU, IntLayerNorm, IntSoftmax
from qsweep.quant.modules import QuantConv2d, QuantLayer, QuantLinear
from qsweep.quant.quantizer import ActQuantizer
from qsweep.quant.vit import Log2Quantizer

OPSET = 21  # QuantizeLinear / DequantizeLinear with INT4 / UINT4 and blocked scales
_TRACE_OPSET = 20  # the TorchScript exporter's newest; converted to OPSET after tracing
_DOMAIN = "qsweep"
INPUT_NAME, OUTPUT_NAME = "input", "output"


class OnnxExportError(QsweepError):
    """A part of the quantized model has no ONNX QDQ form (the message names it and why)."""


def _onnx():
    try:
        import onnx
    except ImportError:
        raise QsweepError("export.format=onnx needs the onnx package: pip install -e '.[onnx]'") from None
    return onnx


# --------------------------------------------------------------------------- what each marker becomes

@dataclass(frozen=True)
class ActSpec:
    """A static per-tensor activation grid."""

    scale: float
    zero_point: int
    grid: Grid


@dataclass(frozen=True)
class WeightSpec:
    """A weight's integer codes in the layout the ONNX op reads, with their scales and zero points."""

    codes: np.ndarray  # int16 holding the grid's codes
    scale: np.ndarray  # float32: () per-tensor, [C] per channel along axis, blocked: the weight's rank
    zero_point: np.ndarray  # same shape as scale
    grid: Grid
    axis: int | None = None
    block_size: int | None = None


def _int_type(bits: int, signed: bool) -> tuple[int, int]:
    """``(container bits, onnx TensorProto type)`` of the narrowest ONNX integer type holding ``bits``."""
    tp = _onnx().TensorProto
    for width, (s, u) in ((4, (tp.INT4, tp.UINT4)), (8, (tp.INT8, tp.UINT8)), (16, (tp.INT16, tp.UINT16))):
        if bits <= width:
            return width, s if signed else u
    raise ValueError(f"{bits}-bit grids have no ONNX QuantizeLinear type (4, 8 or 16 bits)")


def _int_tensor(name: str, values: np.ndarray, bits: int, signed: bool):
    """An initializer of ``values`` as the ONNX integer type for ``bits`` (4-bit types packed two per byte)."""
    import ml_dtypes

    onnx = _onnx()
    width, _ = _int_type(bits, signed)
    dtypes = {4: (ml_dtypes.int4, ml_dtypes.uint4), 8: (np.int8, np.uint8), 16: (np.int16, np.uint16)}
    return onnx.numpy_helper.from_array(np.asarray(values).astype(dtypes[width][0 if signed else 1]), name)


def _float_tensor(name: str, values) -> object:
    return _onnx().numpy_helper.from_array(np.asarray(values, dtype=np.float32), name)


def _act_nodes(key: str, x: str, out: str, spec: ActSpec) -> tuple[list, list]:
    """``x`` -> [Clip] -> QuantizeLinear -> DequantizeLinear -> ``out`` on ``spec``'s grid."""
    helper = _onnx().helper
    g = spec.grid
    width, _ = _int_type(g.bits, g.symmetric)
    s, z = f"{key}.input_scale", f"{key}.input_zero_point"
    inits = [_float_tensor(s, spec.scale), _int_tensor(z, spec.zero_point, g.bits, g.symmetric)]
    nodes = []
    if width != g.bits:
        # A narrower grid than its type: clip to the grid's ends first; rounding those ends gives qmin / qmax.
        lo, hi = f"{key}.input_clip_min", f"{key}.input_clip_max"
        inits += [_float_tensor(lo, np.float32(g.qmin - spec.zero_point) * np.float32(spec.scale)),
                  _float_tensor(hi, np.float32(g.qmax - spec.zero_point) * np.float32(spec.scale))]
        nodes.append(helper.make_node("Clip", [x, lo, hi], [f"{key}.input_clipped"], name=f"{key}.input_clip"))
        x = f"{key}.input_clipped"
    nodes += [helper.make_node("QuantizeLinear", [x, s, z], [f"{key}.input_q"], name=f"{key}.input_quantize"),
              helper.make_node("DequantizeLinear", [f"{key}.input_q", s, z], [out], name=f"{key}.input_dequantize")]
    return nodes, inits


def _weight_nodes(key: str, out: str, spec: WeightSpec) -> tuple[list, list]:
    """The codes as an integer initializer, dequantized by one DequantizeLinear into ``out``."""
    helper = _onnx().helper
    g = spec.grid
    q, s, z = f"{key}.weight_quantized", f"{key}.weight_scale", f"{key}.weight_zero_point"
    inits = [_int_tensor(q, spec.codes, g.bits, g.symmetric), _float_tensor(s, spec.scale),
             _int_tensor(z, spec.zero_point, g.bits, g.symmetric)]
    attrs = {k: v for k, v in (("axis", spec.axis), ("block_size", spec.block_size)) if v is not None}
    return [helper.make_node("DequantizeLinear", [q, s, z], [out], name=f"{key}.weight_dequantize", **attrs)], inits


# --------------------------------------------------------------------------- the traced form

class _Marker(torch.autograd.Function):
    """Identity in PyTorch; a ``qsweep::Marker`` node (keyed) in the traced ONNX graph."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, key: str) -> torch.Tensor:
        return x.clone()  # a new value, so the tracer records the node

    @staticmethod
    def symbolic(g, x, key: str):
        return g.op(f"{_DOMAIN}::Marker", x, key_s=key).setType(x.type())


def _refuse(name: str, why: str):
    raise OnnxExportError(f"cannot export {name!r} to ONNX QDQ (export.format=onnx): {why}")


def act_spec(quantizer: ActQuantizer, name: str) -> ActSpec:
    """The static per-tensor grid of a calibrated activation quantizer, or a refusal naming it."""
    if isinstance(quantizer, Log2Quantizer):
        _refuse(name, "its power-of-two (log2) grid is not affine; use quant.vit.softmax_quantizer=uniform")
    if quantizer.dynamic:
        _refuse(name, "per-token activation scales are computed at run time, which QuantizeLinear's static "
                "scale cannot express; use quant.act.granularity=per_tensor")
    if quantizer.observer is not None:
        _refuse(name, "its activation quantizer is not calibrated")
    if quantizer.scale.numel() != 1:
        _refuse(name, f"its activation scale has {quantizer.scale.numel()} values; QDQ export takes per-tensor ones")
    return ActSpec(float(quantizer.scale.reshape(())), int(quantizer.zero_point.reshape(())), quantizer.grid)


def weight_spec(layer: QuantLayer, name: str) -> WeightSpec:
    """``layer``'s codes in the ONNX layout: a Linear's ``[in, out]`` (read by MatMul), a conv's own."""
    q = layer.qweight
    codes = q.codes.reshape(q.shape).numpy()
    rows, groups = q.granularity_shape
    scale, zp = q.scale.reshape(rows, groups).numpy(), q.zero_point.reshape(rows, groups).numpy()
    if isinstance(layer, QuantLinear):
        codes, scale, zp = codes.T, scale.T, zp.T  # [in, out]; scales [groups, out]
        if rows == 1:
            return WeightSpec(codes, scale.reshape(()), zp.reshape(()), q.grid)
        if groups == 1:
            return WeightSpec(codes, scale.reshape(-1), zp.reshape(-1), q.grid, axis=1)
        return WeightSpec(codes, scale, zp, q.grid, axis=0, block_size=codes.shape[0] // groups)
    if rows == 1:
        return WeightSpec(codes, scale.reshape(()), zp.reshape(()), q.grid)
    if groups != 1:
        _refuse(name, "per-group scales of a conv run over its flattened input channels and kernel, which "
                "ONNX's blocked quantization (one axis) cannot express; use per_channel weights for convs")
    return WeightSpec(codes, scale.reshape(-1), zp.reshape(-1), q.grid, axis=0)


def _mark(x: torch.Tensor, key: str) -> torch.Tensor:
    return _Marker.apply(x, key) if torch.onnx.is_in_onnx_export() else x


class OnnxLayer(nn.Module):
    """A quantized Linear / Conv2d as traced for ONNX: smoothing and rotation ops, markers, the float op."""

    def __init__(self, layer: QuantLayer, name: str):
        super().__init__()
        self.layer, self.key = layer, name
        self.act_spec = act_spec(layer.act, name) if layer.act is not None else None
        self.weight_spec = weight_spec(layer, name) if layer.qweight is not None else None
        weight = layer.weight.detach()
        # A Linear reads its weight as [in, out]: DequantizeLinear feeds MatMul with no Transpose between.
        self.register_buffer("w", weight.t().contiguous() if isinstance(layer, QuantLinear) else weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layer.scale_input(x)  # Div by quant.smooth's s, MatMul by the Hadamard blocks: in the graph
        if self.act_spec is not None:
            x = _mark(x, f"{self.key}.act")
        w = _mark(self.w, f"{self.key}.weight") if self.weight_spec is not None else self.w
        if isinstance(self.layer, QuantConv2d):
            return self.layer.op(x, w)
        y = x @ w
        return y if self.layer.bias is None else y + self.layer.bias


class OnnxEmbedding(nn.Module):
    """A quantized embedding table as traced for ONNX: its codes dequantized per row (axis 0), then Gather."""

    def __init__(self, table: QuantEmbedding, name: str):
        super().__init__()
        self.table, self.key = table, name
        q = table.qweight
        self.weight_spec = WeightSpec(q.codes.reshape(q.shape).numpy(), q.scale.reshape(-1).numpy(),
                                      q.zero_point.reshape(-1).numpy(), q.grid, axis=0)
        self.register_buffer("w", table.weight.detach())

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        t = self.table
        return nn.functional.embedding(ids, _mark(self.w, f"{self.key}.weight"), t.padding_idx, None, t.norm_type)


class OnnxAct(nn.Module):
    """An activation quantizer outside a quantized layer (attention's q, k, v, softmax) as traced for ONNX."""

    def __init__(self, quantizer: ActQuantizer, name: str):
        super().__init__()
        self.key, self.spec = name, act_spec(quantizer, name)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _mark(x, f"{self.key}.act")


def _unsupported(module: nn.Module) -> str | None:
    if isinstance(module, (IntSoftmax, IntGELU, IntLayerNorm, IntBlock)):
        return ("quant.intops=ivit computes it with integer shifts and lookups that have no QDQ form; "
                "use quant.intops=off")
    if isinstance(module, (IntGemm, IntAttention)):
        return "it is an integer-backend module; export the fake-quant model qsweep.quantize returns"
    if isinstance(module, (QuantLayer, QuantEmbedding)) and module.packed is not None:
        return "it is the torch.export artifact form; export the model qsweep.quantize returns"
    return None


def onnx_form(qmodel: nn.Module) -> tuple[nn.Module, dict[str, ActSpec | WeightSpec]]:
    """A CPU copy of ``qmodel`` to trace, and the spec of each marker key it emits."""
    model = copy.deepcopy(qmodel).cpu().eval()
    swaps: dict[str, nn.Module] = {}
    for name, module in model.named_modules():
        why = _unsupported(module)
        if why:
            _refuse(name, why)
        if any(name.startswith(f"{done}.") for done in swaps):
            continue  # inside a layer already swapped: its input quantizer is the layer's
        if isinstance(module, QuantLayer):
            swaps[name] = OnnxLayer(module, name or "model")
        elif isinstance(module, QuantEmbedding):
            swaps[name] = OnnxEmbedding(module, name)
        elif isinstance(module, ActQuantizer):
            swaps[name] = OnnxAct(module, name)
    specs: dict[str, ActSpec | WeightSpec] = {}
    for name, new in swaps.items():
        if name == "":
            model = new
        else:
            parent, _, attr = name.rpartition(".")
            setattr(model.get_submodule(parent), attr, new)
        if isinstance(new, OnnxAct) or getattr(new, "act_spec", None) is not None:
            specs[f"{new.key}.act"] = new.spec if isinstance(new, OnnxAct) else new.act_spec
        if isinstance(new, (OnnxLayer, OnnxEmbedding)) and new.weight_spec is not None:
            specs[f"{new.key}.weight"] = new.weight_spec
    return model, specs


# --------------------------------------------------------------------------- export

def _trace(form: nn.Module, example: torch.Tensor) -> bytes:
    """``form`` traced to ONNX at the TorchScript exporter's opset, dynamic in the batch dimension."""
    # Two examples: a batch of 1 could let tracing specialize the batch dimension.
    example = example[:1].cpu().expand(2, *example.shape[1:]).contiguous()
    buffer = io.BytesIO()
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # the exporter's deprecation and tracer warnings, once per call site
        torch.onnx.export(form, (example,), buffer, dynamo=False, opset_version=_TRACE_OPSET,
                          input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                          dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
                          custom_opsets={_DOMAIN: 1}, do_constant_folding=True)
    return buffer.getvalue()


def _replace_markers(model, specs: dict[str, ActSpec | WeightSpec]) -> None:
    """Each ``qsweep::Marker`` node -> its Q/DQ nodes; the float tensors they replace are dropped."""
    graph, nodes, inits = model.graph, [], []
    for node in graph.node:
        if node.domain != _DOMAIN:
            nodes.append(node)
            continue
        key = next(a.s.decode() for a in node.attribute if a.name == "key")
        spec = specs.pop(key)
        built, tensors = (_act_nodes(key.removesuffix(".act"), node.input[0], node.output[0], spec)
                          if isinstance(spec, ActSpec) else
                          _weight_nodes(key.removesuffix(".weight"), node.output[0], spec))
        nodes += built
        inits += tensors
    if specs:
        raise RuntimeError(f"ONNX export: no marker traced for {sorted(specs)}")  # a bug, not bad input
    del graph.node[:]
    graph.node.extend(nodes)
    graph.initializer.extend(inits)
    used = {name for n in graph.node for name in n.input}
    kept = [t for t in graph.initializer if t.name in used]
    del graph.initializer[:]
    graph.initializer.extend(kept)
    ops = [o for o in model.opset_import if o.domain != _DOMAIN]
    del model.opset_import[:]
    model.opset_import.extend(ops)


def _share_constants(graph, min_bytes: int = 256) -> None:
    """Constant nodes of ``min_bytes`` or more -> initializers, one per distinct content: the tracer stores the
    Hadamard matrix of ``quant.rotate`` once per rotated layer, 16 kB each at block size 64."""
    nodes, shared = [], {}
    for node in graph.node:
        attr = node.attribute[0] if node.op_type == "Constant" and len(node.attribute) == 1 else None
        if attr is None or attr.name != "value" or len(attr.t.raw_data) < min_bytes:
            nodes.append(node)
            continue
        t = attr.t
        content = (t.data_type, tuple(t.dims), t.raw_data)
        if content not in shared:
            shared[content] = node.output[0]
            t.name = node.output[0]
            graph.initializer.append(t)
        else:
            nodes.append(_onnx().helper.make_node("Identity", [shared[content]], [node.output[0]], name=node.name))
    del graph.node[:]
    graph.node.extend(nodes)


def onnx_model(qmodel: nn.Module, example: torch.Tensor):
    """``qmodel`` (what :func:`qsweep.quantize` returns) as a checked QDQ ``onnx.ModelProto``."""
    onnx = _onnx()
    form, specs = onnx_form(qmodel)
    traced = onnx.load_from_string(_trace(form, example))
    model = onnx.version_converter.convert_version(traced, OPSET)
    _replace_markers(model, specs)
    _share_constants(model.graph)
    del model.graph.value_info[:]  # the tracer's intermediate shapes: ORT infers its own
    model.producer_name = "qsweep"
    onnx.checker.check_model(model, full_check=True)
    return model


def onnx_filename(filename: str) -> str:
    """Where ``export.format=onnx`` writes in the run folder: ``export.filename`` with the suffix ``.onnx``."""
    return Path(filename).with_suffix(".onnx").name


def export_onnx(qmodel: nn.Module, example: torch.Tensor, path: str | Path) -> Path:
    """Write ``qmodel`` as a QDQ ONNX file at ``path`` (temp name, then renamed); returns the path."""
    data = onnx_model(qmodel, example).SerializeToString()
    path = Path(path)
    ensure_space(path, len(data) / 2**20)
    return atomic_write(path, lambda tmp: tmp.write_bytes(data))
