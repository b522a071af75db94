"""minilora.models: the one decoder (Llama, Mistral, Qwen2/3, Gemma-2/3 text, Phi-3/4) and its config.json reader."""

from .config import SUPPORTED_MODEL_TYPES, ModelConfig
from .llama import KVCache, LlamaForCausalLM, LlamaModel

__all__ = ["SUPPORTED_MODEL_TYPES", "KVCache", "LlamaForCausalLM", "LlamaModel", "ModelConfig"]
