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
* :class:`Retrieval`: image-text retrieval fine-tuning (a ranking loss on the ITM score,
  ViLT/METER) and R@K evaluation by the fusion model (ITC top-k re-ranked, or all pairs).

Evaluation: each head's ``evaluator(model)`` (``Objective.evaluator``) gives the metric
state of one source: VQA, VE and NLVR2 wrap their torchmetrics metric
(``new_metric`` / ``evaluate`` / ``summarize``) in a
:class:`~vlp.eval.evaluator.HeadEvaluator`; Retrieval returns a
:class:`~vlp.eval.evaluator.RetrievalEvaluator` that re-ranks with the model's ITM.
"""

from __future__ import annotations

import json
import math
import os

import torch
import torch.nn.functional as F
from torch import nn

from vlp.errors import ConfigError
from vlp.eval.vqa import (
    BinaryAccuracyAUROC,
    ClassificationAccuracy,
    VQAAccuracy,
    format_vqa_table,
    normalize_answer,
    vqa_soft_scores,
)
from vlp.objectives.base import Objective, find_objective
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


class TaskHead(Objective):
    """A classifier on the model's match features of ``pairs`` fused (text, image) pairs,
    concatenated (NLVR2: 2), with ``num_outputs`` outputs; built in ``setup`` when its ``dim``
    was not given, evaluated by its torchmetrics metric (``new_metric`` / ``evaluate`` /
    ``summarize``, see :class:`~vlp.eval.evaluator.HeadEvaluator`)."""

    pairs: int = 1
    num_outputs: int = 2

    def make_head(self, dim: int | None) -> nn.Sequential | None:
        """METER's classifier on ``pairs x dim`` inputs (hidden width ``dim``), or None."""
        if dim is None:
            return None
        return classifier(self.pairs * dim, self.num_outputs, hidden=dim if self.pairs > 1 else None)

    def needs(self) -> dict[str, str]:
        return {"fusion": f"to classify fused pairs ({self.name})"}

    def setup(self, model: nn.Module) -> None:
        given = self.head[0].in_features // self.pairs if self.head is not None else None
        dim = self.width_of("dim", given, model, "match")
        if self.head is None:
            self.head = self.make_head(dim)

    def evaluator(self, model: nn.Module):
        return model.head_evaluator(self)


class VQA(TaskHead):
    """VQA as multi-label classification over ``answers`` with soft targets.

    Loss: ``BCE-with-logits(logits, soft scores) * num_answers`` (ViLT/METER: summed over
    answers, averaged over questions). Prediction: the highest-scoring answer. Questions
    whose human answers are all outside the vocabulary still count (their target is all
    zeros); their share is logged as ``vqa_oov``.

    Args:
        dim: width of the match features (default: the model's; METER: 2 x hidden).
        answers: the answer vocabulary (see :func:`load_answer_vocab`).
        scheme: soft scores, "vilt" (0.3 / 0.6 / 0.9 / 1 for 1 / 2 / 3 / 4+ annotators) or
            "vqa" (min(1, n / 3)).
        question_types: types reported separately at evaluation (others go to "other").
        baseline: accuracies (percent) by question type printed beside the results, e.g.
            the majority-answer baseline.
    """

    default_name = "vqa"
    default_modalities = ("vqa",)
    eval_modalities = ("vqa",)
    requires = ("fused_cls",)
    requires_batch = ("answers",)

    def __init__(
        self,
        weight: float = 1.0,
        *,
        name: str | None = None,
        modalities: list[str] | None = None,
        dim: int | None = None,
        answers: list[str] | str,
        scheme: str = "vilt",
        question_types: list[str] | None = None,
        baseline: dict[str, float] | None = None,
    ) -> None:
        super().__init__(weight, name=name, modalities=modalities)
        self.answers = load_answer_vocab(answers)
        self.vocab = {a: i for i, a in enumerate(self.answers)}
        self.scheme = scheme
        vqa_soft_scores([], self.vocab, scheme)  # checks the scheme name now
        self.question_types = question_types
        self.baseline = baseline
        self.num_outputs = len(self.answers)
        self.head = self.make_head(dim)

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
        return self.named(loss=loss, score=score.mean(), oov=torch.tensor(oov / max(1, len(target))))

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


class PairClassification(TaskHead):
    """Binary classification of (image, text) pairs: Hateful Memes (1 = hateful) and any
    dataset in the ``pair_cls`` modality (``json`` {text, label}); cross-entropy over two
    logits; accuracy and ROC-AUC (the Hateful Memes metric). Any fusion family.

    Args:
        dim: width of the match features (default: the model's).
    """

    default_name = "pair_cls"
    default_modalities = ("pair_cls",)
    eval_modalities = ("pair_cls",)
    requires = ("fused_cls",)
    requires_batch = ("label",)
    num_outputs = 2

    def __init__(
        self,
        weight: float = 1.0,
        *,
        name: str | None = None,
        modalities: list[str] | None = None,
        dim: int | None = None,
    ) -> None:
        super().__init__(weight, name=name, modalities=modalities)
        self.head = self.make_head(dim)
        self.chance = {"acc": 50.0, "auroc": 50.0}

    def forward(self, output, batch: dict, model: nn.Module | None = None) -> dict[str, torch.Tensor]:
        logits = self.head(output.fused_cls)  # (B, 2)
        label = batch["label"].view(-1)
        loss = F.cross_entropy(logits, label)
        with torch.no_grad():
            acc = (logits.argmax(-1) == label).float().mean()
        return self.named(loss=loss, acc=acc)

    def new_metric(self) -> BinaryAccuracyAUROC:
        return BinaryAccuracyAUROC()

    @torch.no_grad()
    def evaluate(self, metric: BinaryAccuracyAUROC, output, batch: dict, model=None) -> None:
        metric.update(self.head(output.fused_cls), batch["label"].view(-1))

    def summarize(self, metric: BinaryAccuracyAUROC, title: str = "") -> tuple[dict[str, float], str]:
        scores = metric.compute()
        table = f"accuracy {scores['acc']:.2f}% (chance 50.00), ROC-AUC {scores['auroc']:.2f} (chance 50.00)"
        return scores, (f"{title}\n" if title else "") + table


class VE(TaskHead):
    """Visual entailment (SNLI-VE): three-way classification of (image, hypothesis) pairs,
    labels 0 entailment, 1 neutral, 2 contradiction; cross-entropy; accuracy.

    Args:
        dim: width of the match features (default: the model's).
        num_classes: 3 for SNLI-VE.
    """

    default_name = "ve"
    default_modalities = ("ve",)
    eval_modalities = ("ve",)
    requires = ("fused_cls",)
    requires_batch = ("label",)

    def __init__(
        self,
        weight: float = 1.0,
        *,
        name: str | None = None,
        modalities: list[str] | None = None,
        dim: int | None = None,
        num_classes: int = 3,
    ) -> None:
        super().__init__(weight, name=name, modalities=modalities)
        self.num_classes = self.num_outputs = num_classes
        self.head = self.make_head(dim)
        self.chance = {"acc": 100.0 / num_classes}

    def forward(self, output, batch: dict, model: nn.Module | None = None) -> dict[str, torch.Tensor]:
        logits = self.head(output.fused_cls)  # (B, C)
        label = batch["label"].view(-1)
        loss = F.cross_entropy(logits, label)
        with torch.no_grad():
            acc = (logits.argmax(-1) == label).float().mean()
        return self.named(loss=loss, acc=acc)

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


class NLVR2(TaskHead):
    """NLVR2: is the sentence true of the (left, right) image pair? Binary cross-entropy over
    two classes (0 false, 1 true) on ``concat(match(text, left), match(text, right))``.

    The right image is embedded with ``model.embed_image(image2, token_type=second_image_type)``
    (METER: a third token type, initialised from the image type when fine-tuning from a
    two-type checkpoint).

    Args:
        dim: width of one pair's match features (the head sees 2 x dim; default: the model's).
        second_image_type: token type of the right image.
    """

    default_name = "nlvr2"
    pairs = 2  # the sentence fused with each image
    default_modalities = ("nlvr2",)
    eval_modalities = ("nlvr2",)
    requires = ("fused_cls", "text_tokens", "text_mask")
    requires_batch = ("image2", "label")

    def __init__(
        self,
        weight: float = 1.0,
        *,
        name: str | None = None,
        modalities: list[str] | None = None,
        dim: int | None = None,
        second_image_type: int = 2,
    ) -> None:
        super().__init__(weight, name=name, modalities=modalities)
        self.second_image_type = second_image_type
        self.head = self.make_head(dim)  # METER: Linear(4h, 2h) on the two pairs
        self.chance = {"acc": 50.0}

    def needs(self) -> dict[str, str]:
        return {**super().needs(), "image_types": "to embed the second image"}

    def setup(self, model: nn.Module) -> None:
        super().setup(model)
        types = getattr(getattr(model, "token_type", None), "num_embeddings", None)  # METER's type embedding
        if types is not None and self.second_image_type >= types:
            raise ConfigError(
                f"NLVR2 embeds the right image with token type {self.second_image_type}, but "
                f"{type(model).__name__} has num_token_types {types}: set num_token_types: {self.second_image_type + 1}"
            )

    def features(self, output, batch: dict, model) -> torch.Tensor:
        """(B, 2 dim): the sentence fused with the left image, then with the right one."""
        right, _ = model.embed_image(batch["image2"], token_type=self.second_image_type)  # (B, Li, D)
        return torch.cat([output.fused_cls, model.match_features(output.text_tokens, output.text_mask, right)], -1)

    def forward(self, output, batch: dict, model: nn.Module | None = None) -> dict[str, torch.Tensor]:
        logits = self.head(self.features(output, batch, model))  # (B, 2)
        label = batch["label"].view(-1)
        loss = F.cross_entropy(logits, label)
        with torch.no_grad():
            acc = (logits.argmax(-1) == label).float().mean()
        return self.named(loss=loss, acc=acc)

    def new_metric(self) -> ClassificationAccuracy:
        return ClassificationAccuracy(2)

    @torch.no_grad()
    def evaluate(self, metric: ClassificationAccuracy, output, batch: dict, model=None) -> None:
        metric.update(self.head(self.features(output, batch, model)).argmax(-1), batch["label"].view(-1))

    def summarize(self, metric: ClassificationAccuracy, title: str = "") -> tuple[dict[str, float], str]:
        acc = float(metric.compute())
        return {"acc": acc}, (f"{title}\n" if title else "") + f"accuracy {acc:.2f}% (chance 50.00)"


class Retrieval(Objective):
    """Image-text retrieval fine-tuning and evaluation for any fusion model ("irtr").

    **Training** (ViLT/METER): a ranking loss on the ITM head's match logit. With
    ``direction="i2t"`` (METER's choice) each image in the batch is fused with one of its own
    captions and with ``negatives`` captions of other images (other ``image_id``s; drawn
    uniformly, vectorised), and the positive must score highest: cross-entropy over the
    1 + negatives candidates. ``"t2i"`` ranks images for each caption instead. Negatives come
    from the batch (METER draws 15 false captions from the dataset); a batch that has fewer
    valid negatives for some query uses that smaller number for all its queries.

    **Evaluation** on ``retrieval`` (several captions per image) or ``pair`` data: the whole
    split's tokens are kept; at the end, with ITC features (ALBEF, METER with ITC) and ``k``
    set, the ITC top-``k`` candidates of every query are re-ranked by the ITM score and both
    rankings are reported; otherwise every (image, caption) pair of the split is scored by
    the fusion model (METER's protocol: Ni x Nt fused pairs, so use
    ``trainer.limit_{val,test}_batches`` for a quick check on CPU). TR/IR R@1/5/10 and the
    mean, with several captions per image (COCO/Flickr protocol).

    The scorer is the model's ITM objective (``ITM.score_pairs``: the "match" logit, or
    ``GenerativeITM``'s log p(true) - log p(false)), which must be among the objectives;
    ``vlp convert meter`` loads METER's ``rank_output`` into it.

    Args:
        negatives: negatives per query in training (METER: 15).
        direction: ``"i2t"`` (images rank captions) or ``"t2i"``.
        k: candidates re-ranked per query when the model has ITC features; None scores all pairs.
        k_t2i: candidates re-ranked per caption (text→image), when it differs from ``k``.
        max_images: evaluate on the first ``max_images`` images of the split (by image id)
            and their captions; None: all. All-pairs scoring costs Ni x Nt fused pairs, so
            CPU recipes rank a subset; the table says which.
        batch_size: fused pairs per forward pass in evaluation.
    """

    default_name = "irtr"
    default_modalities = ("pair", "retrieval")
    eval_modalities = ("pair", "retrieval")
    requires = ("image_tokens", "text_tokens", "text_mask")
    requires_batch = ("image_id", "text_image_id")

    def __init__(
        self,
        weight: float = 1.0,
        *,
        name: str | None = None,
        modalities: list[str] | None = None,
        negatives: int = 15,
        direction: str = "i2t",
        k: int | None = 128,
        k_t2i: int | None = None,
        max_images: int | None = None,
        batch_size: int = 256,
    ) -> None:
        super().__init__(weight, name=name, modalities=modalities)
        if direction not in ("i2t", "t2i"):
            raise ConfigError(f"Retrieval direction must be 'i2t' or 't2i', got {direction!r}")
        if negatives < 1:
            raise ConfigError(f"Retrieval needs at least one negative, got negatives={negatives}")
        if max_images is not None and max_images < 1:
            raise ConfigError(f"Retrieval max_images must be >= 1 or null, got {max_images}")
        self.negatives, self.direction, self.k, self.batch_size = negatives, direction, k, batch_size
        self.k_t2i = k_t2i
        self.max_images = max_images
        self.chance: dict[str, float] = {}

    def setup(self, model: nn.Module) -> None:  # the scorer (an ITM) declares what it needs
        self.scorer(model)  # at construction, not after the first epoch

    def scorer(self, model) -> Objective:
        """The model's ITM objective, which scores pairs (``score_pairs``)."""
        from vlp.objectives.itm import ITM

        itm = find_objective(model, ITM)
        if itm is None:
            raise ConfigError(
                f"Retrieval ({self.name}) ranks pairs with the ITM head's match logit: add vlp.objectives.ITM "
                "to the objectives"
            )
        return itm

    def evaluator(self, model: nn.Module):
        from vlp.eval.evaluator import RetrievalEvaluator

        return RetrievalEvaluator(
            self.scorer(model),
            k=self.k,
            k_t2i=self.k_t2i,
            max_images=self.max_images,
            batch_size=self.batch_size,
            task=self.name,
            prefix_scores=True,
        )

    def candidates(self, image_id: torch.Tensor, text_image_id: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(image rows (Q, 1 + n), text rows (Q, 1 + n)) of each query's candidates, the
        positive first; ``n = min(negatives, fewest valid negatives of any query)``."""
        own = text_image_id.view(-1)[:, None] == image_id.view(-1)[None, :]  # (T, B) text t belongs to image b
        if not own.any(1).all():
            raise ConfigError("Retrieval: a caption's image_id is not among the batch's images")
        if self.direction == "t2i":
            queries = torch.arange(own.shape[0], device=own.device)  # (Q,) texts
            positive = own.float().argmax(1)  # (Q,) the owner image
            valid = ~own  # (Q, B) images of another id
        else:
            has_text = own.any(0)  # (B,) images with a caption in the batch
            queries = has_text.nonzero().view(-1)  # (Q,) images
            positive = torch.multinomial(own.T[queries].float(), 1).view(-1)  # (Q,) one own caption each
            valid = ~own.T[queries]  # (Q, T) captions of other ids
        n = min(self.negatives, int(valid.sum(1).min()))
        others = (
            torch.multinomial(valid.float(), n) if n > 0 else positive.new_zeros(len(queries), 0)
        )  # (Q, n) uniform, without replacement
        picked = torch.cat([positive[:, None], others], 1)  # (Q, 1 + n)
        rows = queries[:, None].expand_as(picked)
        return (rows, picked) if self.direction == "i2t" else (picked, rows)

    def forward(self, output, batch: dict, model: nn.Module | None = None) -> dict[str, torch.Tensor]:
        itm = self.scorer(model)
        images, texts = self.candidates(batch["image_id"], batch["text_image_id"])  # (Q, 1 + n) each
        i, t = images.reshape(-1), texts.reshape(-1)
        scores = itm.score_pairs(model, output.text_tokens[t], output.text_mask[t], output.image_tokens[i])
        scores = scores.view(images.shape)  # (Q, 1 + n), the positive in column 0
        target = torch.zeros(len(scores), dtype=torch.long, device=scores.device)
        loss = F.cross_entropy(scores, target)
        with torch.no_grad():
            acc = (scores.argmax(1) == 0).float().mean()
        return self.named(loss=loss, acc=acc)
