"""Text-image fusion encoders of METER (Dou et al., 2022): merged attention and co-attention.

Both take text (B, Lt, D) and image (B, Li, D) tokens of the same width, with optional (B, L)
bool masks (True = real token), and return both streams in a :class:`FusionOutput`. Neither
adds modality-type embeddings: the model adds them to the inputs, as METER does.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from vlp.blocks.transformer import Transformer, TransformerBlock, drop_path_rates


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
