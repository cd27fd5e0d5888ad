"""The lab's grader, reproduced: score any ``torch.export`` artifact on the CIFAR-100 mini test set.

    python -m qsweep.lab_eval ARTIFACT --data-root DIR [--per-class 5] [--image-size 224] [--limit N] [--json]
                             [--trust-artifact]

As the grader does: ``torch.export.load(path).module()`` on the CPU; the CIFAR-100 test split
walked in order keeping the first 5 images of each class (500, grouped by class), the lab's
eval transform, batch size 1; top-1 accuracy in percent; size = bytes / 1e6 of
``torch.save(module.state_dict())``; score = :func:`qsweep.score.lab4`. The time is the wall
time of the evaluation loop (data transform + forward passes).

Unlike the grader, an artifact that loading could make run code (pickled objects beyond tensor
data, code-carrying strings in the program) is refused unless ``--trust-artifact`` is given:
see :func:`qsweep.export.inspect_artifact`.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader, Subset
from tqdm.auto import tqdm

from qsweep.data.cifar100 import LAB_IMAGE_SIZE, LAB_PER_CLASS, cifar100_test_set
from qsweep.errors import QsweepError
from qsweep.evaluate import top1_correct
from qsweep.export import UntrustedArtifactError, load_program, state_dict_size_mb
from qsweep.report import format_table
from qsweep.score import lab4


class ArtifactError(QsweepError):
    """The artifact is missing or is not a ``torch.export`` program (the message names the file)."""


def load_artifact(path: str | Path, trust: bool = False) -> nn.Module:
    """``torch.export.load(path).module()``, with a clear error for a missing, foreign or unsafe file.

    Unless ``trust``, a file loading could make run code raises :class:`UntrustedArtifactError`.
    """
    path = Path(path)
    if not path.exists():
        raise ArtifactError(f"artifact {path} does not exist")
    if not path.is_file():
        raise ArtifactError(f"artifact {path} is not a file")
    try:
        return load_program(path, trust=trust)
    except UntrustedArtifactError:
        raise
    except Exception as exc:  # noqa: BLE001 - whatever torch.export.load trips on
        raise ArtifactError(
            f"{path} is not a torch.export program: torch.export.load failed ({type(exc).__name__}: "
            f"{str(exc).strip()[:300]}); the grader needs a file written by "
            "torch.export.save(torch.export.export(model, (example,)), path), not a torch.save checkpoint"
        ) from None


def _logits(out) -> torch.Tensor:
    if isinstance(out, (tuple, list)) and out:  # a model returning (logits, ...)
        out = out[0]
    if not isinstance(out, torch.Tensor) or out.ndim != 2:
        desc = f"a tensor of shape {tuple(out.shape)}" if isinstance(out, torch.Tensor) else type(out).__name__
        raise ArtifactError(f"the artifact returned {desc}; expected logits of shape [batch, classes]")
    return out


def _forward(model: nn.Module, x: torch.Tensor, first: bool):
    """The artifact on ``x``; on the first image, an input it was not exported for is an :class:`ArtifactError`."""
    if not first:
        return model(x)
    try:
        return model(x)
    except (AssertionError, RuntimeError, ValueError) as exc:  # export's input guards raise these
        reason = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else type(exc).__name__
        raise ArtifactError(f"the artifact does not accept the data's input of shape {tuple(x.shape)} ({reason}); "
                            "was it exported at another image size? (--image-size)") from None


def _int_arg(name: str, value, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise QsweepError(f"{name}={value!r} is not allowed; must be an integer >= {minimum}")
    return value


def lab_eval(path: str | Path, data_root: str | Path, per_class: int = LAB_PER_CLASS,
             image_size: int = LAB_IMAGE_SIZE, limit: int | None = None, progress: bool = True,
             trust: bool = False) -> dict:
    """Grade ``path`` as the lab does: ``{size_mb, acc, seconds, images, score}``.

    ``limit`` evaluates only the first N images of the mini set (a quick look; the score is then
    not the lab's). ``image_size`` other than 224 is for tests and small models. ``trust`` skips
    the check that refuses an artifact loading could make run code.
    """
    _int_arg("per_class", per_class)
    _int_arg("image_size", image_size)
    if limit is not None:
        _int_arg("limit", limit)
    model = load_artifact(path, trust)  # fail on the artifact before touching the data
    dataset = cifar100_test_set(data_root, "mini", per_class, image_size, key="--data-root",
                                per_class_key="--per-class")
    if limit is not None and limit < len(dataset):
        dataset = Subset(dataset, range(limit))
    size_mb = state_dict_size_mb(model)

    loader = DataLoader(dataset, batch_size=1, shuffle=False)
    correct = images = 0
    start = time.perf_counter()
    with torch.no_grad():
        for x, y in tqdm(loader, desc="lab eval", total=len(dataset), disable=not progress, leave=False):
            correct += top1_correct(_logits(_forward(model, x, images == 0)), y)
            images += int(y.numel())
    seconds = time.perf_counter() - start
    acc = 100.0 * correct / max(images, 1)
    return {"size_mb": size_mb, "acc": acc, "seconds": seconds, "images": images, "score": lab4(size_mb, acc)}


def result_table(result: dict, artifact: str | Path | None = None) -> str:
    rows = []
    if artifact is not None:
        rows.append(("artifact", str(artifact)))
    rows += [
        ("images", f"{result['images']}"),
        ("model size", f"{result['size_mb']:.3f} MB"),
        ("accuracy", f"{result['acc']:.2f} %"),
        ("execution time", f"{result['seconds']:.2f} s"),
        ("lab score", f"{result['score']:g}"),
    ]
    return format_table(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m qsweep.lab_eval",
        description="Score a torch.export artifact exactly as the lab grader does (CIFAR-100 mini test set, CPU, batch 1).",
    )
    parser.add_argument("artifact", help="a file written by torch.export.save")
    parser.add_argument("--data-root", required=True, help="directory holding cifar-100-python/{train,test,meta}")
    parser.add_argument("--per-class", type=int, default=LAB_PER_CLASS, help="test images per class (lab: 5)")
    parser.add_argument("--image-size", type=int, default=LAB_IMAGE_SIZE, help="eval resolution (lab: 224)")
    parser.add_argument("--limit", type=int, default=None, help="evaluate only the first N images")
    parser.add_argument("--json", action="store_true", help="print a JSON object instead of a table")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    parser.add_argument("--trust-artifact", action="store_true",
                        help="load the artifact even if it carries pickled objects or code-bearing strings "
                             "that loading would run (only for a file you trust)")
    args = parser.parse_args(argv)
    try:
        result = lab_eval(args.artifact, args.data_root, args.per_class, args.image_size, args.limit,
                          progress=not args.no_progress, trust=args.trust_artifact)
    except QsweepError as exc:
        print(f"lab_eval: error: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps({"artifact": str(args.artifact), **result}))
    else:
        print(result_table(result, args.artifact))
    return 0


if __name__ == "__main__":
    sys.exit(main())
