"""minilora.train."""
