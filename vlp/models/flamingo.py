"""Flamingo-lite (Alayrac et al., NeurIPS 2022; OpenFlamingo's open re-implementation).

    images ─► vision_encoder (frozen, no_grad) ─► patch tokens ─► PerceiverResampler ─► latents
                                                                                          │
    <image>text<|endofchunk|><image>text... ─► frozen causal LM, a GATED XATTN-DENSE ◄────┘
                                               before every N-th decoder layer ─► next-token logits

The language model is any Hugging Face decoder (GPT-2, Llama, GPT-NeoX, OPT...). Its
decoder layers are wrapped in place (:class:`FlamingoLayer`: OpenFlamingo's layout, so its
checkpoints map key for key); its class and code are untouched. The media each layer
cross-attends to is handed over for the duration of one forward through a context variable
(:func:`media_scope`), never stored on a module. Only the perceiver, the cross-attention
layers and the embedding rows of ``<image>`` / ``<|endofchunk|>`` train (input and output
rows, :attr:`Flamingo.media_embeddings` / :attr:`Flamingo.media_head`); checkpoints hold just
those, and the frozen towers come from the recipe.

Generation (:meth:`Flamingo.generate`) encodes each image once and decodes greedily or by
beam search over the LM's KV cache; the cached path equals teacher forcing.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import inspect
import logging
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from vlp.blocks.gated_xattn import GatedCrossAttentionDense
from vlp.blocks.perceiver import PerceiverResampler
from vlp.data.interleaved import END_OF_CHUNK, IGNORE, MEDIA_TOKEN
from vlp.encoders.text import HFCausalLM, resize_token_embeddings
from vlp.errors import CheckpointError, ConfigError
from vlp.models.base import OptimConfig, VLPModule
from vlp.models.outputs import VLPOutput
from vlp.objectives.base import Objective
from vlp.utils.checkpoint import load_state_dict

log = logging.getLogger("vlp")


@dataclass
class FlamingoOutput(VLPOutput):
    hidden: torch.Tensor | None = None  # (B, L, D) the LM's final hidden states
    media: torch.Tensor | None = None  # (B, T, n, Dv) the resampled images (None: text only)


# -- the media a wrapped layer cross-attends to, scoped to one forward ------------------------
@dataclass
class _Media:
    media: torch.Tensor  # (B, T, n, Dv)
    text_time: torch.Tensor  # (B, L) 1-based index of the latest image at or before each token, 0: none


_MEDIA: contextvars.ContextVar[_Media | None] = contextvars.ContextVar("vlp_flamingo_media", default=None)


@contextlib.contextmanager
def media_scope(media: torch.Tensor | None, text_time: torch.Tensor | None) -> Iterator[None]:
    """Within the block, every :class:`FlamingoLayer` cross-attends to ``media`` (B, T, n, Dv)
    with ``text_time`` (B, L); ``media=None``: no cross-attention (text-only input)."""
    token = _MEDIA.set(None if media is None else _Media(media, text_time))
    try:
        yield
    finally:
        _MEDIA.reset(token)


class FlamingoLayer(nn.Module):
    """A decoder layer with an optional gated cross-attention block before it.

    ``gated_cross_attn_layer`` / ``decoder_layer`` are OpenFlamingo's names. Attributes the
    LM reads off its layers (``attention_type``...) are the decoder layer's.
    ``checkpointing``: recompute the pair in the backward pass (activation checkpointing;
    the media go in as explicit inputs, so the recomputation sees them)."""

    def __init__(self, decoder_layer: nn.Module, gated_cross_attn_layer: GatedCrossAttentionDense | None) -> None:
        super().__init__()
        self.gated_cross_attn_layer = gated_cross_attn_layer
        self.decoder_layer = decoder_layer
        self.checkpointing = False

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self._modules["decoder_layer"], name)

    def _run(self, hidden: torch.Tensor, media, text_time, *args, **kwargs):
        if self.gated_cross_attn_layer is not None and media is not None:
            hidden = self.gated_cross_attn_layer(hidden, media, text_time=text_time)
        return self.decoder_layer(hidden, *args, **kwargs)

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs):
        scope = _MEDIA.get()
        media, text_time = (None, None) if scope is None else (scope.media, scope.text_time)
        if self.checkpointing and self.training and torch.is_grad_enabled():
            return checkpoint(self._run, hidden_states, media, text_time, *args, use_reentrant=False, **kwargs)
        return self._run(hidden_states, media, text_time, *args, **kwargs)


class Flamingo(VLPModule):
    """Flamingo-lite: a frozen vision tower and a frozen causal LM bridged by a perceiver
    resampler and gated cross-attention.

    Args:
        vision_encoder: the image tower (``vlp.encoders.OpenCLIPVisionEncoder``,
            ``TimmVisionEncoder``, ``ViTEncoder``); frozen and run under ``no_grad``.
        lang_model: the causal LM (``vlp.encoders.HFCausalLM``: hub name, folder, GGUF or config).
        cross_attn_every_n_layers: a gated cross-attention block before decoder layer ``i``
            when ``(i + 1) % N == 0`` (OpenFlamingo's rule; 1: every layer).
        vision_features: "prenorm" (the tower's states before its final norm, as OpenFlamingo
            trained on open_clip tokens) or "tokens" (after it).
        patch_tokens_only: drop the tower's prefix tokens (CLS) and keep the patch tokens.
        projection: "resampler" (a ``PerceiverResampler``: ``num_latents`` tokens per image)
            or "linear" (a linear map of every patch token; the ablation).
        perceiver: ``PerceiverResampler`` arguments (``depth``, ``num_latents``,
            ``num_heads``, ``dim_head``, ``ff_mult``, ``max_num_media``, ``max_num_frames``);
            OpenFlamingo: 6 / 64 / 8 / 64.
        cross_attn: ``GatedCrossAttentionDense`` arguments (``num_heads``, ``dim_head``, ``ff_mult``).
        only_attend_immediate_media: each text token sees only the latest image before it
            (True, Flamingo's choice) or every image before it.
        freeze_gates: keep every tanh gate at 0 (the model is then the LM alone: the
            "frozen LM" baseline of few-shot tables).
        train_lm: train the language model too (pretraining a small LM on text batches
            with the same module; the Flamingo recipes keep it frozen).
        gradient_checkpointing: recompute every wrapped LM layer in the backward pass.
        vision_weights: a checkpoint whose tensors under ``vision_prefix`` initialise the vision
            tower (e.g. a vlp CLIP run: ``image_encoder.``); ``weights_only`` / safetensors.
        lm_weights: likewise for the language model (a vlp run that trained it with
            ``train_lm: true``: ``lang_model.``), loaded before the layers are wrapped.
    """

    output_type = FlamingoOutput

    def __init__(
        self,
        vision_encoder: nn.Module,
        lang_model: HFCausalLM,
        objectives: list[Objective] | None = None,
        *,
        cross_attn_every_n_layers: int = 1,
        vision_features: str = "prenorm",
        patch_tokens_only: bool = True,
        projection: str = "resampler",
        perceiver: dict | None = None,
        cross_attn: dict | None = None,
        only_attend_immediate_media: bool = True,
        freeze_gates: bool = False,
        train_lm: bool = False,
        gradient_checkpointing: bool = False,
        vision_weights: str | None = None,
        vision_prefix: str = "image_encoder.",
        lm_weights: str | None = None,
        lm_prefix: str = "lang_model.",
        optim: OptimConfig | None = None,
        init_from: str | None = None,
    ) -> None:
        super().__init__(objectives, optim=optim, init_from=init_from)
        if vision_features not in ("prenorm", "tokens"):
            raise ConfigError(f"model.vision_features must be 'prenorm' or 'tokens', got {vision_features!r}")
        if projection not in ("resampler", "linear"):
            raise ConfigError(f"model.projection must be 'resampler' or 'linear', got {projection!r}")
        if not isinstance(lang_model, HFCausalLM):
            raise ConfigError(f"model.lang_model must be a vlp.encoders.HFCausalLM, got {type(lang_model).__name__}")
        self.vision_encoder = vision_encoder
        self.lang_model = lang_model
        self.vision_features, self.patch_tokens_only = vision_features, patch_tokens_only
        self.train_lm, self.freeze_gates = train_lm, freeze_gates
        if vision_weights:
            _load_part(vision_encoder, vision_weights, vision_prefix, "vision_encoder")
        if lm_weights:
            _load_part(lang_model, lm_weights, lm_prefix, "lang_model", unwrap=True)
        vision_dim = int(getattr(vision_encoder, "dim", 0))
        if vision_dim <= 0:
            raise ConfigError(f"model.vision_encoder ({type(vision_encoder).__name__}) has no `dim` (token width)")
        self.vision_dim, self.lm_dim = vision_dim, lang_model.dim
        self.projection = projection
        if projection == "resampler":
            self.perceiver = PerceiverResampler(vision_dim, **_known(perceiver, PerceiverResampler, "model.perceiver"))
        else:
            if perceiver:
                raise ConfigError("model.perceiver is set but model.projection is 'linear'")
            self.perceiver = nn.Linear(vision_dim, vision_dim)
        every = int(cross_attn_every_n_layers)
        layers = lang_model.decoder_layers()
        if not 1 <= every <= len(layers):
            raise ConfigError(
                f"model.cross_attn_every_n_layers must be in 1..{len(layers)} (the LM's layers), got {every}"
            )
        self.cross_attn_every_n_layers = every
        xargs = _known(cross_attn, GatedCrossAttentionDense, "model.cross_attn")
        for i, layer in enumerate(layers):
            block = None
            if (i + 1) % every == 0:
                block = GatedCrossAttentionDense(
                    self.lm_dim, vision_dim, only_attend_immediate_media=only_attend_immediate_media, **xargs
                )
            layers[i] = FlamingoLayer(layer, block)
        self.set_gradient_checkpointing(gradient_checkpointing)
        # <image> / <|endofchunk|>: their own trainable input and output rows (set_media_tokens)
        self.media_embeddings = nn.Parameter(torch.zeros(2, self.lm_dim))
        self.media_head = nn.Parameter(torch.zeros(2, self.lm_dim))
        self.register_buffer("media_token_ids", torch.tensor([-1, -1]), persistent=False)
        self.vision_encoder.requires_grad_(False)
        self._set_trainable()
        self.setup_objectives()

    def _set_trainable(self) -> None:
        """Inside the LM only the cross-attention blocks train (their gates not with
        ``freeze_gates``), and the LM's own tensors with ``train_lm``; rerun after the LM's
        embedding grew (its new tensors)."""
        for name, p in self.lang_model.named_parameters():
            if ".gated_cross_attn_layer." in name:
                p.requires_grad_(not (self.freeze_gates and name.endswith("_gate")))
            else:
                p.requires_grad_(self.train_lm)

    # -- the protocol ----------------------------------------------------------------------
    def capabilities(self) -> set[str]:
        return {"causal_lm"}

    def feature_dims(self) -> dict[str, int]:
        return {"lm": self.lm_dim, "vision": self.vision_dim, "vocab": self.lang_model.vocab_size}

    def set_gradient_checkpointing(self, enable: bool = True) -> None:
        for layer in self.lang_model.decoder_layers():
            layer.checkpointing = enable

    def train(self, mode: bool = True) -> Flamingo:
        super().train(mode)
        self.vision_encoder.eval()  # frozen towers: no dropout, fixed norms
        if not self.train_lm:
            for layer in self.lang_model.decoder_layers():
                layer.decoder_layer.eval()
            embeddings = self.lang_model.model.get_input_embeddings()
            embeddings.eval()
        return self

    # -- special tokens --------------------------------------------------------------------
    def check_data(self, datamodule) -> None:
        tokenizer = getattr(datamodule, "tokenizer", None)
        if tokenizer is not None:
            self.set_tokenizer(tokenizer)
        for objective in self.objectives.values():
            objective.check_data(self, tokenizer, getattr(datamodule, "image_size", None))
        image = self.vision_encoder
        image_size = getattr(datamodule, "image_size", None)
        if image_size is not None and hasattr(image, "image_size_error"):
            reason = image.image_size_error(image_size)
            if reason:
                raise ConfigError(f"data.image_size is {image_size} but model.vision_encoder {reason}")

    def set_tokenizer(self, tokenizer) -> None:
        """Grow the LM's embedding to ``tokenizer``'s size (its special tokens) and take the ids
        of ``<image>`` / ``<|endofchunk|>``, whose trainable rows start as the LM's rows."""
        self._tokenizer = tokenizer
        rows = self.lang_model.vocab_size
        added = len(getattr(tokenizer, "special_tokens", None) or ())
        if rows < tokenizer.vocab_size <= rows + added:
            resize_token_embeddings(self.lang_model, tokenizer.vocab_size)
            log.info("model.lang_model: embedding grown from %d to %d rows", rows, tokenizer.vocab_size)
        elif tokenizer.vocab_size > rows:
            raise ConfigError(
                f"data.tokenizer has {tokenizer.vocab_size} tokens but model.lang_model's embedding has {rows} rows: "
                "use the LM's own tokenizer"
            )
        self._set_trainable()
        try:
            ids = [tokenizer.token_id(MEDIA_TOKEN), tokenizer.token_id(END_OF_CHUNK)]
        except (ConfigError, NotImplementedError):
            ids = None
        if ids is None:
            if not self.train_lm:
                raise ConfigError(
                    f"Flamingo needs the special tokens {MEDIA_TOKEN!r} and {END_OF_CHUNK!r} in data.tokenizer: "
                    f"set special_tokens: [{MEDIA_TOKEN!r}, {END_OF_CHUNK!r}] in its init_args"
                )
            return
        changed = self.media_token_ids.tolist() != ids
        self.media_token_ids = torch.tensor(ids, device=self.media_embeddings.device)
        if changed and not self._media_rows_set:
            with torch.no_grad():
                idx = self.media_token_ids
                self.media_embeddings.copy_(self.lang_model.model.get_input_embeddings().weight[idx])
                self.media_head.copy_(self.lang_model.model.get_output_embeddings().weight[idx])
            self._media_rows_set = True

    _media_rows_set = False

    @property
    def has_media_tokens(self) -> bool:
        return bool(self.media_token_ids[0] >= 0)

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        """Frozen tensors a checkpoint leaves out (it keeps only what trains) come from the
        model as the recipe built it; a missing trained tensor is still missing."""
        self._media_rows_set = self._media_rows_set or "media_embeddings" in state_dict
        if any(k.startswith("perceiver.") for k in state_dict):  # a Flamingo state, maybe without frozen parts
            keep = self.trainable_keys()
            state_dict = {**{k: v for k, v in self.state_dict().items() if k not in keep}, **state_dict}
        return super().load_state_dict(state_dict, strict=strict, assign=assign)

    # -- prediction: vlp predict with data.prompts -----------------------------------------
    def predict_step(self, batch: dict, batch_idx: int = 0) -> list[dict]:
        """Generate the continuation of every prompt of a ``vlp.data.prompts`` batch."""
        records = list(batch.get("errors", []))
        if batch.get("keys"):
            settings = batch.get("generation", {})
            tokens = self.generate(
                batch["text_ids"],
                batch["text_mask"],
                batch["images"],
                batch["images_mask"],
                max_new_tokens=int(settings.get("max_new_tokens", 20)),
                num_beams=int(settings.get("num_beams", 1)),
                length_penalty=float(settings.get("length_penalty", 1.0)),
            )
            texts = self.decode(tokens)
            records += [{"key": k, "prompt": p, "text": t} for k, p, t in zip(batch["keys"], batch["prompts"], texts)]
        self._predictions.extend(records)
        return records

    def decode(self, tokens: list[list[int]]) -> list[str]:
        """Token lists → stripped strings (the data's tokenizer, set by ``check_data``)."""
        if self._tokenizer is None:
            raise ConfigError("Flamingo.decode needs the data's tokenizer (set_tokenizer)")
        return [self._tokenizer.decode(torch.tensor([x], dtype=torch.long))[0].strip() for x in tokens]

    def on_predict_epoch_start(self) -> None:
        self._predictions = []

    def on_predict_epoch_end(self) -> None:
        """Write every rank's generations to ``data.prompts.out`` (rank zero)."""
        from vlp.data.prompts import write_predictions
        from vlp.utils.distributed import gather_objects

        dm = self._datamodule()
        spec = getattr(dm, "prompts", None)
        if spec is None:
            return
        records = [r for part in gather_objects(self._predictions) for r in part]
        if self.trainer.is_global_zero:
            path = write_predictions(spec.out, records)
            self.report(f"{len(records)} generations: {path}")

    _predictions: list = []
    _tokenizer = None

    # -- the forward pass ------------------------------------------------------------------
    @torch.no_grad()
    def encode_vision(self, images: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) → (N, v, Dv) the frozen tower's (patch) tokens."""
        out = self.vision_encoder(images)
        tokens = out.prenorm if self.vision_features == "prenorm" else out.tokens
        if self.patch_tokens_only:
            tokens = tokens[:, int(getattr(self.vision_encoder, "num_prefix_tokens", 0)) :]
        return tokens

    def encode_media(self, images: torch.Tensor, images_mask: torch.Tensor | None = None) -> torch.Tensor:
        """(B, M, 3, H, W) images (``images_mask`` (B, M): the real ones) → (B, M, n, Dv) media
        tokens; padded slots stay zero and are never attended to."""
        B, M = images.shape[:2]
        if images_mask is None:
            images_mask = torch.ones(B, M, dtype=torch.bool, device=images.device)
        real = images[images_mask]  # (N, 3, H, W)
        tokens = self.encode_vision(real)  # (N, v, Dv)
        latents = self.perceiver(tokens)  # (N, n, Dv): resampled, or (N, v, Dv): linear
        media = latents.new_zeros(B, M, *latents.shape[1:])  # (B, M, n, Dv)
        media[images_mask] = latents
        return media

    def input_embeddings(self, input_ids: torch.Tensor) -> torch.Tensor:
        """(B, L) → (B, L, D): the LM's frozen rows, the trainable media rows for its tokens."""
        embeds = self.lang_model.model.get_input_embeddings()(input_ids)  # (B, L, D)
        if not self.has_media_tokens:
            return embeds
        which = (input_ids[..., None] == self.media_token_ids).to(embeds.dtype)  # (B, L, 2)
        own = which @ self.media_embeddings.to(embeds.dtype)  # (B, L, D)
        is_media = which.sum(-1, keepdim=True)  # (B, L, 1)
        return embeds * (1 - is_media) + own

    def lm_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """(..., D) → (..., V) next-token logits; the media tokens' columns from their own rows."""
        logits = self.lang_model.logits(hidden)  # (..., V)
        if self.has_media_tokens:
            own = hidden @ self.media_head.to(hidden.dtype).T  # (..., 2)
            logits = logits.index_copy(-1, self.media_token_ids, own.to(logits.dtype))
        return logits

    def run_lm(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None,
        media: torch.Tensor | None,
        text_time: torch.Tensor | None,
        *,
        position_ids: torch.Tensor | None = None,
        past_key_values=None,
        use_cache: bool = False,
    ):
        """The LM's backbone over ``input_ids`` with ``media`` cross-attended (→ its output, with
        the KV cache as ``kv_cache``)."""
        base = self.lang_model.model.base_model
        cache_arg = _cache_argument(type(base))  # "cache" (transformers >= 5.2x) or "past_key_values"
        with media_scope(media, text_time):
            out = base(
                inputs_embeds=self.input_embeddings(input_ids),
                attention_mask=attention_mask,
                position_ids=position_ids,
                use_cache=use_cache,
                **({cache_arg: past_key_values} if past_key_values is not None else {}),
            )
        out.kv_cache = getattr(out, "cache", None) or getattr(out, "past_key_values", None)
        return out

    def forward(self, batch: dict) -> FlamingoOutput:
        """Interleaved or pair batches (``images`` (B, M, 3, H, W), ``media_mask``) or text-only
        batches (``text_ids`` alone: the plain LM)."""
        if "text_ids" not in batch:  # an image-only batch (few-shot classification queries)
            return FlamingoOutput()
        if not self.training and batch.get("modality") in ("retrieval", "vqa", "image"):
            # evaluation queries: the few-shot evaluator builds its own prompts from them
            return FlamingoOutput()
        ids, mask = batch["text_ids"], batch["text_mask"]
        media, text_time = None, None
        if "images" in batch and "media_mask" in batch:
            media = self.encode_media(batch["images"], batch.get("images_mask"))
            text_time = batch["media_mask"].long().cumsum(dim=1)  # (B, L)
        out = self.run_lm(ids, mask, media, text_time)
        return FlamingoOutput(hidden=out.last_hidden_state, media=media)

    def default_evaluator(self, modality: str):
        """Pair / retrieval, VQA and image splits: few-shot in-context evaluation (captioning,
        VQA, classification), configured by the source's ``evaluation: {fewshot: ...}``."""
        from vlp.eval.fewshot import MODALITIES, FewShotEvaluator

        if any(modality in mods for mods in MODALITIES.values()):
            return FewShotEvaluator(modality)
        return None

    # -- scoring and generation ------------------------------------------------------------
    def token_logprobs(self, batch: dict) -> torch.Tensor:
        """(B, L): log p(``lm_labels[:, t]`` | tokens ≤ t, images), 0 where the label is -100
        (summed over a continuation's labels: its log-likelihood, for ranking class names)."""
        labels = batch["lm_labels"]
        hidden = self(batch).hidden  # (B, L, D)
        keep = labels != IGNORE
        out = hidden.new_zeros(labels.shape, dtype=torch.float32)
        if keep.any():
            logp = self.lm_logits(hidden[keep]).float().log_softmax(-1)  # (K, V)
            out[keep] = logp.gather(-1, labels[keep][:, None]).squeeze(-1)
        return out

    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        images: torch.Tensor | None = None,
        images_mask: torch.Tensor | None = None,
        *,
        max_new_tokens: int = 20,
        num_beams: int = 1,
        length_penalty: float = 1.0,
        stop_ids: list[int] | None = None,
        return_scores: bool = False,
    ):
        """Continue each prompt (``input_ids`` (B, L) with ``<image>`` tokens, right- or
        left-padded) → a list of B token lists (the new tokens, without the stop token).

        Each image is resampled once; every new token reuses the latents and the LM's KV cache.
        A new token attends to the latest image of its prompt. ``<image>`` is never generated;
        decoding stops at ``stop_ids`` (default: ``<|endofchunk|>`` and the LM's eos)."""
        from vlp.models.generation import beam_search, greedy_search

        was_training = self.training
        self.eval()
        try:
            ids, mask = _left_pad(input_ids, attention_mask.bool())
            media = None
            if images is not None:
                media = self.encode_media(images, images_mask)  # (B, M, n, Dv), once
            stops = set(stop_ids if stop_ids is not None else self.default_stop_ids())
            banned = [int(self.media_token_ids[0])] if self.has_media_tokens else []
            step = _Stepper(self, media, banned)
            if num_beams <= 1:
                tokens, scores = greedy_search(step, ids, mask, max_new_tokens=max_new_tokens, stop_ids=stops)
            else:
                tokens, scores = beam_search(
                    step,
                    ids,
                    mask,
                    num_beams=num_beams,
                    max_new_tokens=max_new_tokens,
                    stop_ids=stops,
                    length_penalty=length_penalty,
                )
            return (tokens, scores) if return_scores else tokens
        finally:
            self.train(was_training)

    def default_stop_ids(self) -> list[int]:
        stops = []
        if self.has_media_tokens:
            stops.append(int(self.media_token_ids[1]))
        eos = getattr(self.lang_model.config, "eos_token_id", None)
        stops += [eos] if isinstance(eos, int) else list(eos or [])
        return stops

    # -- checkpoints: only what trains -----------------------------------------------------
    def trainable_keys(self) -> set[str]:
        """State-dict keys of the parameters that train (what a checkpoint keeps)."""
        return {n for n, p in self.named_parameters(remove_duplicate=False) if p.requires_grad}  # tied names too

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        keep = self.trainable_keys()
        state = checkpoint.get("state_dict", {})
        frozen = [k for k in state if k not in keep and not k.startswith("objectives.")]
        for k in frozen:
            del state[k]
        checkpoint["vlp_frozen"] = {"dropped_tensors": len(frozen), "from": "the recipe (vision_encoder, lang_model)"}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        """Frozen tensors are not in the checkpoint: they come from the recipe as built."""
        state = checkpoint.get("state_dict")
        if state is None or "vlp_frozen" not in checkpoint:
            return
        own = self.state_dict()
        lacking = sorted(k for k in self.trainable_keys() if k not in state)
        if lacking:
            raise CheckpointError(
                f"the Flamingo checkpoint lacks {len(lacking)} trained tensors (e.g. {lacking[:3]}): "
                "it was written by another configuration (cross_attn_every_n_layers, projection, perceiver)"
            )
        for k, v in own.items():
            state.setdefault(k, v)


class _Stepper:
    """One decoding step of a Flamingo model over its KV cache (used by the searches)."""

    def __init__(self, model: Flamingo, media: torch.Tensor | None, banned: list[int]) -> None:
        self.model, self.media, self.banned = model, media, banned
        self.media_id = int(model.media_token_ids[0]) if model.has_media_tokens else None

    def start(self, ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, dict]:
        """Run the (left-padded) prompts; → (last-position log-probs (B, V), state)."""
        text_time = None
        if self.media is not None and self.media_id is not None:
            text_time = ((ids == self.media_id) & mask).long().cumsum(dim=1)
        positions = (mask.long().cumsum(dim=1) - 1).clamp(min=0)
        out = self.model.run_lm(
            ids, mask.long(), self.media, text_time, position_ids=positions, past_key_values=None, use_cache=True
        )
        state = {
            "cache": out.kv_cache,
            "mask": mask.long(),
            "position": positions[:, -1],
            "time": text_time[:, -1] if text_time is not None else None,
            "media": self.media,
        }
        return self._logprobs(out.last_hidden_state[:, -1]), state

    def step(self, token: torch.Tensor, state: dict) -> tuple[torch.Tensor, dict]:
        """Feed one new token per row (B,); → (log-probs (B, V), state)."""
        mask = torch.cat([state["mask"], state["mask"].new_ones(len(token), 1)], dim=1)
        position = state["position"] + 1
        time = state["time"]
        if time is not None and self.media_id is not None:
            time = time + (token == self.media_id).long()
        out = self.model.run_lm(
            token[:, None],
            mask,
            state["media"],
            None if time is None else time[:, None],
            position_ids=position[:, None],
            past_key_values=state["cache"],
            use_cache=True,
        )
        state = {**state, "cache": out.kv_cache, "mask": mask, "position": position, "time": time}
        return self._logprobs(out.last_hidden_state[:, -1]), state

    @staticmethod
    def select(state: dict, index: torch.Tensor) -> dict:
        """Keep / repeat rows ``index`` of every per-row state (beams)."""
        cache = state["cache"]
        cache.reorder_cache(index)
        return {
            **state,
            "cache": cache,
            "mask": state["mask"][index],
            "position": state["position"][index],
            "time": None if state["time"] is None else state["time"][index],
            "media": None if state["media"] is None else state["media"][index],
        }

    def _logprobs(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = self.model.lm_logits(hidden).float()  # (B, V)
        if self.banned:
            logits[:, self.banned] = float("-inf")
        return F.log_softmax(logits, dim=-1)


@functools.cache
def _cache_argument(model_cls: type) -> str:
    return "cache" if "cache" in inspect.signature(model_cls.forward).parameters else "past_key_values"


def _left_pad(ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Right- or left-padded rows → left-padded (every row's real tokens end it, in order)."""
    order = torch.argsort(mask.long(), dim=1, stable=True)  # padding first, then the real tokens
    return ids.gather(1, order), mask.gather(1, order)


def _known(args: dict | None, cls: type, where: str) -> dict:
    """``args`` checked against ``cls``'s keyword arguments (a ConfigError names unknown keys)."""
    args = dict(args or {})
    params = set(inspect.signature(cls.__init__).parameters) - {"self", "dim", "media_dim"}
    unknown = sorted(set(args) - params)
    if unknown:
        raise ConfigError(f"{where}: unknown keys {unknown} (known: {sorted(params)})")
    return args


def _load_part(module: nn.Module, path: str, prefix: str, where: str, *, unwrap: bool = False) -> None:
    """Load ``module``'s weights from the tensors under ``prefix`` in checkpoint ``path``
    (``unwrap``: keys of a wrapped LM, ``...layers.i.decoder_layer.x``, map to ``...layers.i.x``;
    its cross-attention blocks are skipped)."""
    state = load_state_dict(path)
    part = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
    if unwrap:
        part = {k.replace(".decoder_layer.", "."): v for k, v in part.items() if ".gated_cross_attn_layer." not in k}
    if not part:
        raise CheckpointError(
            f"model.{where}: {path} has no tensor under {prefix!r} (e.g. {list(state)[:3]}); set the prefix"
        )
    own = module.state_dict(keep_vars=True)
    loaded = {own[k].data_ptr() for k in part if k in own}
    missing = sorted(k for k in set(own) - set(part) if own[k].data_ptr() not in loaded)  # tied names: fine
    unexpected = sorted(set(part) - set(own))
    if missing or unexpected:
        raise CheckpointError(
            f"model.{where}: {path} under {prefix!r} does not fit: missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    module.load_state_dict(part, strict=False)
    log.info("model.%s: %d tensors from %s", where, len(part), path)
