"""Stage one: the VQ-GAN tokenizer (paper §3.1, §3.5) and the import of public taming checkpoints."""

from sundae.tokenizer.taming import (
    UnsafeCheckpointError,
    config_from_taming_yaml,
    convert_taming,
    convert_taming_state_dict,
    infer_config_from_state_dict,
    load_taming_state_dict,
    load_taming_vqgan,
)
from sundae.tokenizer.vqgan import (
    VQGAN,
    Decoder,
    Encoder,
    GumbelQuantizer,
    QuantizerOutput,
    VectorQuantizer,
    VQGANOutput,
    decode_in_tiles,
)

__all__ = [
    "VQGAN", "VQGANOutput", "Encoder", "Decoder", "VectorQuantizer", "GumbelQuantizer", "QuantizerOutput",
    "UnsafeCheckpointError", "load_taming_state_dict", "convert_taming_state_dict", "config_from_taming_yaml",
    "infer_config_from_state_dict", "load_taming_vqgan", "convert_taming", "decode_in_tiles",
]
