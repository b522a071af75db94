"""minilora.nn: the quantized Linear modules, drop-in replacements for nn.Linear that hold no float weight.

    Linear4bit       NF4/FP4 blockwise (optionally double-quantized) weight, QLoRA section 3
    Linear8bit       int8 weight with one scale per row, LLM.int8
    QuantizedLinear  what both offer lora/, io/ and train/: quant_format, dequantize, requantize, footprint
    float_weight     the [out, in] float weight of an nn.Linear or a QuantizedLinear

They hold the quant state as buffers (bitsandbytes' key names) and call the door (minilora.kernels) to
quantize, dequantize and multiply.
"""

from .linear import Linear4bit, Linear8bit, QuantizedLinear, float_weight, quantized_nbytes, replace_linears

__all__ = ["Linear4bit", "Linear8bit", "QuantizedLinear", "float_weight", "quantized_nbytes", "replace_linears"]
