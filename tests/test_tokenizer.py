"""The runtime's CLIP tokenizer against transformers' CLIPTokenizer and an independent BPE reference."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import unicodedata
import warnings

import numpy as np
import pytest

from sdedge.export import tokenizer_files
from sdedge.runtime.errors import BadInput, BundleError, SdedgeError
from sdedge.runtime.tokenizer import ClipTokenizer, PromptTruncatedWarning

LONG_PROMPT = " ".join(
    f"{w}{i % 7}" if i % 5 == 0 else w
    for i, w in enumerate(("a serene mountain lake at dawn with mist, pine trees, golden light, " * 20).split())
)[: 200 * 8]
assert len(LONG_PROMPT.split()) >= 180

PROMPTS = [
    "a photo of an astronaut riding a horse on mars",
    "",
    "   ",
    "A PHOTO OF A CAT, HIGHLY DETAILED, 8K, TRENDING ON ARTSTATION",
    "portrait of a woman,   oil painting   by\tJohn Singer Sargent\n\n(masterpiece:1.2)",
    "It's a dog's life; they'll say we've done it, I'm sure you'd agree",
    "1234567890 3.14159 1,000,000 20th-century 2x4",
    "café crème brûlée, naïve façade, Ångström, Zürich, señor",
    "e\u0301cole (a decomposed accent, NFC-composed by the tokenizer)",
    "a cute cat 🐱 with a red hat 🎩🎉 and 👍🏽",
    "日本の風景、富士山と桜",
    "Москва зимой, снег",
    "!!!??? ... --- ((( ))) [[]] {} <> @#$%^&*~`|\\/",
    "<|startoftext|> a literal special token <|endoftext|> in the prompt",
    "hello&amp;world &lt;tag&gt; &#39;quoted&#39;",
    "supercalifragilisticexpialidocious antidisestablishmentarianism",
    "tab\tseparated\tand\u00a0non-breaking\u2003spaces",
    "A_B-C.D:E;F'G\"H",
    "ünïcödé ÄÖÜ ß ﬁ ligature ½ ² ①",
    LONG_PROMPT,
]


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    return tokenizer_files.write_clip_tokenizer(tmp_path_factory.mktemp("tok") / "tokenizer")


@pytest.fixture(scope="module")
def runtime_tok(tok_dir):
    return ClipTokenizer.from_dir(tok_dir)


@pytest.fixture(scope="module")
def hf_tok(tok_dir):
    from transformers import CLIPTokenizer

    return CLIPTokenizer.from_pretrained(str(tok_dir), local_files_only=True)


# --- the derived files ----------------------------------------------------------------------------------


def test_vocab_and_merges_sizes(tok_dir):
    vocab = json.loads((tok_dir / "vocab.json").read_text(encoding="utf-8"))
    assert len(vocab) == 49408
    assert sorted(vocab.values()) == list(range(49408))
    assert vocab["<|startoftext|>"] == 49406 and vocab["<|endoftext|>"] == 49407
    assert vocab["!"] == 0 and vocab["!</w>"] == 256
    lines = (tok_dir / "merges.txt").read_text(encoding="utf-8").splitlines()
    assert lines[0] == "#version: 0.2"
    assert len(lines) - 1 == 48894
    assert all(len(line.split()) == 2 for line in lines[1:])
    assert lines[1] == "i n"
    # every merge is a vocab token, placed after the 512 byte tokens in rank order
    for rank, line in enumerate(lines[1:]):
        assert vocab[line.replace(" ", "")] == 512 + rank


def test_tokenizer_config(tok_dir):
    cfg = json.loads((tok_dir / "tokenizer_config.json").read_text(encoding="utf-8"))
    assert cfg["model_max_length"] == 77
    assert cfg["pad_token"] == "<|endoftext|>"
    assert cfg["bos_token"] == "<|startoftext|>" and cfg["eos_token"] == "<|endoftext|>"
    from tokenizers import Tokenizer

    assert Tokenizer.from_file(str(tok_dir / "tokenizer.json")).get_vocab_size() == 49408


def test_packaged_bpe_file_is_the_real_one():
    import hashlib

    digest = hashlib.sha256(tokenizer_files.bpe_file().read_bytes()).hexdigest()
    assert digest == tokenizer_files.BPE_SHA256


# --- ids ------------------------------------------------------------------------------------------------


def test_ids_equal_transformers(runtime_tok, hf_tok):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", PromptTruncatedWarning)
        ours = runtime_tok(PROMPTS)
    theirs = hf_tok(PROMPTS, padding="max_length", max_length=77, truncation=True, return_tensors="np").input_ids
    assert ours.dtype == np.int64 and ours.shape == (len(PROMPTS), 77)
    for i, prompt in enumerate(PROMPTS):
        assert ours[i].tolist() == theirs[i].tolist(), f"prompt {i}: {prompt[:60]!r}"
    # one at a time gives the same as a batch
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", PromptTruncatedWarning)
        assert np.array_equal(runtime_tok(PROMPTS[3]), ours[3:4])


def test_known_sd15_ids(runtime_tok):
    # SD1.5's tokenizer on the diffusers docs prompt
    ids = runtime_tok(["a photo of an astronaut riding a horse on mars"])[0]
    assert ids[:12].tolist() == [49406, 320, 1125, 539, 550, 18376, 6765, 320, 4558, 525, 7496, 49407]
    assert (ids[12:] == 49407).all()
    empty = runtime_tok([""])[0]
    assert empty[0] == 49406 and (empty[1:] == 49407).all()


def _reference_bpe_ids(text: str, vocab: dict[str, int], ranks: dict[tuple[str, str], int]) -> list[int]:
    """OpenAI CLIP's BPE written out independently of `tokenizers`, with HF's normaliser (NFC, whitespace, lower)."""
    import regex

    byte_map = tokenizer_files.bytes_to_unicode()
    text = unicodedata.normalize("NFC", text)
    text = regex.sub(r"\s+", " ", text).lower()
    pattern = regex.compile(
        r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""
    )
    ids = []
    for piece in pattern.findall(text):
        if piece in ("<|startoftext|>", "<|endoftext|>"):
            ids.append(vocab[piece])
            continue
        chars = "".join(byte_map[b] for b in piece.encode("utf-8"))
        word = list(chars[:-1]) + [chars[-1] + "</w>"]
        while len(word) > 1:
            pairs = [(ranks.get((a, b), 1 << 30), i) for i, (a, b) in enumerate(zip(word, word[1:]))]
            best, _ = min(pairs)
            if best == 1 << 30:
                break
            a, b = next((word[i], word[i + 1]) for r, i in pairs if r == best)
            merged, i = [], 0
            while i < len(word):
                if i < len(word) - 1 and word[i] == a and word[i + 1] == b:
                    merged.append(a + b)
                    i += 2
                else:
                    merged.append(word[i])
                    i += 1
            word = merged
        ids.extend(vocab[w] for w in word)
    return ids


def test_ids_equal_independent_bpe(runtime_tok):
    vocab = tokenizer_files.clip_vocab()
    ranks = {m: r for r, m in enumerate(tokenizer_files.clip_merges())}
    for prompt in PROMPTS[:-1]:  # the long one is covered by truncation tests
        ref = _reference_bpe_ids(prompt, vocab, ranks)[:75]
        expected = [49406, *ref, 49407] + [49407] * (75 - len(ref))
        assert runtime_tok([prompt])[0].tolist() == expected, prompt


# --- truncation -----------------------------------------------------------------------------------------


def test_truncation_warns_with_count(runtime_tok):
    prompt = " ".join(["cat"] * 80)  # 80 tokens: 5 dropped
    with pytest.warns(PromptTruncatedWarning, match=r"\b5 token\(s\) dropped"):
        ids = runtime_tok([prompt])
    assert ids.shape == (1, 77)
    assert ids[0, 0] == 49406 and ids[0, 76] == 49407
    assert (ids[0, 1:76] == ids[0, 1]).all()
    with pytest.warns(PromptTruncatedWarning) as record:
        _, dropped = runtime_tok.encode(["short", prompt, LONG_PROMPT])
    assert len(record) == 2 and "prompt 2 has" in str(record[1].message)
    assert dropped[0] == 0 and dropped[1] == 5 and dropped[2] > 100


def test_exactly_75_tokens_does_not_warn(runtime_tok):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ids = runtime_tok([" ".join(["cat"] * 75)])
    assert ids[0, 76] == 49407 and ids[0, 75] != 49407


def test_bad_prompts(runtime_tok):
    with pytest.raises(BadInput):
        runtime_tok([1, 2])  # type: ignore[list-item]
    with pytest.raises(BadInput):
        runtime_tok(None)  # type: ignore[arg-type]
    assert runtime_tok([]).shape == (0, 77)


# --- broken folders -------------------------------------------------------------------------------------


def test_missing_folder_and_file(tmp_path):
    with pytest.raises(BundleError, match="nowhere"):
        ClipTokenizer.from_dir(tmp_path / "nowhere")
    with pytest.raises(BundleError, match="tokenizer.json"):
        ClipTokenizer.from_dir(tmp_path)


def test_corrupt_files(tmp_path, tok_dir):
    bad = tmp_path / "bad"
    bad.mkdir()
    data = (tok_dir / "tokenizer.json").read_bytes()
    (bad / "tokenizer.json").write_bytes(data[: len(data) // 2])
    with pytest.raises(BundleError, match="tokenizer.json"):
        ClipTokenizer.from_dir(bad)
    (bad / "tokenizer.json").write_bytes(data)
    (bad / "tokenizer_config.json").write_text("{not json", encoding="utf-8")
    with pytest.raises(BundleError, match="tokenizer_config.json") as e:
        ClipTokenizer.from_dir(bad)
    assert isinstance(e.value, SdedgeError)
    (bad / "tokenizer_config.json").write_text(json.dumps({"pad_token": "<|nope|>"}), encoding="utf-8")
    with pytest.raises(BundleError, match="pad token"):
        ClipTokenizer.from_dir(bad)
    (bad / "tokenizer_config.json").unlink()  # optional: defaults are SD1.5's
    assert ClipTokenizer.from_dir(bad)(["a cat"])[0, :4].tolist() == [49406, 320, 2368, 49407]


def test_from_bytes(tok_dir, runtime_tok):
    data = (tok_dir / "tokenizer.json").read_bytes()
    cfg = (tok_dir / "tokenizer_config.json").read_bytes()
    tok = ClipTokenizer.from_bytes(data, cfg, source="bundle/tokenizer/tokenizer.json")
    assert np.array_equal(tok(PROMPTS[:5]), runtime_tok(PROMPTS[:5]))
    assert ClipTokenizer.from_bytes(data).pad_id == 49407
    with pytest.raises(BundleError, match="bundle/tokenizer/tokenizer.json"):
        ClipTokenizer.from_bytes(data[:1000], cfg, source="bundle/tokenizer/tokenizer.json")
    with pytest.raises(BundleError, match="bundle/tokenizer/tokenizer_config.json"):
        ClipTokenizer.from_bytes(data, b"[1, 2", source="bundle/tokenizer/tokenizer.json")


# --- the runtime stays free of torch --------------------------------------------------------------------


def test_runtime_tokenizer_imports_no_torch(tok_dir):
    code = textwrap.dedent(
        f"""
        import sys
        from sdedge.runtime.tokenizer import ClipTokenizer
        ids = ClipTokenizer.from_dir({str(tok_dir)!r})(["a photo of a cat"])
        assert ids.shape == (1, 77), ids.shape
        heavy = sorted(m for m in ("torch", "transformers", "diffusers") if m in sys.modules)
        print("HEAVY:" + ",".join(heavy))
        """
    )
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "HEAVY:\n" in out.stdout, out.stdout
