"""The files of a Hugging Face folder, checked before transformers reads them.

transformers and safetensors fail on a damaged folder with their own exceptions, some deep inside
a load (a truncated file, a header whose offsets lie). These checks read only ``config.json``, the
weights index and each safetensors header, with bounded sizes, and turn every fault into one
:class:`CheckpointError` naming the file and what is wrong with it.
"""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path

from qsweep.models.checkpoint import CheckpointError

CONFIG_FILE = "config.json"
SAFETENSORS_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
MAX_JSON_BYTES = 16 * 2**20  # config.json and the index are a few KB; anything this big is not one
MAX_HEADER_BYTES = 100 * 2**20  # the safetensors format's own limit on its JSON header
# safetensors dtype -> bytes per element (the byte-sized types torch can load).
DTYPE_BYTES = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
               "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8, "C64": 8}


def _damaged(path: Path, what: str) -> CheckpointError:
    return CheckpointError(f"Hugging Face file {str(path)!r} {what}; re-save the model with "
                           "save_pretrained(..., safe_serialization=True) or copy the folder again")


def read_json(path: Path) -> dict:
    """The JSON object in ``path`` (at most :data:`MAX_JSON_BYTES`)."""
    try:
        size = path.stat().st_size
        if size > MAX_JSON_BYTES:
            raise _damaged(path, f"is {size} bytes, more than the {MAX_JSON_BYTES} a JSON file of a model holds")
        doc = json.loads(path.read_bytes())
    except OSError as exc:
        raise _damaged(path, f"cannot be read ({exc.strerror or exc})") from None
    except ValueError as exc:  # not UTF-8, not JSON
        raise _damaged(path, f"is not valid JSON ({exc})") from None
    if not isinstance(doc, dict):
        raise _damaged(path, f"holds a JSON {type(doc).__name__}, not an object")
    return doc


def check_config(folder: Path, known_types) -> None:
    """``config.json`` is a JSON object whose ``model_type`` transformers itself can build (no remote code)."""
    path = folder / CONFIG_FILE
    model_type = read_json(path).get("model_type")
    if not isinstance(model_type, str) or model_type not in known_types:
        raise CheckpointError(
            f"Hugging Face file {str(path)!r} has model_type={model_type!r}, which this transformers does not "
            "know: only the model's own remote code could build it, and qsweep never runs code from a model "
            "folder. Use a model type transformers ships (e.g. vit, deit, convnext), or upgrade transformers")


def _header(path: Path) -> tuple[dict, int]:
    """The JSON header of safetensors file ``path``, read within its stated bounds, and the data bytes after it."""
    size = path.stat().st_size
    if size < 8:
        raise _damaged(path, f"is {size} bytes, too short for a safetensors header (empty or cut short)")
    with open(path, "rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        if length > min(size - 8, MAX_HEADER_BYTES):
            raise _damaged(path, f"states a {length}-byte header but the file has {size - 8} bytes after its "
                                 f"length field (limit {MAX_HEADER_BYTES}): cut short or not safetensors")
        raw = f.read(length)
    try:
        header = json.loads(raw)
    except ValueError as exc:
        raise _damaged(path, f"has a header that is not JSON ({exc}): cut short or not safetensors") from None
    if not isinstance(header, dict):
        raise _damaged(path, "has a header that is not a JSON object")
    return header, size - 8 - length


def _extent(path: Path, name: str, entry) -> tuple[int, int]:
    """The ``[begin, end)`` data bytes of tensor ``name``, checked against its dtype and shape."""
    if not isinstance(entry, dict):
        raise _damaged(path, f"describes tensor {name!r} as {entry!r}, not {{dtype, shape, data_offsets}}")
    dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if dtype not in DTYPE_BYTES:
        raise _damaged(path, f"gives tensor {name!r} the dtype {dtype!r}; known: {', '.join(DTYPE_BYTES)}")
    if not isinstance(shape, list) or not all(isinstance(n, int) and not isinstance(n, bool) and n >= 0
                                              for n in shape):
        raise _damaged(path, f"gives tensor {name!r} the shape {shape!r}, not a list of sizes")
    if (not isinstance(offsets, list) or len(offsets) != 2
            or not all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in offsets)):
        raise _damaged(path, f"gives tensor {name!r} the data_offsets {offsets!r}, not [begin, end]")
    begin, end = offsets
    if end - begin != math.prod(shape) * DTYPE_BYTES[dtype]:
        raise _damaged(path, f"gives tensor {name!r} {end - begin} bytes (offsets {offsets}) but its shape "
                             f"{shape} of {dtype} needs {math.prod(shape) * DTYPE_BYTES[dtype]}")
    return begin, end


def check_safetensors(path: Path) -> set[str]:
    """The tensor names of safetensors file ``path``, after checking that its header tells the truth.

    The tensors' byte ranges must tile the data after the header exactly, as the format requires:
    no overlap, no gap, nothing past the end of the file.
    """
    try:
        header, data = _header(path)
    except OSError as exc:
        raise _damaged(path, f"cannot be read ({exc.strerror or exc})") from None
    header.pop("__metadata__", None)
    extents = sorted((_extent(path, name, entry), name) for name, entry in header.items())
    position = 0
    for (begin, end), name in extents:
        if begin != position:
            raise _damaged(path, f"places tensor {name!r} at bytes {begin}..{end} where {position} was expected "
                                 "(overlapping or missing data): its header lies")
        position = end
    if position != data:
        raise _damaged(path, f"holds {data} data bytes but its header describes {position}: cut short or padded")
    if not header:
        raise _damaged(path, "holds no tensors")
    return set(header)


def _shards(folder: Path) -> dict[str, set[str]]:
    """The index's ``weight_map`` as shard file -> tensor names; every shard a safetensors file in ``folder``."""
    path = folder / INDEX_FILE
    weight_map = read_json(path).get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise _damaged(path, "has no weight_map (tensor name -> shard file)")
    shards: dict[str, set[str]] = {}
    for tensor, shard in weight_map.items():
        if (not isinstance(shard, str) or "/" in shard or "\\" in shard or shard in (".", "..")
                or not shard.endswith(".safetensors")):
            raise _damaged(path, f"maps tensor {tensor!r} to {shard!r}; every shard must be a .safetensors file "
                                 "in the same folder (pickled shards are never read)")
        shards.setdefault(shard, set()).add(tensor)
    return shards


def check_weights(folder: Path) -> None:
    """``model.safetensors``, or every shard the index names, is a sound safetensors file."""
    if (folder / SAFETENSORS_FILE).is_file():
        check_safetensors(folder / SAFETENSORS_FILE)
        return
    for shard, tensors in _shards(folder).items():
        path = folder / shard
        if not path.is_file():
            raise _damaged(folder / INDEX_FILE, f"names the shard {shard!r}, which is not in the folder")
        absent = sorted(tensors - check_safetensors(path))
        if absent:
            raise _damaged(folder / INDEX_FILE, f"puts {len(absent)} tensor(s) in {shard!r} that it does not hold, "
                                                f"e.g. {absent[0]!r}")
