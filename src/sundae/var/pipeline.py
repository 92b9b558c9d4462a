"""``VARPipeline``: VAR's next-scale prior and multi-scale tokenizer behind the interface of
:class:`~sundae.pipeline.SundaePipeline` (sampling, inpainting, outpainting, saving), so the CLI, the
evaluation and the web app take a VAR model directory as they take a SUNDAE one.

A VAR model directory is a SUNDAE one with ``"kind": "var-pipeline"`` in its ``model_index.json``: its
``prior/`` holds a :class:`~sundae.var.transformer.NextScaleTransformer`, its ``tokenizer/`` a
:class:`~sundae.var.tokenizer.MultiScaleVQGAN` and its ``scheduler/`` a
:class:`~sundae.config.NextScaleOptions`. Tokens are packed multi-scale rows (B, 1, L); masks and
token grids of edits are on the finest scale.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import Tensor

from sundae.checkpoint import CONFIG_NAME, CheckpointError
from sundae.config import NextScaleOptions
from sundae.errors import InputError
from sundae.models import model_directory
from sundae.pipeline import (PRIOR_SUBDIR, SCHEDULER_SUBDIR, TOKENIZER_SUBDIR, VAR_PIPELINE_KIND, SundaePipeline,
                             model_data_section, read_model_index, read_scheduler)
from sundae.runtime import autocast, resolve_device
from sundae.sampler import SampleOutput, StepCallback
from sundae.var.sampler import sample_next_scale
from sundae.var.tokenizer import MultiScaleVQGAN
from sundae.var.transformer import NextScaleTransformer
from tqdm.auto import tqdm


class VARPipeline(SundaePipeline):
    """:class:`~sundae.pipeline.SundaePipeline` for VAR models: one prior forward pass per scale, knobs
    :class:`~sundae.config.NextScaleOptions`, images of the one size the scale schedule gives. Refinement
    (re-sampling from the current tokens) is SUNDAE's alone; inpainting and outpainting take any mask."""

    kind = VAR_PIPELINE_KIND
    options_class = NextScaleOptions
    edit_defaults: dict[str, Any] = {}  # VAR's own defaults serve edits too

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike, device: str | torch.device | None = None,
                        **runtime: Any) -> "VARPipeline":
        directory = model_directory(directory)
        index = read_model_index(directory)
        if index["kind"] != cls.kind:
            raise CheckpointError(f"{directory} is a {index['kind']} model, not a {cls.kind} one; load it with "
                                  "sundae.pipelines.load_pipeline, which reads either")
        device = resolve_device(device)
        prior = NextScaleTransformer.from_pretrained(directory / PRIOR_SUBDIR, map_location=device)
        tokenizer = MultiScaleVQGAN.from_pretrained(directory / TOKENIZER_SUBDIR, map_location=device).eval()
        if (prior.config.codebook_size, prior.config.scales) != (tokenizer.config.codebook_size,
                                                                  tokenizer.config.scales):
            raise CheckpointError(f"{directory}: the prior's codebook and scales ({prior.config.codebook_size}, "
                                  f"{prior.config.scales}) do not match its tokenizer's "
                                  f"({tokenizer.config.codebook_size}, {tokenizer.config.scales})")
        data = model_data_section(directory / PRIOR_SUBDIR)
        return cls(prior, tokenizer, class_names=data.get("class_names"), name=directory.name,
                   sampling_defaults=read_scheduler(directory / SCHEDULER_SUBDIR / CONFIG_NAME, NextScaleOptions),
                   **runtime)

    def forward_passes(self, options: NextScaleOptions) -> int:
        return len(self.prior.config.scales)

    def _sample(self, options: NextScaleOptions, callback: StepCallback | None, *, seeds: Tensor,
                class_labels: Tensor | None, return_trajectory: bool = False, num_samples: int | None = None,
                grid_shape: tuple[int, int] | None = None, tokens: Tensor | None = None,
                randomize_mask: Tensor | None = None, keep_mask: Tensor | None = None) -> SampleOutput:
        """VAR's sampler in this pipeline's precision, with the progress bar; ``keep_mask`` (B, h, w) of the
        finest grid and the packed ``tokens`` it keeps are an edit (``randomize_mask`` does not apply:
        every free token is sampled)."""
        if grid_shape is not None and tuple(grid_shape) != tuple(self.prior.config.latent_shape):
            raise InputError(f"a VAR model samples its scale schedule's {self.prior.config.latent_shape} grid "
                             f"only, got {tuple(grid_shape)}")
        bar_config = {"disable": None, "unit": "scale", "desc": "sampling", **self._progress_bar_config}
        finished = torch.zeros(len(seeds), dtype=torch.bool)
        with autocast(self.device, self.dtype), tqdm(total=self.forward_passes(options), **bar_config) as bar:
            def scale_done(scale: int, prefix: Tensor) -> bool | None:
                bar.update()
                return None if callback is None else callback(scale, prefix, finished)

            hook = None if bar.disable and callback is None else scale_done
            output = sample_next_scale(self.prior, self.tokenizer.quantize, options=options, seeds=seeds,
                                       class_labels=class_labels, known_tokens=None if keep_mask is None else tokens,
                                       known_mask=keep_mask, callback=hook, return_trajectory=return_trajectory)
        return SampleOutput(tokens=output.tokens, steps_taken=torch.full((len(seeds),), output.scales_done),
                            trajectory=output.trajectory)

    def refine(self, *args: Any, **kwargs: Any) -> Any:
        raise InputError("refine re-samples a region from its current tokens, which SUNDAE's denoiser does and VAR's "
                         "coarse-to-fine sampler cannot; use inpaint on a VAR model")

    def _canvas_tokens(self, canvas: Tensor, pixels: Tensor, token_mask: Tensor, row: int, column: int) -> Tensor:
        """VAR's scales cover one fixed grid, so the canvas must be the model's size; its known part keeps
        the tokens the multi-scale encoding of the canvas gives the positions whose footprint is known."""
        if tuple(canvas.shape[-2:]) != self.image_size:
            height, width = self.image_size
            raise InputError(f"a VAR model makes {width}x{height} images only; the outpainted canvas would be "
                             f"{canvas.shape[-1]}x{canvas.shape[-2]}: choose extensions that add up to it")
        with torch.inference_mode():
            return self.tokenizer.encode(canvas.to(self.device)).cpu()
