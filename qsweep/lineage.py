"""A run's lineage in MLflow 3's terms: the images it was evaluated on (a dataset input, the runs table's
Dataset column) and the quantized model it produced (a logged model, the Models column)."""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from mlflow.entities import Dataset, DatasetInput, InputTag

EVAL_CONTEXT = "eval"
# What describes the quantized model itself: its logged model's metrics (on the evaluated images).
MODEL_METRICS = ("top1", "top5", "fp_top1", "delta_top1", "size_mb", "fp32_size_mb", "compression",
                 "avg_weight_bits", "score", "artifact_top1", "lab_score", "lab_top1", "lab_size_mb")
MODEL_TYPES = {"torch": "torch.export", "onnx": "onnx"}  # export.format -> the logged model's type


@dataclass(frozen=True)
class EvalData:
    """The evaluated images: name, a digest of the data and its preprocessing, where they come from, counts."""

    name: str
    digest: str
    source: str
    profile: dict = field(default_factory=dict)

    def input(self) -> DatasetInput:
        source_type = "local" if self.source.startswith("/") else "code"
        dataset = Dataset(self.name, self.digest, source_type, json.dumps({"uri": self.source}),
                          profile=json.dumps(self.profile))
        return DatasetInput(dataset, tags=[InputTag("mlflow.data.context", EVAL_CONTEXT)])


def eval_data(bundle, data_cfg, images: int) -> EvalData:
    """The test images a run evaluates: ``bundle``'s test split, the first ``data.max_eval_images`` if set.

    The digest hashes the bundle's fingerprint (data, preprocessing, split) and the image count, so two
    runs with the same digest were measured on the same images.
    """
    subset = data_cfg.get("test_set") or "test"
    name = f"{bundle.name}-{subset}" + (f"-first{images}" if data_cfg.get("max_eval_images") else "")
    digest = hashlib.sha256(f"{bundle.fingerprint}:{images}".encode()).hexdigest()[:16]
    root = data_cfg.get("root")
    source = str(Path(root).expanduser().resolve()) if root else f"qsweep.data.{bundle.name}"
    return EvalData(name, digest, source, {"images": images, "classes": bundle.num_classes,
                                           "input_shape": list(bundle.input_shape)})


def model_name(model: str, recipe: str) -> str:
    """The logged model's name: model and recipe, in the characters MLflow accepts in a name."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", f"{model}-{recipe}").strip("_") or "quantized"
