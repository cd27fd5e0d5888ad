"""qsweep: Hydra-configured post-training quantization sweeps for vision models."""

__version__ = "0.1.0"

from qsweep.quant import quantize  # noqa: E402

__all__ = ["quantize", "__version__"]
