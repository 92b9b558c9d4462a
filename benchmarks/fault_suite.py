#!/usr/bin/env python
"""The long fault suite: kill -9 during training, a fuzzer for the web app, hostile checkpoints and configs.

Everything goes through the installed ``sundae`` command in child processes, as a user would run it:

1. **kill -9 training.** For each variant (``train-tokenizer`` / ``train`` x dropout 0 / 0.1 (the prior's only:
   the tokenizer command has no dropout flag) x ``--precision float32`` / ``bfloat16``) one uninterrupted
   reference run, then N runs killed with SIGKILL, either at a moment drawn uniformly over the reference's
   duration or at a write: the k-th time (k drawn over the reference run's count) a ``*.staging`` folder, a
   ``.NAME.XXXX.tmp`` file, the rename of one onto its target, a ``*.old`` folder or the swap of a staged
   folder into place appears in the run folder (seen through inotify, so the kill lands within
   microseconds of the event). Each killed run is re-run with the same command until it exits 0; then every
   file of its folder must equal the reference's (``*.safetensors`` and ``training_state.pt`` tensor by
   tensor, bit for bit; JSON and PNG byte for byte), ``metrics.jsonl`` must hold every train step once, with
   the reference's values (timings aside), and no temporary file may remain.
2. **web-app fuzzer.** ``sundae serve`` (the shipped model unless ``--model``) on a free 127.0.0.1 port gets
   seeded random and malformed requests (mutated valid jobs, random JSON, wrong types, huge integers, deep
   nesting, bad base64 / PNG, oversize canvases and bodies, raw-socket protocol abuse) and clients that leave
   mid-stream. Checked: no 5xx, no reset connection, every stream ends in done / error / cancelled and never
   in an internal error, the server's RSS (``/proc/PID/status`` VmRSS, sampled every 50 ms) stays under a
   bound; and for long jobs (sampling, and encode / decode at the canvas limit) cancelled by a disconnect
   (FIN or RST) at a random moment, the time until the server's worker is free (``/api/info``
   ``unfinished_jobs == 0``) is under one second.
3. **hostile corpus.** Pickles with code-running gadgets (each would create a marker file), allocation and
   hash bombs, truncated / empty / random / special files (FIFO, /dev/zero, a folder), zips with wrong entries,
   safetensors with flipped bits or lying headers, ``config.json`` files with wrong types or absurd sizes,
   taming yaml with wrong types, malicious ``training_state.pt`` files, each fed to the command that reads it
   (``convert-taming``, ``sample --model``, ``serve --model``, ``train`` resuming) under ``RLIMIT_AS`` and a
   timeout. Wanted for every payload: exit 2, one ``error:`` line (log lines aside) and no traceback, no
   marker file, peak RSS (``wait4``) under a bound.

Failures are listed, never hidden: the exit status is 1 when any check failed.

    nice -n 19 env OMP_NUM_THREADS=1 SUNDAE_THREADS=1 python benchmarks/fault_suite.py --quick \
        --out benchmarks/results/fault-suite.json

``--quick`` (a few minutes on a busy 2-core machine): 3 kills per variant, 300 requests, the corpus's main
cases. The full run: 20 kills per variant (1-3 kills each before a run may finish), 3000 requests, every
payload, and each training run started as a fresh ``sundae`` process (``--launcher exec``); quick mode forks
each run from this process, which has torch imported already (the same CLI code, a second less per run).
"""

from __future__ import annotations

import argparse
import base64
import collections
import contextlib
import ctypes
import io
import json
import os
import pickle
import platform
import random
import re
import resource
import select
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

# Heavy imports (torch, sundae) happen in main(), after the arguments are read.

LOG_LINE = re.compile(r"^\d{4}-\d{2}-\d{2} \d{2}:\d{2}:\d{2},\d{3} (DEBUG|INFO|WARNING) ")
TIMING_KEY = re.compile(r"(^time$|seconds|per_second|matmul_fraction)")  # wall-clock figures differ run to run
TEMPORARY = re.compile(r"(^\..+\.tmp$|\.staging$|\.old$)")


def sundae_command() -> list[str]:
    """The console script beside this interpreter (the one a user runs), else ``python -m sundae.cli``."""
    script = Path(sys.executable).with_name("sundae")
    return [str(script)] if script.is_file() else [sys.executable, "-m", "sundae.cli"]


def child_env() -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", "1")
    env.setdefault("SUNDAE_THREADS", "1")
    env["PYTHONUNBUFFERED"] = "1"
    env["PYTHONFAULTHANDLER"] = "1"  # a hung child is sent SIGABRT, which then prints its Python stacks
    env.pop("PYTHONWARNINGS", None)
    return env


def say(message: str) -> None:
    print(message, flush=True)


# =============================================================================================
# child processes, reaped with wait4 (exit status and peak RSS of exactly that process)
# =============================================================================================


class Child:
    def __init__(self, pid: int, popen: subprocess.Popen | None = None) -> None:
        self.pid, self.popen = pid, popen
        self.started = time.monotonic()
        self.ended: float | None = None
        self.returncode: int | None = None
        self.maxrss_kib = 0

    def _reaped(self, status: int, usage: Any) -> None:
        self.returncode = os.waitstatus_to_exitcode(status)
        self.maxrss_kib = usage.ru_maxrss
        self.ended = time.monotonic()
        if self.popen is not None:
            self.popen.returncode = self.returncode  # reaped here; Popen must not wait again

    def poll(self) -> int | None:
        if self.returncode is None:
            pid, status, usage = os.wait4(self.pid, os.WNOHANG)
            if pid:
                self._reaped(status, usage)
        return self.returncode

    def wait(self, timeout: float) -> int | None:
        deadline = time.monotonic() + timeout
        while self.poll() is None:
            if time.monotonic() > deadline:
                return None
            time.sleep(0.01)
        return self.returncode

    def state(self) -> str:
        """The kernel's one-letter state: R running or runnable, S sleeping, D in uninterruptible I/O."""
        try:
            return Path(f"/proc/{self.pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            return "?"

    def diagnose(self) -> str:
        """What a hung process is doing: its state, kernel wait channel, and (faulthandler) Python stacks."""
        facts = []
        with contextlib.suppress(OSError):
            facts.append(f"state {Path(f'/proc/{self.pid}/stat').read_text().split(')')[1].split()[0]}")
        with contextlib.suppress(OSError):
            facts.append(f"wchan {Path(f'/proc/{self.pid}/wchan').read_text().strip() or '-'}")
        with contextlib.suppress(OSError):
            stack = Path(f"/proc/{self.pid}/stack").read_text().split()
            facts.append("kernel stack " + " ".join(stack[1:8:2]))
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.pid, signal.SIGABRT)  # faulthandler (enabled in every child) prints each thread's stack
        self.wait(5)
        return ", ".join(facts)

    def kill(self) -> None:
        if self.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGKILL)
            _, status, usage = os.wait4(self.pid, 0)
            self._reaped(status, usage)

    @property
    def seconds(self) -> float:
        return (self.ended or time.monotonic()) - self.started


def preload() -> bool:
    """Import every sundae module here, at one moment, so that forked runs use one consistent snapshot of the
    code (a child importing a module from disk while others edit the tree could mix versions); False if
    the tree does not import right now (then runs are exec'd)."""
    import importlib
    import pkgutil

    import sundae

    try:
        for module in pkgutil.walk_packages(sundae.__path__, "sundae."):
            importlib.import_module(module.name)
    except Exception as error:  # noqa: BLE001 - a tree being edited; fall back to fresh processes
        say(f"  (cannot preload sundae: {type(error).__name__}: {error}; starting a fresh process per run)")
        return False
    return True


def _forked_cli(argv: list[str], cwd: Path, stdout: Path, stderr: Path, preexec: Callable[[], None] | None) -> None:
    """Body of a forked child: run ``sundae ARGV`` in this process and exit with its status."""
    code = 1
    try:
        if preexec is not None:
            preexec()
        import faulthandler

        faulthandler.enable()
        os.dup2(os.open(stdout, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644), 1)
        os.dup2(os.open(stderr, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644), 2)
        os.chdir(cwd)
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        from sundae.cli import main as cli

        try:
            cli.main(args=list(argv), prog_name="sundae", standalone_mode=True)
            code = 0
        except SystemExit as exit_:
            code = exit_.code if isinstance(exit_.code, int) else (0 if exit_.code is None else 1)
    except BaseException:  # noqa: BLE001 - the child reports and exits, never returns to the suite
        traceback.print_exc()
    finally:
        with contextlib.suppress(Exception):
            sys.stdout.flush()
            sys.stderr.flush()
        os._exit(code)


def launch(argv: list[str], *, cwd: Path, stdout: Path, stderr: Path | None = None, fork: bool = False,
           preexec: Callable[[], None] | None = None) -> Child:
    """Start ``sundae ARGV``; output is appended to ``stdout`` (and ``stderr``, default: the same file)."""
    stderr = stderr or stdout
    if fork:
        if threading.active_count() != 1:
            raise RuntimeError("fork launcher used while threads run")
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            _forked_cli(argv, cwd, stdout, stderr, preexec)
        return Child(pid)
    with open(stdout, "ab") as out, open(stderr, "ab") if stderr != stdout else contextlib.nullcontext(out) as err:
        popen = subprocess.Popen([*sundae_command(), *argv], cwd=cwd, stdout=out, stderr=err, stdin=subprocess.DEVNULL,
                                 env=child_env(), preexec_fn=preexec)
    return Child(popen.pid, popen)


def tail(path: Path, lines: int = 6) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return ""
    kept = [line.strip() for line in text.replace("\r", "\n").splitlines() if line.strip()]
    return " | ".join(kept[-lines:])


# =============================================================================================
# part 1: kill -9 during training
# =============================================================================================

IN_MOVED_FROM, IN_MOVED_TO, IN_CREATE, IN_ISDIR = 0x40, 0x80, 0x100, 0x40000000
STARVED: list[str] = []  # runs that outlived their timeout while runnable (CPU starvation, reported)


def classify_event(name: str, mask: int) -> str | None:
    """Which step of an atomic write an inotify event is (see sundae.checkpoint.atomic_path and
    sundae.training.common.replace_directory_atomically), or None."""
    is_dir = bool(mask & IN_ISDIR)
    if mask & IN_CREATE and is_dir and name.endswith(".staging"):
        return "staging"
    if mask & IN_CREATE and not is_dir and name.startswith(".") and name.endswith(".tmp"):
        return "tmp"
    if mask & IN_MOVED_FROM and name.endswith(".tmp"):
        return "rename"  # a finished temporary file renamed onto its target
    if mask & IN_MOVED_TO and is_dir and name.endswith(".old"):
        return "swap-old"  # between the two renames of a folder swap
    if mask & IN_MOVED_TO and is_dir and not name.endswith((".old", ".staging")):
        return "swap-in"  # the staged folder is in place; the old one not yet deleted
    return None


class WriteWatcher:
    """inotify on a run folder and on every folder made inside it."""

    MASK = IN_CREATE | IN_MOVED_FROM | IN_MOVED_TO

    def __init__(self, root: Path) -> None:
        self.libc = ctypes.CDLL(None, use_errno=True)
        self.fd = self.libc.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC)
        if self.fd < 0:
            raise OSError(ctypes.get_errno(), "inotify_init1 failed")
        self.paths: dict[int, Path] = {}
        self.add(root)

    def add(self, directory: Path) -> None:
        wd = self.libc.inotify_add_watch(self.fd, os.fsencode(directory), self.MASK)
        if wd >= 0:
            self.paths[wd] = directory

    def events(self, timeout: float) -> list[tuple[str, Path]]:
        ready, _, _ = select.select([self.fd], [], [], timeout)
        if not ready:
            return []
        try:
            data = os.read(self.fd, 1 << 16)
        except BlockingIOError:
            return []
        found, offset = [], 0
        while offset + 16 <= len(data):
            wd, mask, _, length = struct.unpack_from("iIII", data, offset)
            name = data[offset + 16: offset + 16 + length].rstrip(b"\0").decode(errors="replace")
            offset += 16 + length
            parent = self.paths.get(wd)
            if parent is None or not name:
                continue
            if mask & IN_ISDIR and mask & (IN_CREATE | IN_MOVED_TO):
                self.add(parent / name)
            kind = classify_event(name, mask)
            if kind is not None:
                found.append((kind, parent / name))
        return found

    def close(self) -> None:
        os.close(self.fd)


@dataclass(frozen=True)
class Variant:
    name: str
    command: str
    data: Path
    flags: tuple[str, ...]
    steps: int

    def argv(self, out: Path) -> list[str]:
        return [self.command, str(self.data), "--output-dir", str(out), *self.flags]


def tiny_data(directory: Path) -> tuple[Path, Path]:
    """16 tiny PNGs for the tokenizer and an MNIST-style pixel .npz for the prior (tests/conftest.py)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    images = directory / "images"
    images.mkdir(parents=True, exist_ok=True)
    for index in range(16):
        array = np.zeros((16, 16, 3), dtype=np.uint8)
        top, left = rng.integers(0, 8, size=2)
        array[top:top + 8, left:left + 8] = rng.integers(40, 255, size=3)
        Image.fromarray(array).save(images / f"{index:03d}.png")
    count, side, classes = 48, 8, 3
    labels = np.arange(count) % classes
    pixels = rng.integers(0, 40, size=(count, side, side), dtype=np.uint8)
    for index, label in enumerate(labels):
        pixels[index, label * side // classes:(label + 1) * side // classes, :] = 220
    npz = directory / "pixels.npz"
    np.savez_compressed(npz, images=pixels, labels=labels.astype(np.uint8),
                        split=(np.arange(count) % 6 == 5).astype(np.uint8),
                        class_names=np.array([f"class{c}" for c in range(classes)]), source=np.array("fault-suite"),
                        licence=np.array("fault-suite"))
    return images, npz


def training_variants(images: Path, npz: Path, steps: int) -> list[Variant]:
    tokenizer = ("--preset", "tiny-f4", "--resolution", "16", "--channels", "32", "--channel-multipliers", "1,2",
                 "--codebook-size", "16", "--embed-dim", "8", "--perceptual", "none", "--discriminator-start", "3",
                 "--discriminator-layers", "1", "--revive-dead-codes-every", "3", "--batch-size", "4",
                 "--steps", str(steps), "--checkpoint-every", "2", "--log-every", "1", "--image-every", "4",
                 "--device", "cpu")
    prior = ("--preset", "tiny", "--dim", "32", "--heads", "2", "--head-dim", "16", "--depth", "1,1,1",
             "--steps", str(steps), "--batch-size", "4", "--warmup-steps", "2", "--checkpoint-every", "2",
             "--eval-every", "4", "--eval-batches", "2", "--sample-every", "6", "--sample-steps", "2",
             "--log-every", "1", "--ema-decay", "0.9", "--device", "cpu")
    variants = []
    for precision in ("float32", "bfloat16"):
        variants.append(Variant(f"tokenizer-{precision}", "train-tokenizer", images,
                                (*tokenizer, "--precision", precision), steps))
    for dropout in ("0", "0.1"):
        for precision in ("float32", "bfloat16"):
            variants.append(Variant(f"prior-dropout{dropout}-{precision}", "train", npz,
                                    (*prior, "--dropout", dropout, "--precision", precision), steps))
    return variants


def leftovers(directory: Path) -> list[str]:
    return sorted(str(path.relative_to(directory)) for path in directory.rglob("*") if TEMPORARY.search(path.name))


def supervise(child: Child, *, timeout: float, kill_at: float | None = None, watcher: WriteWatcher | None = None,
              kill_on: tuple[str, int] | None = None, counts: collections.Counter | None = None) -> tuple[str, str]:
    """Wait for ``child``; SIGKILL it ``kill_at`` seconds after its start, or at the k-th write event of a kind.
    Returns (``exited`` | ``killed`` | ``timeout``, what the kill landed on)."""
    counts = collections.Counter() if counts is None else counts
    deadline = child.started + timeout
    while True:
        if child.poll() is not None:
            return "exited", ""
        now = time.monotonic()
        if now > deadline:
            # runnable but not done: starved of CPU by other work on the machine (this suite runs at nice 19),
            # not hung; give it up to 10x longer before calling it a hang
            if child.state() == "R" and now - child.started < 10 * timeout:
                STARVED.append(f"pid {child.pid} runnable after {now - child.started:.0f}s")
                deadline = now + timeout
                continue
            facts = child.diagnose()
            child.kill()
            return "timeout", facts
        if kill_at is not None and now - child.started >= kill_at:
            child.kill()
            return "killed", f"t={kill_at:.2f}s"
        wait = 0.02 if kill_at is None else max(0.0, min(0.005, kill_at - (now - child.started)))
        if watcher is None:
            time.sleep(wait)
            continue
        for kind, path in watcher.events(wait):
            counts[kind] += 1
            if kill_on is not None and kind == kill_on[0] and counts[kind] == kill_on[1]:
                child.kill()
                return "killed", f"{kind} #{kill_on[1]} ({path.name})"


def load_tensors_equal(a: Any, b: Any, where: str, problems: list[str]) -> None:
    """Recursive bit-for-bit comparison of loaded training state / tensors."""
    import torch

    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        if not (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)):
            problems.append(f"{where}: tensor vs {type(b).__name__}")
        elif a.dtype != b.dtype or a.shape != b.shape:
            problems.append(f"{where}: {a.dtype}{tuple(a.shape)} vs {b.dtype}{tuple(b.shape)}")
        elif not torch.equal(a.detach().contiguous().reshape(-1).view(torch.uint8),
                             b.detach().contiguous().reshape(-1).view(torch.uint8)):
            problems.append(f"{where}: values differ")
    elif isinstance(a, dict) and isinstance(b, dict):
        if set(a) != set(b):
            problems.append(f"{where}: keys differ ({sorted(map(str, set(a) ^ set(b)))[:4]})")
        for key in sorted(set(a) & set(b), key=str):
            load_tensors_equal(a[key], b[key], f"{where}.{key}", problems)
    elif isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)) and len(a) == len(b):
        for index, (x, y) in enumerate(zip(a, b)):
            load_tensors_equal(x, y, f"{where}[{index}]", problems)
    elif a != b:
        problems.append(f"{where}: {str(a)[:40]} vs {str(b)[:40]}")


def compare_runs(reference: Path, trial: Path, steps: int) -> list[str]:
    """Everything that differs between a killed-and-resumed run folder and the uninterrupted one."""
    import torch
    from safetensors.torch import load_file

    problems = [f"leftover {name}" for name in leftovers(trial)]

    def files(root: Path) -> set[str]:
        return {str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()
                and "tensorboard" not in p.parts and p.name != "metrics.jsonl" and not TEMPORARY.search(p.name)}

    ours, theirs = files(trial), files(reference)
    problems += [f"missing {name}" for name in sorted(theirs - ours)]
    problems += [f"extra {name}" for name in sorted(ours - theirs)]
    for name in sorted(ours & theirs):
        a, b = reference / name, trial / name
        loader = {".safetensors": lambda path: load_file(str(path)),
                  ".pt": lambda path: torch.load(path, weights_only=True)}.get(Path(name).suffix)
        if loader is not None:  # tensor by tensor first: says which tensor differs
            before = len(problems)
            try:
                load_tensors_equal(loader(a), loader(b), name, problems)
            except Exception as error:  # noqa: BLE001 - an unreadable file is a finding
                problems.append(f"{name}: unreadable ({type(error).__name__}: {error})")
            if len(problems) > before:
                continue
        if name.endswith(".pt"):
            continue  # torch.save names its zip records after the (random) temporary file: bytes always differ
        ours_bytes, theirs_bytes = b.read_bytes(), a.read_bytes()
        if name.endswith(".json"):  # the run folder's own path is recorded in its configs
            ours_bytes = ours_bytes.replace(str(trial).encode(), str(reference).encode())
        if ours_bytes != theirs_bytes:
            problems.append(f"{name}: {'tensors equal but ' if loader else ''}bytes differ")
    problems += compare_metrics(reference / "metrics.jsonl", trial / "metrics.jsonl", steps)
    return problems


def metric_rows(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def compare_metrics(reference: Path, trial: Path, steps: int) -> list[str]:
    try:
        rows, expected = metric_rows(trial), metric_rows(reference)
    except (OSError, ValueError) as error:
        return [f"metrics.jsonl unreadable ({type(error).__name__}: {error})"]
    problems = []
    train_steps = [row["step"] for row in rows if any(key.startswith("train/") for key in row)]
    if train_steps != list(range(1, steps + 1)):
        counts = collections.Counter(train_steps)
        twice = sorted(step for step, count in counts.items() if count > 1)
        missing = sorted(set(range(1, steps + 1)) - set(counts))
        problems.append(f"metrics.jsonl train steps: repeated {twice}, missing {missing}, order {train_steps[:16]}")

    def untimed(row: dict[str, Any]) -> dict[str, Any]:
        return {key: value for key, value in row.items() if not TIMING_KEY.search(key)}

    ours, theirs = [untimed(row) for row in rows], [untimed(row) for row in expected]
    if ours != theirs and not problems:
        for index, (a, b) in enumerate(zip(theirs, ours)):
            if a != b:
                keys = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
                problems.append(f"metrics.jsonl row {index} (step {a.get('step')}) differs in {keys[:4]}")
                break
        else:
            problems.append(f"metrics.jsonl has {len(ours)} rows, the reference {len(theirs)}")
    return problems


def kill_plan(rng: random.Random, trial: int, full: bool) -> list[str]:
    """The kills of one trial, in order: ``random`` or a write kind."""
    cycle = ("random", "tmp", "swap-old", "staging", "rename", "random", "swap-in")
    if not full:
        return [cycle[trial % len(cycle)]]
    return [cycle[(trial + i) % len(cycle)] if i == 0 else rng.choice(cycle) for i in range(rng.randint(1, 3))]


def run_kill_variant(variant: Variant, root: Path, *, trials: int, full: bool, fork: bool, rng: random.Random,
                     timeout: float) -> dict[str, Any]:
    work = root / variant.name
    work.mkdir(parents=True)
    reference = work / "reference"
    reference.mkdir()
    watcher = WriteWatcher(reference)
    counts: collections.Counter = collections.Counter()
    child = launch(variant.argv(reference), cwd=work, stdout=work / "reference.log", fork=fork)
    outcome, _ = supervise(child, timeout=timeout, watcher=watcher, counts=counts)
    watcher.close()
    result: dict[str, Any] = {"trials": trials, "survived": 0, "failed": 0, "kills": 0, "kills_mid_write": 0,
                              "kills_missed": 0, "reference_seconds": round(child.seconds, 2),
                              "reference_write_events": dict(counts), "failures": [], "trial_log": []}
    if outcome != "exited" or child.returncode != 0:
        result["failed"] = trials
        result["failures"].append(f"reference run {outcome}, exit {child.returncode}: {tail(work / 'reference.log')}")
        return result
    duration = child.seconds
    run_timeout = max(timeout, 10 * duration)
    for trial in range(trials):
        out = work / f"trial{trial:02d}"
        out.mkdir()
        log = work / f"trial{trial:02d}.log"
        plan = kill_plan(rng, trial, full)
        landed: list[str] = []
        problems: list[str] = []
        attempts = 0
        while True:
            attempts += 1
            kind = plan[len(landed)] if len(landed) < len(plan) else None
            watcher = WriteWatcher(out) if kind not in (None, "random") else None
            kill_at = rng.uniform(0.0, duration) if kind == "random" else None
            kill_on = None
            if watcher is not None:
                available = counts.get(kind, 0)
                if available == 0:  # the reference never did this write: kill at a random moment instead
                    watcher.close()
                    watcher, kill_at = None, rng.uniform(0.0, duration)
                else:
                    kill_on = (kind, rng.randint(1, max(1, available // (1 + len(landed)))))
            child = launch(variant.argv(out), cwd=work, stdout=log, fork=fork)
            outcome, where = supervise(child, timeout=run_timeout, kill_at=kill_at, watcher=watcher, kill_on=kill_on)
            if watcher is not None:
                watcher.close()
            if outcome == "killed":
                debris = leftovers(out)
                landed.append(f"{where}{' with ' + ', '.join(debris[:3]) if debris else ''}")
                result["kills"] += 1
                result["kills_mid_write"] += bool(debris)
                continue
            if outcome == "timeout":
                problems.append(f"run {attempts} (after kills: {landed}) hung (> {run_timeout:.0f}s; {where}): "
                                f"{tail(log, 14)}")
                break
            if child.returncode != 0:
                problems.append(f"run {attempts} (after kills: {landed}) exited {child.returncode}: {tail(log)}")
                break
            if kind is not None:
                result["kills_missed"] += 1  # the run finished before the planned kill
            break
        if not problems:
            problems = compare_runs(reference, out, variant.steps)
        entry = {"trial": trial, "plan": plan, "kills": landed, "runs": attempts, "ok": not problems,
                 "problems": problems[:8]}
        result["trial_log"].append(entry)
        if problems:
            result["failed"] += 1
            result["failures"].append(f"trial {trial} kills {landed}: {'; '.join(problems[:6])}")
        else:
            result["survived"] += 1
            shutil.rmtree(out, ignore_errors=True)
        say(f"  {variant.name} trial {trial}: {'ok' if not problems else 'FAIL'} after {len(landed)} kill(s) "
            f"{landed} {'' if not problems else '; '.join(problems[:3])}")
    return result


def part_kill(root: Path, args: argparse.Namespace, rng: random.Random) -> dict[str, Any]:
    data = root / "data"
    images, npz = tiny_data(data)
    fork = args.launcher == "fork" and preload()
    variants = {}
    for variant in training_variants(images, npz, args.train_steps):
        if args.variants and not any(word in variant.name for word in args.variants.split(",")):
            continue
        started = time.monotonic()
        variants[variant.name] = run_kill_variant(variant, root / "kill", trials=args.kills, full=not args.quick,
                                                  fork=fork, rng=rng, timeout=args.run_timeout)
        variants[variant.name]["seconds"] = round(time.monotonic() - started, 1)
        figures = variants[variant.name]
        say(f"kill -9 {variant.name}: {figures['survived']}/{figures['trials']} survived, {figures['kills']} kills "
            f"({figures['kills_mid_write']} left write debris, {figures['kills_missed']} missed), reference "
            f"{figures['reference_seconds']}s")
    return {"launcher": args.launcher, "train_steps": args.train_steps, "kills_per_variant": args.kills,
            "starved_runs": list(STARVED),
            "variants": variants,
            "kills_survived": sum(v["survived"] for v in variants.values()),
            "trials": sum(v["trials"] for v in variants.values()),
            "kills": sum(v["kills"] for v in variants.values()),
            "failures": [f"{name}: {failure}" for name, v in variants.items() for failure in v["failures"]]}


# =============================================================================================
# part 2: the web-app fuzzer
# =============================================================================================


class RssSampler(threading.Thread):
    def __init__(self, pid: int, interval: float = 0.05) -> None:
        super().__init__(daemon=True)
        self.pid, self.interval = pid, interval
        self.samples: list[tuple[float, int]] = []
        self.stop = threading.Event()

    def read(self) -> int | None:
        try:
            with open(f"/proc/{self.pid}/status") as handle:
                for line in handle:
                    if line.startswith("VmRSS:"):
                        return int(line.split()[1])
        except OSError:
            return None
        return None

    def run(self) -> None:
        while not self.stop.wait(self.interval):
            value = self.read()
            if value is not None:
                self.samples.append((time.monotonic(), value))

    @property
    def peak_mb(self) -> float:
        return max((kib for _, kib in self.samples), default=0) / 1024


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def encoded_image(image: Any, fmt: str = "PNG", bare: bool = False) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    data = base64.b64encode(buffer.getvalue()).decode()
    return data if bare else f"data:image/{fmt.lower()};base64,{data}"


def fuzz_images(rng: random.Random, facts: dict[str, Any], limits: dict[str, Any]) -> dict[str, list[str]]:
    """Valid and broken image fields for the served model."""
    import numpy as np
    from PIL import Image

    height, width = facts["image_size"]
    mode = "L" if facts["channels"] == 1 else "RGB"
    max_h, max_w = limits["max_canvas"]
    generator = np.random.default_rng(rng.randrange(2**32))

    def picture(h: int, w: int, value: int | None = None) -> Any:
        shape = (h, w) if mode == "L" else (h, w, 3)
        array = np.full(shape, value, np.uint8) if value is not None else generator.integers(0, 256, shape, np.uint8)
        return Image.fromarray(array, mode)

    good = picture(height, width)
    mask = picture(height, width, 255)
    half = np.zeros((height, width), np.uint8)
    half[:, width // 2:] = 255
    valid = [encoded_image(good), encoded_image(good, bare=True), encoded_image(good.convert("RGB"), "JPEG"),
             encoded_image(good.convert("RGBA")), encoded_image(good.convert("P")), encoded_image(good, "BMP"),
             encoded_image(good, "GIF"), encoded_image(good.convert("RGB"), "WEBP")]
    masks = [encoded_image(mask), encoded_image(Image.fromarray(half)), encoded_image(picture(height, width, 0))]
    png = encoded_image(good)
    broken = [
        png[: len(png) // 2], png + "AAAA", png.replace("A", "*", 3), "data:image/png;base64,", "data:,", "", "@@@",
        "data:image/png;base64," + base64.b64encode(b"\x89PNG\r\n\x1a\n" + bytes(40)).decode(),
        "data:image/png;base64," + base64.b64encode(rng.randbytes(256)).decode(),
        "data:image/svg+xml;base64," + base64.b64encode(b"<svg xmlns='http://www.w3.org/2000/svg'/>").decode(),
        encoded_image(picture(height + 1, width)), encoded_image(picture(max_h + facts["factor"], max_w)),
        encoded_image(Image.new("L", (5000, 1))), encoded_image(Image.new("L", (1, 1))),
        encoded_image(Image.new("L", (4096, 4096))),  # 4096² zeros: a few KB of PNG, far over the canvas limit
        encoded_image(Image.new("I;16", (width, height))), encoded_image(Image.new("1", (width, height))),
        encoded_image(Image.new("F", (width, height)), "TIFF"),
    ]
    return {"valid": valid, "masks": masks, "broken": broken}


def fuzz_value(rng: random.Random, images: list[str], depth: int = 0) -> Any:
    kind = rng.randrange(9 if depth < 3 else 6)
    if kind == 0:
        return rng.choice([None, True, False])
    if kind == 1:
        return rng.choice([0, 1, 2, 3, 4, 7, 8, 16, 24, 28, 112, -1, -8, 2**31, 2**53, 2**53 + 1, 2**63, 10**25,
                           -(10**29), 10**29])
    if kind == 2:
        return rng.choice([0.0, 0.5, 1.0, -0.1, 1e-300, 5e-324, 1e308, -1e308, 49.9, 50.1, 10.0, 10.000001,
                           float("nan"), float("inf"), -float("inf"), 2.0**53])
    if kind == 3:
        return rng.choice(["", "50", "dots", "class0", "T-shirt/top", "Trouser", "-1", "٣", "²", "any", "all",
                           "x" * 300, "../../etc/passwd", "\u0000", "1" * 50, "\ud800", "null", "true", "{}"])
    if kind in (4, 5):
        return rng.choice(images)
    if kind in (6, 7):
        return [fuzz_value(rng, images, depth + 1) for _ in range(rng.randrange(4))]
    return {rng.choice(["steps", "image", "a", "", "__proto__"]): fuzz_value(rng, images, depth + 1)
            for _ in range(rng.randrange(3))}


FIELDS = ["steps", "num_images", "seed", "temperature", "end_temperature", "proportion", "class_label",
          "guidance_scale", "early_stop", "image", "mask", "mask_rule", "paste_back", "strength", "left", "top",
          "right", "bottom", "unknown", "__proto__", "constructor"]


@dataclass
class Case:
    method: str
    path: str
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)
    leave: str = ""  # "" read all; "queued": leave after the first line; "started": after the job started
    note: str = ""


def json_bytes(value: Any) -> bytes:
    return json.dumps(value, allow_nan=True).encode()


def fuzz_case(rng: random.Random, pools: dict[str, list[str]], facts: dict[str, Any]) -> Case:
    """One request: mostly mutated valid jobs, then random values, raw byte bodies and odd methods."""
    kind = rng.choice(["generate", "generate", "inpaint", "refine", "outpaint"])
    path = f"/api/{kind}"
    all_images = pools["valid"] + pools["masks"] + pools["broken"]
    body: dict[str, Any] = {"steps": rng.randrange(1, 4), "num_images": rng.randrange(1, 3),
                            "seed": rng.randrange(1000)}
    if kind != "generate":
        body["image"] = rng.choice(pools["valid"]) if rng.random() < 0.8 else rng.choice(pools["broken"])
    if kind in ("inpaint", "refine"):
        body["mask"] = rng.choice(pools["masks"])
    if kind == "outpaint":
        factor = facts["factor"]
        body[rng.choice(["left", "top", "right", "bottom"])] = rng.choice(
            [factor, 2 * factor, 4 * factor, factor + 1, 10**6, -factor, 0, 1])
    if facts.get("class_names") and rng.random() < 0.3:
        body["class_label"] = rng.choice([*facts["class_names"], 0, len(facts["class_names"]), -1, "nope"])
    for _ in range(rng.choice([0, 0, 1, 1, 2, 3])):
        if body and rng.random() < 0.25:
            body.pop(rng.choice(sorted(body)))
        else:
            body[rng.choice(FIELDS)] = fuzz_value(rng, all_images)
    steps = body.get("steps", 50)
    images = body.get("num_images", 4)
    heavy = not (isinstance(steps, int) and isinstance(images, int) and steps * images <= 12)
    leave = "queued" if heavy else ("started" if rng.random() < 0.1 else "")
    shape = rng.random()
    headers = {"content-type": rng.choice(["application/json"] * 14 + ["text/plain", "application/json; charset=utf-8",
                                                                        "application/x-www-form-urlencoded", ""])}
    if shape < 0.72:
        return Case("POST", path, json_bytes(body), headers, leave, "mutated job")
    if shape < 0.80:
        return Case("POST", path, json_bytes(fuzz_value(rng, all_images)), headers, "queued", "random JSON")
    if shape < 0.95:
        text = json_bytes(body)
        raw = rng.choice([
            text[: rng.randrange(len(text))], rng.randbytes(rng.randrange(1, 300)), b"[" * rng.randrange(1, 20000),
            b'{"a":' * rng.randrange(9, 3000), b'{"seed": ' + b"7" * rng.randrange(20, 6000) + b"}",
            b'{"steps": 1e999}', b'{"steps": NaN}', b'{"temperature": -Infinity}', b'{"steps": 1.' + b"0" * 5000 + b"}",
            b'{"steps": 2, "steps": 3}', b"\xef\xbb\xbf{}", b'{"class_label": "\\ud800"}', b'{"seed": -0}',
            b"\xff\xfe{\x00}\x00", b'{"image": "' + b"A" * 200_000 + b'"}', b"null", b"[]", b"{}", b"0", b'""',
            text.replace(b"1", b"1" * 40, 1), b'{"__proto__": {"steps": 1}}', b"{" + b" " * 100_000 + b"}",
        ])
        return Case("POST", path, raw, headers, "queued", "raw body")
    method = rng.choice(["GET", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS"])
    target = rng.choice([path, "/api/info", "/api/nothing", "/static/../server.py", "/static/%2e%2e/server.py",
                         "/favicon.ico", "/", "/static/app.js", "/api/info?x=" + "a" * 4000, "//api/info",
                         "/api/generate/../info"])
    return Case(method, target, b"", {}, "", "method/path")


def run_case(client: Any, case: Case, stats: dict[str, Any]) -> None:
    import httpx

    stats["requests"] += 1
    headers = {k: v for k, v in case.headers.items() if v}
    try:
        with client.stream(case.method, case.path, content=case.body or None, headers=headers) as response:
            status = response.status_code
            stats["status"][status] += 1
            describe = f"{case.note}: {case.method} {case.path} {case.body[:120]!r}"
            if status >= 500:
                stats["failures"].append(f"HTTP {status} for {describe}: {response.read()[:300]!r}")
                return
            if status != 200 or not response.headers.get("content-type", "").startswith("application/x-ndjson"):
                response.read()
                return
            events = []
            for line in response.iter_lines():
                if not line:
                    continue
                events.append(json.loads(line))
                if case.leave == "queued" or (case.leave == "started" and events[-1]["event"] == "started"):
                    stats["left_mid_stream"] += 1
                    return  # closing the stream closes the connection: the job is cancelled
            final = events[-1]["event"] if events else None
            stats["jobs"][final] += 1
            if not events or events[0]["event"] != "queued" or final not in ("done", "error", "cancelled"):
                stats["failures"].append(f"stream ended with {final!r} for {describe}")
            elif final == "error" and events[-1].get("message", "").startswith("internal error"):
                stats["failures"].append(f"job internal error {events[-1]['message'][:200]!r} for {describe}")
    except httpx.TimeoutException:
        stats["failures"].append(f"timeout for {case.note}: {case.method} {case.path} {case.body[:120]!r}")
        stats["transport"]["timeout"] += 1
    except httpx.TransportError as error:
        stats["failures"].append(f"connection {type(error).__name__} ({error}) for {case.note}: {case.method} "
                                 f"{case.path} {case.body[:120]!r}")
        stats["transport"][type(error).__name__] += 1


def raw_exchange(port: int, data: bytes | list[bytes], *, timeout: float = 30.0,
                 pause: float = 0.0) -> tuple[int | None, str]:
    """Send bytes over a plain socket; return (HTTP status of the first response, ``ok``/``closed``/``reset``/...)."""
    chunks = [data] if isinstance(data, bytes) else data
    received = b""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout) as connection:
            for chunk in chunks:
                connection.sendall(chunk)
                if pause:
                    time.sleep(pause)
            while b"\r\n\r\n" not in received:
                chunk = connection.recv(65536)
                if not chunk:
                    break
                received += chunk
    except ConnectionResetError:
        return None, "reset"
    except BrokenPipeError:
        return None, "broken pipe"
    except socket.timeout:
        return None, "timeout"
    match = re.match(rb"HTTP/1\.[01] (\d{3})", received)
    return (int(match.group(1)), "ok") if match else (None, "closed without a response")


def raw_cases(port: int) -> list[tuple[str, bytes | list[bytes], float, tuple[int, ...], bool]]:
    """(name, bytes, pause, acceptable statuses, closing without a response acceptable)."""
    host = f"Host: 127.0.0.1:{port}\r\n".encode()
    body = b'{"steps": 1, "num_images": 1, "seed": 1}'
    post = b"POST /api/generate HTTP/1.1\r\n" + host + b"Content-Type: application/json\r\n"
    return [
        ("foreign Host header", b"GET /api/info HTTP/1.1\r\nHost: evil.example\r\n\r\n", 0, (400,), False),
        ("DNS-rebinding Host", b"GET /api/info HTTP/1.1\r\nHost: 127.0.0.1.evil.example\r\n\r\n", 0, (400,), False),
        ("no Host header", b"GET /api/info HTTP/1.1\r\n\r\n", 0, (400,), False),
        ("TLS hello", bytes.fromhex("16030100a5010000a10303") + bytes(64), 0, (400,), True),
        ("garbage request line", b"\x00\xff GARBAGE\r\n\r\n", 0, (400,), True),
        ("declared 1 TB body", post + b"Content-Length: 1000000000000\r\n\r\n", 0, (413,), False),
        ("negative Content-Length", post + b"Content-Length: -1\r\n\r\n", 0, (400,), True),
        ("two Content-Lengths", post + b"Content-Length: 5\r\nContent-Length: 6\r\n\r\n" + body, 0, (400,), True),
        ("200 KB header", b"GET /api/info HTTP/1.1\r\n" + host + b"X-A: " + b"a" * 200_000 + b"\r\n\r\n", 0,
         (400, 431), True),
        ("2000 headers", b"GET /api/info HTTP/1.1\r\n" + host + b"".join(b"X-%d: 1\r\n" % i for i in range(2000))
         + b"\r\n", 0, (200, 400, 431), True),
        ("HTTP/1.0", b"GET /api/info HTTP/1.0\r\n" + host + b"\r\n", 0, (200,), False),
        ("pipelined", (b"GET /api/info HTTP/1.1\r\n" + host + b"\r\n") * 3, 0, (200,), False),
        ("absolute-form URI", b"GET http://evil.example/api/info HTTP/1.1\r\n" + host + b"\r\n", 0, (200, 400, 404),
         False),
        ("slow body", [post + b"Content-Length: %d\r\n\r\n" % len(body), body[:10], body[10:]], 0.3, (200,), False),
        ("chunked body", post + b"Transfer-Encoding: chunked\r\n\r\n" + b"%x\r\n" % len(body) + body + b"\r\n0\r\n\r\n",
         0, (200,), False),
        ("bad chunk size", post + b"Transfer-Encoding: chunked\r\n\r\nzz\r\n", 0, (400,), True),
        ("CONNECT", b"CONNECT 127.0.0.1:22 HTTP/1.1\r\n" + host + b"\r\n", 0, (400, 404, 405), True),
    ]


def read_events_raw(connection: socket.socket, until: bytes, timeout: float) -> bytes:
    """Read until ``until`` arrives, the server closes, or ``timeout`` seconds in all have passed."""
    deadline = time.monotonic() + timeout
    received = b""
    while until not in received:
        left = deadline - time.monotonic()
        if left <= 0:
            break
        connection.settimeout(left)
        try:
            chunk = connection.recv(1 << 16)
        except socket.timeout:
            break
        if not chunk:
            break
        received += chunk
    return received


def http_request_bytes(port: int, path: str, payload: dict[str, Any]) -> bytes:
    body = json.dumps(payload).encode()
    return (f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode() + body


def wait_idle(client: Any, timeout: float, interval: float = 0.005) -> float | None:
    """Seconds until ``/api/info`` says no job is queued or running; None if it never does."""
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        try:
            if client.get("/api/info").json()["unfinished_jobs"] == 0:
                return time.monotonic() - started
        except Exception:  # noqa: BLE001 - counted by the caller's checks
            pass
        time.sleep(interval)
    return None


def long_jobs(facts: dict[str, Any], limits: dict[str, Any],
              pools: dict[str, list[str]]) -> dict[str, tuple[str, dict]]:
    """Jobs that keep the worker busy for a while: sampling, and encode + decode at the canvas limit."""
    import numpy as np
    from PIL import Image

    height, width = facts["image_size"]
    max_h, max_w = limits["max_canvas"]
    factor = facts["factor"]
    max_h, max_w = max_h // factor * factor, max_w // factor * factor
    budget = limits["max_batch_pixels"]
    mode = "L" if facts["channels"] == 1 else "RGB"
    shape = (max_h, max_w) if mode == "L" else (max_h, max_w, 3)
    big = encoded_image(Image.fromarray(np.random.default_rng(5).integers(0, 256, shape, np.uint8), mode))
    big_mask = encoded_image(Image.fromarray(np.full((max_h, max_w), 255, np.uint8)))
    fills = max(1, min(limits["max_images"], budget // (max_h * max_w)))
    images = max(1, min(limits["max_images"], budget // (height * width)))
    return {
        "generate (sampling)": ("/api/generate", {"steps": min(limits["max_steps"], 1000), "num_images": images,
                                                  "early_stop": False, "seed": 1}),
        "outpaint (encode/decode at the canvas limit)": ("/api/outpaint", {
            "image": pools["valid"][0], "right": max_w - width, "bottom": max_h - height, "num_images": fills,
            "steps": 1, "seed": 2}),
        "inpaint (encode/decode at the canvas limit)": ("/api/inpaint", {
            "image": big, "mask": big_mask, "num_images": fills, "steps": 1, "seed": 3}),
        "refine (canvas limit, more steps)": ("/api/refine", {
            "image": big, "mask": big_mask, "num_images": fills, "steps": 8, "strength": 1.0, "seed": 4}),
    }


def disconnect_trials(port: int, client: Any, jobs: dict[str, tuple[str, dict]], trials: int, rng: random.Random,
                      stats: dict[str, Any], reference_cap: float) -> list[dict[str, Any]]:
    """Cancel long jobs by leaving (FIN or RST) at a random moment after they start; time until the worker is free."""
    records = []
    for name, (path, payload) in jobs.items():
        # how long the job takes when left alone (capped: the sampling job may take minutes)
        started = time.monotonic()
        with socket.create_connection(("127.0.0.1", port)) as connection:
            connection.sendall(http_request_bytes(port, path, payload))
            seen = read_events_raw(connection, b'"event":"done"', timeout=reference_cap)
        duration = time.monotonic() - started
        finished = b'"event":"done"' in seen
        if not finished:
            wait_idle(client, 120)
        if b'"event":"error"' in seen:
            stats["failures"].append(f"long job {name} failed: {seen[-300:]!r}")
        unfinished = f" (not finished in {reference_cap:.0f} s, cancelled)"
        say(f"  long job {name}: {duration:.2f}s{'' if finished else unfinished}")
        for trial in range(trials):
            abortive = trial % 2 == 1
            delay = rng.uniform(0.0, 0.9 * duration if finished else 3.0)
            connection = socket.create_connection(("127.0.0.1", port))
            try:
                connection.sendall(http_request_bytes(port, path, payload))
                head = read_events_raw(connection, b'"event":"started"', timeout=60)
                time.sleep(delay)
                connection.setblocking(False)
                with contextlib.suppress(BlockingIOError, OSError):
                    while chunk := connection.recv(1 << 20):
                        head += chunk
                done_first = b'"event":"done"' in head
                if abortive:
                    connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            finally:
                connection.close()
                left = time.monotonic()
            free = wait_idle(client, 60)
            free_after = None if free is None else time.monotonic() - left
            check = events_of(client.post("/api/generate", json={"steps": 1, "num_images": 1, "seed": 9}))
            record = {"job": name, "left_after_start_s": round(delay, 3), "close": "RST" if abortive else "FIN",
                      "finished_before_leaving": done_first,
                      "worker_free_after_s": None if free_after is None else round(free_after, 3),
                      "next_job": check[-1]["event"] if check else None}
            records.append(record)
            if free_after is None or (free_after > 1.0 and not done_first):
                stats["failures"].append(f"worker busy {free_after if free_after is None else round(free_after, 2)}s "
                                         f"after a client left {name} ({record['close']}, {delay:.2f}s in)")
            if record["next_job"] != "done":
                stats["failures"].append(f"the job after leaving {name} ended with {record['next_job']!r}")
            say(f"    left {name} {delay:.2f}s after start ({record['close']}): worker free after "
                f"{record['worker_free_after_s']}s{' (it had finished)' if done_first else ''}")
    return records


def events_of(response: Any) -> list[dict[str, Any]]:
    return [json.loads(line) for line in response.iter_lines() if line] if response.status_code == 200 else []


def part_web(root: Path, args: argparse.Namespace, rng: random.Random) -> dict[str, Any]:
    import httpx

    port = free_port()
    log = root / "serve.log"
    argv = ["serve", "--port", str(port), "--device", "cpu", "--precision", "float32"]
    if args.model:
        argv += ["--model", str(Path(args.model).resolve())]
    server = launch(argv, cwd=root, stdout=log)
    sampler = RssSampler(server.pid)
    sampler.start()
    stats: dict[str, Any] = {"requests": 0, "status": collections.Counter(), "jobs": collections.Counter(),
                             "transport": collections.Counter(), "left_mid_stream": 0, "failures": [], "raw": {}}
    base = f"http://127.0.0.1:{port}"
    result: dict[str, Any] = {}
    try:
        deadline = time.monotonic() + 180
        with httpx.Client(base_url=base, timeout=httpx.Timeout(60.0)) as client:
            info = None
            while time.monotonic() < deadline and server.poll() is None:
                with contextlib.suppress(httpx.TransportError):
                    info = client.get("/api/info").json()
                    break
                time.sleep(0.2)
            if info is None:
                stats["failures"].append(f"server did not start (exit {server.returncode}): {tail(log)}")
                result["server_exit"] = server.returncode
                return result
            ready_at = time.monotonic()
            facts, limits = info["model"], info["limits"]
            result["model"] = {key: facts[key] for key in ("name", "tokenizer", "image_size", "channels", "factor")}
            result["rss_at_start_mb"] = round((sampler.read() or 0) / 1024, 1)
            say(f"  serving {facts['name']} ({facts['tokenizer']}, {facts['image_size']}, f={facts['factor']}) on "
                f"port {port}, RSS {result['rss_at_start_mb']} MB")
            pools = fuzz_images(rng, facts, limits)
            raw = raw_cases(port)
            for index in range(-len(raw), args.requests):
                if index < 0 or index % 40 == 7:  # protocol abuse over a plain socket: each once, then now and then
                    name, data, pause, accepted, may_close = raw[index if index < 0 else (index // 40) % len(raw)]
                    stats["requests"] += 1
                    status, how = raw_exchange(port, data, pause=pause)
                    stats["raw"][name] = f"{status} {how}"
                    if status is not None:
                        stats["status"][status] += 1
                    bad = (status is None and not (may_close and how == "closed without a response")) or \
                        (status is not None and (status >= 500 or status not in accepted))
                    if bad:
                        stats["failures"].append(f"raw {name}: {status} {how} (expected {accepted})")
                    continue
                if index % 150 == 75:  # bodies over the limit: declared, and streamed without a length
                    stats["requests"] += 2
                    oversize = b'{"image": "' + b"A" * (limits["max_body_bytes"] + 10) + b'"}'
                    chunks = (oversize[i:i + 2**20] for i in range(0, len(oversize), 2**20))
                    for content in (oversize, chunks):
                        try:
                            response = client.post("/api/inpaint", content=content,
                                                   headers={"content-type": "application/json"})
                            stats["status"][response.status_code] += 1
                            if response.status_code != 413:
                                stats["failures"].append(f"oversize body: HTTP {response.status_code}")
                        except httpx.TransportError as error:
                            stats["transport"][type(error).__name__] += 1
                            how = "streamed" if content is not oversize else "declared"
                            stats["failures"].append(f"oversize body ({how}): connection {type(error).__name__} "
                                                     f"({error})")
                    continue
                run_case(client, fuzz_case(rng, pools, facts), stats)
                if index % 100 == 99:
                    say(f"  {index + 1} requests, statuses {dict(sorted(stats['status'].items()))}, RSS peak "
                        f"{sampler.peak_mb:.0f} MB, {len(stats['failures'])} failure(s)")
            idle = wait_idle(client, 120)
            if idle is None:
                stats["failures"].append("the worker was still busy 120 s after the fuzzing ended")
            done = events_of(client.post("/api/generate", json={"steps": 2, "num_images": 2, "seed": 1}))
            if not done or done[-1]["event"] != "done":
                stats["failures"].append(f"a valid job after the fuzzing ended with {done[-1] if done else None}")
            result["rss_after_fuzz_mb"] = round((sampler.read() or 0) / 1024, 1)
            result["fuzz_seconds"] = round(time.monotonic() - ready_at, 1)
            result["disconnects"] = disconnect_trials(port, client, long_jobs(facts, limits, pools),
                                                      args.disconnect_trials, rng, stats,
                                                      reference_cap=10.0 if args.quick else 30.0)
            result["rss_at_end_mb"] = round((sampler.read() or 0) / 1024, 1)
    finally:
        finish_web(stats, sampler, server, result)
    return result


def finish_web(stats: dict[str, Any], sampler: RssSampler, server: Child, result: dict[str, Any]) -> dict[str, Any]:
    if server.poll() is None:
        os.kill(server.pid, signal.SIGINT)
        if server.wait(15) is None:
            server.kill()
    elif "server_exit" not in result:
        stats["failures"].append(f"the server exited during the run (exit {server.returncode})")
    sampler.stop.set()
    sampler.join(2)
    free = [r["worker_free_after_s"] for r in result.get("disconnects", [])
            if r["worker_free_after_s"] is not None and not r["finished_before_leaving"]]
    result.update({
        "requests_sent": stats["requests"], "status_counts": {str(k): v for k, v in sorted(stats["status"].items())},
        "job_endings": dict(stats["jobs"]), "left_mid_stream": stats["left_mid_stream"],
        "transport_errors": dict(stats["transport"]), "raw_socket_cases": stats["raw"],
        "server_errors_5xx": sum(v for k, v in stats["status"].items() if k >= 500),
        "peak_server_rss_mb": round(sampler.peak_mb, 1), "rss_samples": len(sampler.samples),
        "worst_worker_free_after_disconnect_s": max(free, default=None), "server_exit": server.returncode,
        "failures": stats["failures"],
    })
    return result


# =============================================================================================
# part 3: hostile checkpoints and configs
# =============================================================================================


def op_global(module: str, name: str) -> bytes:
    return pickle.GLOBAL + f"{module}\n{name}\n".encode()


def op_long(value: int) -> bytes:
    data = value.to_bytes((value.bit_length() + 8) // 8, "little", signed=True)
    return pickle.LONG1 + bytes([len(data)]) + data


def op_str(text: str) -> bytes:
    data = text.encode()
    return pickle.BINUNICODE + struct.pack("<I", len(data)) + data


PROTO2 = pickle.PROTO + b"\x02"


def call(module: str, name: str, *args: bytes) -> bytes:
    """``module.name(*args)`` as pickle opcodes (args already encoded)."""
    return op_global(module, name) + pickle.MARK + b"".join(args) + pickle.TUPLE + pickle.REDUCE


def gadgets(marker: Path) -> dict[str, bytes]:
    """Bare pickles whose unpickling would create ``marker``: one per code-running route."""
    touch = f"touch {marker}"
    write = f"open({str(marker)!r}, 'w').write('x')"
    inner = PROTO2 + call("posix", "system", op_str(touch)) + pickle.STOP
    return {
        "os.system": PROTO2 + call("os", "system", op_str(touch)) + pickle.STOP,
        "posix.system": PROTO2 + call("posix", "system", op_str(touch)) + pickle.STOP,
        "builtins.exec": PROTO2 + call("builtins", "exec", op_str(write)) + pickle.STOP,
        "builtins.eval": PROTO2 + call("__builtin__", "eval", op_str(write)) + pickle.STOP,
        "subprocess.Popen": PROTO2 + op_global("subprocess", "Popen") + pickle.MARK + pickle.MARK + op_str("touch")
        + op_str(str(marker)) + pickle.LIST + pickle.TUPLE + pickle.REDUCE + pickle.STOP,
        "subprocess.getoutput": PROTO2 + call("subprocess", "getoutput", op_str(touch)) + pickle.STOP,
        "os.popen": PROTO2 + call("os", "popen", op_str(touch)) + pickle.STOP,
        "timeit.timeit": PROTO2 + call("timeit", "timeit", op_str(write), op_str("pass"),
                                       op_global("time", "perf_counter"), pickle.BININT1 + b"\x01") + pickle.STOP,
        "numpy runstring": PROTO2 + call("numpy.testing._private.utils", "runstring", op_str(write),
                                         pickle.EMPTY_DICT) + pickle.STOP,
        "pickle.loads (nested)": PROTO2 + op_global("pickle", "loads") + pickle.MARK + pickle.SHORT_BINBYTES
        + bytes([len(inner)]) + inner + pickle.TUPLE + pickle.REDUCE + pickle.STOP,
        "functools.partial then call": PROTO2 + call("functools", "partial", op_global("posix", "system"),
                                                     op_str(touch)) + pickle.EMPTY_TUPLE + pickle.REDUCE + pickle.STOP,
        "builtins.getattr chain": PROTO2 + call("builtins", "getattr", call("builtins", "__import__", op_str("os")),
                                                op_str("system")) + pickle.MARK + op_str(touch) + pickle.TUPLE
        + pickle.REDUCE + pickle.STOP,
        "STACK_GLOBAL (protocol 4)": pickle.PROTO + b"\x04" + op_str("os") + op_str("system") + pickle.STACK_GLOBAL
        + pickle.MARK + op_str(touch) + pickle.TUPLE + pickle.REDUCE + pickle.STOP,
        "INST opcode": f"(S'{touch}'\nios\nsystem\n.".encode(),
        "OBJ opcode": PROTO2 + pickle.MARK + op_global("os", "system") + op_str(touch) + pickle.OBJ + pickle.STOP,
        "BUILD __setstate__": PROTO2 + call("argparse", "Namespace") + pickle.EMPTY_DICT + pickle.BUILD + pickle.STOP,
    }


BYTEARRAY_BOMB = PROTO2 + op_global("__builtin__", "bytearray") + op_long(3 * 10**9) + pickle.TUPLE1 + pickle.REDUCE \
    + pickle.STOP
TUPLE_BOMB = (PROTO2 + op_global("__builtin__", "tuple") + op_global("__builtin__", "bytes") + op_long(3 * 10**8)
              + pickle.TUPLE1 + pickle.REDUCE + pickle.TUPLE1 + pickle.REDUCE + pickle.STOP)
LIST_MULTIPLY_BOMB = PROTO2 + call("operator", "mul", pickle.EMPTY_LIST + pickle.NONE + pickle.APPEND,
                                   op_long(10**10)) + pickle.STOP
STORAGE_CALL_BOMB = PROTO2 + op_global("torch", "FloatStorage") + op_long(10**9) + pickle.TUPLE1 + pickle.REDUCE \
    + pickle.STOP
HASH_BOMB = (PROTO2 + pickle.EMPTY_DICT + pickle.EMPTY_TUPLE + pickle.BINPUT + b"\x00" + pickle.POP
             + (pickle.BINGET + b"\x00" + pickle.BINGET + b"\x00" + pickle.TUPLE2 + pickle.BINPUT + b"\x00"
                + pickle.POP) * 100
             + pickle.BINGET + b"\x00" + pickle.BININT1 + b"\x01" + pickle.SETITEM + pickle.STOP)
SET_HASH_BOMB = (pickle.PROTO + b"\x04" + pickle.EMPTY_TUPLE + pickle.BINPUT + b"\x00" + pickle.POP
                 + (pickle.BINGET + b"\x00" + pickle.BINGET + b"\x00" + pickle.TUPLE2 + pickle.BINPUT + b"\x00"
                    + pickle.POP) * 100
                 + pickle.EMPTY_SET + pickle.MARK + pickle.BINGET + b"\x00" + pickle.ADDITEMS
                 + pickle.STOP)
DEEP_KEY = (PROTO2 + pickle.EMPTY_DICT + pickle.EMPTY_TUPLE + pickle.TUPLE1 * 100_000 + pickle.BININT1 + b"\x01"
            + pickle.SETITEM + pickle.STOP)
DEEP_LISTS = PROTO2 + (pickle.EMPTY_LIST + pickle.BINPUT + b"\x01") * 200_000 + pickle.APPEND * 199_999 + pickle.STOP
HUGE_LENGTH = pickle.PROTO + b"\x04" + pickle.BINUNICODE8 + struct.pack("<Q", 3 * 10**9) + b"x" * 64 + pickle.STOP
MEMO_BOMB = PROTO2 + pickle.NONE + pickle.LONG_BINPUT + b"\xff\xff\xff\xff" + pickle.STOP
MARK_FLOOD = PROTO2 + pickle.MARK * 2**18 + pickle.STOP
BOMBS = {"bytearray(3e9)": BYTEARRAY_BOMB, "tuple(bytes(3e8))": TUPLE_BOMB, "[None]*1e10": LIST_MULTIPLY_BOMB,
         "torch.FloatStorage(1e9)": STORAGE_CALL_BOMB, "dict hash bomb": HASH_BOMB, "set hash bomb": SET_HASH_BOMB,
         "100k-deep key": DEEP_KEY, "200k nested lists": DEEP_LISTS, "3 GB string length": HUGE_LENGTH,
         "memo index 2^32": MEMO_BOMB, "2^18 MARKs": MARK_FLOOD}


def write_torch_zip(path: Path, program: bytes, records: dict[str, bytes] | None = None,
                    compression: int = zipfile.ZIP_STORED) -> Path:
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("archive/data.pkl", program)
        archive.writestr("archive/byteorder", b"little")
        archive.writestr("archive/version", b"3\n")  # torch.load wants it before it reads data.pkl
        for key, data in (records or {}).items():
            archive.writestr(f"archive/data/{key}", data, compress_type=compression)
    return path


def write_legacy(path: Path, program: bytes, keys: list[str], tail_bytes: bytes = b"") -> Path:
    header = pickle.dumps(0x1950A86A20F9469CFC6C, protocol=2) + pickle.dumps(1001, protocol=2)
    header += pickle.dumps({"protocol_version": 1001, "little_endian": True, "type_sizes": {}}, protocol=2)
    path.write_bytes(header + program + pickle.dumps(keys, protocol=2) + tail_bytes)
    return path


def tensor_pickle(key: str, numel: int, size: tuple[int, ...], stride: tuple[int, ...], legacy: bool = False) -> bytes:
    """``{"state_dict": {"w": <tensor of storage key>}}`` the way torch.save writes it (protocol 2)."""
    def ints(values: tuple[int, ...]) -> bytes:
        return pickle.MARK + b"".join(op_long(v) for v in values) + pickle.TUPLE

    pid = pickle.MARK + op_str("storage") + op_global("torch", "FloatStorage") + op_str(key) + op_str("cpu") \
        + op_long(numel) + (pickle.NONE if legacy else b"") + pickle.TUPLE + pickle.BINPERSID
    tensor = op_global("torch._utils", "_rebuild_tensor_v2") + pickle.MARK + pid + op_long(0) + ints(size) \
        + ints(stride) + pickle.NEWFALSE + op_global("collections", "OrderedDict") + pickle.EMPTY_TUPLE \
        + pickle.REDUCE + pickle.TUPLE + pickle.REDUCE
    return PROTO2 + pickle.EMPTY_DICT + op_str("state_dict") + pickle.EMPTY_DICT + op_str("w") + tensor \
        + pickle.SETITEM + pickle.SETITEM + pickle.STOP


@dataclass
class Payload:
    name: str
    group: str
    argv: list[str]
    marker: Path | None = None
    quick: bool = True
    harmless: bool = False  # loading it may also succeed (exit 0): the file is odd but not wrong


def small_state() -> dict[str, Any]:
    import torch

    generator = torch.Generator().manual_seed(0)
    return {"encoder.conv_in.weight": torch.randn(4, 3, 3, 3, generator=generator),
            "quantize.embedding.weight": torch.randn(8, 4, generator=generator), "encoder.conv_in.bias": torch.zeros(4)}


def build_checkpoint_payloads(directory: Path, quick: bool) -> list[Payload]:
    """``sundae convert-taming FILE OUT`` on hostile and damaged .ckpt files."""
    import torch

    payloads: list[Payload] = []
    counter = iter(range(10**6))

    def add(name: str, path: Path, marker: Path | None = None, in_quick: bool = True) -> None:
        argv = ["convert-taming", str(path), str(directory / f"out{next(counter)}")]
        payloads.append(Payload(name, "checkpoint", argv, marker, in_quick))

    def fresh(name: str) -> Path:
        path = directory / f"{len(payloads):03d}-{re.sub(r'[^A-Za-z0-9]+', '-', name)}.ckpt"
        return path

    for index, (name, program) in enumerate(gadgets(directory / "marker-0").items()):
        marker = directory / f"marker-gadget-{index}"
        program = gadgets(marker)[name]
        raw = fresh(f"raw {name}")
        raw.write_bytes(program)
        add(f"gadget {name} (bare pickle)", raw, marker)
        add(f"gadget {name} (torch zip data.pkl)", write_torch_zip(fresh(name), program), marker, in_quick=not quick)
        legacy = fresh(f"legacy {name}")
        write_legacy(legacy, program, [])
        add(f"gadget {name} (legacy torch.save)", legacy, marker, in_quick=False)
    # a real checkpoint whose extra entry is a gadget (state_dict first, gadget after it)
    marker = directory / "marker-beside"
    beside = fresh("beside")
    with_weights = tensor_pickle("0", 4, (4,), (1,))
    gadget = gadgets(marker)["os.system"][2:-1]  # the call, without PROTO and STOP
    program = with_weights[:-1] + op_str("callbacks") + gadget + pickle.SETITEM + pickle.STOP
    write_torch_zip(beside, program, {"0": torch.arange(4.0).numpy().tobytes()})
    add("gadget os.system beside real weights", beside, marker)
    for name, program in BOMBS.items():
        raw = fresh(f"bomb {name}")
        raw.write_bytes(program)
        add(f"bomb {name} (bare pickle)", raw)
        add(f"bomb {name} (torch zip)", write_torch_zip(fresh(f"zip {name}"), program), in_quick=not quick)
    add("storage claims 4 GB, record has 16 B", write_torch_zip(fresh("lie"), tensor_pickle("0", 10**9, (4,), (1,)),
                                                                 {"0": bytes(16)}))
    add("tensor larger than its storage", write_torch_zip(fresh("larger"), tensor_pickle("0", 4, (10**9,), (1,)),
                                                          {"0": bytes(16)}))
    add("tensor of 2^62 elements", write_torch_zip(fresh("2p62"), tensor_pickle("0", 4, (2**31, 2**31), (2**31, 1)),
                                                   {"0": bytes(16)}), in_quick=not quick)
    add("negative stride", write_torch_zip(fresh("negstride"), tensor_pickle("0", 4, (4,), (-1,)), {"0": bytes(16)}),
        in_quick=not quick)
    add("legacy storage of 1e12 elements", write_legacy(fresh("legacy-numel"), tensor_pickle("0", 10**12, (4,), (1,),
                                                                                            legacy=True), ["0"],
                                                         struct.pack("<q", 4) + bytes(16)))
    add("deflate bomb (64 MB record)", write_torch_zip(fresh("deflate"), tensor_pickle("0", 16 * 2**20, (16 * 2**20,),
                                                                                     (1,)),
                                                       {"0": bytes(64 * 2**20)}, zipfile.ZIP_DEFLATED))
    # damaged and foreign files
    real = directory / "real.ckpt"
    torch.save({"state_dict": small_state(), "epoch": 3}, real)
    cut = fresh("truncated")
    cut.write_bytes(real.read_bytes()[: real.stat().st_size * 2 // 3])
    add("truncated zip checkpoint", cut)
    legacy_real = directory / "real-legacy.ckpt"
    torch.save({"state_dict": small_state()}, legacy_real, _use_new_zipfile_serialization=False)
    cut = fresh("truncated-legacy")
    cut.write_bytes(legacy_real.read_bytes()[: legacy_real.stat().st_size // 2])
    add("truncated legacy checkpoint", cut)
    flips = random.Random(7)
    for index in range(3 if quick else 12):
        data = bytearray(real.read_bytes())
        for _ in range(flips.randint(1, 3)):
            position = flips.randrange(len(data))
            data[position] ^= 1 << flips.randrange(8)
        flipped = fresh(f"flip{index}")
        flipped.write_bytes(bytes(data))
        add(f"real checkpoint with flipped bits #{index}", flipped, in_quick=index < 3)
    for name, content in {
        "empty file": b"", "random bytes": random.Random(0).randbytes(4096),
        "zip magic then garbage": b"PK\x03\x04" + random.Random(1).randbytes(4096),
        "text (a yaml)": b"model:\n  target: taming.models.vqgan.VQModel\n",
        "safetensors file": b"\x08\x00\x00\x00\x00\x00\x00\x00{}      ",
    }.items():
        path = fresh(name)
        path.write_bytes(content)
        add(name, path)
    for name, entries, compression in (
        ("zip with wrong entries", {"notes.txt": b"hello"}, zipfile.ZIP_STORED),
        ("zip with two pickles", {"a/data.pkl": PROTO2 + pickle.NONE + pickle.STOP,
                                  "b/data.pkl": PROTO2 + pickle.NONE + pickle.STOP}, zipfile.ZIP_STORED),
        ("zip missing a storage record", {"archive/data.pkl": tensor_pickle("0", 4, (4,), (1,))}, zipfile.ZIP_STORED),
        ("zip with a compressed pickle", {"archive/data.pkl": PROTO2 + pickle.NONE + pickle.STOP},
         zipfile.ZIP_DEFLATED),
        ("zip path traversal entry", {"../../archive/data.pkl": PROTO2 + pickle.NONE + pickle.STOP},
         zipfile.ZIP_STORED),
    ):
        path = fresh(name)
        with zipfile.ZipFile(path, "w", compression=compression) as archive:
            for entry, data in entries.items():
                archive.writestr(entry, data)
        add(name, path, in_quick=name != "zip path traversal entry" or not quick)
    fifo = fresh("fifo")
    os.mkfifo(fifo)
    add("a FIFO (open would block)", fifo)
    zero = fresh("dev-zero")
    zero.symlink_to("/dev/zero")
    add("a symlink to /dev/zero", zero)
    folder = fresh("folder")
    folder.mkdir()
    add("a folder", folder, in_quick=not quick)
    add("a missing file", directory / "does-not-exist.ckpt", in_quick=not quick)
    return payloads


def build_yaml_payloads(directory: Path, quick: bool) -> list[Payload]:
    """``sundae convert-taming GOOD.ckpt OUT --config BAD.yaml``."""
    import torch

    good = directory / "good.ckpt"
    torch.save({"state_dict": small_state()}, good)
    ddconfig = {"double_z": False, "z_channels": 32, "resolution": 32, "in_channels": 3, "out_ch": 3, "ch": 32,
                "ch_mult": [1, 2, 2], "num_res_blocks": 1, "attn_resolutions": [8], "dropout": 0.0}

    def document(params: dict[str, Any] | None = None, **dd: Any) -> str:
        base = {"embed_dim": 32, "n_embed": 256, "ddconfig": {**ddconfig, **dd}, **(params or {})}
        return json.dumps({"model": {"target": "taming.models.vqgan.VQModel", "params": base}})  # JSON is YAML

    marker = directory / "marker-yaml"
    cases = {
        "resolution: [1, 2]": document(resolution=[1, 2]),
        "ch: '32'": document(ch="32"),
        "ch_mult: [1, 2.5]": document(ch_mult=[1, 2.5]),
        "n_embed: 1e12": document({"n_embed": 1e12}),
        "n_embed: 10**12": document({"n_embed": 10**12}),
        "embed_dim: -1": document({"embed_dim": -1}),
        "z_channels: true": document(z_channels=True),
        "num_res_blocks: 1e9": document(num_res_blocks=10**9),
        "double_z: true": document(double_z=True),
        "double_z: 'no'": document(double_z="no"),
        "dropout: 'high'": document(dropout="high"),
        "ddconfig: 5": json.dumps({"model": {"params": {"embed_dim": 32, "n_embed": 256, "ddconfig": 5}}}),
        "params.remap set": document({"remap": "x.npy"}),
        "no model key": "foo: 1\n",
        "top-level list": "- 1\n- 2\n",
        "empty file": "",
        "invalid yaml": "model: [unclosed\n",
        "python/object tag": f"model: !!python/object/apply:os.system ['touch {marker}']\n",
        "python/name tag": "model: !!python/name:os.system\n",
        "billion laughs": "a: &a [x,x,x,x,x,x,x,x,x]\n" + "".join(  # 9^10 leaves if expanded
            f"{chr(98 + i)}: &{chr(98 + i)} [{','.join([f'*{chr(97 + i)}'] * 9)}]\n" for i in range(9)) + "model: *j\n",
        "100k-deep nesting": "model: " + "[" * 100_000 + "]" * 100_000 + "\n",
        "5 MB file": "# " + "x" * (5 * 2**20) + "\n",
        "non-UTF-8 bytes": None,
        "valid yaml, weights mismatch": document(),
    }
    payloads = []
    for index, (name, text) in enumerate(cases.items()):
        path = directory / f"cfg{index:02d}.yaml"
        if text is None:
            path.write_bytes(b"\xff\xfe\x00model: 1\n")
        else:
            path.write_text(text)
        quick_set = {"resolution: [1, 2]", "ch: '32'", "n_embed: 1e12", "python/object tag", "billion laughs",
                     "100k-deep nesting", "invalid yaml", "double_z: true", "ddconfig: 5", "5 MB file"}
        payloads.append(Payload(f"yaml {name}", "yaml", ["convert-taming", str(good), str(directory / f"yout{index}"),
                                                         "--config", str(path)],
                                marker if "tag" in name else None, name in quick_set or not quick))
    return payloads


def build_model_dir_payloads(directory: Path, quick: bool) -> list[Payload]:
    """``sundae sample --model DIR`` (and ``serve --model``) on model folders with broken configs or weights."""
    import torch
    from sundae.config import HourglassConfig, VQGANConfig
    from sundae.denoiser import Hourglass
    from sundae.pipeline import SundaePipeline
    from sundae.tokenizer import VQGAN

    torch.manual_seed(0)
    tokenizer = VQGAN(VQGANConfig(resolution=16, channels=32, channel_multipliers=(1, 2), num_res_blocks=1,
                                  attention_resolutions=(), z_channels=32, embed_dim=8, codebook_size=16))
    prior = Hourglass(HourglassConfig(codebook_size=16, dim=32, depth=(1, 1, 1), heads=2, head_dim=16,
                                      latent_shape=(8, 8), num_classes=3))
    base = SundaePipeline(prior, tokenizer, class_names=["a", "b", "c"]).save_pretrained(directory / "base")
    payloads: list[Payload] = []
    quick_names: set[str] = set()

    def variant(name: str, edit: Callable[[Path], None], in_quick: bool = False, serve: bool = False,
                harmless: bool = False) -> None:
        target = directory / f"model{len(payloads):03d}"
        shutil.copytree(base, target)
        edit(target)
        argv = ["sample", "--model", str(target), "--out", str(target / "x.png"), "-n", "2", "--steps", "1",
                "--classes", "a,b", "--device", "cpu"]
        payloads.append(Payload(f"model dir: {name}", "model-dir", argv, None, in_quick or not quick, harmless))
        if serve:
            payloads.append(Payload(f"serve --model: {name}", "model-dir",
                                    ["serve", "--model", str(target), "--port", str(free_port()), "--device", "cpu"],
                                    None, in_quick or not quick))

    def config_edit(changes: dict[str, Any] | None = None, top: dict[str, Any] | None = None, sub: str = "prior",
                    drop: str | None = None) -> Callable[[Path], None]:
        def edit(target: Path) -> None:
            path = target / sub / "config.json"
            payload = json.loads(path.read_text())
            payload["config"].update(changes or {})
            payload.update(top or {})
            if drop:
                payload.pop(drop)
            path.write_text(json.dumps(payload))
        return edit

    def write(relative: str, data: bytes | str) -> Callable[[Path], None]:
        def edit(target: Path) -> None:
            path = target / relative
            path.write_bytes(data if isinstance(data, bytes) else data.encode())
        return edit

    prior_changes = {
        '"dim": "128"': {"dim": "128"}, '"dim": 128.5': {"dim": 128.5}, '"dim": true': {"dim": True},
        '"num_classes": "10"': {"num_classes": "10"}, '"codebook_size": 1e12': {"codebook_size": 1e12},
        '"codebook_size": 10**12': {"codebook_size": 10**12}, '"depth": [1, "8", 1]': {"depth": [1, "8", 1]},
        '"latent_shape": [4, 10**9]': {"latent_shape": [4, 10**9]}, '"heads": 2**20': {"heads": 2**20},
        '"dim": 2048 (disagrees with the weights)': {"dim": 2048}, '"dropout": "0.1"': {"dropout": "0.1"},
        '"resample": 2': {"resample": 2}, 'unknown field "seed"': {"seed": 3}, '"dim": -32': {"dim": -32},
        '"head_dim": 0': {"head_dim": 0}, '"num_classes": 0': {"num_classes": 0},
        '"latent_shape": [8, 8, 8]': {"latent_shape": [8, 8, 8]}, '"dim": NaN': {"dim": float("nan")},
    }
    quick_prior = {'"dim": "128"', '"dim": 128.5', '"num_classes": "10"', '"codebook_size": 1e12',
                   '"dim": 2048 (disagrees with the weights)', '"latent_shape": [4, 10**9]'}
    for name, changes in prior_changes.items():
        variant(f"prior config {name}", config_edit(changes), in_quick=name in quick_prior,
                serve=name == '"dim": "128"')
    variant('prior "config": null', config_edit(top={"config": None}), in_quick=True, serve=True)
    variant("prior without config entry", config_edit(drop="config"))
    variant('prior "config": [1, 2]', config_edit(top={"config": [1, 2]}))
    variant('prior "class": "VQGAN"', config_edit(top={"class": "VQGAN"}))
    variant('"data": null', config_edit(top={"data": None}), in_quick=True)
    variant('"data": 5', config_edit(top={"data": 5}))
    variant('"data": {"class_names": 5}', config_edit(top={"data": {"class_names": 5}}), in_quick=True)
    variant('"data": {"class_names": [1, 2, 3]}', config_edit(top={"data": {"class_names": [1, 2, 3]}}))
    variant('"data": {"codebook_size": "16"}', config_edit(top={"data": {"codebook_size": "16"}}), in_quick=True)
    variant("config.json is [1, 2, 3]", write("prior/config.json", "[1, 2, 3]"))
    variant("config.json invalid JSON", write("prior/config.json", '{"class": "Hourglass", "config": {'), in_quick=True)
    variant("config.json 100k-deep nesting", write("prior/config.json", "[" * 100_000 + "]" * 100_000), in_quick=True)
    variant("config.json 5000-digit int", write("prior/config.json", '{"class": "Hourglass", "config": {"dim": 1'
                                                + "0" * 5000 + "}}"))
    variant("config.json non-UTF-8", write("prior/config.json", b"\xff\xfe\x00garbage"))

    def sparse(target: Path) -> None:
        with open(target / "prior" / "config.json", "wb") as handle:
            handle.truncate(64 * 2**20)
    variant("config.json 64 MB (sparse)", sparse, in_quick=True)

    def special(relative: str, kind: str) -> Callable[[Path], None]:
        def edit(target: Path) -> None:
            path = target / relative
            path.unlink()
            if kind == "fifo":
                os.mkfifo(path)
            elif kind == "zero":
                path.symlink_to("/dev/zero")
            elif kind == "dir":
                path.mkdir()
        return edit

    variant("config.json is a FIFO", special("prior/config.json", "fifo"), in_quick=True)
    variant("config.json -> /dev/zero", special("prior/config.json", "zero"))
    variant("config.json is a folder", special("prior/config.json", "dir"))
    variant("model.safetensors is a FIFO", special("prior/model.safetensors", "fifo"), in_quick=True)
    variant("model.safetensors -> /dev/zero", special("prior/model.safetensors", "zero"), in_quick=True)
    variant("model.safetensors missing", special("prior/model.safetensors", "missing"))
    variant("tokenizer/model.safetensors missing", special("tokenizer/model.safetensors", "missing"))
    tokenizer_changes = {'"channels": "32"': {"channels": "32"}, '"codebook_size": 10**12': {"codebook_size": 10**12},
                         '"channel_multipliers": [1, 2.5]': {"channel_multipliers": [1, 2.5]},
                         '"resolution": [1, 2]': {"resolution": [1, 2]}, '"channels": 2**20': {"channels": 2**20},
                         '"embed_dim": 9 (disagrees with the weights)': {"embed_dim": 9},
                         '"codebook_size": 32 (disagrees with the prior)': {"codebook_size": 32}}
    quick_tokenizer = {'"channels": "32"', '"resolution": [1, 2]', '"embed_dim": 9 (disagrees with the weights)'}
    for name, changes in tokenizer_changes.items():
        variant(f"tokenizer config {name}", config_edit(changes, sub="tokenizer"), in_quick=name in quick_tokenizer)
    variant('tokenizer "config": null', config_edit(top={"config": None}, sub="tokenizer"))
    variant('scheduler "steps": 0', config_edit({"steps": 0}, sub="scheduler"), in_quick=True)
    variant('scheduler "top_p": "high"', config_edit({"top_p": "high"}, sub="scheduler"))
    variant("scheduler config.json invalid JSON", write("scheduler/config.json", "{"))
    variant('model_index.json "format_version": 99',
            write("model_index.json", '{"format": "sundae-model", "format_version": 99, "kind": "sundae-pipeline"}'))
    variant("model_index.json missing", special("model_index.json", "missing"), in_quick=True)

    def old_layout(target: Path) -> None:  # the prior's files at the top, as before model_index.json
        for name in ("config.json", "model.safetensors"):
            os.replace(target / "prior" / name, target / name)
        for stale in ("prior", "scheduler"):
            shutil.rmtree(target / stale)
        (target / "model_index.json").unlink()
    variant("a model directory in the old layout", old_layout, in_quick=True)

    weights = base / "prior" / "model.safetensors"
    data = weights.read_bytes()
    header_length = struct.unpack("<Q", data[:8])[0]

    def mutate(relative: str, function: Callable[[bytes], bytes]) -> Callable[[Path], None]:
        def edit(target: Path) -> None:
            path = target / relative
            path.write_bytes(function(path.read_bytes()))
        return edit

    def flip(offset_from_header: int) -> Callable[[bytes], bytes]:
        def function(raw: bytes) -> bytes:
            length = struct.unpack("<Q", raw[:8])[0]
            buffer = bytearray(raw)
            buffer[8 + length + offset_from_header] ^= 0x10
            return bytes(buffer)
        return function

    def header_edit(edit: Callable[[dict], None]) -> Callable[[bytes], bytes]:
        def function(raw: bytes) -> bytes:
            length = struct.unpack("<Q", raw[:8])[0]
            header = json.loads(raw[8:8 + length])
            edit(header)
            text = json.dumps(header).encode()
            text += b" " * (-len(text) % 8)
            return struct.pack("<Q", len(text)) + text + raw[8 + length:]
        return function

    def first_tensor(header: dict) -> str:
        return next(key for key in header if key != "__metadata__")

    def grow(header: dict) -> None:
        entry = header[first_tensor(header)]
        entry["shape"] = [10**6, 10**6]

    def rename(header: dict) -> None:
        key = first_tensor(header)
        header["evil." + key] = header.pop(key)

    def retype(header: dict) -> None:
        header[first_tensor(header)]["dtype"] = "F16"

    def no_hash_offsets(header: dict) -> None:
        entry = header[first_tensor(header)]
        entry["data_offsets"] = [0, 2**62]

    variant("prior weights: one flipped bit in the data", mutate("prior/model.safetensors", flip(1000)), in_quick=True)
    variant("prior weights: flipped bit in the last tensor",
            mutate("prior/model.safetensors", lambda raw: flip(len(raw) - 9 - header_length)(raw)))
    variant("tokenizer weights: one flipped bit", mutate("tokenizer/model.safetensors", flip(500)), in_quick=True)
    variant("prior weights: header byte flipped", mutate("prior/model.safetensors",
                                                         lambda raw: raw[:20] + bytes([raw[20] ^ 0x55]) + raw[21:]),
            in_quick=True)
    variant("prior weights: truncated to half", mutate("prior/model.safetensors", lambda raw: raw[: len(raw) // 2]),
            in_quick=True, serve=True)
    variant("prior weights: empty", write("prior/model.safetensors", b""))
    variant("prior weights: random bytes", write("prior/model.safetensors", random.Random(3).randbytes(4096)))
    variant("prior weights: header length 2^60", mutate("prior/model.safetensors",
                                                        lambda raw: struct.pack("<Q", 2**60) + raw[8:]), in_quick=True)
    variant("prior weights: header length past the end", mutate("prior/model.safetensors",
                                                                lambda raw: struct.pack("<Q", len(raw)) + raw[8:]))
    variant("prior weights: a tensor claims 10^12 elements", mutate("prior/model.safetensors", header_edit(grow)),
            in_quick=True)
    variant("prior weights: offsets to 2^62", mutate("prior/model.safetensors", header_edit(no_hash_offsets)))
    variant("prior weights: a tensor renamed", mutate("prior/model.safetensors", header_edit(rename)))
    variant("prior weights: dtype F32 -> F16", mutate("prior/model.safetensors", header_edit(retype)))
    variant("prior weights: 10 MB of metadata in the header", mutate("prior/model.safetensors", header_edit(
        lambda header: header.setdefault("__metadata__", {}).update({"pad": "x" * (10 * 2**20)}))), harmless=True)
    variant("prior weights are the tokenizer's", lambda target: shutil.copy(target / "tokenizer" / "model.safetensors",
                                                                            target / "prior" / "model.safetensors"))
    return payloads


def build_training_state_payloads(directory: Path, npz: Path, quick: bool) -> list[Payload]:
    """``sundae train`` resuming from a run folder whose checkpoint holds a hostile file."""
    import torch

    flags = ["--preset", "tiny", "--dim", "32", "--heads", "2", "--head-dim", "16", "--depth", "1,1,1", "--steps", "2",
             "--batch-size", "4", "--checkpoint-every", "2", "--eval-every", "100", "--sample-every", "100",
             "--sample-steps", "2", "--log-every", "1", "--device", "cpu", "--precision", "float32"]
    base = directory / "run"
    child = launch(["train", str(npz), "--output-dir", str(base), *flags], cwd=directory, stdout=directory / "run.log")
    if child.wait(300) != 0:
        say(f"  (training-state corpus skipped: the base run failed: {tail(directory / 'run.log')})")
        return []
    marker = directory / "marker-state"
    payloads = []

    def variant(name: str, edit: Callable[[Path], None], in_quick: bool, with_marker: bool = False) -> None:
        target = directory / f"run{len(payloads):02d}"
        shutil.copytree(base, target)
        edit(target / "checkpoint")
        payloads.append(Payload(f"resume: {name}", "training-state", ["train", str(npz), "--output-dir", str(target),
                                                                      *flags],
                                marker if with_marker else None, in_quick or not quick))

    def state_bytes(data: bytes) -> Callable[[Path], None]:
        return lambda checkpoint: (checkpoint / "training_state.pt").write_bytes(data)

    class SystemGadget:
        def __reduce__(self):
            return os.system, (f"touch {marker}",)

    def gadget_state(checkpoint: Path) -> None:
        state = torch.load(checkpoint / "training_state.pt", weights_only=True)
        state["callbacks"] = SystemGadget()
        torch.save(state, checkpoint / "training_state.pt")

    def cut(checkpoint: Path) -> None:
        path = checkpoint / "training_state.pt"
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])

    def config(edit: Callable[[dict], None]) -> Callable[[Path], None]:
        def function(checkpoint: Path) -> None:
            payload = json.loads((checkpoint / "config.json").read_text())
            edit(payload)
            (checkpoint / "config.json").write_text(json.dumps(payload))
        return function

    variant("training_state.pt with an os.system gadget", gadget_state, True, with_marker=True)
    variant("training_state.pt = bytearray bomb (bare pickle)", state_bytes(BYTEARRAY_BOMB), True)
    scratch = directory / "bomb.pt"
    variant("training_state.pt = bytearray(3e9) (torch zip data.pkl)",
            state_bytes(write_torch_zip(scratch, BYTEARRAY_BOMB).read_bytes()), True)
    variant("training_state.pt = hash bomb (torch zip)", state_bytes(write_torch_zip(scratch, HASH_BOMB).read_bytes()),
            True)
    variant("training_state.pt = storage claims 4 GB", state_bytes(write_torch_zip(
        scratch, tensor_pickle("0", 10**9, (4,), (1,)), {"0": bytes(16)}).read_bytes()), not quick)
    variant("training_state.pt truncated", cut, True)
    variant("training_state.pt empty", state_bytes(b""), not quick)
    variant('checkpoint config.json without "data"', config(lambda payload: payload.pop("data", None)), True)
    variant('checkpoint config.json "config": {"dim": "32"}',
            config(lambda payload: payload["config"].update(dim="32")),
            not quick)
    variant("checkpoint config.json is [1]", lambda checkpoint: (checkpoint / "config.json").write_text("[1]"), True)
    variant("checkpoint weights truncated", lambda checkpoint: (checkpoint / "model.safetensors").write_bytes(
        (checkpoint / "model.safetensors").read_bytes()[:100]), not quick)
    return payloads


def build_flag_payloads(directory: Path, images: Path, npz: Path) -> list[Payload]:
    """Configs given as flags: the same validation, reached from the command line."""
    tokenizer = ["train-tokenizer", str(images), "--output-dir", str(directory / "flags-tok"), "--preset", "tiny-f4",
                 "--resolution", "16", "--perceptual", "none", "--steps", "1", "--device", "cpu"]
    prior = ["train", str(npz), "--output-dir", str(directory / "flags-prior"), "--preset", "tiny", "--steps", "1",
             "--device", "cpu"]
    return [Payload("train-tokenizer --channels 8 (GroupNorm needs 32)", "flags", [*tokenizer, "--channels", "8"]),
            Payload("train-tokenizer --codebook-size 1000000000000", "flags",
                    [*tokenizer, "--codebook-size", str(10**12)]),
            Payload("train --depth 1,x,1", "flags", [*prior, "--depth", "1,x,1"]),
            Payload("train --dim -32", "flags", [*prior, "--dim", "-32"]),
            Payload("train --heads 0", "flags", [*prior, "--heads", "0"], quick=False),
            Payload("train --dropout 1.5", "flags", [*prior, "--dropout", "1.5"], quick=False)]


def run_payload(payload: Payload, directory: Path, memory_bytes: int, timeout: float, fork: bool) -> dict[str, Any]:
    work = directory / "runs" / re.sub(r"[^A-Za-z0-9]+", "-", payload.name)[:80]
    work.mkdir(parents=True, exist_ok=True)
    stdout, stderr = work / "stdout", work / "stderr"

    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (memory_bytes, memory_bytes))
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))

    child = launch(payload.argv, cwd=work, stdout=stdout, stderr=stderr, preexec=limit, fork=fork)
    timed_out = child.wait(timeout) is None
    if timed_out:
        child.kill()
    lines = [line for line in stderr.read_text(errors="replace").replace("\r", "\n").splitlines() if line.strip()]
    error_lines = [line for line in lines if line.startswith("error:")]
    other = [line for line in lines if not line.startswith("error:") and not LOG_LINE.match(line)]
    marker = payload.marker is not None and payload.marker.exists()
    problems = []
    if payload.harmless and child.returncode == 0 and not marker:
        pass
    elif timed_out:
        problems.append(f"hung: killed after {timeout:.0f}s")
    elif child.returncode != 2:
        problems.append(f"exit {child.returncode}")
    wants_error = not (payload.harmless and child.returncode == 0)
    if wants_error and not timed_out and len(error_lines) != 1:
        problems.append(f"{len(error_lines)} 'error:' lines")
    if any("Traceback" in line for line in lines):
        problems.append("traceback")
    if wants_error and other and not timed_out:
        problems.append(f"{len(other)} more stderr line(s)")
    if marker:
        problems.append("CODE RAN (marker file written)")
    rss_mb = child.maxrss_kib / 1024
    internal = [line for line in lines if "internal error" in line or "Error" in line]
    shown = (error_lines or internal or other or lines or [""])[0]
    return {"name": payload.name, "group": payload.group, "exit": child.returncode, "timed_out": timed_out,
            "seconds": round(child.seconds, 2), "peak_rss_mb": round(rss_mb, 1), "marker_written": marker,
            "error_lines": len(error_lines), "other_stderr_lines": other[:4], "message": shown[:400],
            "command": " ".join(payload.argv[:2]), "ok": not problems, "problems": problems}


def part_corpus(root: Path, args: argparse.Namespace) -> dict[str, Any]:
    directory = root / "corpus"
    directory.mkdir()
    images, npz = tiny_data(root / "corpus-data")
    (directory / "ckpt").mkdir()
    payloads = [*build_checkpoint_payloads(directory / "ckpt", args.quick),
                *build_yaml_payloads(directory, args.quick),
                *build_model_dir_payloads(directory, args.quick),
                *build_training_state_payloads(directory, npz, args.quick),
                *build_flag_payloads(directory, images, npz)]
    payloads = [payload for payload in payloads if payload.quick or not args.quick]
    memory = int(args.memory_limit_gb * 2**30)
    fork = args.launcher == "fork" and preload()
    results = []
    for payload in payloads:
        result = run_payload(payload, directory, memory, args.payload_timeout, fork)
        if result["peak_rss_mb"] > args.payload_rss_mb:
            result["ok"] = False
            result["problems"].append(f"peak RSS {result['peak_rss_mb']:.0f} MB > {args.payload_rss_mb} MB")
        results.append(result)
        say(f"  {'ok  ' if result['ok'] else 'FAIL'} {payload.name}: exit {result['exit']}, {result['seconds']}s, "
            f"{result['peak_rss_mb']:.0f} MB{'' if result['ok'] else ' -- ' + ', '.join(result['problems'])} | "
            f"{result['message'][:160]}")
    stray = sorted(str(p.relative_to(directory)) for p in directory.rglob("marker-*"))
    worst_rss = max(results, key=lambda r: r["peak_rss_mb"], default=None)
    worst_time = max(results, key=lambda r: r["seconds"], default=None)
    failures = [f"[{r['group']}] {r['name']} ({r['command']}): {', '.join(r['problems'])} | {r['message'][:300]}"
                for r in results if not r["ok"]]
    if stray:
        failures.append(f"marker files exist: {stray}")
    return {"payloads_tried": len(results), "passed": sum(r["ok"] for r in results),
            "failed": sum(not r["ok"] for r in results), "memory_limit_gb": args.memory_limit_gb,
            "rss_bound_mb": args.payload_rss_mb, "timeout_s": args.payload_timeout,
            "worst_rss_mb": worst_rss and worst_rss["peak_rss_mb"],
            "worst_rss_payload": worst_rss and worst_rss["name"],
            "worst_seconds": worst_time and worst_time["seconds"],
            "worst_seconds_payload": worst_time and worst_time["name"],
            "code_ran": sum(r["marker_written"] for r in results) + len(stray),
            "by_group": {group: {"tried": sum(r["group"] == group for r in results),
                                 "passed": sum(r["ok"] for r in results if r["group"] == group)}
                         for group in dict.fromkeys(r["group"] for r in results)},
            "results": results, "failures": failures}


# =============================================================================================
# driver
# =============================================================================================


def parse_arguments(argv: Iterable[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="A few minutes: 3 kills per variant, 300 requests, "
                        "the corpus's main cases.")
    parser.add_argument("--out", type=Path, default=None, help="JSON file for the figures.")
    parser.add_argument("--parts", default="kill,web,corpus", help="Comma-separated subset of kill,web,corpus.")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--kills", type=int, default=None, help="Killed runs per variant (quick 3, full 20).")
    parser.add_argument("--variants", default=None, help="Only training variants whose name contains one of these "
                        "comma-separated words.")
    parser.add_argument("--train-steps", type=int, default=12)
    parser.add_argument("--launcher", choices=["fork", "exec"], default=None,
                        help="fork: each training run forked from this process (torch already imported; quick "
                             "default); exec: a fresh `sundae` process each time (full default).")
    parser.add_argument("--run-timeout", type=float, default=60.0, help="Seconds one training run may take.")
    parser.add_argument("--requests", type=int, default=None, help="Fuzzed requests (quick 300, full 3000).")
    parser.add_argument("--disconnect-trials", type=int, default=None, help="Per long job (quick 2, full 10).")
    parser.add_argument("--model", default=None, help="Model directory to serve (default: the shipped model).")
    parser.add_argument("--server-rss-mb", type=float, default=2048.0, help="Bound on the server's peak RSS.")
    parser.add_argument("--memory-limit-gb", type=float, default=4.0, help="RLIMIT_AS of each corpus process.")
    parser.add_argument("--payload-rss-mb", type=float, default=1536.0, help="Bound on a corpus process's peak RSS.")
    parser.add_argument("--payload-timeout", type=float, default=None, help="Seconds per payload (quick 30, full 60).")
    parser.add_argument("--keep", action="store_true", help="Keep the temporary folder (printed at the end).")
    args = parser.parse_args(argv)
    args.kills = args.kills if args.kills is not None else (3 if args.quick else 20)
    args.requests = args.requests if args.requests is not None else (300 if args.quick else 3000)
    args.disconnect_trials = args.disconnect_trials if args.disconnect_trials is not None else (2 if args.quick else 10)
    args.payload_timeout = args.payload_timeout if args.payload_timeout is not None else (30.0 if args.quick else 60.0)
    args.launcher = args.launcher or ("fork" if args.quick else "exec")
    return args


def main(argv: Iterable[str] | None = None) -> int:
    args = parse_arguments(argv)
    parts = [part.strip() for part in args.parts.split(",") if part.strip()]
    rng = random.Random(args.seed)
    started = time.monotonic()
    root = Path(tempfile.mkdtemp(prefix="sundae-fault-suite-"))
    import torch

    torch.set_num_threads(1)
    report: dict[str, Any] = {"suite": "fault-suite", "mode": "quick" if args.quick else "full", "seed": args.seed,
                              "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                              "host": {"cpus": os.cpu_count(), "python": platform.python_version(),
                                       "torch": torch.__version__, "platform": platform.platform()},
                              "command": " ".join(sys.argv)}
    try:
        # the kill part forks from this process, so it runs first, before any thread starts
        if "kill" in parts:
            say(f"== kill -9 training ({args.kills} killed runs per variant, launcher {args.launcher})")
            report["kill"] = part_kill(root, args, rng)
            report["kill"]["seconds"] = round(time.monotonic() - started, 1)
        if "corpus" in parts:
            mark = time.monotonic()
            say(f"== hostile checkpoints and configs (RLIMIT_AS {args.memory_limit_gb:g} GB)")
            report["corpus"] = part_corpus(root, args)
            report["corpus"]["seconds"] = round(time.monotonic() - mark, 1)
        if "web" in parts:
            mark = time.monotonic()
            say(f"== web-app fuzzer ({args.requests} requests)")
            report["web"] = part_web(root, args, rng)
            report["web"]["seconds"] = round(time.monotonic() - mark, 1)
            if report["web"]["peak_server_rss_mb"] > args.server_rss_mb:
                report["web"]["failures"].append(f"server peak RSS {report['web']['peak_server_rss_mb']} MB > "
                                                 f"{args.server_rss_mb} MB")
    finally:
        report["wall_seconds"] = round(time.monotonic() - started, 1)
        failures = [f"{part}: {failure}" for part in ("kill", "web", "corpus") for failure in
                    report.get(part, {}).get("failures", [])]
        report["failures"] = failures
        report["passed"] = not failures and all(part in report for part in parts)
        if args.out is not None:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(report, indent=2, default=str) + "\n")
        print_summary(report)
        if args.keep or failures:
            say(f"work folder kept: {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)
    return 0 if report["passed"] else 1


def print_summary(report: dict[str, Any]) -> None:
    say("\n== summary")
    if "kill" in report:
        kill = report["kill"]
        say(f"kill -9: {kill['kills_survived']}/{kill['trials']} killed runs resumed to bit-identical files "
            f"({kill['kills']} kills, launcher {kill['launcher']})")
        if kill["starved_runs"]:
            say(f"  note: {len(kill['starved_runs'])} run(s) outlived the timeout while runnable (CPU starvation by "
                f"other work on the machine; given up to 10x longer)")
        for name, figures in kill["variants"].items():
            say(f"  {name:28s} {figures['survived']}/{figures['trials']} survived, {figures['kills']} kills, "
                f"{figures['kills_mid_write']} mid-write, {figures['kills_missed']} missed, reference "
                f"{figures['reference_seconds']}s")
    if "web" in report:
        web = report["web"]
        say(f"web: {web['requests_sent']} requests, statuses {web['status_counts']}, 5xx {web['server_errors_5xx']}, "
            f"transport errors {web['transport_errors'] or 0}, left mid-stream {web['left_mid_stream']}, jobs "
            f"{web['job_endings']}")
        say(f"  server RSS: peak {web['peak_server_rss_mb']} MB (start {web.get('rss_at_start_mb')}, after fuzzing "
            f"{web.get('rss_after_fuzz_mb')}, end {web.get('rss_at_end_mb')}); worst worker-free after a disconnect "
            f"{web['worst_worker_free_after_disconnect_s']} s")
    if "corpus" in report:
        corpus = report["corpus"]
        say(f"corpus: {corpus['passed']}/{corpus['payloads_tried']} payloads gave exit 2 + one error line; code ran "
            f"{corpus['code_ran']} time(s); worst RSS {corpus['worst_rss_mb']} MB ({corpus['worst_rss_payload']}); "
            f"slowest {corpus['worst_seconds']} s ({corpus['worst_seconds_payload']})")
        say(f"  by group: {corpus['by_group']}")
    say(f"wall time {report['wall_seconds']} s; {len(report['failures'])} failure(s)")
    for failure in report["failures"]:
        say(f"  FAIL {failure}")


if __name__ == "__main__":
    sys.exit(main())
