"""Text decoder over a multimodal context: the "decoder" of an encoder-decoder VL model.

METER's encoder-decoder ablation (following VL-T5) puts a transformer decoder on top of the
fusion encoder and casts every task as text generation; ALBEF's VQA answer decoder has the
same shape. Each layer is causal self-attention over the text so far, cross-attention to the
encoder's tokens, then an MLP (``vlp.blocks.TransformerBlock`` with ``cross_attention``):

    ids ─► word + position embeddings ─► LayerNorm ─► [causal self-attn ─► cross-attn(context)
        ─► MLP] x depth ─► LM head (dense → GELU → LayerNorm → word embeddings^T + bias) ─► logits

Post-norm by default (BERT, as the fusion layers it sits on). The output projection is tied
to the input word embeddings.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vlp.blocks.transformer import Transformer
from vlp.blocks.weight_init import init_weights


class TextDecoder(nn.Module):
    """Causal transformer decoder with cross-attention to a context.

    Args:
        vocab_size: the tokenizer's vocabulary size.
        dim: width of the decoder.
        depth / num_heads / mlp_ratio: the stack.
        context_dim: width of the context tokens (default ``dim``).
        max_length: longest target sequence (position embeddings).
        pre_norm: pre-norm blocks (GPT) instead of post-norm (BERT).
        dropout: dropout in the embeddings, attention outputs and MLPs.
        norm_eps: LayerNorm epsilon.
    """

    def __init__(
        self,
        vocab_size: int,
        dim: int = 768,
        depth: int = 6,
        num_heads: int = 12,
        *,
        mlp_ratio: float = 4.0,
        context_dim: int | None = None,
        max_length: int = 64,
        pre_norm: bool = False,
        dropout: float = 0.0,
        norm_eps: float = 1e-12,
    ) -> None:
        super().__init__()
        self.vocab_size = vocab_size
        self.dim = dim
        self.max_length = max_length
        self.context_dim = context_dim or dim
        self.word_embeddings = nn.Embedding(vocab_size, dim)
        self.position_embeddings = nn.Embedding(max_length, dim)
        self.embed_norm = nn.LayerNorm(dim, eps=norm_eps)
        self.dropout = nn.Dropout(dropout)
        self.layers = Transformer(
            dim,
            depth,
            num_heads,
            mlp_ratio=mlp_ratio,
            drop=dropout,
            pre_norm=pre_norm,
            cross_attention=True,
            context_dim=self.context_dim,
            norm_eps=norm_eps,
        )
        self.head_dense = nn.Linear(dim, dim)
        self.head_norm = nn.LayerNorm(dim, eps=norm_eps)
        self.head_bias = nn.Parameter(torch.zeros(vocab_size))
        self.apply(init_weights)
        nn.init.trunc_normal_(self.word_embeddings.weight, std=0.02)
        nn.init.trunc_normal_(self.position_embeddings.weight, std=0.02)

    def forward(self, ids: Tensor, mask: Tensor | None, context: Tensor, context_mask: Tensor | None = None) -> Tensor:
        """Next-token logits (B, L, V) for target ``ids`` (B, L) (``mask`` True at real tokens)
        given ``context`` (B, S, Dc) (``context_mask`` True at real tokens)."""
        L = ids.shape[1]
        if L > self.max_length:
            raise ValueError(f"TextDecoder: target of {L} tokens is longer than max_length={self.max_length}")
        pos = torch.arange(L, device=ids.device)
        x = self.word_embeddings(ids) + self.position_embeddings(pos)  # (B, L, D)
        x = self.dropout(self.embed_norm(x))
        x = self.layers(
            x,
            mask=mask.bool() if mask is not None else None,
            context=context,
            context_mask=context_mask.bool() if context_mask is not None else None,
            is_causal=True,
        )  # (B, L, D)
        h = self.head_norm(F.gelu(self.head_dense(x)))  # (B, L, D)
        return h @ self.word_embeddings.weight.T + self.head_bias  # (B, L, V)

    def loss(
        self, ids: Tensor, mask: Tensor | None, context: Tensor, context_mask: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        """Teacher-forced cross-entropy of ``ids`` (B, L) (``ids[:, 0]`` is the start token),
        averaged over the real target tokens, and the logits (B, L-1, V)."""
        mask = torch.ones_like(ids, dtype=torch.bool) if mask is None else mask.bool()
        logits = self(ids[:, :-1], mask[:, :-1], context, context_mask)  # (B, L-1, V)
        labels = ids[:, 1:].masked_fill(~mask[:, 1:], -100)  # (B, L-1)
        return F.cross_entropy(logits.flatten(0, 1), labels.flatten()), logits

    def sequence_logprob(
        self, ids: Tensor, mask: Tensor, context: Tensor, context_mask: Tensor | None = None
    ) -> Tensor:
        """Sum of the log-probabilities (B,) of each target sequence after its start token."""
        logp = self(ids[:, :-1], mask[:, :-1], context, context_mask).log_softmax(-1)  # (B, L-1, V)
        token = logp.gather(-1, ids[:, 1:, None]).squeeze(-1)  # (B, L-1)
        return (token * mask[:, 1:].to(token.dtype)).sum(1)

    @torch.no_grad()
    def generate(
        self,
        context: Tensor,
        context_mask: Tensor | None,
        *,
        bos_token_id: int,
        eos_token_id: int,
        pad_token_id: int = 0,
        max_new_tokens: int = 10,
    ) -> Tensor:
        """Greedy decoding → (B, T) ids after the start token, ``pad_token_id`` after each
        sequence's end token (which is kept)."""
        B = context.shape[0]
        max_new_tokens = min(max_new_tokens, self.max_length - 1)
        ids = torch.full((B, 1), bos_token_id, dtype=torch.long, device=context.device)
        done = torch.zeros(B, dtype=torch.bool, device=context.device)
        for _ in range(max_new_tokens):
            nxt = self(ids, None, context, context_mask)[:, -1].argmax(-1)  # (B,)
            nxt = nxt.masked_fill(done, pad_token_id)
            ids = torch.cat([ids, nxt[:, None]], 1)
            done |= nxt == eos_token_id
            if done.all():
                break
        return ids[:, 1:]
