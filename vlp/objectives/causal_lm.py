"""The causal language-modelling loss of generative families (Flamingo).

Cross-entropy of the next token, computed on the labelled positions only (the LM head runs
on those rows, not on the whole (B, L, V) grid). Interleaved and pair batches bring their
targets (``lm_labels``: -100 at padding, ``<image>`` and text before the first image, see
``vlp.data.interleaved``); a text-only batch is trained on every next token. A batch with no
labelled token gives a zero loss that still reaches every trainable parameter (never NaN).
One instance per data kind gives each its own weight (λ_pairs, λ_interleaved):
``CausalLM(name: lm_pairs, modalities: [pair], weight: 1.0)``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from vlp.data.interleaved import IGNORE, shift_targets
from vlp.objectives.base import Objective


def next_token_labels(ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(B, L) targets of plain text: ``labels[:, t] = ids[:, t + 1]`` where that token is
    real, -100 elsewhere and at the last position."""
    return shift_targets(ids.masked_fill(~mask.bool(), IGNORE))


class CausalLM(Objective):
    """Next-token cross-entropy over the labelled text tokens.

    Returns ``<name>_loss``, ``<name>_acc`` (top-1 next-token accuracy) and
    ``<name>_tokens`` (labelled tokens in the batch)."""

    default_name = "lm"
    default_modalities = ("interleaved", "pair", "text")
    requires = ("hidden",)
    requires_batch = ("text_ids", "text_mask")

    def needs(self) -> dict[str, str]:
        return {"causal_lm": "for next-token logits"}

    def forward(self, output, batch: dict, model) -> dict[str, torch.Tensor]:
        labels = batch.get("lm_labels")
        if labels is None:
            labels = next_token_labels(batch["text_ids"], batch["text_mask"])
        keep = labels != IGNORE  # (B, L)
        hidden = output.hidden  # (B, L, D)
        count = keep.sum()
        if int(count) == 0:  # nothing to learn from: zero, with every parameter in the graph
            zero = hidden.sum() * 0.0
            return self.named(loss=zero, acc=zero.detach(), tokens=count.float())
        logits = model.lm_logits(hidden[keep]).float()  # (K, V)
        target = labels[keep]  # (K,)
        loss = F.cross_entropy(logits, target)
        acc = (logits.argmax(-1) == target).float().mean()
        return self.named(loss=loss, acc=acc.detach(), tokens=count.float())
