"""sundae: fast non-autoregressive image generation at megapixel resolution.

Two stages (Bond-Taylor et al., "Megapixel Image Generation with Step-Unrolled Denoising
Autoencoders"): a VQ-GAN tokenizer (:mod:`sundae.tokenizer`) and a SUNDAE discrete prior built on
a 2D-aware hourglass transformer (:mod:`sundae.denoiser`, :mod:`sundae.sundae`).
"""

__version__ = "0.1.0"
