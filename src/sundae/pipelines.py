"""Either paradigm's pipeline from one path: a model directory says in its ``model_index.json`` whether
it is a SUNDAE model (:class:`~sundae.pipeline.SundaePipeline`) or a VAR one
(:class:`~sundae.var.pipeline.VARPipeline`), and :func:`load_pipeline` opens it as such."""

from __future__ import annotations

import os
from typing import Any

import torch

from sundae.models import model_directory
from sundae.pipeline import VAR_PIPELINE_KIND, SundaePipeline, read_model_index
from sundae.var.pipeline import VARPipeline


def load_pipeline(directory: str | os.PathLike, device: str | torch.device | None = None,
                  **runtime: Any) -> SundaePipeline:
    """The pipeline of a model directory or shipped model name, of whichever paradigm its index says;
    ``runtime`` as in :meth:`SundaePipeline.from_pretrained`."""
    directory = model_directory(directory)
    pipeline_class = VARPipeline if read_model_index(directory)["kind"] == VAR_PIPELINE_KIND else SundaePipeline
    return pipeline_class.from_pretrained(directory, device=device, **runtime)


__all__ = ["load_pipeline"]
