"""VAR beside SUNDAE (spec seed 003; Tian et al. 2024): the multi-scale residual tokenizer, the
next-scale prediction transformer, its objective and its sampler. Kept apart from the SUNDAE modules,
built on their tokenizer, transformer layers, random numbers and sampling filters."""

from sundae.var.objective import next_scale_loss
from sundae.var.sampler import NextScaleOutput, sample_next_scale
from sundae.var.tokenizer import MultiScaleQuantizer, MultiScaleVQGAN, build_tokenizer
from sundae.var.transformer import NextScaleTransformer, block_causal_mask

__all__ = ["MultiScaleQuantizer", "MultiScaleVQGAN", "NextScaleOutput", "NextScaleTransformer", "block_causal_mask",
           "build_tokenizer", "next_scale_loss", "sample_next_scale"]
