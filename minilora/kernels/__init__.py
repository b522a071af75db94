"""minilora.kernels."""
