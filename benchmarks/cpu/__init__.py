"""CPU benchmark suites, one module each (listed in benchmarks/run.py); shared code is benchmarks/harness.py."""
