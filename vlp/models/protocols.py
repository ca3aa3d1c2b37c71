"""What a model provides to its objectives: the written protocol.

A family lists its capabilities (``VLPModule.capabilities()``); every objective lists the
ones it needs (``Objective.needs()``, each with the reason). ``VLPModule`` checks them when
the model is built, so a mismatch is one sentence before step 1 rather than a traceback at
step 1. Each capability is a small :class:`typing.Protocol`: a family that claims one must
have its methods (checked too).

============== ======================================================================
capability     what the model provides
============== ======================================================================
contrastive    normalised ``image_embeds`` / ``text_embeds`` (B, E) in its output
fusion         ``match_features(text_tokens, text_mask, image_tokens) → (N, D)``: fused
               features of (text, image) pairs (ITM, VQA, VE, NLVR2, Retrieval)
masked_lm      ``mlm_hidden(input_ids, mask, image_tokens) → (B, L, D)`` and
               ``word_embeddings() → (V, D)`` (MLM)
momentum       EMA copies of its towers: ``image_embeds_m`` / ``text_embeds_m`` /
               ``image_tokens_m`` in its output, ``mlm_hidden(..., momentum=True)``
decoder        ``decoder`` (a text decoder) and ``decoder_context(text_tokens, text_mask,
               image_tokens) → (context (N, L, D), mask)`` (generation objectives)
image_types    ``embed_image(image, token_type) → (tokens, pooled)``: an image embedded
               with a chosen token type (NLVR2's second image)
codebook       ``image_token_ids(batch) → (B, N)``: a frozen image tokenizer's codes of the
               image (MIM / MMM targets), and ``mim_hidden`` / ``image_token_ids`` in its
               output for batches with an ``image_mask`` (FLAVA)
text           ``text_features(input_ids, mask, token_types) → (B, D)``: the text tower's
               pooled features of a sentence or a pair (text tasks: GLUE); width
               ``feature_dims()["text"]``
causal_lm      ``lm_logits(hidden) → (..., V)``: next-token logits of the ``hidden`` states
               in its output (Flamingo; the causal LM loss)
============== ======================================================================
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch


@runtime_checkable
class ContrastiveModel(Protocol):
    def feature_dims(self) -> dict[str, int]: ...


@runtime_checkable
class FusionModel(Protocol):
    def match_features(
        self, text_tokens: torch.Tensor, text_mask: torch.Tensor, image_tokens: torch.Tensor
    ) -> torch.Tensor: ...


@runtime_checkable
class MaskedLMModel(Protocol):
    def mlm_hidden(self, input_ids: torch.Tensor, mask: torch.Tensor, image_tokens: torch.Tensor) -> torch.Tensor: ...

    def word_embeddings(self) -> torch.Tensor: ...


@runtime_checkable
class MomentumModel(Protocol):
    def momentum_pairs(self) -> list: ...


@runtime_checkable
class GenerativeModel(Protocol):
    def decoder_context(
        self, text_tokens: torch.Tensor, text_mask: torch.Tensor, image_tokens: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]: ...


@runtime_checkable
class ImageTypesModel(Protocol):
    def embed_image(self, image: torch.Tensor, token_type: int = 1) -> tuple[torch.Tensor, torch.Tensor]: ...


@runtime_checkable
class CodebookModel(Protocol):
    def image_token_ids(self, batch: dict) -> torch.Tensor: ...


@runtime_checkable
class TextModel(Protocol):
    def text_features(
        self, input_ids: torch.Tensor, mask: torch.Tensor, token_types: torch.Tensor | None = None
    ) -> torch.Tensor: ...


@runtime_checkable
class CausalLMModel(Protocol):
    def lm_logits(self, hidden: torch.Tensor) -> torch.Tensor: ...


#: capability → (its protocol, what it means, shown in errors)
CAPABILITIES: dict[str, tuple[type, str]] = {
    "contrastive": (ContrastiveModel, "normalised image_embeds / text_embeds (ITC features)"),
    "fusion": (FusionModel, "match_features(text_tokens, text_mask, image_tokens): fused pair features"),
    "masked_lm": (MaskedLMModel, "mlm_hidden(input_ids, mask, image_tokens) and word_embeddings()"),
    "momentum": (MomentumModel, "EMA (momentum) copies of its towers"),
    "decoder": (GenerativeModel, "a text decoder and decoder_context(...)"),
    "image_types": (ImageTypesModel, "embed_image(image, token_type)"),
    "codebook": (CodebookModel, "a frozen image tokenizer whose codes are MIM targets (image_token_ids)"),
    "text": (TextModel, "text_features(input_ids, mask, token_types): pooled text-tower features"),
    "causal_lm": (CausalLMModel, "lm_logits(hidden): next-token logits of a causal LM"),
}
