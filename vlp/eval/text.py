"""Metrics of text tasks (GLUE): accuracy, F1, Matthews correlation, Pearson and Spearman.

All are torchmetrics metrics whose states reduce across ranks: classification keeps a
confusion matrix (a sum), regression keeps the predictions and targets (concatenated:
Spearman ranks the whole split). ``compute()`` returns percent, as GLUE reports them.

* ``acc``: top-1 accuracy.
* ``f1``: F1 of class 1 (MRPC / QQP: "equivalent" / "duplicate"), binary tasks only.
* ``mcc``: Matthews correlation (CoLA), its multi-class form (Gorodkin 2004) for C > 2.
* ``pearson`` / ``spearman``: correlation of predicted and gold scores (STS-B); Spearman
  on average ranks of ties.
"""

from __future__ import annotations

import math

import torch
from torchmetrics import Metric
from torchmetrics.utilities import dim_zero_cat

from vlp.errors import ConfigError

CLASSIFICATION_METRICS = ("acc", "f1", "mcc")
REGRESSION_METRICS = ("pearson", "spearman")


class TextClassificationMetrics(Metric):
    """Accuracy, F1 (class 1) and Matthews correlation from a (C, C) confusion matrix
    ``confusion[target, pred]`` (an int64 sum state). ``update(preds, target)``: class
    indices (B,) or scores (B, C) and (B,) int targets in ``[0, num_classes)``."""

    full_state_update = False
    higher_is_better = True
    is_differentiable = False

    def __init__(self, num_classes: int, metrics: tuple[str, ...] = ("acc",), **kwargs) -> None:
        super().__init__(**kwargs)
        if int(num_classes) < 2:
            raise ConfigError(f"num_classes must be >= 2, got {num_classes}")
        unknown = [m for m in metrics if m not in CLASSIFICATION_METRICS]
        if unknown:
            raise ConfigError(f"unknown classification metric(s) {unknown}; expected {CLASSIFICATION_METRICS}")
        if "f1" in metrics and num_classes != 2:
            raise ConfigError(f"f1 is the F1 of class 1 of a binary task, but num_classes is {num_classes}")
        self.num_classes, self.metrics = int(num_classes), tuple(metrics)
        c = self.num_classes
        self.add_state("confusion", default=torch.zeros(c, c, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, preds: torch.Tensor, target: torch.Tensor) -> None:
        c = self.num_classes
        if preds.ndim == 2 and preds.shape[1] == c:
            preds = preds.argmax(1)
        elif preds.ndim != 1 or preds.is_floating_point():
            raise ConfigError(f"preds must be class indices (B,) or scores (B, {c}); got {tuple(preds.shape)}")
        if target.ndim != 1 or target.shape != preds.shape or target.is_floating_point():
            raise ConfigError(f"target must be (B,) int with B = {preds.shape[0]}, got {tuple(target.shape)}")
        if target.numel() and (target.min() < 0 or target.max() >= c):
            raise ConfigError(f"labels must lie in [0, {c}), got min {int(target.min())} max {int(target.max())}")
        index = target.to(self.confusion.device) * c + preds.to(self.confusion.device)
        self.confusion += torch.bincount(index, minlength=c * c).view(c, c)

    def compute(self) -> dict[str, float]:
        m = self.confusion.double()
        n = float(m.sum())
        if n == 0:
            return {k: math.nan for k in self.metrics}
        out = {}
        correct = float(m.diagonal().sum())
        if "acc" in self.metrics:
            out["acc"] = 100.0 * correct / n
        if "f1" in self.metrics:
            tp, fp, fn = float(m[1, 1]), float(m[0, 1]), float(m[1, 0])
            out["f1"] = 100.0 * 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.0
        if "mcc" in self.metrics:
            t, p = m.sum(1), m.sum(0)  # true and predicted counts per class
            cov = correct * n - float(t @ p)
            den = math.sqrt((n * n - float(p @ p)) * (n * n - float(t @ t)))
            out["mcc"] = 100.0 * cov / den if den else 0.0  # sklearn: 0 when a side is constant
        return {k: out[k] for k in self.metrics}


def average_ranks(x: torch.Tensor) -> torch.Tensor:
    """Ranks 1..N of ``x`` (N,), ties given their average rank (as scipy.stats.rankdata)."""
    order = x.argsort()
    ranks = torch.empty_like(x, dtype=torch.float64)
    ranks[order] = torch.arange(1, len(x) + 1, dtype=torch.float64, device=x.device)
    values, inverse = torch.unique(x, return_inverse=True)
    total = torch.zeros(len(values), dtype=torch.float64, device=x.device).index_add_(0, inverse, ranks)
    count = torch.bincount(inverse, minlength=len(values)).double()
    return (total / count)[inverse]


def pearson(x: torch.Tensor, y: torch.Tensor) -> float:
    x, y = x.double() - x.double().mean(), y.double() - y.double().mean()
    den = float(x.norm() * y.norm())
    return float(x @ y) / den if den else math.nan


def _cat(state: list[torch.Tensor] | torch.Tensor) -> torch.Tensor:
    if isinstance(state, list):
        return dim_zero_cat(state) if state else torch.zeros(0)
    return state


class TextRegressionMetrics(Metric):
    """Pearson and Spearman correlation (percent) of predicted and gold scores (STS-B).
    ``update(preds, target)``: (B,) floats. The states are lists concatenated across ranks."""

    full_state_update = False
    higher_is_better = True
    is_differentiable = False

    def __init__(self, metrics: tuple[str, ...] = REGRESSION_METRICS, **kwargs) -> None:
        super().__init__(**kwargs)
        unknown = [m for m in metrics if m not in REGRESSION_METRICS]
        if unknown:
            raise ConfigError(f"unknown regression metric(s) {unknown}; expected {REGRESSION_METRICS}")
        self.metrics = tuple(metrics)
        self.add_state("preds", default=[], dist_reduce_fx="cat")
        self.add_state("target", default=[], dist_reduce_fx="cat")

    def update(self, preds: torch.Tensor, target: torch.Tensor) -> None:
        if preds.ndim == 2 and preds.shape[1] == 1:
            preds = preds[:, 0]
        if preds.ndim != 1 or target.shape != preds.shape:
            raise ConfigError(f"preds and target must both be (B,), got {tuple(preds.shape)} and {tuple(target.shape)}")
        # in the metric's dtype: a rank without data syncs an empty tensor of that dtype
        self.preds.append(preds.detach().to(self.dtype))
        self.target.append(target.detach().to(preds.device, self.dtype))

    def compute(self) -> dict[str, float]:
        x, y = _cat(self.preds), _cat(self.target)  # a tensor once synchronised across ranks
        if not len(x):
            return {k: math.nan for k in self.metrics}
        out = {"pearson": 100.0 * pearson(x, y), "spearman": 100.0 * pearson(average_ranks(x), average_ranks(y))}
        return {k: out[k] for k in self.metrics}


def format_text_table(scores: dict[str, float], chance: dict[str, float], title: str = "") -> str:
    """One line per metric: ``acc   85.00  (chance 50.00)``."""
    lines = [title] if title else []
    for k, v in scores.items():
        ref = f"  (chance {chance[k]:.2f})" if k in chance else ""
        lines.append(f"{k:9} {v:6.2f}{ref}")
    return "\n".join(lines)
