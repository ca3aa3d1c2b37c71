"""MMC4 documents as OpenFlamingo trains on them: which images to keep and the marked text.

MMC4 ships one json per document::

    {"text_list": ["sentence", ...],
     "image_info": [{"image_name": ..., "matched_text_index": i, "matched_sim": s,
                     "image_base64": ...}, ...],          # image_base64 when packed in the json
     "similarity_matrix": [[sim of image j and sentence i, ...] for each image j]}

OpenFlamingo's preprocessing (``preprocess_interleaved``), which these functions follow:

1. images without bytes are unusable (here: counted as missing);
2. images and sentences are matched one to one, maximising the summed similarity (the
   Hungarian assignment; OpenFlamingo calls ``scipy.optimize.linear_sum_assignment``), so each
   sentence gets at most one image; an image left without a sentence (more images than
   sentences) is dropped;
3. a match below ``sim_threshold`` is dropped (an image whose best similarity is below the
   threshold is therefore always dropped);
4. at most ``max_num_images`` are kept: the first ones in reading order (OpenFlamingo keeps
   the first in ``image_info`` order and puts them in that order, which can differ from the
   order of their ``<image>`` marks; here images always follow their marks);
5. ``<|endofchunk|><image>`` goes before each matched sentence, the sentences are joined by
   spaces, the first ``<|endofchunk|>`` is removed and one closes the text; a document left
   with fewer than ``min_num_images`` images is dropped.

Not taken over: OpenFlamingo's filter of images under 10 KB and its random drop of half of
the one-image documents; ``min_num_images`` is checked before tokenisation (the collator
drops a document truncated so far that nothing is left to learn, see ``vlp.data.collate``).
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields

from vlp.data.interleaved import END_OF_CHUNK, MEDIA_TOKEN
from vlp.errors import ConfigError


@dataclass(frozen=True)
class MMC4Options:
    """Per-source options of MMC4 documents (manifest ``extra.mmc4``, source ``mmc4``).

    Args:
        sim_threshold: a matched image whose similarity to its sentence is below this is
            dropped (OpenFlamingo's ``--mmc4_textsim_threshold``, 0.24 for CLIP ViT-L/14).
        max_num_images: images kept per document, the first in reading order.
        min_num_images: a document left with fewer images is dropped (at least 1: text
            before the first image is no LM target, so a document without one teaches nothing).
    """

    sim_threshold: float = 0.24
    max_num_images: int = 6
    min_num_images: int = 1

    def __post_init__(self) -> None:
        t = self.sim_threshold
        if isinstance(t, bool) or not isinstance(t, int | float) or not math.isfinite(t):
            raise ConfigError(f"mmc4.sim_threshold must be a finite number, got {t!r}")
        for name, low in (("max_num_images", 1), ("min_num_images", 1)):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < low:
                raise ConfigError(f"mmc4.{name} must be an integer >= {low}, got {v!r}")
        if self.min_num_images > self.max_num_images:
            raise ConfigError(
                f"mmc4.min_num_images ({self.min_num_images}) is above mmc4.max_num_images "
                f"({self.max_num_images}): every document would be dropped"
            )

    @classmethod
    def parse(cls, *layers: Mapping | None, where: str = "mmc4") -> MMC4Options:
        """Options from mappings, later ones overriding earlier ones (the manifest's, then the
        source's); an unknown key is a ConfigError naming ``where``."""
        known = {f.name for f in fields(cls)}
        merged: dict = {}
        for layer in layers:
            if layer is None:
                continue
            if not isinstance(layer, Mapping):
                raise ConfigError(f"{where} must be a mapping of {sorted(known)}, got {layer!r}")
            unknown = set(layer) - known
            if unknown:
                raise ConfigError(f"{where}: unknown option(s) {sorted(unknown)}; expected {sorted(known)}")
            merged.update(layer)
        try:
            return cls(**merged)
        except ConfigError as e:
            raise ConfigError(f"{where}: {e}") from None


class MMC4Error(ValueError):
    """A document that cannot be used; the message is its skip reason."""


@dataclass
class Plan:
    """What to keep of one document: ``images`` (indices into ``image_info``) in reading
    order, the sentence each goes before (``sentences``), and the dropped images by reason."""

    images: list[int]
    sentences: list[int]
    dropped: Counter = field(default_factory=Counter)


def check_document(meta: Mapping) -> tuple[list[str], list, list[list[float]]]:
    """``text_list``, ``image_info`` and ``similarity_matrix`` of an MMC4 json, checked:
    MMC4Error when one is missing or the matrix is not images x sentences."""
    sentences, images, sim = meta.get("text_list"), meta.get("image_info", []), meta.get("similarity_matrix", [])
    if not isinstance(sentences, list) or not all(isinstance(s, str) for s in sentences) or not sentences:
        raise MMC4Error("mmc4 text_list is not a non-empty list of strings")
    if not isinstance(images, list) or not all(isinstance(i, Mapping) for i in images):
        raise MMC4Error("mmc4 image_info is not a list of mappings")
    if not isinstance(sim, list) or len(sim) != len(images):
        raise MMC4Error(f"mmc4 similarity_matrix shape (it needs one row per image: {len(images)} x {len(sentences)})")
    for j, row in enumerate(sim):
        if not isinstance(row, list) or len(row) != len(sentences):
            got = len(row) if isinstance(row, list) else type(row).__name__
            raise MMC4Error(f"mmc4 similarity_matrix shape (row {j} has {got} entries, text_list {len(sentences)})")
        if not all(isinstance(s, int | float) and not isinstance(s, bool) and math.isfinite(s) for s in row):
            raise MMC4Error(f"mmc4 similarity_matrix values (row {j} holds a non-number or a non-finite value)")
    return sentences, images, sim


def assign(cost: Sequence[Sequence[float]]) -> list[int | None]:
    """Minimum-cost one-to-one assignment of rows to columns (the Hungarian method with
    potentials, O(n² m)): the column of each row, None for a row left over when there are
    more rows than columns. Equal in total cost to ``scipy.optimize.linear_sum_assignment``."""
    n = len(cost)
    m = len(cost[0]) if n else 0
    if n == 0 or m == 0:
        return [None] * n
    if n > m:  # assign the columns to the rows instead
        row_of = assign([[cost[i][j] for i in range(n)] for j in range(m)])
        col: list[int | None] = [None] * n
        for j, i in enumerate(row_of):
            col[i] = j
        return col
    inf = math.inf
    u, v = [0.0] * (n + 1), [0.0] * (m + 1)  # potentials of rows and columns (1-based)
    owner, way = [0] * (m + 1), [0] * (m + 1)  # row holding each column; the path back
    for i in range(1, n + 1):
        owner[0], j0 = i, 0
        minv, used = [inf] * (m + 1), [False] * (m + 1)
        while True:  # grow the alternating tree until a free column is reached
            used[j0] = True
            i0, delta, j1 = owner[j0], inf, 0
            for j in range(1, m + 1):
                if not used[j]:
                    reduced = cost[i0 - 1][j - 1] - u[i0] - v[j]
                    if reduced < minv[j]:
                        minv[j], way[j] = reduced, j0
                    if minv[j] < delta:
                        delta, j1 = minv[j], j
            for j in range(m + 1):
                if used[j]:
                    u[owner[j]] += delta
                    v[j] -= delta
                else:
                    minv[j] -= delta
            j0 = j1
            if owner[j0] == 0:
                break
        while j0:  # flip the path
            j1 = way[j0]
            owner[j0] = owner[j1]
            j0 = j1
    out: list[int | None] = [None] * n
    for j in range(1, m + 1):
        if owner[j]:
            out[owner[j] - 1] = j - 1
    return out


def plan_document(sim: Sequence[Sequence[float]], usable: Sequence[bool], options: MMC4Options) -> Plan:
    """Steps 2-4 of the module docstring for an images x sentences similarity matrix;
    ``usable[j]`` is False for an image without bytes (dropped as missing)."""
    dropped: Counter = Counter()
    rows = [j for j, ok in enumerate(usable) if ok]
    dropped["missing"] += len(usable) - len(rows)
    match = assign([[-sim[j][s] for s in range(len(sim[j]))] for j in rows])  # maximise the similarity
    kept = []
    for j, s in zip(rows, match, strict=True):
        if s is None:
            dropped["unmatched"] += 1
        elif sim[j][s] < options.sim_threshold:
            dropped["below sim_threshold"] += 1
        else:
            kept.append((s, j))
    kept.sort()  # reading order: by sentence
    dropped["over max_num_images"] += max(0, len(kept) - options.max_num_images)
    kept = kept[: options.max_num_images]
    return Plan([j for _, j in kept], [s for s, _ in kept], +dropped)


_MARKS = re.compile(re.escape(MEDIA_TOKEN) + "|" + re.escape(END_OF_CHUNK))


def document_text(sentences: Sequence[str], marked: Sequence[int]) -> str:
    """The sentences with ``<|endofchunk|><image>`` before each of ``marked`` (step 5):
    ``(["Intro.", "A cat.", "It sleeps.", "A dog."], [1, 3])`` →
    ``"Intro.<image>A cat. It sleeps.<|endofchunk|><image>A dog.<|endofchunk|>"``, which
    :func:`vlp.data.interleaved.media_text` leaves as it is. Whitespace runs become one space,
    and ``<image>`` / ``<|endofchunk|>`` written in a sentence are removed (only the marks
    placed here may be media tokens)."""
    marked_set = set(marked)
    parts = []
    for i, sentence in enumerate(sentences):
        sentence = re.sub(r"\s+", " ", _MARKS.sub(" ", sentence)).strip()
        parts.append(f"{END_OF_CHUNK}{MEDIA_TOKEN}{sentence}" if i in marked_set else sentence)
    text = " ".join(p for p in parts if p).replace(END_OF_CHUNK, "", 1)  # no chunk ends before the first image
    text = re.sub(r"\s*(" + _MARKS.pattern + r")\s*", r"\1", text)  # no spaces around the special tokens
    return f"{text}{END_OF_CHUNK}" if marked_set else text
