"""A faithful re-implementation of OpenFlamingo 2.0.1's forward pass, for parity tests only.

Written from its source (open_flamingo/src/helpers.py, flamingo_lm.py, flamingo.py,
factory.py, train/train_utils.py), not copied: the same computation in the same order
(einsum attention with the max subtracted, ``-finfo.max`` masking, the zeroing of text before
the first image), the media stored on the layers before a forward, the LM's class swapped for
a subclass whose ``forward`` computes ``media_locations``, and the state dict laid out as
OpenFlamingo's (``perceiver.*``, ``lang_encoder.<layers>.<i>.gated_cross_attn_layer.*``,
the duplicates under ``lang_encoder.gated_cross_attn_layers`` / ``old_decoder_blocks``).

Where the pip release breaks on transformers 5, this version does what OpenFlamingo intends:
  * GPT-2's model calls its blocks with positional ``(hidden, cache, mask, ...)``: OpenFlamingo's
    ``FlamingoLayer.forward(lang_x, attention_mask=None, **kw)`` would bind the cache to
    ``attention_mask``; here every argument is passed through as given.
  * ``generate`` is HF ``generate`` of the swapped class (it needs the attention mask and the
    cache plumbing of transformers 4.x); here it is a plain greedy loop over the LM's KV cache
    with what OpenFlamingo's ``_use_cached_vision_x`` path does: the prompt's images are
    encoded once, new tokens attend to the last image of the prompt
    (``count_nonzero(media_locations)``), positions follow the attention mask as HF's
    ``prepare_inputs_for_generation`` computes them, ``bad_words_ids`` as HF's (single tokens).
Also: the perceiver / cross-attention sizes are arguments (OpenFlamingo hard-codes 6 / 64 /
8 / 64), and ``only_attend_immediate_media`` is exposed (OpenFlamingo always builds True).
Old open_clip (< 2.21, what OpenFlamingo was trained with) returns patch tokens before
``ln_post`` from ``visual(x)[1]``; :func:`old_open_clip_tokens` computes exactly that.
"""

from __future__ import annotations

import inspect

import torch
from torch import einsum, nn


def FeedForward(dim: int, mult: int = 4) -> nn.Sequential:  # noqa: N802 - OpenFlamingo's name
    inner = int(dim * mult)
    return nn.Sequential(
        nn.LayerNorm(dim), nn.Linear(dim, inner, bias=False), nn.GELU(), nn.Linear(inner, dim, bias=False)
    )


def _heads(t: torch.Tensor, h: int) -> torch.Tensor:
    """(..., n, h * d) -> (..., h, n, d), OpenFlamingo's ``rearrange_many``."""
    *lead, n, hd = t.shape
    return t.reshape(*lead, n, h, hd // h).movedim(-2, -3)


class PerceiverAttention(nn.Module):
    def __init__(self, *, dim: int, dim_head: int = 64, heads: int = 8) -> None:
        super().__init__()
        self.scale, self.heads = dim_head**-0.5, heads
        inner = dim_head * heads
        self.norm_media = nn.LayerNorm(dim)
        self.norm_latents = nn.LayerNorm(dim)
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_kv = nn.Linear(dim, inner * 2, bias=False)
        self.to_out = nn.Linear(inner, dim, bias=False)

    def forward(self, x: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        x, latents = self.norm_media(x), self.norm_latents(latents)  # (b, T, v, D), (b, T, n, D)
        q = self.to_q(latents)
        k, v = self.to_kv(torch.cat((x, latents), dim=-2)).chunk(2, dim=-1)
        q, k, v = (_heads(t, self.heads) for t in (q, k, v))  # (b, T, h, n, d) -- "b h t n d" up to order
        q = q * self.scale
        sim = einsum("... i d, ... j d -> ... i j", q, k)
        sim = sim - sim.amax(dim=-1, keepdim=True).detach()
        out = einsum("... i j, ... j d -> ... i d", sim.softmax(dim=-1), v)  # (b, T, h, n, d)
        return self.to_out(out.movedim(-3, -2).flatten(-2))  # (b, T, n, D)


class PerceiverResampler(nn.Module):
    def __init__(self, *, dim: int, depth: int = 6, dim_head: int = 64, heads: int = 8, num_latents: int = 64) -> None:
        super().__init__()
        self.latents = nn.Parameter(torch.randn(num_latents, dim))
        self.frame_embs = None  # OpenFlamingo builds it with max_num_frames, never set by its factory
        self.media_time_embs = None
        self.layers = nn.ModuleList(
            nn.ModuleList([PerceiverAttention(dim=dim, dim_head=dim_head, heads=heads), FeedForward(dim)])
            for _ in range(depth)
        )
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, T, F, v, d = x.shape  # (b, T, F, v, D)
        x = x.reshape(b, T, F * v, d)
        latents = self.latents.expand(b, T, *self.latents.shape)  # (b, T, n, D)
        for attn, ff in self.layers:
            latents = attn(x, latents) + latents
            latents = ff(latents) + latents
        return self.norm(latents)


class MaskedCrossAttention(nn.Module):
    def __init__(self, *, dim, dim_visual, dim_head=64, heads=8, only_attend_immediate_media=True) -> None:
        super().__init__()
        self.scale, self.heads = dim_head**-0.5, heads
        inner = dim_head * heads
        self.norm = nn.LayerNorm(dim)
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_kv = nn.Linear(dim_visual, inner * 2, bias=False)
        self.to_out = nn.Linear(inner, dim, bias=False)
        self.only_attend_immediate_media = only_attend_immediate_media

    def forward(self, x, media, media_locations=None, use_cached_media=False):
        if not use_cached_media:
            assert media_locations.shape[1] == x.shape[1]
        T_txt = x.shape[1]
        _, T_img, n = media.shape[:3]
        q = self.to_q(self.norm(x))  # (B, L, h * d)
        k, v = self.to_kv(media.flatten(1, 2)).chunk(2, dim=-1)  # (B, T * n, h * d)
        q, k, v = (_heads(t, self.heads) for t in (q, k, v))  # (B, h, ., d)
        sim = einsum("... i d, ... j d -> ... i j", q * self.scale, k)  # (B, h, L, T * n)
        if media_locations is not None:
            media_time = torch.arange(T_img, device=x.device) + 1
            if use_cached_media:  # every new token comes after the last cached image
                text_time = torch.count_nonzero(media_locations, dim=1)[:, None].expand(-1, T_txt)
            else:
                text_time = media_locations.cumsum(dim=-1)
            op = torch.eq if self.only_attend_immediate_media else torch.ge
            allowed = op(text_time[:, None, :, None], media_time.repeat_interleave(n)[None, None, None])
            sim = sim.masked_fill(~allowed, -torch.finfo(sim.dtype).max)
        sim = sim - sim.amax(dim=-1, keepdim=True).detach()
        attn = sim.softmax(dim=-1)
        if media_locations is not None and self.only_attend_immediate_media:
            # text before any image: attention zeroed (only in this mode, as in OpenFlamingo)
            attn = attn.masked_fill((text_time == 0)[:, None, :, None], 0.0)
        out = einsum("... i j, ... j d -> ... i d", attn, v)  # (B, h, L, d)
        return self.to_out(out.transpose(1, 2).flatten(2))  # (B, L, D)


class GatedCrossAttentionBlock(nn.Module):
    def __init__(self, *, dim, dim_visual, dim_head=64, heads=8, ff_mult=4, only_attend_immediate_media=True):
        super().__init__()
        self.attn = MaskedCrossAttention(
            dim=dim, dim_visual=dim_visual, dim_head=dim_head, heads=heads,
            only_attend_immediate_media=only_attend_immediate_media,
        )  # fmt: skip
        self.attn_gate = nn.Parameter(torch.tensor([0.0]))
        self.ff = FeedForward(dim, mult=ff_mult)
        self.ff_gate = nn.Parameter(torch.tensor([0.0]))

    def forward(self, x, media, media_locations=None, use_cached_media=False):
        x = (
            self.attn(x, media, media_locations=media_locations, use_cached_media=use_cached_media)
            * self.attn_gate.tanh()
            + x
        )
        return self.ff(x) * self.ff_gate.tanh() + x


class FlamingoLayer(nn.Module):
    def __init__(self, gated_cross_attn_layer, decoder_layer) -> None:
        super().__init__()
        self.gated_cross_attn_layer = gated_cross_attn_layer
        self.decoder_layer = decoder_layer
        self.vis_x = self.media_locations = self.use_cached_media = None

    def __getattr__(self, name):  # transformers 5 reads e.g. ``attention_type`` off its layers
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self._modules["decoder_layer"], name)

    def is_conditioned(self) -> bool:
        return self.vis_x is not None and self.media_locations is not None

    def forward(self, lang_x, *args, **kwargs):
        if self.gated_cross_attn_layer is not None:
            if self.vis_x is None or self.media_locations is None:
                raise ValueError("vis_x and media_locations must be conditioned before forward pass")
            lang_x = self.gated_cross_attn_layer(
                lang_x, self.vis_x, media_locations=self.media_locations, use_cached_media=self.use_cached_media
            )
        return self.decoder_layer(lang_x, *args, **kwargs)  # positional arguments kept (transformers 5)


def _get(obj, path):
    for part in path.split("."):
        obj = getattr(obj, part)
    return obj


class FlamingoLMMixin(nn.Module):
    """Mixed in before the LM's own class (OpenFlamingo's ``extend_instance``)."""

    def init_flamingo(self, media_token_id, lang_hidden_size, vis_hidden_size, cross_attn_every_n_layers, **xattn):
        self.old_decoder_blocks = self._get_decoder_layers()
        self.gated_cross_attn_layers = nn.ModuleList(
            GatedCrossAttentionBlock(dim=lang_hidden_size, dim_visual=vis_hidden_size, **xattn)
            if (i + 1) % cross_attn_every_n_layers == 0
            else None
            for i, _ in enumerate(self._get_decoder_layers())
        )
        layers = nn.ModuleList(
            FlamingoLayer(x, d) for x, d in zip(self.gated_cross_attn_layers, self.old_decoder_blocks)
        )
        parent, _, name = self.decoder_layers_attr_name.rpartition(".")
        setattr(_get(self, parent) if parent else self, name, layers)
        self.media_token_id = media_token_id
        self.initialized_flamingo = True
        self._use_cached_vision_x = False

    def _get_decoder_layers(self):
        return _get(self, self.decoder_layers_attr_name)

    def is_conditioned(self) -> bool:
        return all(layer.is_conditioned() for layer in self._get_decoder_layers())

    def clear_conditioned_layers(self) -> None:
        for layer in self._get_decoder_layers():
            layer.vis_x = layer.media_locations = layer.use_cached_media = None

    def forward(self, input_ids, attention_mask, **kwargs):
        media_locations = input_ids == self.media_token_id
        cached = self._use_cached_vision_x and self.is_conditioned() and not media_locations.any()
        for layer in self._get_decoder_layers():
            if not cached:
                layer.media_locations = media_locations
            layer.use_cached_media = cached
        return super().forward(input_ids=input_ids, attention_mask=attention_mask, **kwargs)


def old_open_clip_tokens(visual: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """``visual(images)[1]`` of open_clip < 2.21 (output_tokens=True): the patch tokens of the
    last block, class token dropped, without ``ln_post``. (N, 3, H, W) -> (N, v, W)."""
    return visual.transformer(visual._embeds(images))[:, 1:]


class OpenFlamingo(nn.Module):
    """OpenFlamingo's ``Flamingo``: ``vision_encoder`` is an open_clip ``VisionTransformer``
    (``.visual``), ``lang_encoder`` an HF causal LM (its class is swapped here)."""

    def __init__(
        self,
        vision_encoder: nn.Module,
        lang_encoder: nn.Module,
        eoc_token_id: int,
        media_token_id: int,
        vis_dim: int,
        *,
        decoder_layers_attr_name: str,
        cross_attn_every_n_layers: int = 1,
        perceiver: dict | None = None,
        cross_attn: dict | None = None,
        only_attend_immediate_media: bool = True,
    ) -> None:
        super().__init__()
        self.eoc_token_id, self.media_token_id, self.vis_dim = eoc_token_id, media_token_id, vis_dim
        self.lang_dim = getattr(lang_encoder.config, "d_model", None) or lang_encoder.config.hidden_size
        self.vision_encoder = vision_encoder
        self.perceiver = PerceiverResampler(dim=vis_dim, **(perceiver or {}))
        base = type(lang_encoder)
        lang_encoder.__class__ = type(base.__name__, (FlamingoLMMixin, base), {})
        lang_encoder.decoder_layers_attr_name = decoder_layers_attr_name
        self.lang_encoder = lang_encoder
        lang_encoder.init_flamingo(
            media_token_id, self.lang_dim, vis_dim, cross_attn_every_n_layers,
            only_attend_immediate_media=only_attend_immediate_media, **(cross_attn or {}),
        )  # fmt: skip

    def _encode_vision_x(self, vision_x: torch.Tensor) -> None:
        b, T, F = vision_x.shape[:3]  # (b, T_img, F, C, H, W)
        assert F == 1, "Only single frame supported"
        with torch.no_grad():
            tokens = old_open_clip_tokens(self.vision_encoder, vision_x.flatten(0, 2))  # (b T F, v, d)
        vision_x = self.perceiver(tokens.reshape(b, T, F, *tokens.shape[1:]))  # (b, T, n, d)
        for layer in self.lang_encoder._get_decoder_layers():
            layer.vis_x = vision_x

    def forward(self, vision_x, lang_x, attention_mask=None, labels=None, **kwargs):
        self._encode_vision_x(vision_x)
        for layer in self.lang_encoder._get_decoder_layers():
            layer.media_locations = lang_x == self.media_token_id
        try:
            return self.lang_encoder(input_ids=lang_x, attention_mask=attention_mask, labels=labels, **kwargs)
        finally:
            self.lang_encoder.clear_conditioned_layers()

    @torch.no_grad()
    def generate(self, vision_x, lang_x, attention_mask, *, max_new_tokens=20, eos_token_id=None, bad_words_ids=()):
        """Greedy decoding over the KV cache (see the module docstring) → (B, L + new) ids,
        rows that stopped padded with ``eos_token_id`` as HF's greedy search pads them."""
        eos = self.eoc_token_id if eos_token_id is None else eos_token_id
        lm = self.lang_encoder
        lm._use_cached_vision_x = True
        self._encode_vision_x(vision_x)
        cache_arg = (
            "cache" if "cache" in inspect.signature(type(lm).__mro__[2].forward).parameters else "past_key_values"
        )
        try:
            ids, mask = lang_x, attention_mask.long()
            position = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)
            out = lm(input_ids=ids, attention_mask=mask, position_ids=position, use_cache=True)
            done = torch.zeros(len(ids), dtype=torch.bool, device=ids.device)
            for _ in range(max_new_tokens):
                logits = out.logits[:, -1].float()
                for bad in bad_words_ids:
                    logits[:, bad] = float("-inf")
                token = logits.argmax(-1).masked_fill(done, eos)  # (B,)
                ids = torch.cat([ids, token[:, None]], dim=1)
                done |= token == eos
                if done.all():
                    break
                mask = torch.cat([mask, mask.new_ones(len(ids), 1)], dim=1)
                position = position[:, -1:] + 1
                cache = getattr(out, "cache", None) or out.past_key_values
                out = lm(
                    input_ids=token[:, None],
                    attention_mask=mask,
                    position_ids=position,
                    use_cache=True,
                    **{cache_arg: cache},
                )
            return ids
        finally:
            lm.clear_conditioned_layers()
            lm._use_cached_vision_x = False


def trainable_setup(model: OpenFlamingo) -> None:
    """factory.py's freezing: the perceiver, the cross-attention layers and the LM's input
    embedding train (train.py then zeroes every embedding gradient but the two media rows)."""
    model.requires_grad_(False)
    model.perceiver.requires_grad_(True)
    model.lang_encoder.gated_cross_attn_layers.requires_grad_(True)
    model.lang_encoder.get_input_embeddings().requires_grad_(True)


def openflamingo_checkpoint(model: OpenFlamingo) -> dict[str, torch.Tensor]:
    """train_utils.filter_state_dict_to_trainable: the state dict without frozen parameters
    (names holding "embed" always kept), the duplicates under ``old_decoder_blocks`` /
    ``gated_cross_attn_layers`` and the vision encoder dropped."""
    state = model.state_dict()
    for name, p in model.named_parameters():
        if "embed" not in name and not p.requires_grad:
            state.pop(name, None)
    drop = ("lang_encoder.old_decoder_blocks", "lang_encoder.gated_cross_attn_layers", "vision_encoder")
    return {k: v.clone() for k, v in state.items() if not any(d in k for d in drop)}
