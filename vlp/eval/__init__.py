"""Evaluation protocols and metrics."""

from vlp.eval.retrieval import (
    RetrievalMetric,
    chance_recall,
    format_rerank_table,
    format_table,
    recall_at_k,
    rerank_topk,
    retrieval_scores,
)

__all__ = [
    "RetrievalMetric",
    "chance_recall",
    "format_rerank_table",
    "format_table",
    "recall_at_k",
    "rerank_topk",
    "retrieval_scores",
]
