"""Towers built from vlp's own pre-norm transformer blocks (FLAVA's image and text encoders).

    ViTEncoder:             patches ─► [mask token] ─► [CLS] + positions ─► blocks ─► norm
    TransformerTextEncoder: ids ─► word + position + token type ─► LayerNorm ─► blocks ─► norm

Both are pre-norm (ViT-style) stacks; their output carries the tokens after the final norm
(``tokens``, ``pooled`` = the CLS token) and the states before it (``hidden``), which
FLAVA's multimodal encoder reads. Unlike BERT (post-norm), the text tower normalises the
input of each sublayer. Parameter names follow :mod:`vlp.blocks`; ``vlp convert flava``
maps Hugging Face / TorchMultimodal checkpoints onto them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from vlp.blocks.transformer import Transformer
from vlp.encoders.base import Encoder, EncoderOutput
from vlp.errors import ConfigError


def _tower(dim: int, depth: int, num_heads: int, mlp_ratio: float, norm_eps: float, drop: float, **kw) -> Transformer:
    if dim % num_heads:
        raise ConfigError(f"width {dim} is not a multiple of num_heads {num_heads}")
    return Transformer(
        dim, depth, num_heads, mlp_ratio=mlp_ratio, norm_eps=norm_eps, drop=drop, attn_drop=drop, pre_norm=True, **kw
    )


class PatchEmbedding(nn.Module):
    """Conv patchifier, CLS token and learned positions (interpolated for other grids)."""

    def __init__(self, image_size: int, patch_size: int, dim: int, in_chans: int = 3) -> None:
        super().__init__()
        if image_size % patch_size:
            raise ConfigError(f"image_size {image_size} is not a multiple of patch_size {patch_size}")
        self.patch_size = patch_size
        self.grid = image_size // patch_size
        self.proj = nn.Conv2d(in_chans, dim, kernel_size=patch_size, stride=patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.empty(1, 1 + self.grid**2, dim).normal_(std=0.02))

    def positions(self, h: int, w: int) -> torch.Tensor:
        """Position embeddings (1, 1 + h*w, D); bicubic interpolation off the trained grid."""
        if (h, w) == (self.grid, self.grid):
            return self.pos_embed
        cls, grid = self.pos_embed[:, :1], self.pos_embed[:, 1:]
        D = grid.shape[-1]
        grid = grid.reshape(1, self.grid, self.grid, D).permute(0, 3, 1, 2)
        grid = F.interpolate(grid, size=(h, w), mode="bicubic", align_corners=False)
        return torch.cat([cls, grid.permute(0, 2, 3, 1).reshape(1, h * w, D)], dim=1)

    def forward(
        self, images: torch.Tensor, patch_mask: torch.Tensor | None = None, mask_token: torch.Tensor | None = None
    ) -> torch.Tensor:
        x = self.proj(images)  # (B, D, h, w)
        h, w = x.shape[-2:]
        x = x.flatten(2).transpose(1, 2)  # (B, N, D)
        if patch_mask is not None:  # BEiT: masked patches become the mask token before positions
            if mask_token is None:
                raise ConfigError("a patch mask was given without a mask token")
            x = torch.where(patch_mask.view(x.shape[0], -1, 1).bool(), mask_token.view(1, 1, -1).to(x.dtype), x)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)  # (B, 1 + N, D)
        return x + self.positions(h, w)


class PreNormTower(Encoder):
    """What both towers share: an ``embed`` module, then ``transformer`` (blocks, final norm)."""

    embed: nn.Module
    transformer: Transformer

    def layer_groups(self) -> list[nn.Module]:
        return [self.embed, *self.transformer.blocks, self.transformer.norm]

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.transformer.set_grad_checkpointing(enable)

    def encode(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Embedded inputs (B, L, D) → (tokens after the final norm, states before it)."""
        hidden = self.transformer.forward_blocks(x, mask=mask)  # (B, L, D)
        return self.transformer.norm(hidden), hidden


class ViTEncoder(PreNormTower):
    """A pre-norm ViT: CLS token, learned positions, masked patches replaced by a given mask
    token before CLS and positions are added (BEiT / FLAVA).

    Args:
        image_size / patch_size: the trained grid (other sizes interpolate the positions).
        dim / depth / num_heads / mlp_ratio: flava-full: 768 / 12 / 12 / 4.
        norm_eps: LayerNorm epsilon (FLAVA: 1e-12).
        drop / drop_path_rate: dropout and stochastic depth.
    """

    def __init__(
        self,
        *,
        image_size: int = 224,
        patch_size: int = 16,
        dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        norm_eps: float = 1e-12,
        drop: float = 0.0,
        drop_path_rate: float = 0.0,
        in_chans: int = 3,
    ) -> None:
        super().__init__()
        self.dim = self.pooled_dim = dim
        self.image_size, self.patch_size = image_size, patch_size
        self.num_prefix_tokens = 1  # the CLS token
        self.embed = PatchEmbedding(image_size, patch_size, dim, in_chans)
        self.dropout = nn.Dropout(drop)
        self.transformer = _tower(dim, depth, num_heads, mlp_ratio, norm_eps, drop, drop_path_rate=drop_path_rate)
        self.grid_size = (self.embed.grid, self.embed.grid)

    def image_size_error(self, size: int) -> str | None:
        if size % self.patch_size:
            return f"cuts images into {self.patch_size} px patches ({size} is not a multiple)"
        return None

    def forward(
        self, images: torch.Tensor, patch_mask: torch.Tensor | None = None, mask_token: torch.Tensor | None = None
    ) -> EncoderOutput:
        """``images`` (B, 3, H, W); ``patch_mask`` (B, h*w) bool, True = replaced by ``mask_token`` (D,)."""
        tokens, hidden = self.encode(self.dropout(self.embed(images, patch_mask, mask_token)))  # (B, 1 + N, D)
        return EncoderOutput(tokens=tokens, pooled=tokens[:, 0], hidden=hidden)


class TextEmbedding(nn.Module):
    """BERT's input embedding: word + position + token type, LayerNorm, dropout."""

    def __init__(
        self,
        vocab_size: int,
        dim: int,
        max_length: int,
        type_vocab_size: int,
        pad_token_id: int,
        eps: float,
        drop: float,
    ) -> None:
        super().__init__()
        self.word = nn.Embedding(vocab_size, dim, padding_idx=pad_token_id)
        self.position = nn.Embedding(max_length, dim)
        self.token_type = nn.Embedding(type_vocab_size, dim)
        self.norm = nn.LayerNorm(dim, eps=eps)
        self.dropout = nn.Dropout(drop)
        for e in (self.word, self.position, self.token_type):
            nn.init.normal_(e.weight, std=0.02)

    def forward(self, input_ids: torch.Tensor, token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        L = input_ids.shape[1]
        x = self.word(input_ids) + self.position(torch.arange(L, device=input_ids.device))[None]  # (B, L, D)
        types = torch.zeros_like(input_ids) if token_type_ids is None else token_type_ids
        return self.dropout(self.norm(x + self.token_type(types)))


class TransformerTextEncoder(PreNormTower):
    """BERT-style embeddings followed by a pre-norm transformer (FLAVA's text encoder);
    ``pooled`` is the CLS token after the final norm.

    Args:
        vocab_size: rows of the word embedding (bert-base-uncased: 30522).
        max_length: positions (512).
        dim / depth / num_heads / mlp_ratio / norm_eps / drop: as :class:`ViTEncoder`.
        type_vocab_size / pad_token_id: BERT's (2 / 0).
        pool: "cls" (FLAVA) or "mean" over the real tokens, after the final norm. Tiny
            models trained from scratch leave the contrastive plateau sooner with "mean": at
            initialisation every caption's CLS output is nearly the same.
    """

    def __init__(
        self,
        *,
        vocab_size: int = 30522,
        max_length: int = 512,
        dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        norm_eps: float = 1e-12,
        drop: float = 0.0,
        type_vocab_size: int = 2,
        pad_token_id: int = 0,
        pool: str = "cls",
    ) -> None:
        super().__init__()
        if pool not in ("cls", "mean"):
            raise ConfigError(f"TransformerTextEncoder: pool must be 'cls' or 'mean', got {pool!r}")
        self.dim = self.pooled_dim = dim
        self.max_length = max_length
        self.pool = pool
        self.embed = TextEmbedding(vocab_size, dim, max_length, type_vocab_size, pad_token_id, norm_eps, drop)
        self.transformer = _tower(dim, depth, num_heads, mlp_ratio, norm_eps, drop)

    @property
    def vocab_size(self) -> int:
        return self.embed.word.num_embeddings

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embed.word

    def resize_token_embeddings(self, n: int) -> None:
        """Grow the word embedding to ``n`` rows (the old rows kept; see
        :func:`vlp.encoders.text.resize_token_embeddings`, which fills the new ones)."""
        old = self.embed.word
        new = nn.Embedding(n, old.embedding_dim, padding_idx=old.padding_idx).to(old.weight.device, old.weight.dtype)
        with torch.no_grad():
            new.weight[: old.num_embeddings] = old.weight
        self.embed.word = new

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
    ) -> EncoderOutput:
        """``input_ids`` (B, L); ``attention_mask`` (B, L), 1 = real token."""
        mask = None if attention_mask is None else attention_mask.bool()
        tokens, hidden = self.encode(self.embed(input_ids, token_type_ids), mask)  # (B, L, D)
        if self.pool == "cls":
            pooled = tokens[:, 0]
        else:
            weight = torch.ones_like(input_ids, dtype=tokens.dtype) if mask is None else mask.to(tokens.dtype)
            pooled = (tokens * weight[..., None]).sum(1) / weight.sum(1, keepdim=True).clamp(min=1)  # (B, D)
        return EncoderOutput(tokens=tokens, pooled=pooled, mask=mask, hidden=hidden)


class MultimodalEncoder(Transformer):
    """FLAVA's multimodal encoder: a pre-norm transformer with a final norm over the
    concatenated image and text states (flava-full: 768 wide, 6 layers, 12 heads).

    Args:
        dim / depth / num_heads / mlp_ratio / norm_eps / drop: as :class:`ViTEncoder`.
        drop_path_rate: stochastic depth.
    """

    def __init__(
        self,
        dim: int = 768,
        depth: int = 6,
        num_heads: int = 12,
        *,
        mlp_ratio: float = 4.0,
        norm_eps: float = 1e-12,
        drop: float = 0.0,
        drop_path_rate: float = 0.0,
    ) -> None:
        if dim % num_heads:
            raise ConfigError(f"width {dim} is not a multiple of num_heads {num_heads}")
        super().__init__(
            dim,
            depth,
            num_heads,
            mlp_ratio=mlp_ratio,
            norm_eps=norm_eps,
            drop=drop,
            attn_drop=drop,
            pre_norm=True,
            drop_path_rate=drop_path_rate,
        )
