"""The error families of minilora: one type per kind of input a user hands it.

Every message names the culprit (file, and line or key), what was expected, what was found, and what
to do. All families are ``ValueError`` subclasses, so ``except ValueError`` still catches them; the
CLI prints any ``MiniloraError`` as one line and exits with status 1 (``--debug`` for the traceback).

    CheckpointError   a model/checkpoint file: header, dtype, shape, missing or unexpected key, non-finite
    ConfigError       config.json or a model config value (sizes, vocabulary, rope settings)
    QuantStateError   a quantization state that does not fit its codes (shape, absmax length, blocksize)
    AdapterError      an adapter directory: adapter_config.json, adapter tensors, scale
    DatasetError      a training or evaluation data file: format, encoding, a bad record (file:line)
    CLIError          a command-line option or a path the command refuses (e.g. --out over an input)
"""

from __future__ import annotations


class MiniloraError(ValueError):
    """Base of every user-facing minilora error."""


class CheckpointError(MiniloraError):
    """A checkpoint that cannot be used as is: corrupted file, missing/unexpected key, wrong shape."""


class ConfigError(MiniloraError):
    """A model configuration that cannot describe a model."""


class QuantStateError(MiniloraError):
    """A quantization state that does not match the codes it should decode."""


class AdapterError(MiniloraError):
    """A LoRA adapter (files or tensors) that cannot be applied as it is."""


class DatasetError(MiniloraError):
    """A data file or record that cannot be trained on."""


class CLIError(MiniloraError):
    """A command-line failure: printed as one line, exit status 1."""
