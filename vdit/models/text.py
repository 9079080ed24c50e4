"""Text conditioning: a word tokenizer and a small transformer encoder trained with the DiT.

The DiT only sees `(embeddings [B, S, E], mask [B, S])`, so a frozen encoder's precomputed
embeddings can replace the trained one (`text.encoder: precomputed`).
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from vdit.config import TextConfig
from vdit.models.layers import Attention, Dtype, Mlp, norm

PAD, BOS, UNK = 0, 1, 2
_SPECIALS = ("<pad>", "<bos>", "<unk>")


class WordTokenizer:
    """Lower-cased words -> ids; every sequence starts with BOS, so no caption is empty."""

    def __init__(self, words: Sequence[str], max_length: int):
        self.words = _SPECIALS + tuple(dict.fromkeys(w.lower() for w in words))
        self.ids = {w: i for i, w in enumerate(self.words)}
        self.max_length = max_length

    @property
    def vocab_size(self) -> int:
        return len(self.words)

    @staticmethod
    def split(text: str) -> list[str]:
        return re.findall(r"[a-z]+", text.lower())

    def unknown_words(self, text: str) -> list[str]:
        return [w for w in self.split(text) if w not in self.ids]

    def encode(self, text: str) -> np.ndarray:
        """text -> int32 [max_length]: BOS, word ids (truncated), PAD."""
        ids = [BOS] + [self.ids.get(w, UNK) for w in self.split(text)]
        out = np.full(self.max_length, PAD, np.int32)
        ids = ids[: self.max_length]
        out[: len(ids)] = ids
        return out

    def encode_batch(self, texts: Sequence[str]) -> np.ndarray:
        return np.stack([self.encode(t) for t in texts]) if texts else np.zeros(
            (0, self.max_length), np.int32)

    def decode(self, ids: np.ndarray) -> str:
        return " ".join(self.words[i] for i in ids if i > UNK)


def null_tokens_like(tokens: jax.Array) -> jax.Array:
    """The empty caption (BOS only) in the shape of `tokens` [B, S]: caption dropout and the
    unconditional branch of guidance."""
    return jnp.full_like(tokens, PAD).at[:, 0].set(BOS)


class TextBlock(nn.Module):
    heads: int
    dtype: Dtype

    @nn.compact
    def __call__(self, x, mask):
        x = x + Attention(self.heads, self.dtype, name="attn")(norm(self.dtype)(x), kv_mask=mask)
        return x + Mlp(4 * x.shape[-1], self.dtype, name="mlp")(norm(self.dtype)(x))


class TextEncoder(nn.Module):
    """tokens int32 [B, S] -> (embeddings [B, S, width], mask bool [B, S])."""

    cfg: TextConfig
    vocab_size: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, tokens):
        mask = tokens != PAD
        embed = nn.Embed(
            self.vocab_size, self.cfg.width, name="embed",
            embedding_init=nn.with_logical_partitioning(
                nn.initializers.normal(0.02), ("vocab", "embed")),
        )
        pos = self.param(
            "pos", nn.with_logical_partitioning(nn.initializers.normal(0.02), (None, "embed")),
            (self.cfg.max_length, self.cfg.width),
        )
        x = (embed(tokens) + pos[None, : tokens.shape[1]]).astype(self.dtype)
        for i in range(self.cfg.depth):
            x = TextBlock(self.cfg.heads, self.dtype, name=f"block{i}")(x, mask)
        return nn.LayerNorm(dtype=self.dtype, name="final_norm")(x), mask
