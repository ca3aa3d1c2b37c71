"""METER (Dou et al., CVPR 2022, "An Empirical Study of Training End-to-End
Vision-and-Language Transformers").

    image ─► image_encoder (CLIP-ViT / ViT / Swin) ─► tokens ─► image_proj + type 1 ─┐
    text  ─► text_encoder (RoBERTa / BERT) ─► tokens ─► text_proj + type 0 ──────────┤
                                  fusion (co-attention or merged attention) ◄────────┘
             text stream ─► text_pooler ─┐
             image stream ─► image_pooler ┴─► concat (2D) ─► ITM head / task heads
             text stream ─► MLM head
             both streams ─► decoder (encoder-decoder variant) ─► generated text

Every choice the paper studies is a constructor argument: the towers, the fusion module
(``vlp.blocks.CoAttentionFusion`` or ``MergedAttentionFusion``), and the objectives
(``MLM``, ``ITM``, optionally ``ITC``; downstream heads ``VQA``, ``NLVR2``, ``VE`` from
``vlp.objectives``); the encoder-decoder variant adds ``decoder`` and casts the objectives
as generation (``DenoisingLM``, ``GenerativeITM``, ``GenerativeVQA``). Learning rates per
part (the paper's 5x for the newly initialised top) are ``optim.lr_mult``; freezing is
``optim.freeze``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from vlp.encoders.base import Encoder
from vlp.errors import ConfigError
from vlp.eval.evaluator import CounterEvaluator, Evaluator
from vlp.models.base import OptimConfig, VLPModule
from vlp.models.outputs import VLPOutput
from vlp.objectives.base import Objective, find_objective
from vlp.objectives.generation import DenoisingLM
from vlp.objectives.itm import ITM
from vlp.objectives.mlm import MLM


@dataclass
class METEROutput(VLPOutput):
    image_tokens: torch.Tensor | None = None  # (B, Li, D) projected + type embedding: fusion input
    text_tokens: torch.Tensor | None = None  # (B, Lt, D) projected + type embedding: fusion input
    text_mask: torch.Tensor | None = None  # (B, Lt) bool
    fused_cls: torch.Tensor | None = None  # (B, 2D) match features of the batch's pairs
    image_embeds: torch.Tensor | None = None  # (B, E) normalised unimodal features (ITC only)
    text_embeds: torch.Tensor | None = None  # (B, E)
    image_embeds_m: torch.Tensor | None = None  # no momentum model: always None
    text_embeds_m: torch.Tensor | None = None


class Pooler(nn.Module):
    """BERT's pooler: dense + tanh on the first token → (B, D)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.dense = nn.Linear(dim, dim)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.dense(tokens[:, 0]))


class METER(VLPModule):
    """Fusion encoder over a vision and a text tower.

    Args:
        image_encoder: vision tower returning all tokens (``OpenCLIPVisionEncoder`` for
            CLIP-ViT, ``TimmVisionEncoder`` for ViT/Swin).
        text_encoder: ``HFTextEncoder`` (RoBERTa, BERT).
        fusion: ``vlp.blocks.CoAttentionFusion`` (paper: 6 layers) or
            ``MergedAttentionFusion`` (paper: 12), of width ``hidden_size``.
        objectives: pretraining (``MLM``, ``ITM``, ``ITC``) or task heads.
        hidden_size: width of the fusion (768).
        num_token_types: modality-type embeddings: 2 (text 0, image 1); NLVR2 uses a third
            for the second image.
        embed_dim: width of the ITC features (only with an ITC objective).
        decoder: the encoder-decoder variant's text decoder (``vlp.blocks.TextDecoder`` of
            context width ``hidden_size``), cross-attending to both fused streams; used by the
            generation objectives (``DenoisingLM``, ``GenerativeITM``, ``GenerativeVQA``).
        optim / init_from: see :class:`~vlp.models.base.VLPModule`.
    """

    output_type = METEROutput

    def __init__(
        self,
        image_encoder: Encoder,
        text_encoder: Encoder,
        fusion: nn.Module,
        objectives: list[Objective] | None = None,
        *,
        hidden_size: int = 768,
        num_token_types: int = 2,
        embed_dim: int = 256,
        decoder: nn.Module | None = None,
        optim: OptimConfig | None = None,
        init_from: str | None = None,
    ) -> None:
        super().__init__(objectives, optim=optim, init_from=init_from)
        self.image_encoder = image_encoder
        self.text_encoder = text_encoder
        self.fusion = fusion
        self.hidden_size = hidden_size
        width = getattr(fusion, "dim", hidden_size)
        if width != hidden_size:
            raise ConfigError(
                f"model.fusion is {width} wide but METER's hidden_size is {hidden_size}: "
                f"set hidden_size: {width} or the fusion's dim: {hidden_size}"
            )
        self.set_decoder(decoder, hidden_size)
        self.image_proj = nn.Linear(image_encoder.dim, hidden_size)  # METER: cross_modal_image_transform
        self.text_proj = nn.Linear(text_encoder.dim, hidden_size)  # METER: cross_modal_text_transform
        self.token_type = nn.Embedding(num_token_types, hidden_size)
        self.text_pooler = self.image_pooler = None
        if decoder is None or any("fused_cls" in o.requires for o in self.objectives.values()):
            self.text_pooler = Pooler(hidden_size)  # (an encoder-decoder model needs them only
            self.image_pooler = Pooler(hidden_size)  # for classification heads)
        self.image_itc_proj = self.text_itc_proj = None
        if "contrastive" in self.provided_by_objectives():  # ITC projections only for an ITC objective
            self.image_itc_proj = nn.Linear(image_encoder.pooled_dim, embed_dim)
            self.text_itc_proj = nn.Linear(text_encoder.pooled_dim, embed_dim)
        self.setup_objectives()  # needs against capabilities; heads sized from the views below

    def capabilities(self) -> set[str]:
        caps = {"masked_lm", "image_types", "text"}
        if self.text_pooler is not None:
            caps.add("fusion")
        if self.image_itc_proj is not None:
            caps.add("contrastive")
        if self.decoder is not None:
            caps.add("decoder")
        return caps

    def capability_hint(self, capability: str) -> str:
        return {
            "contrastive": "METER builds ITC features only for an objective that trains them: add vlp.objectives.ITC",
            "momentum": "METER has no momentum model: use ITC instead of MomentumITC, MLM(distill: false)",
            "decoder": "set model.decoder (vlp.blocks.TextDecoder of context width hidden_size)",
            "fusion": "this encoder-decoder METER has no poolers: its objectives generate text",
        }.get(capability, "")

    def feature_dims(self) -> dict[str, int]:
        dims = {
            "match": 2 * self.hidden_size,  # pooled text and image streams, concatenated
            "mlm": self.hidden_size,
            "fused_image": self.hidden_size,
            "image_tokens": self.image_encoder.dim,
        }
        if self.image_itc_proj is not None:
            dims["itc"] = self.image_itc_proj.out_features
        dims["vocab"] = self.word_embeddings().shape[0]
        dims["text"] = self.text_encoder.pooled_dim
        return dims

    # -- the model ------------------------------------------------------------------------
    def embed_image(self, image: torch.Tensor, token_type: int = 1, **mask) -> tuple[torch.Tensor, torch.Tensor]:
        """→ fusion-ready image tokens (B, Li, D) and the tower's pooled feature (B, Dp).
        ``mask``: ``patch_mask`` / ``mask_token`` passed to the encoder (MIM)."""
        out = self.image_encoder(image, **mask) if mask else self.image_encoder(image)
        tokens = self.image_proj(out.tokens) + self.token_type.weight[token_type]  # (B, Li, D)
        return tokens, out.pooled

    def embed_text(self, input_ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """→ fusion-ready text tokens (B, Lt, D) and the tower's pooled feature (B, Dp)."""
        out = self.text_encoder(input_ids, mask)
        tokens = self.text_proj(out.tokens) + self.token_type.weight[0]  # (B, Lt, D)
        return tokens, out.pooled

    def fuse(self, text_tokens: torch.Tensor, text_mask: torch.Tensor, image_tokens: torch.Tensor):
        """Both streams after the fusion layers: ``FusionOutput`` (text (B, Lt, D), image (B, Li, D))."""
        return self.fusion(text_tokens, image_tokens, text_mask=text_mask.bool())

    def match_features(
        self, text_tokens: torch.Tensor, text_mask: torch.Tensor, image_tokens: torch.Tensor
    ) -> torch.Tensor:
        """What ITM and the task heads classify: pooled text and image streams, concatenated (N, 2D)."""
        if self.text_pooler is None:
            raise ConfigError("this encoder-decoder METER has no poolers: its objectives generate text")
        fused = self.fuse(text_tokens, text_mask, image_tokens)
        return torch.cat([self.text_pooler(fused.text_tokens), self.image_pooler(fused.image_tokens)], dim=-1)

    def decoder_context(
        self, text_tokens: torch.Tensor, text_mask: torch.Tensor, image_tokens: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """What the decoder attends to: both fused streams, concatenated → (N, Lt + Li, D) and
        its mask (N, Lt + Li), True at real tokens."""
        fused = self.fuse(text_tokens, text_mask, image_tokens)
        image_mask = text_mask.new_ones(image_tokens.shape[:2], dtype=torch.bool)
        context = torch.cat([fused.text_tokens, fused.image_tokens], 1)
        return context, torch.cat([text_mask.bool(), image_mask], 1)

    def mlm_hidden(self, input_ids: torch.Tensor, mask: torch.Tensor, image_tokens: torch.Tensor) -> torch.Tensor:
        """Masked text through the text tower and the fusion → text stream (B, Lt, D)."""
        text_tokens, _ = self.embed_text(input_ids, mask)
        return self.fuse(text_tokens, mask, image_tokens).text_tokens

    def word_embeddings(self, momentum: bool = False) -> torch.Tensor:
        """The text tower's input embeddings (V, Dt), for an MLM head tied to them."""
        if momentum:
            raise ConfigError("METER has no momentum model")
        return self.text_encoder.model.get_input_embeddings().weight

    def forward(self, batch: dict) -> METEROutput:
        """The named views: fusion-ready image and text tokens, the fused pairs' match features
        when an objective reads ``fused_cls``, the ITC features when the model has them. An
        image-only or text-only batch gets its side only."""
        out = METEROutput()
        has_image, has_text = "image" in batch, "text_ids" in batch
        if has_image:
            out.image_tokens, image_pooled = self.embed_image(batch["image"])
        if has_text:
            out.text_mask = batch["text_mask"].bool()
            out.text_tokens, text_pooled = self.embed_text(batch["text_ids"], out.text_mask)
        if has_image and has_text and self.requested(batch, "fused_cls"):
            out.fused_cls = self.match_features(out.text_tokens, out.text_mask, out.image_tokens)  # (B, 2D)
        if self.image_itc_proj is not None:
            if has_image:
                out.image_embeds = F.normalize(self.image_itc_proj(image_pooled), dim=-1)
            if has_text:
                out.text_embeds = F.normalize(self.text_itc_proj(text_pooled), dim=-1)
        return out

    def fused_pair_scorer(self, score):
        """Co-attention caches layer 0's pair-independent work; the pooled CLS rows of both
        streams, concatenated, are what ITM scores (merged attention caches nothing)."""
        if self.text_pooler is None or not hasattr(self.fusion, "forward_cached"):
            return None

        def head(fused) -> torch.Tensor:
            return score(torch.cat([self.text_pooler(fused.text_tokens), self.image_pooler(fused.image_tokens)], -1))

        return self.fusion, head

    # -- evaluation (pairs without a task head): the pretraining heads' accuracies -------------
    def default_evaluator(self, modality: str) -> Evaluator | None:
        if modality not in ("pair", "retrieval"):
            return None
        return CounterEvaluator(
            _count_pretraining_hits,
            names=["itm_True", "itm_False", "mlm", "dlm"],
            balanced=("itm",),
            title="METER pretraining objectives (ITM balanced, chance 50)",
        )


@torch.no_grad()
def _count_pretraining_hits(counter: CounterEvaluator, model: METER, output: METEROutput, batch: dict) -> None:
    """ITM decisions on every caption with its own image and with the next image of the batch;
    masked-token hits of the MLM head and of the denoising decoder."""
    image_tokens, text_tokens, mask = output.image_tokens, output.text_tokens, output.text_mask
    # the image of each text: pair batches are aligned; retrieval batches map captions to images
    ids = batch["image_id"].view(-1)  # (Ni,)
    text_ids = batch.get("text_image_id", ids).view(-1)  # (Nt,)
    owner = (text_ids[:, None] == ids[None, :]).int().argmax(1)  # (Nt,) image row of each text
    itm = find_objective(model, ITM)
    if itm is not None and len(ids) > 1:
        other = (owner + 1) % len(ids)
        for label, images in ((True, owner), (False, other)):
            hits = itm.is_match_pairs(model, text_tokens, mask, image_tokens[images]) == label
            counter.add(f"itm_{label}", hits.sum(), hits.numel())
    if "mlm_labels" not in batch:
        return
    mlm = find_objective(model, MLM)
    if mlm is not None:
        labels = batch["mlm_labels"]
        target = labels != -100
        hidden = model.mlm_hidden(batch["mlm_input_ids"], mask, image_tokens[owner])[target]  # (M, D)
        emb = model.word_embeddings() if mlm.head.decoder is None else None
        hits = mlm.head(hidden, emb).argmax(-1) == labels[target]
        counter.add("mlm", hits.sum(), hits.numel())
    dlm = find_objective(model, DenoisingLM)
    if dlm is not None:
        hits, n = dlm.masked_hits(model, {**batch, "text_mask": mask}, image_tokens[owner])
        counter.add("dlm", hits, n)
