"""Hostile and damaged inputs to the loaders: a corpus of checkpoints that try to run code,
allocate without bound or stall the unpickler, broken containers, and model directories whose
``config.json`` has wrong types or absurd sizes.

Every case must fail fast with one clear error type (``CheckpointError`` for files,
``ConfigError`` for config values) and a message, run nothing from the file, and keep memory
bounded: 1 KB files here would allocate gigabytes (or hang) in ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import builtins
import collections
import json
import os
import pickle
import random
import struct
import subprocess
import time
import tracemalloc
import zipfile
from pathlib import Path
from typing import Callable

import pytest
import torch

from sundae.checkpoint import CheckpointError
from sundae.config import ConfigError, HourglassConfig, VQGANConfig
from sundae.denoiser import Hourglass
from sundae.tokenizer.taming import UnsafeCheckpointError, load_taming_state_dict, read_checkpoint_payload
from sundae.tokenizer.vqgan import VQGAN

MARKER_NAME = "code-ran"
MEMORY_LIMIT = 200 * 2**20
TIME_LIMIT_S = 5.0

# ---------------------------------------------------------------------------------------------
# measuring one load
# ---------------------------------------------------------------------------------------------


def max_rss_bytes() -> int:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def measured(load: Callable[[], object], trace: bool = True) -> tuple[BaseException | None, float, int, int]:
    """Run ``load``; return (its exception, seconds, peak traced Python memory, growth of max RSS).

    tracemalloc sees Python allocations (bytearray, tuples) even when the pages are never touched;
    max RSS sees torch's. ``trace=False`` skips tracemalloc where it would only slow torch code.
    """
    rss_before = max_rss_bytes()
    if trace:
        tracemalloc.start()
    start = time.monotonic()
    error = None
    try:
        load()
    except BaseException as caught:  # noqa: BLE001 - the test inspects whatever came out
        error = caught
    elapsed = time.monotonic() - start
    peak = tracemalloc.get_traced_memory()[1] if trace else 0
    tracemalloc.stop()
    return error, elapsed, peak, max_rss_bytes() - rss_before


# ---------------------------------------------------------------------------------------------
# hand-made pickles and archives
# ---------------------------------------------------------------------------------------------


def op_global(module: str, name: str) -> bytes:
    return pickle.GLOBAL + f"{module}\n{name}\n".encode()


def op_long(value: int) -> bytes:
    data = value.to_bytes((value.bit_length() + 8) // 8, "little", signed=True)
    return pickle.LONG1 + bytes([len(data)]) + data


PROTO2 = pickle.PROTO + b"\x02"

# bytearray(3e9): 3 GB from a 40-byte file
BYTEARRAY_BOMB = PROTO2 + op_global("__builtin__", "bytearray") + op_long(3 * 10**9) + pickle.TUPLE1 + pickle.REDUCE \
    + pickle.STOP
# tuple(bytes(3e8)): 2.4 GB of tuple slots
TUPLE_BOMB = (PROTO2 + op_global("__builtin__", "tuple") + op_global("__builtin__", "bytes") + op_long(3 * 10**8)
              + pickle.TUPLE1 + pickle.REDUCE + pickle.TUPLE1 + pickle.REDUCE + pickle.STOP)
# torch.FloatStorage(1e9): 4 GB
STORAGE_CALL_BOMB = PROTO2 + op_global("torch", "FloatStorage") + op_long(10**9) + pickle.TUPLE1 + pickle.REDUCE \
    + pickle.STOP
# t = (t, t) a hundred times via the memo, then used as a dict key: hashing visits 2^100 nodes
HASH_BOMB = (PROTO2 + pickle.EMPTY_DICT + pickle.EMPTY_TUPLE + pickle.BINPUT + b"\x00" + pickle.POP
             + (pickle.BINGET + b"\x00" + pickle.BINGET + b"\x00" + pickle.TUPLE2 + pickle.BINPUT + b"\x00"
                + pickle.POP) * 100
             + pickle.BINGET + b"\x00" + pickle.BININT1 + b"\x01" + pickle.SETITEM + pickle.STOP)
# the same DAG called as a function: an error message that repr()s it would be 2^100 characters
REPR_BOMB = (PROTO2 + pickle.EMPTY_TUPLE + pickle.BINPUT + b"\x00" + pickle.POP
             + (pickle.BINGET + b"\x00" + pickle.BINGET + b"\x00" + pickle.TUPLE2 + pickle.BINPUT + b"\x00"
                + pickle.POP) * 100
             + pickle.BINGET + b"\x00" + pickle.EMPTY_TUPLE + pickle.REDUCE + pickle.STOP)
# a key nested 20,000 deep: cheap to count, but hashing it recurses that deep in C
DEEP_KEY = (PROTO2 + pickle.EMPTY_DICT + pickle.EMPTY_TUPLE + pickle.TUPLE1 * 20_000 + pickle.BININT1 + b"\x01"
            + pickle.SETITEM + pickle.STOP)
# a 3 GB string length in a 100-byte file (the C unpickler allocates the length first)
HUGE_LENGTH = pickle.PROTO + b"\x04" + pickle.BINUNICODE8 + struct.pack("<Q", 3 * 10**9) + b"x" * 64 + pickle.STOP
# memo index 2^32 - 1 (the C unpickler grows its memo array to it: 32 GB)
MEMO_BOMB = PROTO2 + pickle.NONE + pickle.LONG_BINPUT + b"\xff\xff\xff\xff" + pickle.STOP
# 2^18 nested MARKs: a quarter million empty lists on the metastack (memory grows with the file only)
MARK_FLOOD = PROTO2 + pickle.MARK * 2**18 + pickle.STOP


class SystemGadget:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


class ExecGadget(SystemGadget):
    def __reduce__(self):
        return builtins.exec, (f"open({str(self.marker)!r}, 'w').write('x')",)


class EvalGadget(SystemGadget):
    def __reduce__(self):
        return builtins.eval, (f"open({str(self.marker)!r}, 'w').write('x')",)


class PopenGadget(SystemGadget):
    def __reduce__(self):
        return subprocess.Popen, (["touch", str(self.marker)],)


class GetattrGadget(SystemGadget):
    """The first step of ``getattr(module, 'system')(...)`` chains: builtins.getattr is refused."""

    def __reduce__(self):
        return builtins.getattr, ("", "join")


class StorageRef:
    """Stands for a storage in a hand-made pickle (written as torch's persistent id)."""

    def __init__(self, key: str, numel: int, storage_type=torch.FloatStorage) -> None:
        self.key, self.numel, self.storage_type = key, numel, storage_type


class TensorRef:
    def __init__(self, storage: StorageRef, size: tuple[int, ...], stride: tuple[int, ...]) -> None:
        self.storage, self.size, self.stride = storage, size, stride

    def __reduce__(self):
        return torch._utils._rebuild_tensor_v2, (self.storage, 0, self.size, self.stride, False,
                                                 collections.OrderedDict())


class TorchLikePickler(pickle.Pickler):
    def __init__(self, file, legacy: bool) -> None:
        super().__init__(file, protocol=2)
        self.legacy = legacy

    def persistent_id(self, obj):
        if isinstance(obj, StorageRef):
            pid = ("storage", obj.storage_type, obj.key, "cpu", obj.numel)
            return (*pid, None) if self.legacy else pid
        return None


def torch_pickle(obj: object, legacy: bool = False) -> bytes:
    import io

    buffer = io.BytesIO()
    TorchLikePickler(buffer, legacy).dump(obj)
    return buffer.getvalue()


def write_torch_zip(path: Path, program: bytes, records: dict[str, bytes] | None = None,
                    record_compression: int = zipfile.ZIP_STORED) -> Path:
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("archive/data.pkl", program)
        archive.writestr("archive/byteorder", b"little")
        for key, data in (records or {}).items():
            archive.writestr(f"archive/data/{key}", data, compress_type=record_compression)
    return path


def write_legacy(path: Path, program: bytes, keys: list[str], tail: bytes = b"") -> Path:
    header = pickle.dumps(0x1950A86A20F9469CFC6C, protocol=2) + pickle.dumps(1001, protocol=2)
    header += pickle.dumps({"protocol_version": 1001, "little_endian": True, "type_sizes": {}}, protocol=2)
    path.write_bytes(header + program + pickle.dumps(keys, protocol=2) + tail)
    return path


def small_state() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return collections.OrderedDict(
        {"encoder.conv_in.weight": torch.randn(4, 3, 3, 3, generator=generator), "quantize.embedding.weight":
         torch.randn(8, 4, generator=generator), "encoder.conv_in.bias": torch.zeros(4)}
    )


# ---------------------------------------------------------------------------------------------
# the corpus
# ---------------------------------------------------------------------------------------------


def gadget_in_checkpoint(gadget: type, legacy: bool) -> Callable[[Path, Path], Path]:
    def build(directory: Path, marker: Path) -> Path:
        path = directory / "evil.ckpt"
        torch.save({"state_dict": small_state(), "callbacks": gadget(marker)}, path,
                   _use_new_zipfile_serialization=not legacy)
        return path
    return build


def raw_file(data: bytes | Callable[[Path], bytes]) -> Callable[[Path, Path], Path]:
    def build(directory: Path, marker: Path) -> Path:
        path = directory / "bad.ckpt"
        path.write_bytes(data(marker) if callable(data) else data)
        return path
    return build


def in_zip(program: bytes) -> Callable[[Path, Path], Path]:
    return lambda directory, marker: write_torch_zip(directory / "bad.ckpt", program)


def beside_weights(program: bytes) -> Callable[[Path, Path], Path]:
    """A real zip checkpoint whose data.pkl has the bomb as a second entry next to the weights."""
    def build(directory: Path, marker: Path) -> Path:
        storage = StorageRef("0", 4)
        good = torch_pickle({"state_dict": {"w": TensorRef(storage, (4,), (1,))}})
        assert good.endswith(pickle.SETITEMS + pickle.STOP) or good.endswith(pickle.SETITEM + pickle.STOP)
        bomb = program[2:-1]  # the bomb's value, without PROTO and STOP
        # {"state_dict": ..., "x": <bomb>}: reopen the top dict with SETITEM after the original items
        combined = good[:-1] + pickle.BINUNICODE + struct.pack("<I", 1) + b"x" + bomb + pickle.SETITEM + pickle.STOP
        return write_torch_zip(directory / "bad.ckpt", combined, {"0": torch.arange(4.0).numpy().tobytes()})
    return build


def truncated(legacy: bool) -> Callable[[Path, Path], Path]:
    def build(directory: Path, marker: Path) -> Path:
        path = directory / "cut.ckpt"
        torch.save({"state_dict": small_state()}, path, _use_new_zipfile_serialization=not legacy)
        path.write_bytes(path.read_bytes()[: path.stat().st_size * 2 // 3])
        return path
    return build


def zip_with_entries(entries: dict[str, bytes], compression: int = zipfile.ZIP_STORED) -> Callable[[Path, Path], Path]:
    def build(directory: Path, marker: Path) -> Path:
        path = directory / "odd.ckpt"
        with zipfile.ZipFile(path, "w", compression=compression) as archive:
            for name, data in entries.items():
                archive.writestr(name, data)
        return path
    return build


def flipped_storage_byte(directory: Path, marker: Path) -> Path:
    path = directory / "flipped.ckpt"
    torch.save({"state_dict": {"w": torch.arange(64.0)}}, path)
    data = bytearray(path.read_bytes())
    offset = data.index(torch.arange(64.0).numpy().tobytes())  # the storage record of w
    data[offset + 10] ^= 0x01
    path.write_bytes(bytes(data))
    return path


def storage_numel_lie(directory: Path, marker: Path) -> Path:
    storage = StorageRef("0", 10**9)  # claims 4 GB, the record has 16 bytes
    program = torch_pickle({"state_dict": {"w": TensorRef(storage, (4,), (1,))}})
    return write_torch_zip(directory / "lie.ckpt", program, {"0": bytes(16)})


def tensor_larger_than_storage(directory: Path, marker: Path) -> Path:
    storage = StorageRef("0", 4)
    program = torch_pickle({"state_dict": {"w": TensorRef(storage, (10**9,), (1,))}})  # set_ would grow it
    return write_torch_zip(directory / "lie.ckpt", program, {"0": bytes(16)})


def negative_stride(directory: Path, marker: Path) -> Path:
    storage = StorageRef("0", 4)
    program = torch_pickle({"state_dict": {"w": TensorRef(storage, (4,), (-1,))}})
    return write_torch_zip(directory / "lie.ckpt", program, {"0": bytes(16)})


def legacy_numel_bomb(directory: Path, marker: Path) -> Path:
    storage = StorageRef("0", 10**12)  # 4 TB, allocated up front by torch's legacy loader
    program = torch_pickle({"state_dict": {"w": TensorRef(storage, (4,), (1,))}}, legacy=True)
    return write_legacy(directory / "legacy.ckpt", program, ["0"], struct.pack("<q", 4) + bytes(16))


def legacy_missing_data(directory: Path, marker: Path) -> Path:
    storage = StorageRef("0", 4)
    program = torch_pickle({"state_dict": {"w": TensorRef(storage, (4,), (1,))}}, legacy=True)
    return write_legacy(directory / "legacy.ckpt", program, [], struct.pack("<q", 4) + bytes(16))


def deflate_bomb(directory: Path, marker: Path) -> Path:
    storage = StorageRef("0", 16 * 2**20)  # 64 MB of zeros, 64 KB compressed (a real bomb nests this)
    program = torch_pickle({"state_dict": {"w": TensorRef(storage, (16 * 2**20,), (1,))}})
    return write_torch_zip(directory / "bomb.ckpt", program, {"0": bytes(64 * 2**20)},
                           record_compression=zipfile.ZIP_DEFLATED)


CORPUS: dict[str, tuple[Callable[[Path, Path], Path], str]] = {
    # code execution, inside real checkpoints of both formats and as bare pickles
    **{f"{gadget.__name__}-{'legacy' if legacy else 'zip'}": (gadget_in_checkpoint(gadget, legacy), "refusing to load")
       for gadget in (SystemGadget, ExecGadget, EvalGadget, PopenGadget, GetattrGadget) for legacy in (False, True)},
    "system-raw-pickle": (raw_file(lambda marker: pickle.dumps(SystemGadget(marker), protocol=2)), "refusing to load"),
    "exec-raw-pickle": (raw_file(lambda marker: pickle.dumps(ExecGadget(marker), protocol=4)), "refusing to load"),
    # unbounded allocation and stalls, as bare pickles and as a checkpoint's data.pkl
    **{f"{name}-raw": (raw_file(program), pattern) for name, program, pattern in (
        ("bytearray-bomb", BYTEARRAY_BOMB, "legacy format"), ("tuple-bomb", TUPLE_BOMB, "builtins.bytes"),
        ("storage-call", STORAGE_CALL_BOMB, "never calls"), ("hash-bomb", HASH_BOMB, "hash bomb"),
        ("deep-key", DEEP_KEY, "hash bomb"), ("repr-bomb", REPR_BOMB, "calls <tuple of 2 items>"),
        ("huge-length", HUGE_LENGTH, "larger than"),
        ("memo-bomb", MEMO_BOMB, "legacy format"), ("mark-flood", MARK_FLOOD, "malformed stack"),
    )},
    **{f"{name}-zip": (in_zip(program), pattern) for name, program, pattern in (
        ("bytearray-bomb", BYTEARRAY_BOMB, "no state_dict"), ("tuple-bomb", TUPLE_BOMB, "builtins.bytes"),
        ("storage-call", STORAGE_CALL_BOMB, "never calls"), ("hash-bomb", HASH_BOMB, "hash bomb"),
        ("huge-length", HUGE_LENGTH, "larger than"), ("memo-bomb", MEMO_BOMB, "no state_dict"),
    )},
    "hash-bomb-beside-weights": (beside_weights(HASH_BOMB), "hash bomb"),
    "storage-numel-lie": (storage_numel_lie, "should hold 4000000000 bytes"),
    "tensor-larger-than-storage": (tensor_larger_than_storage, "does not fit in its storage"),
    "negative-stride": (negative_stride, "non-negative"),
    "legacy-numel-bomb": (legacy_numel_bomb, "larger than the rest of the file"),
    "legacy-missing-data": (legacy_missing_data, "storage keys"),
    "deflate-bomb": (deflate_bomb, "compressed"),
    # damaged or foreign files
    "truncated-zip": (truncated(legacy=False), "truncated or corrupted"),
    "truncated-legacy": (truncated(legacy=True), "truncated"),
    "flipped-storage-byte": (flipped_storage_byte, "CRC"),
    "zip-with-wrong-entries": (zip_with_entries({"notes.txt": b"hello"}), "not a PyTorch checkpoint"),
    "zip-with-two-pickles": (zip_with_entries({"a/data.pkl": PROTO2 + pickle.NONE + pickle.STOP,
                                               "b/data.pkl": PROTO2 + pickle.NONE + pickle.STOP}),
                             "not a PyTorch checkpoint"),
    "zip-missing-storage": (zip_with_entries({"archive/data.pkl": torch_pickle(
        {"state_dict": {"w": TensorRef(StorageRef("0", 4), (4,), (1,))}})}), "no entry archive/data/0"),
    "zip-compressed-pickle": (zip_with_entries({"archive/data.pkl": PROTO2 + pickle.NONE + pickle.STOP},
                                               zipfile.ZIP_DEFLATED), "compressed"),
    "random-bytes": (raw_file(random.Random(0).randbytes(4096)), "not a readable PyTorch checkpoint"),
    "zip-magic-then-garbage": (raw_file(b"PK\x03\x04" + random.Random(1).randbytes(4096)), "not a readable"),
    "empty-file": (raw_file(b""), "is empty"),
    "text-file": (raw_file(b"model:\n  target: taming.models.vqgan.VQModel\n"), "not a readable PyTorch checkpoint"),
}


@pytest.mark.parametrize("name", sorted(CORPUS))
def test_hostile_and_damaged_checkpoints_fail_fast_and_cleanly(tmp_path, name: str) -> None:
    build, pattern = CORPUS[name]
    marker = tmp_path / MARKER_NAME
    path = build(tmp_path, marker)
    error, elapsed, peak, rss_growth = measured(lambda: load_taming_state_dict(path))

    assert isinstance(error, CheckpointError), f"{name}: {type(error).__name__}: {error}"
    message = str(error)
    assert str(path) in message and pattern in message, message
    assert "download" not in message  # a hostile file is not to be fetched again
    assert not marker.exists()
    assert elapsed < TIME_LIMIT_S, f"{name} took {elapsed:.1f} s"
    assert peak < MEMORY_LIMIT and rss_growth < MEMORY_LIMIT, f"{name}: {peak >> 20} MB, RSS +{rss_growth >> 20} MB"


def test_allocating_globals_beside_real_weights_stay_inert(tmp_path) -> None:
    """A bomb that is only a hyper-parameter is never called: the weights load, memory stays flat."""
    for program in (BYTEARRAY_BOMB, MEMO_BOMB):
        path = beside_weights(program)(tmp_path, tmp_path / MARKER_NAME)
        state: dict = {}
        error, elapsed, peak, rss_growth = measured(lambda: state.update(load_taming_state_dict(path)))
        assert error is None and torch.equal(state["w"], torch.arange(4.0))
        assert peak < MEMORY_LIMIT and rss_growth < MEMORY_LIMIT and elapsed < TIME_LIMIT_S


def test_the_unpickler_gives_up_after_its_time_budget(tmp_path) -> None:
    path = write_torch_zip(tmp_path / "slow.ckpt", PROTO2 + (pickle.NONE + pickle.POP) * 100_000 + pickle.NONE
                           + pickle.STOP)
    assert read_checkpoint_payload(path) is None
    with pytest.raises(UnsafeCheckpointError, match="time budget"):
        read_checkpoint_payload(path, time_budget=0.0)


@pytest.mark.parametrize("legacy", [False, True])
def test_random_damage_is_either_harmless_or_a_checkpoint_error(tmp_path, legacy: bool) -> None:
    """Flip and cut bytes of a real checkpoint at random: never another exception type, never slow."""
    path = tmp_path / "real.ckpt"
    torch.save({"state_dict": small_state(), "epoch": 3, "hyper_parameters": {"lr": 4.5e-6, "betas": (0.5, 0.9)}},
               path, _use_new_zipfile_serialization=not legacy)
    original = path.read_bytes()
    rng = random.Random(0)
    damaged = tmp_path / "damaged.ckpt"
    start = time.monotonic()
    for trial in range(300):
        data = bytearray(original)
        if trial % 3 == 0:
            data = data[: rng.randrange(len(data))]
        else:
            for _ in range(rng.randint(1, 4)):
                data[rng.randrange(len(data))] = rng.randrange(256)
        damaged.write_bytes(bytes(data))
        try:
            load_taming_state_dict(damaged)
        except CheckpointError as error:
            assert str(damaged) in str(error)
    assert time.monotonic() - start < 30


# ---------------------------------------------------------------------------------------------
# config files of model directories
# ---------------------------------------------------------------------------------------------

TINY_HOURGLASS = HourglassConfig(codebook_size=16, dim=32, depth=(1, 1, 1), heads=2, head_dim=16, latent_shape=(4, 4),
                                 num_classes=3)
TINY_VQGAN = VQGANConfig(resolution=16, channels=32, channel_multipliers=(1, 2), num_res_blocks=1,
                         attention_resolutions=(), z_channels=32, embed_dim=8, codebook_size=16)


def model_dir(tmp_path: Path, model: torch.nn.Module) -> Path:
    torch.manual_seed(0)
    return model.save_pretrained(tmp_path / "model")  # type: ignore[attr-defined]


def edit_config(directory: Path, **changes) -> Path:
    path = directory / "config.json"
    payload = json.loads(path.read_text())
    payload["config"].update(changes)
    path.write_text(json.dumps(payload))
    return path


@pytest.mark.parametrize("changes, field", [
    ({"dim": "128"}, "dim"),
    ({"dim": 128.5}, "dim"),
    ({"dim": True}, "dim"),
    ({"num_classes": "10"}, "num_classes"),
    ({"codebook_size": 10**12}, "codebook_size"),  # 512 TB of embeddings
    ({"codebook_size": 1e12}, "codebook_size"),
    ({"depth": [1, "8", 1]}, "depth"),
    ({"depth": 1.5}, "depth"),
    ({"latent_shape": [4]}, "latent_shape"),
    ({"latent_shape": [4, 10**9]}, "latent_shape"),
    ({"heads": 2**20}, "heads"),
    ({"dropout": "0.1"}, "dropout"),
    ({"resample": 2}, "resample"),
    ({"seed": 3}, "seed"),  # unknown field
])
def test_hourglass_config_fields_are_checked_by_type_and_range(tmp_path, changes: dict, field: str) -> None:
    directory = model_dir(tmp_path, Hourglass(TINY_HOURGLASS))
    config_path = edit_config(directory, **changes)
    error, elapsed, peak, rss_growth = measured(lambda: Hourglass.from_pretrained(directory))
    assert isinstance(error, ConfigError), f"{type(error).__name__}: {error}"
    assert error.field == field and field in str(error) and str(config_path) in str(error)
    assert elapsed < TIME_LIMIT_S and peak < MEMORY_LIMIT and rss_growth < MEMORY_LIMIT


@pytest.mark.parametrize("changes, field", [
    ({"channels": "32"}, "channels"),
    ({"codebook_size": 10**12}, "codebook_size"),
    ({"channel_multipliers": [1, 2.5]}, "channel_multipliers"),
    ({"channel_multipliers": 2}, "channel_multipliers"),
    ({"resolution": [1, 2]}, "resolution"),
    ({"quantizer_legacy": "yes"}, "quantizer_legacy"),
    ({"channels": 2**20}, "channels"),
])
def test_vqgan_config_fields_are_checked_by_type_and_range(tmp_path, changes: dict, field: str) -> None:
    directory = model_dir(tmp_path, VQGAN(TINY_VQGAN))
    edit_config(directory, **changes)
    with pytest.raises(ConfigError, match=field) as caught:
        VQGAN.from_pretrained(directory)
    assert caught.value.field == field


def test_a_config_that_disagrees_with_its_weights_fails_before_allocating(tmp_path) -> None:
    """dim 2048 is valid but would allocate ~0.5 GB; the weights' header says dim 32."""
    directory = model_dir(tmp_path, Hourglass(TINY_HOURGLASS))
    edit_config(directory, dim=2048)
    error, _, _, rss_growth = measured(lambda: Hourglass.from_pretrained(directory), trace=False)
    assert isinstance(error, CheckpointError) and "wrong shape" in str(error)
    assert rss_growth < MEMORY_LIMIT


@pytest.mark.parametrize("text, expected", [
    ('{"class": "Hourglass", "config": null}', "'config': None"),
    ('{"class": "Hourglass"}', "no 'config' entry"),
    ('{"class": "Hourglass", "config": [1, 2]}', "'config': [1, 2]"),
    ('{"class": "Hourglass", "config": "dim=128"}', "'config': 'dim=128'"),
    ('[1, 2, 3]', "should hold a JSON object"),
    ('{"class": "VQGAN", "config": {}}', "holds a 'VQGAN' checkpoint"),
    ('{"class": "Hourglass", "config": {', "not valid JSON"),
    ("[" * 100_000 + "]" * 100_000, "not valid JSON"),
    ('{"class": "Hourglass", "config": {"dim": 1' + "0" * 5000 + "}}", "not valid JSON"),
])
def test_malformed_config_json_is_a_checkpoint_error_naming_the_file(tmp_path, text: str, expected: str) -> None:
    directory = model_dir(tmp_path, Hourglass(TINY_HOURGLASS))
    (directory / "config.json").write_text(text)
    with pytest.raises(CheckpointError) as caught:
        Hourglass.from_pretrained(directory)
    assert str(directory / "config.json") in str(caught.value) and expected in str(caught.value)


def test_config_json_that_is_not_text_or_too_large_is_refused(tmp_path) -> None:
    directory = model_dir(tmp_path, Hourglass(TINY_HOURGLASS))
    (directory / "config.json").write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        Hourglass.from_pretrained(directory)
    with open(directory / "config.json", "wb") as handle:
        handle.truncate(64 * 2**20)  # sparse: no disk used
    with pytest.raises(CheckpointError, match="more than"):
        Hourglass.from_pretrained(directory)


def test_config_types_are_normalised_and_unions_checked() -> None:
    import numpy as np

    config = HourglassConfig.from_dict({**TINY_HOURGLASS.to_dict(), "dropout": 0, "depth": [1, [1, 2, 1], 1]})
    assert config.dropout == 0 and config.depth == (1, (1, 2, 1), 1)
    assert HourglassConfig(**{**TINY_HOURGLASS.to_dict(), "latent_shape": [4, 4], "depth": [1, 1, 1],
                              "dim": np.int64(32)}) == TINY_HOURGLASS
    assert HourglassConfig.from_dict({**TINY_HOURGLASS.to_dict(), "num_classes": None}).num_classes is None
    with pytest.raises(ConfigError, match="an integer or null"):
        HourglassConfig.from_dict({**TINY_HOURGLASS.to_dict(), "num_classes": 2.0})
    with pytest.raises(ConfigError, match="more than"):
        HourglassConfig(dim=2**16, depth=64, heads=1, head_dim=64)  # each size in range, 2^38 parameters in all
    with pytest.raises(ConfigError, match="expected a mapping"):
        VQGANConfig.from_dict(None)
