"""Weight and activation quantizers built from a grid and an observer."""

from __future__ import annotations

import warnings
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import nn

from qsweep.config import ConfigError, TensorQuantConfig
from qsweep.errors import QsweepError
from qsweep.quant.grid import Grid, dequantize, fake_quantize, qparams, quantize
from qsweep.quant.observers import CLIP_WARN_RATIO, TOKEN_ROWS, ActivationObserver, weight_range

SCALE_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class CalibrationError(QsweepError):
    """Calibration met data it cannot use (NaN/Inf, no batches)."""


class ClippingWarning(UserWarning):
    """A clipping activation observer costs a layer much more output error than min-max would."""


def weight_view(weight: torch.Tensor, cfg: TensorQuantConfig, name: str) -> torch.Tensor:
    """``weight`` as ``[rows, groups, group_len]``: one scale per (row, group).

    Row-major reshapes only, so the view flattens back to the weight's own layout.
    """
    w2 = weight.reshape(weight.shape[0], -1)
    if cfg.granularity == "per_tensor":
        return w2.reshape(1, 1, -1)
    cols = w2.shape[1]
    if cfg.granularity == "per_channel" or cfg.group_size >= cols:
        return w2.unsqueeze(1)
    if cols % cfg.group_size:
        divisor = max(d for d in range(1, cfg.group_size) if cols % d == 0)
        raise ConfigError(
            f"quant.weight.group_size={cfg.group_size} does not divide the {cols} input features of {name!r}; "
            f"use a divisor of {cols} (e.g. {divisor}), or set it for this layer alone: "
            f"{_layer_override(name, f'group_size: {divisor}')}"
        )
    return w2.reshape(w2.shape[0], cols // cfg.group_size, cfg.group_size)


def _layer_override(name: str, setting: str) -> str:
    """The command-line override giving layer ``name`` alone ``setting`` (e.g. ``group_size: 24``).

    ``++``: a plain ``quant.layers=...`` cannot add keys to the recipe's (struct) mapping. Hydra
    reads a dict key like ``0.1`` as a number, so such a name becomes a glob (``0?1``) instead.
    """
    if "." not in name:
        return f"'++quant.layers.{name}={{{setting}}}'"
    try:
        float(name)
        key = name.replace(".", "?")
    except ValueError:
        key = name
    return f"'++quant.layers={{{key}: {{{setting}}}}}'"


@dataclass
class QuantizedWeight:
    """A weight's frozen integer form: codes on ``grid`` with per-(row, group) scale and zero point."""

    codes: torch.Tensor  # int16, [rows, groups, group_len]
    scale: torch.Tensor  # float32 holding values exactly representable in the storage dtype
    zero_point: torch.Tensor  # int32, same shape as scale
    grid: Grid
    shape: torch.Size
    scale_dtype: str

    def dequantize(self) -> torch.Tensor:
        return dequantize(self.codes.float(), self.scale, self.zero_point).reshape(self.shape)

    @property
    def granularity_shape(self) -> tuple[int, int]:
        return tuple(self.scale.shape[:2])


def quantize_weight(weight: torch.Tensor, cfg: TensorQuantConfig, name: str) -> QuantizedWeight:
    grid = Grid(cfg.bits, cfg.symmetric)
    view = weight.detach().float()
    view = weight_view(view, cfg, name)
    rows, groups, length = view.shape
    lo, hi = weight_range(view.reshape(rows * groups, length), cfg, grid)
    scale, zero_point = qparams(lo.reshape(rows, groups, 1), hi.reshape(rows, groups, 1), grid)
    # Round the scale to its storage dtype now, so the exported artifact computes the same grid.
    scale = scale.to(SCALE_DTYPES[cfg.scale_dtype]).float()
    codes = quantize(view, scale, zero_point, grid).to(torch.int16)
    return QuantizedWeight(codes, scale, zero_point, grid, weight.shape, cfg.scale_dtype)


def sqnr_db(reference: torch.Tensor, approx: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio in dB (inf when exact)."""
    noise = (reference.float() - approx.float()).pow(2).sum().item()
    signal = reference.float().pow(2).sum().item()
    if noise == 0:
        return float("inf")
    return 10.0 * torch.log10(torch.tensor(signal / noise)).item() if signal > 0 else float("-inf")


class ActQuantizer(nn.Module):
    """Fake-quantizes a layer's input: static per-tensor qparams from calibration, or per-token dynamic.

    While ``observing`` it records ranges and passes data through in float, so calibration
    sees the float model's activations.
    """

    def __init__(self, cfg: TensorQuantConfig, feature_dim: int, name: str = ""):
        super().__init__()
        self.grid = Grid(cfg.bits, cfg.symmetric)
        self.dynamic = cfg.granularity == "per_token"
        self.feature_dim = feature_dim
        self.layer_name = name
        self.cfg = cfg
        self.register_buffer("scale", torch.ones(()))
        self.register_buffer("zero_point", torch.zeros((), dtype=torch.int32))
        self.observer: ActivationObserver | None = None
        self.choice: str | None = None  # observer=auto: the range it chose
        # After freeze: how many times min-max's output error the clipping observer's range causes, where that is
        # over CLIP_WARN_RATIO (it clips values that matter), else None; warn_clipping reports them all at once.
        self.clip_ratio: float | None = None

    def start_observing(self, seed: int = 0) -> None:
        if not self.dynamic:
            rows = TOKEN_ROWS if self.feature_dim == -1 else 0
            self.observer = ActivationObserver(self.cfg, self.grid, seed=seed, token_rows=rows)

    def freeze(self, consumer: torch.Tensor | None = None) -> None:
        """Fix the qparams from what was observed; ``consumer``: the weight this input feeds, if any."""
        if self.observer is None:
            return
        try:
            lo, hi = self.observer.range(consumer)
        except RuntimeError as exc:
            raise CalibrationError(f"{self.layer_name}: {exc} (no calibration batch reached this layer)") from None
        self.scale, self.zero_point = qparams(lo, hi, self.grid)
        self.choice = self.observer.choice
        ratio = self.observer.error_vs_minmax
        self.clip_ratio = ratio if ratio is not None and ratio > CLIP_WARN_RATIO else None
        self.observer = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.observer is not None:
            try:
                self.observer.update(x.detach())
            except ValueError as exc:
                raise CalibrationError(f"calibration input of layer {self.layer_name!r}: {exc}") from None
            return x
        if self.dynamic:
            lo, hi = torch.aminmax(x, dim=self.feature_dim, keepdim=True)
            scale, zero_point = qparams(lo, hi, self.grid)
            return fake_quantize(x, scale, zero_point, self.grid)
        return fake_quantize(x, self.scale, self.zero_point, self.grid)

    def extra_repr(self) -> str:
        kind = "per_token" if self.dynamic else "per_tensor"
        return f"bits={self.grid.bits}, symmetric={self.grid.symmetric}, {kind}"


def warn_clipping(acts: Iterable[ActQuantizer], worst: int = 3) -> None:
    """One :class:`ClippingWarning` for all the frozen quantizers in ``acts`` whose clipping observer costs their
    layer more than ``CLIP_WARN_RATIO`` x min-max's output error: how many, and the ``worst`` of them."""
    acts = list(acts)
    clipped = sorted((a for a in acts if a.clip_ratio is not None), key=lambda a: -a.clip_ratio)
    if not clipped:
        return
    observers = "/".join(sorted({a.cfg.observer for a in clipped}))
    named = ", ".join(f"{a.layer_name!r} {a.clip_ratio:.1f}x" for a in clipped[:worst])
    rest = f" and {len(clipped) - worst} more" if len(clipped) > worst else ""
    warnings.warn(f"quant.act.observer={observers} clips values that matter in {len(clipped)} of {len(acts)} "
                  f"quantized inputs: more than {CLIP_WARN_RATIO:g}x the output error of min-max in {named}{rest}; "
                  "observer=auto chooses per layer", ClippingWarning, stacklevel=2)
