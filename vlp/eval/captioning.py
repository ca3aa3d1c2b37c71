"""Captioning metrics as the COCO caption evaluation (pycocoevalcap) reports them: BLEU-1..4
(Papineni et al. 2002) and CIDEr-D (Vedantam et al. 2015), with a pure-Python tokenizer in
place of its Java PTB tokenizer, and :class:`CaptionMetric`, which gathers captions across
ranks.

Conventions matched to pycocoevalcap (tested against it to 1e-9 on pre-tokenized text):

* **CIDEr-D** (``Cider``): document frequencies count, for each n-gram, the items of the
  *evaluated set* whose references contain it, and idf is ``log(N) - log(max(1, df))``
  with N items; an n-gram vector holds raw counts times idf (1..4-grams, one vector per
  order). The similarity to one reference, per order, is
  ``sum_g min(c_g, r_g) r_g / (|c| |r|)`` (candidate weights clipped by the reference's)
  times the Gaussian length penalty ``exp(-(l_c - l_r)^2 / (2 sigma^2))``; the item score
  averages the orders, then the references, times 10. The corpus score is the mean of the
  item scores. As in pycocoevalcap, the penalty's length is the number of bigrams
  (words - 1; 0 for an empty sentence), and an n-gram of every item's references has idf 0
  (so a 1-item corpus scores 0).
* **BLEU** (``Bleu``): clipped n-gram precisions against each n-gram's maximum count over
  an item's references; the effective reference length is the reference closest in length
  to the candidate (ties to the shorter); the corpus score sums matches, candidate n-grams
  and lengths over items before the brevity penalty ``exp(1 - r / c)`` (for c < r). Each
  precision is ``(matches + 1e-15) / (total + 1e-9)`` (so an order without matches gives
  about 0, never a division by zero); BLEU-n is the geometric mean of precisions 1..n.
  Per-item scores use the same formula on the item alone.

Scores are on pycocoevalcap's scale (BLEU in [0, 1], CIDEr-D about 0..10);
:meth:`CaptionMetric.compute` reports them x100, as papers print them.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Hashable, Sequence

from vlp.errors import ConfigError, DataError
from vlp.utils.distributed import gather_objects

# pycocoevalcap/tokenizer/ptbtokenizer.py drops these PTB tokens after tokenizing
PTB_PUNCTUATION = (
    "''",
    "'",
    "``",
    "`",
    "-LRB-",
    "-RRB-",
    "-LCB-",
    "-RCB-",
    ".",
    "?",
    "!",
    ",",
    ":",
    "-",
    "--",
    "...",
    ";",
)
# the characters those tokens come from ("..." and "--" are runs of "." and "-"; PTB writes
# double quotes as `` and '', parentheses and braces as -LRB- -RRB- -LCB- -RCB-)
_DROPPED = frozenset("'\"`(){}.?!,:-;")
_CLITIC = re.compile(r"(?<=[^\W_])(n't|'(?:s|re|ve|ll|d|m))(?![^\W_])")
_UNIT = r"(?:\d+(?:[.,:]\d+)+|[^\W_]+)"  # 3.5, 1,000, 10:30 or a run of letters / digits
_TOKEN = re.compile(
    rf"n't|'(?:s|re|ve|ll|d|m)(?![^\W_])"  # clitics, split off by _CLITIC
    r"|(?:[^\W\d_]\.){2,}"  # abbreviations written with periods: u.s.
    rf"|{_UNIT}(?:[-/&]{_UNIT})*"  # words, hyphenated words, and/or, at&t
    r"|\S"  # any other character is a token of its own
)


def tokenize(text: str) -> list[str]:
    """Lower-cased PTB-style tokens of ``text`` without the punctuation that coco-caption's
    PTBTokenizer removes (:data:`PTB_PUNCTUATION`).

    A pure-Python stand-in for Stanford's Java PTBTokenizer (``-lowerCase``): clitics are
    split off (``don't`` -> ``do n't``, ``can't`` -> ``ca n't``, ``dog's`` -> ``dog 's``);
    hyphenated words, numbers with ``. , :`` and letter abbreviations (``u.s.``) stay
    whole; quotes, parentheses, braces and ``. ? ! , : ; -`` are dropped; other symbols
    (``$ % & [ ] /`` outside a word) are tokens of their own. It does not reproduce the
    rest of PTB: its abbreviation list (``mr.`` here loses its period), its character
    normalisations, or ``[ ]`` written as ``-lsb- -rsb-``. On captions of plain words and
    punctuation, the usual case, it is meant to give the Java tool's tokens; it is written
    from PTB's rules, not tested against Java.
    """
    if not isinstance(text, str):
        raise DataError(f"tokenize expects a string, got {type(text).__name__}: {text!r}")
    text = _CLITIC.sub(r" \1", text.lower())
    return [t for t in _TOKEN.findall(text) if not (len(t) == 1 and t in _DROPPED)]


def _ngrams(words: list[str], n: int) -> Counter:
    """Counts of the 1..n-grams of ``words`` (tuples)."""
    return Counter(tuple(words[i : i + k]) for k in range(1, n + 1) for i in range(len(words) - k + 1))


def _check(candidates: dict, references: dict, n: int) -> list:
    """The evaluated ids (in ``candidates`` order) after validating both dicts."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ConfigError(f"n (the longest n-gram) must be an int >= 1, got {n!r}")
    if not isinstance(candidates, dict) or not isinstance(references, dict):
        raise ConfigError("candidates and references must be dicts keyed by item id")
    if not candidates:
        raise DataError("no captions to score: candidates is empty")
    missing = [i for i in candidates if i not in references]
    extra = [i for i in references if i not in candidates]
    if missing or extra:
        raise DataError(
            f"candidates and references must have the same ids: without references {missing[:5]}, "
            f"without a candidate {extra[:5]}"
        )
    for i, cand in candidates.items():
        if not isinstance(cand, str):
            raise DataError(f"the candidate of id {i!r} must be one string, got {type(cand).__name__}: {cand!r}")
        refs = references[i]
        if isinstance(refs, str) or not isinstance(refs, Sequence) or not refs:
            raise DataError(f"the references of id {i!r} must be a non-empty list of strings, got {refs!r}")
        if not all(isinstance(r, str) for r in refs):
            raise DataError(f"the references of id {i!r} must be strings, got {refs!r}")
    return list(candidates)


def cider_d(
    candidates: dict[Hashable, str], references: dict[Hashable, list[str]], *, sigma: float = 6.0, n: int = 4
) -> tuple[float, dict[Hashable, float]]:
    """CIDEr-D of tokenized (space-separated) captions: (corpus score, {id: item score}).

    ``candidates[id]`` is one caption, ``references[id]`` its reference captions; both
    already tokenized (e.g. ``" ".join(tokenize(text))``). Document frequencies come from
    the references of exactly these items, so the score of an item depends on the set.
    """
    ids = _check(candidates, references, n)
    if not sigma > 0:
        raise ConfigError(f"sigma (the length penalty's width) must be > 0, got {sigma!r}")
    cand = {i: _ngrams(candidates[i].split(), n) for i in ids}
    refs = {i: [_ngrams(r.split(), n) for r in references[i]] for i in ids}
    df: Counter = Counter(g for i in ids for g in set().union(*refs[i]))
    log_n = math.log(len(ids))

    def tfidf(counts: Counter) -> tuple[dict, list[float], int]:
        vec = {g: tf * (log_n - math.log(max(1.0, df[g]))) for g, tf in counts.items()}
        norms = [0.0] * n
        for g, w in vec.items():
            norms[len(g) - 1] += w * w
        bigrams = sum(tf for g, tf in counts.items() if len(g) == 2)  # pycocoevalcap's length
        return vec, [math.sqrt(s) for s in norms], bigrams

    scores = {}
    for i in ids:
        vec_c, norm_c, len_c = tfidf(cand[i])
        total = [0.0] * n
        for ref in refs[i]:
            vec_r, norm_r, len_r = tfidf(ref)
            penalty = math.exp(-((len_c - len_r) ** 2) / (2 * sigma**2))
            dots = [0.0] * n
            for g, w in vec_c.items():
                r = vec_r.get(g, 0.0)
                dots[len(g) - 1] += min(w, r) * r  # candidate weight clipped by the reference's
            for k in range(n):
                cos = dots[k] / (norm_c[k] * norm_r[k]) if norm_c[k] and norm_r[k] else dots[k]
                total[k] += cos * penalty
        scores[i] = 10.0 * (sum(total) / n) / len(refs[i])
    return sum(scores.values()) / len(scores), scores


_TINY, _SMALL = 1e-15, 1e-9  # coco-caption's smoothing: (matches + tiny) / (total + small)


def _bleu_from_counts(correct: list[int], guess: list[int], testlen: float, reflen: float) -> list[float]:
    out, prod = [], 1.0
    for k in range(len(correct)):
        prod *= (correct[k] + _TINY) / (guess[k] + _SMALL)
        out.append(prod ** (1.0 / (k + 1)))
    ratio = (testlen + _TINY) / (reflen + _SMALL)
    if ratio < 1:
        out = [b * math.exp(1 - 1 / ratio) for b in out]
    return out


def bleu(
    candidates: dict[Hashable, str], references: dict[Hashable, list[str]], n: int = 4
) -> tuple[list[float], dict[Hashable, list[float]]]:
    """BLEU-1..n of tokenized (space-separated) captions: ([corpus BLEU-1..n], {id: [BLEU-1..n]})."""
    ids = _check(candidates, references, n)
    correct_all, guess_all = [0] * n, [0] * n
    testlen_all = reflen_all = 0
    per_item = {}
    for i in ids:
        words = candidates[i].split()
        ref_words = [r.split() for r in references[i]]
        testlen = len(words)
        reflen = min((abs(len(r) - testlen), len(r)) for r in ref_words)[1]  # closest, ties to shorter
        max_ref: Counter = Counter()
        for r in ref_words:
            max_ref |= _ngrams(r, n)  # elementwise maximum
        correct = [0] * n
        for g, c in _ngrams(words, n).items():
            correct[len(g) - 1] += min(c, max_ref[g])
        guess = [max(0, testlen - k) for k in range(n)]
        per_item[i] = _bleu_from_counts(correct, guess, testlen, reflen)
        correct_all = [a + b for a, b in zip(correct_all, correct)]
        guess_all = [a + b for a, b in zip(guess_all, guess)]
        testlen_all += testlen
        reflen_all += reflen
    return _bleu_from_counts(correct_all, guess_all, testlen_all, reflen_all), per_item


def _sorted_ids(ids: list) -> list:
    try:
        return sorted(ids)
    except TypeError:  # ids of mixed types
        return sorted(ids, key=repr)


class CaptionMetric:
    """BLEU-1..4 and CIDEr-D of generated captions, over every rank's items.

    ``update(ids, candidates, references)`` takes a batch: item ids (hashable, picklable:
    ints, strings, or a tensor of ints), one generated caption per item and a list of
    reference captions per item; with ``tokenize=True`` (default) every caption goes
    through :func:`tokenize`, else it must be tokenized already (space-separated).
    ``compute()`` is a collective under torch.distributed (call it on every rank, a rank
    without items included): it gathers every rank's items (``all_gather_object``), keeps
    the first occurrence of each id (in rank order) so that items a sampler padded onto
    some rank count once, and returns the same scores on every rank and at any world size
    (items are scored in sorted-id order). A repeated id with different references is a
    DataError (two items sharing an id); a repeated id's candidate is taken from its first
    occurrence. Scores are percent (x100): ``bleu1`` .. ``bleu4``, ``cider``; NaN when no
    rank has items.
    """

    def __init__(self, *, tokenize: bool = True, sigma: float = 6.0) -> None:
        self.tokenize, self.sigma = bool(tokenize), float(sigma)
        self.num_items = 0  # unique items scored by the last compute()
        self.reset()

    def reset(self) -> None:
        self._items: list[tuple[Hashable, str, tuple[str, ...]]] = []

    def _prepare(self, text: str, what: str) -> str:
        if not isinstance(text, str):
            raise DataError(f"{what} must be a string, got {type(text).__name__}: {text!r}")
        return " ".join(tokenize(text)) if self.tokenize else " ".join(text.split())

    def update(self, ids: Sequence[Hashable], candidates: Sequence[str], references: Sequence[Sequence[str]]) -> None:
        if hasattr(ids, "tolist"):  # a tensor or array of ids
            ids = ids.tolist()
        ids, candidates, references = list(ids), list(candidates), list(references)
        if not len(ids) == len(candidates) == len(references):
            raise DataError(
                f"update needs one candidate and one reference list per id: got {len(ids)} ids, "
                f"{len(candidates)} candidates, {len(references)} reference lists"
            )
        for i, cand, refs in zip(ids, candidates, references):
            if isinstance(refs, str) or not isinstance(refs, Sequence) or not refs:
                raise DataError(f"the references of id {i!r} must be a non-empty list of strings, got {refs!r}")
            hash(i)  # an unhashable id fails here, not in compute()
            cand = self._prepare(cand, f"the candidate of id {i!r}")
            self._items.append((i, cand, tuple(self._prepare(r, f"a reference of id {i!r}") for r in refs)))

    def gathered(self) -> tuple[dict[Hashable, str], dict[Hashable, list[str]]]:
        """(candidates, references) of every rank, one entry per id, in sorted-id order
        (a collective under torch.distributed)."""
        candidates: dict = {}
        references: dict = {}
        for items in gather_objects(self._items):
            for i, cand, refs in items:
                if i in references:
                    if list(refs) != references[i]:
                        raise DataError(
                            f"item id {i!r} appears twice with different references: {references[i]!r} "
                            f"and {list(refs)!r} (two items share an id)"
                        )
                    continue
                candidates[i], references[i] = cand, list(refs)
        ids = _sorted_ids(list(candidates))
        return {i: candidates[i] for i in ids}, {i: references[i] for i in ids}

    def compute(self) -> dict[str, float]:
        candidates, references = self.gathered()
        self.num_items = len(candidates)
        keys = ("bleu1", "bleu2", "bleu3", "bleu4", "cider")
        if not candidates:
            return dict.fromkeys(keys, math.nan)
        bleus, _ = bleu(candidates, references, n=4)
        cider, _ = cider_d(candidates, references, sigma=self.sigma, n=4)
        return dict(zip(keys, [100.0 * b for b in bleus] + [100.0 * cider]))
