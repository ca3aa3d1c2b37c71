"""VQA accuracy (official VQA v2 protocol), soft answer targets, and classification accuracy.

* ``normalize_answer`` reproduces the answer normalisation of the official VQA evaluation
  script (``vqaEval.py`` of Antol et al. 2015 / Goyal et al. 2017): punctuation, number
  words, articles and the contractions table.
* ``vqa_accuracy`` is the official per-question accuracy: the mean over the leave-one-out
  subsets of the human answers of ``min(#matches / 3, 1)``.
* ``vqa_soft_scores`` builds the multi-label BCE targets of ViLT / METER (bottom-up-attention
  ``get_score``: 0.3 / 0.6 / 0.9 / 1.0 for 1 / 2 / 3 / >=4 annotators) or ``min(1, count / 3)``.
* ``VQAAccuracy`` and ``ClassificationAccuracy`` (NLVR2, SNLI-VE) are torchmetrics metrics
  whose states are sums and counts reduced with ``sum``, so they aggregate exactly across
  ranks and with ``merge_state``. Both report percent (0..100).
"""

from __future__ import annotations

import math
import re
from collections import Counter
from functools import lru_cache
from typing import NamedTuple

import torch
from torchmetrics import Metric

from vlp.errors import ConfigError

# -- answer normalisation (official vqaEval.py) -----------------------------------------------

# Data tables of the official script. Keys with capitals ("Im", "Ive", ...) can never match
# after lower-casing; they are kept so the table stays the official one.
CONTRACTIONS: dict[str, str] = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've", "couldnt": "couldn't",
    "couldn'tve": "couldn't've", "couldnt've": "couldn't've", "didnt": "didn't", "doesnt": "doesn't",
    "dont": "don't", "hadnt": "hadn't", "hadnt've": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't",
    "havent": "haven't", "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've", "hes": "he's",
    "howd": "how'd", "howll": "how'll", "hows": "how's", "Id've": "I'd've", "I'dve": "I'd've", "Im": "I'm",
    "Ive": "I've", "isnt": "isn't", "itd": "it'd", "itd've": "it'd've", "it'dve": "it'd've", "itll": "it'll",
    "let's": "let's", "maam": "ma'am", "mightnt": "mightn't", "mightnt've": "mightn't've",
    "mightn'tve": "mightn't've", "mightve": "might've", "mustnt": "mustn't", "mustve": "must've",
    "neednt": "needn't", "notve": "not've", "oclock": "o'clock", "oughtnt": "oughtn't",
    "ow's'at": "'ow's'at", "'ows'at": "'ow's'at", "'ow'sat": "'ow's'at", "shant": "shan't",
    "shed've": "she'd've", "she'dve": "she'd've", "she's": "she's", "shouldve": "should've",
    "shouldnt": "shouldn't", "shouldnt've": "shouldn't've", "shouldn'tve": "shouldn't've",
    "somebody'd": "somebodyd", "somebodyd've": "somebody'd've", "somebody'dve": "somebody'd've",
    "somebodyll": "somebody'll", "somebodys": "somebody's", "someoned": "someone'd",
    "someoned've": "someone'd've", "someone'dve": "someone'd've", "someonell": "someone'll",
    "someones": "someone's", "somethingd": "something'd", "somethingd've": "something'd've",
    "something'dve": "something'd've", "somethingll": "something'll", "thats": "that's",
    "thered": "there'd", "thered've": "there'd've", "there'dve": "there'd've", "therere": "there're",
    "theres": "there's", "theyd": "they'd", "theyd've": "they'd've", "they'dve": "they'd've",
    "theyll": "they'll", "theyre": "they're", "theyve": "they've", "twas": "'twas", "wasnt": "wasn't",
    "wed've": "we'd've", "we'dve": "we'd've", "weve": "we've", "werent": "weren't", "whatll": "what'll",
    "whatre": "what're", "whats": "what's", "whatve": "what've", "whens": "when's", "whered": "where'd",
    "wheres": "where's", "whereve": "where've", "whod": "who'd", "whod've": "who'd've",
    "who'dve": "who'd've", "wholl": "who'll", "whos": "who's", "whove": "who've", "whyll": "why'll",
    "whyre": "why're", "whys": "why's", "wont": "won't", "wouldve": "would've", "wouldnt": "wouldn't",
    "wouldnt've": "wouldn't've", "wouldn'tve": "wouldn't've", "yall": "y'all", "yall'll": "y'all'll",
    "y'allll": "y'all'll", "yall'd've": "y'all'd've", "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've",
    "youd": "you'd", "youd've": "you'd've", "you'dve": "you'd've", "youll": "you'll", "youre": "you're",
    "youve": "you've",
}  # fmt: skip
NUMBER_WORDS: dict[str, str] = {
    "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4",
    "five": "5", "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10",
}  # fmt: skip
ARTICLES = frozenset({"a", "an", "the"})
PUNCTUATION = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!")
# The official ``(?!<=\d)`` is a negative *lookahead* for the literal "<=" + digit (a typo for a
# lookbehind), so in effect a period is removed unless a digit follows it: "2.5" and ".5" keep it.
_PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")
_COMMA_STRIP = re.compile(r"(\d)(,)(\d)")
# The official script calls ``periodStrip.sub("", text, re.UNICODE)``: the third positional
# argument of ``sub`` is ``count``, so at most re.UNICODE == 32 periods are removed.
_PERIOD_STRIP_COUNT = int(re.UNICODE)


def _process_punctuation(text: str) -> str:
    """``processPunctuation`` of the official script.

    Each punctuation character is deleted when it touches a space anywhere in the text, or when
    the text contains a digit-comma-digit group ("3,000"); otherwise it becomes a space
    ("black/white" -> "black white"). The tests look at the input text, not the partly
    processed one. Then periods not followed by a digit are deleted.
    """
    out = text
    delete_all = _COMMA_STRIP.search(text) is not None
    for p in PUNCTUATION:
        if delete_all or p + " " in text or " " + p in text:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    return _PERIOD_STRIP.sub("", out, count=_PERIOD_STRIP_COUNT)


def _process_digit_article(text: str) -> str:
    """``processDigitArticle``: number words to digits, drop articles, then contractions."""
    words = [NUMBER_WORDS.get(w, w) for w in text.lower().split()]
    words = [w for w in words if w not in ARTICLES]
    return " ".join(CONTRACTIONS.get(w, w) for w in words)


@lru_cache(maxsize=1 << 16)
def _normalize(text: str) -> str:
    text = text.lower().replace("\n", " ").replace("\t", " ").strip()
    return _process_digit_article(_process_punctuation(text))


def normalize_answer(text: str) -> str:
    """Normalise an answer as the official VQA evaluation does.

    Lower-case, newline / tab to space, strip, punctuation (see ``_process_punctuation``),
    number words ``none``/``zero``..``ten`` to digits, articles ``a``/``an``/``the`` removed,
    contractions restored (``dont`` -> ``don't``), words re-joined with single spaces.
    Examples: ``"Two"`` -> ``"2"``, ``"the dog."`` -> ``"dog"``, ``"3,000"`` -> ``"3000"``,
    ``"2.5"`` -> ``"2.5"``. Results are cached (answers repeat a lot).
    """
    if not isinstance(text, str):
        raise ConfigError(f"normalize_answer expects a str, got {type(text).__name__}: {text!r}")
    return _normalize(text)


# -- per-question accuracy ---------------------------------------------------------------------


def _check_answers(answers: list[str], where: str) -> None:
    if isinstance(answers, str):
        raise ConfigError(f"{where}: the human answers must be a list of str, got the str {answers!r}")
    if len(answers) == 0:
        raise ConfigError(f"{where}: the list of human answers is empty; VQA accuracy needs at least one answer")


def vqa_accuracy(prediction: str, answers: list[str]) -> float:
    """Official VQA accuracy (0..1) of one predicted answer against the human answers.

    Prediction and answers are both passed through ``normalize_answer``. With ``n >= 2``
    answers of which ``k`` equal the prediction, the accuracy is the mean over the ``n``
    leave-one-out subsets of ``min(matches / 3, 1)``, i.e.
    ``(k * min((k - 1) / 3, 1) + (n - k) * min(k / 3, 1)) / n``. VQA v2 has ``n = 10``: 1, 2, 3,
    >=4 matches give 0.3, 0.6, 0.9, 1.0. Fewer than 10 answers use the same leave-one-out over
    the answers there are (so with 2 or 3 answers the accuracy cannot reach 1); a single
    answer is scored by exact match (1 or 0), where leave-one-out would always give 0.

    Raises:
        ConfigError (a ValueError): ``answers`` is empty or a bare str.
    """
    _check_answers(answers, "vqa_accuracy")
    pred = normalize_answer(prediction)
    n = len(answers)
    k = sum(normalize_answer(a) == pred for a in answers)
    if n == 1:
        return float(k)
    return (k * min((k - 1) / 3, 1.0) + (n - k) * min(k / 3, 1.0)) / n


# -- soft training targets ---------------------------------------------------------------------


def meter_answer_score(count: int) -> float:
    """ViLT / METER ``get_score`` (from bottom-up-attention): 0, 0.3, 0.6, 0.9 for 0..3 annotators, else 1.

    These are the official accuracies of an answer given by ``count`` of 10 annotators.
    """
    if count < 0:
        raise ConfigError(f"an answer count must be >= 0, got {count}")
    return (0.0, 0.3, 0.6, 0.9)[count] if count < 4 else 1.0


def vqa_answer_score(count: int) -> float:
    """``min(1, count / 3)``: the VQA accuracy formula without the leave-one-out averaging."""
    if count < 0:
        raise ConfigError(f"an answer count must be >= 0, got {count}")
    return min(1.0, count / 3)


SCORE_SCHEMES = {"vilt": meter_answer_score, "vqa": vqa_answer_score}


class SoftTargets(NamedTuple):
    """Sparse soft target of one question: ``labels[i]`` has score ``scores[i]``."""

    labels: list[int]  # vocabulary indices, ascending
    scores: list[float]  # in (0, 1], same length as labels
    dropped: int  # number of human answers (with repetition) whose normalised form is not in the vocabulary


def vqa_soft_scores(answers: list[str], vocab: dict[str, int], scheme: str = "vilt") -> SoftTargets:
    """Soft multi-label targets of one question for BCE training (ViLT / METER VQA head).

    Answers are normalised (``normalize_answer``) and counted; each distinct answer found in
    ``vocab`` (normalised answer -> class index) gets the score of its count under ``scheme``:
    ``"vilt"`` (``meter_answer_score``: 0.3 / 0.6 / 0.9 / 1.0) or ``"vqa"`` (``min(1, count / 3)``).
    Answers outside the vocabulary are dropped and counted in ``dropped`` so callers can log
    them. Returns ``SoftTargets(labels, scores, dropped)`` (unpacks as a 3-tuple), labels in
    ascending order; a question with no in-vocabulary answer has empty labels.
    """
    if scheme not in SCORE_SCHEMES:
        raise ConfigError(f"unknown soft-score scheme {scheme!r}; expected one of {sorted(SCORE_SCHEMES)}")
    if isinstance(answers, str):
        raise ConfigError(f"vqa_soft_scores: answers must be a list of str, got the str {answers!r}")
    score = SCORE_SCHEMES[scheme]
    counts = Counter(normalize_answer(a) for a in answers)
    pairs = sorted((vocab[a], score(c)) for a, c in counts.items() if a in vocab)
    dropped = sum(c for a, c in counts.items() if a not in vocab)
    return SoftTargets([label for label, _ in pairs], [s for _, s in pairs], dropped)


def vqa_soft_target(
    answers: list[str], vocab: dict[str, int], num_answers: int | None = None, scheme: str = "vilt"
) -> torch.Tensor:
    """Dense float32 target of shape (num_answers,) (default ``len(vocab)``); see ``vqa_soft_scores``."""
    labels, scores, _ = vqa_soft_scores(answers, vocab, scheme)
    n = len(vocab) if num_answers is None else num_answers
    if labels and labels[-1] >= n:
        raise ConfigError(f"vocabulary index {labels[-1]} does not fit a target of {n} answers")
    target = torch.zeros(n, dtype=torch.float32)
    target[labels] = torch.tensor(scores, dtype=torch.float32)
    return target


# -- metrics -----------------------------------------------------------------------------------

OTHER = "other"


class VQAAccuracy(Metric):
    """Official VQA accuracy over an evaluation epoch, overall and per question type.

    ``update(pred_answers: list[str] (B), gt_answers: list[list[str]] (B, n_i), question_types:
    list[str] (B) | None)``; each question scores ``vqa_accuracy``. ``question_types`` given at
    construction fix the breakdown: they are sorted and de-duplicated, and every type not in
    the list (including "") is counted in an ``"other"`` bucket (a listed type named "other"
    shares that bucket; VQA v2 *answer* types "yes/no" / "number" / "other" therefore work as
    is). Questions updated without types count in ``"overall"`` only. The type list must be
    the same on every rank and in metrics merged with ``merge_state``.

    States (all ``dist_reduce_fx="sum"``): ``acc_sum`` () float64, ``count`` () int64,
    ``type_acc_sum`` (T + 1,) float64 and ``type_count`` (T + 1,) int64, index T being "other".

    ``compute()`` -> ``{"overall": percent, "<type>": percent, ..., "other": percent}`` (0..100;
    types in sorted order, "other" last, types without questions omitted; "overall" is NaN
    before any update).
    """

    full_state_update = False
    higher_is_better = True
    is_differentiable = False

    def __init__(self, question_types: list[str] | None = None, **kwargs) -> None:
        super().__init__(**kwargs)
        if isinstance(question_types, str):
            raise ConfigError(f"question_types must be a list of str, got the str {question_types!r}")
        types = sorted(set(question_types or ()) - {OTHER})
        if "overall" in types:
            raise ConfigError("'overall' cannot be a question type: it is the key of the overall accuracy")
        self.question_types: list[str] = types
        self._bucket = {t: i for i, t in enumerate(types)}
        n = len(types) + 1
        self.add_state("acc_sum", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("type_acc_sum", default=torch.zeros(n, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("type_count", default=torch.zeros(n, dtype=torch.long), dist_reduce_fx="sum")

    def update(
        self, pred_answers: list[str], gt_answers: list[list[str]], question_types: list[str] | None = None
    ) -> None:
        if len(pred_answers) != len(gt_answers):
            raise ConfigError(f"{len(pred_answers)} predicted answers but {len(gt_answers)} lists of human answers")
        if question_types is not None and len(question_types) != len(pred_answers):
            raise ConfigError(f"{len(question_types)} question types for {len(pred_answers)} questions")
        accs = []
        for i, (pred, answers) in enumerate(zip(pred_answers, gt_answers)):
            _check_answers(answers, f"VQAAccuracy.update, question {i} of the batch")
            accs.append(vqa_accuracy(pred, answers))
        device = self.acc_sum.device
        acc = torch.tensor(accs, dtype=torch.float64, device=device)  # (B,)
        self.acc_sum += acc.sum()
        self.count += len(accs)
        if question_types is not None:
            other = len(self.question_types)
            idx = torch.tensor([self._bucket.get(t, other) for t in question_types], dtype=torch.long, device=device)
            self.type_acc_sum.index_add_(0, idx, acc)
            self.type_count.index_add_(0, idx, torch.ones_like(idx))

    def compute(self) -> dict[str, float]:
        count = int(self.count)
        out = {"overall": 100.0 * float(self.acc_sum) / count if count else math.nan}
        for i, name in enumerate([*self.question_types, OTHER]):
            n = int(self.type_count[i])
            if n:
                out[name] = 100.0 * float(self.type_acc_sum[i]) / n
        return out

    def merge_state(self, incoming_state: dict | Metric) -> None:
        """torchmetrics ``merge_state``, refusing a metric with a different question-type list."""
        if isinstance(incoming_state, VQAAccuracy) and incoming_state.question_types != self.question_types:
            raise ConfigError(
                f"cannot merge VQAAccuracy with question types {incoming_state.question_types} "
                f"into one with {self.question_types}"
            )
        super().merge_state(incoming_state)


class ClassificationAccuracy(Metric):
    """Top-1 accuracy in percent for NLVR2 (``num_classes=2``) and SNLI-VE (``num_classes=3``).

    ``update(preds, target)``: ``preds`` are class indices (B,) int or scores / logits (B, C)
    (arg-max taken); ``target`` (B,) int in ``[0, num_classes)``. A 1-D float ``preds`` is
    refused (ambiguous: a binary logit or an index). States ``correct`` and ``total`` are int64
    sums (``dist_reduce_fx="sum"``). ``compute()`` -> float percent (NaN before any update).
    """

    full_state_update = False
    higher_is_better = True
    is_differentiable = False

    def __init__(self, num_classes: int, **kwargs) -> None:
        super().__init__(**kwargs)
        if int(num_classes) < 2:
            raise ConfigError(f"num_classes must be >= 2, got {num_classes}")
        self.num_classes = int(num_classes)
        self.add_state("correct", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("total", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, preds: torch.Tensor, target: torch.Tensor) -> None:
        c = self.num_classes
        if preds.ndim == 2:
            if preds.shape[1] != c:
                raise ConfigError(f"scores have {preds.shape[1]} columns but num_classes is {c}")
            preds = preds.argmax(dim=1)
        elif preds.ndim != 1 or preds.is_floating_point():
            raise ConfigError(
                f"preds must be class indices (B,) int or scores (B, {c}); got {tuple(preds.shape)} {preds.dtype}"
            )
        if target.ndim != 1 or target.shape[0] != preds.shape[0] or target.is_floating_point():
            raise ConfigError(f"target must be (B,) int with B = {preds.shape[0]}, got {tuple(target.shape)}")
        if target.numel() and (target.min() < 0 or target.max() >= c):
            raise ConfigError(
                f"target labels must lie in [0, {c}), got min {int(target.min())} max {int(target.max())}"
            )
        self.correct += (preds == target.to(preds.device)).sum()
        self.total += target.numel()

    def compute(self) -> float:
        total = int(self.total)
        return 100.0 * int(self.correct) / total if total else math.nan


def format_vqa_table(results: dict[str, float], baseline: dict[str, float] | None = None, title: str = "") -> str:
    """A text table of VQA accuracy by question type (``VQAAccuracy.compute`` output).

    One row per key of ``results`` ("overall" first). ``baseline`` (e.g. the majority-answer
    baseline) is given in **percent** (0..100) like ``results``; its non-numeric entries are
    ignored and types it lacks show "-".
    """
    names = sorted(results, key=lambda k: k != "overall")  # stable: keeps the order of the rest
    width = max([len("question type"), *map(len, names)]) + 2
    lines = [title] if title else []
    lines.append(f"{'question type':<{width}}{'acc %':>9}" + (f"{'baseline %':>12}" if baseline is not None else ""))
    for name in names:
        row = f"{name:<{width}}{results[name]:9.2f}"
        if baseline is not None:
            b = baseline.get(name)
            row += f"{b:12.2f}" if isinstance(b, (int, float)) and not isinstance(b, bool) else f"{'-':>12}"
        lines.append(row)
    return "\n".join(lines)


class BinaryAccuracyAUROC(Metric):
    """Accuracy and ROC-AUC (both in percent) of binary scores: Hateful Memes' metrics.

    ``update(logits, target)``: ``logits`` (B, 2), ``target`` (B,) in {0, 1}. The states are
    sums that reduce across ranks whatever each rank holds (none included): correct and total
    counts, and per-label histograms of P(positive) over ``bins`` equal bins, from which the
    AUROC is computed (pairs in one bin count half, as ties do), exact to the bin width.
    """

    full_state_update = False
    higher_is_better = True
    is_differentiable = False

    def __init__(self, bins: int = 4096, **kwargs) -> None:
        super().__init__(**kwargs)
        self.bins = int(bins)
        self.add_state("correct", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("total", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("hist", default=torch.zeros(2, self.bins, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, logits: torch.Tensor, target: torch.Tensor) -> None:
        if logits.ndim != 2 or logits.shape[1] != 2:
            raise ConfigError(f"binary scores must be (B, 2) logits, got shape {tuple(logits.shape)}")
        target = target.view(-1).long()
        self.correct += (logits.argmax(1) == target).sum()
        self.total += target.numel()
        p = logits.float().softmax(1)[:, 1]  # (B,) P(positive)
        bin_ = (p * self.bins).long().clamp_(0, self.bins - 1)
        self.hist.index_put_((target, bin_), torch.ones_like(bin_), accumulate=True)

    def compute(self) -> dict[str, float]:
        neg, pos = self.hist[0].double(), self.hist[1].double()
        below = torch.cumsum(neg, 0) - neg  # negatives in lower bins
        pairs = float(neg.sum() * pos.sum())
        auroc = float((pos * (below + 0.5 * neg)).sum()) / pairs if pairs else float("nan")
        acc = float(self.correct) / float(self.total) if int(self.total) else float("nan")
        return {"acc": 100 * acc, "auroc": 100 * auroc}
