"""Downstream task heads, usable by any fusion model.

A task head is an objective that trains on its own batch modality and also knows how to
evaluate it. It reads ``output.fused_cls``, the model's match features of each
(question/hypothesis, image) pair (``model.match_features``: METER's pooled streams,
ALBEF's fused CLS), so the same head fine-tunes every fusion family.

* :class:`VQA`: multi-label classification over an answer vocabulary with soft scores
  (binary cross-entropy, as ViLT and METER), evaluated with the official VQA accuracy by
  question type.
* :class:`VE`: SNLI-VE, three-way classification (entailment, neutral, contradiction).
* :class:`NLVR2`: two images and one sentence, true or false. As in METER's "pair"
  setting, the sentence is fused with each image (the second one with its own
  token-type embedding) and the two match features are concatenated.

Evaluation protocol (used by the models' ``_eval_step``): ``metric = head.new_metric()``,
``head.evaluate(metric, output, batch, model)`` per batch, ``head.summarize(metric)`` →
``(scores, table)``.
"""

from __future__ import annotations

import json
import math
import os

import torch
import torch.nn.functional as F
from torch import nn

from vlp.errors import ConfigError
from vlp.eval.vqa import ClassificationAccuracy, VQAAccuracy, format_vqa_table, normalize_answer, vqa_soft_scores
from vlp.objectives.base import Objective
from vlp.utils.paths import resolve_path


def classifier(dim: int, num_classes: int, hidden: int | None = None) -> nn.Sequential:
    """METER's task classifier: Linear(dim, hidden) → LayerNorm → GELU → Linear(hidden, classes);
    ``hidden`` defaults to ``dim`` (METER's VQA / SNLI-VE heads on the 2 x hidden pooled pair)."""
    hidden = hidden or dim
    head = nn.Sequential(nn.Linear(dim, hidden), nn.LayerNorm(hidden), nn.GELU(), nn.Linear(hidden, num_classes))
    for m in head.modules():
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, std=0.02)
            nn.init.zeros_(m.bias)
    return head


def load_answer_vocab(answers: list[str] | str) -> list[str]:
    """The answer vocabulary: a list, or a file: ``.json`` (a list, a mapping answer → index,
    or an object with ``vqa_answers`` such as the shapes benchmark's ``info.json``) or text
    (one answer per line). Answers are normalised; duplicates after normalisation are an error."""
    if isinstance(answers, str):
        path = resolve_path(answers)
        if not os.path.isfile(path):
            raise ConfigError(f"VQA answer vocabulary {path!r} not found")
        if path.endswith(".json"):
            data = json.loads(open(path).read())
            if isinstance(data, dict) and "vqa_answers" in data:
                data = data["vqa_answers"]
            if isinstance(data, dict):
                data = [a for a, _ in sorted(data.items(), key=lambda kv: kv[1])]
        else:
            data = [line.strip() for line in open(path) if line.strip()]
        if not isinstance(data, list) or not all(isinstance(a, str) for a in data):
            raise ConfigError(f"{path}: expected a list of answers (or answer → index)")
        answers = data
    vocab = [normalize_answer(a) for a in answers]
    if not vocab:
        raise ConfigError("the VQA answer vocabulary is empty")
    empty = [a for a, n in zip(answers, vocab, strict=True) if not n]
    if empty:
        raise ConfigError(f"VQA answers empty after normalisation: {empty[:10]}")
    dupes = sorted({a for a in vocab if vocab.count(a) > 1})
    if dupes:
        raise ConfigError(f"VQA answers equal after normalisation: {dupes[:10]}")
    return vocab


class VQA(Objective):
    """VQA as multi-label classification over ``answers`` with soft targets.

    Loss: ``BCE-with-logits(logits, soft scores) * num_answers`` (ViLT/METER: summed over
    answers, averaged over questions). Prediction: the highest-scoring answer. Questions
    whose human answers are all outside the vocabulary still count (their target is all
    zeros); their share is logged as ``vqa_oov``.

    Args:
        dim: width of the match features (METER: 2 x hidden).
        answers: the answer vocabulary (see :func:`load_answer_vocab`).
        scheme: soft scores, "vilt" (0.3 / 0.6 / 0.9 / 1 for 1 / 2 / 3 / 4+ annotators) or
            "vqa" (min(1, n / 3)).
        question_types: types reported separately at evaluation (others go to "other").
        baseline: accuracies (percent) by question type printed beside the results, e.g.
            the majority-answer baseline.
    """

    name = "vqa"
    modalities = ("vqa",)
    requires = ("fused_cls",)
    requires_batch = ("answers",)

    def __init__(
        self,
        weight: float = 1.0,
        *,
        dim: int = 1536,
        answers: list[str] | str,
        scheme: str = "vilt",
        question_types: list[str] | None = None,
        baseline: dict[str, float] | None = None,
    ) -> None:
        super().__init__(weight)
        self.answers = load_answer_vocab(answers)
        self.vocab = {a: i for i, a in enumerate(self.answers)}
        self.scheme = scheme
        vqa_soft_scores([], self.vocab, scheme)  # checks the scheme name now
        self.question_types = question_types
        self.baseline = baseline
        self.head = classifier(dim, len(self.answers))

    @property
    def chance(self) -> dict[str, float]:
        """Reference accuracies (percent) printed beside the results: the ``baseline``."""
        return dict(self.baseline or {})

    def targets(self, answers: list[list[str]], device: torch.device) -> tuple[torch.Tensor, int]:
        """Soft targets (B, num_answers) and the number of questions with no answer in the vocabulary."""
        target = torch.zeros(len(answers), len(self.answers))
        oov = 0
        for i, a in enumerate(answers):
            labels, scores, _ = vqa_soft_scores(a, self.vocab, self.scheme)
            target[i, labels] = torch.tensor(scores)
            oov += not labels
        return target.to(device), oov

    def predict(self, fused: torch.Tensor) -> list[str]:
        """The answer with the highest logit for each row of ``fused`` (N, dim)."""
        return [self.answers[i] for i in self.head(fused).argmax(-1).tolist()]

    def forward(self, output, batch: dict, model: nn.Module | None = None) -> dict[str, torch.Tensor]:
        logits = self.head(output.fused_cls)  # (B, A)
        target, oov = self.targets(batch["answers"], logits.device)  # (B, A)
        loss = F.binary_cross_entropy_with_logits(logits, target) * target.shape[1]
        with torch.no_grad():
            best = logits.argmax(-1)  # (B,)
            score = target.gather(1, best[:, None]).squeeze(1)  # soft score of the prediction
        return {"vqa_loss": loss, "vqa_score": score.mean(), "vqa_oov": torch.tensor(oov / max(1, len(target)))}

    # -- evaluation -------------------------------------------------------------------------
    def new_metric(self) -> VQAAccuracy:
        return VQAAccuracy(self.question_types)

    @torch.no_grad()
    def evaluate(self, metric: VQAAccuracy, output, batch: dict, model=None) -> None:
        metric.update(self.predict(output.fused_cls), batch["answers"], batch.get("question_type"))

    def summarize(self, metric: VQAAccuracy, title: str = "") -> tuple[dict[str, float], str]:
        scores = metric.compute()
        scores = {k: v for k, v in scores.items() if not math.isnan(v)}
        return scores, format_vqa_table(scores, self.baseline, title=title)


class VE(Objective):
    """Visual entailment (SNLI-VE): three-way classification of (image, hypothesis) pairs,
    labels 0 entailment, 1 neutral, 2 contradiction; cross-entropy; accuracy.

    Args:
        dim: width of the match features.
        num_classes: 3 for SNLI-VE.
    """

    name = "ve"
    modalities = ("ve",)
    requires = ("fused_cls",)
    requires_batch = ("label",)

    def __init__(self, weight: float = 1.0, *, dim: int = 1536, num_classes: int = 3) -> None:
        super().__init__(weight)
        self.num_classes = num_classes
        self.head = classifier(dim, num_classes)
        self.chance = {"acc": 100.0 / num_classes}

    def forward(self, output, batch: dict, model: nn.Module | None = None) -> dict[str, torch.Tensor]:
        logits = self.head(output.fused_cls)  # (B, C)
        label = batch["label"].view(-1)
        loss = F.cross_entropy(logits, label)
        with torch.no_grad():
            acc = (logits.argmax(-1) == label).float().mean()
        return {f"{self.name}_loss": loss, f"{self.name}_acc": acc}

    def new_metric(self) -> ClassificationAccuracy:
        return ClassificationAccuracy(self.num_classes)

    @torch.no_grad()
    def evaluate(self, metric: ClassificationAccuracy, output, batch: dict, model=None) -> None:
        metric.update(self.head(output.fused_cls).argmax(-1), batch["label"].view(-1))

    def summarize(self, metric: ClassificationAccuracy, title: str = "") -> tuple[dict[str, float], str]:
        acc = float(metric.compute())
        return {"acc": acc}, (
            f"{title}\n" if title else ""
        ) + f"accuracy {acc:.2f}% (chance {100 / self.num_classes:.2f})"


class NLVR2(Objective):
    """NLVR2: is the sentence true of the (left, right) image pair? Binary cross-entropy over
    two classes (0 false, 1 true) on ``concat(match(text, left), match(text, right))``.

    The right image is embedded with ``model.embed_image(image2, token_type=second_image_type)``
    (METER: a third token type, initialised from the image type when fine-tuning from a
    two-type checkpoint).

    Args:
        dim: width of one pair's match features (the head sees 2 x dim).
        second_image_type: token type of the right image.
    """

    name = "nlvr2"
    modalities = ("nlvr2",)
    requires = ("fused_cls", "text_tokens", "text_mask")
    requires_batch = ("image2", "label")

    def __init__(self, weight: float = 1.0, *, dim: int = 1536, second_image_type: int = 2) -> None:
        super().__init__(weight)
        self.second_image_type = second_image_type
        self.head = classifier(2 * dim, 2, hidden=dim)  # METER: Linear(4h, 2h) on the two pairs
        self.chance = {"acc": 50.0}

    def features(self, output, batch: dict, model) -> torch.Tensor:
        """(B, 2 dim): the sentence fused with the left image, then with the right one."""
        if not hasattr(model, "embed_image"):
            raise ConfigError(
                f"NLVR2 needs a model with embed_image(image, token_type); {type(model).__name__} has none"
            )
        right, _ = model.embed_image(batch["image2"], token_type=self.second_image_type)  # (B, Li, D)
        return torch.cat([output.fused_cls, model.match_features(output.text_tokens, output.text_mask, right)], -1)

    def forward(self, output, batch: dict, model: nn.Module | None = None) -> dict[str, torch.Tensor]:
        logits = self.head(self.features(output, batch, model))  # (B, 2)
        label = batch["label"].view(-1)
        loss = F.cross_entropy(logits, label)
        with torch.no_grad():
            acc = (logits.argmax(-1) == label).float().mean()
        return {"nlvr2_loss": loss, "nlvr2_acc": acc}

    def new_metric(self) -> ClassificationAccuracy:
        return ClassificationAccuracy(2)

    @torch.no_grad()
    def evaluate(self, metric: ClassificationAccuracy, output, batch: dict, model=None) -> None:
        metric.update(self.head(self.features(output, batch, model)).argmax(-1), batch["label"].view(-1))

    def summarize(self, metric: ClassificationAccuracy, title: str = "") -> tuple[dict[str, float], str]:
        acc = float(metric.compute())
        return {"acc": acc}, (f"{title}\n" if title else "") + f"accuracy {acc:.2f}% (chance 50.00)"
