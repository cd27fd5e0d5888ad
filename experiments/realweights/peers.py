"""torchao's pt2e flow on the same encoder: ``torch.export`` -> X86InductorQuantizer -> reference model.

The converted (reference) program computes in float around explicit quantize / dequantize ops, so
its embeddings are what the int8 kernels would give; per-layer outputs are read off its
``aten.linear`` nodes, named by the module each was traced from.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import fx, nn

from minilm import Runner

INPUTS = ("input_ids", "attention_mask", "token_type_ids")
INSTALL = "pip install -e '.[peers]'"


class Encoder(nn.Module):
    """The HF model with positional tensor inputs and ``last_hidden_state`` out, for ``torch.export``."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask, token_type_ids):
        return self.model(input_ids=input_ids, attention_mask=attention_mask,
                          token_type_ids=token_type_ids).last_hidden_state


def available() -> str | None:
    """None when torchao's pt2e flow imports, else why not."""
    try:
        import torchao.quantization.pt2e.quantize_pt2e  # noqa: F401
    except ImportError as exc:
        return f"torchao not installed ({exc}): {INSTALL}"
    return None


def _config(w_bits: int):
    """x86 inductor's default config (HistogramObserver uint8 per-tensor affine activations,
    per-channel symmetric weights) with the weight grid narrowed to ``w_bits``.

    torchao has no int4 dtype for this flow; a narrower ``quant_min``/``quant_max`` on int8 storage
    gives the same grid, and the reference model honours it (inductor's int8 kernels would not).
    """
    import torchao.quantization.pt2e.quantizer.x86_inductor_quantizer as x86

    cfg = x86.get_default_x86_inductor_quantization_config()
    if w_bits == 8:
        return cfg
    q = 2 ** (w_bits - 1)
    return dataclasses.replace(cfg, weight=dataclasses.replace(cfg.weight, quant_min=-q, quant_max=q - 1))


def quantize(model: nn.Module, calib: list[dict[str, torch.Tensor]], w_bits: int) -> fx.GraphModule:
    """Export (dynamic batch and sequence length), prepare, calibrate, convert."""
    import torchao.quantization.pt2e.quantizer.x86_inductor_quantizer as x86
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    args = tuple(calib[0][k] for k in INPUTS)
    dims = {0: torch.export.Dim("batch", min=1), 1: torch.export.Dim("seq", min=2, max=512)}
    graph = torch.export.export(Encoder(model).eval(), args, dynamic_shapes=(dims,) * len(INPUTS)).module()
    prepared = prepare_pt2e(graph, x86.X86InductorQuantizer().set_global(_config(w_bits)))
    with torch.no_grad():
        for batch in calib:
            prepared(*(batch[k] for k in INPUTS))
    return convert_pt2e(prepared)


def _layer_name(node: fx.Node) -> str:
    fqn = list(node.meta["nn_module_stack"].values())[-1][0]
    return fqn.removeprefix("model.")


class _Tap(fx.Interpreter):
    """Runs the graph node by node, keeping the output of each ``aten.linear`` by layer name."""

    def __init__(self, gm: fx.GraphModule):
        super().__init__(gm)
        self.names = {n: _layer_name(n) for n in gm.graph.nodes if n.target is torch.ops.aten.linear.default}
        self.outs: dict[str, torch.Tensor] = {}

    def run_node(self, n: fx.Node):
        out = super().run_node(n)
        if n in self.names:
            self.outs[self.names[n]] = out
        return out


def runner(gm: fx.GraphModule) -> Runner:
    tap = _Tap(gm)

    def run(batch):
        tap.outs = {}
        hidden = tap.run(*(batch[k] for k in INPUTS))
        return hidden, tap.outs
    return run
