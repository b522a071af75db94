"""minilora.models."""
