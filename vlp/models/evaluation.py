"""The one evaluation path of every family (mixed into :class:`~vlp.models.base.VLPModule`).

When a validation or test epoch starts, one :class:`~vlp.eval.evaluator.Evaluator` per
evaluation source is created on *every* rank: the evaluator of the objective that
evaluates the source's modality (``Objective.evaluator``: VQA, VE, NLVR2, Retrieval), else
the family's ``default_evaluator``. Each batch updates its source's evaluator; at the end
every rank computes (the evaluators gather any number of samples per rank), the scores
are logged under ``<stage>[/<source>]/...``, kept in ``results`` and, on test, printed.

A source's ``evaluation`` options reach its evaluator's ``configure(source)``
(:class:`EvalSource`); a source with ``evaluation: {probe_train: true}`` is not scored but
collects :meth:`EvaluationLoop.probe_features` for the linear probe of the other image
sources of its dataset (:mod:`vlp.eval.classification`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from vlp.errors import ConfigError
from vlp.eval.classification import ProbeFeatures
from vlp.eval.evaluator import Evaluator, HeadEvaluator

if TYPE_CHECKING:
    from vlp.objectives.base import Objective


@dataclass
class EvalSource:
    """What an evaluator may read of its evaluation source (``Evaluator.configure``)."""

    name: str = ""  # "<manifest name>/<split>"
    split: str = ""  # the manifest's split
    dataset: str = ""  # the manifest's name: sources of one dataset share classes (the probe)
    where: str = ""  # "data.test[1]", for messages
    extra: dict = field(default_factory=dict)  # the manifest's extra (classes: path/to/classes.json)
    options: dict = field(default_factory=dict)  # the source's evaluation options
    tokenizer: object = None  # the datamodule's tokenizer


class EvaluationLoop:
    """Validation and test hooks, evaluator lifecycle and ``evaluate()`` without a Trainer."""

    def evaluator_for(self, modality: str, source: EvalSource | None = None) -> Evaluator | None:
        """A fresh evaluator of ``modality`` batches: the objective that evaluates that modality
        (``Objective.evaluator``: task heads), else the family's :meth:`default_evaluator`;
        configured with ``source`` (its ``configure(source)``). A ``probe_train`` source gets
        a :class:`~vlp.eval.classification.ProbeFeatures` collector."""
        source = source or EvalSource()
        if source.options.get("probe_train"):
            found = ProbeFeatures()
        else:
            found = next(
                (e for o in self.objectives.values() if modality in o.eval_modalities if (e := o.evaluator(self))),
                None,
            )
            found = found or self.default_evaluator(modality)
        if found is not None and hasattr(found, "configure"):
            found.configure(source)
        elif found is not None and source.options:
            raise ConfigError(
                f"{source.where or 'evaluation'} ({source.name}): evaluation options {sorted(source.options)} "
                f"are not used by {type(found).__name__}"
            )
        if found is not None:
            found.model = self  # a rank without batches still scores the gathered pairs
        return found

    def probe_features(self, output, batch: dict) -> torch.Tensor:
        """(B, D) frozen image features of the linear probe: the output's un-normalised pooled
        ``image_pooled`` when it has one, else ``image_embeds``. Override to probe another view."""
        for name in ("image_pooled", "image_embeds"):
            value = getattr(output, name, None)
            if value is not None:
                return value
        raise ConfigError(f"{type(self).__name__} gave no image_pooled / image_embeds to probe")

    def link_probes(self, evaluators: list[Evaluator | None], where: str = "evaluation") -> None:
        """Hand each ``probe_train`` collector to the evaluators of its dataset that probe
        (``use_probe``); a collector nobody uses is a ConfigError."""
        for collector in [e for e in evaluators if isinstance(e, ProbeFeatures)]:
            users = [
                e
                for e in evaluators
                if hasattr(e, "use_probe") and getattr(e, "dataset", None) == collector.dataset and e.probe
            ]
            if not users:
                raise ConfigError(
                    f"{where}: {collector.name} is a probe_train source but no other image source of "
                    f"{collector.dataset!r} in this stage probes with it: add the split to evaluate"
                )
            for user in users:
                user.use_probe(collector)

    def default_evaluator(self, modality: str) -> Evaluator | None:
        """The family's evaluation of ``modality`` data no task head handles (None: refused)."""
        return None

    def fused_pair_scorer(self, score):
        """``(fusion, head)`` for scoring many (image, caption) pairs through the fusion's caches
        (:func:`~vlp.eval.retrieval.rerank_with_cache`), ``head`` mapping the cached fusion's
        output to ``score`` of the match features; None: pairs are fused one by one."""
        return None

    def head_evaluator(self, head: Objective) -> Evaluator:
        """The evaluator of a task head's torchmetrics metric, on this model's device."""
        return HeadEvaluator(head, self.device)

    def _start_evaluation(self, stage: str) -> None:
        """An evaluator per source of ``stage``, on every rank (a rank with no batch of a small
        split still takes part in each evaluator's collectives)."""
        dm = self._datamodule()
        modalities = dm.eval_source_modalities(stage) if hasattr(dm, "eval_source_modalities") else []
        infos = dm.eval_sources(stage) if hasattr(dm, "eval_sources") else [{} for _ in modalities]
        tokenizer = getattr(dm, "tokenizer", None)
        sources = [EvalSource(**info, tokenizer=tokenizer) for info in infos]
        self._evaluators[stage] = [self.evaluator_for(m, s) for m, s in zip(modalities, sources, strict=True)]
        self.link_probes(self._evaluators[stage], f"data.{stage}")

    def _eval_batch(self, stage: str, batch: dict, idx: int) -> None:
        evaluators = self._evaluators.setdefault(stage, [])
        while len(evaluators) <= idx:  # plain DataLoaders (no WebDataModule): one per loader seen
            evaluators.append(self.evaluator_for(batch.get("modality", "pair")))
        evaluator = evaluators[idx]
        if evaluator is None:
            raise ConfigError(
                f"{type(self).__name__} has no {stage} evaluation for {batch.get('modality')!r} data "
                f"(objectives: {list(self.objectives)}); add a task head for it or remove the source"
            )
        with torch.no_grad():
            evaluator.update(self, self(batch), batch)

    def _finish_evaluation(self, stage: str) -> None:
        """Compute (on every rank), log and (on test) print every evaluator of ``stage``."""
        names = self._source_names(stage)
        for idx, evaluator in enumerate(self._evaluators.pop(stage, [])):
            if evaluator is None:
                continue
            scores = evaluator.compute()
            if not scores and isinstance(evaluator, ProbeFeatures):
                continue  # a probe's training split: scored through the sources it feeds
            name = names[idx] if idx < len(names) else stage
            prefix = stage if len(names) <= 1 else f"{stage}/{name}"
            keys = {k: (f"{evaluator.task}_{k}" if evaluator.prefix_scores else k) for k in scores}
            self.log_dict({f"{prefix}/{keys[k]}": v for k, v in scores.items()}, rank_zero_only=True)
            record = {"scores": scores, "chance": evaluator.chance, **evaluator.extra()}
            if evaluator.prefix_scores:
                record["task"] = evaluator.task
            self.results[prefix] = record
            if stage == "test":
                title = f"{name}: {evaluator.task} ({type(self).__name__})"
                self.report("\n" + evaluator.table(scores, title) + "\n")

    @torch.no_grad()
    def evaluate(
        self,
        batches,
        stage: str = "test",
        modality: str | None = None,
        *,
        options: dict | None = None,
        tokenizer=None,
        probe_train=None,
    ) -> dict:
        """Evaluate on ``batches`` (an iterable of batch dicts of one source) without a Trainer,
        as ``vlp test`` does for one loader: → the result record (scores, chance, counts),
        also kept in ``self.results[stage]``. Under torch.distributed every rank calls it
        with its own share; pass ``modality`` so that a rank with no batch takes part.
        ``options`` are the source's ``evaluation`` options (``classes``, ...), ``tokenizer``
        writes zero-shot prompts, ``probe_train`` (batches of the probe's training split, this
        rank's share) fits a linear probe."""
        if options or tokenizer is not None or probe_train is not None:
            if not modality:
                raise ConfigError("evaluate(options= / tokenizer= / probe_train=) needs modality=")
            source = EvalSource(name=stage, options=dict(options or {}), tokenizer=tokenizer)
            evaluator = self.evaluator_for(modality, source)
            if probe_train is not None:
                collector = self.evaluator_for(modality, EvalSource(name="probe_train", options={"probe_train": True}))
                for batch in probe_train:
                    collector.update(self, self(batch), batch)
                self.link_probes([collector, evaluator])
            self._evaluators[stage] = [evaluator]
        else:
            self._evaluators[stage] = [self.evaluator_for(modality)] if modality else []
        for batch in batches:
            self._eval_batch(stage, batch, 0)
        self._finish_evaluation(stage)
        return self.results[stage]

    def _source_names(self, stage: str) -> list[str]:
        """Names of the evaluation sources (one per DataLoader) of ``stage``."""
        dm = self._datamodule()
        return dm.eval_source_names(stage) if hasattr(dm, "eval_source_names") else []

    def on_validation_epoch_start(self) -> None:
        self._start_evaluation("val")

    def on_test_epoch_start(self) -> None:
        self._start_evaluation("test")

    def validation_step(self, batch: dict, batch_idx: int, dataloader_idx: int = 0) -> None:
        self._eval_batch("val", batch, dataloader_idx)

    def test_step(self, batch: dict, batch_idx: int, dataloader_idx: int = 0) -> None:
        self._eval_batch("test", batch, dataloader_idx)

    def on_validation_epoch_end(self) -> None:
        dm = self._datamodule()
        if dm is not None and hasattr(dm, "skip_report") and not self.trainer.sanity_checking:
            dm.finish_stage("val", dm.skip_report("val"))  # on every rank: the counts are summed over ranks
        self._finish_evaluation("val")

    def on_test_epoch_end(self) -> None:
        self._finish_evaluation("test")
