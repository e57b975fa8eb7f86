"""The real CLIP tokenizer of Stable Diffusion 1.x, rebuilt offline from the BPE file shipped as package data.

`export/data/bpe_simple_vocab_16e6.txt.gz` is OpenAI CLIP's byte-pair-encoding file (MIT licence, see
`export/data/NOTICE.clip-bpe.txt`). From it derive, exactly as OpenAI's `SimpleTokenizer` does:

- `vocab.json`: 49,408 tokens: the 256 byte-unicode characters, the same with "</w>", the 48,894 merges
  joined, then "<|startoftext|>" (49406) and "<|endoftext|>" (49407);
- `merges.txt`: "#version: 0.2" and the 48,894 merges, one a line.

`write_clip_tokenizer(out_dir)` writes a complete tokenizer folder that transformers'
`CLIPTokenizer.from_pretrained` loads and whose `tokenizer.json` the `tokenizers` library (the runtime) loads.
`write_clip_tokenizer(out_dir, words=[...])` writes a *small* CLIP tokenizer: the byte tokens plus only the merges
CLIP applies to those words, in CLIP's order, so the words tokenize into the same pieces as with the full
tokenizer (other words fall back to smaller pieces); the trained tiny base uses one (a few hundred tokens).
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import tempfile
from functools import lru_cache
from importlib import resources
from pathlib import Path

from sdedge.runtime.errors import SdedgeError

BPE_FILE_NAME = "bpe_simple_vocab_16e6.txt.gz"
BPE_SHA256 = "924691ac288e54409236115652ad4aa250f48203de50a9e4722a6ecd48d6804a"
NUM_MERGES = 49152 - 256 - 2  # 48,894: OpenAI's vocabulary size less the byte tokens and the two specials
VOCAB_SIZE = 49408
BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"
PAD_TOKEN = EOS_TOKEN  # SD 1.x pads with <|endoftext|> (SD 2.x uses "!")
MODEL_MAX_LENGTH = 77

__all__ = [
    "BOS_TOKEN",
    "EOS_TOKEN",
    "MODEL_MAX_LENGTH",
    "NUM_MERGES",
    "PAD_TOKEN",
    "VOCAB_SIZE",
    "bpe_file",
    "clip_merges",
    "merges_for_words",
    "clip_vocab",
    "write_clip_tokenizer",
    "write_vocab_and_merges",
]


def bpe_file() -> Path:
    """Path of the packaged CLIP BPE file."""
    path = Path(str(resources.files("sdedge.export").joinpath("data", BPE_FILE_NAME)))
    if not path.is_file():
        raise SdedgeError(f"the packaged CLIP BPE file is missing: {path} (reinstall sdedge[export])")
    return path


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible map from the 256 byte values to printable unicode characters."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    byte_values = printable[:]
    code_points = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            byte_values.append(b)
            code_points.append(256 + extra)
            extra += 1
    return {b: chr(c) for b, c in zip(byte_values, code_points)}


@lru_cache(maxsize=1)
def clip_merges() -> tuple[tuple[str, str], ...]:
    """The 48,894 BPE merges, in rank order."""
    path = bpe_file()
    try:
        raw = path.read_bytes()
        if hashlib.sha256(raw).hexdigest() != BPE_SHA256:
            raise SdedgeError(f"the packaged CLIP BPE file {path} is not the expected one (SHA-256 differs)")
        lines = gzip.decompress(raw).decode("utf-8").split("\n")
    except (OSError, EOFError, UnicodeDecodeError) as e:
        raise SdedgeError(f"cannot read the packaged CLIP BPE file {path}: {e}") from e
    # Line 0 is a header ("bpe_simple_vocab_16e6.txt#version: 0.2"); OpenAI keeps the next 48,894 lines.
    body = lines[1 : NUM_MERGES + 1]
    merges = []
    for n, line in enumerate(body, start=2):
        parts = line.split()
        if len(parts) != 2:
            raise SdedgeError(f"{path}: line {n} is not a BPE merge: {line!r}")
        merges.append((parts[0], parts[1]))
    if len(merges) != NUM_MERGES:
        raise SdedgeError(f"{path}: expected {NUM_MERGES} merges, found {len(merges)}")
    return tuple(merges)


def merges_for_words(words) -> tuple[tuple[str, str], ...]:
    """The CLIP merges that BPE applies to these (lower-case, single) words, in CLIP's rank order.

    BPE merges the lowest-ranked pair present at each step; keeping the applied merges and their order keeps
    every step's choice the same, so the words tokenize exactly as with the full vocabulary.
    """
    byte_map = bytes_to_unicode()
    ranks = {m: i for i, m in enumerate(clip_merges())}
    used: set[tuple[str, str]] = set()
    for word in words:
        chars = [byte_map[b] for b in word.lower().encode("utf-8")]
        if not chars:
            continue
        parts = chars[:-1] + [chars[-1] + "</w>"]
        while len(parts) > 1:
            pairs = [(parts[i], parts[i + 1]) for i in range(len(parts) - 1)]
            best = min(pairs, key=lambda p: ranks.get(p, len(ranks)))
            if best not in ranks:
                break
            used.add(best)
            merged, i = [], 0
            while i < len(parts):
                if i < len(parts) - 1 and (parts[i], parts[i + 1]) == best:
                    merged.append(parts[i] + parts[i + 1])
                    i += 2
                else:
                    merged.append(parts[i])
                    i += 1
            parts = merged
    return tuple(sorted(used, key=ranks.__getitem__))


@lru_cache(maxsize=4)
def _clip_vocab_items(merges: tuple[tuple[str, str], ...] | None = None) -> tuple[str, ...]:
    merges = clip_merges() if merges is None else merges
    byte_chars = list(bytes_to_unicode().values())
    tokens = byte_chars + [c + "</w>" for c in byte_chars]
    tokens += ["".join(m) for m in merges]
    tokens += [BOS_TOKEN, EOS_TOKEN]
    expected = 512 + len(merges) + 2
    if len(tokens) != expected or len(set(tokens)) != expected:
        raise SdedgeError(f"derived CLIP vocabulary has {len(set(tokens))} distinct tokens, expected {expected}")
    return tuple(tokens)


def clip_vocab(merges: tuple[tuple[str, str], ...] | None = None) -> dict[str, int]:
    """token -> id: 49,408 entries, or those of a small vocabulary made of `merges` (a fresh dict each call)."""
    return {tok: i for i, tok in enumerate(_clip_vocab_items(merges))}


def write_vocab_and_merges(out_dir: str | os.PathLike,
                           merges: tuple[tuple[str, str], ...] | None = None) -> tuple[Path, Path]:
    """Write `vocab.json` and `merges.txt` into `out_dir` (created if needed); all of CLIP's merges, or `merges`."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    vocab_path = out / "vocab.json"
    merges_path = out / "merges.txt"
    vocab_path.write_text(json.dumps(clip_vocab(merges), ensure_ascii=False), encoding="utf-8")
    merges_path.write_text(
        "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in (clip_merges() if merges is None else merges)),
        encoding="utf-8",
    )
    return vocab_path, merges_path


def write_clip_tokenizer(out_dir: str | os.PathLike, words=None) -> Path:
    """Write a complete SD1.5 CLIP tokenizer folder into `out_dir` and return its path.

    Files: vocab.json, merges.txt, tokenizer.json (the `tokenizers` serialisation the runtime reads),
    tokenizer_config.json (model_max_length 77, pad token "<|endoftext|>") and whatever else transformers
    writes (special_tokens_map.json in older versions). Needs transformers (the export extra); never touches
    the network. Built once per process, then copied. With `words`, the small tokenizer of those words.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    merges = None if words is None else merges_for_words(tuple(words))
    for name, data in _tokenizer_files(merges).items():
        (out / name).write_bytes(data)
    return out


@lru_cache(maxsize=4)
def _tokenizer_files(merges: tuple[tuple[str, str], ...] | None = None) -> dict[str, bytes]:
    from transformers import CLIPTokenizerFast  # the tokenizers-backed CLIPTokenizer in transformers 5

    with tempfile.TemporaryDirectory(prefix="sdedge-tok-") as tmp:
        src = Path(tmp) / "src"
        write_vocab_and_merges(src, merges)
        # Only vocab.json and merges.txt are in src: transformers builds the fast tokenizer from them.
        tok = CLIPTokenizerFast.from_pretrained(
            str(src),
            local_files_only=True,
            model_max_length=MODEL_MAX_LENGTH,
            bos_token=BOS_TOKEN,
            eos_token=EOS_TOKEN,
            unk_token=EOS_TOKEN,
            pad_token=PAD_TOKEN,
        )
        out = Path(tmp) / "out"
        tok.save_pretrained(str(out))
        # Our own derivation of vocab.json and merges.txt is canonical (transformers may not write them).
        write_vocab_and_merges(out, merges)
        _fix_tokenizer_config(out / "tokenizer_config.json")
        _check_tokenizer_json(out / "tokenizer.json", len(_clip_vocab_items(merges)))
        return {f.name: f.read_bytes() for f in sorted(out.iterdir()) if f.is_file()}


def _fix_tokenizer_config(path: Path) -> None:
    """Make sure the keys SD1.5's pipelines rely on are present whatever the transformers version wrote."""
    config = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    for key in ("is_local", "local_files_only", "name_or_path"):  # where it was built from: noise
        config.pop(key, None)
    config.setdefault("tokenizer_class", "CLIPTokenizer")
    config["model_max_length"] = MODEL_MAX_LENGTH
    config["bos_token"] = BOS_TOKEN
    config["eos_token"] = EOS_TOKEN
    config["unk_token"] = EOS_TOKEN
    config["pad_token"] = PAD_TOKEN
    config.setdefault("do_lower_case", True)
    config.setdefault("errors", "replace")
    config.setdefault("add_prefix_space", False)
    path.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def _check_tokenizer_json(path: Path, vocab_size: int = VOCAB_SIZE) -> None:
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(path))
    if tok.get_vocab_size(with_added_tokens=True) != vocab_size:
        raise SdedgeError(f"{path}: {tok.get_vocab_size()} tokens, expected {vocab_size}")
    if tok.token_to_id(BOS_TOKEN) != vocab_size - 2 or tok.token_to_id(EOS_TOKEN) != vocab_size - 1:
        raise SdedgeError(f"{path}: special tokens are not at ids {vocab_size - 2}/{vocab_size - 1}")
