"""Chance levels and text-only baselines written to ``info.json``."""

from __future__ import annotations

from collections import Counter
from math import comb


# -- chance levels ----------------------------------------------------------------------------
def retrieval_chance(num_images: int, captions_per_image: int, ks: tuple = (1, 5, 10)) -> dict:
    """Expected R@K of a random ranking: t2i K/N; i2t 1 - C(M-c, K) / C(M, K)."""
    n, c = num_images, captions_per_image
    m = n * c
    out = {"images": n, "captions": m, "captions_per_image": c}
    out.update({f"t2i_r{k}": min(k, n) / n for k in ks})
    out.update({f"i2t_r{k}": 1 - comb(m - c, k) / comb(m, k) for k in ks})
    return out


def vqa_majority(train: list[tuple[str, str]], test: list[tuple[str, str]]) -> dict:
    """Accuracy on ``test`` of answering each question type with its most common train answer."""
    by_type: dict[str, Counter] = {}
    for qtype, answer in train:
        by_type.setdefault(qtype, Counter())[answer] += 1
    majority = {t: c.most_common(1)[0][0] for t, c in sorted(by_type.items())}
    out = {"majority_answer": majority}
    for t in majority:
        answers = [a for qt, a in test if qt == t]
        out[t] = sum(a == majority[t] for a in answers) / max(1, len(answers))
    out["overall"] = sum(a == majority.get(t) for t, a in test) / max(1, len(test))
    return out


def sentence_only(train: list[tuple[str, str, int]], test: list[tuple[str, str, int]]) -> dict:
    """Accuracy on ``test`` (template, sentence, label) rows of a model that never looks at the
    images: each sentence gets its most common train label (unseen ones the template's)."""
    by_text: dict[str, Counter] = {}
    by_template: dict[str, Counter] = {}
    for t, text, label in train:
        by_text.setdefault(text, Counter())[label] += 1
        by_template.setdefault(t, Counter())[label] += 1
    hits: dict[str, list[bool]] = {}
    for t, text, label in test:
        guess = (by_text.get(text) or by_template.get(t) or Counter({None: 1})).most_common(1)[0][0]
        hits.setdefault(t, []).append(guess == label)
    out = {t: sum(h) / len(h) for t, h in sorted(hits.items())}
    out["overall"] = sum(sum(h) for h in hits.values()) / max(1, len(test))
    return out


def pair_task_chance(rows: dict[str, list[tuple[str, str, int]]], num_labels: int, by_template: bool = True) -> dict:
    """Baselines of a classification task from its (template, sentence, label) rows per split:
    the majority label from train (per template, or overall), the label balance (binary:
    the fraction of 1s per template; else the fraction of each label), and the accuracy of
    a model that reads the sentence only (:func:`sentence_only`)."""

    def keyed(split: str) -> list[tuple[str, int]]:
        return [(t if by_template else "all", y) for t, _, y in rows[split]]

    def balance(split: str) -> dict | list:
        groups: dict[str, list[int]] = {}
        for t, y in sorted(keyed(split)):
            groups.setdefault(t, []).append(y)
        if not by_template:
            return [sum(y == k for y in groups["all"]) / len(groups["all"]) for k in range(num_labels)]
        groups["overall"] = [y for _, _, y in rows[split]]
        return {t: sum(ys) / len(ys) for t, ys in groups.items()}  # binary: the fraction of 1s

    evals = [k for k in ("val", "test") if k in rows]
    majority = {k: vqa_majority(keyed("train"), keyed(k)) for k in evals}
    if not by_template:
        majority = {
            k: {"majority_label": v["majority_answer"]["all"], "accuracy": v["overall"]} for k, v in majority.items()
        }
    return {
        "majority_baseline": majority,
        "label_balance": {k: balance(k) for k in rows},
        "sentence_only": {k: sentence_only(rows["train"], rows[k]) for k in evals},
    }
