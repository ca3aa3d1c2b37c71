"""ALBEF: Align before Fuse (Li et al., NeurIPS 2021).

    image ─► image_encoder (ViT) ─► tokens ──────────────┬─► fusion (BERT layers with
    text  ─► text_encoder (first BERT layers) ─► tokens ─┴─    cross-attention) ─► ITM / MLM
    CLS features ─► image_proj / text_proj ─► ITC (momentum queue + distillation)

Momentum (EMA) copies of the encoders, fusion, projections and the MLM head give the
queue features and the distillation targets. They are updated right after each optimiser
step (``after_optimizer_step``, once per step under gradient accumulation), never in
forward; with the EMA taken right after step t-1 this equals the paper's update at the
start of step t. Callbacks run after it, so a checkpoint written at the end of a step
holds the updated copies and queues. Evaluation: retrieval over the whole split, ITC
similarities first, then ITM re-ranking of the top-k candidates
(:class:`~vlp.eval.evaluator.RetrievalEvaluator`, shared with the Retrieval head); image
splits: zero-shot classification with the ITC features and a linear probe on the ViT's CLS
token (:mod:`vlp.eval.classification`).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from vlp.encoders.base import Encoder
from vlp.errors import ConfigError
from vlp.eval.classification import ImageClassificationEvaluator
from vlp.eval.evaluator import Evaluator, RetrievalEvaluator
from vlp.models.base import OptimConfig, VLPModule
from vlp.models.outputs import VLPOutput
from vlp.objectives.base import Objective, find_objective
from vlp.objectives.itm import ITM


@dataclass
class ALBEFOutput(VLPOutput):
    image_tokens: torch.Tensor | None = None  # (B, Li, Dv) ViT tokens, CLS first
    text_tokens: torch.Tensor | None = None  # (B, Lt, Dt) unimodal text tokens
    text_mask: torch.Tensor | None = None  # (B, Lt) bool
    image_embeds: torch.Tensor | None = None  # (B, E) normalised
    text_embeds: torch.Tensor | None = None  # (B, E) normalised
    fused_cls: torch.Tensor | None = None  # (B, Dt) fused CLS of the matched pairs
    image_tokens_m: torch.Tensor | None = None  # (B, Li, Dv) momentum
    image_embeds_m: torch.Tensor | None = None  # (B, E) momentum
    text_embeds_m: torch.Tensor | None = None  # (B, E) momentum


class ALBEF(VLPModule):
    """Align-before-fuse vision-language model.

    Args:
        image_encoder: ViT (``vlp.encoders.TimmVisionEncoder``); its token sequence is used.
        text_encoder: the unimodal BERT layers (``HFTextEncoder`` with ``num_hidden_layers``
            set to the fusion layer, 6 for BERT-base).
        fusion: the multimodal layers (``vlp.encoders.BertFusion``), cross-attending to
            image tokens.
        objectives: e.g. ``[MomentumITC, ITM, MLM]`` from ``vlp.objectives``.
        embed_dim: ITC feature width (256).
        momentum: EMA coefficient of the momentum copies (0.995).
        alpha: distillation weight (0.4), ramped linearly from 0 over ``alpha_ramp_steps``
            (default: the first epoch, as in the paper).
        use_momentum: build the momentum copies (needed by MomentumITC and distillation).
        rerank_k: candidates per query re-ranked by ITM at evaluation (paper: 128/256).
        rerank_k_t2i: candidates per caption (text→image) when it should differ from ``rerank_k``.
        decoder: an answer decoder (``vlp.blocks.TextDecoder`` with ``context_dim`` the text
            width) over the fused text tokens, as ALBEF's VQA; used by ``GenerativeVQA``.
        optim / init_from: see :class:`~vlp.models.base.VLPModule`.
    """

    output_type = ALBEFOutput

    def __init__(
        self,
        image_encoder: Encoder,
        text_encoder: Encoder,
        fusion: nn.Module,
        objectives: list[Objective] | None = None,
        *,
        embed_dim: int = 256,
        momentum: float = 0.995,
        alpha: float = 0.4,
        alpha_ramp_steps: int | None = None,
        use_momentum: bool = True,
        rerank_k: int = 128,
        rerank_k_t2i: int | None = None,
        decoder: nn.Module | None = None,
        optim: OptimConfig | None = None,
        init_from: str | None = None,
    ) -> None:
        super().__init__(objectives, optim=optim, init_from=init_from)
        self.image_encoder = image_encoder
        self.text_encoder = text_encoder
        self.fusion = fusion
        width, context = getattr(fusion, "dim", text_encoder.dim), getattr(fusion, "context_dim", image_encoder.dim)
        if width != text_encoder.dim:
            raise ConfigError(
                f"model.fusion is {width} wide but model.text_encoder's tokens are {text_encoder.dim} wide: "
                f"set the fusion's dim: {text_encoder.dim}"
            )
        if context != image_encoder.dim:
            raise ConfigError(
                f"model.fusion cross-attends to width {context} but model.image_encoder's tokens are "
                f"{image_encoder.dim} wide: set the fusion's context_dim: {image_encoder.dim}"
            )
        self.set_decoder(decoder, text_encoder.dim)
        self.image_proj = nn.Linear(image_encoder.dim, embed_dim)
        self.text_proj = nn.Linear(text_encoder.dim, embed_dim)
        self.momentum = momentum
        self.alpha = alpha
        self.alpha_ramp_steps = alpha_ramp_steps
        self.rerank_k, self.rerank_k_t2i = rerank_k, rerank_k_t2i
        self.use_momentum = use_momentum
        self._online = ["image_encoder", "text_encoder", "fusion", "image_proj", "text_proj"]
        if use_momentum:
            for name in self._online:
                twin = copy.deepcopy(getattr(self, name))
                twin.requires_grad_(False)
                setattr(self, name + "_m", twin)
        self.setup_objectives()  # needs against capabilities; heads sized from the views below

    def capabilities(self) -> set[str]:
        caps = {"contrastive", "fusion", "masked_lm", "image_types", "text"}
        if self.use_momentum:
            caps.add("momentum")
        if self.decoder is not None:
            caps.add("decoder")
        return caps

    def capability_hint(self, capability: str) -> str:
        return {
            "momentum": "set use_momentum: true",
            "decoder": "set model.decoder (vlp.blocks.TextDecoder with context_dim the text width)",
        }.get(capability, "")

    def feature_dims(self) -> dict[str, int]:
        width = self.text_encoder.dim  # the fusion continues the text tower at its width
        return {
            "match": width,
            "mlm": width,
            "itc": self.image_proj.out_features,
            "image_tokens": self.image_encoder.dim,
            "vocab": self.word_embeddings().shape[0],
            "text": self.text_encoder.pooled_dim,
        }

    # -- the model ------------------------------------------------------------------------
    def _suffix(self, momentum: bool) -> str:
        if momentum and not self.use_momentum:
            raise ConfigError("ALBEF was built with use_momentum: false")
        return "_m" if momentum else ""

    def encode_image(self, image: torch.Tensor, momentum: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """→ ViT tokens (B, Li, Dv) and the normalised ITC feature (B, E)."""
        s = self._suffix(momentum)
        tokens = getattr(self, "image_encoder" + s)(image).tokens  # (B, Li, Dv)
        return tokens, F.normalize(getattr(self, "image_proj" + s)(tokens[:, 0]), dim=-1)

    def embed_image(self, image: torch.Tensor, token_type: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
        """The task heads' view of the image side (NLVR2's right image): ViT tokens (B, Li, Dv)
        and the ITC feature. ALBEF has no image token types; ``token_type`` is accepted and
        ignored (NLVR2's concatenation keeps the pair ordered)."""
        return self.encode_image(image)

    def encode_text(
        self, input_ids: torch.Tensor, mask: torch.Tensor, momentum: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """→ unimodal text tokens (B, Lt, Dt) and the normalised ITC feature (B, E) of the
        encoder's pooled output (its ``pooling``: the CLS token for ALBEF's BERT)."""
        s = self._suffix(momentum)
        out = getattr(self, "text_encoder" + s)(input_ids, mask)  # tokens (B, Lt, Dt), pooled (B, Dt)
        return out.tokens, F.normalize(getattr(self, "text_proj" + s)(out.pooled), dim=-1)

    def fuse(
        self,
        text_tokens: torch.Tensor,
        text_mask: torch.Tensor,
        image_tokens: torch.Tensor,
        momentum: bool = False,
    ) -> torch.Tensor:
        """Multimodal layers: text tokens cross-attending to image tokens → (B, Lt, Dt)."""
        fusion = getattr(self, "fusion" + self._suffix(momentum))
        return fusion(text_tokens, mask=text_mask.bool(), context=image_tokens)

    def match_features(self, text_tokens: torch.Tensor, text_mask: torch.Tensor, image_tokens: torch.Tensor):
        """What ITM classifies: the fused CLS token (N, Dt) of each (text, image) pair."""
        return self.fuse(text_tokens, text_mask, image_tokens)[:, 0]

    def decoder_context(
        self, text_tokens: torch.Tensor, text_mask: torch.Tensor, image_tokens: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """What an answer decoder attends to (ALBEF's VQA): the fused text tokens (N, Lt, Dt)
        and the text mask."""
        return self.fuse(text_tokens, text_mask, image_tokens), text_mask.bool()

    def mlm_hidden(
        self, input_ids: torch.Tensor, mask: torch.Tensor, image_tokens: torch.Tensor, momentum: bool = False
    ) -> torch.Tensor:
        """Masked text through the text and fusion layers → (B, Lt, Dt)."""
        tokens = getattr(self, "text_encoder" + self._suffix(momentum))(input_ids, mask).tokens
        return self.fuse(tokens, mask, image_tokens, momentum=momentum)

    def word_embeddings(self, momentum: bool = False) -> torch.Tensor:
        """The text encoder's input embedding matrix (V, Dt), tied to the MLM decoder."""
        encoder = getattr(self, "text_encoder" + self._suffix(momentum))
        return encoder.model.get_input_embeddings().weight

    @property
    def distill_alpha(self) -> float:
        """alpha, ramped linearly over the first epoch (or ``alpha_ramp_steps``)."""
        trainer = self._trainer
        if trainer is None:
            return self.alpha
        ramp = self.alpha_ramp_steps
        if ramp is None:
            if trainer.current_epoch > 0:
                return self.alpha
            ramp = trainer.num_training_batches
        if not ramp or ramp == float("inf"):
            return self.alpha
        return self.alpha * min(1.0, self.global_step / ramp)

    def forward(self, batch: dict) -> ALBEFOutput:
        """The named views of the batch, each computed once: image (tokens, ITC feature), text
        (tokens, ITC feature), the fused pairs when an objective reads ``fused_cls``, and in
        training the momentum views. An image-only or text-only batch gets its side only."""
        out = ALBEFOutput()
        has_image, has_text = "image" in batch, "text_ids" in batch
        if has_image:
            out.image_tokens, out.image_embeds = self.encode_image(batch["image"])
        if has_text:
            out.text_mask = batch["text_mask"].bool()
            out.text_tokens, out.text_embeds = self.encode_text(batch["text_ids"], out.text_mask)
        if has_image and has_text and self.requested(batch, "fused_cls"):
            out.fused_cls = self.match_features(out.text_tokens, out.text_mask, out.image_tokens)  # (B, Dt)
        if self.use_momentum and self.training:
            with torch.no_grad():
                if has_image:
                    out.image_tokens_m, out.image_embeds_m = self.encode_image(batch["image"], momentum=True)
                if has_text:
                    _, out.text_embeds_m = self.encode_text(batch["text_ids"], out.text_mask, momentum=True)
        return out

    # -- momentum and queues: after the optimiser step ----------------------------------------
    def momentum_pairs(self) -> list[tuple[nn.Module, nn.Module]]:
        own = [(getattr(self, n), getattr(self, n + "_m")) for n in self._online] if self.use_momentum else []
        return own + super().momentum_pairs()

    def after_optimizer_step(self, *, skipped: bool = False) -> None:
        """The EMA of the momentum copies (not after a skipped non-finite step: nothing is kept
        of it), then the objectives' queues."""
        if not skipped:
            self.momentum_update(self.momentum)
        super().after_optimizer_step(skipped=skipped)

    # -- evaluation: ITC over the split, then ITM re-ranking ------------------------------------
    def default_evaluator(self, modality: str) -> Evaluator | None:
        if modality == "image":
            return ImageClassificationEvaluator()
        if modality not in ("pair", "retrieval"):
            return None
        return RetrievalEvaluator(
            find_objective(self, ITM), k=self.rerank_k, k_t2i=self.rerank_k_t2i, itm_accuracy=True
        )

    def probe_features(self, output: ALBEFOutput, batch: dict) -> torch.Tensor:
        """The linear probe reads the ViT's CLS token before the ITC projection (B, Dv)."""
        return output.image_tokens[:, 0]

    def fused_pair_scorer(self, score):
        """BertFusion caches each image's cross-attention keys/values and each caption's first
        self-attention; the fused CLS is what ITM scores."""
        return (self.fusion, score) if hasattr(self.fusion, "context_cache") else None
