"""VAR's next-scale prior in the prior training loop (:mod:`sundae.training.prior`, ``family="var"``): the
same DDP, EMA, precision, exact resume, metrics and export as SUNDAE's, with VAR's network, objective and
sampler. It trains on a latent dataset that a multi-scale tokenizer encoded (``sundae train-tokenizer
--scales ...`` then ``sundae encode``), whose tokenizer it loads to make the teacher-forced inputs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from sundae.config import NextScaleConfig, NextScaleOptions
from sundae.data.images import DatasetError
from sundae.pipeline import VAR_PIPELINE_KIND
from sundae.training.common import TrainingResult
from sundae.training.prior import PriorTrainingConfig, SundaeFamily, data_classes, train_prior
from sundae.var.objective import next_scale_loss
from sundae.var.sampler import sample_next_scale
from sundae.var.tokenizer import MultiScaleVQGAN, load_vqgan
from sundae.var.transformer import NextScaleTransformer


class NextScaleObjective(nn.Module):
    """The prior and its frozen quantizer, so that DDP sees one forward per backward."""

    def __init__(self, model: NextScaleTransformer, quantizer: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.quantizer = quantizer.requires_grad_(False)

    def forward(self, tokens: Tensor, class_labels: Tensor | None, generator: torch.Generator) -> tuple[Tensor, dict]:
        return next_scale_loss(self.model, self.quantizer, tokens, class_labels)


def dataset_tokenizer(dataset) -> MultiScaleVQGAN:
    """The multi-scale tokenizer that encoded ``dataset`` (its manifest's tokenizer path)."""
    identity = getattr(dataset, "tokenizer", None) or {}
    path = identity.get("path")
    tokenizer = load_vqgan(path) if path and Path(path).is_dir() else None
    if not isinstance(tokenizer, MultiScaleVQGAN):
        raise DatasetError("a VAR prior trains on tokens of a multi-scale tokenizer (sundae train-tokenizer --scales "
                           f"..., then sundae encode); this dataset's tokenizer is {path or 'none (pixel tokens)'}")
    return tokenizer


class NextScaleFamily(SundaeFamily):
    """VAR's :class:`~sundae.var.transformer.NextScaleTransformer` in the prior loop."""

    name = "var"
    kind = VAR_PIPELINE_KIND
    model_class = NextScaleTransformer
    config_class = NextScaleConfig

    def __init__(self, config: PriorTrainingConfig, dataset, device: torch.device) -> None:
        super().__init__(config, dataset, device)
        self.quantizer = dataset_tokenizer(dataset).quantize.to(device).eval()

    def model_config(self) -> NextScaleConfig:
        """The user's fields plus the codebook, codeword width, scales and classes of the data's tokenizer."""
        fields: dict[str, Any] = {**self.config.model, "codebook_size": self.dataset.codebook_size,
                                  "embed_dim": self.quantizer.embedding.embedding_dim,
                                  "scales": self.quantizer.scales, "num_classes": data_classes(self.dataset, self.config)}
        return NextScaleConfig.from_dict(fields)

    def objective(self, model: nn.Module) -> nn.Module:
        return NextScaleObjective(model, self.quantizer)

    def sample(self, model: nn.Module, labels: Tensor | None, seeds: Tensor) -> Tensor:
        return sample_next_scale(model, self.quantizer, class_labels=labels, seeds=seeds).tokens

    def scheduler(self) -> NextScaleOptions:
        return NextScaleOptions()

    def positions(self, model_config: Any) -> int:
        return model_config.sequence_length


def train_var(config: PriorTrainingConfig) -> TrainingResult:
    """Train (or resume) VAR's next-scale prior (``config.family`` "var"); returns the exported model directory."""
    return train_prior(config, NextScaleFamily)
