"""encode_folder + LatentDataset: flipped rows, labels, split, skipping, resume, identity checks (paper §3.1)."""

from __future__ import annotations

import hashlib
import json
import pickle
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from einops import rearrange
from PIL import Image
from safetensors.torch import save_file
from torch import Tensor

from sundae.checkpoint import CheckpointError, content_hash
from sundae.data.images import DatasetError, ImageFolder
from sundae.data.latents import LatentDataset, encode_folder, same_codes, tokenizer_identity

RESOLUTION = 16
TOKENIZER_ID = {"path": "/models/fake", "sha256": "a" * 64}


@dataclass
class FakeConfig:
    downsample_factor: int
    codebook_size: int
    in_channels: int = 3


class LeftHalfTokenizer:
    """Token = quantised mean of the left half of each f x f patch, so it is NOT flip-equivariant."""

    def __init__(self, codebook_size: int = 64, downsample_factor: int = 4) -> None:
        self.config = FakeConfig(downsample_factor, codebook_size)
        self.calls = 0

    def encode(self, images: Tensor) -> Tensor:
        self.calls += 1
        f = self.config.downsample_factor
        patches = rearrange(images, "b c (h p) (w q) -> b h w c p q", p=f, q=f)
        left = patches[..., : f // 2].mean(dim=(-3, -2, -1))
        return ((left + 1) / 2 * (self.config.codebook_size - 1)).round().long()


class CrashesAfter:
    """Wraps a tokenizer and raises on encode call number ``calls + 1``: a simulated interruption."""

    def __init__(self, tokenizer: LeftHalfTokenizer, calls: int) -> None:
        self.inner, self.remaining = tokenizer, calls
        self.config = tokenizer.config

    def encode(self, images: Tensor) -> Tensor:
        if self.remaining == 0:
            raise RuntimeError("simulated crash")
        self.remaining -= 1
        return self.inner.encode(images)


def write_noise_png(path: Path, seed: int, size: tuple[int, int] = (20, 24)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (*size, 3), dtype=np.uint8)).save(path)


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    """2 classes x 5 noise images (20 x 24) plus one broken file in the first class."""
    root = tmp_path / "images"
    for index in range(10):
        write_noise_png(root / ("cats" if index < 5 else "dogs") / f"{index:02d}.png", seed=index)
    (root / "cats" / "02_broken.png").write_bytes(b"\x89PNG\r\n\x1a\n but nothing else")
    return root


def encode(tokenizer, folder: Path, out_dir: Path, **options) -> Path:
    settings = dict(resolution=RESOLUTION, tokenizer_id=TOKENIZER_ID, batch_size=3, num_workers=2, progress=False)
    return encode_folder(tokenizer, folder, out_dir, **{**settings, **options})


def test_rows_are_each_image_then_its_encoded_flip(folder: Path, tmp_path: Path) -> None:
    tokenizer = LeftHalfTokenizer()
    dataset = LatentDataset(encode(tokenizer, folder, tmp_path / "latents"), split="all")

    images = ImageFolder(folder, resolution=RESOLUTION)
    positions = [images.relative_paths.index(source) for source in dataset.sources]
    pixels = torch.stack([images.load(position) for position in positions])
    originals, flips = tokenizer.encode(pixels), tokenizer.encode(pixels.flip(-1))
    tokens, labels = dataset.batch(range(len(dataset)))

    assert len(dataset) == 2 * 10 and dataset.grid_shape == (4, 4) and dataset.codebook_size == 64
    assert torch.equal(tokens[0::2], originals)
    assert torch.equal(tokens[1::2], flips)
    assert not torch.equal(flips, originals.flip(-1))  # a flipped token grid would have been wrong
    assert dataset.flipped.tolist() == [False, True] * 10
    assert dataset.class_names == ["cats", "dogs"] and dataset.num_classes == 2
    assert labels.tolist() == [0] * 10 + [1] * 10  # 5 readable cats, 5 dogs, two rows each
    assert dataset.tokenizer == TOKENIZER_ID
    manifest = json.loads((tmp_path / "latents" / "manifest.json").read_text())
    assert manifest["dtype"] == "uint16" and manifest["count"] == 20 and manifest["complete"]


def test_without_flips_a_split_keeps_only_the_images_own_rows(folder: Path, tmp_path: Path) -> None:
    """--no-flips (data whose orientation is fixed): the flipped rows leave every split, the originals all stay."""
    directory = encode(LeftHalfTokenizer(), folder, tmp_path / "latents", validation_fraction=0.2)
    for split in ("train", "validation", "all"):
        both, originals = LatentDataset(directory, split=split), LatentDataset(directory, split=split, flips=False)
        assert len(originals) == len(both) // 2 > 0 and not originals.flipped.any()
        assert originals.rows.tolist() == both.rows[~both.flipped].tolist()
        tokens, labels = originals.batch(range(len(originals)))
        expected_tokens, expected_labels = both.batch(np.flatnonzero(~both.flipped))
        assert torch.equal(tokens, expected_tokens) and torch.equal(labels, expected_labels)
        assert originals.labels.tolist() == expected_labels.tolist()


def test_unreadable_image_is_skipped_and_listed(folder: Path, tmp_path: Path) -> None:
    dataset = LatentDataset(encode(LeftHalfTokenizer(), folder, tmp_path / "latents"), split="all")
    assert [entry["path"] for entry in dataset.manifest["skipped"]] == ["cats/02_broken.png"]
    assert "cats/02_broken.png" not in dataset.sources and len(dataset.sources) == 10


def test_split_keeps_pairs_together_and_survives_added_images(folder: Path, tmp_path: Path) -> None:
    first = tmp_path / "first"
    encode(LeftHalfTokenizer(), folder, first, validation_fraction=0.5, split_seed=3)
    split = np.load(first / "split.npy")
    assert np.array_equal(split[0::2], split[1::2])
    train, validation = LatentDataset(first, split="train"), LatentDataset(first, split="validation")
    assert len(train) > 0 and len(validation) > 0 and len(train) + len(validation) == 20
    assert sorted([*train.rows, *validation.rows]) == list(range(20))

    for index in range(10, 16):
        write_noise_png(folder / "dogs" / f"{index:02d}.png", seed=index)
    second = tmp_path / "second"
    encode(LeftHalfTokenizer(), folder, second, validation_fraction=0.5, split_seed=3)
    before = dict(zip(train.sources, np.load(first / "split.npy")[0::2]))
    after = dict(zip(LatentDataset(second).sources, np.load(second / "split.npy")[0::2]))
    assert all(after[source] == code for source, code in before.items())


def test_resumed_encoding_is_byte_identical_to_an_uninterrupted_one(folder: Path, tmp_path: Path) -> None:
    encode(LeftHalfTokenizer(), folder, tmp_path / "reference")

    interrupted = tmp_path / "interrupted"
    with pytest.raises(RuntimeError, match="simulated crash"):
        encode(CrashesAfter(LeftHalfTokenizer(), calls=2), folder, interrupted)
    progress = json.loads((interrupted / "manifest.json").read_text())
    assert progress["complete"] is False and progress["images_done"] == 6
    with pytest.raises(DatasetError, match="still being encoded"):
        LatentDataset(interrupted)

    resumed = LeftHalfTokenizer()
    encode(resumed, folder, interrupted)

    assert resumed.calls == 2  # 11 files in batches of 3: 4 batches, 2 already done
    reference_files = sorted(path.name for path in (tmp_path / "reference").iterdir())
    assert reference_files == sorted(path.name for path in interrupted.iterdir())
    for name in reference_files:
        assert (tmp_path / "reference" / name).read_bytes() == (interrupted / name).read_bytes(), name


def test_rerun_on_finished_output_does_nothing_even_if_the_tokenizer_moved(folder: Path, tmp_path: Path) -> None:
    out_dir = encode(LeftHalfTokenizer(), folder, tmp_path / "latents")
    again = LeftHalfTokenizer()
    encode(again, folder, out_dir, tokenizer_id={**TOKENIZER_ID, "path": "/elsewhere/fake"})
    assert again.calls == 0


def test_output_of_another_tokenizer_or_listing_is_refused(folder: Path, tmp_path: Path) -> None:
    out_dir = tmp_path / "latents"
    with pytest.raises(RuntimeError, match="simulated crash"):
        encode(CrashesAfter(LeftHalfTokenizer(), calls=1), folder, out_dir)

    with pytest.raises(DatasetError, match="tokenizer: existing .*'aaaa"):
        encode(LeftHalfTokenizer(), folder, out_dir, tokenizer_id={**TOKENIZER_ID, "sha256": "b" * 64})
    write_noise_png(folder / "dogs" / "new.png", seed=99)
    with pytest.raises(DatasetError, match="listing_sha256"):
        encode(LeftHalfTokenizer(), folder, out_dir)
    with pytest.raises(DatasetError, match="codebook_size"):
        encode(LeftHalfTokenizer(codebook_size=32), folder, out_dir)


def test_an_encoding_resumes_with_the_tokenizer_after_a_decoder_only_fine_tune(folder: Path, tmp_path: Path) -> None:
    out_dir = tmp_path / "latents"
    first = {**TOKENIZER_ID, "codes_sha256": "c" * 64}
    with pytest.raises(RuntimeError, match="simulated crash"):
        encode(CrashesAfter(LeftHalfTokenizer(), calls=1), folder, out_dir, tokenizer_id=first)
    resumed = LeftHalfTokenizer()
    encode(resumed, folder, out_dir, tokenizer_id={**first, "sha256": "b" * 64})  # other decoder, same codes
    assert resumed.calls > 0 and LatentDataset(out_dir, split="all").tokenizer["sha256"] == TOKENIZER_ID["sha256"]
    with pytest.raises(DatasetError, match="tokenizer: existing"):  # other codes
        encode(LeftHalfTokenizer(), folder, out_dir, tokenizer_id={**first, "codes_sha256": "d" * 64})


def test_large_codebooks_are_stored_as_int32(folder: Path, tmp_path: Path) -> None:
    class HighIndexTokenizer(LeftHalfTokenizer):
        def encode(self, images: Tensor) -> Tensor:
            return super().encode(images) // 20 + 66_000  # every index beyond uint16

    tokenizer = HighIndexTokenizer(codebook_size=70_000)
    dataset = LatentDataset(encode(tokenizer, folder, tmp_path / "latents"), split="all")
    first = ImageFolder(folder, resolution=RESOLUTION).load(0)[None]
    tokens, _ = dataset.batch([0, 1])
    assert dataset.manifest["dtype"] == "int32"
    assert torch.equal(tokens, torch.cat([tokenizer.encode(first), tokenizer.encode(first.flip(-1))]))
    assert (tmp_path / "latents" / "tokens.bin").stat().st_size == 20 * 4 * 4 * 4


def test_resolution_must_divide_by_the_downsample_factor(folder: Path, tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="downsample factor 4"):
        encode(LeftHalfTokenizer(), folder, tmp_path / "latents", resolution=18)


def test_dataset_items_batches_and_pickling_agree(folder: Path, tmp_path: Path) -> None:
    out_dir = encode(LeftHalfTokenizer(), folder, tmp_path / "latents", validation_fraction=0.3)
    dataset = LatentDataset(out_dir, split="train")
    tokens, labels = dataset.batch(torch.tensor([2, 0, 2]))
    item_tokens, item_label = dataset[2]
    assert tokens.dtype == torch.int64 and torch.equal(tokens[0], item_tokens) and torch.equal(tokens[0], tokens[2])
    assert labels[0].item() == item_label == dataset.labels[2]
    raw = np.fromfile(out_dir / "tokens.bin", dtype=np.uint16).reshape(-1, 4, 4)
    assert np.array_equal(tokens[1].numpy(), raw[dataset.rows[0]])

    copy = pickle.loads(pickle.dumps(dataset))
    assert torch.equal(copy.batch(range(len(copy)))[0], dataset.batch(range(len(dataset)))[0])
    with pytest.raises(IndexError):
        dataset.batch([len(dataset)])
    with pytest.raises(ValueError, match="split must be one of"):
        LatentDataset(out_dir, split="test")


def test_damaged_or_foreign_directories_are_refused(folder: Path, tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="not a latent dataset"):
        LatentDataset(tmp_path)
    out_dir = encode(LeftHalfTokenizer(), folder, tmp_path / "latents")
    with open(out_dir / "tokens.bin", "ab") as handle:
        handle.write(b"\0\0")
    with pytest.raises(DatasetError, match="damaged"):
        LatentDataset(out_dir)
    stray = tmp_path / "stray"
    stray.mkdir()
    (stray / "tokens.bin").write_bytes(b"")
    with pytest.raises(DatasetError, match="no manifest.json"):
        encode(LeftHalfTokenizer(), folder, stray)


def test_tokenizer_identity_hashes_weights_and_reads_config(tmp_path: Path) -> None:
    weights = {"encoder.conv.weight": torch.ones(2, 3), "decoder.conv.weight": torch.zeros(3)}
    save_file(weights, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps({"class": "VQGAN", "config": {"codebook_size": 8}}))
    identity = tokenizer_identity(tmp_path)
    assert identity["sha256"] == hashlib.sha256((tmp_path / "model.safetensors").read_bytes()).hexdigest()
    assert identity["codes_sha256"] == content_hash({"encoder.conv.weight": torch.ones(2, 3)})
    assert identity["config"]["config"]["codebook_size"] == 8 and identity["path"] == str(tmp_path.resolve())
    shutil.rmtree(tmp_path)
    with pytest.raises(CheckpointError, match="model.safetensors"):
        tokenizer_identity(tmp_path)


def test_same_codes_compares_the_code_hash_where_both_records_have_one() -> None:
    tuned_decoder = {"sha256": "b", "codes_sha256": "c"}
    assert same_codes({"sha256": "a", "codes_sha256": "c"}, tuned_decoder)
    assert not same_codes({"sha256": "a", "codes_sha256": "d"}, tuned_decoder)
    assert not same_codes({"sha256": "a"}, tuned_decoder)  # an older record: the weights file decides
    assert same_codes({"sha256": "b"}, tuned_decoder)
    assert same_codes(None, {}) and not same_codes(None, tuned_decoder)  # pixel tokens: no tokenizer on either side


