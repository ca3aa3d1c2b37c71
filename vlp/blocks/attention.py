"""Multi-head attention (self or cross) through ``F.scaled_dot_product_attention``.

Masks follow one convention everywhere in ``vlp``: a boolean mask is True where attention is
*allowed* (a real key); float masks are added to the logits. A query row whose keys are all
masked gets a zero attention output instead of the NaN a plain softmax would give.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vlp.blocks.weight_init import init_weights


def merge_masks(
    *,
    key_padding_mask: Tensor | None,
    attn_mask: Tensor | None,
    is_causal: bool,
    q_len: int,
    k_len: int,
    dtype: torch.dtype,
    device: torch.device,
) -> Tensor | None:
    """One mask broadcastable to (B, H, L, S): bool when every part is bool, else additive."""
    masks = []
    if key_padding_mask is not None:
        masks.append(key_padding_mask.bool()[:, None, None, :])  # (B, 1, 1, S)
    if attn_mask is not None:
        masks.append(attn_mask)  # (L, S) or (B|1, H|1, L, S)
    if is_causal and masks:  # top-left aligned, as SDPA's is_causal
        masks.append(torch.ones(q_len, k_len, dtype=torch.bool, device=device).tril())  # (L, S)
    if not masks:
        return None
    if all(m.dtype == torch.bool for m in masks):
        merged = masks[0]
        for m in masks[1:]:
            merged = merged & m
        return merged
    merged = None
    for m in masks:
        if m.dtype == torch.bool:
            m = torch.zeros(m.shape, dtype=dtype, device=device).masked_fill(~m, float("-inf"))
        merged = m.to(dtype) if merged is None else merged + m.to(dtype)
    return merged


def scaled_dot_product_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    attn_mask: Tensor | None = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
) -> Tensor:
    """``F.scaled_dot_product_attention`` with zeros, not NaN, for query rows with no key."""
    if attn_mask is None:
        return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=is_causal)
    if attn_mask.dtype == torch.bool:
        keep = attn_mask.any(dim=-1, keepdim=True)  # (..., L, 1): the row has a key to attend to
        attn_mask = attn_mask | ~keep  # let empty rows attend everywhere, zeroed below
    else:
        keep = (attn_mask > float("-inf")).any(dim=-1, keepdim=True)  # (..., L, 1)
        attn_mask = attn_mask.masked_fill(~keep, 0.0)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p)
    return out.masked_fill(~keep, 0.0)  # (B, H, L, hd)


class Attention(nn.Module):
    """Multi-head attention; self-attention with a fused ``qkv`` unless ``context_dim`` is set.

    The ``qkv`` / ``kv`` output features are laid out (3 | 2, heads, head_dim), the layout of
    ``nn.MultiheadAttention.in_proj_weight`` and of timm's ViT, so weights copy over as-is.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int = 8,
        *,
        context_dim: int | None = None,
        qkv_bias: bool = True,
        qk_norm: bool = False,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        norm_layer: Callable[..., nn.Module] = nn.LayerNorm,
    ) -> None:
        super().__init__()
        if dim % num_heads != 0:
            raise ValueError(f"Attention: dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.is_cross = context_dim is not None
        if self.is_cross:
            self.q = nn.Linear(dim, dim, bias=qkv_bias)
            self.kv = nn.Linear(context_dim, 2 * dim, bias=qkv_bias)
        else:
            self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.q_norm = norm_layer(self.head_dim) if qk_norm else nn.Identity()
        self.k_norm = norm_layer(self.head_dim) if qk_norm else nn.Identity()
        self.attn_drop = attn_drop
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)
        self.apply(init_weights)

    def forward(
        self,
        x: Tensor,
        context: Tensor | None = None,
        *,
        key_padding_mask: Tensor | None = None,
        attn_mask: Tensor | None = None,
        is_causal: bool = False,
    ) -> Tensor:
        B, L, D = x.shape
        H, hd = self.num_heads, self.head_dim
        if self.is_cross:
            if context is None:
                raise ValueError("cross-attention (context_dim set) needs a `context` tensor")
            q = self.query(x)  # (B, H, L, hd)
            k, v = self.keys_values(context)  # (B, H, S, hd) each
        else:
            if context is not None:
                raise ValueError("self-attention got a `context`; build it with context_dim")
            qkv = self.qkv(x).reshape(B, L, 3, H, hd).permute(2, 0, 3, 1, 4)  # (3, B, H, L, hd)
            q, k, v = qkv.unbind(0)  # (B, H, L, hd) each
            q, k = self.q_norm(q), self.k_norm(k)
        return self.attend(q, k, v, key_padding_mask=key_padding_mask, attn_mask=attn_mask, is_causal=is_causal)

    # The three steps of ``forward``, public so that callers can cache the keys and values of
    # a context that many queries attend to (ITM re-ranking: each image's cross-attention
    # keys/values once, not once per caption) or run only some query rows (a CLS token).

    def query(self, x: Tensor) -> Tensor:
        """Queries of ``x`` (B, L, D) → (B, H, L, hd), q-normed."""
        B, L, _ = x.shape
        if self.is_cross:
            q = self.q(x)
        else:
            D = self.num_heads * self.head_dim
            bias = self.qkv.bias[:D] if self.qkv.bias is not None else None
            q = F.linear(x, self.qkv.weight[:D], bias)  # the q rows of the fused qkv
        return self.q_norm(q.reshape(B, L, self.num_heads, self.head_dim).transpose(1, 2))

    def keys_values(self, source: Tensor) -> tuple[Tensor, Tensor]:
        """Keys and values of ``source`` (B, S, D or context_dim) → two (B, H, S, hd), k-normed.

        ``source`` is the context for cross-attention and ``x`` itself for self-attention."""
        B, S, _ = source.shape
        if self.is_cross:
            kv = self.kv(source)
        else:
            D = self.num_heads * self.head_dim
            bias = self.qkv.bias[D:] if self.qkv.bias is not None else None
            kv = F.linear(source, self.qkv.weight[D:], bias)  # the k | v rows of the fused qkv
        k, v = kv.reshape(B, S, 2, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        return self.k_norm(k), v  # (B, H, S, hd) each

    def attend(
        self,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        *,
        key_padding_mask: Tensor | None = None,
        attn_mask: Tensor | None = None,
        is_causal: bool = False,
    ) -> Tensor:
        """Attention of queries (B, H, L, hd) over keys/values (B, H, S, hd), then the output
        projection → (B, L, D). ``key_padding_mask`` is (B, S), True at real keys."""
        B, H, L, hd = q.shape
        mask = merge_masks(
            key_padding_mask=key_padding_mask,
            attn_mask=attn_mask,
            is_causal=is_causal,
            q_len=L,
            k_len=k.shape[2],
            dtype=q.dtype,
            device=q.device,
        )
        # softmax(einsum("b h l d, b h s d -> b h l s", q, k) / sqrt(hd) + mask) @ v
        out = scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=mask,
            dropout_p=self.attn_drop if self.training else 0.0,
            is_causal=is_causal and mask is None,
        )  # (B, H, L, hd)
        out = out.transpose(1, 2).reshape(B, L, H * hd)  # (B, L, D)
        return self.proj_drop(self.proj(out))

    def extra_repr(self) -> str:
        return f"num_heads={self.num_heads}, cross={self.is_cross}, attn_drop={self.attn_drop}"
