"""Per-layer quantization sensitivity: quantize one layer alone, measure what it costs.

For every quantizable layer (``nn.Linear`` / ``nn.Conv2d``, model order) the model is run
with **only that layer** quantized at ``w_bits`` / ``a_bits`` (the rest of the recipe, i.e.
granularity, symmetry, observers, group sizes, BN folding and calibration settings, is
kept; the recipe's ``skip`` and its per-layer ``w_bits`` / ``a_bits`` overrides are ignored,
since every layer is measured). Each result row is a plain dict:

=================  ==========================================================================
``name``           module name as in ``model.named_modules()``
``params``         number of weight elements of the layer (what ``w_bits`` applies to)
``w_bits``         weight bits used
``a_bits``         input-activation bits used (``None``: weights only)
``top1``           top-1 accuracy in percent with only this layer quantized
``drop``           FP top-1 minus ``top1``, in percentage points (positive = worse)
``output_sqnr_db`` SQNR in dB of the final logits vs the FP logits (``inf`` if identical)
``weight_sqnr_db`` SQNR in dB of the quantized weight vs the float weight
=================  ==========================================================================

The FP reference is the float model after the recipe's BN folding (numerically the model
itself). The output SQNR is measured on the first ``sqnr_images`` images of ``loader``
(whole batches; a fixed set as long as the loader is not shuffled).

How it stays cheap: every layer's quantized form is built once, and all activation
quantizers are calibrated in a single pass of the **float** model over the calibration
batches (each sees exactly the float inputs it would see were it the only quantized layer,
with the recipe's calibration seed), so each row costs one evaluation pass with that one
module swapped into a private copy of the model. The result equals quantizing that layer
alone with :func:`qsweep.quantize` (see ``tests/test_analysis.py``).

Cached as JSON in ``<cache_dir>/sensitivity/<key>.json``::

    {"schema": 1, "key": ..., "fp_top1": 97.1, "w_bits": 4, "a_bits": 8, "images": 450,
     "sqnr_images": 450, "rows": [{row}, ...]}

(Python's ``json``: an infinite SQNR is written as ``Infinity``.)
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import math
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypedDict

import torch
from omegaconf import DictConfig, OmegaConf
from torch import Tensor, nn
from tqdm.auto import tqdm

from qsweep.analysis.threads import torch_threads
from qsweep.config import quant_recipe
from qsweep.evaluate import model_fingerprint, top1_correct
from qsweep.files import atomic_write
from qsweep.quant.batches import call_model, device_of, to_device
from qsweep.quant.fold import fold_batchnorm
from qsweep.quant.modules import QuantLayer, quant_module_for
from qsweep.quant.plan import resolve_plan
from qsweep.quant.quantizer import CalibrationError, sqnr_db

log = logging.getLogger(__name__)

SCHEMA = 1
DEFAULT_SQNR_IMAGES = 1024


class SensitivityRow(TypedDict):
    name: str
    params: int
    w_bits: int
    a_bits: int | None
    top1: float
    drop: float
    output_sqnr_db: float
    weight_sqnr_db: float


def single_layer_recipe(recipe: Any, w_bits: int, a_bits: int | None) -> DictConfig:
    """``recipe`` with every quantizable layer planned at ``w_bits``/``a_bits`` (no skips)."""
    cfg = OmegaConf.to_container(quant_recipe(recipe), resolve=True)
    cfg["weight"]["bits"] = w_bits
    cfg["act"]["bits"] = a_bits
    cfg["skip"] = []
    layers = {}
    for pattern, override in (cfg.get("layers") or {}).items():
        kept = {k: v for k, v in override.items() if k not in ("w_bits", "a_bits")}
        if kept:
            layers[pattern] = kept
    cfg["layers"] = layers
    return quant_recipe(cfg)


def sensitivity_key(model: nn.Module, data_fingerprint: str, recipe_dict: Any, w_bits: int,
                    a_bits: int | None, extra: dict | None = None) -> str:
    """Cache key: hash of the model's weights, the data, the (validated) recipe and the widths.

    ``data_fingerprint`` must identify the calibration and evaluation data (including any
    eval subset); ``extra`` holds anything else that changes the result (e.g. ``sqnr_images``).
    """
    recipe = OmegaConf.to_container(quant_recipe(recipe_dict), resolve=True)
    blob = json.dumps({"schema": SCHEMA, "model": model_fingerprint(model), "data": data_fingerprint,
                       "recipe": recipe, "w_bits": w_bits, "a_bits": a_bits, "extra": extra or {}},
                      sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


class LayerSwapper:
    """A private float copy of a model plus each layer's calibrated quantized form, swappable one at a time.

    ``model`` itself is never modified. ``base`` is the copy (BN folded as the recipe says).
    """

    @torch.no_grad()
    def __init__(self, model: nn.Module, recipe: Any, calib_batches: Iterable[Any], w_bits: int = 4,
                 a_bits: int | None = 8, progress: bool = False):
        self.recipe = single_layer_recipe(recipe, w_bits, a_bits)
        batches = list(calib_batches)
        if not batches:
            raise CalibrationError("calibration got no batches: give at least one calibration batch")
        self.base = copy.deepcopy(model).eval()
        self.device = device_of(self.base)
        if self.recipe.fold_bn:
            fold_batchnorm(self.base, lambda: call_model(self.base, to_device(batches[0], self.device)))
        self.qlayers: dict[str, QuantLayer] = {
            name: quant_module_for(self.base.get_submodule(name), plan).to(self.device).eval()
            for name, plan in resolve_plan(self.base, self.recipe).items()
        }
        self._calibrate(batches, int(self.recipe.calib.seed), progress)

    def _calibrate(self, batches: list[Any], seed: int, progress: bool) -> None:
        """Observe every layer's float input in one pass of the float copy, then freeze."""
        acts = {name: q.act for name, q in self.qlayers.items() if q.act is not None}
        handles = []
        for name, act in acts.items():
            act.start_observing(seed=seed)  # the seed quantize() would give it as the only quantized layer
            if act.observer is None:  # dynamic (per-token): nothing to calibrate
                continue

            def observe(mod, args, act=act):
                act(args[0])  # observing: records and returns the input unchanged; we keep the original

            handles.append(self.base.get_submodule(name).register_forward_pre_hook(observe))
        seen = 0
        try:
            for batch in tqdm(batches, desc="calibrate", disable=not progress, leave=False):
                call_model(self.base, to_device(batch, self.device))
                seen += 1
        except CalibrationError as exc:
            raise CalibrationError(f"batch {seen}: {exc}") from None
        finally:
            for h in handles:
                h.remove()
        for act in acts.values():
            act.freeze()

    @contextmanager
    def quantized_only(self, name: str) -> Iterator[nn.Module]:
        """``base`` with only ``name`` quantized, for the duration of the ``with`` block."""
        original = self.base.get_submodule(name)
        self.base.set_submodule(name, self.qlayers[name])
        try:
            yield self.base
        finally:
            self.base.set_submodule(name, original)


@torch.no_grad()
def _eval_pass(model: nn.Module, loader: Iterable, device: torch.device, keep_images: int
               ) -> tuple[int, int, Tensor]:
    """(correct top-1, images, logits of the first >= ``keep_images`` images, whole batches); ``x`` of an
    ``(x, y)`` batch is the model's input as a calibration batch gives it (a tensor, or a dict of keywords)."""
    correct = images = kept = 0
    logits_kept = []
    for x, y in loader:
        y = y.to(device)
        logits = call_model(model, to_device(x, device))
        correct += top1_correct(logits, y)
        images += len(y)
        if kept < keep_images:
            logits_kept.append(logits.detach().float().cpu())
            kept += len(y)
    if images == 0:
        raise ValueError("the evaluation loader yielded no images")
    return correct, images, torch.cat(logits_kept)


def compute_sensitivity(model: nn.Module, recipe: Any, calib_batches: Iterable[Any], loader: Iterable,
                        num_classes: int, *, w_bits: int = 4, a_bits: int | None = 8,
                        sqnr_images: int = DEFAULT_SQNR_IMAGES, progress: bool = True,
                        num_threads: int | None = None) -> dict[str, Any]:
    """The uncached computation; returns the cache document (``rows`` plus metadata).

    ``num_threads``: torch intra-op threads while computing (None: unchanged); see
    :func:`qsweep.analysis.threads.torch_threads`.
    """
    with torch_threads(num_threads):
        return _compute(model, recipe, calib_batches, loader, num_classes, w_bits, a_bits, sqnr_images, progress)


def _compute(model: nn.Module, recipe: Any, calib_batches: Iterable[Any], loader: Iterable, num_classes: int,
             w_bits: int, a_bits: int | None, sqnr_images: int, progress: bool) -> dict[str, Any]:
    swapper = LayerSwapper(model, recipe, calib_batches, w_bits, a_bits, progress=progress)
    fp_correct, images, fp_logits = _eval_pass(swapper.base, loader, swapper.device, sqnr_images)
    if fp_logits.shape[-1] != num_classes:
        raise ValueError(f"the model outputs {fp_logits.shape[-1]} logits, expected num_classes={num_classes}")
    fp_top1 = 100.0 * fp_correct / images
    rows: list[SensitivityRow] = []
    for name, qlayer in tqdm(swapper.qlayers.items(), desc=f"sensitivity w{w_bits}a{a_bits}",
                             disable=not progress, leave=False):
        with swapper.quantized_only(name) as qmodel:
            correct, _, logits = _eval_pass(qmodel, loader, swapper.device, sqnr_images)
        top1 = 100.0 * correct / images
        rows.append(SensitivityRow(
            name=name,
            params=int(qlayer.weight.numel()),
            w_bits=qlayer.w_bits,
            a_bits=qlayer.a_bits,
            top1=top1,
            drop=fp_top1 - top1,
            output_sqnr_db=sqnr_db(fp_logits, logits),
            weight_sqnr_db=float(qlayer.weight_sqnr_db),
        ))
    return {"schema": SCHEMA, "fp_top1": fp_top1, "w_bits": w_bits, "a_bits": a_bits, "images": images,
            "sqnr_images": int(fp_logits.shape[0]), "rows": rows}


def cache_path(cache_dir: str | Path, key: str) -> Path:
    return Path(cache_dir) / "sensitivity" / f"{key}.json"


def _row_problem(row: Any) -> str | None:
    """Why ``row`` is not a measured sensitivity row, or None (an SQNR may be infinite, never NaN)."""
    if not isinstance(row, dict) or not isinstance(row.get("name"), str):
        return f"a row is {row!r}"
    numbers = {k: row.get(k) for k in ("top1", "drop", "output_sqnr_db", "weight_sqnr_db")}
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and not math.isnan(v) for v in numbers.values()):
        return f"row {row['name']!r} holds a missing or NaN value: {numbers}"
    if not (0 <= numbers["top1"] <= 100 and math.isfinite(numbers["drop"])):
        return f"row {row['name']!r} holds a top-1 outside [0, 100] or an infinite drop: {numbers}"
    return None


def _document_problem(doc: Any, key: str | None) -> str | None:
    """Why ``doc`` is not a trustworthy cache document for ``key``, or None."""
    if not isinstance(doc, dict) or doc.get("schema") != SCHEMA or not isinstance(doc.get("rows"), list):
        return f"not a schema-{SCHEMA} document with rows"
    if key is not None and doc.get("key") != key:
        return "it belongs to another model, data set or recipe"
    return next(filter(None, map(_row_problem, doc["rows"])), None)


def load_sensitivity(path: str | Path, key: str | None = None) -> dict[str, Any] | None:
    """The cached document at ``path`` (for ``key`` if given), or None if missing or not trustworthy.

    A document that is there but unreadable, of another schema or key, or holding NaN or
    out-of-range values is ignored with a warning, and so measured again.
    """
    path = Path(path)
    try:
        doc = json.loads(path.read_text())
        problem = _document_problem(doc, key)
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        problem = f"it is unreadable ({exc})"
    if problem:
        log.warning("ignoring the cached sensitivity %s: %s; measuring it again", path, problem)
        return None
    return doc


def sensitivity(model: nn.Module, recipe: Any, calib_batches: Iterable[Any], loader: Iterable,
                num_classes: int, cache_dir: str | Path | None, key: str | None, *, w_bits: int = 4,
                a_bits: int | None = 8, sqnr_images: int = DEFAULT_SQNR_IMAGES,
                progress: bool = True, num_threads: int | None = None) -> list[SensitivityRow]:
    """Per-layer sensitivity rows (see the module docstring), cached under ``cache_dir`` by ``key``.

    Build ``key`` with :func:`sensitivity_key` (pass ``extra={"sqnr_images": ...}`` if you
    change it). With ``cache_dir`` or ``key`` None nothing is cached.
    """
    path = cache_path(cache_dir, key) if cache_dir is not None and key is not None else None
    if path is not None:
        doc = load_sensitivity(path, key)
        if doc is not None:
            return doc["rows"]
    doc = compute_sensitivity(model, recipe, calib_batches, loader, num_classes, w_bits=w_bits, a_bits=a_bits,
                              sqnr_images=sqnr_images, progress=progress, num_threads=num_threads)
    if path is not None:
        doc["key"] = key
        atomic_write(path, lambda tmp: tmp.write_text(json.dumps(doc, indent=1)))
    return doc["rows"]


def fp_top1_of(rows: list[SensitivityRow]) -> float:
    """The FP reference accuracy the rows were measured against."""
    return rows[0]["top1"] + rows[0]["drop"] if rows else math.nan
