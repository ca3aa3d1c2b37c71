"""Few-shot in-context evaluation of Flamingo-style models (OpenFlamingo's protocol).

For every query item of a test split, ``k`` demonstrations from a support split are written
in front of the query, each with its image, and the model continues the prompt:

    <image>Output:{caption}<|endofchunk|>  x k   <image>Output:                      captioning
    <image>Question:{q} Short answer:{a}<|endofchunk|>  x k   <image>Question:{q} Short answer:   VQA
    <image>A photo of a {class}.<|endofchunk|>  x k   <image>A photo of a  + each class name   classification

Captioning and VQA generate (beam search over the KV cache, ``model.generate``) and score
CIDEr-D / BLEU-4 against every reference caption of the query image, or the official VQA
accuracy of the answer (cut as OpenFlamingo cuts it: first line, before ``Question`` /
``Answer`` / ``Short``, before ``", "``). Classification ranks the class names by the summed
log-likelihood of their tokens after the query's prompt (``model.token_logprobs``).

Demonstrations: ``random`` draws them with a generator seeded by (seed, query key), so they
do not depend on the rank, the world size or the batch order; ``rices`` takes the support
items whose image is closest to the query's (cosine of the vision tower's pooled features,
computed once for the support set), the most similar last, next to the query. A query is never
its own demonstration: when the support split is the query split (a train split evaluated), the
support item of the query's key is left out of both draws, and so are, on the same shards, the
items of the query's image (its other captions or questions), by ``image_id``. ``shots: 0``
is Flamingo's zero-shot setting as OpenFlamingo runs it: two demonstrations, text only (their
``<image>`` dropped, their images not passed).

Every rank loads the support split (at most ``max_support`` items, in shard order), scores
its own query items and ``compute`` gathers the per-item results by key, so that items a
sampler repeated count once and the scores are those of one process.
"""

from __future__ import annotations

import copy
import hashlib
import logging
import os
import random
import re
from collections import Counter
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from vlp.data.interleaved import END_OF_CHUNK, IGNORE, MEDIA_TOKEN
from vlp.data.manifest import expand_urls, load_manifest
from vlp.data.pipeline import SampleDecoder, Skipped, read_shards
from vlp.data.transforms import ImageTransform
from vlp.errors import ConfigError, DataError
from vlp.eval.captioning import bleu, cider_d, tokenize
from vlp.eval.classification import accuracy_ks, classes_of, load_classes
from vlp.eval.evaluator import Evaluator
from vlp.eval.vqa import normalize_answer, vqa_accuracy
from vlp.utils.distributed import gather_objects
from vlp.utils.paths import resolve_path

log = logging.getLogger("vlp")

#: OpenFlamingo's demonstration templates; a query is its template cut before the answer field.
PROMPTS = {
    "captioning": f"{MEDIA_TOKEN}Output:{{caption}}{END_OF_CHUNK}",
    "vqa": f"{MEDIA_TOKEN}Question:{{question}} Short answer:{{answer}}{END_OF_CHUNK}",
    "classification": f"{MEDIA_TOKEN}A photo of a {{class}}.{END_OF_CHUNK}",
}
#: The field a query leaves for the model, per task.
ANSWER_FIELD = {"captioning": "caption", "vqa": "answer", "classification": "class"}
#: Modalities a task reads its support and query items from.
MODALITIES = {"captioning": ("pair", "retrieval"), "vqa": ("vqa",), "classification": ("image",)}
DEMOS = ("random", "rices")
#: Keys of ``evaluation: {fewshot: {...}}``.
OPTIONS = (
    "task",
    "support",
    "shots",
    "demos",
    "seed",
    "max_new_tokens",
    "num_beams",
    "length_penalty",
    "prompt",
    "max_support",
    "classes",
    "batch_size",
    "max_prompt_length",
    "image_size",
    "norm",
)
ZERO_SHOT_DEMOS = 2  # text-only demonstrations of the 0-shot setting (OpenFlamingo)


# -- prompts ---------------------------------------------------------------------------------
def fill(template: str, fields: dict[str, str]) -> str:
    """``template`` with each ``{name}`` replaced by ``fields[name]`` (no other brace is read)."""
    for name, value in fields.items():
        template = template.replace("{" + name + "}", value)
    return template


def check_prompt(template: str, task: str, where: str) -> str:
    """A demonstration template: one ``<image>``, each of the task's fields once, the answer
    field last (the query is the template cut before it)."""
    names = {"captioning": ["caption"], "vqa": ["question", "answer"], "classification": ["class"]}[task]
    if not isinstance(template, str) or template.count(MEDIA_TOKEN) != 1:
        raise ConfigError(f"{where}: the prompt needs exactly one {MEDIA_TOKEN}, got {template!r}")
    for name in names:
        if template.count("{" + name + "}") != 1:
            raise ConfigError(f"{where}: the {task} prompt needs {{{name}}} exactly once, got {template!r}")
    answer = "{" + ANSWER_FIELD[task] + "}"
    if any(template.index("{" + n + "}") > template.index(answer) for n in names):
        raise ConfigError(f"{where}: {answer} must come after the prompt's other fields, got {template!r}")
    return template


def query_text(template: str, task: str, fields: dict[str, str]) -> str:
    """The query: the template up to its answer field (trailing spaces dropped), filled."""
    cut = template[: template.index("{" + ANSWER_FIELD[task] + "}")].rstrip()
    return fill(cut, fields)


def build_prompt(template: str, task: str, demos: list[dict[str, str]], query: dict[str, str], zero_shot: bool) -> str:
    """Demonstrations then the query, joined without separators; ``zero_shot``: the
    demonstrations lose their ``<image>`` (text only, as OpenFlamingo's 0-shot)."""
    shown = [fill(template, d) for d in demos]
    if zero_shot:
        shown = [s.replace(MEDIA_TOKEN, "") for s in shown]
    return "".join(shown) + query_text(template, task, query)


def postprocess_caption(text: str) -> str:
    """A generated caption up to ``Output`` or a new line (OpenFlamingo)."""
    return text.split("Output", 1)[0].split("\n", 1)[0].strip()


def postprocess_answer(text: str) -> str:
    """A generated answer as OpenFlamingo cuts it (first line, before ``Question`` /
    ``Answer`` / ``Short``, before ``", "``), then the official VQA normalisation."""
    text = text.split("\n", 1)[0]
    text = re.split("Question|Answer|Short", text, maxsplit=1)[0]
    return normalize_answer(re.split(", ", text, maxsplit=1)[0])


# -- demonstrations --------------------------------------------------------------------------
def _seed_of(seed: int, key: str) -> int:
    return int.from_bytes(hashlib.blake2b(f"{seed}:{key}".encode(), digest_size=8).digest(), "little")


def random_demos(
    num_support: int, k: int, seed: int, key: str, exclude: set[int] | frozenset = frozenset()
) -> list[int]:
    """``k`` distinct support indices drawn for the query ``key``, none of ``exclude`` (the
    query's own items): a function of (seed, key, num_support, exclude) only; the first ``j``
    of them are the draw for ``j`` shots. With nothing excluded the draw is unchanged."""
    pool = [i for i in range(num_support) if i not in exclude] if exclude else range(num_support)
    if k > len(pool):
        left = f" ({len(exclude)} of them the query's own)" if exclude else ""
        raise ConfigError(f"{k} demonstrations asked for {key} from a support set of {num_support}{left}")
    return random.Random(_seed_of(seed, key)).sample(pool, k)


def rices_demos(
    query: torch.Tensor, support: torch.Tensor, k: int, exclude: list[set[int]] | None = None
) -> list[list[int]]:
    """RICES: per query (B, D) the ``k`` support items (N, D) of highest cosine similarity,
    ordered from the least to the most similar (the most similar last, next to the query);
    ``exclude[b]``: support indices query ``b`` may not get (its own items). Ties go to the
    lower support index."""
    most = max((len(e) for e in exclude), default=0) if exclude else 0
    if k > len(support) - most:
        left = f" ({most} of them a query's own)" if most else ""
        raise ConfigError(f"{k} demonstrations asked from a support set of {len(support)}{left}")
    sims = F.normalize(query.float(), dim=-1) @ F.normalize(support.float(), dim=-1).T  # (B, N)
    for b, own in enumerate(exclude or ()):
        if own:
            sims[b, sorted(own)] = float("-inf")  # never the query itself, however similar
    order = torch.argsort(-sims, dim=1, stable=True)[:, :k]  # (B, k) most similar first
    return order.flip(1).tolist()


def take(demos: list[int], shots: int, how: str) -> list[int]:
    """The demonstrations of ``shots`` from the longest list drawn: the first of a random draw,
    the most similar (the end) of a RICES list; 0 shots: two text-only demonstrations."""
    n = shots or ZERO_SHOT_DEMOS
    return demos[:n] if how == "random" else demos[len(demos) - n :]


# -- the support set -------------------------------------------------------------------------
@dataclass
class Support:
    """Decoded support items: ``images`` (N, 3, H, W) uint8 and each item's text fields."""

    name: str
    modality: str
    keys: list[str]
    images: torch.Tensor
    texts: list[str]  # the demonstration's answer: caption / answer / class name
    questions: list[str] = field(default_factory=list)  # vqa
    all_answers: list[list[str]] = field(default_factory=list)  # vqa: every human answer
    skipped: int = 0
    image_ids: list[int | None] = field(default_factory=list)  # pair / retrieval / vqa
    shards: list[str] = field(default_factory=list)  # the split's shard urls

    def __post_init__(self) -> None:
        self._by_key = {_canonical_key(k): i for i, k in enumerate(self.keys)}
        self._shards = {_canonical_url(u) for u in self.shards}
        self._by_image: dict[int, list[int]] = {}
        for i, image_id in enumerate(self.image_ids):
            if image_id is not None:
                self._by_image.setdefault(int(image_id), []).append(i)

    def __len__(self) -> int:
        return len(self.keys)

    def own(self, key: str, image_id: int | None = None) -> set[int]:
        """The support items a query may not see as demonstrations: the one of its key (the
        support split is the query split) and, when the query comes from the support's
        shards, those of its image (``image_id``: another caption or question of it)."""
        key = _canonical_key(key)
        out = {self._by_key[key]} if key in self._by_key else set()
        url = key.rpartition(":")[0]
        if image_id is not None and url in self._shards:
            out.update(self._by_image.get(int(image_id), ()))
        return out


def _canonical_url(url: str) -> str:
    """A local shard's real path (``file:`` and relative forms of one file agree)."""
    if "://" in url or url.startswith("pipe:"):
        return url
    return os.path.realpath(os.path.expanduser(url.removeprefix("file:")))


def _canonical_key(key: str) -> str:
    """A sample key ``{url}:{__key__}`` with its url made canonical."""
    url, sep, name = str(key).rpartition(":")
    return f"{_canonical_url(url)}:{name}" if sep and url else str(key)


def load_support(
    manifest: str,
    split: str,
    *,
    image_size: int,
    norm,
    max_support: int,
    classnames: list[str] | None = None,
    where: str = "evaluation.fewshot.support",
) -> Support:
    """The first ``max_support`` good items of a split, in shard order (the same on every rank):
    decoded as the data pipeline decodes them, images resized and centre-cropped (uint8)."""
    m = load_manifest(resolve_path(manifest))
    try:
        s = m.split(split)
    except (ConfigError, KeyError) as e:
        raise ConfigError(f"{where}: {e}") from None
    modality = m.modality_of(split)
    urls = expand_urls(s.urls)
    decode = SampleDecoder(modality, m.fields, ImageTransform(image_size, norm=norm, normalize=False))
    keys, images, texts, questions, answers, image_ids, skipped = [], [], [], [], [], [], 0
    for sample in read_shards(urls):
        if len(keys) >= max_support:
            break
        item = decode(sample)
        if isinstance(item, Skipped):
            skipped += item.count
            continue
        keys.append(item["key"])
        images.append(item["image"])
        if modality == "pair":
            texts.append(item["text"])
            image_ids.append(item.get("image_id"))
        elif modality == "retrieval":
            texts.append(item["captions"][0])
            image_ids.append(item.get("image_id"))
        elif modality == "vqa":
            if not item["answers"]:
                skipped += 1
                keys.pop(), images.pop()
                continue
            image_ids.append(item.get("image_id"))
            questions.append(item["text"])
            answers.append(item["answers"])
            texts.append(item["answers"][0])
        elif modality == "image":
            if classnames is None or not 0 <= item["label"] < len(classnames):
                raise DataError(f"{where}: support item {item['key']} has label {item['label']} outside the classes")
            texts.append(classnames[item["label"]])
            image_ids.append(None)
        else:
            raise ConfigError(f"{where}: {m.name}/{split} is {modality!r} data: no demonstrations in it")
    if not keys:
        raise DataError(f"{where}: no usable item in {m.name}/{split} ({skipped} skipped)")
    if skipped:
        log.warning("%s: %d support samples of %s/%s skipped", where, skipped, m.name, split)
    return Support(
        f"{m.name}/{split}",
        modality,
        keys,
        torch.stack(images),
        texts,
        questions,
        answers,
        skipped,
        image_ids=image_ids,
        shards=urls,
    )


def _most_frequent(values: list[str]) -> str:
    """The most frequent value, ties to the first seen."""
    counts = Counter(values)
    return max(counts, key=lambda v: counts[v])  # Counter keeps first-seen order


# -- the evaluator ---------------------------------------------------------------------------
class FewShotEvaluator(Evaluator):
    """In-context evaluation at several shot counts; one score row per count.

    Scores: captioning ``cider@k`` / ``bleu4@k`` (percent, pycocoevalcap's), VQA
    ``vqa_acc@k`` (official accuracy, percent), classification ``top1@k`` (and ``top5@k``
    with at least 5 classes). ``chance`` holds the constant baselines under the same names:
    the most frequent support caption for every query (CIDEr-D, BLEU-4), the most frequent
    normalised support answer (VQA accuracy), 100 k / C (classification).

    Options (``evaluation: {fewshot: {...}}``, :data:`OPTIONS`): ``task`` (default from the
    query modality), ``support: {manifest, split}``, ``shots`` ([0, 4, 8]), ``demos``
    (random | rices), ``seed``, ``max_new_tokens`` (20 captioning, 5 VQA), ``num_beams`` (3),
    ``length_penalty`` (0), ``prompt`` (a demonstration template, :data:`PROMPTS`),
    ``max_support`` (2000), ``classes`` (a classes.json or a list; default the manifest's),
    ``batch_size`` (rows per forward when ranking classes), ``max_prompt_length`` (default the
    LM's positions less ``max_new_tokens``), ``image_size`` / ``norm`` (outside a Trainer: the
    support's preprocessing; inside, the datamodule's).
    """

    prefix_scores = False

    def __init__(self, modality: str = "", tokenizer=None) -> None:
        super().__init__()
        self.modality, self.tokenizer = modality, tokenizer
        self.task, self.where, self.name = "fewshot", "evaluation.fewshot", ""
        self.records: list[tuple[str, dict]] = []
        self.support: Support | None = None
        self._support_feats: torch.Tensor | None = None
        self._transform: ImageTransform | None = None
        self.counts: dict = {}

    # -- options -----------------------------------------------------------------------------
    def configure(self, source) -> None:
        self.where = f"{source.where}.evaluation.fewshot" if source.where else "evaluation.fewshot"
        self.name = source.name
        other = sorted(set(source.options) - {"fewshot"})
        if other:
            raise ConfigError(f"{self.where}: unknown evaluation options {other} beside fewshot")
        opts = source.options.get("fewshot")
        if not isinstance(opts, dict):
            raise ConfigError(
                f"{source.where or 'evaluation'} ({source.name or self.modality}): a Flamingo model evaluates "
                f"{self.modality or 'this'} data in context: set evaluation: {{fewshot: {{support: "
                "{manifest: ..., split: train}, shots: [0, 4]}} on the source"
            )
        unknown = sorted(set(opts) - set(OPTIONS))
        if unknown:
            raise ConfigError(f"{self.where}: unknown keys {unknown} (known: {list(OPTIONS)})")
        task = opts.get("task") or next((t for t, mods in MODALITIES.items() if self.modality in mods), None)
        if task not in MODALITIES:
            raise ConfigError(f"{self.where}.task must be one of {list(MODALITIES)}, got {opts.get('task')!r}")
        if self.modality and self.modality not in MODALITIES[task]:
            raise ConfigError(
                f"{self.where}: {task} queries come from {'/'.join(MODALITIES[task])} data, "
                f"this source is {self.modality!r}"
            )
        self.kind = task
        self.task = f"fewshot_{task}"
        support = opts.get("support")
        if not isinstance(support, dict) or not support.get("manifest"):
            raise ConfigError(f"{self.where}.support: needs {{manifest: path, split: name}} (the demonstrations)")
        extra = sorted(set(support) - {"manifest", "split"})
        if extra:
            raise ConfigError(f"{self.where}.support: unknown keys {extra} (known: manifest, split)")
        path = resolve_path(support["manifest"])
        manifest = load_manifest(path)  # a missing file is a ConfigError naming it
        self.support_manifest, self.support_split = path, str(support.get("split", "train"))
        try:
            modality = manifest.modality_of(self.support_split)
        except (ConfigError, KeyError) as e:
            raise ConfigError(f"{self.where}.support: {e}") from None
        if modality not in MODALITIES[task]:
            raise ConfigError(
                f"{self.where}.support: {manifest.name}/{self.support_split} is {modality!r} data; "
                f"{task} demonstrations come from {'/'.join(MODALITIES[task])}"
            )
        self.support_size = int(manifest.split(self.support_split).num_samples)
        shots = opts.get("shots", [0, 4, 8])
        shots = [shots] if isinstance(shots, int) else shots
        if (
            not isinstance(shots, list | tuple)
            or not shots
            or any(isinstance(s, bool) or not isinstance(s, int) or s < 0 for s in shots)
        ):
            raise ConfigError(f"{self.where}.shots must be a list of integers >= 0, got {shots!r}")
        self.shots = sorted(set(shots))
        self.demos = opts.get("demos", "random")
        if self.demos not in DEMOS:
            raise ConfigError(f"{self.where}.demos must be one of {list(DEMOS)}, got {self.demos!r}")
        self.seed = _int(opts, "seed", 0, self.where, minimum=None)
        self.max_support = _int(opts, "max_support", 2000, self.where)
        self.max_new_tokens = _int(opts, "max_new_tokens", 5 if task == "vqa" else 20, self.where)
        self.num_beams = _int(opts, "num_beams", 3, self.where)
        self.batch_size = _int(opts, "batch_size", 64, self.where)
        self.length_penalty = opts.get("length_penalty", 0.0)
        if isinstance(self.length_penalty, bool) or not isinstance(self.length_penalty, int | float):
            raise ConfigError(f"{self.where}.length_penalty must be a number, got {self.length_penalty!r}")
        self.max_prompt_length = opts.get("max_prompt_length")
        self.image_size, self.norm = opts.get("image_size"), opts.get("norm")
        available = min(self.support_size, self.max_support)
        # demonstrations drawn per query: the most shots (0 shots: two text-only ones)
        self.num_draw = need = max(max(self.shots), ZERO_SHOT_DEMOS if 0 in self.shots else 0)
        if need > available:
            raise ConfigError(
                f"{self.where}.shots: {need} demonstrations per query but the support set has {available} items "
                f"({manifest.name}/{self.support_split}, max_support {self.max_support})"
            )
        prompt = opts.get("prompt") or PROMPTS[task]
        self.prompt = check_prompt(prompt, task, f"{self.where}.prompt")
        self.classnames = None
        if task == "classification":
            classes = (
                opts.get("classes")
                or classes_of(source.extra, source.split)
                or classes_of(manifest.extra, self.support_split)  # the support's own classes
            )
            if isinstance(classes, list | tuple) and classes:
                self.classnames = [str(c) for c in classes]
            elif isinstance(classes, str):
                self.classnames, _ = load_classes(classes, ["{}"])
            else:
                raise ConfigError(
                    f"{self.where}.classes: classification needs the class names (a classes.json or a list; "
                    "or the manifest's extra.classes)"
                )
        self.tokenizer = self.tokenizer or source.tokenizer
        if self.tokenizer is None:
            raise ConfigError(f"{self.where}: few-shot prompts need data.tokenizer")

    # -- set-up on first use -----------------------------------------------------------------
    def _prepare(self, model: nn.Module, batch: dict | None) -> None:
        if self.support is not None:
            return
        dm = model._datamodule() if hasattr(model, "_datamodule") else None
        size = self.image_size or getattr(dm, "image_size", None)
        if size is None and batch is not None:
            size = int(batch["image"].shape[-1])
        norm = self.norm or getattr(dm, "norm", None) or "clip"
        if size is None:
            raise ConfigError(f"{self.where}.image_size: needed to read the support images outside a Trainer")
        self._transform = ImageTransform(int(size), norm=norm)
        self.support = load_support(
            self.support_manifest,
            self.support_split,
            image_size=int(size),
            norm=norm,
            max_support=self.max_support,
            classnames=self.classnames,
            where=f"{self.where}.support",
        )
        need = self.num_draw
        if need > len(self.support):
            raise ConfigError(
                f"{self.where}.shots: {need} demonstrations per query but only {len(self.support)} support "
                f"items of {self.support.name} could be read"
            )
        tok = copy.copy(self.tokenizer)
        positions = _lm_positions(model)
        limit = self.max_prompt_length or (positions - self.max_new_tokens if positions else 4096)
        tok.max_length = int(limit) + 2  # room for an end token and one more: a cut prompt is too long
        self._tok, self._limit = tok, int(limit)
        try:
            self._end_id = tok.start_end_ids[1]
        except ConfigError:
            self._end_id = None  # a tokenizer that adds no end token (GPT-2)
        self._media_id = tok.token_id(MEDIA_TOKEN)

    def _device(self, model: nn.Module) -> torch.device:
        p = next(model.parameters(), None)
        return p.device if p is not None else torch.device("cpu")

    def _support_images(self, index: list[int], device) -> torch.Tensor:
        return self._transform.normalize_batch(self.support.images[index].to(device))  # (k, 3, H, W)

    @torch.no_grad()
    def _features(self, model: nn.Module, images: torch.Tensor) -> torch.Tensor:
        return F.normalize(model.vision_encoder(images).pooled.float(), dim=-1)  # (B, Dv)

    def _rices_features(self, model: nn.Module) -> torch.Tensor:
        if self._support_feats is None:
            device, n = self._device(model), len(self.support)
            parts = [
                self._features(model, self._support_images(list(range(s, min(n, s + 64))), device))
                for s in range(0, n, 64)
            ]
            self._support_feats = torch.cat(parts)  # (N, Dv)
        return self._support_feats

    # -- tokens ------------------------------------------------------------------------------
    def _encode(self, texts: list[str], what: str) -> list[list[int]]:
        """Token ids of each prompt without the tokenizer's end token (the model continues it)."""
        enc = self._tok(texts)
        rows = []
        for ids, mask in zip(enc["input_ids"], enc["attention_mask"], strict=True):
            row = ids[mask.bool()].tolist()
            if self._end_id is not None and row and row[-1] == self._end_id:
                row = row[:-1]
            if len(row) > self._limit:
                raise ConfigError(
                    f"{self.where}: a {what} prompt has more than {self._limit} tokens (max_prompt_length, the LM's "
                    "positions less max_new_tokens): use fewer shots or a shorter prompt"
                )
            rows.append(row)
        return rows

    def _pad(self, rows: list[list[int]], device) -> tuple[torch.Tensor, torch.Tensor]:
        """Right-padded (B, L) ids and mask."""
        length = max(len(r) for r in rows)
        ids = torch.full((len(rows), length), int(self._tok.pad_token_id), dtype=torch.long)
        mask = torch.zeros(len(rows), length, dtype=torch.bool)
        for i, r in enumerate(rows):
            ids[i, : len(r)] = torch.tensor(r, dtype=torch.long)
            mask[i, : len(r)] = True
        return ids.to(device), mask.to(device)

    # -- the query items of a batch ----------------------------------------------------------
    def _queries(self, batch: dict) -> list[dict]:
        """Per query item: its key, its prompt fields and what it is scored against."""
        keys = [str(k) for k in batch["keys"]]
        n = len(keys)
        ids = batch["image_id"].view(-1).tolist() if "image_id" in batch else [None] * n
        return [{**q, "image_id": i} for q, i in zip(self._query_fields(batch, keys), ids, strict=True)]

    def _query_fields(self, batch: dict, keys: list[str]) -> list[dict]:
        n = len(keys)
        if self.kind == "captioning":
            if "captions" in batch:
                refs = [list(c) for c in batch["captions"]]
            else:
                texts = self._decode_text(batch)
                owner = batch["text_image_id"].view(-1).tolist()
                ids = batch["image_id"].view(-1).tolist()
                refs = [[t for t, o in zip(texts, owner, strict=True) if o == i] for i in ids]
            return [{"key": k, "fields": {}, "refs": r} for k, r in zip(keys, refs, strict=True)]
        if self.kind == "vqa":
            if "questions" in batch:
                questions = list(batch["questions"])
            else:
                questions = self._decode_text(batch)
            return [
                {"key": k, "fields": {"question": q}, "answers": list(a)}
                for k, q, a in zip(keys, questions, batch["answers"], strict=True)
            ]
        labels = batch["label"].view(-1).tolist()
        return [{"key": keys[i], "fields": {}, "label": int(labels[i])} for i in range(n)]

    def _decode_text(self, batch: dict) -> list[str]:
        """The batch's texts (questions, captions) back from their tokens (padding dropped)."""
        pad = int(self.tokenizer.pad_token_id)
        return self.tokenizer.decode(batch["text_ids"].masked_fill(~batch["text_mask"].bool(), pad))

    def _demo_fields(self, i: int) -> dict[str, str]:
        s = self.support
        if self.kind == "captioning":
            return {"caption": s.texts[i]}
        if self.kind == "vqa":
            return {"question": s.questions[i], "answer": s.texts[i]}
        return {"class": s.texts[i]}

    def _draw(self, model: nn.Module, queries: list[dict], images: torch.Tensor) -> list[list[int]]:
        """Each query's demonstrations, never its own items (the support split may be the
        query split): a function of the query alone, whatever the rank or batch."""
        k, n = self.num_draw, len(self.support)
        own = [self.support.own(q["key"], q["image_id"]) for q in queries]
        for q, o in zip(queries, own, strict=True):
            if k > n - len(o):
                raise ConfigError(
                    f"{self.where}.shots: {k} demonstrations per query but {q['key']} may use only {n - len(o)} of "
                    f"the {n} support items of {self.support.name} ({len(o)} are its own: the support split is the "
                    "query split)"
                )
        if self.demos == "random":
            return [random_demos(n, k, self.seed, q["key"], o) for q, o in zip(queries, own, strict=True)]
        return rices_demos(self._features(model, images), self._rices_features(model), k, own)

    # -- update ------------------------------------------------------------------------------
    @torch.no_grad()
    def update(self, model: nn.Module, output, batch: dict) -> None:
        self.model = model
        if "image" not in batch or "keys" not in batch:
            raise ConfigError(f"{self.where}: query batches need 'image' and 'keys' ({batch.get('modality')!r} data)")
        self._prepare(model, batch)
        device = self._device(model)
        queries = self._queries(batch)
        images = self._transform.normalize_batch(batch["image"].to(device))  # (B, 3, H, W)
        drawn = self._draw(model, queries, images)
        results = [{"pred": {}} for _ in queries]
        for shots in self.shots:
            demos = [take(d, shots, self.demos) for d in drawn]
            prompts = [
                build_prompt(self.prompt, self.kind, [self._demo_fields(i) for i in d], q["fields"], shots == 0)
                for d, q in zip(demos, queries, strict=True)
            ]
            stacked = torch.stack(
                [
                    torch.cat([self._support_images(d, device), images[b : b + 1]])
                    if shots
                    else images[b : b + 1]  # 0 shots: the query's image alone
                    for b, d in enumerate(demos)
                ]
            )  # (B, M, 3, H, W)
            if self.kind == "classification":
                out = self._rank(model, prompts, stacked, device)
                for r, top in zip(results, out, strict=True):
                    r["pred"][shots] = top
            else:
                for r, text in zip(results, self._generate(model, prompts, stacked, device), strict=True):
                    r["pred"][shots] = (
                        postprocess_caption(text) if self.kind == "captioning" else postprocess_answer(text)
                    )
        for q, r in zip(queries, results, strict=True):
            record = {k: v for k, v in q.items() if k not in ("key", "fields", "image_id")}
            self.records.append((q["key"], {**record, **r}))

    def _generate(self, model: nn.Module, prompts: list[str], images: torch.Tensor, device) -> list[str]:
        ids, mask = self._pad(self._encode(prompts, self.kind), device)
        tokens = model.generate(
            ids,
            mask,
            images,
            torch.ones(images.shape[:2], dtype=torch.bool, device=device),
            max_new_tokens=self.max_new_tokens,
            num_beams=self.num_beams,
            length_penalty=self.length_penalty,
        )
        width = max(1, max(len(t) for t in tokens))
        padded = torch.full((len(tokens), width), int(self._tok.pad_token_id), dtype=torch.long)
        for i, t in enumerate(tokens):
            padded[i, : len(t)] = torch.tensor(t, dtype=torch.long)
        texts = self._tok.decode(padded)
        return [t if len(tok) else "" for t, tok in zip(texts, tokens, strict=True)]

    def _rank(self, model: nn.Module, prompts: list[str], images: torch.Tensor, device) -> list[list[int]]:
        """Per prompt, the classes (indices) by the summed log-likelihood of their name's
        tokens after the prompt, best first (the top 5)."""
        names = self.classnames
        C = len(names)
        # the template's text between its query cut and {class} ("A photo of a {class}": " ")
        cut = self.prompt[: self.prompt.index("{class}")]
        gap = cut[len(cut.rstrip()) :]
        contexts = self._encode(prompts, "classification")
        full = self._encode([p + gap + c for p in prompts for c in names], "classification")
        rows, labels = [], []
        for b, context in enumerate(contexts):
            for c in range(C):
                ids = full[b * C + c]
                start = _common_prefix(context, ids)
                target = [IGNORE] * len(ids)
                for t in range(max(start, 1), len(ids)):
                    target[t - 1] = ids[t]
                rows.append(ids)
                labels.append(target)
        scores = []
        for s in range(0, len(rows), self.batch_size):
            chunk = list(range(s, min(len(rows), s + self.batch_size)))
            ids, mask = self._pad([rows[i] for i in chunk], device)
            lab = torch.full(ids.shape, IGNORE, dtype=torch.long)
            for j, i in enumerate(chunk):
                lab[j, : len(labels[i])] = torch.tensor(labels[i], dtype=torch.long)
            batch = {
                "text_ids": ids,
                "text_mask": mask,
                "media_mask": (ids == self._media_id) & mask,
                "images": images[[i // C for i in chunk]],
                "images_mask": torch.ones(len(chunk), images.shape[1], dtype=torch.bool, device=device),
                "lm_labels": lab.to(device),
            }
            scores.append(model.token_logprobs(batch).sum(1).float().cpu())  # (b,)
        table = torch.cat(scores).view(len(prompts), C)  # (B, C)
        top = torch.argsort(-table, dim=1, stable=True)[:, : min(5, C)]
        return top.tolist()

    # -- compute -----------------------------------------------------------------------------
    def _summary(self) -> dict | None:
        """What the baselines need of the support set (None: this rank never loaded it)."""
        s = self.support
        if s is None:
            return None
        if self.kind == "vqa":
            constant = _most_frequent([normalize_answer(a) for answers in s.all_answers for a in answers])
        elif self.kind == "captioning":
            constant = _most_frequent(s.texts)
        else:
            constant = None
        return {"name": s.name, "items": len(s), "constant": constant}

    def _gathered(self) -> tuple[dict[str, dict], dict | None]:
        """Every rank's records, one per key (the first seen in rank order), sorted by key,
        and the support's summary of the first rank that loaded it."""
        items: dict[str, dict] = {}
        summary = None
        for part, info in gather_objects((self.records, self._summary())):
            summary = summary or info
            for key, record in part:
                items.setdefault(key, record)
        self.records = []
        return {k: items[k] for k in sorted(items)}, summary

    def compute(self) -> dict[str, float]:
        items, summary = self._gathered()
        if not items or summary is None:
            raise ConfigError(f"{self.where} ({self.name}): no query item was evaluated")
        n = len(items)
        scores, chance = {}, {}
        constant = summary["constant"]
        if self.kind == "captioning":
            refs = {k: [" ".join(tokenize(r)) for r in v["refs"]] for k, v in items.items()}
            for s in self.shots:
                cands = {k: " ".join(tokenize(v["pred"][s])) for k, v in items.items()}
                scores[f"cider@{s}"] = 100 * cider_d(cands, refs)[0]
                scores[f"bleu4@{s}"] = 100 * bleu(cands, refs)[0][3]
            cands = dict.fromkeys(items, " ".join(tokenize(constant)))
            base = {"cider": 100 * cider_d(cands, refs)[0], "bleu4": 100 * bleu(cands, refs)[0][3]}
            chance = {f"{m}@{s}": base[m] for s in self.shots for m in ("cider", "bleu4")}
        elif self.kind == "vqa":
            for s in self.shots:
                scores[f"vqa_acc@{s}"] = 100 * sum(vqa_accuracy(v["pred"][s], v["answers"]) for v in items.values()) / n
            base = 100 * sum(vqa_accuracy(constant, v["answers"]) for v in items.values()) / n
            chance = {f"vqa_acc@{s}": base for s in self.shots}
        else:
            C = len(self.classnames)
            ks = accuracy_ks(C)
            for s in self.shots:
                for k in ks:
                    hits = sum(v["label"] in v["pred"][s][:k] for v in items.values())
                    scores[f"top{k}@{s}"] = 100 * hits / n
            chance = {f"top{k}@{s}": 100 * k / C for s in self.shots for k in ks}
            constant = f"100 k / {C} classes"
        self.chance, self.baseline = chance, constant
        self.counts = {
            "num_items": n,
            "support": summary["name"],
            "support_items": summary["items"],
            "shots": list(self.shots),
            "demos": self.demos,
            "seed": self.seed,
        }
        return scores

    def table(self, scores: dict[str, float], title: str) -> str:
        metrics = list(dict.fromkeys(k.split("@")[0] for k in scores))
        head = f"  {'shots':10}" + "".join(f"{m:>10}" for m in metrics)
        rows = [head]
        for s in self.shots:
            rows.append(f"  {s:<10}" + "".join(f"{scores[f'{m}@{s}']:10.2f}" for m in metrics))
        first = self.shots[0]
        rows.append(
            f"  {'constant':10}" + "".join(f"{self.chance.get(f'{m}@{first}', float('nan')):10.2f}" for m in metrics)
        )
        c = self.counts
        how = (
            f"{c['num_items']} queries; {c['demos']} demonstrations from {c['support_items']} items of {c['support']}"
            f" (seed {c['seed']}); 0 shots: {ZERO_SHOT_DEMOS} text-only demonstrations; constant: {self.baseline!r}"
        )
        return f"{title} ({how})\n" + "\n".join(rows)

    def extra(self) -> dict:
        return dict(self.counts)


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def _lm_positions(model: nn.Module) -> int | None:
    config = getattr(getattr(model, "lang_model", None), "config", None)
    for name in ("n_positions", "max_position_embeddings"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def _int(opts: dict, name: str, default: int, where: str, minimum: int | None = 1) -> int:
    value = opts.get(name, default)
    if isinstance(value, bool) or not isinstance(value, int) or (minimum is not None and value < minimum):
        raise ConfigError(
            f"{where}.{name} must be an integer{f' >= {minimum}' if minimum is not None else ''}, got {value!r}"
        )
    return value
