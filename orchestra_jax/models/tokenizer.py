"""Tokenizers for the policy: HF `tokenizer.json` files, SmolLM2's GGUF vocabulary, and tiny trained BPEs.

Everything here is token in, token out: `encode` never inserts special tokens the text does not spell, so
rendering a chat template and encoding the result gives exactly the ids the model sees.
"""

from __future__ import annotations

import itertools
import json
import os
import pathlib
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from importlib import resources
from typing import Any

import tokenizers
from tokenizers import decoders, models, normalizers, pre_tokenizers, processors, trainers

# Qwen3's 26 added tokens in id order (151643..151668), with their `special` flag: special tokens are dropped by
# decode(skip_special_tokens=True); the tool and think markers are not special, so they survive it.
QWEN3_ADDED_TOKENS: tuple[tuple[str, bool], ...] = (
    ("<|endoftext|>", True),
    ("<|im_start|>", True),
    ("<|im_end|>", True),
    ("<|object_ref_start|>", True),
    ("<|object_ref_end|>", True),
    ("<|box_start|>", True),
    ("<|box_end|>", True),
    ("<|quad_start|>", True),
    ("<|quad_end|>", True),
    ("<|vision_start|>", True),
    ("<|vision_end|>", True),
    ("<|vision_pad|>", True),
    ("<|image_pad|>", True),
    ("<|video_pad|>", True),
    ("<tool_call>", False),
    ("</tool_call>", False),
    ("<|fim_prefix|>", False),
    ("<|fim_middle|>", False),
    ("<|fim_suffix|>", False),
    ("<|fim_pad|>", False),
    ("<|repo_name|>", False),
    ("<|file_sep|>", False),
    ("<tool_response>", False),
    ("</tool_response>", False),
    ("<think>", False),
    ("</think>", False),
)

# Qwen2/Qwen3 pre-tokenizer split pattern (digits one by one, letters with one leading non-letter).
QWEN_SPLIT_PATTERN = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"

# Tokens that end a chat turn or a document, in the order we prefer them as eos.
_EOS_CANDIDATES = ("<|im_end|>", "<|endoftext|>")


class TokenizerError(ValueError):
    """A tokenizer file is missing, unreadable, or lacks a token the caller needs."""


@dataclass(frozen=True, eq=False)
class Tokenizer:
    """A `tokenizers.Tokenizer` plus the few ids the chat and rollout code need (compared by identity)."""

    backend: tokenizers.Tokenizer
    eos_token_ids: tuple[int, ...]
    pad_token_id: int
    bos_token_id: int | None = None
    config: Mapping[str, Any] = field(default_factory=dict)  # tokenizer_config.json as read, kept by save()

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> Tokenizer:
        """Load `tokenizer.json` (a file, or a directory holding it and maybe tokenizer_config.json) or a .gguf."""
        path = pathlib.Path(path)
        if path.suffix == ".gguf":
            return _from_gguf(path)
        file = path / "tokenizer.json" if path.is_dir() else path
        if not file.is_file():
            raise TokenizerError(f"{file}: tokenizer file not found")
        try:
            backend = tokenizers.Tokenizer.from_file(str(file))
        except Exception as exc:  # tokenizers raises a bare Exception on bad JSON
            raise TokenizerError(f"{file}: not a readable tokenizer.json ({_first_line(exc)})") from None
        config = _read_tokenizer_config(file.parent / "tokenizer_config.json")
        return _with_special_ids(backend, config, where=str(file))

    @property
    def vocab_size(self) -> int:
        """Number of ids the tokenizer can emit (added tokens included); embeddings may be padded beyond it."""
        return self.backend.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        return self.backend.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def token_id(self, token: str) -> int:
        token_id = self.backend.token_to_id(token)
        if token_id is None:
            raise TokenizerError(f"token {token!r} is not in the vocabulary")
        return token_id

    def has_token(self, token: str) -> bool:
        return self.backend.token_to_id(token) is not None

    def save(self, out_dir: str | os.PathLike) -> None:
        """Write tokenizer.json and tokenizer_config.json (each to a temp file, then renamed).

        A config read at load time is written back unchanged; otherwise a minimal one that transformers loads,
        with the chat template when one is known (Qwen3's for trained tokenizers, a GGUF's own).
        """
        out = pathlib.Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        config = dict(self.config) or _minimal_config(self.backend, self.eos_token_ids[0], self.pad_token_id)
        _write_atomic(out / "tokenizer.json", self.backend.to_str(pretty=True))
        _write_atomic(out / "tokenizer_config.json", json.dumps(config, indent=2, ensure_ascii=False) + "\n")


def train_small_tokenizer(
    texts: Iterable[str],
    vocab_size: int,
    out_dir: str | os.PathLike | None = None,
    phrases: Sequence[str] = (),
    digits_per_token: int = 1,
) -> Tokenizer:
    """Train a byte-level BPE shaped like Qwen3's (same normaliser, split pattern and added tokens).

    For CPU demo models: every Qwen3 special token is a single id, so the Qwen3 chat template and the
    incremental chat builder work unchanged on a vocabulary of a few hundred to a few thousand ids.
    `vocab_size` counts everything, the 26 added tokens included; they take the last ids, as in Qwen3.
    `phrases`: long constant texts (tool schemas, fixed instructions) that each become one ordinary token, so a
    tiny model's prompts stay short; they take the ids just before the special tokens.
    `digits_per_token`: numbers split into runs of up to this many digits (Qwen3: 1; Llama 3: 3), so a tiny
    model copies a number in fewer, less ambiguous steps. Every such run is kept in the vocabulary.
    """
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    phrases = list(dict.fromkeys(phrases))
    for phrase in phrases:
        if not phrase or any(name in phrase for name, _ in QWEN3_ADDED_TOKENS):
            raise TokenizerError(f"phrase {phrase[:40]!r} is empty or contains a special token")
    minimum = len(alphabet) + len(QWEN3_ADDED_TOKENS) + len(phrases)
    if vocab_size < minimum:
        raise TokenizerError(
            f"vocab_size={vocab_size} is too small: a byte-level BPE needs at least {minimum}"
        )
    backend = tokenizers.Tokenizer(models.BPE(unk_token=None, fuse_unk=False, byte_fallback=False))
    backend.normalizer = normalizers.NFC()
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(tokenizers.Regex(_split_pattern(digits_per_token)), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    backend.post_processor = processors.ByteLevel(trim_offsets=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - len(QWEN3_ADDED_TOKENS) - len(phrases),
        min_frequency=2,
        initial_alphabet=alphabet,
        show_progress=False,
    )
    if digits_per_token > 1:  # every digit run, twice, so each clears min_frequency
        runs = [f"{i:0{n}d}" for n in range(2, digits_per_token + 1) for i in range(10**n)]
        texts = itertools.chain(texts, [" ".join(runs)] * 2)
    backend.train_from_iterator(texts, trainer=trainer)
    backend.add_tokens([tokenizers.AddedToken(p, special=False, normalized=False) for p in phrases])
    backend.add_tokens(
        [
            tokenizers.AddedToken(name, special=special, normalized=False)
            for name, special in QWEN3_ADDED_TOKENS
        ]
    )
    qwen3_template = (
        resources.files("orchestra_jax.models").joinpath("templates", "qwen3.jinja").read_text("utf-8")
    )
    config = _minimal_config(backend, backend.token_to_id("<|im_end|>"), backend.token_to_id("<|endoftext|>"))
    tokenizer = _with_special_ids(backend, {**config, "chat_template": qwen3_template}, "trained")
    if out_dir is not None:
        tokenizer.save(out_dir)
    return tokenizer


def _split_pattern(digits_per_token: int) -> str:
    if digits_per_token < 1:
        raise TokenizerError(f"digits_per_token={digits_per_token} must be >= 1")
    return QWEN_SPLIT_PATTERN.replace(r"|\p{N}|", r"|\p{N}{1," + str(digits_per_token) + "}|")


def _minimal_config(
    backend: tokenizers.Tokenizer, eos_id: int, pad_id: int, bos_id: int | None = None
) -> dict[str, Any]:
    """The tokenizer_config.json fields transformers needs to load a bare tokenizer.json unchanged."""
    added = {
        str(token_id): {
            "content": token.content,
            "lstrip": token.lstrip,
            "normalized": token.normalized,
            "rstrip": token.rstrip,
            "single_word": token.single_word,
            "special": token.special,
        }
        for token_id, token in sorted(backend.get_added_tokens_decoder().items())
    }
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "add_bos_token": False,
        "add_prefix_space": False,
        "clean_up_tokenization_spaces": False,
        "bos_token": None if bos_id is None else backend.id_to_token(bos_id),
        "eos_token": backend.id_to_token(eos_id),
        "pad_token": backend.id_to_token(pad_id),
        "added_tokens_decoder": added,
    }


def _with_special_ids(backend: tokenizers.Tokenizer, config: dict, where: str) -> Tokenizer:
    """Pick eos/pad/bos: tokenizer_config's choice first, then the ChatML end-of-turn tokens."""
    eos_names = [_token_name(config.get("eos_token"))] + list(_EOS_CANDIDATES)
    eos_ids: list[int] = []
    for name in eos_names:
        token_id = backend.token_to_id(name) if name else None
        if token_id is not None and token_id not in eos_ids:
            eos_ids.append(token_id)
    if not eos_ids:
        raise TokenizerError(
            f"{where}: no end-of-sequence token (tokenizer_config eos_token, <|im_end|> or <|endoftext|>)"
        )
    pad_name = _token_name(config.get("pad_token"))
    pad_id = backend.token_to_id(pad_name) if pad_name else None
    bos_name = _token_name(config.get("bos_token"))
    bos_id = backend.token_to_id(bos_name) if bos_name else None
    return Tokenizer(backend, tuple(eos_ids), eos_ids[-1] if pad_id is None else pad_id, bos_id, config)


def _token_name(value: object) -> str | None:
    """tokenizer_config stores a token as a string or as an AddedToken dict with `content`."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _read_tokenizer_config(file: pathlib.Path) -> dict:
    if not file.is_file():
        return {}
    try:
        config = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise TokenizerError(f"{file}: not valid JSON ({_first_line(exc)})") from None
    if not isinstance(config, dict):
        raise TokenizerError(f"{file}: expected a JSON object")
    return config


def _from_gguf(path: pathlib.Path) -> Tokenizer:
    """Rebuild a GPT-2-style byte-level BPE from a GGUF's `tokenizer.ggml.*` metadata (SmolLM2's vocabulary)."""
    vocab = _read_gguf_vocab(path)
    backend = tokenizers.Tokenizer(
        models.BPE(
            vocab={token: i for i, token in enumerate(vocab.tokens)},
            merges=[tuple(merge.split(" ", 1)) for merge in vocab.merges],
            unk_token=None,
            fuse_unk=False,
            byte_fallback=False,
        )
    )
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True)
    if vocab.pre == "smollm":  # llama.cpp's SMOLLM pre-tokenizer: digits one by one, then GPT-2's regex
        backend.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Digits(individual_digits=True), byte_level]
        )
    elif vocab.pre in ("gpt2", "default"):
        backend.pre_tokenizer = byte_level
    else:
        raise TokenizerError(f"{path}: GGUF pre-tokenizer {vocab.pre!r} is not supported (smollm, gpt2)")
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens(
        [tokenizers.AddedToken(vocab.tokens[i], special=True, normalized=False) for i in vocab.control_ids]
    )

    eos_id = vocab.eos_id if vocab.eos_id is not None else backend.token_to_id("<|endoftext|>")
    if eos_id is None:
        raise TokenizerError(f"{path}: GGUF metadata names no eos token")
    pad_id = vocab.pad_id if vocab.pad_id is not None else eos_id
    config = _minimal_config(backend, eos_id, pad_id, vocab.bos_id)
    if vocab.chat_template:
        config["chat_template"] = vocab.chat_template
    return _with_special_ids(backend, config, where=str(path))


@dataclass(frozen=True)
class _GGUFVocab:
    tokens: tuple[str, ...]
    merges: tuple[str, ...]
    control_ids: tuple[int, ...]
    pre: str
    chat_template: str | None
    eos_id: int | None
    pad_id: int | None
    bos_id: int | None


def _read_gguf_vocab(path: pathlib.Path) -> _GGUFVocab:
    try:
        import gguf
    except ImportError:
        raise TokenizerError(f"{path}: reading a GGUF tokenizer needs the `gguf` package") from None
    if not path.is_file():
        raise TokenizerError(f"{path}: GGUF file not found")
    try:
        fields = gguf.GGUFReader(str(path)).fields
    except Exception as exc:
        raise TokenizerError(f"{path}: not a readable GGUF file ({_first_line(exc)})") from None

    def strings(key: str) -> tuple[str, ...]:
        field = fields.get(key)
        if field is None:
            raise TokenizerError(f"{path}: GGUF metadata lacks {key}")
        return tuple(bytes(field.parts[i]).decode("utf-8") for i in field.data)

    def scalar(key: str) -> int | str | None:
        field = fields.get(key)
        if field is None:
            return None
        value = field.parts[field.data[0]]
        return bytes(value).decode("utf-8") if field.types[0] == gguf.GGUFValueType.STRING else int(value[0])

    model = scalar("tokenizer.ggml.model")
    if model != "gpt2":
        raise TokenizerError(
            f"{path}: GGUF tokenizer model {model!r} is not supported (only byte-level BPE 'gpt2')"
        )
    token_types = fields["tokenizer.ggml.token_type"]
    control = gguf.TokenType.CONTROL
    control_ids = tuple(
        i for i, part in enumerate(token_types.data) if int(token_types.parts[part][0]) == control
    )
    return _GGUFVocab(
        tokens=strings("tokenizer.ggml.tokens"),
        merges=strings("tokenizer.ggml.merges"),
        control_ids=control_ids,
        pre=str(scalar("tokenizer.ggml.pre") or "default"),
        chat_template=scalar("tokenizer.chat_template"),
        eos_id=scalar("tokenizer.ggml.eos_token_id"),
        pad_id=scalar("tokenizer.ggml.padding_token_id"),
        bos_id=scalar("tokenizer.ggml.bos_token_id"),
    )


def _write_atomic(file: pathlib.Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=file.parent, prefix=f".{file.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
        os.replace(tmp, file)
    except BaseException:
        pathlib.Path(tmp).unlink(missing_ok=True)
        raise


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
