"""Any class-per-folder image set (e.g. Imagenette): ``<root>/train/<class>/*`` + ``<root>/val/<class>/*``.

``test/`` is accepted in place of ``val/``. Both splits must have the same class folders; the
label of a class is its index in the sorted folder names (torchvision's ``ImageFolder``).

Eval transform (the usual ImageNet one): bilinear resize of the shorter side to
``floor(image_size / 0.875)`` (256 for 224), center crop ``image_size``, ``ToTensor``,
ImageNet mean/std. Any aspect ratio works with this resize-then-crop, so non-square images
are fine; an aspect ratio beyond 4:1 is refused (naming the file), since a crop of the
middle of such an image is not what the model was trained on and it is almost always a
stray file (a banner, a strip); so is a header declaring more pixels than PIL's bomb limit.
Images must be 3-channel RGB: grayscale (``L``), ``RGBA``, ``CMYK``, palette (``P``) ... are
refused naming the file and mode, unless ``data.convert_rgb=true`` converts them on load. The
first few files of every class are checked up front (header only, cheap); every image is
checked again when it is loaded.
Symlinks are followed once: a link that cannot be opened, or a folder reached twice (a loop
such as ``val/b/up -> val``), is refused before the folders are indexed, and the index must hold
exactly the image files found. Calibration draws from ``train/`` with the same transform.
"""

from __future__ import annotations

import hashlib
import math
import os
from pathlib import Path

import torch
from PIL import Image, UnidentifiedImageError
from torchvision.datasets.folder import IMG_EXTENSIONS, has_file_allowed_extension

from qsweep.config import ConfigError
from qsweep.data.bundle import DataBundle
from qsweep.data.cifar100 import IMAGENET_MEAN, IMAGENET_STD, DataFileError

IMAGE_SIZE = 224
CROP_PCT = 0.875  # resize to image_size / CROP_PCT before the center crop: 256 for 224
MAX_ASPECT = 4.0
CHECK_PER_CLASS = 5  # files per class (per split) checked when the bundle is built
EVAL_SPLITS = ("val", "test")
PREPROCESS_VERSION = 1
# How a file that is not a usable image fails in PIL (DecompressionBombError: a header declaring more than
# twice Image.MAX_IMAGE_PIXELS; check_image refuses anything over it once).
READ_ERRORS = (OSError, UnidentifiedImageError, ValueError, Image.DecompressionBombError)


def _layout(root) -> str:
    return (
        f"expected {root}/train/<class>/<image> and {root}/val/<class>/<image> (or test/ instead of "
        "val/), the same class folders in both, images .jpg/.jpeg/.png/.bmp/.webp/... "
        "(e.g. Imagenette extracted: imagenette2-320/{train,val})"
    )


def folder_transform(image_size: int = IMAGE_SIZE, crop_pct: float = CROP_PCT):
    """Bilinear resize of the shorter side to ``floor(image_size / crop_pct)``, center crop, normalize."""
    from torchvision import transforms as T

    return T.Compose(
        [
            T.Resize(math.floor(image_size / crop_pct), interpolation=T.InterpolationMode.BILINEAR),
            T.CenterCrop(image_size),
            T.ToTensor(),
            T.Normalize(IMAGENET_MEAN, IMAGENET_STD),
        ]
    )


def check_image(image: Image.Image, path, convert_rgb: bool = False) -> None:
    """Raise :class:`DataFileError` naming ``path`` if ``image`` is not usable as model input."""
    w, h = image.size
    if w * h > Image.MAX_IMAGE_PIXELS:
        raise DataFileError(f"image {path} declares {w}x{h} = {w * h} pixels, more than PIL's limit of "
                            f"{Image.MAX_IMAGE_PIXELS} (a decompression bomb or a damaged header); remove this file")
    if min(w, h) < 1 or max(w, h) > MAX_ASPECT * min(w, h):
        raise DataFileError(
            f"image {path} is {w}x{h} (aspect ratio {max(w, h) / max(min(w, h), 1):.1f}:1); images may be "
            f"any shape up to {MAX_ASPECT:g}:1 (resized, then center-cropped), remove or crop this file"
        )
    if image.mode != "RGB" and not convert_rgb:
        bands = len(image.getbands())
        raise DataFileError(
            f"image {path} has mode {image.mode!r} ({bands} channel{'s' if bands != 1 else ''}); the model "
            "needs 3-channel RGB images: convert the file, or set data.convert_rgb=true to convert on load"
        )


class RGBLoader:
    """``ImageFolder`` loader: opens the image, checks it, returns it as RGB (picklable)."""

    def __init__(self, convert_rgb: bool = False):
        self.convert_rgb = bool(convert_rgb)

    def __call__(self, path: str) -> Image.Image:
        try:
            with open(path, "rb") as f:
                image = Image.open(f)
                check_image(image, path, self.convert_rgb)
                image.load()
        except DataFileError:
            raise
        except READ_ERRORS as exc:
            raise DataFileError(f"cannot read image {path} ({type(exc).__name__}: {exc})") from None
        return image if image.mode == "RGB" else image.convert("RGB")


def _check_header(path: str, convert_rgb: bool) -> None:
    try:
        with Image.open(path) as image:  # reads the header only
            check_image(image, path, convert_rgb)
    except DataFileError:
        raise
    except READ_ERRORS as exc:
        raise DataFileError(f"cannot read image {path} ({type(exc).__name__}: {exc})") from None


def _entries(folder: Path) -> list[os.DirEntry]:
    try:
        with os.scandir(folder) as it:
            return list(it)
    except OSError as exc:
        raise DataFileError(f"image folder {folder} cannot be listed ({exc.strerror or exc})") from None


def _is_folder(entry: os.DirEntry) -> bool:
    try:
        return entry.is_dir()
    except OSError:  # a link to itself: not a folder (os.walk's view); _check_file names it if it is an image
        return False


def _check_file(path: str) -> None:
    """An image file (or the link naming it) must lead to a regular file: not itself, not nowhere."""
    try:
        is_file = os.path.isfile(os.path.realpath(path, strict=True))
    except OSError as exc:
        raise DataFileError(f"image {path} cannot be opened ({exc.strerror or exc}): a symlink to itself, a "
                            "symlink loop or a broken link; remove it") from None
    if not is_file:
        raise DataFileError(f"image {path} is not a regular file; remove it")


def _count_images(split_dir: Path) -> int:
    """The image files under ``split_dir``'s class folders, each folder read once.

    torchvision's ImageFolder follows folder links without noticing loops (``val/b/up -> val`` is
    indexed again and again, up to the kernel's link limit): a folder reached twice is refused here,
    before it walks, naming the link.
    """
    seen = {os.path.realpath(split_dir)}
    stack = [Path(e.path) for e in _entries(split_dir) if _is_folder(e)]
    count = 0
    while stack:
        folder = stack.pop()
        real = os.path.realpath(folder)
        if real in seen:
            raise DataFileError(f"image folder {folder} leads to {real}, which is already read (a symlink loop or "
                                "a second link to the same images); remove the link")
        seen.add(real)
        for entry in _entries(folder):
            if _is_folder(entry):
                stack.append(Path(entry.path))
            elif has_file_allowed_extension(entry.name, IMG_EXTENSIONS):
                _check_file(entry.path)
                count += 1
    return count


def _classes(split_dir: Path) -> list[str]:
    return sorted(e.name for e in _entries(split_dir) if _is_folder(e))


def _split_dirs(root) -> tuple[Path, Path]:
    if root is None or str(root).strip() == "":
        raise ConfigError(f"data.root=None is not allowed; set data.root to the image folder; {_layout('<root>')}")
    base = Path(str(root)).expanduser()
    if not base.is_dir():
        raise ConfigError(f"data.root={root} is not allowed: {base} is not a directory; {_layout(root)}")
    train = base / "train"
    evals = [base / s for s in EVAL_SPLITS if (base / s).is_dir()]
    missing = ([] if train.is_dir() else ["train/"]) + ([] if evals else ["val/ (or test/)"])
    if missing:
        raise ConfigError(f"data.root={root} is not allowed: {base} has no {' and no '.join(missing)}; {_layout(root)}")
    return train, evals[0]


def _dataset(split_dir: Path, transform, loader):
    from torchvision.datasets import ImageFolder

    images = _count_images(split_dir)
    try:
        ds = ImageFolder(str(split_dir), transform=transform, loader=loader)
    except FileNotFoundError as exc:  # no class folders, or a class folder without images
        raise ConfigError(f"data.root: {split_dir} is not a usable split ({exc}); {_layout(split_dir.parent)}") from None
    if len(ds.samples) != images:  # the index must be the files on disk, each once
        raise DataFileError(f"image folder {split_dir} holds {images} image files but {len(ds.samples)} were "
                            "indexed; check it for links or files changing while qsweep reads it")
    return ds


def _check_headers(ds, convert_rgb: bool) -> None:
    """Read the header of the first few files of each class: a bad file fails now, not mid-evaluation."""
    seen: dict[int, int] = {}
    for path, label in ds.samples:
        if seen.get(label, 0) < CHECK_PER_CLASS:
            seen[label] = seen.get(label, 0) + 1
            _check_header(path, convert_rgb)


def _files_hash(base: Path, *datasets) -> str:
    """Every file's path, label and size: adding, moving or replacing an image changes it."""
    h = hashlib.sha256()
    for ds in datasets:
        for path, label in ds.samples:
            h.update(f"{os.path.relpath(path, base)}\0{label}\0{os.path.getsize(path)}\n".encode())
    return h.hexdigest()[:16]


def build_imagefolder(cfg) -> DataBundle:
    """The image-folder bundle for ``cfg`` (an ImageFolderDataConfig)."""
    root, image_size, convert_rgb = cfg.root, cfg.image_size, cfg.convert_rgb
    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1:
        raise ConfigError(f"data.image_size={image_size!r} is not allowed; must be an integer >= 1")
    train_dir, eval_dir = _split_dirs(root)

    train_classes, eval_classes = _classes(train_dir), _classes(eval_dir)
    if train_classes != eval_classes:
        only_train = sorted(set(train_classes) - set(eval_classes))
        only_eval = sorted(set(eval_classes) - set(train_classes))
        raise ConfigError(
            f"data.root={root} is not allowed: the class folders of {train_dir} ({len(train_classes)}) and "
            f"{eval_dir} ({len(eval_classes)}) differ: only in {train_dir.name}/: {only_train}, "
            f"only in {eval_dir.name}/: {only_eval}; both splits need the same class folders"
        )
    if not train_classes:
        raise ConfigError(f"data.root={root} is not allowed: {train_dir} has no class folders; {_layout(root)}")

    transform = folder_transform(image_size)
    loader = RGBLoader(convert_rgb)
    train = _dataset(train_dir, transform, loader)
    test = _dataset(eval_dir, transform, loader)
    for ds in (train, test):
        _check_headers(ds, convert_rgb)
    base = Path(str(root)).expanduser().resolve()
    fingerprint = (
        f"imagefolder-v{PREPROCESS_VERSION}:root={base}:eval={eval_dir.name}:classes={len(train_classes)}"
        f":size={image_size}:resize={math.floor(image_size / CROP_PCT)}:bilinear:norm=imagenet"
        f":rgb={'convert' if convert_rgb else 'strict'}:files={_files_hash(base, train, test)}"
    )
    return DataBundle(
        name="imagefolder",
        train=train,
        test=test,
        train_labels=torch.tensor(train.targets, dtype=torch.long),
        num_classes=len(train_classes),
        input_shape=(3, image_size, image_size),
        fingerprint=fingerprint,
    )
