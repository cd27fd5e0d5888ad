"""Real photographs that ship offline, cut into deterministic 224x224 views for an ImageNet model.

Sources: scikit-image's colour sample photographs (``skimage.data``) and the photographic
wallpapers of a few Debian packages (``DEBIAN_PACKAGES``, found with ``dpkg -L``; drawings,
renders and abstract wallpapers are skipped by name in ``SKIP``). Photos are ordered by source
then path; every ``CALIB_EVERY``-th one calibrates, the others evaluate (split by photo).

A view is a square crop of the photo (``CROPS``: scale of the shorter side, position) or its
mirror image, put through timm's eval transform for the model: bicubic resize to 256, center
crop 224, to tensor, normalize. ``View.image`` keeps the 256x256 image before the center crop:
stored as PNG it reproduces the input exactly through any "resize shorter side to 256, center
crop 224" transform (the resize is then the identity).
"""

from __future__ import annotations

import subprocess
from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image, ImageOps

SKIMAGE = ("astronaut", "chelsea", "coffee", "rocket", "stereo_motorcycle")  # colour photographs only
DEBIAN_PACKAGES = ("plasma-workspace-wallpapers", "lomiri-wallpapers-16.04", "lomiri-wallpapers-20.04",
                   "mate-backgrounds")
# Not photographs (drawings, 3D renders, gradients, logos): a wallpaper folder or file stem.
SKIP = frozenset({
    # plasma-workspace-wallpapers
    "Altai", "Autumn", "Canopee", "Cascade", "Cluster", "Elarun", "Flow", "FlyingKonqui", "Honeywave",
    "IceCold", "Kay", "Kokkini", "MilkyWay", "Opal", "PastelHills", "Patak", "SafeLanding", "Shell", "Volna",
    # lomiri-wallpapers
    "analogpattern_by_Peter_Nerlich", "umang_by_Abhishek_Mudgal", "Fossa_by_Jasper_Roks",
    "Infinite-Sea_by_Aury88", "Painting-Colors_by__herobrine7gamer", "lomiri-default-background",
    "warty-final-ubuntu",
})
SKIP_DIRS = ("/mate/abstract/", "/mate/desktop/")  # mate-backgrounds: only mate/nature/ is photographs
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp")
MAX_SHORT_SIDE = 512  # photos are first downscaled to this shorter side (Lanczos)
# (scale of the shorter side, x position, y position in [0, 1] of the free range); each also mirrored.
CROPS = ((1.0, 0.5, 0.5), (0.75, 0.0, 0.5), (0.75, 1.0, 0.5),
         (0.55, 0.25, 0.25), (0.55, 0.75, 0.25), (0.55, 0.25, 0.75), (0.55, 0.75, 0.75))
CALIB_EVERY = 7


@dataclass(frozen=True)
class Photo:
    name: str  # "skimage:chelsea", "<package>:<path>"
    source: str  # skimage function name or file path

    def load(self) -> Image.Image:
        if self.name.startswith("skimage:"):
            import skimage.data

            array = getattr(skimage.data, self.source)()
            image = Image.fromarray(array[0] if isinstance(array, tuple) else array)  # stereo: the left view
        else:
            with Image.open(self.source) as f:
                image = f.convert("RGB")
        w, h = image.size
        if min(w, h) > MAX_SHORT_SIDE:
            f = MAX_SHORT_SIDE / min(w, h)
            image = image.resize((round(w * f), round(h * f)), Image.Resampling.LANCZOS)
        return image.convert("RGB")


@dataclass
class Views:
    """Model inputs ``[N, 3, 224, 224]``, their 256x256 images before the center crop, and names."""

    inputs: torch.Tensor
    images: list[Image.Image] = field(repr=False)
    names: list[str]
    photos: list[str]

    def batches(self, size: int) -> list[torch.Tensor]:
        return [self.inputs[i:i + size] for i in range(0, len(self.inputs), size)]


def package_files(package: str) -> list[str]:
    """The image files of an installed Debian package (``dpkg -L``), minus the non-photographs."""
    try:
        out = subprocess.run(["dpkg", "-L", package], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError) as exc:
        raise SystemExit(f"Debian package {package} is not installed ({exc}): make bench-vision installs it, "
                         f"or apt-get install -y {' '.join(DEBIAN_PACKAGES)}") from None
    files = sorted(p for p in out.splitlines() if p.lower().endswith(IMAGE_SUFFIXES) and "screenshot" not in p
                   and not any(d in p for d in SKIP_DIRS))
    if package.startswith("plasma"):  # one folder per wallpaper, each in many sizes: the largest
        by_dir: dict[str, list[str]] = {}
        for p in files:
            by_dir.setdefault(p.split("/contents/")[0], []).append(p)
        files = [max(ps, key=lambda p: _pixels(Path(p).stem)) for ps in by_dir.values()]
    return [p for p in files if Path(p).stem not in SKIP and Path(p.split("/contents/")[0]).name not in SKIP]


def _pixels(stem: str) -> int:
    w, _, h = stem.partition("x")
    return int(w) * int(h) if w.isdigit() and h.isdigit() else 0


def photos() -> list[Photo]:
    """Every photograph, in a fixed order."""
    out = [Photo(f"skimage:{n}", n) for n in SKIMAGE]
    for pkg in DEBIAN_PACKAGES:
        out += [Photo(f"{pkg}:{p}", p) for p in package_files(pkg)]
    return out


def split(all_photos: list[Photo]) -> tuple[list[Photo], list[Photo]]:
    """(calibration, evaluation): every ``CALIB_EVERY``-th photo calibrates, the rest evaluate."""
    calib = [p for i, p in enumerate(all_photos) if i % CALIB_EVERY == 0]
    return calib, [p for i, p in enumerate(all_photos) if i % CALIB_EVERY]


def crop_box(size: tuple[int, int], scale: float, fx: float, fy: float) -> tuple[int, int, int, int]:
    w, h = size
    side = round(scale * min(w, h))
    x, y = round(fx * (w - side)), round(fy * (h - side))
    return x, y, x + side, y + side


def eval_transform(model: torch.nn.Module):
    """(resize, rest): timm's eval transform for ``model`` split after its resize step."""
    import timm.data
    from torchvision import transforms as T

    t = timm.data.create_transform(**timm.data.resolve_data_config({}, model=model))
    resize, rest = t.transforms[0], t.transforms[1:]
    if not isinstance(resize, T.Resize) or not isinstance(rest[0], T.CenterCrop):
        raise RuntimeError(f"unexpected timm eval transform {t}")
    return resize, T.Compose(rest)


def make_views(photo_list: list[Photo], model: torch.nn.Module) -> Views:
    """Every crop of every photo, then each mirrored, through the model's eval transform."""
    resize, rest = eval_transform(model)
    images, names, owners = [], [], []
    for photo in photo_list:
        image = photo.load()
        for scale, fx, fy in CROPS:
            square = resize(image.crop(crop_box(image.size, scale, fx, fy)))
            for flip in (False, True):
                images.append(ImageOps.mirror(square) if flip else square)
                names.append(f"{photo.name}@{scale:g},{fx:g},{fy:g}{',flip' if flip else ''}")
                owners.append(photo.name)
    inputs = torch.stack([rest(im) for im in images]) if images else torch.empty(0, 3, 224, 224)
    return Views(inputs, images, names, owners)
