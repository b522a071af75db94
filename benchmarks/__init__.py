"""minilora benchmarks: minilora side by side with bitsandbytes, transformers and peft, in the same run.

`python -m benchmarks <suite> [--smoke] [--out DIR]`; suites are listed in benchmarks/run.py and described
in docs/benchmarks.md. CPU suites live in benchmarks/cpu/, the GPU suite in benchmarks/gpu/.
"""
