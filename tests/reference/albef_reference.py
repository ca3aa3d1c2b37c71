"""A reference ALBEF forward pass built only from timm and Hugging Face transformers modules.

No vlp code: this is what the vlp ALBEF must reproduce after a checkpoint conversion.

* image: timm's ``VisionTransformer`` (ALBEF's ``VisionTransformer`` has timm's parameter
  names and computation: pre-norm blocks, LayerNorm eps 1e-6, final norm over all tokens);
* text: transformers' ``BertModel`` with the first ``fusion_layer`` layers, no pooler;
* fusion: transformers' ``BertLayer`` modules built with ``is_decoder=True`` and
  ``add_cross_attention=True`` (so their cross-attention runs) and called directly with a
  non-causal extended attention mask: self-attention over the text, cross-attention to all
  image tokens, feed-forward. This is ALBEF's ``xbert`` ``mode="fusion"`` computation;
  xbert's cross-attention key/value take ``encoder_width`` inputs, so those two Linear
  modules are rebuilt with the ViT's width;
* MLM: transformers' ``BertLMPredictionHead`` (ALBEF's ``cls.predictions``);
* ``vision_proj``, ``text_proj``, ``itm_head``, ``temp`` as in ALBEF.

Weights are read and written by ALBEF's original key names, with strict key checking
(:meth:`ALBEFReference.from_albef_state`); :func:`make_albef_checkpoint` makes random
weights in the original layouts (salesforce/ALBEF pretraining and retrieval, LAVIS).
"""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from timm.models.vision_transformer import VisionTransformer
from torch import Tensor, nn
from transformers import BertConfig, BertModel
from transformers.models.bert.modeling_bert import BertLayer, BertLMPredictionHead

QUEUE_KEYS = ("image_queue", "text_queue", "queue_ptr", "idx_queue")


@dataclass(frozen=True)
class TinyALBEFConfig:
    """Sizes of a tiny ALBEF (the real one: 256 px, ViT-B/16, BERT-base with fusion_layer 6).

    The ViT is wider than BERT on purpose, so that cross-attention key/value widths
    (``encoder_width`` in ALBEF) are exercised.
    """

    image_size: int = 32
    patch_size: int = 8
    vision_width: int = 48
    vision_depth: int = 2
    vision_heads: int = 3
    text_width: int = 32
    text_heads: int = 2
    num_layers: int = 4
    fusion_layer: int = 2
    intermediate_size: int = 128
    vocab_size: int = 120
    max_position_embeddings: int = 24
    type_vocab_size: int = 2
    embed_dim: int = 16
    queue_size: int = 8
    temp: float = 0.05

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size

    def bert_config(self, **overrides) -> BertConfig:
        kwargs = dict(
            vocab_size=self.vocab_size,
            hidden_size=self.text_width,
            num_hidden_layers=self.num_layers,
            num_attention_heads=self.text_heads,
            intermediate_size=self.intermediate_size,
            max_position_embeddings=self.max_position_embeddings,
            type_vocab_size=self.type_vocab_size,
            hidden_act="gelu",
            layer_norm_eps=1e-12,
        )
        config = BertConfig(**(kwargs | overrides))
        config._attn_implementation = "eager"
        return config


def extended_mask(mask: Tensor, dtype: torch.dtype) -> Tensor:
    """(B, L) 1/0 padding mask → (B, 1, 1, L) additive mask, non-causal (BERT encoder style)."""
    return (1.0 - mask[:, None, None, :].to(dtype)) * torch.finfo(dtype).min


class ALBEFReference(nn.Module):
    """ALBEF's online model (or its momentum copy) from timm and transformers modules."""

    def __init__(self, cfg: TinyALBEFConfig, *, mlm: bool = True) -> None:
        super().__init__()
        self.cfg = cfg
        self.visual_encoder = VisionTransformer(
            img_size=cfg.image_size,
            patch_size=cfg.patch_size,
            embed_dim=cfg.vision_width,
            depth=cfg.vision_depth,
            num_heads=cfg.vision_heads,
            mlp_ratio=4.0,
            qkv_bias=True,
            num_classes=0,
            global_pool="token",
        )
        assert self.visual_encoder.norm.eps == 1e-6  # ALBEF: partial(nn.LayerNorm, eps=1e-6)
        self.bert = BertModel(cfg.bert_config(num_hidden_layers=cfg.fusion_layer), add_pooling_layer=False)
        fusion_config = cfg.bert_config(is_decoder=True, add_cross_attention=True)
        self.fusion_layers = nn.ModuleList(
            [BertLayer(fusion_config, layer_idx=i) for i in range(cfg.fusion_layer, cfg.num_layers)]
        )
        for layer in self.fusion_layers:
            layer.attention.self.is_causal = False  # ALBEF's fusion is bidirectional
            xattn = layer.crossattention.self  # xbert: key/value read encoder_width features
            xattn.key = nn.Linear(cfg.vision_width, cfg.text_width)
            xattn.value = nn.Linear(cfg.vision_width, cfg.text_width)
        self.mlm_head = BertLMPredictionHead(cfg.bert_config()) if mlm else None
        self.vision_proj = nn.Linear(cfg.vision_width, cfg.embed_dim)
        self.text_proj = nn.Linear(cfg.text_width, cfg.embed_dim)
        self.itm_head = nn.Linear(cfg.text_width, 2)
        self.temp = nn.Parameter(torch.tensor(cfg.temp))

    # -- forward --------------------------------------------------------------------------
    def image_embeds(self, image: Tensor) -> Tensor:
        """(B, 3, H, W) → ViT tokens (B, 1 + N, Dv), CLS first, after the final norm."""
        return self.visual_encoder.forward_features(image)

    def text_embeds(self, ids: Tensor, mask: Tensor) -> Tensor:
        """Unimodal text layers (ALBEF ``mode="text"``) → (B, L, Dt)."""
        return self.bert(input_ids=ids, attention_mask=mask).last_hidden_state

    def fuse(self, text: Tensor, mask: Tensor, image: Tensor) -> Tensor:
        """Fusion layers (ALBEF ``mode="fusion"``): (B, L, Dt) text, (B, Li, Dv) image → (B, L, Dt)."""
        self_mask = extended_mask(mask, text.dtype)  # (B, 1, 1, L)
        image_mask = extended_mask(torch.ones(image.shape[:2], device=image.device), text.dtype)  # (B, 1, 1, Li)
        h = text
        for layer in self.fusion_layers:
            h = layer(h, attention_mask=self_mask, encoder_hidden_states=image, encoder_attention_mask=image_mask)
            h = h[0] if isinstance(h, tuple) else h  # transformers < 5 returns a tuple
        return h

    def features(self, image: Tensor, ids: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        """Normalised projected CLS features: image (B, E), text (B, E)."""
        image_feat = F.normalize(self.vision_proj(self.image_embeds(image)[:, 0]), dim=-1)
        text_feat = F.normalize(self.text_proj(self.text_embeds(ids, mask)[:, 0]), dim=-1)
        return image_feat, text_feat

    def itc_sims(self, image: Tensor, ids: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        """In-batch ITC similarities / temp: sim_i2t (B, B), sim_t2i (B, B)."""
        image_feat, text_feat = self.features(image, ids, mask)
        return image_feat @ text_feat.T / self.temp, text_feat @ image_feat.T / self.temp

    def itm_logits(self, image: Tensor, ids: Tensor, mask: Tensor) -> Tensor:
        """ITM logits (B, 2) of the pairs (image b, text b)."""
        fused = self.fuse(self.text_embeds(ids, mask), mask, self.image_embeds(image))  # (B, L, Dt)
        return self.itm_head(fused[:, 0])

    def mlm_logits(self, image: Tensor, masked_ids: Tensor, mask: Tensor) -> Tensor:
        """MLM logits (B, L, V): masked text through all BERT layers with the image, then ``cls``."""
        if self.mlm_head is None:
            raise RuntimeError("this reference has no MLM head (retrieval layout)")
        fused = self.fuse(self.text_embeds(masked_ids, mask), mask, self.image_embeds(image))  # (B, L, Dt)
        return self.mlm_head(fused)

    # -- ALBEF key names ------------------------------------------------------------------
    def _to_original(self, name: str, text: str, suffix: str) -> str:
        """Reference parameter name → ALBEF key (``text``: "text_encoder.bert" or "text_encoder")."""
        F_ = self.cfg.fusion_layer
        if name.startswith("bert."):
            return f"{text.replace('text_encoder', 'text_encoder' + suffix, 1)}.{name[len('bert.') :]}"
        if m := re.match(r"fusion_layers\.(\d+)\.(.*)", name):
            base = text.replace("text_encoder", "text_encoder" + suffix, 1)
            return f"{base}.encoder.layer.{F_ + int(m[1])}.{m[2]}"
        if name.startswith("mlm_head."):
            return f"text_encoder{suffix}.cls.predictions.{name[len('mlm_head.') :]}"
        head, _, rest = name.partition(".")
        return f"{head}{suffix}.{rest}" if rest else head + suffix

    def to_albef_state(self, layout: str = "pretrain", *, momentum: bool = False) -> dict[str, Tensor]:
        """This model's weights under ALBEF's names (``_m`` names with ``momentum``; the
        momentum model has no ``itm_head`` nor ``temp``), with xbert's buffers."""
        text = "text_encoder.bert" if layout == "pretrain" else "text_encoder"
        suffix = "_m" if momentum else ""
        out = {}
        for name, t in self.state_dict().items():
            if momentum and name.split(".")[0] in ("itm_head", "temp"):
                continue
            out[self._to_original(name, text, suffix)] = t.detach().clone()
        base = text.replace("text_encoder", "text_encoder" + suffix, 1)
        out[f"{base}.embeddings.position_ids"] = torch.arange(self.cfg.max_position_embeddings)[None]  # (1, P)
        return out

    @classmethod
    def from_albef_state(
        cls, state: dict[str, Tensor], cfg: TinyALBEFConfig, *, momentum: bool = False
    ) -> ALBEFReference:
        """Build from an ALBEF-layout state dict, strictly: every reference weight must be
        there, and every key must be used except the other copy's keys (online ↔ momentum),
        the queues and xbert's ``position_ids`` buffer (checked to be ``arange``). Without
        ``token_type_embeddings`` (LAVIS: ``add_type_embeddings: false``, nothing added) a
        zero table reproduces the computation. The momentum copy uses the online ``temp``
        and ``itm_head`` (ALBEF has no momentum copies of them)."""
        layout = "pretrain" if any(k.startswith("text_encoder.bert.") for k in state) else "retrieval"
        ref = cls(cfg, mlm=any(".cls.predictions." in k for k in state))
        text = "text_encoder.bert" if layout == "pretrain" else "text_encoder"
        suffix = "_m" if momentum else ""
        wanted = {}
        for name in ref.state_dict():
            key = ref._to_original(name, text, suffix)
            if momentum and name.split(".")[0] in ("itm_head", "temp"):
                key = ref._to_original(name, text, "")
            wanted[name] = key
        tt_name = "bert.embeddings.token_type_embeddings.weight"
        loaded = {}
        for name, key in wanted.items():
            if key in state:
                loaded[name] = state[key]
            elif name == tt_name:
                loaded[name] = torch.zeros(cfg.type_vocab_size, cfg.text_width)
        used = set(wanted.values())
        leftover = []
        for key in state:
            if key in used or key in QUEUE_KEYS:
                continue
            if key.endswith("embeddings.position_ids"):
                assert torch.equal(state[key].flatten(), torch.arange(state[key].numel())), key
                continue
            head = key.split(".")[0]
            other_copy = head.endswith("_m") != momentum  # a key of the copy not being built
            if not other_copy:
                leftover.append(key)
        if leftover:
            raise KeyError(f"ALBEFReference: unused checkpoint keys {leftover}")
        ref.load_state_dict(loaded, strict=True)  # raises on any missing reference weight
        return ref.eval()


def _perturb(module: nn.Module, scale: float, generator: torch.Generator) -> None:
    """Add noise to every parameter: no LayerNorm stays (1, 0), no bias stays 0, so a
    swapped or dropped tensor shows in the outputs."""
    with torch.no_grad():
        for p in module.parameters():
            p.add_(scale * torch.randn(p.shape, generator=generator))


def make_albef_checkpoint(
    cfg: TinyALBEFConfig = TinyALBEFConfig(),
    seed: int = 0,
    *,
    layout: str = "pretrain",
    type_embeddings: bool = True,
) -> dict[str, Tensor]:
    """Random weights in ALBEF's original key layout, as saved by ALBEF (``model`` entry).

    layout: "pretrain" (``BertForMaskedLM``: ``text_encoder.bert.*`` and ``text_encoder.cls.*``,
        no ``idx_queue``) or "retrieval" (``BertModel``: ``text_encoder.*``, ``idx_queue`` of
        shape (1, Q)).
    type_embeddings: False drops ``token_type_embeddings`` (LAVIS's ``med_config_albef.json``).

    The momentum copies differ from the online weights (as after training), the MLM decoder
    weight is tied to the word embeddings and its bias to ``predictions.bias`` (xbert ties
    both), and xbert's ``position_ids`` buffers are included.
    """
    if layout not in ("pretrain", "retrieval"):
        raise ValueError(f"layout must be 'pretrain' or 'retrieval', got {layout!r}")
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    online = ALBEFReference(cfg, mlm=layout == "pretrain")
    _perturb(online, 0.05, g)
    momentum = copy.deepcopy(online)
    _perturb(momentum, 0.01, g)
    for model in (online, momentum):
        with torch.no_grad():
            if model.mlm_head is not None:
                model.mlm_head.decoder.weight.copy_(model.bert.embeddings.word_embeddings.weight)
                model.mlm_head.decoder.bias.copy_(model.mlm_head.bias)
            model.temp.fill_(cfg.temp)
    state = online.to_albef_state(layout) | momentum.to_albef_state(layout, momentum=True)
    E, Q = cfg.embed_dim, cfg.queue_size
    state["image_queue"] = F.normalize(torch.randn(E, Q, generator=g), dim=0)  # (E, Q)
    state["text_queue"] = F.normalize(torch.randn(E, Q, generator=g), dim=0)  # (E, Q)
    state["queue_ptr"] = torch.tensor([Q // 2], dtype=torch.long)
    if layout == "retrieval":
        state["idx_queue"] = torch.randint(0, 1000, (1, Q), generator=g)  # (1, Q), as ALBEF stores it
    if not type_embeddings:
        state = {k: v for k, v in state.items() if "token_type_embeddings" not in k}
    return state
