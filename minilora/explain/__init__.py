"""minilora.explain: QLoRA shown on a real model (the `minilora explain` command and the same functions in Python).

    quant.py   one 64-value block of a weight through NF4 step by step; a layer in NF4/FP4/int4 (explain quant)
    lora.py    LoRA parameter and byte arithmetic, alpha/r and rsLoRA scale, merging into 4-bit (explain lora)
    model.py   where the memory of a model goes, per module type and format (explain model)
    source.py  the model: the shipped SmolLM2 GGUF, a .gguf, a transformers directory or a config.json
    command.py the command line; plots.py the PNGs of --plot DIR (matplotlib, an optional extra)

docs/learn.md is the reading path through the library that these commands illustrate.
"""

from minilora.explain.lora import LoRAArithmetic, MergeMeasurement, lora_arithmetic, measure_merge
from minilora.explain.model import ModelMemory, explain_model
from minilora.explain.quant import BlockWalkthrough, LayerQuant, explain_block, explain_layer
from minilora.explain.source import ModelSource, open_model

__all__ = [
    "BlockWalkthrough",
    "LayerQuant",
    "LoRAArithmetic",
    "MergeMeasurement",
    "ModelMemory",
    "ModelSource",
    "explain_block",
    "explain_layer",
    "explain_model",
    "lora_arithmetic",
    "measure_merge",
    "open_model",
]
