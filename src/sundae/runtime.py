"""Where and in what precision models run: one place for the device, dtype and autocast choices
shared by the pipeline, the CLI and the benchmark.

On CUDA the default is bf16 (house style: "bf16 autocast on CUDA"): the prior runs under
``torch.autocast`` (its logits and the sampling arithmetic stay fp32, see
:mod:`sundae.sampler`), and the VQ-GAN decoder holds bf16 weights, channels-last, so its
convolutions and GroupNorms run natively in bf16 instead of casting around every layer. The
codebook and quantization stay fp32 (:mod:`sundae.tokenizer.vqgan`).
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

PRECISIONS = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def resolve_device(device: str | torch.device | None) -> torch.device:
    """None: CUDA when available, else the CPU. A CUDA device on a machine without one is an error."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device} was asked for but CUDA is not available; use device='cpu'")
    return device


def resolve_precision(precision: str, device: torch.device) -> torch.dtype:
    """``"auto"``: bfloat16 on CUDA, float32 elsewhere; or ``"float32"`` / ``"bfloat16"``."""
    if precision == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be 'auto', 'float32' or 'bfloat16', got {precision!r}")
    return PRECISIONS[precision]


def autocast(device: torch.device, dtype: torch.dtype) -> contextlib.AbstractContextManager:
    """Autocast to ``dtype`` on ``device``; nothing in float32."""
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def cast_decoder(tokenizer: nn.Module, dtype: torch.dtype, *, channels_last: bool) -> nn.Module:
    """Give a VQ-GAN's decoder path (``post_quant_conv`` + ``decoder``) ``dtype`` weights, optionally
    channels-last; the quantizer's codebook stays as it is. Other tokenizers are returned unchanged."""
    decoder_path = [getattr(tokenizer, name, None) for name in ("post_quant_conv", "decoder")]
    if any(module is None for module in decoder_path):
        return tokenizer
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    for module in decoder_path:
        module.to(dtype=dtype, memory_format=memory_format)
    return tokenizer


__all__ = ["PRECISIONS", "autocast", "cast_decoder", "resolve_device", "resolve_precision"]
