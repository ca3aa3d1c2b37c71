"""Flamingo's GATED XATTN-DENSE: text tokens cross-attend to the latents of earlier images.

``media_locations`` (B, L) is True at each ``<image>`` token. Counting them gives every text
token the index of the latest image at or before it; a token attends to that image's latents
only (``only_attend_immediate_media=True``, Flamingo's choice) or to all images up to it.
Tokens before the first ``<image>`` attend to nothing and get exactly zero output. The
``tanh`` gates start at zero, so a freshly inserted layer leaves the language model unchanged.
Names follow OpenFlamingo's ``GatedCrossAttentionBlock`` for checkpoint import.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from vlp.blocks.attention import scaled_dot_product_attention
from vlp.blocks.perceiver import FeedForward
from vlp.blocks.weight_init import init_weights


class MaskedCrossAttention(nn.Module):
    """Text (B, L, D) attends to media latents (B, T, n, Dm), masked by image position."""

    def __init__(
        self,
        dim: int,
        media_dim: int,
        *,
        num_heads: int = 8,
        dim_head: int = 64,
        only_attend_immediate_media: bool = True,
    ) -> None:
        super().__init__()
        self.num_heads, self.dim_head = num_heads, dim_head
        self.only_attend_immediate_media = only_attend_immediate_media
        inner = dim_head * num_heads
        self.norm = nn.LayerNorm(dim)
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_kv = nn.Linear(media_dim, 2 * inner, bias=False)
        self.to_out = nn.Linear(inner, dim, bias=False)
        self.apply(init_weights)

    def media_mask(
        self, media_locations: Tensor | None, num_media: int, num_latents: int, *, text_time: Tensor | None = None
    ) -> Tensor:
        """(B, 1, L, T * n) bool: may text token i attend to latent j of image t?

        ``text_time`` (B, L): the 1-based index of the latest image at or before each token
        (0: none) — what ``media_locations.cumsum(-1)`` gives for a whole sequence; a cached
        decoding step passes it for its new tokens, whose images came in earlier steps."""
        if text_time is None:
            text_time = media_locations.long().cumsum(dim=-1)  # (B, L): 1-based latest image, 0: none
        media_time = torch.arange(1, num_media + 1, device=text_time.device)  # (T,)
        media_time = media_time.repeat_interleave(num_latents)  # (T * n,)
        if self.only_attend_immediate_media:
            allowed = text_time[:, :, None] == media_time  # (B, L, T * n)
        else:
            allowed = text_time[:, :, None] >= media_time  # (B, L, T * n)
        return allowed[:, None]  # (B, 1, L, T * n)

    def forward(
        self, x: Tensor, media: Tensor, *, media_locations: Tensor | None = None, text_time: Tensor | None = None
    ) -> Tensor:
        B, L, _ = x.shape
        _, T, n, _ = media.shape
        H, hd = self.num_heads, self.dim_head
        q = self.to_q(self.norm(x))  # (B, L, H * hd)
        k, v = self.to_kv(media.reshape(B, T * n, -1)).chunk(2, dim=-1)  # (B, T * n, H * hd) each
        q = q.reshape(B, L, H, hd).transpose(1, 2)  # (B, H, L, hd)
        k = k.reshape(B, T * n, H, hd).transpose(1, 2)  # (B, H, T * n, hd)
        v = v.reshape(B, T * n, H, hd).transpose(1, 2)  # (B, H, T * n, hd)
        if media_locations is None and text_time is None:
            mask = None  # every token sees every image
        else:
            mask = self.media_mask(media_locations, T, n, text_time=text_time)
        # softmax(einsum("b h i d, b h j d -> b h i j", q, k) / sqrt(hd) | mask) @ v;
        # rows with no allowed latent (text before the first image) come out as zeros
        out = scaled_dot_product_attention(q, k, v, attn_mask=mask)  # (B, H, L, hd)
        out = out.transpose(1, 2).reshape(B, L, H * hd)  # (B, L, H * hd)
        return self.to_out(out)  # (B, L, D)


class GatedCrossAttentionDense(nn.Module):
    """``x + tanh(attn_gate) * xattn(x, media)``, then ``x + tanh(ff_gate) * ff(x)``."""

    def __init__(
        self,
        dim: int,
        media_dim: int,
        *,
        num_heads: int = 8,
        dim_head: int = 64,
        ff_mult: int = 4,
        only_attend_immediate_media: bool = True,
    ) -> None:
        super().__init__()
        self.attn = MaskedCrossAttention(
            dim,
            media_dim,
            num_heads=num_heads,
            dim_head=dim_head,
            only_attend_immediate_media=only_attend_immediate_media,
        )
        self.attn_gate = nn.Parameter(torch.zeros(1))
        self.ff = FeedForward(dim, mult=ff_mult)
        self.ff_gate = nn.Parameter(torch.zeros(1))

    def forward(
        self, x: Tensor, media: Tensor, *, media_locations: Tensor | None = None, text_time: Tensor | None = None
    ) -> Tensor:
        attended = self.attn(x, media, media_locations=media_locations, text_time=text_time)
        x = x + attended * self.attn_gate.tanh()
        x = x + self.ff(x) * self.ff_gate.tanh()  # (B, L, D)
        return x
