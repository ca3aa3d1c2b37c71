"""ALBEF: Align before Fuse (Li et al., NeurIPS 2021).

    image ─► image_encoder (ViT) ─► tokens ──────────────┬─► fusion (BERT layers with
    text  ─► text_encoder (first BERT layers) ─► tokens ─┴─    cross-attention) ─► ITM / MLM
    CLS features ─► image_proj / text_proj ─► ITC (momentum queue + distillation)

Momentum (EMA) copies of the encoders, fusion, projections and the MLM head give the
queue features and the distillation targets. They are updated right after the optimiser
step (``optimizer_step``), never in forward; with the EMA taken right after step t-1 this
equals the paper's update at the start of step t. Callbacks run after it, so a checkpoint
written at the end of a step holds the updated copies and queues. Evaluation: retrieval over the whole
split, ITC similarities first, then ITM re-ranking of the top-k candidates.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from vlp.encoders.base import Encoder
from vlp.errors import ConfigError
from vlp.eval.retrieval import chance_recall
from vlp.models.base import OptimConfig, VLPModule
from vlp.models.outputs import VLPOutput
from vlp.objectives.base import Objective, find_objective


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
        self.rerank_k = rerank_k
        self.use_momentum = use_momentum
        needs = [o.name for o in self.objectives if getattr(o, "needs_momentum", False)]
        if needs and not use_momentum:
            raise ConfigError(f"objectives {needs} need the momentum model; set use_momentum: true")
        self._online = ["image_encoder", "text_encoder", "fusion", "image_proj", "text_proj"]
        if use_momentum:
            for name in self._online:
                twin = copy.deepcopy(getattr(self, name))
                twin.requires_grad_(False)
                setattr(self, name + "_m", twin)
        self.check_objectives()  # head widths against the views below, ITM's ITC
        self._eval: dict[str, list] = {}

    def feature_dims(self) -> dict[str, int]:
        width = self.text_encoder.dim  # the fusion continues the text tower at its width
        return {
            "match": width,
            "mlm": width,
            "itc": self.image_proj.out_features,
            "image_tokens": self.image_encoder.dim,
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
        mask = batch["text_mask"].bool()
        image_tokens, image_embeds = self.encode_image(batch["image"])
        text_tokens, text_embeds = self.encode_text(batch["text_ids"], mask)
        out = ALBEFOutput(
            image_tokens=image_tokens,
            text_tokens=text_tokens,
            text_mask=mask,
            image_embeds=image_embeds,
            text_embeds=text_embeds,
        )
        if any("fused_cls" in o.requires for o in self.objectives_for(batch)):
            out.fused_cls = self.match_features(text_tokens, mask, image_tokens)  # (B, Dt)
        if self.use_momentum and self.training:
            with torch.no_grad():
                out.image_tokens_m, out.image_embeds_m = self.encode_image(batch["image"], momentum=True)
                _, out.text_embeds_m = self.encode_text(batch["text_ids"], mask, momentum=True)
        return out

    # -- momentum and queues: after the optimiser step ----------------------------------------
    def momentum_pairs(self) -> list[tuple[nn.Module, nn.Module]]:
        pairs = [(getattr(self, n), getattr(self, n + "_m")) for n in self._online] if self.use_momentum else []
        for o in self.objectives:
            if hasattr(o, "momentum_pairs"):
                pairs += o.momentum_pairs()
        return pairs

    @torch.no_grad()
    def momentum_update(self) -> None:
        m = self.momentum
        online, twins = [], []
        for a, b in self.momentum_pairs():
            online += list(a.parameters())
            twins += list(b.parameters())
        if twins:
            torch._foreach_mul_(twins, m)
            torch._foreach_add_(twins, online, alpha=1 - m)

    def optimizer_step(self, *args, **kwargs) -> None:
        super().optimizer_step(*args, **kwargs)
        self._stepped = True
        if self.step_skipped:  # a non-finite step (optim.max_nonfinite_steps): nothing is kept of it
            self.after_optimizer_step(enqueue=False, ema=False)
        else:
            self.after_optimizer_step()

    def on_train_batch_end(self, outputs, batch, batch_idx: int) -> None:
        """A micro-batch of an accumulated step (no optimiser step after it): its momentum
        features join the queues now, as ALBEF queues every batch; the EMA waits for the step.
        No checkpoint is written between micro-batches, so resuming stays exact."""
        if not getattr(self, "_stepped", False):
            self.after_optimizer_step(enqueue=not self.step_skipped, ema=False)
        self._stepped = False

    def after_optimizer_step(self, enqueue: bool = True, ema: bool = True) -> None:
        """The EMA update of the momentum copies, then the objectives' queues (``enqueue``:
        the last batch's momentum features join them; else they are dropped)."""
        if ema:
            self.momentum_update()
        for o in self.objectives:
            if hasattr(o, "after_step"):
                o.after_step(enqueue=enqueue)

    # -- evaluation: ITC over the split, then ITM re-ranking ------------------------------------
    def _eval_step(self, stage: str, batch: dict, idx: int) -> None:
        if batch["modality"] not in ("pair", "retrieval"):
            raise ConfigError(f"ALBEF evaluates pair or retrieval data, got a {batch['modality']!r} source")
        image_tokens, image_embeds = self.encode_image(batch["image"])
        mask = batch["text_mask"].bool()
        text_tokens, text_embeds = self.encode_text(batch["text_ids"], mask)
        store = self._eval.setdefault(f"{stage}_{idx}", [])
        store.append(
            (image_tokens, image_embeds, batch["image_id"], text_tokens, mask, text_embeds, batch["text_image_id"])
        )

    def _itm_accuracy(self, itm, sims, index, image_tokens, text_tokens, text_mask, chunk: int = 256) -> float:
        """Balanced ITM accuracy (%): every caption with its own image (should match) and every
        image with its highest-ITC wrong caption (should not), decided by the ITM head."""
        Ni, Nt = sims.shape
        own = torch.zeros(Ni, Nt, dtype=torch.bool, device=sims.device)
        own[index, torch.arange(Nt, device=sims.device)] = True  # (Ni, Nt)
        hardest = sims.masked_fill(own, float("-inf")).argmax(1)  # (Ni,)
        pairs = {
            True: (index, torch.arange(Nt, device=sims.device)),  # positives: (image, text)
            False: (torch.arange(Ni, device=sims.device), hardest),  # hardest negatives
        }
        accs = []
        for label, (i, t) in pairs.items():
            hits = []
            for s in range(0, len(i), chunk):
                ii, tt = i[s : s + chunk], t[s : s + chunk]
                hits.append(itm.is_match_pairs(self, text_tokens[tt], text_mask[tt], image_tokens[ii]) == label)
            accs.append(torch.cat(hits).float().mean().item())
        return 100 * sum(accs) / 2

    @torch.no_grad()
    def _eval_epoch_end(self, stage: str) -> None:
        from vlp.eval.retrieval import format_rerank_table, gather_pair_tokens, rerank_topk, retrieval_scores

        names = self._source_names(stage)
        itm = find_objective(self, "itm")
        for key in sorted(k for k in self._eval if k.startswith(stage + "_")):
            idx = int(key.rsplit("_", 1)[1])
            image_tokens, image_embeds, image_ids, text_tokens, text_mask, text_embeds, index = gather_pair_tokens(
                self._eval.pop(key)
            )  # index: (Nt,) image row of each text
            sims = image_embeds @ text_embeds.T  # (Ni, Nt)
            reranked = None
            if itm is not None:

                def score(
                    i: torch.Tensor,
                    t: torch.Tensor,
                    text_tokens=text_tokens,
                    text_mask=text_mask,
                    image_tokens=image_tokens,
                ) -> torch.Tensor:
                    return itm.score_pairs(self, text_tokens[t], text_mask[t], image_tokens[i])  # (n,)

                reranked = rerank_topk(sims, self.rerank_k, score)
            scores = retrieval_scores(sims, index, reranked)
            if itm is not None:
                scores["itm_acc"] = self._itm_accuracy(itm, sims, index, image_tokens, text_tokens, text_mask)
            prefix = stage if len(names) <= 1 else f"{stage}/{names[idx]}"
            self.log_dict({f"{prefix}/{k}": v for k, v in scores.items()}, rank_zero_only=True)
            chance = chance_recall(len(image_ids), len(index))
            self.results[prefix] = {
                "scores": scores,
                "chance": chance,
                "num_images": len(image_ids),
                "num_texts": len(index),
            }
            if stage == "test":
                title = f"{names[idx] if names else stage} retrieval ({len(image_ids)} images, {len(index)} texts)"
                self.report("\n" + format_rerank_table(scores, chance, title=title, k=self.rerank_k) + "\n")
