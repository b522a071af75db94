"""minilora benchmarks: minilora side by side with bitsandbytes, transformers and peft, in the same run.

`python -m benchmarks SUITE [SUITE ...] [--smoke] [--out DIR]`; suites are listed in benchmarks/run.py and
described in docs/benchmarks.md. CPU suites live in benchmarks/cpu/, GPU suites in benchmarks/gpu/, and all
share one harness, benchmarks/harness.py. Results go under benchmarks/results/ only.
"""
