"""The benchmark's W8A8 row again through qsweep's command line, on the same views as an image folder.

    .venv/bin/python experiments/realvision/cli_check.py DIR [--threads T] [--no-run]

Writes ``DIR/val/<class>/*.png`` (the evaluation views) and ``DIR/train/<class>/*.png`` (the
calibration views), where ``<class>`` is FP32's predicted ImageNet index, zero-padded (``007``)
so the folders sort numerically; then runs ``python -m qsweep ... data=imagefolder quant=w8a8``
and compares its top-1 with the same quantization done in-process. qsweep's image folder differs
from the benchmark in three ways, each bridged here without changing qsweep:

* labels: a class's label is its index among the folders present, and the model's classifier
  must have that many outputs (1000 folders would be needed for ImageNet indices). The checkpoint
  written here keeps only the classifier rows of the classes present, in folder order; top-1 is
  then the argmax over those classes, not over all 1000.
* preprocessing: the folder transform is a bilinear resize of the shorter side to 256, a center
  crop of 224 and ImageNet's mean/std; Lite0 wants bicubic and mean = std = 0.5. Each view is
  stored as its 256x256 image before timm's center crop (the resize is then the identity, so the
  interpolation does not matter), and the change of mean/std is folded into ``conv_stem`` and
  ``bn1`` of the checkpoint (exact except where TF-"same" padding pads the border with zeros).
* every class folder of both splits needs an image: the calibration views are dealt round robin
  over the classes, repeated when there are more classes than views (``quant.calib.num_images``
  = all of them, ``class_balanced=false``; W8A8's min-max ranges do not see repeats).

Prints and writes ``DIR/cli_check.json``: the CLI's FP32 and W8A8 top-1, the in-process top-1 of
the same checkpoint and recipe on the same calibration views (restricted to the same classes), and
the benchmark's 1000-class top-1 agreement on the same views.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch
from PIL import Image

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import bench_vision as bench  # noqa: E402
import lite0  # noqa: E402

import qsweep  # noqa: E402
from qsweep.config import shipped_recipe  # noqa: E402
from qsweep.data.cifar100 import IMAGENET_MEAN, IMAGENET_STD  # noqa: E402
from qsweep.data.imagefolder import folder_transform  # noqa: E402


def adapt(sd: dict[str, torch.Tensor], classes: list[int], mean, std) -> dict[str, torch.Tensor]:
    """Lite0's state dict for ImageNet-normalized input and a classifier over ``classes`` only.

    The model wants ``x = (p - mean) / std``; it gets ``x' = (p - m') / s'``, so ``x = a x' + b``
    per channel with ``a = s' / std``, ``b = (m' - mean) / std``: the stem's weights scale by
    ``a`` and its output shifts by ``sum(W b)``, absorbed into bn1's running mean.
    """
    out = dict(sd)
    a = torch.tensor(IMAGENET_STD) / torch.tensor(std)
    b = (torch.tensor(IMAGENET_MEAN) - torch.tensor(mean)) / torch.tensor(std)
    w = sd["conv_stem.weight"]
    out["conv_stem.weight"] = w * a.view(1, 3, 1, 1)
    out["bn1.running_mean"] = sd["bn1.running_mean"] - (w * b.view(1, 3, 1, 1)).sum((1, 2, 3))
    out["classifier.weight"] = sd["classifier.weight"][classes].clone()
    out["classifier.bias"] = sd["classifier.bias"][classes].clone()
    return out


def write_folder(root: Path, setup: bench.Setup, calib_images: list, classes: list[int]) -> int:
    """The image folder; returns the number of training files."""
    if root.exists():
        shutil.rmtree(root / "train", ignore_errors=True)
        shutil.rmtree(root / "val", ignore_errors=True)
    labels = setup.ref.argmax(1).tolist()
    for i, (image, label) in enumerate(zip(setup.views.images, labels)):
        path = root / "val" / f"{label:03d}" / f"{i:04d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        image.save(path)
    n = max(len(calib_images), len(classes))
    for j in range(n):
        path = root / "train" / f"{classes[j % len(classes)]:03d}" / f"{j:04d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        calib_images[j % len(calib_images)].save(path)
    return n


@torch.no_grad()
def restricted_top1(model, inputs: torch.Tensor, targets: torch.Tensor) -> float:
    out = torch.cat([model(inputs[i:i + bench.EVAL_BATCH]) for i in range(0, len(inputs), bench.EVAL_BATCH)])
    return 100 * (out.argmax(1) == targets).float().mean().item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("dir", type=Path)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--no-run", action="store_true", help="write the folder and checkpoint only")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    root = args.dir.resolve()
    setup, info = bench.prepare(None)
    calib_photos, _ = bench.photos.split(bench.photos.photos())
    calib_views = bench.photos.make_views(calib_photos, setup.fp)
    classes = sorted(set(setup.ref.argmax(1).tolist()))
    n_train = write_folder(root, setup, calib_views.images, classes)
    cfg = lite0.data_config(setup.fp)
    ckpt = lite0.save_safetensors(root / f"lite0_{len(classes)}classes.safetensors",
                                  adapt(lite0.state_dict(), classes, cfg["mean"], cfg["std"]))

    # The same pixels through qsweep's folder transform, and the adapted model in-process.
    transform = folder_transform()
    files = sorted((root / "val").glob("*/*.png"), key=lambda p: p.name)
    inputs = torch.stack([transform(Image.open(p).convert("RGB")) for p in files])
    targets = torch.tensor([classes.index(int(p.parent.name)) for p in files])
    calib = torch.stack([transform(im) for im in calib_views.images])
    model = lite0.load()
    model.reset_classifier(len(classes))
    model.load_state_dict(adapt(lite0.state_dict(), classes, cfg["mean"], cfg["std"]))
    model.eval()
    start = time.perf_counter()
    q = qsweep.quantize(model, shipped_recipe("w8a8"), list(calib.split(bench.CALIB_BATCH)))
    result = {"dir": str(root), "classes": len(classes), "val_images": len(files), "train_images": n_train,
              "checkpoint": str(ckpt),
              "pixels_max_abs_diff": (inputs * torch.tensor(IMAGENET_STD).view(3, 1, 1)
                                      + torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
                                      - (setup.views.inputs * torch.tensor(cfg["std"]).view(3, 1, 1)
                                         + torch.tensor(cfg["mean"]).view(3, 1, 1))).abs().max().item(),
              "api_fp32_top1": restricted_top1(model, inputs, targets),
              "api_w8a8_top1": restricted_top1(q, inputs, targets),
              "api_w8a8_seconds": round(time.perf_counter() - start, 1)}
    results = bench.HERE / "results.json"
    if results.exists():
        rows = {r["label"]: r for r in json.loads(results.read_text())}
        result["bench_w8a8_top1_agreement"] = rows.get("conf/quant w8a8", {}).get("top1_agreement")
    if not args.no_run:
        run_dir = root / "run"
        shutil.rmtree(run_dir, ignore_errors=True)
        cmd = [sys.executable, "-m", "qsweep", "model.name=tf_efficientnet_lite0", f"model.checkpoint={ckpt}",
               "data=imagefolder", f"data.root={root}", "quant=w8a8", f"quant.calib.num_images={n_train}",
               "quant.calib.class_balanced=false", "tracking.enabled=false", "name=realvision_cli_check",
               "progress=false", f"hydra.run.dir={run_dir}"]
        result["command"] = " ".join(cmd[3:])
        print("$ python -m qsweep", result["command"], flush=True)
        start = time.perf_counter()
        proc = subprocess.run(cmd, cwd=bench.ROOT, env={**os.environ, "OMP_NUM_THREADS": str(args.threads)})
        result["cli_seconds"] = round(time.perf_counter() - start, 1)
        if proc.returncode:
            result["cli_error"] = f"exit status {proc.returncode}"
        else:
            run = json.loads((run_dir / "result.json").read_text())
            metrics = run.get("metrics", run)
            result.update(cli_fp32_top1=metrics.get("fp_top1"), cli_w8a8_top1=metrics.get("top1"),
                          cli_artifact_top1=metrics.get("artifact_top1"), cli_size_mb=metrics.get("size_mb"))
    (root / "cli_check.json").write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
