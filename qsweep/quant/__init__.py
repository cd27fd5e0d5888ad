"""The quantization core: grid, observers, quantizers, quantized modules, planning, calibration."""

from qsweep.quant.calibrate import calibrate, prepare, quant_layers, quantize

__all__ = ["calibrate", "prepare", "quant_layers", "quantize"]
