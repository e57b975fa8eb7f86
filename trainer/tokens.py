"""Textual inversion of words the base already spells: their token-embedding rows train beside the LoRA.

A LoRA changes linear and convolution weights; it cannot move a row of the text encoder's token embedding. When
the base never trained a word's row (the tiny base's text encoder only saw the six base colours, so "purple"'s
row is still its random initialisation, norm 0.158 against 0.22-0.26 for the trained colours), a LoRA has to learn
the concept from an embedding that means nothing. `--train-tokens purple` trains that row as well, as peft's
`trainable_token_indices` does: a delta per trained token, zero at the start (the start is the base model), added
to the frozen embedding.

- `token_ids(tokenizer, words)`: the token ids that spell the words (every piece of each word).
- `inject_tokens(text_encoder, ids)`: the token embedding wrapped in a `TokenDeltaEmbedding`; returns it.
- `token_tensors(text_encoder)`: the adapter's tensors of the trained rows, or {} when none train:
  `text_encoder.text_model.embeddings.token_embedding.trainable_tokens_delta` (k, d) and `...trainable_tokens_indices`
  (k,) int64. `sdedge export --lora` adds the deltas to those rows (export/lora.py); diffusers' `load_lora_weights`
  and kohya/A1111 do not know these keys (hence `--format kohya` is refused with `--train-tokens`).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from sdedge.runtime.errors import BadInput

__all__ = ["TOKEN_MODULE", "DELTA", "INDICES", "TokenDeltaEmbedding", "token_ids", "inject_tokens", "token_tensors",
           "token_parameters"]

TOKEN_MODULE = "text_model.embeddings.token_embedding"  # the canonical path (transformers' classic text_model.)
DELTA, INDICES = "trainable_tokens_delta", "trainable_tokens_indices"


def token_ids(tokenizer, words) -> dict[str, tuple[int, ...]]:
    """{word: the ids of the tokens that spell it}; a word given twice, or one sharing a token with another, is
    refused (its row would get two deltas)."""
    out: dict[str, tuple[int, ...]] = {}
    seen: dict[int, str] = {}
    for word in words:
        ids = tuple(tokenizer(word, add_special_tokens=False).input_ids)
        if not word.strip() or not ids:
            raise BadInput(f"--train-tokens: {word!r} is not a word the tokenizer spells")
        for i in ids:
            if i in seen:
                raise BadInput(f"--train-tokens: {word!r} and {seen[i]!r} share the token {i}; train each token once")
            seen[i] = word
        out[word] = ids
    return out


class TokenDeltaEmbedding(nn.Module):
    """The frozen embedding plus a trained delta on the rows `ids` (zero at the start)."""

    def __init__(self, base: nn.Embedding, ids):
        super().__init__()
        self.base = base
        self.register_buffer("indices", torch.tensor(list(ids), dtype=torch.long), persistent=False)
        lookup = torch.full((base.num_embeddings,), -1, dtype=torch.long)
        lookup[self.indices] = torch.arange(len(ids))
        self.register_buffer("lookup", lookup, persistent=False)
        self.trainable_tokens_delta = nn.Parameter(torch.zeros(len(ids), base.embedding_dim))

    @property
    def weight(self):  # what code that reads `token_embedding.weight` expects: the base rows
        return self.base.weight

    def forward(self, input_ids):
        out = self.base(input_ids)
        pos = self.lookup[input_ids]
        add = self.trainable_tokens_delta[pos.clamp(min=0)] * (pos >= 0).unsqueeze(-1)
        return out + add.to(out.dtype)


def inject_tokens(text_encoder, ids) -> Any:
    """Wrap the text encoder's token embedding so the rows `ids` train; the embedding itself stays frozen."""
    base = text_encoder.get_input_embeddings()
    bad = [i for i in ids if not 0 <= i < base.num_embeddings]
    if bad:
        raise BadInput(f"--train-tokens: token id {bad[0]} is outside the embedding's {base.num_embeddings} rows")
    base.weight.requires_grad_(False)
    wrapped = TokenDeltaEmbedding(base, ids)
    text_encoder.set_input_embeddings(wrapped)
    return wrapped


def token_parameters(text_encoder) -> list[tuple[str, Any]]:
    """(name, parameter) of the trained rows' delta, or [] when none train."""
    return [(n, p) for n, p in text_encoder.named_parameters() if n.endswith(DELTA)]


def token_tensors(text_encoder, prefix: str = "text_encoder") -> dict[str, Any]:
    emb = text_encoder.get_input_embeddings()
    if not hasattr(emb, DELTA):
        return {}
    key = f"{prefix}.{TOKEN_MODULE}"
    return {f"{key}.{DELTA}": emb.trainable_tokens_delta.detach().float().cpu().contiguous().clone(),
            f"{key}.{INDICES}": emb.indices.detach().cpu().clone()}
