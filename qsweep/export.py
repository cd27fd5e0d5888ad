"""Export a quantized model as a ``torch.export`` program with bit-packed weights, and measure it."""

from __future__ import annotations

import ast
import builtins
import copy
import functools
import io
import json
import math
import os
import pickletools
import tempfile
import zipfile
from collections import OrderedDict
from pathlib import Path
from typing import NamedTuple, NoReturn

import torch
from torch import nn
from torch.export import Dim
from torch.export.pt2_archive import constants as pt2

from qsweep.errors import QsweepError
from qsweep.files import OutputError, atomic_write, ensure_space
from qsweep.quant.embedding import quant_embeddings
from qsweep.quant.modules import quant_layers
from qsweep.quant.intexport import int_artifact_layers
from qsweep.quant.packed import PackedWeight

_GUARDS = "_guards_fn"  # the submodule torch.export's loader adds to check the inputs


class WeightInfo(NamedTuple):
    """What a packed layer's ``weight`` still tells the model code around it: dtype, shape, device."""

    dtype: torch.dtype
    shape: tuple[int, ...]
    device: torch.device


KERNELS = ("fake", "int")


def artifact_form(qmodel: nn.Module, kernels: str = "fake") -> nn.Module:
    """A copy of ``qmodel`` whose quantized weights live in packed integer buffers.

    ``kernels="fake"``: every layer dequantizes its weight and runs the float op (portable: any
    backend ``torch.export`` targets). ``"int"``: the layers the integer backend runs compute
    with ``torch._int_mm`` exactly as :func:`~qsweep.quant.intkernel.to_int_backend` does
    (:mod:`qsweep.quant.intexport`), the others (its fallbacks) as with ``"fake"``.

    Every tensor the forward reads is a persistent parameter or buffer, so the grader's size
    (``torch.save(state_dict)``) counts all of it: nothing hides as an exported constant.
    """
    if kernels not in KERNELS:
        raise ValueError(f"kernels={kernels!r}; choose one of {list(KERNELS)}")
    if kernels == "int":
        qmodel, _ = int_artifact_layers(qmodel)
    model = copy.deepcopy(qmodel).cpu().eval()
    for layer in quant_layers(model).values():
        weight = layer.weight
        del layer._buffers["weight"]
        if layer.qweight is not None:
            layer.packed = PackedWeight(layer.qweight)
            layer.qweight = None
            # No tensor (nothing to count or export), but some forwards read layer.weight.dtype (HF ViT).
            layer.weight = WeightInfo(weight.dtype, tuple(weight.shape), weight.device)
        else:
            layer.register_buffer("weight", weight)  # float weight: persistent, counted
    for table in quant_embeddings(model).values():
        del table._buffers["weight"]
        table.packed, table.qweight = PackedWeight(table.qweight), None
    return model


def export_artifact(qmodel: nn.Module, example: torch.Tensor, max_batch: int | None = None,
                    kernels: str = "fake") -> torch.export.ExportedProgram:
    """The artifact form traced by ``torch.export``, dynamic in the batch dimension (up to ``max_batch``)."""
    model = artifact_form(qmodel, kernels)
    # Two examples: a batch of 1 would let export specialize the batch dimension to a constant.
    example = example[:1].cpu().expand(2, *example.shape[1:]).contiguous()
    with torch.no_grad():
        return torch.export.export(model, (example,), dynamic_shapes=({0: Dim("batch", min=1, max=max_batch)},))


def export_program(qmodel: nn.Module, example: torch.Tensor, path: str | Path, kernels: str = "fake") -> Path:
    """Save the artifact form with ``torch.export.save``; the batch dimension is dynamic.

    The disk must hold the weights' size first; the file appears under ``path`` only once complete.
    The archive is built in memory and written by Python: torch's own file writer, once a write
    failed (disk full, file-size limit), throws again when it is destroyed and aborts the process.
    """
    path = Path(path)
    ensure_space(path, artifact_size_mb(qmodel, kernels))
    program = export_artifact(qmodel, example, kernels=kernels)
    archive = io.BytesIO()
    torch.export.save(program, archive)
    return atomic_write(path, lambda tmp: tmp.write_bytes(archive.getbuffer()))


def export_pte(qmodel: nn.Module, example: torch.Tensor, path: str | Path, max_batch: int = 16) -> Path:
    """An ExecuTorch ``.pte`` of the artifact form (needs the optional ``executorch`` package).

    ExecuTorch plans memory ahead of time, so the batch dimension is bounded by ``max_batch``.
    """
    try:
        from executorch.exir import to_edge_transform_and_lower
    except ImportError as exc:
        raise QsweepError("export.pte=true needs ExecuTorch: pip install -e '.[executorch]'") from exc
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    program = to_edge_transform_and_lower(export_artifact(qmodel, example, max_batch)).to_executorch()
    ensure_space(path, len(program.buffer) / 2**20)
    return atomic_write(path, lambda tmp: tmp.write_bytes(program.buffer))


def load_program(path: str | Path, trust: bool = False) -> nn.Module:
    """Load an artifact exactly as the lab grader does.

    ``torch.export.load`` can run code a crafted file carries, so unless ``trust`` the file is
    first checked by :func:`inspect_artifact` (every artifact qsweep writes passes).
    """
    if not trust:
        inspect_artifact(path)
    return torch.export.load(str(path)).module()


def state_dict_size_mb(module: nn.Module | dict) -> float:
    """The grader's size: bytes / 1e6 of ``torch.save(module.state_dict())`` written to a file."""
    fd, tmp = tempfile.mkstemp(suffix=".pth")
    os.close(fd)
    try:
        torch.save(module.state_dict() if isinstance(module, nn.Module) else module, tmp)
        return os.path.getsize(tmp) / 1e6
    except (OSError, RuntimeError) as exc:  # a full disk surfaces as a C++ stream error
        raise OutputError(f"cannot measure the artifact's size: writing {tmp} failed ({exc}); free space in "
                          f"{tempfile.gettempdir()} or point TMPDIR elsewhere") from None
    finally:
        os.unlink(tmp)


class _LoadedModule:
    """A module of a loaded program: its own parameters and buffers, and its children, in creation order."""

    def __init__(self) -> None:
        self.params: list[str] = []
        self.buffers: list[str] = []
        self.children: dict[str, _LoadedModule] = {}

    def add(self, path: list[str], kind: str, full: str) -> None:
        node = self
        for part in path[:-1]:
            node = node.children.setdefault(part, _LoadedModule())
        (node.params if kind == "param" else node.buffers).append(full)

    def walk(self, prefix: str = ""):
        """``(module name, its own tensor names)`` in ``state_dict``'s order."""
        yield prefix.rstrip("."), self.params + self.buffers
        for name, child in self.children.items():
            yield from child.walk(f"{prefix}{name}.")


def loaded_state_dict(form: nn.Module) -> OrderedDict:
    """``form``'s state dict in the order, and with the metadata, of its exported program once loaded.

    ``torch.save``'s zip aligns every tensor record to 64 bytes, so the file's size depends on the order
    of the tensors, not only on their bytes. ``torch.export.load(path).module()`` (torch 2.14,
    ``torch.export._unlift``) assigns the parameters in ``named_parameters`` order, then the buffers in
    ``named_buffers`` order, each creating the submodules on its path; its state dict then lists each
    module's parameters, then its buffers, then its children, with one metadata entry per module and one
    for the ``_guards_fn`` submodule the loader adds.
    """
    root = _LoadedModule()
    for name, _ in form.named_parameters():
        root.add(name.split("."), "param", name)
    for name, _ in form.named_buffers():
        root.add(name.split("."), "buffer", name)
    state = form.state_dict()
    out: OrderedDict = OrderedDict()
    out._metadata = OrderedDict()
    for module, names in root.walk():
        out._metadata[module] = {"version": 1}
        out.update((name, state[name]) for name in names if name in state)  # non-persistent buffers are not saved
    out._metadata[_GUARDS] = {"version": 1}
    return out


def artifact_bytes(qmodel: nn.Module, kernels: str = "fake") -> int:
    """The bytes the grader measures on ``qmodel``'s exported program (``export.kernels`` form), exactly,
    without exporting it: its loaded state dict written as :func:`state_dict_size_mb` writes it (the zip's
    records are named after the file, so the same kind of name gives the same bytes)."""
    return round(state_dict_size_mb(loaded_state_dict(artifact_form(qmodel, kernels))) * 1e6)


def artifact_size_mb(qmodel: nn.Module, kernels: str = "fake") -> float:
    """:func:`artifact_bytes` in MB (1e6 bytes)."""
    return artifact_bytes(qmodel, kernels) / 1e6


# --------------------------------------------------------------------------- untrusted artifacts
#
# What torch.export.load (torch 2.14) does with a file's content that can run code:
# - unpickles pickled weights / constants (``use_pickle`` in the payload configs), the legacy
#   whole-state-dict files and the sample inputs with torch.load, falling back to
#   weights_only=False; "opaque" constants with plain pickle; revives torchbind objects;
# - opens AOTInductor shared libraries;
# - falls back to the legacy archive format (top-level ``version``), unpickled the same way;
# - in models/*.json: sympy.sympify (an eval) on every ``expr_str``; exec of ``guards_code``;
#   graph input names, keyword names, ``forward_arg_names`` and pytree dict keys spliced
#   into the Python source FX compiles; modules imported for pytree types; node targets
#   resolved as any attribute of torch / operator / math and called.
# inspect_artifact reads the archive with torch's own zip reader, as torch.export.load does,
# and allows tensor data and the plain forms torch.export.save writes, nothing else.


class UntrustedArtifactError(QsweepError):
    """Loading the artifact could run code it carries (the message names the file, member and reason)."""


_TRUST_HINT = ("Load it only if you trust where it came from: python -m qsweep.lab_eval --trust-artifact, "
               "or load_program(path, trust=True)")

# What torch.save writes for tensors, parameters and containers of them (a subset of what
# torch's weights_only unpickler allows).
_REBUILDERS = frozenset({"_rebuild_tensor_v2", "_rebuild_tensor_v3", "_rebuild_parameter"})
_STORAGES = frozenset(f"{kind}Storage" for kind in (
    "Double", "Float", "Half", "BFloat16", "Long", "Int", "Short", "Char", "Byte", "Bool", "ComplexFloat",
    "ComplexDouble"))
_STRING_OPS = frozenset({"STRING", "BINSTRING", "SHORT_BINSTRING", "UNICODE", "SHORT_BINUNICODE", "BINUNICODE",
                         "BINUNICODE8"})
_STACK_NEUTRAL_OPS = frozenset({"MEMOIZE", "PUT", "BINPUT", "LONG_BINPUT", "FRAME"})

_SPEC_TYPES = frozenset({None, "builtins.tuple", "builtins.list", "builtins.dict", "collections.OrderedDict",
                         "collections.namedtuple", "collections.deque", "torch.Size",
                         "torch.fx.immutable_collections.immutable_list",
                         "torch.fx.immutable_collections.immutable_dict"})
_OPERATOR_TARGETS = frozenset({
    "add", "sub", "mul", "truediv", "floordiv", "mod", "pow", "neg", "pos", "abs", "and_", "or_", "xor", "not_",
    "invert", "lshift", "rshift", "eq", "ne", "lt", "le", "gt", "ge", "getitem", "truth", "is_", "is_not"})
_NAME_KEYS = frozenset({"name", "as_name"})  # graph values and argument names: identifiers in FX source
_NAME_TABLES = frozenset({"tensor_values", "sym_int_values", "sym_bool_values", "sym_float_values",
                          "custom_obj_values"})
_GUARD_NAMES = frozenset({"L", "inf", "max", "min", "abs", "int", "float", "round",
                          "IsNonOverlappingAndDenseIndicator", "cast_symbool_to_symint_guardless"})
_SHAPE_METHODS = frozenset({"size", "stride", "storage_offset", "dim", "numel"})
_EXPR_NODES = (ast.Expression, ast.BinOp, ast.UnaryOp, ast.BoolOp, ast.Compare, ast.IfExp, ast.Tuple, ast.Call,
               ast.keyword, ast.operator, ast.unaryop, ast.boolop, ast.cmpop, ast.expr_context)


def inspect_artifact(path: str | Path) -> None:
    """Raise :class:`UntrustedArtifactError` if ``torch.export.load(path)`` could run code from the file.

    Allowed: raw tensor storage; pickles whose globals are torch's tensor rebuilders, storage
    types, dtypes, ``torch.Size``, ``torch.device`` and ``collections.OrderedDict``; programs
    whose shape expressions, guards, names, pytree specs and operator targets have the plain
    forms ``torch.export.save`` writes. A file torch cannot open at all passes (loading it fails
    before anything is unpickled).
    """
    path = Path(path)
    try:
        with zipfile.ZipFile(path) as zf:
            legacy = "version" in zf.namelist()
    except (zipfile.BadZipFile, OSError):
        legacy = False
    if legacy:
        _refuse(path, "version", "marks the legacy torch.export archive format, whose state dict, constants and "
                "example inputs torch unpickles with weights_only=False")
    try:
        reader = torch._C.PyTorchFileReader(str(path))
    except RuntimeError:
        return  # torch cannot open it either, and its fallback needs the legacy `version` refused above
    names = set(reader.get_all_records())
    compiled = sorted(n for n in names if n.startswith(pt2.AOTINDUCTOR_DIR))
    if compiled:
        _refuse(path, compiled[0], "is AOTInductor-compiled code, a shared library torch.export.load would open")
    for member in sorted(n for n in names if n.startswith(pt2.MODELS_DIR)):
        model = member[len(pt2.MODELS_DIR):-len(".json")]  # as torch.export.load derives it
        _check_program(path, member, _read_json(path, reader, member))
        _check_torch_save(path, reader, names, pt2.SAMPLE_INPUTS_FILENAME_FORMAT.format(model), "the sample inputs")
        for folder, config in ((pt2.WEIGHTS_DIR, pt2.WEIGHTS_CONFIG_FILENAME_FORMAT),
                               (pt2.CONSTANTS_DIR, pt2.CONSTANTS_CONFIG_FILENAME_FORMAT)):
            _check_payloads(path, reader, names, model, folder, config.format(model))


def _refuse(path: Path, member: str, reason: str) -> NoReturn:
    raise UntrustedArtifactError(
        f"refusing to load {path}: its member {member} {reason}; torch.export.load could run code from it. "
        f"{_TRUST_HINT}"
    )


def _read_json(path: Path, reader, member: str):
    try:
        return json.loads(reader.get_record(member).decode())
    except ValueError as exc:
        _refuse(path, member, f"cannot be checked: it is not valid JSON ({exc})")


def _check_payloads(path: Path, reader, names: set[str], model: str, folder: str, config: str) -> None:
    """The pickled entries of one weights or constants payload config, as torch.export.load reads them."""
    constants = folder == pt2.CONSTANTS_DIR
    kind = "constant" if constants else "weight"
    legacy = f"{folder}{model}.pt"
    if legacy in names:  # torch unpickles the whole file
        _check_torch_save(path, reader, names, legacy, f"the legacy {kind}s")
        return
    if config not in names:
        return  # torch.export.load fails without it
    entries = _read_json(path, reader, config)
    entries = entries.get("config") if isinstance(entries, dict) else None
    if not isinstance(entries, dict) or not all(
            isinstance(e, dict) and isinstance(e.get("path_name"), str) for e in entries.values()):
        _refuse(path, config, "cannot be checked: it is not a payload config torch.export.save writes")
    for entry in entries.values():
        file, member = entry["path_name"], os.path.join(folder, entry["path_name"])
        if constants and file.startswith(pt2.CUSTOM_OBJ_FILENAME_PREFIX):
            _refuse(path, member, "is a torchbind object, which loading revives by running its class's code")
        elif constants and file.startswith(pt2.OPAQUE_OBJ_FILENAME_PREFIX):
            if member in names:
                _check_pickle(path, member, reader.get_record(member), f"is an opaque {kind}, a plain pickle that")
        elif entry.get("use_pickle") and (file.startswith(pt2.TENSOR_CONSTANT_FILENAME_PREFIX) or not constants):
            _check_torch_save(path, reader, names, member, f"a pickled {kind}")


def _check_torch_save(path: Path, reader, names: set[str], member: str, what: str) -> None:
    """A member torch.load reads: a torch.save zip whose ``data.pkl`` holds only tensor data."""
    if member not in names:
        return  # torch.export.load fails without it
    data = reader.get_record(member)
    if not data:
        return  # torch reads nothing from an empty member
    if data[:4] != b"PK\x03\x04":
        _refuse(path, member, f"holds {what} as a legacy torch.save stream, which torch.load unpickles whole")
    try:
        inner = torch._C.PyTorchFileReader(io.BytesIO(data))
    except RuntimeError:
        return  # torch.load fails on it too
    records = set(inner.get_all_records())
    if "constants.pkl" in records:
        _refuse(path, member, f"holds {what} as a TorchScript archive, which torch.load hands to torch.jit.load")
    if "data.pkl" in records:
        _check_pickle(path, member, inner.get_record("data.pkl"), f"holds {what} whose data.pkl")


def _check_pickle(path: Path, member: str, data: bytes, what: str) -> None:
    """Refuse ``data`` unless it is tensor data; ``what`` describes the member, ending before "references"."""
    offense = _pickle_offense(data)
    if offense:
        _refuse(path, member, f"{what} references {offense}, which is not tensor data (allowed: torch's tensor "
                "rebuilders, storage types, dtypes, torch.Size, torch.device, collections.OrderedDict)")


def _tensor_global(module: str, name: str) -> bool:
    if module == "torch":  # vars(): no lazy submodule import for an attacker's name
        return name in _STORAGES or name in ("Size", "device") or isinstance(vars(torch).get(name), torch.dtype)
    return ((module == "torch._utils" and name in _REBUILDERS)
            or (module, name) in {("torch.storage", "UntypedStorage"), ("collections", "OrderedDict")})


def _pickle_offense(data: bytes) -> str | None:
    """The first thing in a pickle that is not tensor data, described, or None.

    Callables reach a pickle's REDUCE / BUILD / NEWOBJ only through GLOBAL, STACK_GLOBAL, INST
    and the copyreg extension codes, so checking those is enough.
    """
    strings: list[str] = []  # literal strings on top of the stack, for STACK_GLOBAL
    try:
        for op, arg, _ in pickletools.genops(data):
            if op.name in _STRING_OPS:
                strings.append(arg)
                continue
            if op.name in _STACK_NEUTRAL_OPS:
                continue
            if op.name in ("GLOBAL", "INST"):
                module, _, name = arg.partition(" ")
            elif op.name == "STACK_GLOBAL":
                if len(strings) < 2:
                    return "a global whose name is computed (STACK_GLOBAL without literal strings)"
                module, name = strings[-2], strings[-1]
            elif op.name in ("EXT1", "EXT2", "EXT4"):
                return f"the copyreg extension code {arg}"
            else:
                strings.clear()
                continue
            strings.clear()
            if not _tensor_global(module, name):
                return f"the global {module}.{name}"
    except Exception as exc:  # noqa: BLE001 - pickletools raises several types on a malformed stream
        return f"malformed pickle data ({type(exc).__name__}: {exc})"
    return None


def _dotted(text: str) -> bool:
    return all(part.isidentifier() or part.isdigit() for part in text.split("."))


def _check_program(path: Path, member: str, program) -> None:
    """The strings of a serialized program that torch evaluates, execs, imports or splices into source."""
    if not isinstance(program, dict):
        _refuse(path, member, "cannot be checked: it is not a serialized program")
    guards = program.get("guards_code") or []
    if not isinstance(guards, list) or not all(isinstance(g, str) for g in guards):
        _refuse(path, member, "has a guards_code that is not a list of strings")
    for guard in guards:
        offense = _guard_offense(guard)
        if offense:
            _refuse(path, member, f"has the guard {guard!r}, which {offense} (guards_code is exec'd)")
    stack = [program]
    while stack:
        node = stack.pop()
        if isinstance(node, list):
            stack.extend(node)
            continue
        if isinstance(node, str):
            if any(ord(c) < 32 and c not in "\n\t" for c in node):
                _refuse(path, member, f"has the string {node[:80]!r} with a control character")
            continue
        if not isinstance(node, dict):
            continue
        for key, value in node.items():
            offense = None
            if key == "expr_str":
                offense = _sympy_offense(value) if isinstance(value, str) else "is not a string"
            elif key in ("in_spec", "out_spec") and value is not None:
                offense = _spec_offense(value) if isinstance(value, str) else "is not a string"
            elif key == "target" and "inputs" in node:
                offense = _target_offense(value) if isinstance(value, str) else "is not a string"
            elif key in _NAME_KEYS and isinstance(value, str) and value and not value.isidentifier():
                offense = "is not a Python identifier"
            elif key in _NAME_TABLES and isinstance(value, dict):
                bad = [k for k in value if not k.isidentifier()]
                offense = f"names the value {bad[0]!r}, not a Python identifier" if bad else None
            elif key == "forward_arg_names" and isinstance(value, list):
                bad = [n for n in value if not (isinstance(n, str) and n.isidentifier())]
                offense = f"holds {bad[0]!r}, not a Python identifier" if bad else None
            if offense:
                _refuse(path, member, f"has {key}={str(value)[:200]!r}, which {offense}")
            stack.append(key)
            stack.append(value)


@functools.cache
def _sympy_classes() -> frozenset[str]:
    """Names of the sympy classes a shape expression may construct (sympy's and torch's)."""
    import sympy
    from torch.utils._sympy import functions, numbers

    return frozenset(name for ns in (vars(sympy), vars(functions), vars(numbers)) for name, obj in ns.items()
                     if isinstance(obj, type) and issubclass(obj, sympy.Basic))


def _sympy_offense(text: str) -> str | None:
    """Why ``sympy.sympify(text)`` could run code, or None for a plain ``srepr`` expression.

    sympify evals its input, and sympy functions sympify string arguments again, so strings are
    allowed only as a ``Symbol``'s or ``Float``'s first argument, names only as sympy classes
    (called), sympy constants or undefined names (which become symbols).
    """
    import sympy

    try:
        tree = ast.parse(text, mode="eval")
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        return "is not an expression"
    literal_ok = {id(n.args[0]) for n in ast.walk(tree) if isinstance(n, ast.Call) and n.args
                  and isinstance(n.func, ast.Name) and n.func.id in ("Symbol", "Float")}
    callees = {id(n.func) for n in ast.walk(tree) if isinstance(n, ast.Call)}
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant):
            if not isinstance(node.value, (int, float, bool, type(None), str)):
                return f"holds the constant {node.value!r}"
            if isinstance(node.value, str) and id(node) not in literal_ok:
                return f"passes the string {node.value!r} (sympy would parse and eval it)"
        elif isinstance(node, ast.Name):
            if id(node) in callees:
                if node.id not in _sympy_classes():
                    return f"calls {node.id}, which is not a sympy class"
            elif node.id.startswith("_") or node.id in _sympy_classes() or (
                    (node.id in vars(sympy) or node.id in vars(builtins))
                    and not isinstance(vars(sympy).get(node.id), sympy.Basic)):
                return f"uses the name {node.id}"
        elif isinstance(node, ast.Call):
            if not isinstance(node.func, ast.Name) or any(k.arg is None for k in node.keywords):
                return "makes a call other than a sympy class with plain arguments"
        elif not isinstance(node, _EXPR_NODES):
            return f"contains a {type(node).__name__}"
    return None


def _guard_offense(text: str) -> str | None:
    """Why exec'ing the guard ``text`` could do more than compare input shapes, or None.

    Strings are allowed only as input keys (``L['x']``) and must be identifiers: torch splices
    the key into the error message's source. Attributes: shape methods, ``math.*``, ``torch.sym_*``.
    """
    try:
        tree = ast.parse(text, mode="eval")
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        return "is not an expression"
    keys = {id(n.slice) for n in ast.walk(tree) if isinstance(n, ast.Subscript)}
    bases = {id(n.value) for n in ast.walk(tree) if isinstance(n, ast.Attribute)}
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant):
            if not isinstance(node.value, (int, float, bool, type(None), str)):
                return f"holds the constant {node.value!r}"
            if isinstance(node.value, str) and not (id(node) in keys and node.value.isidentifier()):
                return f"holds the string {node.value!r} (allowed only as an input name, L['name'])"
        elif isinstance(node, ast.Name):
            if node.id not in _GUARD_NAMES and not (node.id in ("math", "torch") and id(node) in bases):
                return f"uses the name {node.id}"
        elif isinstance(node, ast.Attribute):
            base = node.value.id if isinstance(node.value, ast.Name) else None
            if base == "math":
                ok = not node.attr.startswith("_") and hasattr(math, node.attr)
            elif base == "torch":
                ok = node.attr.startswith("sym_")
            else:
                ok = node.attr in _SHAPE_METHODS
            if not ok:
                return f"reads the attribute {node.attr}"
        elif isinstance(node, ast.Call):
            if any(k.arg is None for k in node.keywords):
                return "passes **keywords"
        elif not isinstance(node, (*_EXPR_NODES, ast.Subscript, ast.Slice)):
            return f"contains a {type(node).__name__}"
    return None


def _spec_offense(text: str) -> str | None:
    """Why loading the pytree spec ``text`` could import a module or splice a key into source, or None."""
    try:
        _, root = json.loads(text)
    except (ValueError, TypeError):
        return "is not a pytree spec"
    stack = [root]
    while stack:
        node = stack.pop()
        if not isinstance(node, dict) or not isinstance(node.get("children_spec", []), list):
            return "is not a pytree spec"
        kind = node.get("type")
        if not (kind is None or isinstance(kind, str) and kind in _SPEC_TYPES):
            return f"names the container type {kind!r} (allowed: {sorted(map(str, _SPEC_TYPES))})"
        context = node.get("context")
        if kind == "collections.namedtuple":  # the type's registered name, looked up, not parsed
            if not (isinstance(context, str) and _dotted(context)):
                return f"has the namedtuple context {context!r}, not a registered type name"
        elif context is not None:
            try:
                context = json.loads(context)
            except (ValueError, TypeError):
                return "has a context that is not JSON"
            strings, items = [], [context]
            while items:
                item = items.pop()
                if isinstance(item, dict):
                    return "has an object context (an enum torch would import)"
                if isinstance(item, list):
                    items.extend(item)
                elif isinstance(item, str):
                    strings.append(item)
            bad = [s for s in strings if not _dotted(s)]
            if bad:
                return f"has the key {bad[0]!r}, which is not an identifier (keys become Python source)"
        stack.extend(node.get("children_spec", []))
    return None


def _target_offense(target: str) -> str | None:
    """None for an operator target; torch resolves a target as any attribute of torch, operator or
    math and calls it, so only ``torch.ops`` operators, plain ``_operator`` / ``math`` functions
    and ``torch.sym_*`` pass."""
    parts = target.split(".")
    if len(parts) == 2 and (parts[0] == "_operator" and parts[1] in _OPERATOR_TARGETS
                            or parts[0] == "math" and not parts[1].startswith("_") and hasattr(math, parts[1])
                            or parts[0] == "torch" and parts[1].startswith(("sym_", "_sym_"))):
        return None
    if parts[:2] == ["torch", "ops"] and len(parts) > 2:
        # Resolved as torch does (attribute lookups only); torch.ops also holds methods such as
        # load_library, so what it names must be an operator.
        obj = torch.ops
        for name in parts[2:]:
            if not hasattr(obj, name):
                return None  # torch leaves it unresolved and fails on it
            obj = getattr(obj, name)
        if isinstance(obj, (torch._ops.OpOverload, torch._ops.OpOverloadPacket, torch._ops.HigherOrderOperator)):
            return None
    return "is not an operator (allowed: torch.ops.<namespace>.<op>[.<overload>], _operator, math, torch.sym_*)"
