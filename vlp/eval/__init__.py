"""Evaluation protocols and metrics."""

from vlp.eval.retrieval import (
    RetrievalMetric,
    chance_recall,
    format_rerank_table,
    format_table,
    recall_at_k,
    rerank_topk,
    rerank_with_cache,
    retrieval_scores,
    score_all_pairs_with_cache,
)
from vlp.eval.vqa import (
    ClassificationAccuracy,
    SoftTargets,
    VQAAccuracy,
    format_vqa_table,
    meter_answer_score,
    normalize_answer,
    vqa_accuracy,
    vqa_answer_score,
    vqa_soft_scores,
    vqa_soft_target,
)

__all__ = [
    "ClassificationAccuracy",
    "RetrievalMetric",
    "SoftTargets",
    "VQAAccuracy",
    "chance_recall",
    "format_rerank_table",
    "format_table",
    "format_vqa_table",
    "meter_answer_score",
    "normalize_answer",
    "recall_at_k",
    "rerank_topk",
    "rerank_with_cache",
    "retrieval_scores",
    "score_all_pairs_with_cache",
    "vqa_accuracy",
    "vqa_answer_score",
    "vqa_soft_scores",
    "vqa_soft_target",
]
