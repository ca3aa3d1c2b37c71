"""FLAVA (Singh et al., CVPR 2022, "A Foundational Language And Vision Alignment Model").

    image ─► image_encoder (pre-norm ViT) ─► tokens ─► CLS ─► image_proj ─► L2 ─┐
       └─ [masked patches] ─► states before the final norm ─► image_to_mm ─┐    ├─► ITC
    text ─► text_encoder (BERT embeddings + pre-norm) ─► CLS ─► text_proj ─► L2 ┘
       └─ [masked tokens] ─► states before the final norm ─► text_to_mm ───┤
                         [CLS_M, image states, text states] ─► multimodal encoder ─► ITM, MMM

The one family that also learns from unpaired data: the objectives' modalities route
them (``image`` batches → MIM over the image tokenizer's codes, ``text`` → MLM, ``pair``
→ contrastive + MMM (masked image and text through the multimodal encoder) + ITM).
Every pass is a named view computed once per step: the unmasked towers (contrastive
features, evaluation), the masked towers when the batch carries masks (``image_mask``
from ``vlp.data.PatchMasker``, ``mlm_input_ids`` from ``vlp.data.MLMMasker``) and, for
pairs, the multimodal pass over the masked inputs, whose CLS is ITM's positive feature
and whose patch / text slices are MMM's. ``contrastive_on: masked`` reads the contrastive
features off the masked towers instead (no unmasked pass in training: FLAVA's cheaper
setting). The image tokenizer is frozen, outside the optimiser.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from vlp.encoders.base import Encoder, EncoderOutput
from vlp.errors import ConfigError
from vlp.eval.classification import ImageClassificationEvaluator
from vlp.eval.evaluator import Evaluator, RetrievalEvaluator
from vlp.models.base import OptimConfig, VLPModule
from vlp.models.outputs import VLPOutput
from vlp.objectives.base import Objective, find_objective
from vlp.objectives.itm import ITM
from vlp.tokenizers.base import ImageTokenizer


@dataclass
class FLAVAOutput(VLPOutput):
    image_embeds: torch.Tensor | None = None  # (B, E) normalised contrastive features
    image_pooled: torch.Tensor | None = None  # (B, Dv) the image tower's CLS (linear probe)
    text_embeds: torch.Tensor | None = None  # (B, E)
    image_tokens: torch.Tensor | None = None  # (B, Li, Dm) image states in the multimodal width
    text_tokens: torch.Tensor | None = None  # (B, Lt, Dm) text states in the multimodal width
    text_mask: torch.Tensor | None = None  # (B, Lt) bool
    fused_tokens: torch.Tensor | None = None  # (B, 1 + Li + Lt, Dm) multimodal encoder output
    fused_cls: torch.Tensor | None = None  # (B, Dm) its CLS (ITM's positive pairs)
    mim_hidden: torch.Tensor | None = None  # (B, N, D) patch states of the masked image
    mlm_hidden: torch.Tensor | None = None  # (B, Lt, D) text states of the masked text
    image_token_ids: torch.Tensor | None = None  # (B, N) the image tokenizer's codes


class FLAVA(VLPModule):
    """FLAVA: image, text and multimodal encoders trained on pairs and unpaired data.

    Args:
        image_encoder: the image tower (``vlp.encoders.ViTEncoder``; a timm ViT as an ablation).
        text_encoder: the text tower (``vlp.encoders.TransformerTextEncoder``; any HF tower).
        fusion: the multimodal encoder (``vlp.encoders.MultimodalEncoder``: pre-norm, final norm;
            flava-full: 768 wide, 6 layers, 12 heads, eps 1e-12).
        objectives: e.g. ``[ITC, CodebookMIM (image), MLM (text), CodebookMIM + MLM (pair,
            named mmm_image / mmm_text), ITM]``.
        embed_dim: contrastive width (768).
        image_tokenizer: the frozen tokenizer whose codes are the MIM / MMM targets
            (``vlp.tokenizers``); batches may also carry ``image_token_ids`` themselves.
        contrastive_on: "unmasked" (the paper) or "masked" (contrastive on the masked pass).
        tokenizer_view: the data view the tokenizer reads (``views: {codebook: {size: 112,
            norm: unit}}`` gives ``image_codebook``); without it the tokenizer reads ``image``.
        rerank_k / rerank_k_t2i: ITM re-ranking of ITC candidates in retrieval evaluation.
        optim / init_from: see :class:`~vlp.models.base.VLPModule`.
    """

    output_type = FLAVAOutput

    def __init__(
        self,
        image_encoder: Encoder,
        text_encoder: Encoder,
        fusion: nn.Module,
        objectives: list[Objective] | None = None,
        *,
        embed_dim: int = 768,
        image_tokenizer: ImageTokenizer | None = None,
        contrastive_on: str = "unmasked",
        tokenizer_view: str | None = "codebook",
        rerank_k: int = 128,
        rerank_k_t2i: int | None = None,
        optim: OptimConfig | None = None,
        init_from: str | None = None,
    ) -> None:
        super().__init__(objectives, optim=optim, init_from=init_from)
        if contrastive_on not in ("unmasked", "masked"):
            raise ConfigError(f"model.contrastive_on must be 'unmasked' or 'masked', got {contrastive_on!r}")
        self.image_encoder, self.text_encoder, self.fusion = image_encoder, text_encoder, fusion
        width = getattr(fusion, "dim", None)
        if width is None:
            raise ConfigError("model.fusion needs a `dim` (use vlp.encoders.MultimodalEncoder)")
        self.image_proj = nn.Linear(image_encoder.dim, embed_dim)
        self.text_proj = nn.Linear(text_encoder.dim, embed_dim)
        self.image_to_mm = nn.Linear(image_encoder.dim, width)
        self.text_to_mm = nn.Linear(text_encoder.dim, width)
        self.fusion_cls = nn.Parameter(torch.zeros(1, 1, width))
        self.mask_token = nn.Parameter(torch.zeros(image_encoder.dim))
        self.image_tokenizer = image_tokenizer  # frozen and kept in eval mode by ImageTokenizer itself
        self.contrastive_on = contrastive_on
        self.tokenizer_view = tokenizer_view
        self.image_norm = "clip"  # the data's norm, set when the model meets the data (check_data)
        self.rerank_k, self.rerank_k_t2i = rerank_k, rerank_k_t2i
        self.setup_objectives()

    def capabilities(self) -> set[str]:
        # codebook: the tokenizer's codes, or batches that carry image_token_ids themselves
        return {"contrastive", "fusion", "masked_lm", "codebook", "text"}

    def feature_dims(self) -> dict[str, int]:
        width = self.fusion.dim
        dims = {
            "itc": self.image_proj.out_features,
            "match": width,
            "mlm": width,
            "mim": width,
            "mlm/text": self.text_encoder.dim,
            "mim/image": self.image_encoder.dim,
            "image_tokens": self.image_encoder.dim,
            "text": self.text_encoder.pooled_dim,
            "vocab": self.word_embeddings().shape[0],
        }
        if self.image_tokenizer is not None:
            dims["image_vocab"] = self.image_tokenizer.num_codes
        return dims

    # -- the towers -----------------------------------------------------------------------
    def num_patches(self) -> int:
        grid = getattr(self.image_encoder, "grid_size", None)
        if grid is None:
            raise ConfigError(f"{type(self.image_encoder).__name__} has no patch grid (grid_size) for MIM")
        return grid[0] * grid[1]

    def encode_image(self, image: torch.Tensor, patch_mask: torch.Tensor | None = None) -> EncoderOutput:
        if patch_mask is None:
            return self.image_encoder(image)
        return self.image_encoder(image, patch_mask=patch_mask, mask_token=self.mask_token)

    def contrastive_image(self, out: EncoderOutput) -> torch.Tensor:
        """The tower's pooled output (FLAVA's towers: the CLS after the final norm) → (B, E)."""
        return F.normalize(self.image_proj(out.pooled), dim=-1)

    def contrastive_text(self, out: EncoderOutput) -> torch.Tensor:
        return F.normalize(self.text_proj(out.pooled), dim=-1)  # (B, E)

    def fuse(self, text_tokens: torch.Tensor, text_mask: torch.Tensor, image_tokens: torch.Tensor) -> torch.Tensor:
        """The multimodal encoder over ``[CLS_M, image, text]`` (inputs already in its width),
        text padding masked out → (B, 1 + Li + Lt, Dm)."""
        B, Li = image_tokens.shape[:2]
        cls = self.fusion_cls.expand(B, -1, -1).to(image_tokens.dtype)
        x = torch.cat([cls, image_tokens, text_tokens], dim=1)  # (B, 1 + Li + Lt, Dm)
        keep = torch.ones(B, 1 + Li, dtype=torch.bool, device=x.device)
        return self.fusion(x, mask=torch.cat([keep, text_mask.bool()], dim=1))

    def match_features(self, text_tokens: torch.Tensor, text_mask: torch.Tensor, image_tokens: torch.Tensor):
        """What ITM classifies: the multimodal CLS (N, Dm) of (text, image) pairs."""
        return self.fuse(text_tokens, text_mask, image_tokens)[:, 0]

    def mlm_hidden(self, input_ids: torch.Tensor, mask: torch.Tensor, image_tokens: torch.Tensor | None):
        """Masked text → its states (B, Lt, D): the text tower's tokens, or with ``image_tokens``
        (multimodal width) the text slice of the multimodal encoder."""
        text = self.text_encoder(input_ids, mask)
        if image_tokens is None:
            return text.tokens
        return self.fuse(self.text_to_mm(text.prenorm), mask, image_tokens)[:, 1 + image_tokens.shape[1] :]

    def word_embeddings(self) -> torch.Tensor:
        """The text tower's input embedding (V, Dt)."""
        model = getattr(self.text_encoder, "model", self.text_encoder)
        return model.get_input_embeddings().weight

    @torch.no_grad()
    def image_token_ids(self, batch: dict) -> torch.Tensor:
        """The MIM targets (B, N): the batch's ``image_token_ids``, else the tokenizer's codes of
        the unmasked image: of the data's view ``image_<tokenizer_view>`` ([0, 1] pixels of the
        same crop) when the batch has it, else of ``image`` (its normalisation undone with
        the data's ``norm``, resized to the tower's patch grid)."""
        if "image_token_ids" in batch:
            return batch["image_token_ids"].flatten(1)
        if self.image_tokenizer is None:
            raise ConfigError("MIM targets need model.image_tokenizer or batch key image_token_ids")
        view = batch.get(f"image_{self.tokenizer_view}") if self.tokenizer_view else None
        if view is not None:
            return self.image_tokenizer(view).flatten(1)
        grid = getattr(self.image_encoder, "grid_size", None)
        return self.image_tokenizer.encode(batch["image"], norm=self.image_norm, grid=grid).flatten(1)

    def check_data(self, datamodule) -> None:
        """The towers and objectives against the data (``VLPModule.check_data``); the data's
        ``norm`` is what the image tokenizer undoes when no view of its own is given."""
        super().check_data(datamodule)
        self.image_norm = getattr(datamodule, "norm", self.image_norm)

    # -- forward: the named views ---------------------------------------------------------
    def reads(self, batch: dict, key: str) -> bool:
        """Whether an objective of ``batch``'s modality reads batch ``key`` (``requires_batch``)."""
        return any(key in o.requires_batch for o in self.objectives_for(batch))

    def forward(self, batch: dict) -> FLAVAOutput:
        """The views the objectives of the batch's modality read, each computed once: masked
        towers where a masked objective (or ITM, or ``contrastive_on: masked``) reads the
        masks, unmasked towers for the contrastive features (always in evaluation), the
        multimodal pass for pairs with MMM or ITM."""
        out = FLAVAOutput()
        has_image, has_text = "image" in batch, "text_ids" in batch
        contrast_masked = self.contrastive_on == "masked" and self.training
        itm = has_image and has_text and self.requested(batch, "fused_cls")
        contrast = not self.training or self.requested(batch, "image_embeds") or self.requested(batch, "text_embeds")
        image = masked_image = text = masked_text = None
        mim = has_image and "image_mask" in batch and self.reads(batch, "image_mask")
        mlm = has_text and "mlm_input_ids" in batch and self.reads(batch, "mlm_input_ids")
        if has_image:
            if "image_mask" in batch and (mim or itm or contrast_masked):
                masked_image = self.encode_image(batch["image"], batch["image_mask"])
            if masked_image is None or (contrast and not contrast_masked):
                image = self.encode_image(batch["image"])
            if mim and self.requested(batch, "image_token_ids"):
                out.image_token_ids = self.image_token_ids(batch)  # (B, N) of the unmasked image
            side = masked_image if masked_image is not None else image
            if image is not None:
                out.image_pooled = image.pooled  # (B, Dv)
            if contrast:
                out.image_embeds = self.contrastive_image(side if contrast_masked else image)  # (B, E)
            out.image_tokens = self.image_to_mm(side.prenorm)  # (B, Li, Dm)
        if has_text:
            out.text_mask = batch["text_mask"].bool()
            if "mlm_input_ids" in batch and (mlm or itm or contrast_masked):
                masked_text = self.text_encoder(batch["mlm_input_ids"], out.text_mask)
            if masked_text is None or (contrast and not contrast_masked):
                text = self.text_encoder(batch["text_ids"], out.text_mask)
            side = masked_text if masked_text is not None else text
            if contrast:
                out.text_embeds = self.contrastive_text(side if contrast_masked else text)  # (B, E)
            out.text_tokens = self.text_to_mm(side.prenorm)  # (B, Lt, Dm)
        if has_image and has_text:
            if itm or mim or mlm:
                out.fused_tokens = self.fuse(out.text_tokens, out.text_mask, out.image_tokens)
                out.fused_cls = out.fused_tokens[:, 0]  # (B, Dm)
                Li = out.image_tokens.shape[1]
                if mim:
                    out.mim_hidden = out.fused_tokens[:, 1 + Li - self.num_patches() : 1 + Li]  # (B, N, Dm)
                if mlm:
                    out.mlm_hidden = out.fused_tokens[:, 1 + Li :]  # (B, Lt, Dm)
        elif mim:
            out.mim_hidden = masked_image.tokens[:, -self.num_patches() :]  # (B, N, Dv)
        elif mlm:
            out.mlm_hidden = masked_text.tokens  # (B, Lt, Dt)
        return out

    # -- evaluation -----------------------------------------------------------------------
    def default_evaluator(self, modality: str) -> Evaluator | None:
        """Image splits: zero-shot classification and a linear probe on the image tower's CLS;
        pair / retrieval splits: ITC retrieval, re-ranked by ITM when the model has one."""
        if modality == "image":
            return ImageClassificationEvaluator()
        if modality not in ("pair", "retrieval"):
            return None
        itm = find_objective(self, ITM)
        return RetrievalEvaluator(itm, k=self.rerank_k, k_t2i=self.rerank_k_t2i, itm_accuracy=itm is not None)
