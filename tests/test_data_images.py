"""ImageFolder listing, labels, resize/crop, corrupt files; image grid and tensor <-> PIL helpers."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from sundae.data.images import (
    DatasetError,
    ImageFolder,
    UnreadableImageError,
    grid_array,
    pil_to_tensor,
    save_image_grid,
    tensor_to_pil,
)


def write_png(path: Path, pixels: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)
    return path


def solid(height: int, width: int, colour: tuple[int, int, int]) -> np.ndarray:
    return np.broadcast_to(np.array(colour, dtype=np.uint8), (height, width, 3)).copy()


def test_class_sub_folders_give_sorted_labels_in_sorted_file_order(tmp_path: Path) -> None:
    write_png(tmp_path / "dog" / "b.png", solid(8, 8, (0, 0, 255)))
    write_png(tmp_path / "cat" / "z.png", solid(8, 8, (255, 0, 0)))
    write_png(tmp_path / "dog" / "nested" / "a.jpg", solid(8, 8, (0, 255, 0)))
    write_png(tmp_path / "cat" / "a.png", solid(8, 8, (255, 255, 255)))
    (tmp_path / "cat" / "notes.txt").write_text("not an image")

    folder = ImageFolder(tmp_path, resolution=8)

    assert folder.classes == ["cat", "dog"]
    assert folder.relative_paths == ["cat/a.png", "cat/z.png", "dog/b.png", "dog/nested/a.jpg"]
    assert folder.labels == [0, 0, 1, 1]
    image, label = folder[2]
    assert label == 1
    assert torch.equal(image, pil_to_tensor(Image.fromarray(solid(8, 8, (0, 0, 255)))))


def test_images_directly_in_root_have_no_classes(tmp_path: Path) -> None:
    write_png(tmp_path / "one.png", solid(8, 8, (10, 20, 30)))
    folder = ImageFolder(tmp_path, resolution=8)
    assert folder.classes == [] and folder.labels is None
    assert folder[0][1] == -1


def test_sub_folders_can_be_ignored_as_classes(tmp_path: Path) -> None:
    write_png(tmp_path / "00000" / "1.png", solid(8, 8, (10, 20, 30)))
    write_png(tmp_path / "01000" / "2.png", solid(8, 8, (10, 20, 30)))
    folder = ImageFolder(tmp_path, resolution=8, classes_from_folders=False)
    assert folder.labels is None and [folder[i][1] for i in range(2)] == [-1, -1]


def test_loose_images_beside_class_folders_are_refused(tmp_path: Path) -> None:
    write_png(tmp_path / "loose.png", solid(8, 8, (0, 0, 0)))
    write_png(tmp_path / "cat" / "a.png", solid(8, 8, (0, 0, 0)))
    with pytest.raises(DatasetError, match="classes_from_folders=False"):
        ImageFolder(tmp_path, resolution=8)


def test_empty_folder_error_names_folder_and_extensions(tmp_path: Path) -> None:
    (tmp_path / "readme.txt").write_text("nothing here")
    with pytest.raises(DatasetError, match=rf"no images found under {tmp_path}.*png, jpg"):
        ImageFolder(tmp_path, resolution=8)


def test_value_range_is_exact_for_a_solid_colour(tmp_path: Path) -> None:
    write_png(tmp_path / "a.png", solid(12, 12, (255, 0, 127)))
    image, _ = ImageFolder(tmp_path, resolution=12)[0]
    assert image.shape == (3, 12, 12) and image.dtype == torch.float32
    assert torch.equal(image[0], torch.ones(12, 12))
    assert torch.equal(image[1], -torch.ones(12, 12))
    assert torch.allclose(image[2], torch.full((12, 12), 127 / 127.5 - 1))


def test_short_side_resize_then_centre_crop(tmp_path: Path) -> None:
    # 80 wide x 20 high, white left half, black right half. Short side 20 -> 10 gives 40 x 10;
    # the centre crop keeps resized columns 15..25 = original columns 30..50, half white half black.
    pixels = np.zeros((20, 80, 3), dtype=np.uint8)
    pixels[:, :40] = 255
    write_png(tmp_path / "wide.png", pixels)
    image, _ = ImageFolder(tmp_path, resolution=10)[0]
    assert image.shape == (3, 10, 10)
    assert image.min() >= -1 and image.max() <= 1
    assert (image[:, :, :3] > 0.9).all()
    assert (image[:, :, 7:] < -0.9).all()


def test_non_square_target_covers_then_crops(tmp_path: Path) -> None:
    # 20 x 20 to (8, 12): scale 0.6 -> 12 x 12, crop 2 rows top and bottom. Top 10 rows red, rest blue.
    pixels = solid(20, 20, (0, 0, 255))
    pixels[:10] = (255, 0, 0)
    write_png(tmp_path / "square.png", pixels)
    image, _ = ImageFolder(tmp_path, resolution=(8, 12))[0]
    assert image.shape == (3, 8, 12)
    assert (image[0, :2] > 0.9).all() and (image[2, :2] < -0.9).all()
    assert (image[0, -2:] < -0.9).all() and (image[2, -2:] > 0.9).all()


def test_bad_resolution_is_refused(tmp_path: Path) -> None:
    write_png(tmp_path / "a.png", solid(8, 8, (0, 0, 0)))
    with pytest.raises(DatasetError, match="resolution"):
        ImageFolder(tmp_path, resolution=(8, 0))


def test_corrupt_files_are_skipped_with_a_warning_and_listed(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    write_png(tmp_path / "a.png", solid(8, 8, (255, 0, 0)))
    (tmp_path / "b.png").write_bytes(b"definitely not a png")
    write_png(tmp_path / "c.png", solid(8, 8, (0, 255, 0)))
    noise = write_png(tmp_path / "noise.png", np.random.default_rng(0).integers(0, 256, (16, 16, 3), dtype=np.uint8))
    (tmp_path / "d.png").write_bytes(noise.read_bytes()[:400])  # truncated inside the image data
    noise.unlink()
    folder = ImageFolder(tmp_path, resolution=8)

    with caplog.at_level(logging.WARNING, logger="sundae.data.images"):
        replacement, _ = folder[1]
        wrapped, _ = folder[3]

    assert torch.equal(replacement, folder[2][0])  # the next readable file, every time
    assert torch.equal(wrapped, folder[0][0])  # wraps around past the end
    assert [skipped.path for skipped in folder.skipped] == ["b.png", "d.png"]
    assert all(skipped.reason for skipped in folder.skipped)
    assert "b.png" in caplog.text and "d.png" in caplog.text
    with pytest.raises(UnreadableImageError, match="b.png"):
        folder.load(1)


def test_pil_tensor_round_trip_is_exact() -> None:
    pixels = np.random.default_rng(0).integers(0, 256, size=(5, 7, 3), dtype=np.uint8)
    tensor = pil_to_tensor(Image.fromarray(pixels))
    assert tensor.shape == (3, 5, 7) and tensor.min() >= -1 and tensor.max() <= 1
    assert np.array_equal(np.asarray(tensor_to_pil(tensor)), pixels)
    grey = np.random.default_rng(1).integers(0, 256, size=(4, 6), dtype=np.uint8)
    assert np.array_equal(np.asarray(tensor_to_pil(pil_to_tensor(Image.fromarray(grey)))), grey)


def test_tensor_to_pil_rejects_a_batch() -> None:
    with pytest.raises(ValueError, match=r"\(C, H, W\)"):
        tensor_to_pil(torch.zeros(2, 3, 4, 4))


def test_image_grid_places_each_image_and_pads(tmp_path: Path) -> None:
    colours = torch.tensor([[255, 0, 0], [0, 255, 0], [0, 0, 255], [255, 255, 0], [0, 255, 255]])
    images = (colours.float() / 127.5 - 1)[:, :, None, None].expand(5, 3, 4, 6)
    path = save_image_grid(images, tmp_path / "grids" / "grid.png", nrow=3, padding=2)

    grid = np.asarray(Image.open(path))
    assert grid.shape == (2 + 2 * (4 + 2), 2 + 3 * (6 + 2), 3)
    for index, colour in enumerate(colours.numpy()):
        row, column = divmod(index, 3)
        top, left = 2 + row * 6, 2 + column * 8
        assert (grid[top : top + 4, left : left + 6] == colour).all()
    assert (grid[:2] == 0).all() and (grid[:, :2] == 0).all()
    assert (grid[8:12, 18:24] == 0).all()  # the sixth, empty cell


def test_grey_grid_is_two_dimensional_with_default_square_layout() -> None:
    images = torch.linspace(-1, 1, 4)[:, None, None, None].expand(4, 1, 3, 3)
    grid = grid_array(images, padding=1)
    assert grid.shape == (1 + 2 * 4, 1 + 2 * 4) and grid.dtype == np.uint8
    assert [grid[1, 1], grid[1, 5], grid[5, 1], grid[5, 5]] == [0, 85, 170, 255]
    with pytest.raises(ValueError, match="C = 1 or 3"):
        grid_array(torch.zeros(2, 2, 3, 3))
