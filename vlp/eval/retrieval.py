"""Image-text retrieval R@K over a whole split (COCO/Flickr protocol).

Images and texts are scored all-against-all, not per batch. An image may own several
captions: image→text counts a hit when ANY of its captions is in the top K, text→image
when its image is. Embeddings are gathered across ranks by torchmetrics (``cat``
states) and de-duplicated by image id, so the numbers do not depend on the world size.
"""

from __future__ import annotations

from math import comb

import torch
from torchmetrics import Metric

KS = (1, 5, 10)


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
        uniq, first = _first_occurrence(img_id)
        img = img[first]  # (I, D), one row per image id
        row = torch.searchsorted(uniq, txt_img)  # uniq is sorted
        if (row >= len(uniq)).any() or (uniq[row.clamp(max=len(uniq) - 1)] != txt_img).any():
            raise ValueError("a text refers to an image id that is not in the evaluation set")
        return img, txt, row

    def compute(self) -> dict[str, float]:
        """R@K (see ``recall_at_k``) plus ``num_images`` and ``num_texts`` evaluated."""
        img, txt, row = self.gathered()
        return {**recall_at_k(img @ txt.T, row, self.ks), "num_images": len(img), "num_texts": len(txt)}


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
