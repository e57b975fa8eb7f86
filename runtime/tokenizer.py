"""CLIP tokenizer for the runtime: the bundle's `tokenizer/tokenizer.json`, read with the `tokenizers` library.

Gives exactly the ids of transformers' `CLIPTokenizer(prompt, padding="max_length", max_length=77,
truncation=True)`, which is what diffusers' Stable Diffusion pipelines feed the text encoder:
`<|startoftext|>`, at most 75 prompt tokens, `<|endoftext|>`, then the pad token up to 77.
A longer prompt is cut, and a `PromptTruncatedWarning` says how many tokens (and which text) were dropped.

Only numpy and tokenizers here: never torch or transformers (the edge runtime has neither).
"""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from .errors import BadInput, BundleError
from .strict import ConfigError, parse_json

__all__ = ["ClipTokenizer", "PromptTruncatedWarning", "TOKENIZER_FILE", "TOKENIZER_CONFIG_FILE"]

logger = logging.getLogger(__name__)

TOKENIZER_FILE = "tokenizer.json"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
DEFAULT_MAX_LENGTH = 77
DEFAULT_BOS = "<|startoftext|>"
DEFAULT_EOS = "<|endoftext|>"
DEFAULT_PAD = "<|endoftext|>"  # SD 1.x; SD 2.x tokenizers say "!" in tokenizer_config.json


class PromptTruncatedWarning(UserWarning):
    """A prompt had more tokens than the text encoder takes; the tail was dropped."""


def _token_content(value: object, default: str) -> str:
    """A special token in tokenizer_config.json is a string or an AddedToken dict {"content": ...}."""
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"]
    return default


class ClipTokenizer:
    """Turns prompts into CLIP token ids, shape (B, max_length) int64."""

    def __init__(
        self,
        tokenizer: "object",
        *,
        max_length: int = DEFAULT_MAX_LENGTH,
        bos_token: str = DEFAULT_BOS,
        eos_token: str = DEFAULT_EOS,
        pad_token: str = DEFAULT_PAD,
        source: str | None = None,
    ) -> None:
        where = source or "tokenizer"
        if max_length < 3:
            raise BundleError(f"{where}: max_length {max_length} leaves no room for a prompt")
        ids = {}
        for role, token in (("bos", bos_token), ("eos", eos_token), ("pad", pad_token)):
            token_id = tokenizer.token_to_id(token)
            if token_id is None:
                raise BundleError(f"{where}: the {role} token {token!r} is not in the vocabulary")
            ids[role] = int(token_id)
        # The ids must come out exactly as written: no padding or truncation left in tokenizer.json.
        tokenizer.no_padding()
        tokenizer.no_truncation()
        self._tok = tokenizer
        self.max_length = int(max_length)
        self.bos_id = ids["bos"]
        self.eos_id = ids["eos"]
        self.pad_id = ids["pad"]
        self.source = source

    @classmethod
    def from_dir(cls, path: str | os.PathLike) -> "ClipTokenizer":
        """Load a tokenizer folder: `tokenizer.json` (required) and `tokenizer_config.json` (optional:
        model_max_length and the bos/eos/pad tokens; CLIP's SD1.5 values when absent)."""
        folder = Path(path)
        if not folder.is_dir():
            raise BundleError(f"tokenizer folder not found: {folder}")
        tok_file = folder / TOKENIZER_FILE
        if not tok_file.is_file():
            raise BundleError(f"tokenizer file missing: {tok_file}")
        cfg_file = folder / TOKENIZER_CONFIG_FILE
        try:
            data = tok_file.read_bytes()
        except OSError as e:
            raise BundleError(f"tokenizer file is unreadable: {tok_file}: {e}") from e
        config = None
        if cfg_file.exists():
            try:
                config = cfg_file.read_bytes()
            except OSError as e:
                raise BundleError(f"tokenizer config is unreadable: {cfg_file}: {e}") from e
        return cls.from_bytes(data, config, source=str(tok_file), config_source=str(cfg_file))

    @classmethod
    def from_bytes(
        cls,
        tokenizer_json: bytes | str,
        config_json: bytes | str | None = None,
        *,
        source: str | None = None,
        config_source: str | None = None,
    ) -> "ClipTokenizer":
        """Load from the contents of `tokenizer.json` and (optionally) `tokenizer_config.json`, e.g. bytes
        already hash-checked against a manifest. `source`/`config_source` name the files in errors."""
        from tokenizers import Tokenizer

        source = source or TOKENIZER_FILE
        config_source = config_source or (
            str(Path(source).with_name(TOKENIZER_CONFIG_FILE)) if source else TOKENIZER_CONFIG_FILE
        )
        try:
            text = tokenizer_json.decode("utf-8") if isinstance(tokenizer_json, bytes) else tokenizer_json
            tokenizer = Tokenizer.from_str(text)
        except Exception as e:  # tokenizers raises plain Exception for malformed JSON or an unknown model
            raise BundleError(f"tokenizer file is corrupt or unreadable: {source}: {e}") from e

        config: dict = {}
        if config_json is not None:
            raw = config_json.encode("utf-8") if isinstance(config_json, str) else bytes(config_json)
            try:
                config = parse_json(raw, config_source)  # size, nesting and strict-JSON caps (runtime/strict.py)
            except ConfigError as e:
                raise BundleError(f"tokenizer config is corrupt or unreadable: {e}") from None
            if not isinstance(config, dict):
                raise BundleError(f"tokenizer config is not a JSON object: {config_source}")

        max_length = config.get("model_max_length", DEFAULT_MAX_LENGTH)
        # transformers writes a huge sentinel (1e30) when no limit was set: CLIP's is 77.
        if not isinstance(max_length, int) or isinstance(max_length, bool) or not 3 <= max_length <= 4096:
            max_length = DEFAULT_MAX_LENGTH
        return cls(
            tokenizer,
            max_length=max_length,
            bos_token=_token_content(config.get("bos_token"), DEFAULT_BOS),
            eos_token=_token_content(config.get("eos_token"), DEFAULT_EOS),
            pad_token=_token_content(config.get("pad_token"), DEFAULT_PAD),
            source=source,
        )

    @property
    def vocab_size(self) -> int:
        return int(self._tok.get_vocab_size(with_added_tokens=True))

    def encode(self, prompts: Sequence[str] | str) -> tuple[np.ndarray, list[int]]:
        """Token ids (B, max_length) int64 and, per prompt, how many prompt tokens truncation dropped."""
        return self._encode(prompts, stacklevel=3)

    def _encode(self, prompts: Sequence[str] | str, stacklevel: int) -> tuple[np.ndarray, list[int]]:
        if isinstance(prompts, str):
            prompts = [prompts]
        if not isinstance(prompts, (list, tuple)):
            raise BadInput(f"prompts must be a list of strings, got {type(prompts).__name__}")
        for i, p in enumerate(prompts):
            if not isinstance(p, str):
                raise BadInput(f"prompt {i} is a {type(p).__name__}, not a string")

        room = self.max_length - 2  # BOS and EOS
        out = np.full((len(prompts), self.max_length), self.pad_id, dtype=np.int64)
        dropped: list[int] = []
        encodings = self._tok.encode_batch(list(prompts), add_special_tokens=False) if prompts else []
        for row, enc in enumerate(encodings):
            ids = enc.ids
            n_drop = max(0, len(ids) - room)
            if n_drop:
                removed = self.decode(ids[room:])
                if len(removed) > 120:
                    removed = removed[:117] + "..."
                warnings.warn(
                    f"prompt {row} has {len(ids)} tokens, CLIP takes {room} (+ start and end): "
                    f"{n_drop} token(s) dropped: {removed!r}",
                    PromptTruncatedWarning,
                    stacklevel=stacklevel,
                )
                ids = ids[:room]
            dropped.append(n_drop)
            out[row, 0] = self.bos_id
            out[row, 1 : 1 + len(ids)] = ids
            out[row, 1 + len(ids)] = self.eos_id
        return out, dropped

    def __call__(self, prompts: Sequence[str] | str) -> np.ndarray:
        """Token ids (B, max_length) int64, padded with the pad id; warns on truncation."""
        ids, _ = self._encode(prompts, stacklevel=3)
        return ids

    def decode(self, ids: Sequence[int]) -> str:
        """Text of `ids` (special tokens skipped), as CLIPTokenizer.decode gives it."""
        text = self._tok.decode([int(i) for i in ids], skip_special_tokens=True)
        return " ".join(text.replace("</w>", " ").split())
