"""Evaluators: the one evaluation path of every family.

An :class:`Evaluator` owns the metric state of one evaluation source for one epoch. The
module (:class:`~vlp.models.base.VLPModule`) creates one per source on *every* rank when
the epoch starts (a rank whose share of a small split is empty still takes part in the
collectives), calls ``update`` per batch and ``compute`` once at the end on every rank;
``compute`` gathers what it needs (any number of samples per rank) and returns the same
scores everywhere; ``table`` formats them for the report.

Where an evaluator comes from: the objective that evaluates the batch's modality
(``Objective.evaluator``: VQA, VE, NLVR2, Retrieval), else the family's default for
pair / retrieval data (``VLPModule.default_evaluator``: retrieval for CLIP and ALBEF,
the pretraining heads' accuracies for METER).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from vlp.eval.retrieval import (
    chance_recall,
    format_rerank_table,
    format_table,
    gather_pair_tokens,
    recall_at_k,
    rerank_topk,
    rerank_with_cache,
    retrieval_scores,
    score_all_pairs,
    score_all_pairs_with_cache,
)
from vlp.utils.distributed import all_reduce_sum


class Evaluator:
    """Metric state of one evaluation source.

    Attributes:
        task: the name results are logged under (``<stage>/<task>_<score>`` for task heads).
        prefix_scores: log scores as ``<task>_<score>`` (task heads) or bare (retrieval).
        chance: chance level of each score, for the table and ``vlp compare``.
    """

    task: str = "eval"
    prefix_scores: bool = True

    def __init__(self) -> None:
        self.chance: dict[str, float] = {}
        self.model: nn.Module | None = None  # set by the module that creates it

    def update(self, model: nn.Module, output, batch: dict) -> None:
        raise NotImplementedError

    def compute(self) -> dict[str, float]:
        """Scores over every rank's batches (a collective: called on every rank)."""
        raise NotImplementedError

    def table(self, scores: dict[str, float], title: str) -> str:
        rows = "\n".join(f"  {k:10}{v:8.2f}" for k, v in scores.items())
        return f"{title}\n{rows}"

    def extra(self) -> dict:
        """More entries for ``test_results.json`` (sample counts)."""
        return {}


class HeadEvaluator(Evaluator):
    """A task head's torchmetrics metric (``head.new_metric()``, ``head.evaluate(metric, ...)``,
    ``head.summarize(metric)``): VQA accuracy by question type, VE / NLVR2 accuracy. The
    metric's states are sums, synchronised by torchmetrics in ``compute``."""

    def __init__(self, head: nn.Module, device: torch.device) -> None:
        super().__init__()
        self.head, self.task = head, head.name
        self.metric = head.new_metric().to(device)
        self._table = ""

    def update(self, model: nn.Module, output, batch: dict) -> None:
        self.head.evaluate(self.metric, output, batch, model)

    def compute(self) -> dict[str, float]:
        scores, self._table = self.head.summarize(self.metric)
        self.chance = self.head.chance
        return scores

    def table(self, scores: dict[str, float], title: str) -> str:
        return f"{title}\n{self._table}" if title else self._table


class RetrievalEvaluator(Evaluator):
    """Image↔text retrieval over a whole split (several captions per image), TR/IR R@1/5/10.

    First stage: the ITC similarities of the model's normalised ``image_embeds`` /
    ``text_embeds`` when it has them. With a ``scorer`` (an ITM objective: ``score_pairs``,
    ``is_match_pairs``) the top-``k`` candidates of every query are re-ranked by it (ALBEF),
    or, with ``k=None`` or no ITC features, every pair of the split is scored (METER's
    protocol); ``itm_accuracy`` adds the scorer's balanced accuracy on every caption with
    its image and every image with its hardest wrong caption.

    Pairs are scored through the fusion's caches (each image's cross-attention keys/values
    and each caption's pair-independent work once: :func:`~vlp.eval.retrieval.rerank_with_cache`)
    when the model offers them (``model.fused_pair_scorer``) and the scorer scores fused
    features (ITM's head; not GenerativeITM's decoder), else pair by pair.

    Args:
        scorer: the objective that scores (text, image) pairs, or None (dual encoders).
        k: candidates re-ranked per query; None scores all pairs.
        k_t2i: candidates re-ranked per caption (text→image), when it differs from ``k``.
        max_images: rank only the first ``max_images`` images (by id) and their captions.
        batch_size: fused pairs per forward pass.
        itm_accuracy: report ``itm_acc`` (needs a scorer and ITC features).
        task: results name (``irtr`` for the Retrieval head; bare scores otherwise).
    """

    def __init__(
        self,
        scorer: nn.Module | None = None,
        *,
        k: int | None = None,
        k_t2i: int | None = None,
        max_images: int | None = None,
        batch_size: int = 256,
        itm_accuracy: bool = False,
        task: str = "retrieval",
        prefix_scores: bool = False,
    ) -> None:
        super().__init__()
        self.scorer, self.k, self.max_images, self.batch_size = scorer, k, max_images, batch_size
        self.k_t2i = k if k_t2i is None else k_t2i
        self.itm_accuracy = itm_accuracy
        self.task, self.prefix_scores = task, prefix_scores
        self.parts: list[tuple] = []
        self.counts: dict[str, int] = {}
        self.how = ""

    @torch.no_grad()
    def update(self, model: nn.Module, output, batch: dict) -> None:
        self.model = model
        embeds = (getattr(output, "image_embeds", None), getattr(output, "text_embeds", None))
        if embeds[0] is None or embeds[1] is None:
            if self.scorer is None:
                raise ValueError(f"{type(model).__name__} gave no image_embeds / text_embeds to retrieve with")
            embeds = (None, None)
        keep = self.scorer is not None  # tokens only when pairs are scored
        self.parts.append(
            (
                output.image_tokens if keep else None,
                embeds[0],
                batch["image_id"].view(-1),
                output.text_tokens if keep else None,
                output.text_mask if keep else None,
                embeds[1],
                batch["text_image_id"].view(-1),
            )
        )

    @torch.no_grad()
    def compute(self) -> dict[str, float]:
        image_tokens, image_embeds, ids, text_tokens, text_mask, text_embeds, index = gather_pair_tokens(self.parts)
        self.parts.clear()
        subset = ""
        if self.max_images is not None and self.max_images < len(ids):
            subset = f"the first {self.max_images} of {len(ids)} images: "
            keep = index < self.max_images  # (Nt,) captions of the kept images (ids are sorted)
            ids = ids[: self.max_images]
            image_tokens = image_tokens[: self.max_images] if image_tokens is not None else None
            image_embeds = image_embeds[: self.max_images] if image_embeds is not None else None
            text_tokens = text_tokens[keep] if text_tokens is not None else None
            text_mask = text_mask[keep] if text_mask is not None else None
            text_embeds = text_embeds[keep] if text_embeds is not None else None
            index = index[keep]
        ni, nt = len(ids), len(index)
        self.counts = {"num_images": ni, "num_texts": nt}
        self.chance = chance_recall(ni, nt)
        model, scorer = self.model, self.scorer

        def score(i: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            return scorer.score_pairs(model, text_tokens[t], text_mask[t], image_tokens[i])  # (n,)

        cached = None  # (fusion, head) when the fusion can cache per-image / per-caption work
        if scorer is not None and scorer.scores_fused_features:
            cached = model.fused_pair_scorer(scorer.score)

        if scorer is None:
            sims = image_embeds @ text_embeds.T  # (Ni, Nt)
            self.how = f"{subset}{ni} images, {nt} texts"
            self._format = lambda s, t: format_table(s, self.chance, title=t)
            return recall_at_k(sims, index)
        if image_embeds is not None and self.k is not None:
            sims = image_embeds @ text_embeds.T  # (Ni, Nt)
            ks = dict(k_i2t=self.k, k_t2i=self.k_t2i, batch_size=self.batch_size)
            if cached is not None:
                reranked = rerank_with_cache(sims, cached[0], image_tokens, text_tokens, text_mask, cached[1], **ks)
            else:
                reranked = rerank_topk(sims, score_fn=score, **ks)
            scores = retrieval_scores(sims, index, reranked)
            if self.itm_accuracy:
                scores["itm_acc"] = self._itm_accuracy(sims, index, image_tokens, text_tokens, text_mask)
            top = f"top-{self.k}" if self.k_t2i == self.k else f"top-{self.k} (texts) / top-{self.k_t2i} (images)"
            self.how = f"{subset}{ni} images, {nt} texts; ITC {top} re-ranked by ITM"
            self._format = lambda s, t: format_rerank_table(s, self.chance, title=t, k=self.k)
            return scores
        if cached is not None:
            sims = score_all_pairs_with_cache(
                cached[0], image_tokens, text_tokens, text_mask, cached[1], batch_size=self.batch_size
            )  # (Ni, Nt)
        else:
            sims = score_all_pairs(ni, nt, score, batch_size=self.batch_size, device=image_tokens.device)
        self.how = f"{subset}{ni} images, {nt} texts; ITM over all {ni * nt} pairs"
        self._format = lambda s, t: format_table(s, self.chance, title=t)
        return recall_at_k(sims, index.cpu())

    def _itm_accuracy(self, sims, index, image_tokens, text_tokens, text_mask, chunk: int = 256) -> float:
        """Balanced ITM accuracy (%): every caption with its own image (should match) and every
        image with its highest-ITC wrong caption (should not), decided by the scorer."""
        Ni, Nt = sims.shape
        texts = torch.arange(Nt, device=sims.device)
        own = torch.zeros(Ni, Nt, dtype=torch.bool, device=sims.device)
        own[index, texts] = True  # (Ni, Nt)
        hardest = sims.masked_fill(own, float("-inf")).argmax(1)  # (Ni,)
        pairs = {True: (index, texts), False: (torch.arange(Ni, device=sims.device), hardest)}
        accs = []
        for label, (i, t) in pairs.items():
            hits = [
                self.scorer.is_match_pairs(
                    self.model,
                    text_tokens[t[s : s + chunk]],
                    text_mask[t[s : s + chunk]],
                    image_tokens[i[s : s + chunk]],
                )
                == label
                for s in range(0, len(i), chunk)
            ]
            accs.append(torch.cat(hits).float().mean().item())
        return 100 * sum(accs) / 2

    def table(self, scores: dict[str, float], title: str) -> str:
        return self._format(scores, f"{title} ({self.how})")

    def extra(self) -> dict:
        return dict(self.counts)


class CounterEvaluator(Evaluator):
    """Accuracies from hit counters summed over ranks: ``add(name, hits, n)`` per batch;
    ``compute`` gives ``100 * hits / n`` per name, and ``balanced`` names (``itm``) the mean of
    their ``<name>_True`` / ``<name>_False`` accuracies (METER's pretraining heads: ITM
    balanced, MLM / DLM masked-token accuracy). ``update_fn(evaluator, model, output, batch)``
    does the counting."""

    prefix_scores = False

    def __init__(self, update_fn, *, names: list[str], balanced: tuple[str, ...] = (), title: str = "") -> None:
        super().__init__()
        self.update_fn, self.names, self.balanced, self.title = update_fn, names, balanced, title
        self.stats = {f"{n}_{c}": 0.0 for n in names for c in ("hits", "n")}
        self.task = "pretraining"
        self.chance = {f"{n}_acc": 50.0 for n in balanced}

    def add(self, name: str, hits: float, n: float) -> None:
        self.stats[f"{name}_hits"] += float(hits)
        self.stats[f"{name}_n"] += float(n)

    def update(self, model: nn.Module, output, batch: dict) -> None:
        self.update_fn(self, model, output, batch)

    def compute(self) -> dict[str, float]:
        stats = all_reduce_sum(self.stats)
        acc = {n: 100 * stats[f"{n}_hits"] / stats[f"{n}_n"] for n in self.names if stats[f"{n}_n"]}
        scores = {}
        for name in self.balanced:
            pos, neg = acc.get(f"{name}_True"), acc.get(f"{name}_False")
            if pos is not None and neg is not None:
                scores[f"{name}_acc"] = (pos + neg) / 2
        for name, value in acc.items():
            if not any(name.startswith(b + "_") for b in self.balanced):
                scores[f"{name}_acc"] = value
        return {k: v for k, v in scores.items() if not math.isnan(v)}

    def table(self, scores: dict[str, float], title: str) -> str:
        return super().table(scores, f"{title}: {self.title}")
