"""Import of public taming-transformers / latent-diffusion VQ-GAN checkpoints (paper §3.1).

The paper encodes its 256² datasets with the pretrained VQ-GANs of Esser et al. (2021). This
module reads their PyTorch-Lightning ``.ckpt`` files into :class:`~sundae.tokenizer.vqgan.VQGAN`,
whose module names match taming's, so the weights map key for key.

Supported public files:

* taming VQGAN ImageNet f16-1024 and f16-16384 (``VQModel``, ``last.ckpt``);
* the FFHQ and CelebA-HQ ``Net2NetTransformer`` checkpoints: only their ``first_stage_model.*``
  weights are kept (``transformer.*`` and ``cond_stage_model.*`` are ignored);
* taming's Gumbel f8 8192 (``GumbelVQ``, OpenImages);
* latent-diffusion's vq-f4 / vq-f8 / vq-f16 first stages (``model.ckpt``).

``loss.*`` weights (the LPIPS net and discriminator) are always dropped.

Safety: a ``.ckpt`` is a pickle, and unpickling runs whatever callables the file names; even
``torch.load(weights_only=True)`` lets a 1 KB file allocate gigabytes (``bytearray(3e9)``) or
hang (a tuple nested so that hashing it takes 2^100 steps). So the file is never given to
``pickle`` or ``torch.load``: :func:`read_checkpoint_payload` reads torch's zip (or legacy)
container itself and runs the pickle program on :class:`BoundedUnpickler`, a small pickle
machine that

* calls nothing but a fixed set of checked builders: tensors over storages read from the file,
  ``torch.Size``, ``torch.device``, dtypes, ``collections.OrderedDict()``, ``bytes``; dicts,
  lists, tuples, numbers and strings are built by the machine itself;
* refuses globals that can run commands or touch the system (``os``, ``subprocess``,
  ``builtins.eval``, ...) with :class:`UnsafeCheckpointError`, and turns every other global into
  an inert placeholder that only records its arguments (Lightning callbacks, hyper-parameters);
* bounds every allocation by the file: literals are read from it, tensor storages must lie in it
  (their bytes add up to at most its size), a tensor must fit in its storage, the pickle program
  is at most :data:`MAX_PICKLE_BYTES`; hashing of dictionary keys is metered (no hash bombs) and
  the whole read gives up after :data:`UNPICKLE_TIME_BUDGET_S`.

Anything it cannot read is a :class:`~sundae.checkpoint.CheckpointError` with a message; only
tensors are kept from the file.

The training resolution is not stored in the weights (the network is convolutional); without the
release's yaml it is taken from a preset whose architecture the weights match exactly, else it
must be given (see :func:`infer_config_from_state_dict`).
"""

from __future__ import annotations

import codecs
import collections
import io
import logging
import os
import pickle
import struct
import time
import zipfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, BinaryIO, ClassVar

import torch
import yaml
from torch import Tensor

from sundae.checkpoint import CheckpointError, check_state_shapes, load_state_dict_strict, shapes_on_meta
from sundae.config import VQGAN_PRESETS, ConfigError, VQGANConfig, preset as lookup_preset
from sundae.tokenizer.vqgan import VQGAN

logger = logging.getLogger(__name__)

NET2NET_PREFIX = "first_stage_model."
IGNORED_PREFIXES = ("loss.",)

MAX_PICKLE_BYTES = 64 * 2**20  # the pickle program of a checkpoint (not its tensors): ~1 MB for LDM
UNPICKLE_TIME_BUDGET_S = 30.0  # a real checkpoint's pickle runs in well under a second
MAX_GLOBALS = 1024  # distinct classes / functions a file may name (a Lightning .ckpt names ~20)
MAX_TENSOR_DIMS = 32
MAX_YAML_BYTES = 4 * 2**20
LEGACY_MAGIC_NUMBER = 0x1950A86A20F9469CFC6C  # torch.serialization.MAGIC_NUMBER
LEGACY_PROTOCOL_VERSION = 1001


class UnsafeCheckpointError(CheckpointError):
    """The checkpoint asks for something a weights file never needs (a global that could run code,
    a call with allocating arguments); it was refused and nothing from it was executed."""


class MalformedPickle(Exception):
    """Internal: the pickle program is invalid; becomes a :class:`CheckpointError` with the path."""


# ---------------------------------------------------------------------------------------------
# What a checkpoint may name
# ---------------------------------------------------------------------------------------------

STORAGE_DTYPES: dict[str, torch.dtype] = {
    "FloatStorage": torch.float32, "DoubleStorage": torch.float64, "HalfStorage": torch.float16,
    "BFloat16Storage": torch.bfloat16, "LongStorage": torch.int64, "IntStorage": torch.int32,
    "ShortStorage": torch.int16, "CharStorage": torch.int8, "ByteStorage": torch.uint8, "BoolStorage": torch.bool,
    "ComplexFloatStorage": torch.complex64, "ComplexDoubleStorage": torch.complex128,
    "UntypedStorage": torch.uint8,  # bytes; the tensor's dtype comes with _rebuild_tensor_v3
}
TENSOR_DTYPES = frozenset({*STORAGE_DTYPES.values(), torch.uint16, torch.uint32, torch.uint64})

# Modules whose globals mean the file tries to run commands or touch the system. Refusing them
# is a loud signal, not the safety mechanism: any global not resolved below is inert anyway.
REFUSED_MODULES = frozenset({
    "os", "posix", "nt", "subprocess", "sys", "shutil", "socket", "importlib", "runpy", "pickle", "_pickle",
    "marshal", "ctypes", "code", "codeop", "pty", "webbrowser", "multiprocessing", "signal", "builtins",
    "__builtin__", "io", "_io", "tempfile", "pathlib", "posixpath", "ntpath", "asyncio", "threading", "_thread",
    # Python 2 spellings, which protocol-2 pickles use and real unpicklers map back (commands -> subprocess)
    "commands", "popen2", "cPickle", "thread", "SocketServer", "socketserver", "urllib", "urllib2", "httplib",
    "http", "ftplib", "smtplib", "telnetlib",
})
# Plain data types of builtins that may appear in Lightning hyper-parameters: inert, never called.
INERT_BUILTINS = frozenset({
    "set", "frozenset", "bytearray", "complex", "slice", "range", "tuple", "list", "dict", "str", "int", "float",
    "bool", "object", "NoneType", "Ellipsis", "NotImplemented",
})


class StorageType:
    """What ``torch.FloatStorage`` & co. resolve to: only a dtype, never a callable storage class
    (``torch.FloatStorage(3_000_000_000)`` would allocate)."""

    __slots__ = ("name", "dtype")

    def __init__(self, name: str, dtype: torch.dtype) -> None:
        self.name, self.dtype = name, dtype

    def __repr__(self) -> str:
        return f"<storage type {self.name}>"


class TensorType:
    """What ``torch.Tensor`` / ``torch.nn.Parameter`` resolve to (``_rebuild_from_type_v2``'s new type)."""

    __slots__ = ("name",)

    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return f"<tensor type {self.name}>"


class SafeCall:
    """A builder the pickle program may call; ``function`` checks its arguments before allocating."""

    __slots__ = ("name", "function")

    def __init__(self, name: str, function: Callable[..., Any]) -> None:
        self.name, self.function = name, function

    def __repr__(self) -> str:
        return f"<builder {self.name}>"


class LoadedStorage:
    """Bytes of one storage record, read from the file (``dtype`` is the pickled storage type's)."""

    __slots__ = ("untyped", "dtype", "nbytes")

    def __init__(self, untyped: torch.UntypedStorage, dtype: torch.dtype) -> None:
        self.untyped, self.dtype, self.nbytes = untyped, dtype, untyped.nbytes()


def describe(value: Any) -> str:
    """A short description of an object from the file, for messages. Never ``repr`` of a container:
    a pickle can make a tuple whose repr is 2^100 characters long (the same DAG as a hash bomb)."""
    if value is None or isinstance(value, (bool, float, torch.dtype)):
        return repr(value)
    if isinstance(value, int):
        return repr(value) if abs(value) < 10**18 else f"<int of {value.bit_length()} bits>"
    if isinstance(value, (str, bytes)):
        return repr(value[:60]) + ("..." if len(value) > 60 else "")
    if isinstance(value, (tuple, list)) and len(value) <= 8 and all(
        item is None or isinstance(item, (int, float, torch.dtype)) or (isinstance(item, str) and len(item) <= 60)
        for item in value
    ):
        return ", ".join(describe(item) for item in value).join("()" if isinstance(value, tuple) else "[]")
    if isinstance(value, (tuple, list, dict)):
        return f"<{type(value).__name__} of {len(value)} items>"
    if isinstance(value, InertGlobal) or (isinstance(value, type) and issubclass(value, InertGlobal)):
        return f"<inert {value.module[:80]}.{value.name[:80]}>"
    if isinstance(value, (StorageType, TensorType, SafeCall)):
        return repr(value)
    return f"<{type(value).__name__}>"


def clip(text: str, limit: int = 300) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def int_tuple(value: Any, what: str) -> tuple[int, ...]:
    if not isinstance(value, tuple) or len(value) > MAX_TENSOR_DIMS or not all(is_int(v) and v >= 0 for v in value):
        raise MalformedPickle(
            f"tensor {what} must be up to {MAX_TENSOR_DIMS} non-negative ints, got {describe(value)}"
        )
    return value


def tensor_from_storage(storage: Any, dtype: Any, offset: Any, size: Any, stride: Any) -> Tensor:
    """``torch._utils._rebuild_tensor`` after checking that the view lies inside ``storage``
    (``Tensor.set_`` would otherwise grow the storage to whatever ``size`` says)."""
    if not isinstance(storage, LoadedStorage):
        raise MalformedPickle(f"a tensor is built on {describe(storage)}, not on a storage from the file")
    if dtype not in TENSOR_DTYPES:
        raise MalformedPickle(f"unsupported tensor dtype {describe(dtype)}")
    size, stride = int_tuple(tuple(size) if isinstance(size, torch.Size) else size, "size"), int_tuple(stride, "stride")
    if len(size) != len(stride) or not is_int(offset) or offset < 0:
        raise MalformedPickle(f"inconsistent tensor layout: offset {describe(offset)}, size {size}, stride {stride}")
    capacity = storage.nbytes // dtype.itemsize
    extent = offset + sum((n - 1) * s for n, s in zip(size, stride)) + 1 if all(size) else offset
    if extent > capacity:
        raise MalformedPickle(
            f"a tensor of size {size} and stride {stride} at offset {offset} does not fit in its storage of "
            f"{capacity} elements"
        )
    return torch.empty((0,), dtype=dtype).set_(storage.untyped, offset, size, stride)


def rebuild_tensor(storage: Any, storage_offset: Any, size: Any, stride: Any, requires_grad: Any = False,
                   backward_hooks: Any = None, metadata: Any = None) -> Tensor:
    """``_rebuild_tensor`` / ``_rebuild_tensor_v2``; hooks and metadata from the file are dropped."""
    dtype = storage.dtype if isinstance(storage, LoadedStorage) else None
    return tensor_from_storage(storage, dtype, storage_offset, size, stride)


def rebuild_tensor_v3(storage: Any, storage_offset: Any, size: Any, stride: Any, requires_grad: Any,
                      backward_hooks: Any, dtype: Any, metadata: Any = None) -> Tensor:
    return tensor_from_storage(storage, dtype, storage_offset, size, stride)


def rebuild_parameter(data: Any, requires_grad: Any, backward_hooks: Any, state: Any = None) -> Tensor:
    """``_rebuild_parameter(_with_state)``: the plain tensor (only the values are kept)."""
    if not isinstance(data, Tensor):
        raise MalformedPickle(f"a parameter wraps {describe(data)}, not a tensor")
    return data


def rebuild_from_type_v2(function: Any, new_type: Any, args: Any, state: Any) -> Tensor:
    """``torch._tensor._rebuild_from_type_v2``, for tensor builders and plain tensor types only."""
    if not (isinstance(function, SafeCall) and function.function in TENSOR_BUILDERS and isinstance(new_type, TensorType)
            and isinstance(args, tuple)):
        raise MalformedPickle(f"_rebuild_from_type_v2 of {describe(function)} as {describe(new_type)}")
    return function.function(*args)


def make_size(dims: Any) -> torch.Size:
    return torch.Size(int_tuple(tuple(dims) if isinstance(dims, list) else dims, "size"))


def make_device(kind: Any, index: Any = None) -> torch.device:
    if not (isinstance(kind, str) and len(kind) <= 64 and (index is None or (is_int(index) and 0 <= index < 2**16))):
        raise MalformedPickle(f"torch.device({describe(kind)}, {describe(index)})")
    try:
        return torch.device(kind) if index is None else torch.device(kind, index)
    except RuntimeError as error:
        raise MalformedPickle(f"torch.device: {error}") from None


def encode_latin1(text: Any, encoding: Any = "latin1") -> bytes:
    """``_codecs.encode(str, 'latin1')``: how protocol-2 pickles spell ``bytes`` (same length)."""
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise UnsafeCheckpointError(
            f"refusing to load: _codecs.encode({type(text).__name__}, {describe(encoding)}) is not how a pickle "
            f"spells bytes"
        )
    return text.encode("latin1")


def make_bytes(*args: Any) -> bytes:
    """``builtins.bytes()``: protocol 2's empty bytes; with an argument it would allocate that many."""
    if args:
        raise UnsafeCheckpointError(
            f"refusing to load: the checkpoint calls builtins.bytes({describe(args[0])}), which could allocate "
            f"without bound; nothing from the file was executed"
        )
    return b""


def make_ordered_dict(*args: Any) -> collections.OrderedDict:
    """``collections.OrderedDict()``; its items come from SETITEMS, where key hashing is metered."""
    if args:
        raise MalformedPickle("OrderedDict called with arguments (pickle fills it with SETITEMS)")
    return collections.OrderedDict()


TENSOR_BUILDERS = frozenset({rebuild_tensor, rebuild_tensor_v3, rebuild_parameter})

SAFE_GLOBALS: dict[tuple[str, str], Any] = {
    ("torch._utils", "_rebuild_tensor"): SafeCall("torch._utils._rebuild_tensor", rebuild_tensor),
    ("torch._utils", "_rebuild_tensor_v2"): SafeCall("torch._utils._rebuild_tensor_v2", rebuild_tensor),
    ("torch._utils", "_rebuild_tensor_v3"): SafeCall("torch._utils._rebuild_tensor_v3", rebuild_tensor_v3),
    ("torch._utils", "_rebuild_parameter"): SafeCall("torch._utils._rebuild_parameter", rebuild_parameter),
    ("torch._utils", "_rebuild_parameter_with_state"): SafeCall(
        "torch._utils._rebuild_parameter_with_state", rebuild_parameter
    ),
    ("torch._tensor", "_rebuild_from_type_v2"): SafeCall("torch._tensor._rebuild_from_type_v2", rebuild_from_type_v2),
    ("torch", "Size"): SafeCall("torch.Size", make_size),
    ("torch", "device"): SafeCall("torch.device", make_device),
    ("torch", "Tensor"): TensorType("torch.Tensor"),
    ("torch.nn.parameter", "Parameter"): TensorType("torch.nn.Parameter"),
    ("collections", "OrderedDict"): SafeCall("collections.OrderedDict", make_ordered_dict),
    ("_codecs", "encode"): SafeCall("_codecs.encode", encode_latin1),
    ("builtins", "bytes"): SafeCall("builtins.bytes", make_bytes),
    ("__builtin__", "bytes"): SafeCall("builtins.bytes", make_bytes),
    **{("torch", name): value for name, value in vars(torch).items() if isinstance(value, torch.dtype)},
    **{(module, name): StorageType(name, dtype) for module in ("torch", "torch.storage")
       for name, dtype in STORAGE_DTYPES.items()},
}


class InertGlobal:
    """Stand-in for a global the checkpoint names but we do not trust.

    Calling it, ``__setstate__``, item and list updates (everything pickle can do to an object)
    only record their arguments: ``args``, ``kwargs``, ``state``, ``items`` (a list of key, value
    pairs, never hashed) and ``elements``. No method of the original class is looked up or run.
    """

    module: ClassVar[str] = ""
    name: ClassVar[str] = ""

    def __init__(self, args: tuple = (), kwargs: dict | None = None) -> None:
        self.args, self.kwargs = args, kwargs or {}
        self.state: Any = None
        self.items: list[tuple[Any, Any]] = []
        self.elements: list[Any] = []

    def __repr__(self) -> str:
        return f"<inert {self.module}.{self.name}>"


# ---------------------------------------------------------------------------------------------
# The pickle machine
# ---------------------------------------------------------------------------------------------


class BoundedFile:
    """A read-only file whose ``read(n)`` never asks the OS layer for more than what is left, so a
    length field in the file cannot make Python preallocate gigabytes (``read(3e9)`` does)."""

    def __init__(self, raw: BinaryIO, size: int) -> None:
        self.raw, self.size = raw, size

    def remaining(self) -> int:
        return max(0, self.size - self.raw.tell())

    def read(self, n: int | None = -1) -> bytes:
        left = self.remaining()
        return self.raw.read(left if n is None or n < 0 else min(n, left))

    def readline(self, limit: int = -1) -> bytes:
        left = self.remaining()
        return self.raw.readline(left if limit is None or limit < 0 else min(limit, left))

    def readinto(self, buffer: memoryview) -> int:
        return self.raw.readinto(buffer[: self.remaining()])

    def seek(self, offset: int, whence: int = 0) -> int:
        return self.raw.seek(offset, whence)

    def tell(self) -> int:
        return self.raw.tell()

    def seekable(self) -> bool:
        return True


_STOP = object()


class BoundedUnpickler:
    """Runs one pickle program (protocols 0-4, without the opcodes torch never writes) and returns
    its value; see the module docstring for what it allows and bounds.

    ``persistent_load`` maps torch's storage ids to :class:`LoadedStorage`; ``deadline`` is a
    ``time.monotonic()`` value. Hashing dictionary keys is the one super-linear thing a pickle can
    make us do (a tuple key is hashed through its whole DAG, uncached), so the expanded size of
    every key is charged against a budget that grows with the bytes of pickle read.
    """

    def __init__(self, file: Any, *, persistent_load: Callable[[Any], Any] | None, deadline: float,
                 placeholders: dict[tuple[str, str], type[InertGlobal]]) -> None:
        self.file = file
        self.persistent = persistent_load
        self.deadline = deadline
        self.hash_work = 0
        self.placeholders = placeholders
        self.consumed = 0
        self.stack: list[Any] = []
        self.metastack: list[list[Any]] = []
        self.memo: dict[int, Any] = {}
        self.nested: dict[int, tuple[tuple, int, int]] = {}  # id -> (tuple, expanded size, depth), nested tuples

    # -- reading ---------------------------------------------------------------------------------

    def read(self, n: int) -> bytes:
        if self.consumed + n > MAX_PICKLE_BYTES:
            raise UnsafeCheckpointError(
                f"refusing to load: its pickle program is larger than {MAX_PICKLE_BYTES} bytes, far more than any "
                f"checkpoint's (tensor data is stored apart from it)"
            )
        data = self.file.read(n)
        if len(data) != n:
            raise MalformedPickle("the pickle data ends early; the file is truncated")
        self.consumed += n
        return data

    def readline(self) -> bytes:
        line = self.file.readline(MAX_PICKLE_BYTES - self.consumed + 1)
        self.consumed += len(line)
        if not line.endswith(b"\n"):
            raise MalformedPickle("the pickle data ends early (unterminated text line); the file is truncated")
        if self.consumed > MAX_PICKLE_BYTES:
            raise UnsafeCheckpointError(f"refusing to load: its pickle program is larger than {MAX_PICKLE_BYTES} bytes")
        return line[:-1]

    def unpack(self, fmt: str) -> Any:
        return struct.unpack(fmt, self.read(struct.calcsize(fmt)))[0]

    def sized(self, fmt: str) -> bytes:
        size = self.unpack(fmt)
        if size < 0:
            raise MalformedPickle("negative length in the pickle data")
        return self.read(size)

    # -- running ---------------------------------------------------------------------------------

    def check_deadline(self) -> None:
        if time.monotonic() > self.deadline:
            raise UnsafeCheckpointError(
                f"gave up: reading its pickle took longer than the time budget ({UNPICKLE_TIME_BUDGET_S:g} s by "
                f"default; a real checkpoint takes well under a second); the file may be built to stall loaders"
            )

    def load(self) -> Any:
        dispatch = self.dispatch
        operations = 0
        while True:
            operations += 1
            if not operations & 1023:
                self.check_deadline()
            code = self.read(1)[0]
            handler = dispatch.get(code)
            if handler is None:
                name = REJECTED_OPCODES.get(code)
                if name is not None:
                    raise MalformedPickle(f"it uses the pickle opcode {name}, which torch.save does not write")
                raise MalformedPickle(f"invalid pickle opcode 0x{code:02x} at byte {self.consumed - 1}")
            if handler(self) is _STOP:
                self.check_deadline()
                if len(self.stack) != 1 or self.metastack:
                    raise MalformedPickle("the pickle program leaves a malformed stack")
                return self.stack.pop()

    def pop_mark(self) -> list[Any]:
        items = self.stack
        self.stack = self.metastack.pop()
        return items

    # -- objects ---------------------------------------------------------------------------------

    def shape_of(self, value: Any) -> tuple[int, int]:
        """(nodes hashing ``value`` visits, nesting depth): tuples hash their items, uncached."""
        if not isinstance(value, tuple):
            return 1, 0
        entry = self.nested.get(id(value))
        return (entry[1], entry[2]) if entry is not None and entry[0] is value else (1 + len(value), 1)

    def make_tuple(self, items: list[Any]) -> tuple:
        value = tuple(items)
        if any(isinstance(item, tuple) for item in value):
            shapes = [self.shape_of(item) for item in value]
            weight = min(1 + sum(w for w, _ in shapes), 2**62)
            self.nested[id(value)] = (value, weight, 1 + max(d for _, d in shapes))  # keeps the id unique
        return value

    def persistent_id(self, pid: Any) -> Any:
        if self.persistent is None:
            raise MalformedPickle("unexpected persistent id (tensor storage) in this part of the file")
        return self.persistent(pid)

    def insert(self, target: Any, key: Any, value: Any) -> None:
        if isinstance(target, InertGlobal):
            target.items.append((key, value))
            return
        if not isinstance(target, dict):
            raise MalformedPickle(f"SETITEM on a {type(target).__name__}")
        weight, depth = self.shape_of(key)
        self.hash_work += weight
        if self.hash_work > HASH_WORK_BASE + 8 * self.consumed or depth > MAX_KEY_NESTING:
            raise UnsafeCheckpointError(
                "refusing to load: a dictionary key is a tuple nested too deeply or too widely to hash safely "
                "(a hash bomb); no real checkpoint has such keys"
            )
        target[key] = value

    def insert_pairs(self, target: Any, items: list[Any]) -> None:
        if len(items) % 2:
            raise MalformedPickle("SETITEMS with an odd number of items")
        for index in range(0, len(items), 2):
            if not index & 31:
                self.check_deadline()  # crafted colliding int keys make each insert slow
            self.insert(target, items[index], items[index + 1])

    def extend(self, target: Any, items: list[Any]) -> None:
        if isinstance(target, list):
            target.extend(items)
        elif isinstance(target, InertGlobal):
            target.elements.extend(items)
        else:
            raise MalformedPickle(f"APPEND to a {type(target).__name__}")

    def find_class(self, module: Any, name: Any) -> Any:
        if not isinstance(module, str) or not isinstance(name, str):
            raise MalformedPickle("a global is named by non-strings")
        key = (module, name)
        if key in SAFE_GLOBALS:
            return SAFE_GLOBALS[key]
        root = module.split(".")[0]
        if root in REFUSED_MODULES and not (root in ("builtins", "__builtin__") and name in INERT_BUILTINS):
            raise UnsafeCheckpointError(
                f"refusing to load: the checkpoint references {module[:80]}.{name[:80]}, which "
                f"could run code on this machine; nothing from the file was executed. Only load checkpoints from "
                f"sources you trust."
            )
        if key not in self.placeholders:
            if len(self.placeholders) >= MAX_GLOBALS:
                raise UnsafeCheckpointError(f"refusing to load: it names more than {MAX_GLOBALS} distinct globals")
            self.placeholders[key] = type(f"Inert[{module}.{name}]", (InertGlobal,), {"module": module, "name": name})
        return self.placeholders[key]

    def call(self, function: Any, args: Any, kwargs: dict | None = None) -> Any:
        if not isinstance(args, tuple) or (kwargs is not None and not isinstance(kwargs, dict)):
            raise MalformedPickle("call arguments are not a tuple")
        if isinstance(function, type) and issubclass(function, InertGlobal):
            return function(args, kwargs)
        if isinstance(function, SafeCall) and not kwargs:
            try:
                return function.function(*args)
            except TypeError as error:  # wrong number of arguments
                raise MalformedPickle(f"bad call to {function.name} ({error})") from None
        raise MalformedPickle(f"the pickle calls {describe(function)}, which a checkpoint never calls")

    # -- opcodes ---------------------------------------------------------------------------------

    dispatch: ClassVar[dict[int, Callable[[BoundedUnpickler], Any]]] = {}


def opcode(*codes: bytes) -> Callable[[Callable[[BoundedUnpickler], Any]], Callable[[BoundedUnpickler], Any]]:
    def register(handler: Callable[[BoundedUnpickler], Any]) -> Callable[[BoundedUnpickler], Any]:
        for code in codes:
            BoundedUnpickler.dispatch[code[0]] = handler
        return handler
    return register


# opcodes torch.save never writes (the copyreg extension registry, out-of-band buffers)
REJECTED_OPCODES = {
    code[0]: name for name, code in (
        ("EXT1", pickle.EXT1), ("EXT2", pickle.EXT2), ("EXT4", pickle.EXT4), ("NEXT_BUFFER", pickle.NEXT_BUFFER),
        ("READONLY_BUFFER", pickle.READONLY_BUFFER),
    )
}
MAX_KEY_NESTING = 32  # hashing nests in C; a deep tuple key would overflow the C stack
HASH_WORK_BASE = 2**20  # tuple nodes all key hashes may visit, plus 8 per byte of pickle read


@opcode(pickle.PROTO)
def _proto(u: BoundedUnpickler) -> None:
    if u.read(1)[0] > 5:
        raise MalformedPickle("unsupported pickle protocol")


@opcode(pickle.FRAME)
def _frame(u: BoundedUnpickler) -> None:
    u.read(8)  # frames only group the opcodes that follow inline


@opcode(pickle.STOP)
def _stop(u: BoundedUnpickler) -> object:
    return _STOP


@opcode(pickle.NONE)
def _none(u: BoundedUnpickler) -> None:
    u.stack.append(None)


@opcode(pickle.NEWTRUE)
def _true(u: BoundedUnpickler) -> None:
    u.stack.append(True)


@opcode(pickle.NEWFALSE)
def _false(u: BoundedUnpickler) -> None:
    u.stack.append(False)


@opcode(pickle.INT)
def _int(u: BoundedUnpickler) -> None:
    line = u.readline()
    u.stack.append(False if line == b"00" else True if line == b"01" else int(line, 0))


@opcode(pickle.BININT)
def _binint(u: BoundedUnpickler) -> None:
    u.stack.append(u.unpack("<i"))


@opcode(pickle.BININT1)
def _binint1(u: BoundedUnpickler) -> None:
    u.stack.append(u.read(1)[0])


@opcode(pickle.BININT2)
def _binint2(u: BoundedUnpickler) -> None:
    u.stack.append(u.unpack("<H"))


@opcode(pickle.LONG)
def _long(u: BoundedUnpickler) -> None:
    u.stack.append(int(u.readline().removesuffix(b"L"), 0))  # Python's int() caps the digits it parses


@opcode(pickle.LONG1)
def _long1(u: BoundedUnpickler) -> None:
    u.stack.append(int.from_bytes(u.read(u.read(1)[0]), "little", signed=True))


@opcode(pickle.LONG4)
def _long4(u: BoundedUnpickler) -> None:
    u.stack.append(int.from_bytes(u.sized("<i"), "little", signed=True))


@opcode(pickle.FLOAT)
def _float(u: BoundedUnpickler) -> None:
    u.stack.append(float(u.readline()))


@opcode(pickle.BINFLOAT)
def _binfloat(u: BoundedUnpickler) -> None:
    u.stack.append(u.unpack(">d"))


@opcode(pickle.STRING)
def _string(u: BoundedUnpickler) -> None:
    data = u.readline()
    if len(data) < 2 or data[0] != data[-1] or data[:1] not in (b'"', b"'"):
        raise MalformedPickle("badly quoted STRING")
    u.stack.append(codecs.escape_decode(data[1:-1])[0].decode("utf-8"))


@opcode(pickle.BINSTRING)
def _binstring(u: BoundedUnpickler) -> None:
    u.stack.append(u.sized("<i").decode("utf-8"))


@opcode(pickle.SHORT_BINSTRING)
def _short_binstring(u: BoundedUnpickler) -> None:
    u.stack.append(u.read(u.read(1)[0]).decode("utf-8"))


@opcode(pickle.BINBYTES)
def _binbytes(u: BoundedUnpickler) -> None:
    u.stack.append(u.sized("<I"))


@opcode(pickle.SHORT_BINBYTES)
def _short_binbytes(u: BoundedUnpickler) -> None:
    u.stack.append(u.read(u.read(1)[0]))


@opcode(pickle.BINBYTES8)
def _binbytes8(u: BoundedUnpickler) -> None:
    u.stack.append(u.sized("<Q"))


@opcode(pickle.UNICODE)
def _unicode(u: BoundedUnpickler) -> None:
    u.stack.append(str(u.readline(), "raw-unicode-escape"))


@opcode(pickle.BINUNICODE)
def _binunicode(u: BoundedUnpickler) -> None:
    u.stack.append(str(u.sized("<I"), "utf-8", "surrogatepass"))


@opcode(pickle.SHORT_BINUNICODE)
def _short_binunicode(u: BoundedUnpickler) -> None:
    u.stack.append(str(u.read(u.read(1)[0]), "utf-8", "surrogatepass"))


@opcode(pickle.BINUNICODE8)
def _binunicode8(u: BoundedUnpickler) -> None:
    u.stack.append(str(u.sized("<Q"), "utf-8", "surrogatepass"))


@opcode(pickle.EMPTY_TUPLE)
def _empty_tuple(u: BoundedUnpickler) -> None:
    u.stack.append(())


@opcode(pickle.TUPLE)
def _tuple(u: BoundedUnpickler) -> None:
    items = u.pop_mark()
    u.stack.append(u.make_tuple(items))


def _tuple_of(count: int) -> Callable[[BoundedUnpickler], None]:
    def handler(u: BoundedUnpickler) -> None:
        if len(u.stack) < count:
            raise MalformedPickle("TUPLE1/2/3 on a short stack")
        items = u.stack[len(u.stack) - count:]
        del u.stack[len(u.stack) - count:]
        u.stack.append(u.make_tuple(items))
    return handler


for _count, _code in ((1, pickle.TUPLE1), (2, pickle.TUPLE2), (3, pickle.TUPLE3)):
    BoundedUnpickler.dispatch[_code[0]] = _tuple_of(_count)


@opcode(pickle.EMPTY_LIST)
def _empty_list(u: BoundedUnpickler) -> None:
    u.stack.append([])


@opcode(pickle.LIST)
def _list(u: BoundedUnpickler) -> None:
    items = u.pop_mark()
    u.stack.append(items)


@opcode(pickle.APPEND)
def _append(u: BoundedUnpickler) -> None:
    value = u.stack.pop()
    u.extend(u.stack[-1], [value])


@opcode(pickle.APPENDS)
def _appends(u: BoundedUnpickler) -> None:
    items = u.pop_mark()
    u.extend(u.stack[-1], items)


# Protocol 4 sets and bytearrays become the same inert placeholders as protocol 2's
# ``builtins.set([...])``: their items are recorded, never hashed.
@opcode(pickle.EMPTY_SET)
def _empty_set(u: BoundedUnpickler) -> None:
    u.stack.append(u.find_class("builtins", "set")(()))


@opcode(pickle.ADDITEMS)
def _additems(u: BoundedUnpickler) -> None:
    items = u.pop_mark()
    target = u.stack[-1]
    if not isinstance(target, InertGlobal):
        raise MalformedPickle(f"ADDITEMS to a {type(target).__name__}")
    target.elements.extend(items)


@opcode(pickle.FROZENSET)
def _frozenset(u: BoundedUnpickler) -> None:
    items = u.pop_mark()
    value = u.find_class("builtins", "frozenset")(())
    value.elements.extend(items)
    u.stack.append(value)


@opcode(pickle.BYTEARRAY8)
def _bytearray8(u: BoundedUnpickler) -> None:
    u.stack.append(u.find_class("builtins", "bytearray")((u.sized("<Q"),)))


@opcode(pickle.EMPTY_DICT)
def _empty_dict(u: BoundedUnpickler) -> None:
    u.stack.append({})


@opcode(pickle.DICT)
def _dict(u: BoundedUnpickler) -> None:
    items = u.pop_mark()
    value: dict = {}
    u.insert_pairs(value, items)
    u.stack.append(value)


@opcode(pickle.SETITEM)
def _setitem(u: BoundedUnpickler) -> None:
    value = u.stack.pop()
    key = u.stack.pop()
    u.insert(u.stack[-1], key, value)


@opcode(pickle.SETITEMS)
def _setitems(u: BoundedUnpickler) -> None:
    items = u.pop_mark()
    u.insert_pairs(u.stack[-1], items)


@opcode(pickle.POP)
def _pop(u: BoundedUnpickler) -> None:
    if u.stack:
        u.stack.pop()
    else:
        u.pop_mark()


@opcode(pickle.POP_MARK)
def _pop_mark(u: BoundedUnpickler) -> None:
    u.pop_mark()


@opcode(pickle.DUP)
def _dup(u: BoundedUnpickler) -> None:
    u.stack.append(u.stack[-1])


@opcode(pickle.MARK)
def _mark(u: BoundedUnpickler) -> None:
    u.metastack.append(u.stack)
    u.stack = []


@opcode(pickle.GET)
def _get(u: BoundedUnpickler) -> None:
    u.stack.append(u.memo[int(u.readline())])


@opcode(pickle.BINGET)
def _binget(u: BoundedUnpickler) -> None:
    u.stack.append(u.memo[u.read(1)[0]])


@opcode(pickle.LONG_BINGET)
def _long_binget(u: BoundedUnpickler) -> None:
    u.stack.append(u.memo[u.unpack("<I")])


@opcode(pickle.PUT)
def _put(u: BoundedUnpickler) -> None:
    u.memo[int(u.readline())] = u.stack[-1]


@opcode(pickle.BINPUT)
def _binput(u: BoundedUnpickler) -> None:
    u.memo[u.read(1)[0]] = u.stack[-1]


@opcode(pickle.LONG_BINPUT)
def _long_binput(u: BoundedUnpickler) -> None:
    u.memo[u.unpack("<I")] = u.stack[-1]  # a dict, so a huge index allocates nothing


@opcode(pickle.MEMOIZE)
def _memoize(u: BoundedUnpickler) -> None:
    u.memo[len(u.memo)] = u.stack[-1]


@opcode(pickle.GLOBAL)
def _global(u: BoundedUnpickler) -> None:
    module = u.readline().decode("utf-8")
    name = u.readline().decode("utf-8")
    u.stack.append(u.find_class(module, name))


@opcode(pickle.STACK_GLOBAL)
def _stack_global(u: BoundedUnpickler) -> None:
    name = u.stack.pop()
    module = u.stack.pop()
    u.stack.append(u.find_class(module, name))


@opcode(pickle.REDUCE)
def _reduce(u: BoundedUnpickler) -> None:
    args = u.stack.pop()
    u.stack[-1] = u.call(u.stack[-1], args)


@opcode(pickle.BUILD)
def _build(u: BoundedUnpickler) -> None:
    state = u.stack.pop()
    target = u.stack[-1]
    if isinstance(target, InertGlobal):
        target.state = state
    elif not isinstance(target, dict):  # a module's state_dict carries `_metadata` this way: dropped
        raise MalformedPickle(f"BUILD (set state) on a {type(target).__name__}")


def instantiate(u: BoundedUnpickler, cls: Any, args: Any, kwargs: Any = None) -> InertGlobal:
    if not (isinstance(cls, type) and issubclass(cls, InertGlobal)):
        raise MalformedPickle(f"the pickle creates an instance of {describe(cls)}")
    return u.call(cls, tuple(args) if isinstance(args, list) else args, kwargs)


@opcode(pickle.NEWOBJ)
def _newobj(u: BoundedUnpickler) -> None:
    args = u.stack.pop()
    cls = u.stack.pop()
    u.stack.append(instantiate(u, cls, args))


@opcode(pickle.NEWOBJ_EX)
def _newobj_ex(u: BoundedUnpickler) -> None:
    kwargs = u.stack.pop()
    args = u.stack.pop()
    cls = u.stack.pop()
    u.stack.append(instantiate(u, cls, args, kwargs))


@opcode(pickle.INST)
def _inst(u: BoundedUnpickler) -> None:
    module = u.readline().decode("utf-8")
    name = u.readline().decode("utf-8")
    args = u.pop_mark()
    u.stack.append(instantiate(u, u.find_class(module, name), args))


@opcode(pickle.OBJ)
def _obj(u: BoundedUnpickler) -> None:
    args = u.pop_mark()
    cls = args.pop(0)
    u.stack.append(instantiate(u, cls, args))


@opcode(pickle.PERSID)
def _persid(u: BoundedUnpickler) -> None:
    u.stack.append(u.persistent_id(u.readline().decode("ascii")))


@opcode(pickle.BINPERSID)
def _binpersid(u: BoundedUnpickler) -> None:
    u.stack.append(u.persistent_id(u.stack.pop()))


# ---------------------------------------------------------------------------------------------
# torch's containers: the zip archive (torch >= 1.6) and the legacy stream
# ---------------------------------------------------------------------------------------------

# What the pickle machine can raise on a malformed program (stack underflow, missing memo entry,
# bad number text, invalid UTF-8, a list used as a dict key, ...); all become one CheckpointError.
MALFORMED_ERRORS = (MalformedPickle, IndexError, KeyError, ValueError, TypeError, struct.error, OverflowError,
                    EOFError, zipfile.BadZipFile)


def checked_storage_id(pid: Any) -> tuple[Any, ...]:
    """Check one of torch's ``('storage', type, key, location, numel, ...)`` persistent ids."""
    if not isinstance(pid, tuple) or not pid or pid[0] != "storage":
        kind = pid[0] if isinstance(pid, tuple) and pid else pid
        if kind == "module":
            raise MalformedPickle("it holds a whole pickled nn.Module (torch.save(model)), not a state dict")
        raise MalformedPickle(f"unknown persistent id {describe(kind)}")
    if len(pid) < 5 or not isinstance(pid[1], StorageType) or not isinstance(pid[2], str) or len(pid[2]) > 256 \
            or not is_int(pid[4]) or pid[4] < 0:
        raise MalformedPickle(f"malformed storage id {describe(pid)}")
    return pid


def new_storage(nbytes: int) -> tuple[torch.UntypedStorage, memoryview]:
    """An uninitialised byte storage and a writable view of it (filled from the file by the caller)."""
    data = torch.empty(nbytes, dtype=torch.uint8)
    return data.untyped_storage(), memoryview(data.numpy()).cast("B")


def read_zip_entry_into(archive: zipfile.ZipFile, info: zipfile.ZipInfo, target: memoryview) -> None:
    """Copy one stored (uncompressed) entry into ``target``; zipfile checks its CRC-32 at the end."""
    with archive.open(info) as entry:
        position = 0
        while position < len(target):
            chunk = entry.read(min(len(target) - position, 16 * 2**20))
            if not chunk:
                raise MalformedPickle(f"zip entry {info.filename} ends early; the file is truncated")
            target[position:position + len(chunk)] = chunk
            position += len(chunk)
        if entry.read(1):
            raise MalformedPickle(f"zip entry {info.filename} is longer than its record")


def checked_entry(archive: zipfile.ZipFile, name: str, file_size: int) -> zipfile.ZipInfo:
    try:
        info = archive.getinfo(name)
    except KeyError:
        raise MalformedPickle(f"the archive has no entry {name}") from None
    if info.compress_type != zipfile.ZIP_STORED or info.flag_bits & 0x1:
        raise UnsafeCheckpointError(
            f"refusing to load: zip entry {name} is compressed or encrypted, which torch.save never writes "
            f"(compressed entries can expand without bound)"
        )
    if info.file_size != info.compress_size or info.file_size > file_size:
        raise MalformedPickle(f"zip entry {name} claims {info.file_size} bytes in a file of {file_size}")
    return info


def read_zip_checkpoint(file: BoundedFile, size: int, run: Callable[..., Any]) -> Any:
    archive = zipfile.ZipFile(file)  # type: ignore[arg-type]
    pickles = [name for name in archive.namelist() if name.endswith("/data.pkl") and name.count("/") == 1]
    if len(pickles) != 1:
        raise MalformedPickle(
            f"it is a zip archive but not a PyTorch checkpoint: expected one '<folder>/data.pkl' entry, found "
            f"{len(pickles)} among {len(archive.namelist())} entries"
        )
    prefix = pickles[0][: -len("data.pkl")]
    if f"{prefix}byteorder" in archive.namelist():
        info = checked_entry(archive, f"{prefix}byteorder", size)
        if info.file_size > 16 or archive.read(info) != b"little":
            raise MalformedPickle("only little-endian checkpoints are supported")
    info = checked_entry(archive, pickles[0], size)
    if info.file_size > MAX_PICKLE_BYTES:
        raise UnsafeCheckpointError(f"refusing to load: its pickle program is {info.file_size} bytes, more than "
                                    f"{MAX_PICKLE_BYTES}")
    program = archive.read(info)  # at most MAX_PICKLE_BYTES, CRC-checked

    storages: dict[str, LoadedStorage] = {}
    loaded = 0

    def persistent_load(pid: Any) -> LoadedStorage:
        nonlocal loaded
        _, storage_type, key, _location, numel = checked_storage_id(pid)[:5]
        if key not in storages:
            nbytes = numel * storage_type.dtype.itemsize
            record = checked_entry(archive, f"{prefix}data/{key}", size)
            if record.file_size != nbytes:
                raise MalformedPickle(f"storage {key} should hold {nbytes} bytes, its record has {record.file_size}")
            loaded += nbytes
            if loaded > size:  # entries that overlap in the file would otherwise be read again and again
                raise UnsafeCheckpointError("refusing to load: its tensor storages add up to more than the file's size")
            untyped, view = new_storage(nbytes)
            read_zip_entry_into(archive, record, view)
            storages[key] = LoadedStorage(untyped, storage_type.dtype)
        return storages[key]

    return run(io.BytesIO(program), persistent_load)


def read_legacy_checkpoint(file: BoundedFile, size: int, run: Callable[..., Any]) -> Any:
    """torch's pre-1.6 format: pickles of magic, version, sys-info, the object, the storage keys,
    then each storage as an int64 element count and its bytes."""
    magic = run(file, None)
    if not is_int(magic) or magic != LEGACY_MAGIC_NUMBER:
        raise MalformedPickle("it is neither a zip archive nor torch's legacy format (bad magic number)")
    version = run(file, None)
    if not is_int(version) or version != LEGACY_PROTOCOL_VERSION:
        raise MalformedPickle(f"unsupported legacy protocol version {describe(version)}")
    sys_info = run(file, None)
    if not isinstance(sys_info, dict) or sys_info.get("little_endian") is not True:
        raise MalformedPickle("only little-endian checkpoints are supported")

    storages: dict[str, tuple[LoadedStorage, memoryview]] = {}
    reserved = 0

    def persistent_load(pid: Any) -> LoadedStorage:
        nonlocal reserved
        _, storage_type, key, _location, numel = checked_storage_id(pid)[:5]
        if len(pid) != 6 or pid[5] is not None:
            raise MalformedPickle("storage views (checkpoints of torch < 1.0) are not supported")
        if key not in storages:
            nbytes = numel * storage_type.dtype.itemsize
            reserved += nbytes
            if reserved > file.remaining():  # the bytes follow the pickle, so they must fit in the rest
                raise MalformedPickle("its tensor storages are larger than the rest of the file; it is truncated")
            untyped, view = new_storage(nbytes)
            storages[key] = (LoadedStorage(untyped, storage_type.dtype), view)
        return storages[key][0]

    payload = run(file, persistent_load)
    keys = run(file, None)
    if not (isinstance(keys, list) and all(isinstance(key, str) for key in keys)
            and len(set(keys)) == len(keys) and set(keys) == set(storages)):
        raise MalformedPickle("its list of storage keys does not match the storages it uses")
    for key in keys:
        storage, view = storages[key]
        header = file.read(8)
        if len(header) != 8:
            raise MalformedPickle("it ends before all tensor data; the file is truncated")
        count = int.from_bytes(header, "little", signed=True)
        if count * storage.dtype.itemsize != storage.nbytes:
            raise MalformedPickle(f"storage {key} has {count} elements in the data but {storage.nbytes} bytes pickled")
        if file.readinto(view) != len(view):
            raise MalformedPickle("it ends before all tensor data; the file is truncated")
    return payload


def read_checkpoint_payload(path: str | os.PathLike, *, time_budget: float = UNPICKLE_TIME_BUDGET_S) -> Any:
    """The object a ``torch.save`` file (zip or legacy format) holds, read without running code
    from it and with every allocation bounded by the file (see the module docstring).

    Tensors come back as CPU tensors; every global that is not a tensor builder, dtype or plain
    container is an :class:`InertGlobal`. Raises :class:`CheckpointError` (or its subclass
    :class:`UnsafeCheckpointError` for refused content) with a message naming ``path``.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path} does not exist")
    deadline = time.monotonic() + time_budget
    placeholders: dict[tuple[str, str], type[InertGlobal]] = {}
    try:
        with open(path, "rb") as raw:
            size = os.fstat(raw.fileno()).st_size
            if size == 0:
                raise CheckpointError(f"{path} is empty (0 bytes): it is not a checkpoint")
            file = BoundedFile(raw, size)

            def run(source: Any, persistent_load: Callable[[Any], Any] | None) -> Any:
                return BoundedUnpickler(source, persistent_load=persistent_load, deadline=deadline,
                                        placeholders=placeholders).load()

            is_zip = file.read(4) == b"PK\x03\x04"
            file.seek(0)
            return (read_zip_checkpoint if is_zip else read_legacy_checkpoint)(file, size, run)
    except UnsafeCheckpointError as error:
        raise UnsafeCheckpointError(f"{path}: {error}") from None
    except CheckpointError:
        raise
    except MALFORMED_ERRORS as error:
        detail = str(error) if isinstance(error, MalformedPickle) else f"{type(error).__name__}: {error}"
        raise CheckpointError(
            f"{path} is not a readable PyTorch checkpoint ({clip(detail)}): it is truncated or corrupted, "
            f"or not a checkpoint at all"
        ) from None
    except (OSError, RuntimeError) as error:
        raise CheckpointError(f"{path} could not be read ({type(error).__name__}: {clip(str(error))})") from None


def load_taming_state_dict(path: str | os.PathLike) -> dict[str, Tensor]:
    """The raw ``state_dict`` of a Lightning ``.ckpt`` (or of a flat dict of tensors), read safely."""
    path = Path(path)
    payload = read_checkpoint_payload(path)
    state = payload.get("state_dict", payload) if isinstance(payload, dict) else None
    if not isinstance(state, dict) or not state:
        raise CheckpointError(
            f"{path} holds no state_dict (found {type(payload).__name__}); expected a taming/Lightning .ckpt"
        )
    not_strings = [key for key in state if not isinstance(key, str)]
    if not_strings:
        raise CheckpointError(
            f"{path}: the state_dict has {len(not_strings)} keys that are not strings (e.g. a "
            f"{type(not_strings[0]).__name__}); this is not a model checkpoint"
        )
    not_tensors = sorted(key for key, value in state.items() if not isinstance(value, Tensor))
    if not_tensors:
        raise CheckpointError(
            f"{path}: the state_dict has non-tensor entries {[k[:60] for k in not_tensors[:8]]}; "
            f"this is not a model checkpoint"
        )
    return {key: value.detach() for key, value in state.items()}


def convert_taming_state_dict(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Map a taming state dict onto :class:`VQGAN` keys.

    A ``Net2NetTransformer`` (or latent-diffusion model) keeps its VQ-GAN under
    ``first_stage_model.``: only those keys are kept, with the prefix stripped. ``loss.*``
    keys (LPIPS, discriminator) are dropped. Every other key is kept unchanged so that the
    strict load reports anything unexpected.
    """
    if any(key.startswith(NET2NET_PREFIX) for key in state):
        state = {key[len(NET2NET_PREFIX):]: value for key, value in state.items() if key.startswith(NET2NET_PREFIX)}
    return {key: value for key, value in state.items() if not key.startswith(IGNORED_PREFIXES)}


# ---------------------------------------------------------------------------------------------
# Configs
# ---------------------------------------------------------------------------------------------


def nested_item(data: Any, keys: tuple[str, ...], source: str) -> Any:
    for depth, key in enumerate(keys):
        if not isinstance(data, Mapping) or key not in data:
            raise ConfigError(f"{source}: missing '{'.'.join(keys[: depth + 1])}'; is this a taming model config?")
        data = data[key]
    return data


def nested_section(data: Any, keys: tuple[str, ...], source: str) -> Mapping[str, Any]:
    section = nested_item(data, keys, source)
    if not isinstance(section, Mapping):
        raise ConfigError(f"{source}: '{'.'.join(keys)}' should be a mapping, got {type(section).__name__}")
    return section


YAML_FIELDS = {  # VQGANConfig field -> (section, taming key), for messages that name the yaml key
    "resolution": ("ddconfig", "resolution"), "in_channels": ("ddconfig", "in_channels"),
    "out_channels": ("ddconfig", "out_ch"), "channels": ("ddconfig", "ch"),
    "channel_multipliers": ("ddconfig", "ch_mult"), "num_res_blocks": ("ddconfig", "num_res_blocks"),
    "attention_resolutions": ("ddconfig", "attn_resolutions"), "dropout": ("ddconfig", "dropout"),
    "z_channels": ("ddconfig", "z_channels"), "embed_dim": ("params", "embed_dim"),
    "codebook_size": ("params", "n_embed"),
}


def config_from_taming_yaml(path: str | os.PathLike) -> VQGANConfig:
    """Read a taming / latent-diffusion ``*-project.yaml`` / ``config.yaml`` into a :class:`VQGANConfig`.

    Uses ``model.params`` (or ``model.params.first_stage_config.params`` for a
    ``Net2NetTransformer``): ``ddconfig``, ``n_embed`` and ``embed_dim``; a target class whose
    name contains "Gumbel" selects the gumbel quantizer. Values are type- and range-checked; a
    bad one is a :class:`ConfigError` naming its yaml key.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path} does not exist")
    source = str(path)
    if path.stat().st_size > MAX_YAML_BYTES:
        raise ConfigError(f"{source} is larger than {MAX_YAML_BYTES} bytes; a taming config is a few KB")
    try:
        document = yaml.safe_load(path.read_bytes())
    except (yaml.YAMLError, ValueError, RecursionError) as error:
        raise ConfigError(f"{source} is not valid YAML ({clip(str(error))})") from None
    model = nested_section(document, ("model",), source)
    params = nested_section(model, ("params",), source)
    target = model.get("target", "")
    if "first_stage_config" in params:
        target = nested_item(params, ("first_stage_config", "target"), source)
        params = nested_section(params, ("first_stage_config", "params"), source)
    ddconfig = nested_section(params, ("ddconfig",), source)
    double_z = ddconfig.get("double_z", True)
    if not isinstance(double_z, bool):
        raise ConfigError(f"{source}: ddconfig.double_z must be true or false, got {describe(double_z)}")
    if double_z:
        raise ConfigError(f"{source}: ddconfig.double_z is true, which is a KL autoencoder, not a VQ model")
    if params.get("remap") is not None:
        raise ConfigError(f"{source}: index remapping (params.remap) is not supported")
    sections = {"ddconfig": ddconfig, "params": params}
    fields = {
        name: nested_item(sections[section], (key,), source) for name, (section, key) in YAML_FIELDS.items()
        if name != "dropout"
    }
    fields["dropout"] = ddconfig.get("dropout", 0.0)
    for name, value in fields.items():  # yaml aliases can make a nested list an exponential DAG: never walk one
        if isinstance(value, dict) or (isinstance(value, list) and any(isinstance(v, (list, dict)) for v in value)):
            section, key = YAML_FIELDS[name]
            raise ConfigError(f"{source}: {section}.{key} must be a number or a list of numbers", field=name)
    fields["quantizer"] = "gumbel" if isinstance(target, str) and "Gumbel" in target else "vq"
    try:
        return VQGANConfig.from_dict(fields)
    except ConfigError as error:
        section, key = YAML_FIELDS.get(error.field or "", ("", ""))
        where = f" (yaml key {section}.{key})" if key else ""
        raise ConfigError(f"{source}{where}: {error}", field=error.field) from None


def count_indexed(state: Mapping[str, Tensor], pattern: str, limit: int = 1024) -> int:
    """How many consecutive i from 0 have ``pattern.format(i)`` in ``state``."""
    count = 0
    while count < limit and pattern.format(count) in state:
        count += 1
    return count


def shape_of(state: Mapping[str, Tensor], key: str, ndim: int | None = None) -> tuple[int, ...]:
    if key not in state:
        raise CheckpointError(f"not a taming VQ-GAN state dict: missing {key!r}")
    shape = tuple(state[key].shape)
    if ndim is not None and len(shape) != ndim:
        raise CheckpointError(f"not a taming VQ-GAN state dict: {key} has shape {shape}, expected {ndim} dimensions")
    return shape


def architecture_key(config: VQGANConfig) -> tuple:
    """Everything the weights determine: all fields but the resolution, with attention as the set
    of levels that have it (taming places attention at level i when resolution / 2^i is listed)."""
    levels = tuple(i for i in range(len(config.channel_multipliers))
                   if config.resolution // 2**i in config.attention_resolutions)
    return (config.in_channels, config.out_channels, config.channels, config.channel_multipliers,
            config.num_res_blocks, levels, config.z_channels, config.embed_dim, config.codebook_size, config.quantizer)


def resolution_from_presets(config: VQGANConfig) -> int | None:
    """The resolution of the presets whose architecture ``config``'s matches exactly, if they agree."""
    key = architecture_key(config)
    matches = {name: p.resolution for name, p in VQGAN_PRESETS.items() if architecture_key(p) == key}
    if len(set(matches.values())) != 1:
        return None
    name, resolution = next(iter(matches.items()))
    logger.info("training resolution %d taken from preset %r, whose architecture the weights match", resolution, name)
    return resolution


def infer_config_from_state_dict(state: Mapping[str, Tensor], *, resolution: int | None = None) -> VQGANConfig:
    """Read the architecture off tensor shapes of a converted taming state dict.

    The training resolution is not stored in the weights (the network is convolutional; only the
    *levels* with attention are). Given ``resolution``, attention resolutions are placed at those
    levels. Without it, the resolution of the preset whose architecture the weights match exactly
    is used (all public taming / latent-diffusion first stages are 256², the paper's f=32 model is
    1024²); if none (or presets of different resolutions) match, a :class:`ConfigError` asks for it.
    """
    channels, in_channels = shape_of(state, "encoder.conv_in.weight", ndim=4)[:2]
    levels = count_indexed(state, "encoder.down.{}.block.0.conv1.weight")
    num_res_blocks = count_indexed(state, "encoder.down.0.block.{}.conv1.weight")
    if levels == 0 or num_res_blocks == 0 or channels == 0:
        raise CheckpointError("not a taming VQ-GAN state dict: no encoder.down.0.block.0 weights")
    widths = [shape_of(state, f"encoder.down.{i}.block.0.conv2.weight", ndim=4)[0] for i in range(levels)]
    if any(width % channels or width == 0 for width in widths):
        raise CheckpointError(f"encoder widths {widths} are not multiples of channels={channels}")
    attention_levels = [i for i in range(levels) if f"encoder.down.{i}.attn.0.q.weight" in state]
    z_channels = shape_of(state, "decoder.conv_in.weight", ndim=4)[1]
    encoder_out = shape_of(state, "encoder.conv_out.weight", ndim=4)[0]
    if encoder_out == 2 * z_channels:
        raise CheckpointError(
            "encoder.conv_out has 2 * z_channels outputs (double_z): this is a KL autoencoder, not a VQ model"
        )
    if encoder_out != z_channels:
        raise CheckpointError(f"encoder.conv_out has {encoder_out} outputs but decoder.conv_in takes {z_channels}")
    gumbel = "quantize.proj.weight" in state
    codebook_key = "quantize.embed.weight" if gumbel else "quantize.embedding.weight"
    factor = 2 ** (levels - 1)

    def build(side: int) -> VQGANConfig:
        try:
            return VQGANConfig(
                resolution=side,
                in_channels=in_channels,
                out_channels=shape_of(state, "decoder.conv_out.weight", ndim=4)[0],
                channels=channels,
                channel_multipliers=tuple(width // channels for width in widths),
                num_res_blocks=num_res_blocks,
                attention_resolutions=tuple(side // 2**i for i in attention_levels),
                z_channels=z_channels,
                embed_dim=shape_of(state, "quant_conv.weight", ndim=4)[0],
                codebook_size=shape_of(state, codebook_key, ndim=2)[0],
                quantizer="gumbel" if gumbel else "vq",
            )
        except ConfigError as error:
            if error.field == "resolution" and resolution is not None:
                raise
            raise CheckpointError(f"the architecture read off the weights is not a valid VQ-GAN: {error}") from None

    if resolution is not None:
        return build(resolution)
    candidate = build(2 ** max(levels - 1, 8))  # the architecture, at a placeholder resolution
    found = resolution_from_presets(candidate)
    if found is None:
        raise ConfigError(
            f"the training resolution is not stored in the weights, and their architecture (f={factor}, {levels} "
            f"levels, attention at levels {attention_levels}, {candidate.codebook_size} codes) matches no preset; "
            f"give the release's yaml config (config_path / --config) or the resolution it was trained at "
            f"(resolution / --resolution), e.g. 256 for the public taming and latent-diffusion models",
            field="resolution",
        )
    return build(found)


# ---------------------------------------------------------------------------------------------
# Loading and conversion
# ---------------------------------------------------------------------------------------------


def load_taming_vqgan(
    checkpoint_path: str | os.PathLike, *, config_path: str | os.PathLike | None = None, preset: str | None = None,
    resolution: int | None = None,
) -> VQGAN:
    """Build a :class:`VQGAN` from a taming ``.ckpt``, in eval mode.

    The architecture comes from ``config_path`` (the release's yaml) when given, else from the
    named ``preset`` (:data:`sundae.config.VQGAN_PRESETS`), else it is inferred from the weights
    (at ``resolution``, or at the resolution of the preset they match; see
    :func:`infer_config_from_state_dict`). Loading is strict: a :class:`CheckpointError` lists
    missing, unexpected and mis-shaped keys, before the model is allocated.
    """
    if sum(option is not None for option in (config_path, preset, resolution)) > 1:
        raise ConfigError("give one of config_path, preset or resolution, not several")
    state = convert_taming_state_dict(load_taming_state_dict(checkpoint_path))
    if config_path is not None:
        config = config_from_taming_yaml(config_path)
    elif preset is not None:
        config = lookup_preset(preset, VQGAN_PRESETS)
    else:
        config = infer_config_from_state_dict(state, resolution=resolution)
    expected = shapes_on_meta(lambda: VQGAN(config))
    if expected is not None:
        check_state_shapes(expected, {k: tuple(v.shape) for k, v in state.items()}, source=str(checkpoint_path))
    model = VQGAN(config)
    load_state_dict_strict(model, state, source=str(checkpoint_path))
    return model.eval()


def convert_taming(
    checkpoint_path: str | os.PathLike, out_dir: str | os.PathLike, *, config_path: str | os.PathLike | None = None,
    preset: str | None = None, resolution: int | None = None,
) -> Path:
    """Convert a taming ``.ckpt`` to a ``save_pretrained`` directory (``config.json`` +
    ``model.safetensors``) that :meth:`VQGAN.from_pretrained` reads; returns ``out_dir``."""
    model = load_taming_vqgan(checkpoint_path, config_path=config_path, preset=preset, resolution=resolution)
    return model.save_pretrained(out_dir, extra={"converted_from": Path(checkpoint_path).name})


__all__ = [
    "UnsafeCheckpointError", "InertGlobal", "BoundedUnpickler", "read_checkpoint_payload", "load_taming_state_dict",
    "convert_taming_state_dict", "config_from_taming_yaml", "infer_config_from_state_dict", "load_taming_vqgan",
    "convert_taming",
]
