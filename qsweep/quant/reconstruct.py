"""Shared machinery of AdaRound and LSQ: calibration samples, captured module inputs and outputs,
the FP reference, the float weights behind the quantized ones, and block discovery."""

from __future__ import annotations

import copy
import math
import re
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from qsweep.config import _structured
from qsweep.errors import QsweepError
from qsweep.quant.batches import call_model, to_device
from qsweep.quant.modules import quant_layers
from qsweep.quant.fold import fold_batchnorm
from qsweep.quant.grid import quantize
from qsweep.quant.modules import QuantLayer

# Class names of residual / transformer blocks in timm and torchvision (any class ending in "Block" counts too).
BLOCK_CLASSES = ("Bottleneck", "InvertedResidual", "DepthwiseSeparableConv", "EdgeResidual")
# Containers whose children are blocks even when their class names are unknown.
_BLOCK_CONTAINERS = re.compile(r"^(blocks|layers|layer\d+|stages)$")


class ReconstructionError(QsweepError):
    """AdaRound / LSQ cannot run on this model, recipe or calibration data."""


def merge_config(schema: type, cfg: Any, key: str, validator: Callable[[Any], None]) -> DictConfig:
    """``cfg`` (dataclass, dict or DictConfig) merged onto ``schema`` and validated."""
    if not isinstance(cfg, (DictConfig, Mapping)):
        cfg = OmegaConf.structured(cfg)
    merged = _structured(schema, cfg, key)
    validator(merged)
    return merged


def device_of(module: nn.Module) -> torch.device:
    t = next(module.parameters(), None)
    if t is None:
        t = next(module.buffers(), None)
    return t.device if t is not None else torch.device("cpu")


def _first_tensor(batch: Any) -> torch.Tensor | None:
    if isinstance(batch, torch.Tensor):
        return batch
    values = batch.values() if isinstance(batch, Mapping) else batch if isinstance(batch, (tuple, list)) else ()
    for v in values:
        t = _first_tensor(v)
        if t is not None:
            return t
    return None


def _slice(batch: Any, lo: int, hi: int, n: int) -> Any:
    """Rows ``lo:hi`` of every tensor in ``batch`` whose first dimension is the batch size ``n``."""
    if isinstance(batch, torch.Tensor):
        return batch[lo:hi] if batch.dim() and batch.shape[0] == n else batch
    if isinstance(batch, Mapping):
        return {k: _slice(v, lo, hi, n) for k, v in batch.items()}
    if isinstance(batch, (tuple, list)):
        return type(batch)(_slice(v, lo, hi, n) for v in batch)
    return batch


def take_samples(batches: Iterable[Any], num_samples: int, batch_size: int, key: str) -> list[Any]:
    """The first ``num_samples`` calibration samples, in pieces of at most ``batch_size``.

    Batches are tensors, tuples or dicts (as for :func:`qsweep.quantize`); a batch's size is the
    first dimension of its first tensor.
    """
    pieces, total = [], 0
    for batch in batches:
        first = _first_tensor(batch)
        n = first.shape[0] if first is not None and first.dim() else 0
        for lo in range(0, n, batch_size):
            take = min(batch_size, n - lo, num_samples - total)
            if take <= 0:
                break
            pieces.append(_slice(batch, lo, lo + take, n))
            total += take
        if total >= num_samples:
            break
    if total == 0:
        raise ReconstructionError(
            f"{key}: the calibration data has no samples ({key}.num_samples={num_samples}); "
            "give at least one non-empty calibration batch"
        )
    return pieces


class _Stop(Exception):
    """Raised by a capture hook: nothing after the captured module is needed."""


@torch.no_grad()
def capture(model: nn.Module, module: nn.Module, samples: list[Any], what: str, name: str
            ) -> tuple[list[torch.Tensor], tuple, dict]:
    """``module``'s first positional input (``what="input"``) or output per sample piece.

    The forward stops right after ``module``, so capturing early layers is cheap. Also returns
    the remaining positional and keyword arguments of the first call (inputs only); they must not
    be tensors, which could not be re-batched.
    """
    device = device_of(model)
    seen: list[torch.Tensor] = []
    extra: list[Any] = [(), {}]

    def pre(mod, args, kwargs):
        if not args or not isinstance(args[0], torch.Tensor):
            raise ReconstructionError(f"{name}: its first positional input is not a tensor; cannot reconstruct it")
        rest = (args[1:], kwargs)
        if _first_tensor(list(rest[0]) + list(rest[1].values())) is not None:
            raise ReconstructionError(f"{name}: takes extra tensor inputs; reconstruct its layers one by one")
        seen.append(args[0].detach())
        extra[:] = rest
        raise _Stop

    def post(mod, args, out):
        if not isinstance(out, torch.Tensor):
            raise ReconstructionError(f"{name}: its output is a {type(out).__name__}, not a tensor")
        seen.append(out.detach())
        raise _Stop

    handle = (module.register_forward_pre_hook(pre, with_kwargs=True) if what == "input"
              else module.register_forward_hook(post))
    try:
        for piece in samples:
            before = len(seen)
            try:
                call_model(model, to_device(piece, device))
            except _Stop:
                pass
            if len(seen) == before:
                raise ReconstructionError(f"{name}: the calibration forward pass never reached this module")
    finally:
        handle.remove()
    return seen, extra[0], extra[1]


def _bn_folded(qmodel: nn.Module, fp_model: nn.Module) -> bool:
    """Whether ``qmodel`` had BatchNorm folded into its convs (BN gone or reset to identity)."""
    q_modules = dict(qmodel.named_modules())
    for name, bn in fp_model.named_modules():
        if not isinstance(bn, nn.BatchNorm2d) or not bn.track_running_stats:
            continue
        q = q_modules.get(name)
        if not isinstance(q, nn.BatchNorm2d):
            return True
        if bool((q.running_mean == 0).all()) and not bool((bn.running_mean == 0).all()):
            return True
    return False


def reference_model(qmodel: nn.Module, fp_model: nn.Module, first_piece: Any) -> nn.Module:
    """The FP model, in eval mode and BN-folded like ``qmodel``: a copy when either needs changing."""
    folded = _bn_folded(qmodel, fp_model)
    if not folded and not fp_model.training:
        return fp_model
    ref = copy.deepcopy(fp_model).eval()
    if folded:
        device = device_of(ref)
        fold_batchnorm(ref, lambda: call_model(ref, to_device(first_piece, device)))
    return ref


def float_weight(ref: nn.Module, name: str, layer: QuantLayer,
                 float_weights: Mapping[str, torch.Tensor] | None = None) -> torch.Tensor:
    """``layer``'s float weight as ``[rows, groups, len]``, checked against its codes.

    Taken from ``float_weights`` (what :func:`qsweep.quantize` kept: the weights after BN folding
    and ``quant.vit.post_ln`` rewrites) or else from the FP reference. Nearest rounding of it must
    reproduce the layer's codes to within one step (one: AdaRound already rounded the layer).
    """
    q = layer.qweight
    w = (float_weights or {}).get(name)
    if w is None:
        try:
            w = ref.get_submodule(name).weight
        except AttributeError:
            raise ReconstructionError(f"{name}: the FP model has no module of that name with a weight") from None
    if tuple(w.shape) != tuple(q.shape):
        raise ReconstructionError(f"{name}: FP weight shape {tuple(w.shape)} != quantized {tuple(q.shape)}")
    view = w.detach().float().reshape(q.codes.shape).to(q.scale.device)
    nearest = quantize(view, q.scale, q.zero_point, q.grid)
    if int((nearest - q.codes.float()).abs().max()) > 1:
        raise ReconstructionError(
            f"{name}: the quantized weight does not come from the FP model's weight (rewritten by "
            "quant.vit.post_ln, or a different model?); run it through qsweep.quantize(..., adaround=/lsq=), "
            "which keeps the float weights"
        )
    return view


def weighted_layers(model: nn.Module) -> dict[str, QuantLayer]:
    """The quantized layers with integer weights, in module order."""
    return {n: m for n, m in quant_layers(model).items() if m.qweight is not None}


@torch.no_grad()
def execution_order(model: nn.Module, names: Iterable[str], piece: Any) -> list[str]:
    """``names`` sorted by when each module is first called in a forward pass (unreached ones last)."""
    order: dict[str, int] = {}
    handles = []
    for name in names:
        def hook(mod, args, name=name):
            order.setdefault(name, len(order))
        handles.append(model.get_submodule(name).register_forward_pre_hook(hook))
    try:
        call_model(model, to_device(piece, device_of(model)))
    finally:
        for h in handles:
            h.remove()
    return sorted(names, key=lambda n: order.get(n, math.inf))


def find_blocks(model: nn.Module) -> dict[str, nn.Module]:
    """Outermost residual / transformer blocks that hold integer-weight layers.

    A block is a module whose class name ends in ``Block`` or is one of :data:`BLOCK_CLASSES`, or
    a child of a container named ``blocks``, ``layers``, ``layerN`` or ``stages`` (timm ViT /
    ResNet / MobileNet layouts) that is not itself a container.
    """
    weighted = weighted_layers(model)
    blocks: dict[str, nn.Module] = {}
    containers = (nn.Sequential, nn.ModuleList)
    for name, module in model.named_modules():
        if not name or isinstance(module, QuantLayer) or any(name.startswith(b + ".") for b in blocks):
            continue
        cls = type(module).__name__
        parent = name.rpartition(".")[0]
        in_container = (_BLOCK_CONTAINERS.match(parent.rpartition(".")[2]) is not None
                        and isinstance(model.get_submodule(parent), containers)
                        and not isinstance(module, containers)) if parent else False
        if (cls.endswith("Block") or cls in BLOCK_CLASSES or in_container) and any(
                n.startswith(name + ".") for n in weighted):
            blocks[name] = module
    return blocks


def recon_loss(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Squared error summed over features (dim 1 of 4-D NCHW maps, else the last), mean over the rest."""
    features = out.shape[1] if out.dim() == 4 else out.shape[-1]
    return (out - target).pow(2).sum() * (features / max(out.numel(), 1))


@contextmanager
def frozen(model: nn.Module) -> Iterator[None]:
    """Model parameters without gradients (only the learned rounding / step sizes get them), restored after."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)
