"""Text-only tasks (GLUE) on a model's text tower: :class:`TextTask`.

The head reads ``model.text_features(ids, mask, token_types)`` (the "text" capability:
the text tower's pooled feature of a sentence, or of a pair encoded as one sequence
"[CLS] a [SEP] b [SEP]" with token types 0/1 where the tower has them), so it fine-tunes
the text tower of every family: CLIP, ALBEF (its unimodal BERT layers), METER, FLAVA.
It trains and evaluates ``text_pair`` batches (``text_pair_ids`` / ``text_pair_mask`` /
``text_pair_types`` / ``label``, see :mod:`vlp.data.collate`), which no family's
``forward`` reads: the tower runs once, here.

Classification (``num_labels >= 2``): cross-entropy; regression (``num_labels: 1``,
STS-B): mean squared error on the single output. Metrics (:mod:`vlp.eval.text`): accuracy,
F1 (MRPC, QQP), Matthews correlation (CoLA), Pearson / Spearman (STS-B); ``task`` takes
the labels and metrics of a GLUE task from :data:`vlp.data.glue.GLUE_TASKS`.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from vlp.errors import ConfigError, DataError
from vlp.eval.text import (
    CLASSIFICATION_METRICS,
    REGRESSION_METRICS,
    TextClassificationMetrics,
    TextRegressionMetrics,
    format_text_table,
)
from vlp.objectives.base import Objective
from vlp.objectives.tasks import classifier


class TextTask(Objective):
    """A classifier (or regressor) on the text tower's pooled features of ``text_pair`` data.

    Args:
        task: a GLUE task name (``cola``, ``sst2``, ``mrpc``, ``qqp``, ``stsb``, ``mnli``,
            ``qnli``, ``rte``, ``wnli``): its ``num_labels`` and ``metrics``.
        num_labels: classes, or 1 for regression (default: the task's, else 2).
        metrics: reported at evaluation, from ``acc``, ``f1``, ``mcc`` (classification) or
            ``pearson``, ``spearman`` (regression); default: the task's, else ``acc`` /
            both correlations.
        dim: width of the text features (default: the model's ``feature_dims()["text"]``).
        chance: reference scores (percent) printed beside the results (default: accuracy
            1 / num_labels, correlations 0).
    """

    default_name = "text_task"
    default_modalities = ("text_pair",)
    eval_modalities = ("text_pair",)
    requires_batch = ("text_pair_ids", "text_pair_mask", "label")

    def __init__(
        self,
        weight: float = 1.0,
        *,
        name: str | None = None,
        modalities: list[str] | None = None,
        task: str | None = None,
        num_labels: int | None = None,
        metrics: list[str] | None = None,
        dim: int | None = None,
        chance: dict[str, float] | None = None,
    ) -> None:
        super().__init__(weight, name=name, modalities=modalities)
        spec = None
        if task is not None:
            from vlp.data.glue import glue_task

            spec = glue_task(task)
        self.task = task
        self.num_labels = int(num_labels if num_labels is not None else spec.num_labels if spec else 2)
        if self.num_labels < 1:
            raise ConfigError(f"TextTask ({self.name}) num_labels must be >= 1 (1: regression), got {num_labels}")
        self.regression = self.num_labels == 1
        default = spec.metrics if spec else (REGRESSION_METRICS if self.regression else ("acc",))
        self.metrics = tuple(metrics or default)
        allowed = REGRESSION_METRICS if self.regression else CLASSIFICATION_METRICS
        wrong = [m for m in self.metrics if m not in allowed]
        if wrong:
            kind = "regression (num_labels 1)" if self.regression else "classification"
            raise ConfigError(f"TextTask ({self.name}) metrics {wrong} do not fit {kind}; use {list(allowed)}")
        self.new_metric()  # checks the metrics against num_labels now (f1 needs 2 classes)
        base = {"pearson": 0.0, "spearman": 0.0} if self.regression else {"acc": 100.0 / self.num_labels, "mcc": 0.0}
        self.chance = dict(chance) if chance is not None else {k: v for k, v in base.items() if k in self.metrics}
        self.head = classifier(dim, self.num_labels) if dim is not None else None

    def needs(self) -> dict[str, str]:
        return {"text": f"to classify sentences and sentence pairs ({self.name})"}

    def setup(self, model: nn.Module) -> None:
        given = self.head[0].in_features if self.head is not None else None
        dim = self.width_of("dim", given, model, "text")
        if self.head is None:
            self.head = classifier(dim, self.num_labels)

    # -- the head -----------------------------------------------------------------------------
    def logits(self, batch: dict, model: nn.Module) -> torch.Tensor:
        """(B, num_labels): the head on ``model.text_features`` of the batch's sentences."""
        types = batch.get("text_pair_types")
        features = model.text_features(batch["text_pair_ids"], batch["text_pair_mask"], types)  # (B, D)
        return self.head(features)  # (B, C)

    def targets(self, batch: dict) -> torch.Tensor:
        """``label`` as float scores (regression) or int64 classes, checked against ``num_labels``."""
        label = batch["label"].view(-1)
        if self.regression:
            return label.float()
        if label.is_floating_point():
            if not torch.equal(label, label.round()):
                raise DataError(
                    f"TextTask ({self.name}) classifies into {self.num_labels} classes but the batch has "
                    f"fractional labels {label[label != label.round()][:5].tolist()}: set num_labels: 1 for a score"
                )
            label = label.long()
        bad = (label < 0) | (label >= self.num_labels)
        if bad.any():
            keys = [k for k, b in zip(batch.get("keys", [""] * len(label)), bad.tolist(), strict=False) if b][:3]
            raise DataError(
                f"TextTask ({self.name}) has num_labels {self.num_labels} but the batch has labels "
                f"{sorted(set(label[bad].tolist()))} (samples {keys})"
            )
        return label

    def forward(self, output, batch: dict, model: nn.Module | None = None) -> dict[str, torch.Tensor]:
        logits, target = self.logits(batch, model), self.targets(batch)
        if self.regression:
            loss = F.mse_loss(logits[:, 0], target)
            return self.named(loss=loss)
        loss = F.cross_entropy(logits, target)
        with torch.no_grad():
            acc = (logits.argmax(-1) == target).float().mean()
        return self.named(loss=loss, acc=acc)

    # -- evaluation (HeadEvaluator) -------------------------------------------------------------
    def new_metric(self) -> TextClassificationMetrics | TextRegressionMetrics:
        if self.regression:
            return TextRegressionMetrics(self.metrics)
        return TextClassificationMetrics(self.num_labels, self.metrics)

    @torch.no_grad()
    def evaluate(self, metric, output, batch: dict, model=None) -> None:
        logits, target = self.logits(batch, model), self.targets(batch)
        metric.update(logits[:, 0] if self.regression else logits.argmax(-1), target)

    def summarize(self, metric, title: str = "") -> tuple[dict[str, float], str]:
        scores = {k: v for k, v in metric.compute().items() if not math.isnan(v)}
        return scores, format_text_table(scores, self.chance, title)

    def evaluator(self, model: nn.Module):
        return model.head_evaluator(self)
