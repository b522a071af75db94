"""minilora.quant: NF4/FP4 blockwise 4-bit quantization with double quantization, and LLM.int8 weights.

The reference: plain PyTorch, read beside the QLoRA paper (section 3) and LLM.int8. Read in this order:
codebooks.py (the data types, nearest-code rounding) -> blockwise.py (quantize, pack, double quant,
dequantize) -> state.py (what is stored, and the checkpoint keys) -> int8.py -> bnb_cuda_rule.py (the odd
details of bitsandbytes' CUDA kernels, for bytes equal to what it stores on a GPU). The fast paths and the
door that picks them are minilora.kernels; the quantized Linear modules are minilora.nn.
"""

from .blockwise import (
    dequantize_4bit,
    dequantize_absmax,
    dequantize_blockwise_8bit,
    double_quantize,
    pack_4bit,
    quantize_4bit,
    quantize_4bit_codes,
    quantize_blockwise_8bit,
    unpack_4bit,
)
from .codebooks import NF4_CODE, derive_dynamic_code, derive_fp4_code, derive_nf4_code, get_code
from .int8 import dequantize_int8_rowwise, int8_linear, quantize_int8_rowwise
from .state import VALID_BLOCKSIZES, NestedState, QuantState

__all__ = [
    "NF4_CODE",
    "VALID_BLOCKSIZES",
    "NestedState",
    "QuantState",
    "dequantize_4bit",
    "dequantize_absmax",
    "dequantize_blockwise_8bit",
    "dequantize_int8_rowwise",
    "derive_dynamic_code",
    "derive_fp4_code",
    "derive_nf4_code",
    "double_quantize",
    "get_code",
    "int8_linear",
    "pack_4bit",
    "quantize_4bit",
    "quantize_4bit_codes",
    "quantize_blockwise_8bit",
    "quantize_int8_rowwise",
    "unpack_4bit",
]
