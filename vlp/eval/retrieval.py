"""Image-text retrieval R@K over a whole split (COCO/Flickr protocol).

Images and texts are scored all-against-all, not per batch. An image may own several
captions: image→text counts a hit when ANY of its captions is in the top K, text→image
when its image is. Embeddings are gathered across ranks by torchmetrics (``cat``
states) and de-duplicated by image id, so the numbers do not depend on the world size.

ALBEF-style two-stage retrieval: ``rerank_topk`` re-scores the ITC top-k candidates of every
query with a pair scorer (the ITM head), ``retrieval_scores`` reports R@K for ITC alone and
for ITC+ITM, and ``format_rerank_table`` prints both next to chance.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import fields
from math import comb

import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics import Metric

KS = (1, 5, 10)

PairScoreFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
"""``score_fn(image_index (n,), text_index (n,)) -> (n,)`` scores of (image, text) pairs given by index."""


def recall_at_k(sims: torch.Tensor, text_image_index: torch.Tensor, ks: tuple[int, ...] = KS) -> dict[str, float]:
    """R@K in percent from a similarity matrix.

    Args:
        sims: (num_images, num_texts) scores.
        text_image_index: (num_texts,) index of the image (row) each text belongs to.
    Returns:
        ``i2t_r{k}``, ``t2i_r{k}`` for each k, and ``rmean`` (mean of all six).
    """
    n_img, n_txt = sims.shape
    owner = text_image_index.to(sims.device)
    positive = owner[None, :] == torch.arange(n_img, device=sims.device)[:, None]  # (I, T)
    out: dict[str, float] = {}
    # image → text: rank of the best-ranked positive caption
    order = sims.argsort(dim=1, descending=True)  # (I, T)
    hit_rank_i2t = positive.gather(1, order).float().argmax(1)  # (I,) first positive position
    # text → image: rank of the owner image
    order_t = sims.T.argsort(dim=1, descending=True)  # (T, I)
    hit_rank_t2i = (order_t == owner[:, None]).float().argmax(1)  # (T,)
    for k in ks:
        out[f"i2t_r{k}"] = 100.0 * (hit_rank_i2t < k).float().mean().item()
        out[f"t2i_r{k}"] = 100.0 * (hit_rank_t2i < k).float().mean().item()
    out["rmean"] = sum(out.values()) / len(out)
    return out


def chance_recall(num_images: int, num_texts: int, ks: tuple[int, ...] = KS) -> dict[str, float]:
    """Expected R@K (percent) of a random ranking, for ``num_texts / num_images`` captions per image."""
    c = num_texts // max(num_images, 1)
    out: dict[str, float] = {}
    for k in ks:
        out[f"i2t_r{k}"] = 100.0 * (1 - comb(num_texts - c, k) / comb(num_texts, k)) if k <= num_texts else 100.0
        out[f"t2i_r{k}"] = 100.0 * min(k, num_images) / num_images
    out["rmean"] = sum(out.values()) / len(out)
    return out


class RetrievalMetric(Metric):
    """Accumulates image and text embeddings over an evaluation epoch; ``compute`` gives R@K.

    ``update(image_embeds (B, D), image_id (B,), text_embeds (T, D), text_image_id (T,))``.
    """

    full_state_update = False

    def __init__(self, ks: tuple[int, ...] = KS) -> None:
        super().__init__()
        self.ks = tuple(ks)
        for name in ("image_embeds", "image_id", "text_embeds", "text_image_id"):
            self.add_state(name, default=[], dist_reduce_fx="cat")

    def update(self, image_embeds, image_id, text_embeds, text_image_id) -> None:
        self.image_embeds.append(image_embeds.detach().float())
        self.image_id.append(image_id.detach())
        self.text_embeds.append(text_embeds.detach().float())
        self.text_image_id.append(text_image_id.detach())

    def gathered(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(unique image embeds (I, D), text embeds (T, D), text → image row (T,))."""
        cat = lambda x: torch.cat(x) if isinstance(x, list) else x  # noqa: E731
        img, img_id = cat(self.image_embeds), cat(self.image_id)
        txt, txt_img = cat(self.text_embeds), cat(self.text_image_id)
        _, first, row = index_texts_by_image(img_id, txt_img)
        return img[first], txt, row  # one image row per image id

    def compute(self) -> dict[str, float]:
        """R@K (see ``recall_at_k``) plus ``num_images`` and ``num_texts`` evaluated."""
        img, txt, row = self.gathered()
        return {**recall_at_k(img @ txt.T, row, self.ks), "num_images": len(img), "num_texts": len(txt)}


def index_texts_by_image(image_id: torch.Tensor, text_image_id: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """One row per image id: ``(ids (I,) sorted, first (I,) the row of each id's first
    occurrence in image_id, row (T,) each text's image row)``; a text whose image id is not
    among the images is a ValueError."""
    ids, first = _first_occurrence(image_id)
    row = torch.searchsorted(ids, text_image_id)  # ids are sorted
    if (row >= len(ids)).any() or (ids[row.clamp(max=len(ids) - 1)] != text_image_id).any():
        raise ValueError("a text refers to an image id that is not in the evaluation set")
    return ids, first, row


def _first_occurrence(ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Sorted unique ids and the index of each one's first occurrence in ``ids``."""
    uniq, inverse = torch.unique(ids, sorted=True, return_inverse=True)
    positions = torch.arange(len(ids), device=ids.device)
    first = torch.full((len(uniq),), len(ids), dtype=torch.long, device=ids.device)
    first.scatter_reduce_(0, inverse, positions, reduce="amin")
    return uniq, first


def format_table(results: dict[str, float], chance: dict[str, float] | None = None, title: str = "") -> str:
    """A small text table of R@K (and chance) for terminals and docs."""
    ks = sorted({int(k.split("_r")[1]) for k in results if "_r" in k and k[:3] in ("i2t", "t2i")})
    header = f"{'':14}" + "".join(f"{'R@' + str(k):>9}" for k in ks)
    lines = [title] if title else []
    lines.append(header)
    for direction, label in (("i2t", "image→text"), ("t2i", "text→image")):
        lines.append(f"{label:14}" + "".join(f"{results[f'{direction}_r{k}']:9.2f}" for k in ks))
        if chance:
            lines.append(f"{'  chance':14}" + "".join(f"{chance[f'{direction}_r{k}']:9.2f}" for k in ks))
    lines.append(f"{'mean R@K':14}{results['rmean']:9.2f}" + (f"   (chance {chance['rmean']:.2f})" if chance else ""))
    return "\n".join(lines)


# -- ALBEF two-stage retrieval: ITC top-k, then ITM re-ranking ----------------------------------


@torch.no_grad()
def rerank_topk(
    sims: torch.Tensor,
    k: int | None = None,
    score_fn: PairScoreFn | None = None,
    *,
    k_i2t: int | None = None,
    k_t2i: int | None = None,
    batch_size: int = 128,
    add_itc: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Re-rank every query's ITC top-k candidates with a pair scorer (ALBEF evaluation).

    For each image the ``k_i2t`` texts with the highest ITC similarity, and for each text the
    ``k_t2i`` highest images, are scored by ``score_fn`` (typically the ITM head's match
    probability on the fused pair). A candidate's final score is its ``score_fn`` value, plus
    its ITC similarity when ``add_itc``; candidates outside the query's top-k score ``-inf``
    so they rank after all re-ranked ones (``retrieval_scores`` orders them among themselves
    by ITC; a plain ``argsort`` of the returned matrices leaves those ties arbitrary).

    A pair that is in the top-k of both its image and its text is scored once, not twice:
    the candidate pairs of both directions are de-duplicated (``unique`` over ``i * Nt + t``)
    before scoring, which roughly halves the ITM cost on a good ITC model, where most
    top-k pairs are shared by the two directions. Memory stays flat over the run: the
    scores of all distinct pairs go into one preallocated tensor, chunk by chunk.

    For a ``BertFusion`` model, :func:`rerank_with_cache` gives the same scores faster.

    Args:
        sims: (Ni, Nt) ITC similarities, image rows, text columns.
        k: candidates re-ranked per query in both directions; clipped to Nt (image→text)
            and Ni (text→image).
        score_fn: ``score_fn(image_index (n,), text_index (n,)) -> (n,)``; it closes over the
            caller's cached image/text tokens. Called under ``torch.no_grad`` on chunks of at
            most ``batch_size`` pairs, indices on ``sims.device``, sorted by image.
        k_i2t / k_t2i: candidates per image / per text, instead of ``k`` (default ``k``);
            0 leaves that direction un-re-ranked (all ``-inf``: ITC order).
        batch_size: pairs per ``score_fn`` call.
        add_itc: final score = ``score_fn`` + ITC similarity instead of ``score_fn`` alone.
    Returns:
        ``(i2t, t2i)``: (Ni, Nt) image→text and (Nt, Ni) text→image scores, ``-inf`` outside
        the top-k, in at least float32.
    """
    if score_fn is None:
        raise ValueError("rerank_topk needs a score_fn(image_index, text_index) -> scores")
    cand = _candidates(sims, k, k_i2t, k_t2i, batch_size)
    scores = cand.new_scores()  # (P,) one score per distinct pair, filled in place
    for s in range(0, cand.num_pairs, batch_size):
        e = min(s + batch_size, cand.num_pairs)
        out = score_fn(cand.image_index[s:e], cand.text_index[s:e])
        _check_scores(out, e - s, "score_fn")
        scores[s:e] = out.detach()
    return cand.fill(scores, add_itc)


@torch.no_grad()
def rerank_with_cache(
    sims: torch.Tensor,
    fusion: nn.Module,
    image_tokens: torch.Tensor,
    text_tokens: torch.Tensor,
    text_mask: torch.Tensor,
    head: Callable,
    *,
    k: int | None = None,
    k_i2t: int | None = None,
    k_t2i: int | None = None,
    image_mask: torch.Tensor | None = None,
    batch_size: int = 128,
    image_batch: int = 64,
    add_itc: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``rerank_topk`` for a cross-attention fusion, doing per-image and per-caption work once.

    Scores the same candidate pairs as ``rerank_topk`` with (for ``BertFusion``)
    ``score_fn(i, t) = head(fusion(text_tokens[t], mask=text_mask[t], context=image_tokens[i])[:, 0])``
    and returns the same matrices (to float tolerance), but through ``fusion``'s caches
    (``text_cache`` / ``context_cache`` / ``forward_cached``): each caption's
    first self-attention is computed once, each image's cross-attention keys/values once
    per layer, and the last layer runs for the CLS row only. Pairs come sorted by image, so
    images are cached ``image_batch`` at a time and dropped after their pairs are scored;
    within those, pairs are batched by caption width and each batch drops the padding its
    captions share (exact: padded positions never reach the CLS token).

    Args:
        sims: (Ni, Nt) ITC similarities.
        fusion: a module with ``text_cache``, ``context_cache`` and ``forward_cached``:
            ``vlp.encoders.BertFusion`` (ALBEF's ``model.fusion``) or
            ``vlp.blocks.CoAttentionFusion`` (METER's).
        image_tokens: (Ni, Li, Dv) image tokens, row i for row i of ``sims``.
        text_tokens: (Nt, Lt, D) unimodal text tokens; text_mask: (Nt, Lt), True at real tokens.
        head: ``forward_cached(..., cls_only=True)`` → scores (n,): for ``BertFusion`` the
            fused CLS (n, D), e.g. ``ITM.score``; for ``CoAttentionFusion`` a ``FusionOutput``
            of (n, 1, D) streams (METER: both poolers, concatenated, then ``ITM.score``).
        k / k_i2t / k_t2i / batch_size / add_itc: as in ``rerank_topk``.
        image_mask: (Ni, Li) bool, True at real image tokens, or None (all real).
        image_batch: images whose caches are held at once.
    Returns:
        ``(i2t (Ni, Nt), t2i (Nt, Ni))`` as ``rerank_topk``.
    """
    n_img, n_txt = sims.shape
    if image_tokens.shape[0] != n_img or text_tokens.shape[0] != n_txt or text_mask.shape != text_tokens.shape[:2]:
        raise ValueError(
            f"rerank_with_cache: sims is {tuple(sims.shape)} but image_tokens {tuple(image_tokens.shape)}, "
            f"text_tokens {tuple(text_tokens.shape)}, text_mask {tuple(text_mask.shape)}"
        )
    if image_batch < 1:
        raise ValueError(f"image_batch must be >= 1, got {image_batch}")
    cand = _candidates(sims, k, k_i2t, k_t2i, batch_size)
    scores = cand.new_scores()  # (P,)
    if cand.num_pairs == 0:
        return cand.fill(scores, add_itc)
    texts = _text_cache(fusion, text_tokens, text_mask, batch_size)
    extent = texts.extent()  # (Nt,) caption widths without trailing padding
    # pairs are sorted by image: [bounds[j], bounds[j + 1]) are the pairs of image chunk j
    starts = torch.arange(0, n_img + image_batch, image_batch, device=sims.device).clamp(max=n_img)
    bounds = torch.searchsorted(cand.image_index, starts).tolist()
    for j, a in enumerate(range(0, n_img, image_batch)):
        lo, hi = bounds[j], bounds[j + 1]
        if lo == hi:
            continue
        b = min(a + image_batch, n_img)
        context = fusion.context_cache(image_tokens[a:b], image_mask[a:b] if image_mask is not None else None)

        def write(sel: torch.Tensor, out: torch.Tensor, lo: int = lo) -> None:
            scores[lo + sel.to(scores.device)] = out.to(scores.dtype)

        pair_images, pair_texts = cand.image_index[lo:hi] - a, cand.text_index[lo:hi]
        _score_cached(fusion, texts, extent, context, pair_images, pair_texts, head, batch_size, write)
        del context
    return cand.fill(scores, add_itc)


@torch.no_grad()
def score_all_pairs_with_cache(
    fusion: nn.Module,
    image_tokens: torch.Tensor,
    text_tokens: torch.Tensor,
    text_mask: torch.Tensor,
    head: Callable,
    *,
    image_mask: torch.Tensor | None = None,
    batch_size: int = 256,
    image_batch: int = 64,
) -> torch.Tensor:
    """``score_all_pairs`` (every (image, text) pair; ViLT/METER retrieval) through ``fusion``'s
    caches, as ``rerank_with_cache`` does: (Ni, Nt) float32 scores on the CPU.

    ``head`` maps ``fusion.forward_cached(..., cls_only=True)`` to (n,) scores: for
    ``CoAttentionFusion`` a ``FusionOutput`` of (n, 1, D) streams (METER: both poolers,
    concatenated, then ``ITM.score``); for ``BertFusion`` the fused CLS (n, D).
    """
    n_img, n_txt = image_tokens.shape[0], text_tokens.shape[0]
    if text_mask.shape != text_tokens.shape[:2]:
        raise ValueError(
            f"score_all_pairs_with_cache: text_mask is {tuple(text_mask.shape)}, text_tokens {tuple(text_tokens.shape)}"
        )
    if batch_size < 1 or image_batch < 1:
        raise ValueError(f"batch_size and image_batch must be >= 1, got {batch_size} and {image_batch}")
    out = torch.empty(n_img, n_txt, dtype=torch.float32)  # (Ni, Nt), filled in place
    if n_img == 0 or n_txt == 0:
        return out
    texts = _text_cache(fusion, text_tokens, text_mask, batch_size)
    extent = texts.extent()  # (Nt,)
    flat = out.view(-1)
    for a in range(0, n_img, image_batch):
        b = min(a + image_batch, n_img)
        context = fusion.context_cache(image_tokens[a:b], image_mask[a:b] if image_mask is not None else None)
        local = torch.arange((b - a) * n_txt, device=extent.device)  # (m,) pair i * Nt + t within the chunk
        pair_images, pair_texts = local // n_txt, local % n_txt

        def write(sel: torch.Tensor, scores: torch.Tensor, a: int = a, local: torch.Tensor = local) -> None:
            flat[a * n_txt + local[sel].cpu()] = scores.float().cpu()

        _score_cached(fusion, texts, extent, context, pair_images, pair_texts, head, batch_size, write)
        del context
    return out


def _score_cached(fusion, texts, extent, context, pair_images, pair_texts, head, batch_size, write) -> None:
    """Score pairs (context row ``pair_images[n]``, caption ``pair_texts[n]``) in batches of
    captions of similar width, each trimmed of its shared padding; ``write(sel, scores)``
    stores the scores of positions ``sel``."""
    order = extent[pair_texts.to(extent.device)].argsort(stable=True)  # (m,) by caption width
    for s in range(0, len(order), batch_size):
        sel = order[s : s + batch_size]  # (n,)
        fused = fusion.forward_cached(
            texts.index(pair_texts[sel.to(pair_texts.device)], trim=True),
            context.index(pair_images[sel.to(pair_images.device)]),
            cls_only=True,
        )
        scores = head(fused)
        _check_scores(scores, len(sel), "head")
        write(sel, scores.detach())


def _text_cache(fusion: nn.Module, text_tokens: torch.Tensor, text_mask: torch.Tensor, batch_size: int):
    """``fusion.text_cache`` of all captions, ``batch_size`` at a time, into preallocated tensors
    (every tensor field of the cache dataclass has captions on dim 0)."""
    first = fusion.text_cache(text_tokens[:batch_size], text_mask[:batch_size])
    full = {}
    for f in fields(first):
        t = getattr(first, f.name)
        full[f.name] = t.new_empty((len(text_tokens), *t.shape[1:])) if isinstance(t, torch.Tensor) else t
        if isinstance(t, torch.Tensor):
            full[f.name][: len(t)] = t
    for s in range(batch_size, len(text_tokens), batch_size):
        part = fusion.text_cache(text_tokens[s : s + batch_size], text_mask[s : s + batch_size])
        for name, t in full.items():
            if isinstance(t, torch.Tensor):
                t[s : s + batch_size] = getattr(part, name)
    return type(first)(**full)


def _check_scores(out: torch.Tensor, n: int, what: str) -> None:
    if out.shape != (n,):
        raise ValueError(f"{what} must return shape ({n},) for {n} pairs, got {tuple(out.shape)}")


class _Candidates:
    """The ITC top-k candidates of both directions and their distinct (image, text) pairs."""

    def __init__(self, sims: torch.Tensor, k_i2t: int, k_t2i: int) -> None:
        n_img, n_txt = sims.shape
        self.sims, self.shape = sims, (n_img, n_txt)
        self.dtype = torch.promote_types(sims.dtype, torch.float32)
        self.k_i2t, self.k_t2i = min(k_i2t, n_txt), min(k_t2i, n_img)
        self.top_t = sims.topk(self.k_i2t, dim=1).indices  # (Ni, k_i2t) candidate texts of each image
        self.top_i = sims.T.topk(self.k_t2i, dim=1).indices  # (Nt, k_t2i) candidate images of each text
        rows_i = torch.arange(n_img, device=sims.device)[:, None]  # (Ni, 1)
        rows_t = torch.arange(n_txt, device=sims.device)[:, None]  # (Nt, 1)
        pair_i2t = rows_i * n_txt + self.top_t  # (Ni, k_i2t) flat pair id i * Nt + t
        pair_t2i = self.top_i * n_txt + rows_t  # (Nt, k_t2i) same id space
        flat = torch.cat([pair_i2t.flatten(), pair_t2i.flatten()])  # (Ni k_i2t + Nt k_t2i,)
        pairs, self.inverse = torch.unique(flat, sorted=True, return_inverse=True)  # (P,) sorted by image
        self.image_index, self.text_index = pairs // n_txt, pairs % n_txt  # (P,), (P,)
        self.num_pairs = len(pairs)

    def new_scores(self) -> torch.Tensor:
        return torch.empty(self.num_pairs, dtype=self.dtype, device=self.sims.device)

    def fill(self, scores: torch.Tensor, add_itc: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """(i2t (Ni, Nt), t2i (Nt, Ni)): ``scores`` (P,) at the candidates, ``-inf`` elsewhere."""
        (n_img, n_txt), sims = self.shape, self.sims
        if add_itc:
            scores += sims[self.image_index, self.text_index].to(self.dtype)  # (P,)
        i2t = sims.new_full((n_img, n_txt), float("-inf"), dtype=self.dtype)  # (Ni, Nt)
        t2i = sims.new_full((n_txt, n_img), float("-inf"), dtype=self.dtype)  # (Nt, Ni)
        n_first = n_img * self.k_i2t
        i2t.scatter_(1, self.top_t, scores[self.inverse[:n_first]].view(n_img, self.k_i2t))
        t2i.scatter_(1, self.top_i, scores[self.inverse[n_first:]].view(n_txt, self.k_t2i))
        return i2t, t2i


def _candidates(sims: torch.Tensor, k: int | None, k_i2t: int | None, k_t2i: int | None, batch_size: int):
    if sims.dim() != 2:
        raise ValueError(f"sims must be (num_images, num_texts), got shape {tuple(sims.shape)}")
    if k is None and (k_i2t is None or k_t2i is None):
        raise ValueError("give k, or both k_i2t and k_t2i (candidates re-ranked per image / per text)")
    if k is not None and k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    k_i2t = k if k_i2t is None else k_i2t
    k_t2i = k if k_t2i is None else k_t2i
    if k_i2t < 0 or k_t2i < 0 or k_i2t + k_t2i == 0:
        raise ValueError(f"k_i2t and k_t2i must be >= 0 and not both 0, got k_i2t={k_i2t}, k_t2i={k_t2i}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    return _Candidates(sims, k_i2t, k_t2i)


def _rank_scores(scores: torch.Tensor, tiebreak: torch.Tensor) -> torch.Tensor:
    """Row-wise ``-rank`` (float) ordering by ``scores`` descending, ties by ``tiebreak`` descending.

    The result has no ties, so ``recall_at_k``'s ``argsort`` sees exactly this order.
    """
    first = tiebreak.argsort(dim=1, descending=True)  # (R, C) secondary order
    second = scores.gather(1, first).argsort(dim=1, descending=True, stable=True)  # (R, C) primary, stable
    order = first.gather(1, second)  # (R, C) column at each rank
    ranks = torch.arange(scores.shape[1], device=scores.device).expand_as(order)  # (R, C)
    return -torch.empty_like(order).scatter_(1, order, ranks).to(torch.float32)  # (R, C)


def retrieval_scores(
    sims_i2t: torch.Tensor,
    text_image_index: torch.Tensor,
    reranked: tuple[torch.Tensor, torch.Tensor] | None = None,
    ks: tuple[int, ...] = KS,
) -> dict[str, float]:
    """R@K for ITC alone and, given ``reranked``, for ITC+ITM re-ranking.

    Uses ``recall_at_k`` (several captions per image: image→text hits when any own caption
    is in the top K, text→image when the owner image is). The re-ranked matrices differ per
    direction, so image→text numbers come from ``reranked[0]`` and text→image numbers from
    ``reranked[1]`` (passed to ``recall_at_k`` transposed, its (I, T) convention). Ties in a
    re-ranked matrix (all the ``-inf`` candidates outside the top-k) are broken by ITC, so
    R@K for K beyond the re-ranked k falls back to the ITC order.

    Args:
        sims_i2t: (Ni, Nt) ITC similarities.
        text_image_index: (Nt,) image row of each text.
        reranked: ``(i2t (Ni, Nt), t2i (Nt, Ni))`` from ``rerank_topk``, or None.
        ks: recall cut-offs.
    Returns:
        ``i2t_r{k}``, ``t2i_r{k}``, ``rmean`` for ITC; with ``reranked`` also the same keys
        prefixed ``itm_`` (``itm_i2t_r1`` ... ``itm_rmean``).
    """
    out = recall_at_k(sims_i2t, text_image_index, ks)
    if reranked is None:
        return out
    i2t, t2i = reranked
    n_img, n_txt = sims_i2t.shape
    if i2t.shape != (n_img, n_txt) or t2i.shape != (n_txt, n_img):
        raise ValueError(
            f"reranked must be ((Ni, Nt), (Nt, Ni)) = ({(n_img, n_txt)}, {(n_txt, n_img)}), "
            f"got ({tuple(i2t.shape)}, {tuple(t2i.shape)})"
        )
    itc = sims_i2t.to(torch.float32)
    r_i2t = recall_at_k(_rank_scores(i2t, itc), text_image_index, ks)  # rank scores (Ni, Nt)
    r_t2i = recall_at_k(_rank_scores(t2i, itc.T).T, text_image_index, ks)  # rank scores (Nt, Ni) -> (Ni, Nt)
    itm: dict[str, float] = {}
    for k in ks:
        itm[f"itm_i2t_r{k}"] = r_i2t[f"i2t_r{k}"]
        itm[f"itm_t2i_r{k}"] = r_t2i[f"t2i_r{k}"]
    itm["itm_rmean"] = sum(itm.values()) / len(itm)
    return {**out, **itm}


def format_rerank_table(
    results: dict[str, float], chance: dict[str, float] | None = None, title: str = "", k: int | None = None
) -> str:
    """Text table of R@K for ITC and ITC+ITM in each direction, chance rows, and the means.

    ``results`` as from ``retrieval_scores`` (other keys, e.g. ``itm_acc``, are ignored); the
    ITC+ITM rows are left out when it has no ``itm_`` keys. ``k`` (re-ranked candidates) only
    labels the rows.
    """
    ks = sorted({int(key.split("_r")[1]) for key in results if key[:4] in ("i2t_", "t2i_") and "_r" in key})
    has_itm = any(key.startswith("itm_i2t_r") for key in results)
    itm_label = "  ITC+ITM" + (f"@{k}" if k is not None else "")
    width = max(16, len(itm_label) + 2)
    row = lambda label, vals: f"{label:{width}}" + "".join(f"{v:9.2f}" for v in vals)  # noqa: E731
    lines = [title] if title else []
    lines.append(f"{'':{width}}" + "".join(f"{'R@' + str(c):>9}" for c in ks))
    for direction, label in (("i2t", "image→text"), ("t2i", "text→image")):
        lines.append(label)
        lines.append(row("  ITC", [results[f"{direction}_r{c}"] for c in ks]))
        if has_itm:
            lines.append(row(itm_label, [results[f"itm_{direction}_r{c}"] for c in ks]))
        if chance:
            lines.append(row("  chance", [chance[f"{direction}_r{c}"] for c in ks]))
    lines.append("mean R@K")
    lines.append(row("  ITC", [results["rmean"]]))
    if has_itm:
        lines.append(row(itm_label, [results["itm_rmean"]]))
    if chance:
        lines.append(row("  chance", [chance["rmean"]]))
    return "\n".join(lines)


# -- fusion-model retrieval: cached tokens of a whole split ---------------------------------


def gather_pair_tokens(parts: list[tuple]) -> tuple[torch.Tensor | None, ...]:
    """Concatenate evaluation batches cached for retrieval, gather them across ranks (any
    number of batches per rank, none included) and keep one row per image id.

    Each part is ``(image_tokens (B, Li, Di) or None, image_embeds (B, E) or None, image_id (B,),
    text_tokens (T, Lt, Dt) or None, text_mask (T, Lt) or None, text_embeds (T, E) or None,
    text_image_id (T,))``; texts are padded to the longest text of all ranks.

    Returns:
        ``(image_tokens (Ni, Li, Di), image_embeds (Ni, E), image_ids (Ni,) sorted,
        text_tokens (Nt, Lt, Dt), text_mask (Nt, Lt), text_embeds (Nt, E),
        text_image_index (Nt,))``, None where no rank had the column; the last is each
        text's image row.
    """
    from vlp.utils.distributed import gather_cat

    cols = []
    for i in range(7):  # the same 7 collectives on every rank, whatever it holds
        pieces = [p[i] for p in parts if p[i] is not None]
        if pieces and i in (3, 4):  # pad texts to this rank's longest; gather_cat pads across ranks
            width = max(t.shape[1] for t in pieces)
            pad = (0, 0, 0) if i == 3 else (0,)
            pieces = [F.pad(t, (*pad, width - t.shape[1])) for t in pieces]
        cols.append(gather_cat(torch.cat(pieces) if pieces else None))
    image_tokens, image_embeds, image_id, text_tokens, text_mask, text_embeds, text_image_id = cols
    if image_id is None or text_image_id is None:
        raise ValueError("no evaluation batches were cached on any rank")
    ids, first, index = index_texts_by_image(image_id, text_image_id)
    image_embeds = image_embeds[first] if image_embeds is not None else None
    image_tokens = image_tokens[first] if image_tokens is not None else None
    return image_tokens, image_embeds, ids, text_tokens, text_mask, text_embeds, index


@torch.no_grad()
def score_all_pairs(
    num_images: int, num_texts: int, score_fn: PairScoreFn, *, batch_size: int = 256, device=None
) -> torch.Tensor:
    """(Ni, Nt) scores of every (image, text) pair from a pair scorer (ViLT/METER evaluation:
    no first stage, the fusion model ranks the whole split). Cost: Ni x Nt fused pairs.
    Indices are made on ``device``; the result is float32 on the CPU."""
    n = num_images * num_texts
    out = []
    for s in range(0, n, batch_size):
        flat = torch.arange(s, min(n, s + batch_size), device=device)
        image_index, text_index = flat // num_texts, flat % num_texts
        scores = score_fn(image_index, text_index)
        if scores.shape != (len(flat),):
            raise ValueError(f"score_fn must return shape ({len(flat)},), got {tuple(scores.shape)}")
        out.append(scores.detach().float().cpu())
    return torch.cat(out).view(num_images, num_texts) if out else torch.zeros(num_images, num_texts)
