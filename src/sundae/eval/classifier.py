"""A small CNN classifier for MNIST-scale datasets: the judge of class-conditional samples and
the dataset-specific feature extractor for small-image metrics (its penultimate layer).

Numbers computed with its features are only comparable with numbers from the same weights:
every report names the extractor by the sha256 of its weights file.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sundae.checkpoint import PretrainedMixin
from sundae.config import ConfigBase, ConfigError

log = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True)
class ClassifierConfig(ConfigBase):
    in_channels: int = 1
    image_size: int = 28
    num_classes: int = 10
    width: int = 32
    feature_dim: int = 128

    def validate(self) -> None:
        if self.image_size % 4:
            raise ConfigError(f"image_size must be a multiple of 4, got {self.image_size}")
        if min(self.in_channels, self.num_classes, self.width, self.feature_dim) < 1:
            raise ConfigError("in_channels, num_classes, width and feature_dim must be >= 1")


class SmallClassifier(nn.Module, PretrainedMixin):
    """conv-conv-pool ×2, a ``feature_dim`` embedding, then class logits. Inputs in [-1, 1]."""

    config_class = ClassifierConfig

    def __init__(self, config: ClassifierConfig) -> None:
        super().__init__()
        self.config = config
        w = config.width
        self.body = nn.Sequential(
            nn.Conv2d(config.in_channels, w, 3, padding=1), nn.ReLU(), nn.Conv2d(w, w, 3, padding=1), nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(w, 2 * w, 3, padding=1), nn.ReLU(), nn.Conv2d(2 * w, 2 * w, 3, padding=1), nn.ReLU(),
            nn.MaxPool2d(2),
        )
        side = config.image_size // 4
        self.embed = nn.Linear(2 * w * side * side, config.feature_dim)
        self.head = nn.Linear(config.feature_dim, config.num_classes)

    def features(self, images: Tensor) -> Tensor:
        """images (B, C, H, W) in [-1, 1] -> features (B, feature_dim)."""
        return F.relu(self.embed(self.body(images).flatten(1)))

    def forward(self, images: Tensor) -> Tensor:
        return self.head(self.features(images))


def train_classifier(images: Tensor, labels: Tensor, *, config: ClassifierConfig, epochs: int = 2,
                     batch_size: int = 128, learning_rate: float = 2e-3, seed: int = 0) -> SmallClassifier:
    """Adam on (images in [-1, 1], labels); a seeded shuffle per epoch."""
    torch.manual_seed(seed)
    model = SmallClassifier(config)
    optimizer = torch.optim.Adam(model.parameters(), lr=learning_rate)
    generator = torch.Generator().manual_seed(seed)
    started = time.perf_counter()
    for epoch in range(epochs):
        order = torch.randperm(len(images), generator=generator)
        for start in range(0, len(images), batch_size):
            batch = order[start:start + batch_size]
            loss = F.cross_entropy(model(images[batch]), labels[batch])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        log.info("classifier epoch %d: last loss %.3f (%.0fs)", epoch + 1, loss.item(), time.perf_counter() - started)
    return model.eval()


@torch.no_grad()
def predict(model: SmallClassifier, images: Tensor, batch_size: int = 512) -> Tensor:
    return torch.cat([model(chunk).argmax(dim=1) for chunk in images.split(batch_size)])
