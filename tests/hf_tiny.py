"""Tiny Hugging Face models for the tests (random init, optionally trained briefly on digits)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

# The digits data: 1-channel 16x16 images, 10 classes.
VIT_KW = dict(image_size=16, patch_size=4, num_channels=1, hidden_size=32, num_hidden_layers=2,
              num_attention_heads=2, intermediate_size=64, num_labels=10)


def tiny_vit(kind: str = "vit", **overrides):
    """A random tiny ``ViTForImageClassification`` (or ``DeiTForImageClassification``) for digits."""
    import transformers

    config_cls, model_cls = {"vit": (transformers.ViTConfig, transformers.ViTForImageClassification),
                             "deit": (transformers.DeiTConfig, transformers.DeiTForImageClassification)}[kind]
    torch.manual_seed(0)
    return model_cls(config_cls(**{**VIT_KW, **overrides})).eval()


def train(model, bundle, epochs: int = 30, lr: float = 2e-3) -> None:
    """A few seconds of Adam on the digits train split (logits of an HF classifier).

    At lr 1e-2 the run is chaotic (32-91 % top-1 over init seeds), so another CPU's float rounding could
    land anywhere; at 2e-3 it ends at 83-91 % for every seed tried."""
    x, y = bundle.train.tensors
    gen = torch.Generator().manual_seed(0)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    model.train()
    for _ in range(epochs):
        for idx in torch.randperm(len(y), generator=gen).split(64):
            loss = F.cross_entropy(model(pixel_values=x[idx]).logits, y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.eval()
