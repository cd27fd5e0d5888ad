"""CIFAR-100 in torchvision's on-disk layout, preprocessed exactly as the lab's grader does.

Layout: ``<root>/cifar-100-python/{train,test,meta}`` (the extracted ``cifar-100-python.tar.gz``).
The pickles are read here with an unpickler that only rebuilds numeric numpy arrays, checked
before numpy sees them, so a tampered data file can neither run code nor crash the process;
torchvision is used only to download (``data.download=true``).

Eval transform (the lab's): resize the 32x32 image to ``image_size`` (224) with bicubic
interpolation (crop ratio 1.0), center crop ``image_size``, ``ToTensor``, ImageNet mean/std.
It is applied per item, never materialized (10,000 images at 3x224x224 would be 6 GB).

Test sets: ``mini`` is the lab's: walk the test split in order, keep the first ``per_class``
(5) images of every class, grouped by class (class 0's five, then class 1's, ...): 500 images.
``full`` is the whole test split (10,000). Calibration draws from the train split only
(``bundle.train``, same transform, no augmentation).
"""

from __future__ import annotations

import hashlib
import io
import math
import pickle
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from qsweep.config import ConfigError
from qsweep.data.bundle import DataBundle
from qsweep.errors import QsweepError

NUM_CLASSES = 100
FOLDER = "cifar-100-python"
FILES = ("train", "test", "meta")
LAB_IMAGE_SIZE = 224
LAB_PER_CLASS = 5
TEST_SETS = ("mini", "full")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# Bump when the preprocessing below changes, so caches keyed on the fingerprint are invalidated.
PREPROCESS_VERSION = 1


class DataFileError(QsweepError):
    """A data file on disk is unreadable, malformed or refused (the message names the file)."""


def _positive_int(key: str, value, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ConfigError(f"{key}={value!r} is not allowed; must be an integer >= {minimum}")
    return int(value)


# --------------------------------------------------------------------------- safe unpickling
#
# The unpickler never calls numpy on the file's data: the numpy constructors a CIFAR pickle names
# only record their arguments (_Call), and _build turns the records into arrays after checking
# them. Calling numpy directly is not safe: ndarray(shape, dtype('O'), raw_bytes) makes an object
# array of raw pointers (reading it segfaults), and dtype.__setstate__ rewrites a dtype's layout.

_NUMERIC_KINDS = "biuf"  # bool, signed / unsigned integer, float
# Objects _build may visit in one file. A pickle can reference one object many times, so a few hundred
# bytes can describe a list that expands to 2**30 copies; the real train file holds ~150,000 objects.
MAX_NODES = 1_000_000


class _Call:
    """A numpy constructor call from the pickle, kept as data (``state`` from BUILD) until :func:`_build`."""

    def __init__(self, func: str, args: tuple):
        self.func, self.args, self.state = func, args, None

    def __setstate__(self, state):
        self.state = state


class _NdarrayClass:
    """``numpy.ndarray`` as a pickle names it: the class ``_reconstruct`` rebuilds, never called itself."""

    def __call__(self, *args):
        raise ValueError("it calls numpy.ndarray(...) directly, which CIFAR-100 files never do")


_NDARRAY = _NdarrayClass()


def _allowed_globals() -> dict[tuple[str, str], object]:
    """The only globals a CIFAR pickle may reference: numpy array/scalar reconstruction, as records."""
    import _codecs

    def record(func):
        return lambda *args: _Call(func, args)

    allowed: dict[tuple[str, str], object] = {
        ("numpy", "ndarray"): _NDARRAY,
        ("numpy", "dtype"): record("dtype"),
        # Python 3 pickles of ``bytes`` at protocol <= 2 go through _codecs.encode(str, "latin1").
        ("_codecs", "encode"): _codecs.encode,
    }
    # numpy >= 2 writes numpy._core, files written by numpy 1.x (the real ones) numpy.core.
    for package in ("numpy.core", "numpy._core"):
        allowed[(f"{package}.multiarray", "_reconstruct")] = record("reconstruct")
        allowed[(f"{package}.multiarray", "scalar")] = record("scalar")
        allowed[(f"{package}.numeric", "_frombuffer")] = record("frombuffer")  # protocol 5
    return allowed


class _ArrayUnpickler(pickle.Unpickler):
    """An unpickler that builds dicts, lists, strings, numbers and numpy records, nothing else."""

    def __init__(self, file, path: Path):
        super().__init__(file, encoding="bytes")
        self._path = path
        self._allowed = _allowed_globals()

    def find_class(self, module: str, name: str):
        obj = self._allowed.get((module, name))
        if obj is None:
            raise DataFileError(
                f"refusing to load {self._path}: it references {module}.{name}, which a CIFAR-100 "
                "data file never does (only numpy arrays, lists, strings and numbers are allowed); "
                "the file is not genuine CIFAR-100 data, do not use it"
            )
        return obj


def _text(value) -> str:
    return value.decode("ascii") if isinstance(value, bytes) else value


def _dtype(call) -> np.dtype:
    """A plain numeric dtype (bool, int, float) from a recorded ``numpy.dtype(code, align, copy)``."""
    if not isinstance(call, _Call) or call.func != "dtype" or not call.args:
        raise ValueError(f"an array's dtype is {type(call).__name__}, not a numpy.dtype")
    code = _text(call.args[0])
    state = call.state if call.state is not None else (3, "|", None, None, None)
    if not isinstance(code, str) or not isinstance(state, tuple) or len(state) < 5:
        raise ValueError(f"dtype {code!r} has an unreadable state {state!r}")
    byteorder, subarray, names, fields = _text(state[1]), state[2], state[3], state[4]
    dtype = np.dtype(code)
    if (dtype.kind not in _NUMERIC_KINDS or dtype.names is not None or dtype.subdtype is not None
            or (subarray, names, fields) != (None, None, None) or byteorder not in ("<", ">", "|", "=")):
        raise ValueError(f"dtype {code!r} (state {state!r}) is not a plain numeric dtype; only bool, integer "
                         "and float arrays are allowed (no object, structured or sub-array dtypes)")
    return dtype.newbyteorder(byteorder) if byteorder in "<>" else dtype


def _array(raw, dtype: np.dtype, shape, fortran: bool) -> np.ndarray:
    if not (isinstance(shape, tuple) and all(isinstance(n, int) and n >= 0 for n in shape)):
        raise ValueError(f"an array's shape is {shape!r}, not a tuple of sizes")
    if not isinstance(raw, (bytes, bytearray)):
        raise ValueError(f"an array's data is a {type(raw).__name__}, not bytes")
    expected = math.prod(shape) * dtype.itemsize
    if len(raw) != expected:
        raise ValueError(f"an array of shape {shape} and dtype {dtype} needs {expected} bytes, the file has {len(raw)}")
    flat = np.frombuffer(raw, dtype=dtype, count=math.prod(shape))
    return flat.reshape(shape, order="F" if fortran else "C").copy()


class _Budget:
    """Counts the objects :func:`_build` visits in ``path``; a file describing more than ``limit`` is refused."""

    def __init__(self, path: Path, limit: int = MAX_NODES):
        self.path, self.limit, self.left = path, limit, limit

    def spend(self) -> None:
        self.left -= 1
        if self.left < 0:
            raise DataFileError(f"refusing to load CIFAR-100 file {self.path}: it describes more than {self.limit} "
                                "objects (shared references expanding into copies), which no CIFAR-100 file does; "
                                "the file is not genuine CIFAR-100 data, do not use it")


def _build(obj, budget: _Budget):
    """``obj`` with every recorded numpy call replaced by the checked array or scalar it describes."""
    budget.spend()
    if isinstance(obj, dict):
        return {_build(k, budget): _build(v, budget) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_build(v, budget) for v in obj)
    if not isinstance(obj, _Call):
        return obj
    if obj.func == "reconstruct":  # numpy's ndarray.__reduce__: _reconstruct(ndarray, ...) then BUILD
        if not obj.args or obj.args[0] is not _NDARRAY:
            raise ValueError("_reconstruct rebuilds something other than numpy.ndarray")
        state = obj.state
        if isinstance(state, tuple) and len(state) == 5:
            state = state[1:]  # (version, shape, dtype, is_fortran, data)
        if not isinstance(state, tuple) or len(state) != 4:
            raise ValueError(f"an array's state is {type(state).__name__}, not (shape, dtype, is_fortran, data)")
        shape, dtype, fortran, raw = state
        return _array(raw, _dtype(dtype), shape, bool(fortran))
    if obj.func == "frombuffer" and len(obj.args) == 4:  # protocol 5: _frombuffer(buffer, dtype, shape, order)
        raw, dtype, shape, order = obj.args
        return _array(raw, _dtype(dtype), shape, _text(order) == "F")
    if obj.func == "scalar" and len(obj.args) == 2:  # a numpy scalar: scalar(dtype, raw bytes)
        return _array(obj.args[1], _dtype(obj.args[0]), (), False)[()]
    raise ValueError(f"numpy.{obj.func} is called in a way numpy never pickles it")


def read_cifar_pickle(path: str | Path) -> dict:
    """The dict in one CIFAR pickle (``train``, ``test`` or ``meta``), keys as bytes, safely."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise DataFileError(f"cannot read CIFAR-100 file {path}: {exc}") from None
    try:
        obj = _build(_ArrayUnpickler(io.BytesIO(raw), path).load(), _Budget(path))
    except DataFileError:
        raise
    except Exception as exc:  # noqa: BLE001 - any unpickling failure means a damaged file
        raise DataFileError(
            f"CIFAR-100 file {path} is corrupted or not a CIFAR pickle ({type(exc).__name__}: {exc}); "
            f"delete the {path.parent.name}/ folder and extract cifar-100-python.tar.gz again "
            "(or set data.download=true on a machine with internet)"
        ) from None
    if not isinstance(obj, dict):
        raise DataFileError(f"CIFAR-100 file {path} holds a {type(obj).__name__}, expected a dict")
    # Real files have bytes keys (pickled by Python 2); accept str keys too.
    return {(k.encode() if isinstance(k, str) else k): v for k, v in obj.items()}


def _label_problem(labels) -> str | None:
    """What makes ``labels`` other than integers, or None (int64 conversion would round floats silently)."""
    if isinstance(labels, np.ndarray):
        integral = labels.ndim == 1 and labels.dtype.kind in "iu"
        return None if integral else f"a {labels.dtype} array of shape {labels.shape}"
    if not isinstance(labels, (list, tuple)):
        return f"a {type(labels).__name__}"
    for v in labels:
        if not isinstance(v, (int, np.integer)) or isinstance(v, (bool, np.bool_)):
            return f"a list holding {v!r}"
    return None


def load_split(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """``(images uint8 [N, 3, 32, 32], fine labels int64 [N])`` from a ``train``/``test`` file."""
    path = Path(path)
    d = read_cifar_pickle(path)
    missing = [k.decode() for k in (b"data", b"fine_labels") if k not in d]
    if missing:
        raise DataFileError(f"CIFAR-100 file {path} lacks the key(s) {missing}; found {sorted(map(repr, d))}")
    data, labels = d[b"data"], d[b"fine_labels"]
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        desc = f"{data.dtype} {data.shape}" if isinstance(data, np.ndarray) else type(data).__name__
        raise DataFileError(f"CIFAR-100 file {path}: 'data' is {desc}, expected uint8 [N, 3072]")
    problem = _label_problem(labels)
    if problem:
        raise DataFileError(f"CIFAR-100 file {path}: 'fine_labels' is {problem}, expected a list of integers")
    try:
        labels = np.asarray(labels, dtype=np.int64).reshape(-1)
    except OverflowError:
        raise DataFileError(f"CIFAR-100 file {path}: 'fine_labels' holds an integer outside int64") from None
    if labels.shape[0] != data.shape[0]:
        raise DataFileError(f"CIFAR-100 file {path}: {data.shape[0]} images but {labels.shape[0]} labels")
    if labels.size and (labels.min() < 0 or labels.max() >= NUM_CLASSES):
        raise DataFileError(
            f"CIFAR-100 file {path}: fine labels range {labels.min()}..{labels.max()}, expected 0..{NUM_CLASSES - 1}"
        )
    # Each row is the R, G and B planes of a 32x32 image, each plane row-major.
    return data.reshape(-1, 3, 32, 32), labels


def load_class_names(path: str | Path) -> list[str]:
    """The 100 fine label names from the ``meta`` file."""
    path = Path(path)
    d = read_cifar_pickle(path)
    names = d.get(b"fine_label_names")
    if not isinstance(names, (list, tuple)) or len(names) != NUM_CLASSES:
        raise DataFileError(f"CIFAR-100 file {path}: expected {NUM_CLASSES} 'fine_label_names'")
    return [n.decode("utf-8", "replace") if isinstance(n, bytes) else str(n) for n in names]


# --------------------------------------------------------------------------- layout / download


def _layout_hint(root, key: str = "data.root") -> str:
    return (
        f"expected the extracted CIFAR-100 python version at {root}/{FOLDER}/{{train,test,meta}} "
        "(torchvision's layout: cifar-100-python.tar.gz unpacked into the root); "
        "to fetch it set data.download=true on a machine with internet, "
        f"or copy the folder there and point {key} at its parent"
    )


def find_folder(root, key: str = "data.root") -> Path | None:
    """The ``cifar-100-python`` folder under ``root`` (or ``root`` itself), or None if incomplete."""
    if root is None or str(root).strip() == "":
        raise ConfigError(
            f"{key}=None is not allowed; set {key} to the directory holding {FOLDER}/ "
            f"(e.g. {key}=~/data, with ~/data/{FOLDER}/{{train,test,meta}})"
        )
    root = Path(str(root)).expanduser()
    for folder in (root / FOLDER, root):
        if all((folder / f).is_file() for f in FILES):
            return folder
    return None


def _missing_error(root, key: str) -> ConfigError:
    folder = Path(str(root)).expanduser() / FOLDER
    present = [f for f in FILES if (folder / f).is_file()]
    missing = [f for f in FILES if f not in present]
    if not Path(str(root)).expanduser().is_dir():
        what = f"{root} does not exist"
    elif not folder.is_dir():
        what = f"{folder} does not exist"
    else:
        what = f"{folder} lacks {missing}"
    return ConfigError(f"{key}={root} is not allowed: {what}; {_layout_hint(root, key)}")


def _download(root) -> None:
    from torchvision.datasets import CIFAR100

    root = Path(str(root)).expanduser()
    root.mkdir(parents=True, exist_ok=True)
    try:
        CIFAR100(root=str(root), train=True, download=True)
        CIFAR100(root=str(root), train=False, download=True)
    except Exception as exc:  # noqa: BLE001 - network / disk failures
        raise ConfigError(
            f"data.download=true but downloading CIFAR-100 into data.root={root} failed "
            f"({type(exc).__name__}: {exc}); {_layout_hint(root)}"
        ) from None


def locate(root, download: bool = False, key: str = "data.root") -> Path:
    """The data folder, downloading through torchvision first if asked and missing."""
    folder = find_folder(root, key)
    if folder is None and download:
        _download(root)
        folder = find_folder(root, key)
    if folder is None:
        raise _missing_error(root, key)
    return folder


# --------------------------------------------------------------------------- transform / dataset


def lab_transform(image_size: int = LAB_IMAGE_SIZE):
    """The lab's eval transform: bicubic resize (crop ratio 1.0), center crop, ImageNet normalize."""
    from torchvision import transforms as T

    return T.Compose(
        [
            T.Resize(image_size, interpolation=T.InterpolationMode.BICUBIC),
            T.CenterCrop(image_size),
            T.ToTensor(),
            T.Normalize(IMAGENET_MEAN, IMAGENET_STD),
        ]
    )


class CifarImages(Dataset):
    """``(image[3, S, S] float32, label)`` over selected rows of a split, transformed per item."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, indices=None, transform=None):
        self.images = images  # uint8 [N, 3, 32, 32]
        self.all_labels = labels
        self.indices = np.arange(len(labels)) if indices is None else np.asarray(indices, dtype=np.int64)
        self.transform = transform if transform is not None else lab_transform()

    def __len__(self) -> int:
        return int(self.indices.shape[0])

    @property
    def labels(self) -> np.ndarray:
        """The labels of this dataset's items, in order."""
        return self.all_labels[self.indices]

    def raw(self, i: int) -> np.ndarray:
        """Item ``i`` as the stored uint8 image, HWC."""
        return np.ascontiguousarray(self.images[self.indices[i]].transpose(1, 2, 0))

    def __getitem__(self, i):
        return self.transform(Image.fromarray(self.raw(i))), int(self.all_labels[self.indices[i]])


def mini_test_indices(labels: np.ndarray, per_class: int = LAB_PER_CLASS, key: str = "data.per_class") -> np.ndarray:
    """The lab's mini test set: the first ``per_class`` indices of every class, grouped by class."""
    labels = np.asarray(labels).reshape(-1)
    out = []
    for c in range(NUM_CLASSES):
        members = np.flatnonzero(labels == c)[:per_class]
        if members.shape[0] < per_class:
            raise ConfigError(
                f"{key}={per_class} is not allowed; class {c} has only {members.shape[0]} test images"
            )
        out.append(members)
    return np.concatenate(out).astype(np.int64)


def _options(test_set: str, per_class: int, image_size: int) -> tuple[str, int, int]:
    if test_set not in TEST_SETS:
        raise ConfigError(f"data.test_set={test_set!r} is not allowed; choose one of {list(TEST_SETS)}")
    return test_set, _positive_int("data.per_class", per_class), _positive_int("data.image_size", image_size)


def cifar100_test_set(root, test_set: str = "mini", per_class: int = LAB_PER_CLASS,
                      image_size: int = LAB_IMAGE_SIZE, key: str = "data.root",
                      per_class_key: str = "data.per_class") -> CifarImages:
    """Only the evaluation set (reads the ``test`` file alone): what the grader evaluates on."""
    test_set, per_class, image_size = _options(test_set, per_class, image_size)
    folder = locate(root, False, key)
    images, labels = load_split(folder / "test")
    indices = mini_test_indices(labels, per_class, per_class_key) if test_set == "mini" else None
    return CifarImages(images, labels, indices, lab_transform(image_size))


def build_cifar100(cfg) -> DataBundle:
    """The CIFAR-100 bundle for ``cfg`` (a Cifar100DataConfig)."""
    test_set, per_class, image_size = _options(cfg.test_set, cfg.per_class, cfg.image_size)
    folder = locate(cfg.root, cfg.download)
    train_x, train_y = load_split(folder / "train")
    test_x, test_y = load_split(folder / "test")
    load_class_names(folder / "meta")  # validates the meta file
    indices = mini_test_indices(test_y, per_class) if test_set == "mini" else np.arange(len(test_y))
    transform = lab_transform(image_size)

    h = hashlib.sha256()
    for arr in (test_x[indices], test_y[indices], train_x, train_y):
        h.update(np.ascontiguousarray(arr).tobytes())
    fingerprint = (
        f"cifar100-v{PREPROCESS_VERSION}:root={folder.resolve()}:test_set={test_set}"
        + (f":per_class={per_class}" if test_set == "mini" else "")
        + f":size={image_size}:resize=bicubic:crop_pct=1.0:norm=imagenet:data={h.hexdigest()[:16]}"
    )
    return DataBundle(
        name="cifar100",
        train=CifarImages(train_x, train_y, None, transform),
        test=CifarImages(test_x, test_y, indices, transform),
        train_labels=torch.from_numpy(train_y.copy()).long(),
        num_classes=NUM_CLASSES,
        input_shape=(3, image_size, image_size),
        fingerprint=fingerprint,
    )
