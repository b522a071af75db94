"""Child tasks for tests/test_benchmarks_smoke.py, run by `python -m benchmarks.harness` (no heavy imports)."""

import time


def child_echo(value: int) -> dict:
    return {"value": value, "doubled": 2 * value}


def child_sleep(seconds: float) -> dict:
    time.sleep(seconds)
    return {}
