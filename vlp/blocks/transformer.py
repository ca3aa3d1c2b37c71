"""Transformer block (pre- or post-norm, optional cross-attention) and a stack of them.

Pre-norm (ViT, GPT) adds each sublayer to an un-normalised residual stream; post-norm (BERT,
and so METER / ALBEF fusion layers) normalises after each residual sum:

    pre:  x = x + attn(norm1(x));   x = x + xattn(norm_cross(x), ctx);   x = x + mlp(norm2(x))
    post: x = norm1(x + attn(x));   x = norm_cross(x + xattn(x, ctx));   x = norm2(x + mlp(x))

``mask`` / ``context_mask`` are (B, L) / (B, S) bools, True at real tokens (see ``attention``).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from timm.layers import DropPath, LayerScale
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from vlp.blocks.attention import Attention
from vlp.blocks.mlp import Mlp


class TransformerBlock(nn.Module):
    """Self-attention, optional cross-attention to a ``context``, then an MLP."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        *,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        qk_norm: bool = False,
        drop: float = 0.0,
        attn_drop: float = 0.0,
        drop_path: float = 0.0,
        pre_norm: bool = True,
        cross_attention: bool = False,
        context_dim: int | None = None,
        norm_layer: Callable[..., nn.Module] = nn.LayerNorm,
        act_layer: Callable[..., nn.Module] = nn.GELU,
        attn_layer: Callable[..., nn.Module] = Attention,
        mlp_layer: Callable[..., nn.Module] = Mlp,
        layer_scale_init: float | None = None,
        norm_eps: float = 1e-6,
    ) -> None:
        super().__init__()
        self.pre_norm = pre_norm
        attn_kwargs = dict(
            qkv_bias=qkv_bias,
            qk_norm=qk_norm,
            attn_drop=attn_drop,
            proj_drop=drop,
            norm_layer=norm_layer,
        )

        def layer_scale() -> nn.Module:
            if layer_scale_init is None:
                return nn.Identity()
            return LayerScale(dim, init_values=layer_scale_init)

        self.norm1 = norm_layer(dim, eps=norm_eps)
        self.attn = attn_layer(dim, num_heads, **attn_kwargs)
        self.ls1 = layer_scale()
        if cross_attention:
            self.norm_cross = norm_layer(dim, eps=norm_eps)
            self.cross_attn = attn_layer(dim, num_heads, context_dim=context_dim or dim, **attn_kwargs)
            self.ls_cross = layer_scale()
        else:
            if context_dim is not None:
                raise ValueError("TransformerBlock: context_dim is set but cross_attention=False")
            self.norm_cross = self.cross_attn = self.ls_cross = None
        self.norm2 = norm_layer(dim, eps=norm_eps)
        self.mlp = mlp_layer(dim, hidden_dim=int(dim * mlp_ratio), act_layer=act_layer, drop=drop)
        self.ls2 = layer_scale()
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(
        self,
        x: Tensor,
        *,
        mask: Tensor | None = None,
        context: Tensor | None = None,
        context_mask: Tensor | None = None,
        attn_mask: Tensor | None = None,
        is_causal: bool = False,
    ) -> Tensor:
        if self.cross_attn is None and (context is not None or context_mask is not None):
            raise ValueError(
                "TransformerBlock got a `context` but has no cross-attention; build it with cross_attention=True"
            )
        if self.cross_attn is not None and context is None:
            raise ValueError("TransformerBlock has cross-attention and needs a `context` tensor")

        def attn(h: Tensor) -> Tensor:
            return self.ls1(self.attn(h, key_padding_mask=mask, attn_mask=attn_mask, is_causal=is_causal))

        def cross_attn(h: Tensor) -> Tensor:
            return self.ls_cross(self.cross_attn(h, context, key_padding_mask=context_mask))

        dp = self.drop_path
        if self.pre_norm:
            x = x + dp(attn(self.norm1(x)))  # (B, L, D)
            if self.cross_attn is not None:
                x = x + dp(cross_attn(self.norm_cross(x)))  # (B, L, D)
            x = x + dp(self.ls2(self.mlp(self.norm2(x))))  # (B, L, D)
        else:
            x = self.norm1(x + dp(attn(x)))  # (B, L, D)
            if self.cross_attn is not None:
                x = self.norm_cross(x + dp(cross_attn(x)))  # (B, L, D)
            x = self.norm2(x + dp(self.ls2(self.mlp(x))))  # (B, L, D)
        return x

    # The sublayers of ``forward``, for callers that cache what does not change between
    # calls (pair scoring: a context's cross-attention keys/values, reused for many queries).

    def self_attention_sublayer(self, x: Tensor, mask: Tensor | None = None, rows: int | None = None) -> Tensor:
        """The self-attention sublayer for the first ``rows`` query rows of ``x`` (B, L, D)
        (all when None), every row a key → (B, rows or L, D)."""
        attn, dp = self.attn, self.drop_path
        h = self.norm1(x) if self.pre_norm else x
        if rows is None:  # every row: the fused qkv projection
            out = self.ls1(attn(h, key_padding_mask=mask))
        else:
            k, v = attn.keys_values(h)  # (B, H, L, hd)
            out = self.ls1(attn.attend(attn.query(h[:, :rows]), k, v, key_padding_mask=mask))
            x = x[:, :rows]
        return x + dp(out) if self.pre_norm else self.norm1(x + dp(out))

    def cross_mlp_sublayers(
        self, x: Tensor, keys: Tensor, values: Tensor, context_mask: Tensor | None = None
    ) -> Tensor:
        """Cross-attention over precomputed context keys/values (B, H, S, hd), then the MLP → (B, L, D)."""
        if self.cross_attn is None:
            raise ValueError("TransformerBlock has no cross-attention; build it with cross_attention=True")
        xattn, dp = self.cross_attn, self.drop_path

        def cross(h: Tensor) -> Tensor:
            return self.ls_cross(xattn.attend(xattn.query(h), keys, values, key_padding_mask=context_mask))

        if self.pre_norm:
            x = x + dp(cross(self.norm_cross(x)))  # (B, L, D)
            return x + dp(self.ls2(self.mlp(self.norm2(x))))
        x = self.norm_cross(x + dp(cross(x)))  # (B, L, D)
        return self.norm2(x + dp(self.ls2(self.mlp(x))))


def drop_path_rates(drop_path_rate: float, depth: int) -> list[float]:
    """Stochastic depth rising linearly from 0 at the first block to the rate at the last."""
    return [r.item() for r in torch.linspace(0, drop_path_rate, depth)]


class Transformer(nn.Module):
    """``depth`` blocks and, for pre-norm stacks, a final norm; ``block_kwargs`` go to each block."""

    def __init__(
        self,
        dim: int,
        depth: int,
        num_heads: int,
        *,
        block_layer: type[nn.Module] = TransformerBlock,  # a class: jsonargparse builds it from recipes
        final_norm: bool | None = None,
        drop_path_rate: float = 0.0,
        **block_kwargs,
    ) -> None:
        super().__init__()
        self.dim = dim
        if "drop_path" in block_kwargs:
            raise ValueError("Transformer: pass drop_path_rate (spread over depth), not drop_path")
        rates = drop_path_rates(drop_path_rate, depth)
        self.blocks = nn.ModuleList(
            [block_layer(dim, num_heads, drop_path=rates[i], **block_kwargs) for i in range(depth)]
        )
        if final_norm is None:
            final_norm = block_kwargs.get("pre_norm", True)
        if final_norm:
            norm_layer = block_kwargs.get("norm_layer", nn.LayerNorm)
            self.norm = norm_layer(dim, eps=block_kwargs.get("norm_eps", 1e-6))
        else:
            self.norm = nn.Identity()
        self.grad_checkpointing = False

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each block's activations in backward (training only) to save memory."""
        self.grad_checkpointing = enable

    def forward(
        self,
        x: Tensor,
        *,
        mask: Tensor | None = None,
        context: Tensor | None = None,
        context_mask: Tensor | None = None,
        attn_mask: Tensor | None = None,
        is_causal: bool = False,
    ) -> Tensor:
        return self.norm(
            self.forward_blocks(
                x, mask=mask, context=context, context_mask=context_mask, attn_mask=attn_mask, is_causal=is_causal
            )
        )  # (B, L, D)

    def forward_blocks(
        self,
        x: Tensor,
        *,
        mask: Tensor | None = None,
        context: Tensor | None = None,
        context_mask: Tensor | None = None,
        attn_mask: Tensor | None = None,
        is_causal: bool = False,
    ) -> Tensor:
        """The blocks without the final norm → (B, L, D) (FLAVA's multimodal encoder reads a
        tower's states before its final norm)."""
        kwargs = dict(
            mask=mask,
            context=context,
            context_mask=context_mask,
            attn_mask=attn_mask,
            is_causal=is_causal,
        )
        use_checkpoint = self.grad_checkpointing and self.training and torch.is_grad_enabled()
        for block in self.blocks:
            if use_checkpoint:
                x = checkpoint(block, x, use_reentrant=False, **kwargs)  # (B, L, D)
            else:
                x = block(x, **kwargs)  # (B, L, D)
        return x
