"""Evaluation protocols and metrics."""

from vlp.eval.retrieval import RetrievalMetric, chance_recall, format_table, recall_at_k

__all__ = ["RetrievalMetric", "chance_recall", "format_table", "recall_at_k"]
