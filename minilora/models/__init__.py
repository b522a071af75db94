"""minilora.models: the Llama-family decoder (Llama, Mistral, Qwen2) and its config.json reader."""

from .config import SUPPORTED_MODEL_TYPES, ModelConfig
from .llama import KVCache, LlamaForCausalLM, LlamaModel, generate_greedy

__all__ = ["SUPPORTED_MODEL_TYPES", "KVCache", "LlamaForCausalLM", "LlamaModel", "ModelConfig", "generate_greedy"]
