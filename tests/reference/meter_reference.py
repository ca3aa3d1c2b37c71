"""A reference METER forward pass, written from zdou0830/METER's code (``meter_module.py``,
``clip_model.py``, ``bert_model.py``, ``heads.py``) with torch and Hugging Face parts only.

No vlp code: this is what the vlp METER must reproduce after a checkpoint conversion. The
module tree has METER's attribute names, so ``state_dict()`` *is* a METER checkpoint's
``state_dict``:

* ``vit_model``: METER's CLIP. Only ``visual`` runs: conv1 (no bias) → class token →
  2-D ``positional_embedding`` → ``ln_pre`` → **layers - 1** pre-norm residual blocks
  (``nn.MultiheadAttention``, QuickGELU MLP ``c_fc``/``c_proj``; METER's ``Transformer``
  builds ``range(layers - 1)`` blocks) → ``ln_post`` on **every** token; no ``proj``. The
  text half keeps only ``positional_embedding`` and ``ln_final``, never used. METER's
  heads are ``width // 64``; the tiny config sets them (``vision_heads``).
* ``text_transformer``: transformers' ``RobertaModel`` (or ``BertModel``) with its pooler
  (``from_pretrained`` adds one); METER runs ``embeddings`` then each ``encoder.layer``
  with the extended mask ``(1 - mask) * -10000`` (transformers 4.6), never the pooler.
* ``cross_modal_{text,image}_layers``: a re-implementation of METER's ``BertCrossLayer``
  (self-attention → cross-attention → feed-forward, each ``LayerNorm(x + sublayer(x))``,
  BERT attention ``softmax(q k^T / sqrt(d) + mask) v``, erf GELU, eps 1e-12); the text
  layer and the image layer of a depth both read the previous depth's outputs.
* heads: ``Pooler`` (dense + tanh on the first token), ``ITMHead`` (``fc``), ``MLMHead``
  (transformers' ``BertPredictionHeadTransform`` + bias-free decoder + ``bias``),
  ``vqa_classifier`` / ``snli_classifier`` (Linear(2h, 2h), LayerNorm, GELU, Linear(2h, C)),
  ``nlvr2_classifier`` (Linear(4h, 2h), ..., Linear(2h, 2)), ``rank_output`` (irtr).

:func:`make_meter_checkpoint` writes random weights in METER's layout as its Lightning
checkpoints hold them (``{"state_dict": ..., "hyper_parameters": {"config": ...}}``).
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import BertConfig, BertModel, RobertaConfig, RobertaModel
from transformers.models.bert.modeling_bert import BertPredictionHeadTransform

TASKS = ("mlm", "itm", "vqa", "nlvr2", "snli", "irtr")


@dataclass(frozen=True)
class TinyMETERConfig:
    """Sizes of a tiny METER (the released one: CLIP ViT-B/16 at 288 px with 11 of its 12
    blocks, RoBERTa-base, 6 co-attention layers of width 768, 12 heads).

    The text tower (48), the vision tower (32) and the fusion (32) have different widths
    where METER's are all 768, so that the two ``cross_modal_*_transform`` are exercised.
    """

    image_size: int = 32
    patch_size: int = 8
    vision_width: int = 32
    clip_layers: int = 3  # METER keeps clip_layers - 1 residual blocks
    vision_heads: int = 2
    clip_context_length: int = 4  # the unused text half of METER's CLIP
    clip_text_width: int = 8
    text_model: str = "roberta"  # "roberta" or "bert"
    vocab_size: int = 60
    text_width: int = 48
    text_layers: int = 1
    text_heads: int = 3
    text_intermediate: int = 64
    max_position_embeddings: int = 20
    hidden_size: int = 32
    num_heads: int = 2
    num_top_layer: int = 2
    mlp_ratio: int = 2
    vqa_labels: int = 5
    tasks: tuple[str, ...] = ("mlm", "itm")

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size

    @property
    def vision_blocks(self) -> int:
        return self.clip_layers - 1

    def text_config(self):
        common = dict(
            vocab_size=self.vocab_size,
            hidden_size=self.text_width,
            num_hidden_layers=self.text_layers,
            num_attention_heads=self.text_heads,
            intermediate_size=self.text_intermediate,
            max_position_embeddings=self.max_position_embeddings,
        )
        if self.text_model == "roberta":  # roberta-base's config.json: eps 1e-5, one token type, pad 1
            config = RobertaConfig(**common, type_vocab_size=1, layer_norm_eps=1e-5, pad_token_id=1)
        else:
            config = BertConfig(**common, type_vocab_size=2, layer_norm_eps=1e-12, pad_token_id=0)
        config._attn_implementation = "eager"
        return config

    def bert_config(self) -> BertConfig:
        """METER's ``bert_config`` of the cross-modal layers and the MLM head: only the
        sizes are given, so ``layer_norm_eps`` is BertConfig's 1e-12 and ``hidden_act`` gelu."""
        return BertConfig(
            vocab_size=self.vocab_size,
            hidden_size=self.hidden_size,
            num_attention_heads=self.num_heads,
            intermediate_size=self.hidden_size * self.mlp_ratio,
        )

    def hparams(self) -> dict:
        """The ``hyper_parameters["config"]`` entries a METER checkpoint carries (sacred config)."""
        return {
            "vit": "ViT-B/16",
            "tokenizer": "roberta-base" if self.text_model == "roberta" else "bert-base-uncased",
            "image_size": self.image_size,
            "patch_size": self.patch_size,
            "hidden_size": self.hidden_size,
            "num_heads": self.num_heads,
            "num_top_layer": self.num_top_layer,
            "num_layers": 6,
            "mlp_ratio": self.mlp_ratio,
            "vocab_size": self.vocab_size,
            "max_text_len": 16,
            "input_image_embed_size": self.vision_width,
            "input_text_embed_size": self.text_width,
            "vqav2_label_size": self.vqa_labels,
            "drop_rate": 0.1,
            "loss_names": {t: int(t in self.tasks) for t in TASKS},
            "datasets": ["coco", "vg", "sbu", "gcc"],
        }


# -- METER's CLIP (clip_model.py) ----------------------------------------------------------
class QuickGELU(nn.Module):
    def forward(self, x: Tensor) -> Tensor:
        return x * torch.sigmoid(1.702 * x)


class ResidualAttentionBlock(nn.Module):
    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(width, heads)
        self.ln_1 = nn.LayerNorm(width)  # eps 1e-5 (METER casts to float32 around it)
        self.mlp = nn.Sequential()
        self.mlp.add_module("c_fc", nn.Linear(width, 4 * width))
        self.mlp.add_module("gelu", QuickGELU())
        self.mlp.add_module("c_proj", nn.Linear(4 * width, width))
        self.ln_2 = nn.LayerNorm(width)

    def forward(self, x: Tensor) -> Tensor:  # (L, B, W)
        h = self.ln_1(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        return x + self.mlp(self.ln_2(x))


class CLIPVisualTransformer(nn.Module):
    def __init__(self, cfg: TinyMETERConfig) -> None:
        super().__init__()
        W = cfg.vision_width
        self.conv1 = nn.Conv2d(3, W, kernel_size=cfg.patch_size, stride=cfg.patch_size, bias=False)
        self.class_embedding = nn.Parameter(W**-0.5 * torch.randn(W))
        self.positional_embedding = nn.Parameter(W**-0.5 * torch.randn(cfg.grid**2 + 1, W))
        self.ln_pre = nn.LayerNorm(W)
        self.transformer = nn.Module()
        self.transformer.resblocks = nn.Sequential(
            *[ResidualAttentionBlock(W, cfg.vision_heads) for _ in range(cfg.clip_layers - 1)]
        )
        self.ln_post = nn.LayerNorm(W)

    def forward(self, image: Tensor) -> Tensor:
        x = self.conv1(image).flatten(2).transpose(1, 2)  # (B, N, W)
        cls = self.class_embedding + torch.zeros(x.shape[0], 1, x.shape[-1], dtype=x.dtype)
        x = torch.cat([cls, x], dim=1) + self.positional_embedding  # (B, 1 + N, W)
        x = self.ln_pre(x).permute(1, 0, 2)  # (1 + N, B, W)
        x = self.transformer.resblocks(x).permute(1, 0, 2)  # (B, 1 + N, W)
        return self.ln_post(x)  # every token


class CLIP(nn.Module):
    def __init__(self, cfg: TinyMETERConfig) -> None:
        super().__init__()
        self.visual = CLIPVisualTransformer(cfg)
        self.positional_embedding = nn.Parameter(0.01 * torch.randn(cfg.clip_context_length, cfg.clip_text_width))
        self.ln_final = nn.LayerNorm(cfg.clip_text_width)

    def forward(self, image: Tensor) -> Tensor:
        return self.visual(image)


# -- METER's BertCrossLayer (bert_model.py) ---------------------------------------------------
class BertSelfAttention(nn.Module):
    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.head_dim = config.hidden_size // self.num_heads
        self.query = nn.Linear(config.hidden_size, config.hidden_size)
        self.key = nn.Linear(config.hidden_size, config.hidden_size)
        self.value = nn.Linear(config.hidden_size, config.hidden_size)

    def split(self, x: Tensor) -> Tensor:
        return x.view(*x.shape[:-1], self.num_heads, self.head_dim).permute(0, 2, 1, 3)  # (B, H, L, d)

    def forward(self, x: Tensor, mask: Tensor, context: Tensor | None = None, context_mask: Tensor | None = None):
        if context is not None:  # cross-attention: keys, values and mask come from the other stream
            source, mask = context, context_mask
        else:
            source = x
        q, k, v = self.split(self.query(x)), self.split(self.key(source)), self.split(self.value(source))
        scores = q @ k.transpose(-1, -2) / math.sqrt(self.head_dim) + mask  # (B, H, L, S)
        out = torch.softmax(scores, dim=-1) @ v  # (B, H, L, d)
        return out.permute(0, 2, 1, 3).reshape(*x.shape[:-1], -1)


class BertSelfOutput(nn.Module):
    def __init__(self, config: BertConfig, in_dim: int | None = None) -> None:
        super().__init__()
        self.dense = nn.Linear(in_dim or config.hidden_size, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, h: Tensor, residual: Tensor) -> Tensor:
        return self.LayerNorm(self.dense(h) + residual)


class BertAttention(nn.Module):
    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        self.self = BertSelfAttention(config)
        self.output = BertSelfOutput(config)

    def forward(self, x, mask, context=None, context_mask=None) -> Tensor:
        return self.output(self.self(x, mask, context, context_mask), x)


class BertIntermediate(nn.Module):
    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.intermediate_size)

    def forward(self, x: Tensor) -> Tensor:
        return F.gelu(self.dense(x))  # ACT2FN["gelu"]: the erf GELU


class BertCrossLayer(nn.Module):
    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        self.attention = BertAttention(config)
        self.crossattention = BertAttention(config)
        self.intermediate = BertIntermediate(config)
        self.output = BertSelfOutput(config, in_dim=config.intermediate_size)

    def forward(self, x: Tensor, context: Tensor, mask: Tensor, context_mask: Tensor) -> Tensor:
        h = self.attention(x, mask)
        h = self.crossattention(h, mask, context, context_mask)
        return self.output(self.intermediate(h), h)


# -- heads (heads.py) ------------------------------------------------------------------------
class Pooler(nn.Module):
    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.dense = nn.Linear(hidden, hidden)

    def forward(self, x: Tensor) -> Tensor:
        return torch.tanh(self.dense(x[:, 0]))


class ITMHead(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.fc = nn.Linear(dim, 2)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(x)


class MLMHead(nn.Module):
    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        self.transform = BertPredictionHeadTransform(config)
        self.decoder = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.bias = nn.Parameter(torch.zeros(config.vocab_size))

    def forward(self, x: Tensor) -> Tensor:
        return self.decoder(self.transform(x)) + self.bias


def task_classifier(in_dim: int, hidden: int, classes: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(in_dim, hidden), nn.LayerNorm(hidden), nn.GELU(), nn.Linear(hidden, classes))


def extended_mask(mask: Tensor) -> Tensor:
    """transformers 4.6's ``get_extended_attention_mask`` for an encoder: (B, L) → (B, 1, 1, L)."""
    return (1.0 - mask[:, None, None, :].float()) * -10000.0


class METERReference(nn.Module):
    """METER's ``METERTransformerSS`` (CLIP-ViT towers only), at any size."""

    def __init__(self, cfg: TinyMETERConfig) -> None:
        super().__init__()
        self.cfg = cfg
        hs = cfg.hidden_size
        bert = cfg.bert_config()
        self.cross_modal_text_transform = nn.Linear(cfg.text_width, hs)
        self.cross_modal_image_transform = nn.Linear(cfg.vision_width, hs)
        self.token_type_embeddings = nn.Embedding(3 if "nlvr2" in cfg.tasks else 2, hs)
        self.vit_model = CLIP(cfg)
        model_cls = RobertaModel if cfg.text_model == "roberta" else BertModel
        self.text_transformer = model_cls(cfg.text_config(), add_pooling_layer=True)
        self.cross_modal_image_layers = nn.ModuleList([BertCrossLayer(bert) for _ in range(cfg.num_top_layer)])
        self.cross_modal_text_layers = nn.ModuleList([BertCrossLayer(bert) for _ in range(cfg.num_top_layer)])
        self.cross_modal_image_pooler = Pooler(hs)
        self.cross_modal_text_pooler = Pooler(hs)
        if "mlm" in cfg.tasks:
            self.mlm_score = MLMHead(bert)
        if "itm" in cfg.tasks or "irtr" in cfg.tasks:
            self.itm_score = ITMHead(2 * hs)
        if "vqa" in cfg.tasks:
            self.vqa_classifier = task_classifier(2 * hs, 2 * hs, cfg.vqa_labels)
        if "nlvr2" in cfg.tasks:
            self.nlvr2_classifier = task_classifier(4 * hs, 2 * hs, 2)
        if "snli" in cfg.tasks:
            self.snli_classifier = task_classifier(2 * hs, 2 * hs, 3)
        if "irtr" in cfg.tasks:
            # METER: nn.Linear(hs, 1) whose weight is then replaced by itm_score.fc's row 1: (1, 2 hs)
            self.rank_output = nn.Linear(2 * hs, 1)

    # -- METERTransformerSS.infer ----------------------------------------------------------------
    def infer(self, image: Tensor, ids: Tensor, mask: Tensor, image_token_type_idx: int = 1) -> dict[str, Tensor]:
        text = self.text_transformer.embeddings(input_ids=ids)  # (B, L, Dt)
        ext_text = extended_mask(mask)  # (B, 1, 1, L)
        for layer in self.text_transformer.encoder.layer:
            text = layer(text, ext_text)
            text = text[0] if isinstance(text, tuple) else text  # transformers < 5 returns a tuple
        text = self.cross_modal_text_transform(text)  # (B, L, hs)
        img = self.cross_modal_image_transform(self.vit_model(image))  # (B, Li, hs)
        image_mask = torch.ones(img.shape[:2], dtype=torch.long)
        ext_image = extended_mask(image_mask)
        text = text + self.token_type_embeddings(torch.zeros_like(mask))
        img = img + self.token_type_embeddings(torch.full_like(image_mask, image_token_type_idx))
        x, y = text, img
        for text_layer, image_layer in zip(self.cross_modal_text_layers, self.cross_modal_image_layers, strict=True):
            x, y = text_layer(x, y, ext_text, ext_image), image_layer(y, x, ext_image, ext_text)
        cls_feats = torch.cat([self.cross_modal_text_pooler(x), self.cross_modal_image_pooler(y)], dim=-1)
        return {"text_feats": x, "image_feats": y, "cls_feats": cls_feats}

    # -- the objectives' logits -----------------------------------------------------------------
    def itm_logits(self, image, ids, mask) -> Tensor:
        return self.itm_score(self.infer(image, ids, mask)["cls_feats"])  # (B, 2)

    def mlm_logits(self, image, masked_ids, mask) -> Tensor:
        return self.mlm_score(self.infer(image, masked_ids, mask)["text_feats"])  # (B, L, V)

    def vqa_logits(self, image, ids, mask) -> Tensor:
        return self.vqa_classifier(self.infer(image, ids, mask)["cls_feats"])  # (B, A)

    def snli_logits(self, image, ids, mask) -> Tensor:
        return self.snli_classifier(self.infer(image, ids, mask)["cls_feats"])  # (B, 3)

    def nlvr2_logits(self, image, image2, ids, mask) -> Tensor:
        a = self.infer(image, ids, mask, image_token_type_idx=1)["cls_feats"]
        b = self.infer(image2, ids, mask, image_token_type_idx=2)["cls_feats"]
        return self.nlvr2_classifier(torch.cat([a, b], dim=-1))  # (B, 2)

    def rank_scores(self, image, ids, mask) -> Tensor:
        return self.rank_output(self.infer(image, ids, mask)["cls_feats"])[:, 0]  # (B,)

    # -- METER's checkpoint layout ----------------------------------------------------------------
    def meter_state(self) -> dict[str, Tensor]:
        """``state_dict()`` plus the ``position_ids`` buffer transformers 4.6 saved."""
        state = {k: v.detach().clone() for k, v in self.state_dict().items()}
        positions = self.cfg.max_position_embeddings
        state["text_transformer.embeddings.position_ids"] = torch.arange(positions)[None]  # (1, P)
        return state

    @classmethod
    def from_meter_state(cls, state: dict[str, Tensor], cfg: TinyMETERConfig) -> METERReference:
        """Build strictly from a METER state dict (every key used but transformers buffers)."""
        ref = cls(cfg)
        state = {k: v for k, v in state.items() if not k.endswith(("position_ids", "token_type_ids"))}
        ref.load_state_dict(state, strict=True)
        return ref.eval()


def _perturb(module: nn.Module, scale: float, generator: torch.Generator) -> None:
    """Noise on every parameter: no LayerNorm stays (1, 0), no bias stays 0."""
    with torch.no_grad():
        for p in module.parameters():
            p.add_(scale * torch.randn(p.shape, generator=generator))


def make_meter_reference(cfg: TinyMETERConfig = TinyMETERConfig(), seed: int = 0) -> METERReference:
    torch.manual_seed(seed)
    ref = METERReference(cfg)
    _perturb(ref, 0.05, torch.Generator().manual_seed(seed))
    return ref.eval()


def make_meter_checkpoint(cfg: TinyMETERConfig = TinyMETERConfig(), seed: int = 0, *, bare: bool = False) -> dict:
    """Random weights in METER's layout, as a PyTorch Lightning checkpoint of METER holds them
    (``state_dict`` + ``hyper_parameters.config``; ``bare``: the state dict alone)."""
    state = make_meter_reference(cfg, seed).meter_state()
    if bare:
        return state
    return {
        "epoch": 9,
        "global_step": 100000,
        "pytorch-lightning_version": "1.3.2",
        "state_dict": state,
        "hyper_parameters": {"config": copy.deepcopy(cfg.hparams())},
    }
