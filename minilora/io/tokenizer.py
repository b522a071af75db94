"""Tokenizer: a `tokenizers.Tokenizer` built from GGUF metadata, plus a small wrapper minilora uses.

A GGUF file carries its vocabulary as metadata (https://github.com/ggml-org/ggml/blob/master/docs/gguf.md):

    tokenizer.ggml.model        "gpt2" (byte-level BPE) or "llama" (SentencePiece-style BPE)
    tokenizer.ggml.pre          the pre-tokenizer, e.g. "smollm": split every digit, then GPT-2's regex
    tokenizer.ggml.tokens       token strings, the index is the id
    tokenizer.ggml.merges       "a b" merge rules in priority order (gpt2)
    tokenizer.ggml.scores       per-token scores, higher merges first (llama)
    tokenizer.ggml.token_type   1 normal, 2 unknown, 3 control, 4 user-defined, 5 unused, 6 byte
    tokenizer.ggml.{bos,eos,padding,unknown}_token_id, add_bos_token, add_eos_token, add_space_prefix
    tokenizer.chat_template     a Jinja template (the transformers convention)

gpt2: a byte-level BPE. Every UTF-8 byte is first mapped to a printable character (space -> "Ġ"), so
the vocabulary covers any text without an unknown token.

llama: SentencePiece's BPE on text where spaces are written "▁"; a character missing from the vocabulary
falls back to its UTF-8 bytes, which are tokens "<0x00>".."<0xFF>". GGUF stores scores, not merges, so
the merges are rebuilt: every split of a token into two vocabulary tokens is a merge, and merges producing
a higher-scoring token apply first.

Control tokens (<|im_start|> ...) become special added tokens, matched whole before BPE runs.
The wrapper writes and reads tokenizer.json + tokenizer_config.json as transformers does.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers, processors
from tokenizers import Tokenizer as HFTokenizer

from minilora.errors import CheckpointError
from minilora.io.safe_write import atomic_write_bytes

logger = logging.getLogger(__name__)

TOKEN_NORMAL, TOKEN_UNKNOWN, TOKEN_CONTROL, TOKEN_USER_DEFINED, TOKEN_UNUSED, TOKEN_BYTE = 1, 2, 3, 4, 5, 6

# GPT-2's pre-tokenizer regex (contractions, letters, numbers, other symbols, whitespace runs).
_GPT2_REGEX = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
# Llama 3's (tiktoken cl100k-style) regex: numbers in groups of at most three digits.
_LLAMA3_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# llama.cpp pre-tokenizers that split every digit on its own, then apply GPT-2's regex.
_DIGIT_SPLIT_PRE = {"smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva"}
_GPT2_PRE = {"default", "gpt2", "gpt-2", "mpt", "olmo", "jais"}
_LLAMA3_PRE = {"llama-bpe", "llama3", "smaug-bpe"}
_SPECIAL_NAMES = ("bos", "eos", "pad", "unk")
_GGUF_ID_KEYS = {"bos": "bos", "eos": "eos", "pad": "padding", "unk": "unknown"}


def _byte_level_pre_tokenizer(pre: str, add_prefix_space: bool) -> pre_tokenizers.PreTokenizer:
    """The pre-tokenizer llama.cpp's `tokenizer.ggml.pre` names, in `tokenizers` parts."""
    if pre in _DIGIT_SPLIT_PRE:
        return pre_tokenizers.Sequence(
            [
                pre_tokenizers.Digits(individual_digits=True),
                pre_tokenizers.ByteLevel(add_prefix_space=add_prefix_space, use_regex=True),
            ]
        )
    if pre in _LLAMA3_PRE:
        return pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(_LLAMA3_REGEX), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=add_prefix_space, use_regex=False),
            ]
        )
    if pre not in _GPT2_PRE:
        logger.warning("unknown tokenizer.ggml.pre %r: using GPT-2's pre-tokenizer", pre)
    return pre_tokenizers.ByteLevel(add_prefix_space=add_prefix_space, use_regex=True)


def _spm_merges(tokens: list[str], scores: list[float], vocab: dict[str, int]) -> list[tuple[str, str]]:
    """Merges for a SentencePiece BPE vocabulary: each split of a token into two known tokens.

    Ordered by the merged token's score (highest first), then by the ids of the two parts.
    """
    ranked = []
    for tok_id, tok in enumerate(tokens):
        for k in range(1, len(tok)):
            left, right = tok[:k], tok[k:]
            if left in vocab and right in vocab:
                ranked.append((-scores[tok_id], vocab[left], vocab[right], left, right))
    ranked.sort()
    return [(left, right) for *_, left, right in ranked]


def _build_gpt2(md: dict[str, Any], tokens: list[str], path: str) -> HFTokenizer:
    merges_raw = md.get("tokenizer.ggml.merges")
    if merges_raw is None:
        raise ValueError(f"{path}: tokenizer.ggml.model 'gpt2' needs tokenizer.ggml.merges")
    merges = []
    for m in merges_raw:
        parts = m.split(" ")
        if len(parts) != 2:
            raise ValueError(f"{path}: tokenizer.ggml.merges entry {m!r} is not two tokens separated by a space")
        merges.append((parts[0], parts[1]))
    vocab = {tok: i for i, tok in enumerate(tokens)}
    tk = HFTokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False))
    add_prefix_space = bool(md.get("tokenizer.ggml.add_space_prefix", False))
    tk.pre_tokenizer = _byte_level_pre_tokenizer(md.get("tokenizer.ggml.pre", "default"), add_prefix_space)
    tk.decoder = decoders.ByteLevel()
    return tk


def _build_llama(md: dict[str, Any], tokens: list[str], token_types: list[int], path: str) -> HFTokenizer:
    scores = md.get("tokenizer.ggml.scores")
    if scores is None or len(scores) != len(tokens):
        raise ValueError(f"{path}: tokenizer.ggml.model 'llama' needs tokenizer.ggml.scores, one per token")
    vocab = {tok: i for i, tok in enumerate(tokens)}
    unk_id = md.get("tokenizer.ggml.unknown_token_id")
    unk = tokens[int(unk_id)] if unk_id is not None else None
    # Only ordinary pieces take part in merging; control and byte tokens are whole units.
    mergeable = [t if token_types[i] in (TOKEN_NORMAL, TOKEN_USER_DEFINED) else "" for i, t in enumerate(tokens)]
    merges = _spm_merges(mergeable, scores, vocab)
    tk = HFTokenizer(models.BPE(vocab=vocab, merges=merges, unk_token=unk, fuse_unk=True, byte_fallback=True))
    add_prefix_space = bool(md.get("tokenizer.ggml.add_space_prefix", True))
    prepend = [normalizers.Prepend("▁")] if add_prefix_space else []
    tk.normalizer = normalizers.Sequence([*prepend, normalizers.Replace(" ", "▁")])
    strip = [decoders.Strip(" ", 1, 0)] if add_prefix_space else []
    tk.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), *strip])
    return tk


def _post_processor(bos: str | None, eos: str | None, ids: dict[str, int]) -> processors.TemplateProcessing:
    """BOS/EOS around each sequence when the model wants them (only these tokens, nothing else)."""
    pre = [bos] if bos is not None else []
    post = [eos] if eos is not None else []
    single = [*pre, "$A:0", *post]
    pair = [*single, *(f"{t}:1" for t in pre), "$B:1", *(f"{t}:1" for t in post)]
    specials = [(t, ids[t]) for t in {*pre, *post}]
    return processors.TemplateProcessing(single=single, pair=pair, special_tokens=specials)


def tokenizer_from_gguf_metadata(md: dict[str, Any], path: str | os.PathLike = "<gguf>") -> Tokenizer:
    """Build the `Tokenizer` described by a GGUF file's metadata (see the module docstring)."""
    path = str(path)
    kind = md.get("tokenizer.ggml.model")
    tokens = md.get("tokenizer.ggml.tokens")
    if kind is None or tokens is None:
        raise ValueError(f"{path}: no tokenizer in the metadata (tokenizer.ggml.model / tokenizer.ggml.tokens)")
    token_types = md.get("tokenizer.ggml.token_type") or [TOKEN_NORMAL] * len(tokens)
    if len(token_types) != len(tokens):
        raise ValueError(f"{path}: tokenizer.ggml.token_type has {len(token_types)} entries for {len(tokens)} tokens")
    if kind == "gpt2":
        tk = _build_gpt2(md, tokens, path)
    elif kind == "llama":
        tk = _build_llama(md, tokens, token_types, path)
    else:
        raise ValueError(f"{path}: tokenizer.ggml.model {kind!r} is not supported (only 'gpt2' and 'llama')")

    # Control tokens are special (matched whole, skippable on decode); user-defined ones are matched whole.
    tk.add_special_tokens(
        [
            AddedToken(t, special=True, normalized=False)
            for t, ty in zip(tokens, token_types, strict=True)
            if ty == TOKEN_CONTROL
        ]
    )
    tk.add_tokens(
        [
            AddedToken(t, special=False, normalized=False)
            for t, ty in zip(tokens, token_types, strict=True)
            if ty == TOKEN_USER_DEFINED
        ]
    )

    special: dict[str, str | None] = {}
    for name in _SPECIAL_NAMES:
        tok_id = md.get(f"tokenizer.ggml.{_GGUF_ID_KEYS[name]}_token_id")
        if tok_id is not None and not 0 <= int(tok_id) < len(tokens):
            raise ValueError(f"{path}: tokenizer.ggml.{_GGUF_ID_KEYS[name]}_token_id={tok_id} is out of range")
        special[name] = tokens[int(tok_id)] if tok_id is not None else None
    add_bos = bool(md.get("tokenizer.ggml.add_bos_token", kind == "llama"))
    add_eos = bool(md.get("tokenizer.ggml.add_eos_token", False))
    ids = {t: tk.token_to_id(t) for t in special.values() if t is not None}
    tk.post_processor = _post_processor(special["bos"] if add_bos else None, special["eos"] if add_eos else None, ids)
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        **{f"{name}_token": tok for name, tok in special.items() if tok is not None},
        "add_bos_token": add_bos,
        "add_eos_token": add_eos,
        "clean_up_tokenization_spaces": False,
    }
    if "tokenizer.chat_template" in md:
        config["chat_template"] = md["tokenizer.chat_template"]
    return Tokenizer(tk, config)


def _token_content(value: Any) -> str | None:
    """tokenizer_config.json holds special tokens as strings or as AddedToken dicts."""
    if isinstance(value, dict):
        return value.get("content")
    return value


def _tojson(value: Any, indent: int | None = None, ensure_ascii: bool = False, sort_keys: bool = False) -> str:
    return json.dumps(value, indent=indent, ensure_ascii=ensure_ascii, sort_keys=sort_keys)


def _raise_exception(message: str) -> None:
    raise ValueError(f"chat template error: {message}")


class Tokenizer:
    """A `tokenizers.Tokenizer` plus what transformers keeps in tokenizer_config.json.

    >>> tok = Tokenizer.from_dir("converted/")               # doctest: +SKIP
    >>> tok.decode(tok.encode("Hello world"))                # doctest: +SKIP
    'Hello world'
    """

    def __init__(self, tokenizer: HFTokenizer, config: dict[str, Any] | None = None) -> None:
        self.tokenizer = tokenizer
        self.config = dict(config or {})
        for name in _SPECIAL_NAMES:
            tok = _token_content(self.config.get(f"{name}_token"))
            if tok is not None and tokenizer.token_to_id(tok) is None:
                raise ValueError(f"{name}_token {tok!r} is not in the vocabulary")
        if "add_bos_token" in self.config:
            self.add_bos_token = bool(self.config["add_bos_token"])
        else:  # a transformers directory may put BOS in the post-processor only: ask it
            first = tokenizer.encode("", add_special_tokens=True).ids[:1]
            self.add_bos_token = self.bos_token_id is not None and first == [self.bos_token_id]

    # --- construction and files -------------------------------------------------------------------

    @classmethod
    def from_gguf_metadata(cls, metadata: dict[str, Any], path: str | os.PathLike = "<gguf>") -> Tokenizer:
        """See `tokenizer_from_gguf_metadata`."""
        return tokenizer_from_gguf_metadata(metadata, path)

    @classmethod
    def from_gguf(cls, gguf_path: str | os.PathLike) -> Tokenizer:
        """The tokenizer stored in a GGUF file."""
        from minilora.io.gguf_format import read_gguf

        gf = read_gguf(gguf_path)
        return tokenizer_from_gguf_metadata(gf.metadata, gf.path)

    @classmethod
    def from_dir(cls, path: str | os.PathLike) -> Tokenizer:
        """Read tokenizer.json, tokenizer_config.json and (if present) chat_template.jinja."""
        path = Path(path)
        tj = path / "tokenizer.json"
        if not tj.is_file():
            raise ValueError(f"{path}: no tokenizer.json")
        try:
            tk = HFTokenizer.from_file(str(tj))
        except Exception as e:  # the tokenizers library raises a bare Exception without the path
            raise CheckpointError(f"{tj}: not a valid tokenizer.json ({e})") from e
        cfg_file = path / "tokenizer_config.json"
        try:
            config = json.loads(cfg_file.read_bytes().decode("utf-8")) if cfg_file.is_file() else {}
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise CheckpointError(f"{cfg_file}: not valid UTF-8 JSON ({e})") from e
        if not isinstance(config, dict):
            raise CheckpointError(f"{cfg_file}: expected a JSON object, found {type(config).__name__}")
        jinja = path / "chat_template.jinja"
        if "chat_template" not in config and jinja.is_file():
            config["chat_template"] = jinja.read_text(encoding="utf-8")
        return cls(tk, config)

    def save(self, directory: str | os.PathLike) -> Path:
        """Write tokenizer.json and tokenizer_config.json into `directory` (each atomically)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(directory / "tokenizer.json", self.tokenizer.to_str(pretty=True).encode("utf-8"))
        config_text = json.dumps(self.config, indent=2, ensure_ascii=False) + "\n"
        atomic_write_bytes(directory / "tokenizer_config.json", config_text.encode("utf-8"))
        return directory

    # --- tokens ---------------------------------------------------------------------------------------

    def _special_id(self, name: str) -> int | None:
        tok = _token_content(self.config.get(f"{name}_token"))
        return None if tok is None else self.tokenizer.token_to_id(tok)

    bos_token_id = property(lambda self: self._special_id("bos"), doc="the id of bos_token (None: none)")
    eos_token_id = property(lambda self: self._special_id("eos"), doc="the id of eos_token (None: none)")
    pad_token_id = property(lambda self: self._special_id("pad"), doc="the id of pad_token (None: none)")
    unk_token_id = property(lambda self: self._special_id("unk"), doc="the id of unk_token (None: none)")

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size(with_added_tokens=True)

    @property
    def chat_template(self) -> str | None:
        return self.config.get("chat_template")

    def __len__(self) -> int:
        return self.vocab_size

    def token_to_id(self, token: str) -> int | None:
        return self.tokenizer.token_to_id(token)

    def encode(self, text: str, add_bos: bool | None = None) -> list[int]:
        """Token ids of `text`; special-token text (e.g. "<|im_start|>") maps to its single id.

        `add_bos=None` follows the model (tokenizer_config's add_bos_token).
        """
        ids = self.tokenizer.encode(text, add_special_tokens=False).ids
        if add_bos is None:
            add_bos = self.add_bos_token
        if add_bos:
            if self.bos_token_id is None:
                raise ValueError("add_bos=True but this tokenizer has no bos_token")
            ids = [self.bos_token_id, *ids]
        return ids

    def encode_with_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        """Token ids of `text` (no BOS, as chat templates are tokenized) and each token's character span."""
        enc = self.tokenizer.encode(text, add_special_tokens=False)
        return list(enc.ids), [tuple(o) for o in enc.offsets]

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=skip_special_tokens)

    # --- chat -----------------------------------------------------------------------------------------

    def apply_chat_template(
        self, messages: list[dict[str, Any]], add_generation_prompt: bool = True, **extra: Any
    ) -> str:
        """Render `messages` ([{"role": ..., "content": ...}]) with the model's Jinja chat template.

        `extra` are more template variables (e.g. `tools=[...]`), as transformers passes them.

        Rendered in jinja2's immutable sandbox (the template comes from a model file) with the options
        transformers uses (trim_blocks, lstrip_blocks, loop controls), so the text is the same.
        """
        template = self.chat_template
        if template is None:
            raise ValueError("this tokenizer has no chat_template (tokenizer_config.json / tokenizer.chat_template)")
        try:
            from jinja2.sandbox import ImmutableSandboxedEnvironment
        except ImportError as e:
            raise ImportError("apply_chat_template needs jinja2: pip install jinja2") from e
        env = ImmutableSandboxedEnvironment(
            trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"]
        )
        env.filters["tojson"] = _tojson
        env.globals["raise_exception"] = _raise_exception
        specials = {f"{n}_token": _token_content(self.config.get(f"{n}_token")) or "" for n in _SPECIAL_NAMES}
        return env.from_string(template).render(
            messages=messages, add_generation_prompt=add_generation_prompt, **specials, **extra
        )
