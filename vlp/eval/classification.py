"""Image classification through a contrastive space: zero-shot prompts and a linear probe.

Zero-shot (CLIP's protocol): every class name is written into every prompt template
(``"a photo of a {}."``), each text is embedded by the model's text side through its normal
forward on a text-only batch (``model({"text_ids", "text_mask"}).text_embeds``), the
normalised template embeddings of a class are averaged and renormalised; an image's
``image_embeds`` is classified by its cosine with each class, top-1 / top-5 accuracy.

Linear probe: multinomial logistic regression (L-BFGS, full batch, L2 penalty chosen on a
held-out fifth of the training features from a small grid) on frozen image features
(``model.probe_features(output, batch)``) of a training split, scored on the evaluated split.

In a recipe, an ``image`` evaluation source names its class file through its manifest's
``extra.classes`` (``vlp data synth`` and ``vlp data convert`` write it) or its own
``evaluation: {classes: ..., templates: ...}``; a source with ``evaluation: {probe_train:
true}`` feeds the probe of every other image source of the same manifest in that stage
(docs/evaluation.md).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from vlp.errors import ConfigError
from vlp.eval.evaluator import Evaluator
from vlp.utils.distributed import all_reduce_sum, gather_cat, gather_objects
from vlp.utils.paths import resolve_path

#: L2 penalties (on standardised features) the probe chooses from on held-out training features.
DEFAULT_L2_GRID = (1e-4, 1e-3, 1e-2, 1e-1, 1.0)

#: Keys of an image source's ``evaluation`` options.
OPTIONS = ("classes", "templates", "zero_shot", "probe", "probe_l2", "probe_train")


# -- class names and templates ---------------------------------------------------------------
def load_classes(path: str, templates: str | list[str] | None = None) -> tuple[list[str], list[str]]:
    """(class names, prompt templates) from a ``classes.json``: an object with a
    ``classnames`` list and a template list under ``templates`` (or the key ``templates``
    names, e.g. ``simple_imagenet_templates``); a list passed as ``templates`` is used as is."""
    file = resolve_path(path)
    try:
        with open(file, encoding="utf-8") as f:
            data = json.load(f)
    except FileNotFoundError:
        raise ConfigError(f"class names file not found: {file}") from None
    except ValueError as e:
        raise ConfigError(f"cannot read class names from {file}: {e}") from None
    if not isinstance(data, dict) or not isinstance(data.get("classnames"), list) or not data["classnames"]:
        raise ConfigError(f"{file}: expected an object with a non-empty 'classnames' list")
    names = [str(c) for c in data["classnames"]]
    if isinstance(templates, list | tuple):
        chosen, where = list(templates), "the templates given"
    else:
        key = templates or "templates"
        if not isinstance(data.get(key), list):
            lists = sorted(k for k, v in data.items() if isinstance(v, list) and k != "classnames")
            raise ConfigError(
                f"{file} has no template list {key!r}; its lists: {lists} (choose one with evaluation.templates)"
            )
        chosen, where = data[key], f"{file} [{key}]"
    check_templates(chosen, where)
    return names, [str(t) for t in chosen]


def classes_of(extra: dict, split: str = "") -> str | None:
    """The class file a manifest's ``extra`` names: ``classes`` (``vlp data synth``) or, for a
    split written by ``vlp data convert``, ``converted.<split>.classes``."""
    converted = (extra.get("converted") or {}).get(split) or {}
    return extra.get("classes") or converted.get("classes")


def check_templates(templates: list, where: str) -> None:
    """Each template is a string with one ``{}`` for the class name."""
    if not templates:
        raise ConfigError(f"{where}: no prompt templates")
    bad = [t for t in templates if not isinstance(t, str) or t.count("{}") != 1]
    if bad:
        raise ConfigError(f"{where}: templates need exactly one '{{}}' for the class name, got {bad[:3]}")


def _device(model: nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


@torch.no_grad()
def zero_shot_weights(
    model: nn.Module, tokenizer, classnames: list[str], templates: list[str], *, batch_size: int = 256
) -> torch.Tensor:
    """(C, E) normalised class embeddings: the mean of each class's normalised template
    embeddings (``model(text-only batch).text_embeds``), renormalised."""
    texts = [t.format(c) for c in classnames for t in templates]
    device, parts = _device(model), []
    for s in range(0, len(texts), batch_size):
        enc = tokenizer(texts[s : s + batch_size])
        batch = {
            "modality": "text",
            "text_ids": enc["input_ids"].to(device),
            "text_mask": enc["attention_mask"].to(device),
        }
        embeds = model(batch).text_embeds  # (b, E)
        if embeds is None:
            raise ConfigError(f"{type(model).__name__} gave no text_embeds for a text-only batch: no zero-shot")
        parts.append(F.normalize(embeds.float(), dim=-1))
    per_template = torch.cat(parts).view(len(classnames), len(templates), -1)  # (C, T, E)
    return F.normalize(per_template.mean(1), dim=-1)  # (C, E)


def topk_hits(logits: torch.Tensor, labels: torch.Tensor, ks: tuple[int, ...]) -> dict[int, int]:
    """Samples whose label is among the ``k`` highest logits (N, C), for each k."""
    if not len(labels):
        return dict.fromkeys(ks, 0)
    top = logits.topk(max(ks), dim=1).indices  # (N, kmax)
    hit = top == labels.view(-1, 1).to(top.device)  # (N, kmax)
    return {k: int(hit[:, :k].any(1).sum()) for k in ks}


def accuracy_ks(num_classes: int) -> tuple[int, ...]:
    """Top-1, and top-5 when there are at least 5 classes."""
    return (1, 5) if num_classes >= 5 else (1,)


# -- the linear probe ------------------------------------------------------------------------
@dataclass
class LinearProbe:
    """A multinomial logistic regression on standardised features: ``logits(x)`` (N, C)."""

    weight: torch.Tensor  # (C, D)
    bias: torch.Tensor  # (C,)
    mean: torch.Tensor  # (D,) of the training features
    std: torch.Tensor  # (D,)
    l2: float
    held_out: dict[float, float] = field(default_factory=dict)  # held-out accuracy (%) per l2

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        z = (x.to(self.weight) - self.mean) / self.std  # (N, D)
        return z @ self.weight.T + self.bias  # (N, C)


def logistic_regression(
    x: torch.Tensor, y: torch.Tensor, num_classes: int, l2: float, *, max_iter: int = 200
) -> tuple[torch.Tensor, torch.Tensor]:
    """Minimise ``mean cross-entropy + l2 / 2 * ||W||^2`` (bias not penalised) from zeros with
    full-batch L-BFGS → (W (C, D), b (C,)). Gradients are written analytically, so it runs
    the same under ``no_grad`` / ``inference_mode`` (Lightning's evaluation) as outside."""
    n, d = x.shape
    w = torch.zeros(num_classes, d, dtype=x.dtype, device=x.device)
    b = torch.zeros(num_classes, dtype=x.dtype, device=x.device)
    onehot = F.one_hot(y, num_classes).to(x.dtype)  # (N, C)
    opt = torch.optim.LBFGS(
        [w, b],
        lr=1.0,
        max_iter=max_iter,
        history_size=20,
        tolerance_grad=1e-9,
        tolerance_change=1e-12,
        line_search_fn="strong_wolfe",
    )

    def closure() -> torch.Tensor:
        logits = x @ w.T + b  # (N, C)
        logp = logits.log_softmax(1)
        loss = -(onehot * logp).sum() / n + l2 / 2 * w.pow(2).sum()
        g = (logp.exp() - onehot) / n  # (N, C) d loss / d logits
        w.grad, b.grad = g.T @ x + l2 * w, g.sum(0)
        return loss

    with torch.no_grad():
        opt.step(closure)
    return w, b


def fit_linear_probe(
    features: torch.Tensor,
    labels: torch.Tensor,
    num_classes: int,
    *,
    l2_grid: tuple[float, ...] = DEFAULT_L2_GRID,
    held_out: float = 0.2,
    max_iter: int = 200,
    seed: int = 0,
) -> LinearProbe:
    """Fit a :class:`LinearProbe` on (N, D) ``features`` with labels in ``0..num_classes-1``
    (float64, deterministic). With several ``l2_grid`` values and at least 10 samples, each is
    fitted on a seeded ``1 - held_out`` part and scored on the rest; the best (ties: the
    larger penalty) is refitted on every sample."""
    if features.ndim != 2 or len(features) != len(labels) or not len(labels):
        raise ConfigError(
            f"the linear probe needs (N, D) features with N labels, N > 0; got {tuple(features.shape)} "
            f"and {len(labels)} labels"
        )
    if int(labels.min()) < 0 or int(labels.max()) >= num_classes:
        raise ConfigError(f"probe labels must be in 0..{num_classes - 1}, got {int(labels.min())}..{int(labels.max())}")
    if not l2_grid or any(not v >= 0 for v in l2_grid):
        raise ConfigError(f"probe_l2 must be a non-empty list of penalties >= 0, got {l2_grid}")
    x, y = features.detach().to(torch.float64), labels.detach().long().to(features.device)

    def fit(idx: torch.Tensor | None, l2: float) -> LinearProbe:
        xs, ys = (x, y) if idx is None else (x[idx], y[idx])
        mean, std = xs.mean(0), xs.std(0, unbiased=False).clamp_min(1e-6)
        w, b = logistic_regression((xs - mean) / std, ys, num_classes, l2, max_iter=max_iter)
        return LinearProbe(w, b, mean, std, l2)

    grid, scores = sorted(float(v) for v in l2_grid), {}
    n_val = int(round(held_out * len(y)))
    if len(grid) > 1 and len(y) >= 10 and n_val >= 1:
        perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed)).to(y.device)
        val, train = perm[:n_val], perm[n_val:]
        for l2 in grid:
            probe = fit(train, l2)
            scores[l2] = 100 * (probe.logits(x[val]).argmax(1) == y[val]).double().mean().item()
        best = max(grid, key=lambda v: (scores[v], v))
    else:
        best = grid[len(grid) // 2]
    probe = fit(None, best)
    probe.held_out = scores
    return probe


# -- evaluators ------------------------------------------------------------------------------
class ProbeFeatures(Evaluator):
    """The training split of a linear probe: collects ``model.probe_features`` and labels of
    its source; scores nothing itself. :meth:`features` gathers them from every rank (a
    collective, once), ordered by sample key, so that the probe fits the same rows in the
    same order at any world size."""

    task = "probe_train"

    def __init__(self, dataset: str = "", name: str = "") -> None:
        super().__init__()
        self.dataset, self.name = dataset, name
        self.parts: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.keys: list[str] = []
        self._gathered: tuple[torch.Tensor, torch.Tensor] | None = None

    def configure(self, source) -> None:
        """The source's dataset (its probe's users) and name; no option but ``probe_train``."""
        self.dataset, self.name = source.dataset, source.name
        other = sorted(set(source.options) - {"probe_train"})
        if other:
            raise ConfigError(
                f"{source.where or 'evaluation'} ({source.name}): a probe_train source is only read for the "
                f"probe's features; its options {other} belong on the split it probes"
            )

    @torch.no_grad()
    def update(self, model: nn.Module, output, batch: dict) -> None:
        if "label" not in batch:
            raise ConfigError(f"probe_train source {self.name}: batches have no 'label' (an image split is needed)")
        feats = model.probe_features(output, batch)  # (B, D)
        self.parts.append((feats.float(), batch["label"].view(-1)))
        self.keys += [str(k) for k in _keys(batch, len(feats))]

    def features(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(N, D) features and (N,) labels of every rank's samples, sorted by key."""
        if self._gathered is None:
            local = (
                (torch.cat([p[0] for p in self.parts]), torch.cat([p[1] for p in self.parts])) if self.parts else None
            )
            x = gather_cat(local[0] if local else None)
            y = gather_cat(local[1] if local else None)
            keys = [k for part in gather_objects(self.keys) for k in part]
            if x is None or not len(keys):
                raise ConfigError(f"probe_train source {self.name}: no samples to fit the linear probe on")
            order = sorted(range(len(keys)), key=keys.__getitem__)
            index = torch.tensor(order, device=x.device)
            self._gathered = (x[index], y.to(x.device)[index])
            self.parts.clear()
        return self._gathered

    def compute(self) -> dict[str, float]:
        self.features()  # gathered here too, in the same order on every rank
        return {}


def _keys(batch: dict, n: int) -> list:
    keys = batch.get("keys", batch.get("key"))
    if keys is None or len(keys) != n:
        raise ConfigError(
            f"probe features need each sample's key (batch 'keys', {n} per batch) to order them at any world size"
        )
    return list(keys)


class ImageClassificationEvaluator(Evaluator):
    """Zero-shot and linear-probe accuracy (%) of an ``image`` source (batches: ``image``,
    ``label``): ``zeroshot_top1`` / ``zeroshot_top5`` and ``probe_top1`` / ``probe_top5``
    (top-5 with at least 5 classes), chance 100/C and 500/C.

    Args:
        classnames / templates: the classes (index = label) and prompt templates, or None
            to read them in :meth:`configure` (the source's ``classes.json``).
        tokenizer: tokenises the prompts (the datamodule's).
        zero_shot: score zero-shot (needs classes, templates, a tokenizer and text_embeds).
        probe: fit a linear probe on the stage's ``probe_train`` source of this dataset when
            there is one (set through :meth:`use_probe`).
        probe_l2: the probe's L2 grid.
        text_batch_size: prompts per text forward pass.
    """

    task = "classification"
    prefix_scores = False

    def __init__(
        self,
        classnames: list[str] | None = None,
        templates: list[str] | None = None,
        *,
        tokenizer=None,
        zero_shot: bool = True,
        probe: bool = True,
        probe_l2: tuple[float, ...] = DEFAULT_L2_GRID,
        text_batch_size: int = 256,
    ) -> None:
        super().__init__()
        self.classnames, self.templates, self.tokenizer = classnames, templates, tokenizer
        self.zero_shot, self.probe, self.probe_l2 = zero_shot, probe, tuple(probe_l2)
        self.text_batch_size = text_batch_size
        self.dataset, self.name, self.where = "", "", "evaluation"
        self.probe_source: ProbeFeatures | None = None
        self._weights: torch.Tensor | None = None
        self.top: list[torch.Tensor] = []  # (B, k) zero-shot predictions
        self.feats: list[torch.Tensor] = []  # (B, D) probe features
        self.labels: list[torch.Tensor] = []
        self.counts: dict[str, int | float] = {}
        self.how = ""

    def configure(self, source) -> None:
        """Settings of one evaluation source (:class:`~vlp.models.evaluation.EvalSource`): its
        ``evaluation`` options (``classes``, ``templates``, ``zero_shot``, ``probe``,
        ``probe_l2``), the class file of its manifest (:func:`classes_of`) and the tokenizer."""
        options, self.where = dict(source.options), source.where or "evaluation"
        label = f"{self.where} ({source.name})" if source.name else self.where
        unknown = sorted(set(options) - set(OPTIONS))
        if unknown:
            raise ConfigError(f"{label}.evaluation: unknown option(s) {unknown}; an image source takes {list(OPTIONS)}")
        self.dataset, self.name = source.dataset, source.name
        self.zero_shot = bool(options.get("zero_shot", self.zero_shot))
        self.probe = bool(options.get("probe", self.probe))
        if "probe_l2" in options:
            l2 = options["probe_l2"]
            l2 = [l2] if isinstance(l2, int | float) else l2
            if not isinstance(l2, list | tuple) or not l2 or any(not isinstance(v, int | float) or v < 0 for v in l2):
                raise ConfigError(f"{label}.evaluation.probe_l2 must be a penalty >= 0 or a list of them, got {l2!r}")
            self.probe_l2 = tuple(float(v) for v in l2)
        self.tokenizer = self.tokenizer or source.tokenizer
        path = options.get("classes") or classes_of(source.extra, source.split)
        templates = options.get("templates")
        if isinstance(path, list | tuple):  # the names themselves, with a template list
            if not path or not isinstance(templates, list | tuple):
                raise ConfigError(
                    f"{label}.evaluation: classes given as a list need templates as a list too, got {templates!r}"
                )
            self.classnames = [str(c) for c in path]
        if isinstance(path, str) and self.classnames is None:
            self.classnames, self.templates = load_classes(path, templates)
        elif isinstance(templates, list | tuple):
            check_templates(list(templates), f"{label}.evaluation.templates")
            self.templates = [str(t) for t in templates]
        if self.zero_shot:
            if self.classnames is None or self.templates is None:
                raise ConfigError(
                    f"{label}: zero-shot classification needs class names and prompt templates: set the source's "
                    "evaluation.classes (a classes.json) or the manifest's extra.classes, or evaluation.zero_shot: false"
                )
            if self.tokenizer is None:
                raise ConfigError(f"{label}: zero-shot classification needs data.tokenizer to write the prompts")

    def use_probe(self, source: ProbeFeatures) -> None:
        """Fit the linear probe on ``source``'s features (the stage's probe_train source)."""
        if self.probe_source is not None:
            raise ConfigError(
                f"{self.where} ({self.name}): two probe_train sources of {self.dataset!r} "
                f"({self.probe_source.name}, {source.name}); keep one"
            )
        self.probe_source = source

    @property
    def probing(self) -> bool:
        return self.probe and self.probe_source is not None

    @torch.no_grad()
    def update(self, model: nn.Module, output, batch: dict) -> None:
        self.model = model
        if "label" not in batch:
            raise ConfigError(f"{self.where}: image classification batches need 'label'")
        self.labels.append(batch["label"].view(-1))
        if self.zero_shot:
            if getattr(output, "image_embeds", None) is None:
                raise ConfigError(f"{type(model).__name__} gave no image_embeds for an image batch: no zero-shot")
            if self._weights is None:
                self._weights = zero_shot_weights(
                    model, self.tokenizer, self.classnames, self.templates, batch_size=self.text_batch_size
                )  # (C, E)
            logits = F.normalize(output.image_embeds.float(), dim=-1) @ self._weights.T  # (B, C)
            self.top.append(logits.topk(min(5, logits.shape[1]), dim=1).indices)  # (B, k)
        if self.probing:
            self.feats.append(model.probe_features(output, batch).float())  # (B, D)

    def _num_classes(self) -> int:
        if self.classnames is not None:
            return len(self.classnames)
        mine = max((int(y.max()) for y in self.labels if len(y)), default=-1)
        train = int(self.probe_source.features()[1].max()) if self.probing else -1
        return max(max(gather_objects(mine)), train) + 1

    @torch.no_grad()
    def compute(self) -> dict[str, float]:
        if not self.zero_shot and not self.probing:
            raise ConfigError(
                f"{self.where} ({self.name}): evaluation.zero_shot is false and no probe_train source of "
                f"{self.dataset!r} is evaluated in this stage: nothing to score"
            )
        num_classes = self._num_classes()
        ks = accuracy_ks(num_classes)
        labels = torch.cat(self.labels) if self.labels else torch.zeros(0, dtype=torch.long)
        stats: dict[str, float] = {"n": float(len(labels))}
        if self.zero_shot:
            top = torch.cat(self.top) if self.top else torch.zeros(0, 5, dtype=torch.long)
            hit = top == labels.view(-1, 1).to(top.device)
            stats.update({f"zeroshot_top{k}": float(hit[:, :k].any(1).sum()) for k in ks})
        probe = None
        if self.probing:
            x, y = self.probe_source.features()
            probe = fit_linear_probe(x, y, num_classes, l2_grid=self.probe_l2)
            if self.feats:
                hits = topk_hits(probe.logits(torch.cat(self.feats)), labels, ks)
            else:
                hits = dict.fromkeys(ks, 0)
            stats.update({f"probe_top{k}": float(h) for k, h in hits.items()})
        stats = all_reduce_sum(stats)  # counts of every rank
        n = int(stats.pop("n"))
        if n == 0:
            raise ConfigError(f"{self.where} ({self.name}): no image was evaluated")
        scores = {k: 100 * v / n for k, v in stats.items()}
        self.chance = {
            f"{kind}_top{k}": 100 * k / num_classes for kind in ("zeroshot", "probe") if self.has(kind) for k in ks
        }
        self.counts = {"num_images": n, "num_classes": num_classes}
        parts = [f"{n} images, {num_classes} classes"]
        if self.zero_shot:
            parts.append(f"{len(self.templates)} prompt templates")
        if probe is not None:
            self.counts.update(probe_train_images=len(self.probe_source.features()[1]), probe_l2=probe.l2)
            parts.append(f"probe on {self.counts['probe_train_images']} train images, l2 {probe.l2:g}")
        self.how = "; ".join(parts)
        self._ks = ks
        self.top, self.feats, self.labels = [], [], []
        return scores

    def has(self, kind: str) -> bool:
        return self.zero_shot if kind == "zeroshot" else self.probing

    def table(self, scores: dict[str, float], title: str) -> str:
        ks = self._ks
        head = f"  {'':14}" + "".join(f"{f'top-{k}':>8}" for k in ks)
        rows = [head]
        for kind, label in (("zeroshot", "zero-shot"), ("probe", "linear probe")):
            if self.has(kind):
                rows.append(f"  {label:14}" + "".join(f"{scores[f'{kind}_top{k}']:8.2f}" for k in ks))
        rows.append(f"  {'chance':14}" + "".join(f"{100 * k / self.counts['num_classes']:8.2f}" for k in ks))
        return f"{title} ({self.how})\n" + "\n".join(rows)

    def extra(self) -> dict:
        return dict(self.counts)
