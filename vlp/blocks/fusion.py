"""Text-image fusion encoders of METER (Dou et al., 2022): merged attention and co-attention.

Both take text (B, Lt, D) and image (B, Li, D) tokens of the same width, with optional (B, L)
bool masks (True = real token), and return both streams in a :class:`FusionOutput`. Neither
adds modality-type embeddings: the model adds them to the inputs, as METER does.

Pair scoring (ITM over many (caption, image) pairs) can reuse what does not depend on the
pair. In :class:`CoAttentionFusion` that is all of layer 0 up to its cross-attention
queries: each stream's first self-attention and the cross-attention keys/values of the
other stream's *inputs* (``stream_cache`` / ``forward_cached``), and the last layer can run
for the first (CLS) row only. In :class:`MergedAttentionFusion` every attention mixes both
modalities from layer 0 on, so only layer 0's per-token q/k/v projection is pair-independent
(one linear of ``depth``; not cached).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from vlp.blocks.transformer import Transformer, TransformerBlock, drop_path_rates


def _extent(mask: Tensor | None, tokens: Tensor) -> Tensor:
    if mask is None:
        return torch.full((tokens.shape[0],), tokens.shape[1], device=tokens.device)
    positions = torch.arange(1, mask.shape[1] + 1, device=mask.device)  # (L,)
    return (mask * positions).amax(1).clamp(min=1)  # (N,)


@dataclass
class StreamCache:
    """One stream's pair-independent part of :class:`CoAttentionFusion`'s layer 0, per sample.

    ``tokens``: the stream after layer 0's self-attention sublayer; ``keys`` / ``values``:
    the *other* stream's layer-0 cross-attention keys/values of this stream's input.
    """

    tokens: Tensor  # (N, L, D)
    keys: Tensor  # (N, H, L, hd)
    values: Tensor  # (N, H, L, hd)
    mask: Tensor | None = None  # (N, L) bool, True at real tokens

    def __len__(self) -> int:
        return self.tokens.shape[0]

    def index(self, rows: Tensor, *, trim: bool = False, multiple: int = 8) -> StreamCache:
        """The cache of samples ``rows`` (n,) (repeats allowed: one row per scored pair).

        ``trim``: drop trailing positions padded in every selected sample (masked keys
        everywhere, never the first row: exact for ``forward_cached(cls_only=True)``),
        keeping a width that is a multiple of ``multiple``."""
        rows = rows.to(self.tokens.device)
        width = self.tokens.shape[1]
        if trim and len(rows):
            width = min(width, -(-int(self.extent().index_select(0, rows).max()) // multiple) * multiple)
        pick = lambda t, dim=1: t.narrow(dim, 0, width).index_select(0, rows) if t is not None else None  # noqa: E731
        return StreamCache(pick(self.tokens), pick(self.keys, 2), pick(self.values, 2), pick(self.mask))

    def extent(self) -> Tensor:
        """(N,) 1 + the last real position of each sample."""
        return _extent(self.mask, self.tokens)


@dataclass
class FusionOutput:
    """The fused tokens of each modality."""

    text_tokens: Tensor  # (B, Lt, D)
    image_tokens: Tensor  # (B, Li, D)


class MergedAttentionFusion(nn.Module):
    """One transformer over concat(text, image): every token attends to both modalities."""

    def __init__(
        self,
        dim: int,
        depth: int,
        num_heads: int,
        *,
        mlp_ratio: float = 4.0,
        pre_norm: bool = False,
        drop: float = 0.0,
        attn_drop: float = 0.0,
        drop_path_rate: float = 0.0,
        norm_layer: Callable[..., nn.Module] = nn.LayerNorm,
        act_layer: Callable[..., nn.Module] = nn.GELU,
        block_layer: type[nn.Module] = TransformerBlock,
        norm_eps: float = 1e-6,
    ) -> None:
        super().__init__()
        self.dim = dim
        self.transformer = Transformer(
            dim,
            depth,
            num_heads,
            block_layer=block_layer,
            drop_path_rate=drop_path_rate,
            mlp_ratio=mlp_ratio,
            pre_norm=pre_norm,
            drop=drop,
            attn_drop=attn_drop,
            norm_layer=norm_layer,
            act_layer=act_layer,
            norm_eps=norm_eps,
        )

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.transformer.set_grad_checkpointing(enable)

    def forward(
        self,
        text: Tensor,
        image: Tensor,
        *,
        text_mask: Tensor | None = None,
        image_mask: Tensor | None = None,
    ) -> FusionOutput:
        (B, Lt, _), Li = text.shape, image.shape[1]
        mask = None
        if text_mask is not None or image_mask is not None:
            if text_mask is None:
                text_mask = text.new_ones(B, Lt, dtype=torch.bool)
            if image_mask is None:
                image_mask = image.new_ones(B, Li, dtype=torch.bool)
            mask = torch.cat([text_mask.bool(), image_mask.bool()], dim=1)  # (B, Lt + Li)
        x = torch.cat([text, image], dim=1)  # (B, Lt + Li, D)
        x = self.transformer(x, mask=mask)  # (B, Lt + Li, D)
        text_tokens, image_tokens = x.split([Lt, Li], dim=1)  # (B, Lt, D), (B, Li, D)
        return FusionOutput(text_tokens=text_tokens, image_tokens=image_tokens)


class CoAttentionFusion(nn.Module):
    """Two streams of blocks with cross-attention; each attends to the other's previous layer.

    Layer i computes both new states from layer i-1's outputs:
    ``t_i = text_layers[i](t_{i-1}, ctx=v_{i-1})``, ``v_i = image_layers[i](v_{i-1}, ctx=t_{i-1})``.
    """

    def __init__(
        self,
        dim: int,
        depth: int,
        num_heads: int,
        *,
        mlp_ratio: float = 4.0,
        pre_norm: bool = False,
        drop: float = 0.0,
        attn_drop: float = 0.0,
        drop_path_rate: float = 0.0,
        norm_layer: Callable[..., nn.Module] = nn.LayerNorm,
        act_layer: Callable[..., nn.Module] = nn.GELU,
        block_layer: type[nn.Module] = TransformerBlock,
        norm_eps: float = 1e-6,
    ) -> None:
        super().__init__()
        self.dim = dim
        rates = drop_path_rates(drop_path_rate, depth)

        def make_layers() -> nn.ModuleList:
            return nn.ModuleList(
                block_layer(
                    dim,
                    num_heads,
                    mlp_ratio=mlp_ratio,
                    drop=drop,
                    attn_drop=attn_drop,
                    drop_path=rate,
                    pre_norm=pre_norm,
                    cross_attention=True,
                    norm_layer=norm_layer,
                    act_layer=act_layer,
                    norm_eps=norm_eps,
                )
                for rate in rates
            )

        self.text_layers = make_layers()
        self.image_layers = make_layers()
        # pre-norm streams end un-normalised; post-norm layers already end in a norm
        final_norm = (lambda: norm_layer(dim, eps=norm_eps)) if pre_norm else nn.Identity
        self.text_norm = final_norm()
        self.image_norm = final_norm()
        self.grad_checkpointing = False

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    def forward(
        self,
        text: Tensor,
        image: Tensor,
        *,
        text_mask: Tensor | None = None,
        image_mask: Tensor | None = None,
    ) -> FusionOutput:
        use_checkpoint = self.grad_checkpointing and self.training and torch.is_grad_enabled()

        def run(layer: nn.Module, x: Tensor, **kwargs) -> Tensor:
            if use_checkpoint:
                return checkpoint(layer, x, use_reentrant=False, **kwargs)
            return layer(x, **kwargs)

        t, v = text, image  # (B, Lt, D), (B, Li, D)
        for text_layer, image_layer in zip(self.text_layers, self.image_layers):
            # both right-hand sides read the previous layer's (t, v)
            t, v = (
                run(text_layer, t, mask=text_mask, context=v, context_mask=image_mask),
                run(image_layer, v, mask=image_mask, context=t, context_mask=text_mask),
            )  # (B, Lt, D), (B, Li, D)
        return FusionOutput(text_tokens=self.text_norm(t), image_tokens=self.image_norm(v))

    # -- pair scoring with per-caption and per-image work done once ----------------------------

    @torch.no_grad()
    def stream_cache(self, tokens: Tensor, mask: Tensor | None = None, *, stream: str) -> StreamCache:
        """Layer 0's pair-independent part for ``stream`` ``"text"`` or ``"image"`` tokens (N, L, D)."""
        if stream not in ("text", "image"):
            raise ValueError(f"stream must be 'text' or 'image', got {stream!r}")
        own, other = (
            (self.text_layers, self.image_layers) if stream == "text" else (self.image_layers, self.text_layers)
        )
        mask = mask.bool() if mask is not None else None
        keys, values = other[0].cross_attn.keys_values(tokens)  # (N, H, L, hd): what the other stream reads
        return StreamCache(own[0].self_attention_sublayer(tokens, mask), keys, values, mask)

    def text_cache(self, text: Tensor, text_mask: Tensor | None = None) -> StreamCache:
        """``stream_cache`` of captions: the name ``rerank_with_cache`` calls (as on ``BertFusion``)."""
        return self.stream_cache(text, text_mask, stream="text")

    def context_cache(self, image: Tensor, image_mask: Tensor | None = None) -> StreamCache:
        """``stream_cache`` of images: the name ``rerank_with_cache`` calls (as on ``BertFusion``)."""
        return self.stream_cache(image, image_mask, stream="image")

    @torch.no_grad()
    def forward_cached(self, text: StreamCache, image: StreamCache, *, cls_only: bool = False) -> FusionOutput:
        """``forward`` of row-aligned pairs (text row n with image row n) from the caches.

        With ``cls_only`` each stream's last layer runs for its first row only and the
        output holds (N, 1, D) streams: what a first-token pooler (METER's) reads.
        """
        if len(text) != len(image):
            raise ValueError(f"forward_cached: {len(text)} texts but {len(image)} images; index both per pair")
        depth = len(self.text_layers)
        rows = 1 if cls_only and depth == 1 else None
        t, v = text.tokens[:, :rows], image.tokens[:, :rows]  # after layer 0's self-attention
        t, v = (
            self.text_layers[0].cross_mlp_sublayers(t, image.keys, image.values, image.mask),
            self.image_layers[0].cross_mlp_sublayers(v, text.keys, text.values, text.mask),
        )
        for i in range(1, depth):
            rows = 1 if cls_only and i == depth - 1 else None
            text_layer, image_layer = self.text_layers[i], self.image_layers[i]
            kt, vt = text_layer.cross_attn.keys_values(v)  # the text stream reads the image's previous layer
            ki, vi = image_layer.cross_attn.keys_values(t)
            t, v = (
                text_layer.cross_mlp_sublayers(
                    text_layer.self_attention_sublayer(t, text.mask, rows), kt, vt, image.mask
                ),
                image_layer.cross_mlp_sublayers(
                    image_layer.self_attention_sublayer(v, image.mask, rows), ki, vi, text.mask
                ),
            )  # (N, Lt | 1, D), (N, Li | 1, D)
        return FusionOutput(text_tokens=self.text_norm(t), image_tokens=self.image_norm(v))
