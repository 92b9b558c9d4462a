"""Where and in what precision models run: one place for the device, dtype and autocast choices
shared by the pipeline, the CLI and the benchmark, and for looking through DDP / torch.compile
wrappers (:func:`unwrap_model`).

On CUDA the default is bf16 (house style: "bf16 autocast on CUDA"): the prior runs under
``torch.autocast`` with its Linear weights cast to bf16 once (:func:`cast_linear_weights`; its
logits and the sampling arithmetic stay fp32, see :mod:`sundae.sampler`), and the VQ-GAN
decoder holds bf16 weights, channels-last, so its convolutions and GroupNorms run natively in
bf16 instead of casting around every layer. The
codebook and quantization stay fp32 (:mod:`sundae.tokenizer.vqgan`).
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from sundae.errors import InputError

PRECISIONS = {"float32": torch.float32, "bfloat16": torch.bfloat16}
PRECISION_CHOICES = ("auto", *PRECISIONS)


def resolve_device(device: str | torch.device | None) -> torch.device:
    """None: CUDA when available, else the CPU. A CUDA device on a machine without one is an error."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError):
        raise InputError(f"unknown device {device!r}; use cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise InputError(f"device {device} was asked for but CUDA is not available; use device='cpu'")
    return device


def resolve_precision(precision: str, device: torch.device) -> torch.dtype:
    """``"auto"``: bfloat16 on CUDA, float32 elsewhere; or ``"float32"`` / ``"bfloat16"``."""
    if precision == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if precision not in PRECISIONS:
        raise InputError(f"precision must be 'auto', 'float32' or 'bfloat16', got {precision!r}")
    return PRECISIONS[precision]


def native_bf16(device: torch.device) -> bool:
    """Whether bf16 matmuls run natively on ``device``: CUDA with bf16 support, or a CPU with AMX or
    AVX-512-BF16 (read at run time). Elsewhere bf16 is emulated and slower than fp32."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        checks = ("_is_amx_tile_supported", "_is_avx512_bf16_supported")  # private, present since torch 2.3
        return any(getattr(torch.cpu, name, lambda: False)() for name in checks)
    return False


def resolve_training_precision(precision: str, device: torch.device) -> torch.dtype:
    """Autocast dtype of a training step. ``"auto"``: bf16 where its matmuls are native
    (:func:`native_bf16`), else fp32. Master weights, optimizer state and losses stay fp32 either way."""
    if precision == "auto":
        return torch.bfloat16 if native_bf16(device) else torch.float32
    return resolve_precision(precision, device)


def autocast(device: torch.device, dtype: torch.dtype) -> contextlib.AbstractContextManager:
    """Autocast to ``dtype`` on ``device``; nothing in float32."""
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def unwrap_model(model: nn.Module) -> nn.Module:
    """The module inside DDP (``.module``) and torch.compile (``._orig_mod``) wrappers: what to save,
    and where a model's ``config`` is."""
    while True:
        if isinstance(model, nn.parallel.DistributedDataParallel):
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        else:
            return model


def cast_linear_weights(module: nn.Module, dtype: torch.dtype) -> nn.Module:
    """Give every ``nn.Linear`` of ``module`` ``dtype`` weights once, for running it under autocast.

    Under autocast a Linear casts its fp32 weight to bf16 at every call, and inside
    ``torch.inference_mode`` (the sampler's) torch's cast cache is off, so an FFHQ1024 prior would
    re-cast 0.86 GB of weights at every sampling step. Autocast rounds the weight exactly as
    ``.to(dtype)`` does, so the outputs are bit-identical; embeddings and norms stay fp32, as
    autocast runs them, and so does the residual stream. The module then needs autocast (or
    ``dtype`` inputs) to run.
    """
    if dtype == torch.float32:
        return module
    for layer in module.modules():
        if isinstance(layer, nn.Linear):
            layer.to(dtype)
    return module


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


__all__ = [
    "PRECISIONS", "PRECISION_CHOICES", "autocast", "cast_decoder", "cast_linear_weights", "native_bf16", "resolve_device", "resolve_precision",
    "resolve_training_precision", "unwrap_model",
]
