"""minilora.io."""
