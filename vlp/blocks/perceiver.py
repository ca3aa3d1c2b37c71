"""Flamingo's Perceiver Resampler: a fixed number of learned latents read each media item.

Parameter names and layout follow OpenFlamingo (``latents``, ``frame_embs``,
``media_time_embs``, ``layers.{i}.0`` attention, ``layers.{i}.1`` feed-forward, ``norm``) so
its checkpoints load with a plain key map. Each media item (an image, or a video's frames) is
resampled on its own: latents of item t see only item t's tokens.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vlp.blocks.weight_init import init_weights


class FeedForward(nn.Sequential):
    """LayerNorm, Linear(dim, dim * mult), GELU, Linear(dim * mult, dim); no biases."""

    def __init__(self, dim: int, mult: int = 4) -> None:
        inner = int(dim * mult)
        super().__init__(
            nn.LayerNorm(dim),
            nn.Linear(dim, inner, bias=False),
            nn.GELU(),
            nn.Linear(inner, dim, bias=False),
        )
        self.apply(init_weights)


class PerceiverAttention(nn.Module):
    """Latents attend to concat(media tokens, latents) of the same media item."""

    def __init__(self, dim: int, *, dim_head: int = 64, num_heads: int = 8) -> None:
        super().__init__()
        self.num_heads, self.dim_head = num_heads, dim_head
        inner = dim_head * num_heads
        self.norm_media = nn.LayerNorm(dim)
        self.norm_latents = nn.LayerNorm(dim)
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_kv = nn.Linear(dim, 2 * inner, bias=False)
        self.to_out = nn.Linear(inner, dim, bias=False)
        self.apply(init_weights)

    def forward(self, x: Tensor, latents: Tensor) -> Tensor:
        """x (B, T, M, D) media tokens, latents (B, T, n, D) -> (B, T, n, D)."""
        B, T, n, _ = latents.shape
        H, hd = self.num_heads, self.dim_head
        x = self.norm_media(x)  # (B, T, M, D)
        latents = self.norm_latents(latents)  # (B, T, n, D)
        q = self.to_q(latents)  # (B, T, n, H * hd)
        kv_input = torch.cat([x, latents], dim=-2)  # (B, T, M + n, D)
        k, v = self.to_kv(kv_input).chunk(2, dim=-1)  # (B, T, M + n, H * hd) each

        def heads(t: Tensor) -> Tensor:  # (B, T, S, H * hd) -> (B * T, H, S, hd)
            return t.reshape(B * T, t.shape[2], H, hd).transpose(1, 2)

        # softmax(einsum("b h i d, b h j d -> b h i j", q, k) / sqrt(hd)) @ v, per media item
        out = F.scaled_dot_product_attention(heads(q), heads(k), heads(v))  # (B * T, H, n, hd)
        out = out.transpose(1, 2).reshape(B, T, n, H * hd)  # (B, T, n, H * hd)
        return self.to_out(out)  # (B, T, n, D)


class PerceiverResampler(nn.Module):
    """Resample (B, T, F, v, D) media features to (B, T, num_latents, D).

    Also accepts (B, T, v, D) (one frame per item) and (B, v, D) (one item; returns
    (B, num_latents, D)). ``frame_embs`` / ``media_time_embs`` exist only when
    ``max_num_frames`` / ``max_num_media`` are given.
    """

    def __init__(
        self,
        dim: int,
        *,
        depth: int = 6,
        num_latents: int = 64,
        num_heads: int = 8,
        dim_head: int = 64,
        ff_mult: int = 4,
        max_num_media: int | None = None,
        max_num_frames: int | None = None,
    ) -> None:
        super().__init__()
        self.latents = nn.Parameter(torch.empty(num_latents, dim))
        self.frame_embs = nn.Parameter(torch.empty(max_num_frames, dim)) if max_num_frames else None
        self.media_time_embs = nn.Parameter(torch.empty(max_num_media, 1, dim)) if max_num_media else None
        self.layers = nn.ModuleList(
            nn.ModuleList(
                [
                    PerceiverAttention(dim, dim_head=dim_head, num_heads=num_heads),
                    FeedForward(dim, mult=ff_mult),
                ]
            )
            for _ in range(depth)
        )
        self.norm = nn.LayerNorm(dim)
        for p in (self.latents, self.frame_embs, self.media_time_embs):
            if p is not None:
                nn.init.trunc_normal_(p, std=0.02)

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() not in (3, 4, 5):
            raise ValueError(
                f"PerceiverResampler expects (B, T, F, v, D), (B, T, v, D) or (B, v, D) "
                f"media features, got shape {tuple(x.shape)}"
            )
        single = x.dim() == 3
        if single:
            x = x[:, None]  # (B, 1, v, D)
        if x.dim() == 4:
            x = x[:, :, None]  # (B, T, 1, v, D)
        B, T, F_, v, D = x.shape

        if self.frame_embs is not None:
            if F_ > self.frame_embs.shape[0]:
                raise ValueError(f"{F_} frames > max_num_frames={self.frame_embs.shape[0]}")
            x = x + self.frame_embs[:F_, None]  # (B, T, F, v, D) + (F, 1, D)
        x = x.reshape(B, T, F_ * v, D)  # (B, T, F * v, D)
        if self.media_time_embs is not None:
            if T > self.media_time_embs.shape[0]:
                raise ValueError(f"{T} media > max_num_media={self.media_time_embs.shape[0]}")
            x = x + self.media_time_embs[:T]  # (B, T, F * v, D) + (T, 1, D)

        latents = self.latents.expand(B, T, -1, -1)  # (B, T, n, D)
        for attn, ff in self.layers:
            latents = latents + attn(x, latents)  # (B, T, n, D)
            latents = latents + ff(latents)  # (B, T, n, D)
        latents = self.norm(latents)  # (B, T, n, D)
        return latents[:, 0] if single else latents
