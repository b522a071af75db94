"""minilora.quant: NF4/FP4 blockwise 4-bit quantization with double quantization, and LLM.int8 weights.

Read in this order: codebooks.py (the data types) -> blockwise.py (quantize, pack, double quant) ->
state.py (what is stored, and the checkpoint keys) -> int8.py -> linear.py (the modules).
"""

from . import workspace
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
from .linear import Linear4bit, Linear8bit, quantized_nbytes, replace_linears
from .state import VALID_BLOCKSIZES, NestedState, QuantState

__all__ = [
    "NF4_CODE",
    "VALID_BLOCKSIZES",
    "Linear4bit",
    "Linear8bit",
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
    "quantized_nbytes",
    "replace_linears",
    "unpack_4bit",
    "workspace",
]
