"""The demo, a client of minilora: QLoRA-fine-tune SmolLM2-135M on a CPU to price products (``minilora demo``)."""
