"""The quantization core: grid, observers, quantizers, quantized modules, planning, calibration."""

from qsweep.quant.calibrate import calibrate, prepare
from qsweep.quant.modules import quant_layers
from qsweep.quant.pipeline import quantize

__all__ = ["calibrate", "prepare", "quant_layers", "quantize"]
