"""Child process entry: `python -m benchmarks.cpu.child SUITE TASK JSON_ARGS`.

Runs `benchmarks.cpu.<SUITE>.child_<TASK>(**args)` and prints its dict as one `RESULT {json}` line, so
that a measurement (peak RSS above all) is not disturbed by what the parent process holds.
"""

import importlib
import json
import sys

import torch

if __name__ == "__main__":
    suite, task, args = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
    torch.set_num_threads(args.pop("threads", torch.get_num_threads()))
    module = importlib.import_module(f"benchmarks.cpu.{suite}")
    result = getattr(module, f"child_{task}")(**args)
    print("RESULT " + json.dumps(result), flush=True)
