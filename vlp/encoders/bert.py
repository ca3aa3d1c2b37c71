"""BERT layers as vlp blocks: the multimodal (fusion) half of ALBEF-style text encoders.

ALBEF splits a 12-layer BERT: the first layers encode text alone (``HFTextEncoder`` with
``num_hidden_layers`` set), the remaining ones gain a cross-attention to image tokens
between self-attention and the feed-forward. :class:`BertFusion` builds those layers from
vlp's post-norm :class:`~vlp.blocks.TransformerBlock` and can take their self-attention
and feed-forward weights from a pretrained BERT (cross-attention starts fresh, as in the
paper). :func:`bert_layer_to_block` is the weight mapping, shared with the checkpoint
converters:

==========================================  ===================================
Hugging Face ``BertLayer``                   vlp ``TransformerBlock``
==========================================  ===================================
attention.self.{query,key,value}             attn.qkv (rows: q | k | v)
attention.output.dense                       attn.proj
attention.output.LayerNorm                   norm1
crossattention.self.query                    cross_attn.q
crossattention.self.{key,value}              cross_attn.kv (rows: k | v)
crossattention.output.dense                  cross_attn.proj
crossattention.output.LayerNorm              norm_cross
intermediate.dense                           mlp.fc1
output.dense                                 mlp.fc2
output.LayerNorm                             norm2
==========================================  ===================================
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from vlp.blocks import Transformer
from vlp.errors import CheckpointError, ConfigError


def bert_layer_to_block(state: dict[str, Tensor], *, cross_attention: bool) -> dict[str, Tensor]:
    """One Hugging Face ``BertLayer`` state dict (keys relative to the layer) → the state
    dict of a post-norm ``TransformerBlock``. Raises ``CheckpointError`` naming missing keys."""
    out: dict[str, Tensor] = {}

    def take(key: str) -> Tensor:
        if key not in state:
            raise CheckpointError(f"BERT layer weights lack {key!r} (have {sorted(state)[:8]}...)")
        return state[key]

    for part in ("weight", "bias"):
        out[f"attn.qkv.{part}"] = torch.cat([take(f"attention.self.{n}.{part}") for n in ("query", "key", "value")])
        out[f"attn.proj.{part}"] = take(f"attention.output.dense.{part}")
        out[f"norm1.{part}"] = take(f"attention.output.LayerNorm.{part}")
        out[f"mlp.fc1.{part}"] = take(f"intermediate.dense.{part}")
        out[f"mlp.fc2.{part}"] = take(f"output.dense.{part}")
        out[f"norm2.{part}"] = take(f"output.LayerNorm.{part}")
        if cross_attention:
            out[f"cross_attn.q.{part}"] = take(f"crossattention.self.query.{part}")
            out[f"cross_attn.kv.{part}"] = torch.cat(
                [take(f"crossattention.self.{n}.{part}") for n in ("key", "value")]
            )
            out[f"cross_attn.proj.{part}"] = take(f"crossattention.output.dense.{part}")
            out[f"norm_cross.{part}"] = take(f"crossattention.output.LayerNorm.{part}")
    return out


def block_to_bert_layer(state: dict[str, Tensor], *, cross_attention: bool) -> dict[str, Tensor]:
    """Inverse of :func:`bert_layer_to_block`."""
    out: dict[str, Tensor] = {}
    for part in ("weight", "bias"):
        for name, t in zip(("query", "key", "value"), state[f"attn.qkv.{part}"].chunk(3), strict=True):
            out[f"attention.self.{name}.{part}"] = t
        out[f"attention.output.dense.{part}"] = state[f"attn.proj.{part}"]
        out[f"attention.output.LayerNorm.{part}"] = state[f"norm1.{part}"]
        out[f"intermediate.dense.{part}"] = state[f"mlp.fc1.{part}"]
        out[f"output.dense.{part}"] = state[f"mlp.fc2.{part}"]
        out[f"output.LayerNorm.{part}"] = state[f"norm2.{part}"]
        if cross_attention:
            out[f"crossattention.self.query.{part}"] = state[f"cross_attn.q.{part}"]
            for name, t in zip(("key", "value"), state[f"cross_attn.kv.{part}"].chunk(2), strict=True):
                out[f"crossattention.self.{name}.{part}"] = t
            out[f"crossattention.output.dense.{part}"] = state[f"cross_attn.proj.{part}"]
            out[f"crossattention.output.LayerNorm.{part}"] = state[f"norm_cross.{part}"]
    return out


@dataclass
class ContextCache:
    """Cross-attention keys and values of a set of images, for every fusion layer.

    What :meth:`BertFusion.forward_cached` needs from the image side of a pair: computed
    once per image by :meth:`BertFusion.context_cache` instead of once per (image, caption).
    ``index(rows)`` selects images per pair lazily: each layer's keys/values are gathered
    when that layer runs, so a batch holds one layer's gathered copy at a time, as the
    plain forward holds one layer's projections.
    """

    keys: Tensor  # (depth, N, H, S, hd)
    values: Tensor  # (depth, N, H, S, hd)
    mask: Tensor | None = None  # (N, S) bool, True at real image tokens
    rows: Tensor | None = None  # (n,) images of the pairs; None: all N in order

    def __len__(self) -> int:
        return len(self.rows) if self.rows is not None else self.keys.shape[1]

    @property
    def depth(self) -> int:
        return self.keys.shape[0]

    def index(self, rows: Tensor) -> ContextCache:
        """The cache of images ``rows`` (n,) (repeats allowed: one row per scored pair)."""
        rows = rows.to(self.keys.device)
        if self.rows is not None:
            rows = self.rows.index_select(0, rows)
        return ContextCache(self.keys, self.values, self.mask, rows)

    def layer(self, i: int) -> tuple[Tensor, Tensor, Tensor | None]:
        """Keys, values (n, H, S, hd) and mask (n, S) of layer ``i`` for the selected rows."""
        k, v, mask = self.keys[i], self.values[i], self.mask
        if self.rows is None:
            return k, v, mask
        mask = mask.index_select(0, self.rows) if mask is not None else None
        return k.index_select(0, self.rows), v.index_select(0, self.rows), mask


@dataclass
class TextCache:
    """Captions after the first fusion layer's self-attention (which reads text only).

    Computed once per caption by :meth:`BertFusion.text_cache`.
    """

    tokens: Tensor  # (N, L, D) norm1(x + self_attn(x)) of the first layer
    mask: Tensor | None = None  # (N, L) bool, True at real tokens

    def __len__(self) -> int:
        return self.tokens.shape[0]

    def index(self, rows: Tensor, *, trim: bool = False, multiple: int = 8) -> TextCache:
        """The cache of captions ``rows`` (n,).

        ``trim``: drop the trailing positions that are padding in every selected caption,
        keeping a width that is a multiple of ``multiple`` (few distinct shapes, so the
        allocator reuses its blocks). They are masked keys in every later layer and their
        own outputs are not the CLS, so ``forward_cached(..., cls_only=True)`` gives the same
        result on fewer rows; a batch of short captions then costs what short captions cost.
        """
        rows = rows.to(self.tokens.device)
        mask = self.mask.index_select(0, rows) if self.mask is not None else None
        if trim and mask is not None:
            real = mask.any(0).nonzero()  # (m, 1) positions real in some selected caption
            width = -(-(int(real.max()) + 1 if len(real) else 1) // multiple) * multiple
            if width < mask.shape[1]:
                return TextCache(self.tokens[:, :width].index_select(0, rows), mask[:, :width])
        return TextCache(self.tokens.index_select(0, rows), mask)

    def extent(self) -> Tensor:
        """(N,) 1 + the last real position of each caption: the width ``index(trim=True)`` keeps."""
        if self.mask is None:
            return torch.full((len(self),), self.tokens.shape[1], device=self.tokens.device)
        positions = torch.arange(1, self.mask.shape[1] + 1, device=self.mask.device)  # (L,)
        return (self.mask * positions).amax(1).clamp(min=1)  # (N,)


class BertFusion(Transformer):
    """Post-norm BERT layers with cross-attention to another modality's tokens.

    ``forward(text_tokens, mask=text_mask, context=image_tokens, context_mask=image_mask)``
    → (B, L, dim). Masks are True at real tokens.

    Args:
        dim / depth / num_heads / mlp_ratio: BERT's hidden size, layers, heads, FFN ratio.
        context_dim: width of the tokens attended to (e.g. the ViT's width).
        drop / attn_drop: BERT's hidden and attention dropout (0.1 in bert-base).
        norm_eps: BERT's LayerNorm epsilon.
        init_from: Hugging Face BERT (hub name or local folder) whose layers
            ``init_from_layer ... init_from_layer + depth - 1`` initialise self-attention and
            feed-forward; cross-attention keeps its fresh init (ALBEF: layers 6-11 of
            bert-base-uncased). ``None``: random init.
        init_from_layer: first BERT layer to copy.

    Pair scoring (ITM re-ranking) can split the work by what it depends on:
    ``forward_cached(text_cache(t, mask)[rows_t], context_cache(images)[rows_i], cls_only=True)``
    equals ``forward(t[rows_t], mask=..., context=images[rows_i])[:, 0]``, but computes each
    image's cross-attention keys/values (every layer) and each caption's first self-attention
    once, and runs the last layer for the CLS row only. ``attn_mask`` / ``is_causal`` are not
    supported there (ALBEF's fusion uses neither).
    """

    def __init__(
        self,
        dim: int = 768,
        depth: int = 6,
        num_heads: int = 12,
        *,
        context_dim: int = 768,
        mlp_ratio: float = 4.0,
        drop: float = 0.1,
        attn_drop: float = 0.1,
        norm_eps: float = 1e-12,
        init_from: str | None = None,
        init_from_layer: int = 0,
    ) -> None:
        super().__init__(
            dim,
            depth,
            num_heads,
            mlp_ratio=mlp_ratio,
            pre_norm=False,
            final_norm=False,
            cross_attention=True,
            context_dim=context_dim,
            drop=drop,
            attn_drop=attn_drop,
            norm_eps=norm_eps,
        )
        self.dim = dim
        self.context_dim = context_dim
        if init_from is not None:
            self.load_bert_layers(init_from, init_from_layer)

    def load_bert_layers(self, name_or_path: str, first: int) -> None:
        """Copy self-attention and feed-forward weights of BERT layers ``first...`` in."""
        from transformers import AutoModel

        from vlp.encoders.text import load_hf_model

        bert = load_hf_model(AutoModel, name_or_path, None, add_pooling_layer=False)
        layers = bert.encoder.layer
        if first + len(self.blocks) > len(layers):
            raise ConfigError(
                f"BertFusion: {name_or_path} has {len(layers)} layers; cannot take {len(self.blocks)} from layer {first}"
            )
        if bert.config.hidden_size != self.dim:
            raise ConfigError(f"BertFusion: {name_or_path} is {bert.config.hidden_size} wide, the fusion {self.dim}")
        for block, layer in zip(self.blocks, layers[first:], strict=False):
            mapped = bert_layer_to_block(layer.state_dict(), cross_attention=False)
            missing, unexpected = block.load_state_dict(mapped, strict=False)
            assert not unexpected, unexpected
            assert all(k.startswith(("cross_attn.", "norm_cross.")) for k in missing), missing

    # -- pair scoring with per-image and per-caption work done once ---------------------------

    @torch.no_grad()
    def context_cache(self, context: Tensor, context_mask: Tensor | None = None) -> ContextCache:
        """Cross-attention keys/values of image tokens (N, S, context_dim) in every layer."""
        keys, values = [], []
        for block in self.blocks:
            k, v = block.cross_attn.keys_values(context)  # (N, H, S, hd) each
            keys.append(k)
            values.append(v)
        mask = context_mask.bool() if context_mask is not None else None
        return ContextCache(torch.stack(keys), torch.stack(values), mask)  # (depth, N, H, S, hd)

    @torch.no_grad()
    def text_cache(self, x: Tensor, mask: Tensor | None = None) -> TextCache:
        """Text tokens (N, L, dim) through the first layer's self-attention and its norm."""
        mask = mask.bool() if mask is not None else None
        return TextCache(self.blocks[0].self_attention_sublayer(x, mask), mask)  # (N, L, D)

    @torch.no_grad()
    def forward_cached(self, text: TextCache, context: ContextCache, *, cls_only: bool = False) -> Tensor:
        """The fusion of row-aligned pairs (text row n with context row n) from the caches.

        Returns (N, L, dim) as ``forward``, or with ``cls_only`` the first token (N, dim),
        for which the last layer runs its queries, cross-attention and MLP on that row only.
        """
        if len(text) != len(context):
            raise ValueError(f"forward_cached: {len(text)} texts but {len(context)} contexts; index both per pair")
        if context.depth != len(self.blocks):
            raise ValueError(
                f"forward_cached: the context cache has {context.depth} layers, the fusion {len(self.blocks)}"
            )
        x, mask = text.tokens, text.mask  # (N, L, D), (N, L)
        last = len(self.blocks) - 1
        for i, block in enumerate(self.blocks):
            rows = 1 if cls_only and i == last else None
            if i > 0:
                x = block.self_attention_sublayer(x, mask, rows)  # (N, L | 1, D)
            elif rows:  # one layer: its self-attention is in the text cache
                x = x[:, :rows]
            k, v, context_mask = context.layer(i)  # (N, H, S, hd) x 2, (N, S)
            x = block.cross_mlp_sublayers(x, k, v, context_mask)  # (N, L | 1, D)
        x = self.norm(x)  # identity for BERT (post-norm), kept for parity with forward
        return x[:, 0] if cls_only else x  # (N, D) or (N, L, D)
