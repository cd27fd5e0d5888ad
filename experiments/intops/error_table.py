"""Integer Softmax / GELU / LayerNorm (``quant.intops=ivit``) against float on the digits ViT's real activations.

    .venv/bin/python experiments/intops/error_table.py [--no-accuracy]

Prints:

1. per op instance, the row-wise relative L2 error ``||int - float|| / ||float||`` (rows: tokens;
   softmax: attention rows) over the digits test set, mean and max, next to the same error of the
   float op evaluated between the same integer grids ("grid only": what quantizing the input and
   output costs by itself; the difference is the integer arithmetic's approximation). Each op's
   input quantizer is calibrated on the 256 calibration images, as ``qsweep.quantize`` does;
2. digits ViT top-1 with each ``quant.vit`` / ``quant.intops`` option at W8A8, W4A8 and W4A4
   (per-channel symmetric weights, per-tensor affine min-max activations).
"""

from __future__ import annotations

import argparse
import copy

import torch
import torch.nn.functional as F
from torch import nn

import qsweep
from qsweep.config import DataConfig, QuantConfig, TensorQuantConfig
from qsweep.data import build_data, calibration_batches, eval_loader
from qsweep.evaluate import evaluate
from qsweep.models import load_digits_vit
from qsweep.models.cache import cache_dir
from qsweep.quant.calibrate import calibrate
from qsweep.quant.grid import fake_quantize
from qsweep.quant.intops import GELU_SIGMOID, SOFTMAX_OUT_BITS, IntGELU, IntLayerNorm, IntSoftmax
from qsweep.quant.quantizer import ActQuantizer
from qsweep.quant.vit import wrap_attention

ACT = {"bits": 8, "symmetric": False}  # the LN output grid: the recipe's activation spec at 8 bits
OPTIONS = {
    "none": {},
    "attn_matmul (uniform softmax)": {"vit": {"attn_matmul": True}},
    "attn_matmul (log2 softmax)": {"vit": {"attn_matmul": True, "softmax_quantizer": "log2"}},
    "post_ln=reparam": {"vit": {"post_ln": "reparam"}},
    "post_ln=smooth (alpha 0.5)": {"vit": {"post_ln": "smooth"}},
    "intops=ivit (residual 16 b)": {"intops": "ivit"},
    "intops=ivit (residual float)": {"intops": "ivit", "residual_bits": None},
    "all: attn log2 + reparam + ivit": {"vit": {"attn_matmul": True, "softmax_quantizer": "log2",
                                                "post_ln": "reparam"}, "intops": "ivit"},
}
BITS = {"W8A8": (8, 8), "W4A8": (4, 8), "W4A4": (4, 4)}


def capture(model: nn.Module, *inputs: torch.Tensor) -> dict[str, tuple[nn.Module, list[torch.Tensor]]]:
    """Inputs of every LayerNorm, GELU and attention softmax of a float copy of ``model``, per call."""
    model = copy.deepcopy(model)
    wrap_attention(model)  # the softmax becomes a module; the math stays timm's
    seen: dict[str, list[torch.Tensor]] = {}
    hooks = [m.register_forward_hook(lambda mod, inp, out, name=name: seen.setdefault(name, []).append(inp[0]))
             for name, m in model.named_modules() if isinstance(m, (nn.LayerNorm, nn.GELU, nn.Softmax))]
    with torch.no_grad():
        for x in inputs:
            model(x)
    for h in hooks:
        h.remove()
    return {name: (model.get_submodule(name), xs) for name, xs in seen.items()}


def integer_op(module: nn.Module, name: str) -> nn.Module:
    if isinstance(module, nn.LayerNorm):
        return IntLayerNorm(module, TensorQuantConfig(**ACT), name)
    if isinstance(module, nn.GELU):
        return IntGELU(TensorQuantConfig(bits=8), name)
    return IntSoftmax(TensorQuantConfig(bits=8), name)


def fq(x: torch.Tensor, q: ActQuantizer) -> torch.Tensor:
    return fake_quantize(x, q.scale, q.zero_point, q.grid)


def grid_only(op: nn.Module, module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The float op between the integer op's grids (exact GELU / softmax / LN math)."""
    if isinstance(op, IntLayerNorm):
        return fq(module(fq(x, op.inq)), op.outq)
    if isinstance(op, IntGELU):
        return fq(F.gelu(fq(x, op.inq)), op.inq)
    step = 2.0**-SOFTMAX_OUT_BITS
    return (fq(x, op.inq).softmax(dim=-1) / step).round().clamp_max(2**SOFTMAX_OUT_BITS - 1) * step


def row_rel_err(y: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    y, ref = y.reshape(-1, y.shape[-1]), ref.reshape(-1, ref.shape[-1])
    return (y - ref).norm(dim=-1) / ref.norm(dim=-1).clamp_min(1e-12)


def error_table(model: nn.Module, calib: torch.Tensor, test: torch.Tensor) -> None:
    print("Row-wise relative L2 error vs the float op on the digits test set "
          f"({test.shape[0]} images; rows: tokens, softmax: attention rows)\n")
    header = (f"{'op':<13}{'module':<24}{'input range':>18}{'mean':>9}{'max':>9}"
              f"{'grid-only mean':>16}{'grid-only max':>15}")
    print(header)
    print("-" * len(header))
    per_kind: dict[str, list[tuple[float, float]]] = {}
    gelu_inputs = []
    for name, (module, (x_cal, x)) in capture(model, calib, test).items():
        op = integer_op(module, name)
        calibrate(op, [x_cal])
        with torch.no_grad():
            ref = module(x)
            err = row_rel_err(op(x), ref)
            base = row_rel_err(grid_only(op, module, x), ref)
        kind = type(op).__name__
        if kind == "IntGELU":
            gelu_inputs.append(x.reshape(-1, x.shape[-1]))
        per_kind.setdefault(kind, []).append((err.mean().item(), err.max().item()))
        rng = f"[{x.min().item():.2f}, {x.max().item():.2f}]"
        print(f"{kind:<13}{name:<24}{rng:>18}{err.mean().item():>9.4f}{err.max().item():>9.4f}"
              f"{base.mean().item():>16.4f}{base.max().item():>15.4f}")
    print()
    for kind, errs in per_kind.items():
        means, maxes = zip(*errs)
        print(f"{kind:<13} over {len(errs)} instances: mean of means {sum(means) / len(means):.4f}, "
              f"worst mean {max(means):.4f}, worst max {max(maxes):.4f}")
    xs = torch.cat(gelu_inputs)
    sigmoid_err = row_rel_err(xs * torch.sigmoid(GELU_SIGMOID * xs), F.gelu(xs))
    print(f"(float x * sigmoid({GELU_SIGMOID} x) vs GELU on the same GELU inputs, no grids: "
          f"mean {sigmoid_err.mean().item():.4f}, max {sigmoid_err.max().item():.4f})\n")


def accuracy_table(model: nn.Module, bundle, calib_batches: list[torch.Tensor]) -> None:
    loader = eval_loader(bundle, DataConfig())
    fp = evaluate(model, loader, bundle.num_classes).top1
    print(f"digits ViT top-1 (%), {len(bundle.test)} test images (one image = {100 / len(bundle.test):.2f} points); "
          f"FP32: {fp:.2f}\n")
    header = f"{'option':<34}" + "".join(f"{k:>9}" for k in BITS)
    print(header)
    print("-" * len(header))
    for label, option in OPTIONS.items():
        row = []
        for w_bits, a_bits in BITS.values():
            recipe = {"weight": {"bits": w_bits, "granularity": "per_channel"},
                      "act": {"bits": a_bits, "symmetric": False}, **option}
            q = qsweep.quantize(model, recipe, calib_batches)
            row.append(evaluate(q, loader, bundle.num_classes).top1)
        print(f"{label:<34}" + "".join(f"{v:>9.2f}" for v in row))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--no-accuracy", action="store_true", help="only the error table")
    args = parser.parse_args()
    torch.manual_seed(0)
    bundle = build_data(DataConfig())
    model = load_digits_vit(bundle, cache_dir(), progress=False).eval()
    batches = calibration_batches(bundle, QuantConfig().calib)
    test = torch.cat([x for x, _ in eval_loader(bundle, DataConfig())])
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads\n")
    error_table(model, torch.cat(batches), test)
    if not args.no_accuracy:
        accuracy_table(model, bundle, batches)


if __name__ == "__main__":
    main()
