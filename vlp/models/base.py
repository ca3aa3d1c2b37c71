"""``VLPModule``: what every family shares.

* the objective loop: run every objective whose modalities match the batch, sum
  ``weight * <name>_loss``, log every returned value under ``train/``;
* the optimiser: AdamW with weight-decay groups (``p.ndim >= 2`` and not in a
  module's ``no_weight_decay()``), per-prefix learning-rate multipliers, and a
  warm-up + cosine/linear/constant schedule stepped every optimiser step;
* ``init_from``: start fine-tuning from a checkpoint (loaded with ``weights_only=True``);
* checks before step 1 that every objective gets the outputs it needs.

A family subclasses it, sets ``output_type`` and implements ``forward(batch)``.
"""

from __future__ import annotations

import fnmatch
import json
import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import lightning.pytorch as pl
import torch
from torch import nn

from vlp.errors import CheckpointError, ConfigError, DataError, NonFiniteError
from vlp.eval.compare import RESULTS_FILE
from vlp.models.outputs import VLPOutput
from vlp.objectives.base import Objective
from vlp.utils.checkpoint import OBJECTIVES_KEY, fit_state_to_model, load_state_dict_by_objective

log = logging.getLogger("vlp")


@dataclass
class OptimConfig:
    """Optimiser and schedule settings.

    Args:
        lr: peak learning rate (of parameters with multiplier 1).
        weight_decay: AdamW decoupled weight decay (matrices only).
        betas / eps: AdamW settings.
        warmup_steps: linear warm-up length; a value below 1 is a fraction of all steps.
        schedule: "cosine", "linear" (decay to min) or "constant" after warm-up.
        min_lr_ratio: final learning rate as a fraction of the peak.
        lr_mult: parameter-name prefix → learning-rate multiplier, e.g.
            ``{"fusion": 5.0, "itm": 5.0}`` (METER: 5x for newly initialised layers).
            The longest matching prefix wins.
        freeze: parameter-name patterns (``fnmatch``, e.g. ``"text_encoder.*word_embeddings*"``)
            left out of training: they get no gradient and no optimiser state.
        max_nonfinite_steps: training steps whose loss or gradients are NaN/inf that may be
            skipped (no optimiser step, counted in ``train/nonfinite_steps``) before the run
            stops; 0 (the default) stops at the first one, naming the step and the objective.
    """

    lr: float = 1e-4
    weight_decay: float = 0.02
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    warmup_steps: float = 0
    schedule: str = "cosine"
    min_lr_ratio: float = 0.0
    lr_mult: dict[str, float] = field(default_factory=dict)
    freeze: list[str] = field(default_factory=list)
    max_nonfinite_steps: int = 0

    def __post_init__(self) -> None:
        if self.schedule not in ("cosine", "linear", "constant"):
            raise ConfigError(f"optim.schedule must be cosine, linear or constant, got {self.schedule!r}")
        if self.lr <= 0 or self.warmup_steps < 0:
            raise ConfigError("optim.lr must be > 0 and optim.warmup_steps >= 0")
        if self.max_nonfinite_steps < 0:
            raise ConfigError(f"optim.max_nonfinite_steps must be >= 0, got {self.max_nonfinite_steps}")


def lr_lambda(step: int, *, warmup: int, total: int, schedule: str, min_ratio: float) -> float:
    """Multiplier of the peak lr at ``step``: linear warm-up, then the chosen decay."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    if schedule == "constant" or total <= warmup:
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    decay = 0.5 * (1 + math.cos(math.pi * progress)) if schedule == "cosine" else 1 - progress
    return min_ratio + (1 - min_ratio) * decay


class _Schedule:
    """Picklable lr lambda (checkpoints store its settings, never code)."""

    def __init__(self, **kwargs) -> None:
        self.kwargs = kwargs

    def __call__(self, step: int) -> float:
        return lr_lambda(step, **self.kwargs)


class VLPModule(pl.LightningModule):
    """Base LightningModule of all families.

    Args:
        objectives: training objectives (see ``vlp.objectives``).
        optim: optimiser and schedule settings.
        init_from: checkpoint to initialise the weights from before fitting
            (a vlp/Lightning checkpoint or a plain state dict; ``weights_only=True``).
    """

    output_type: ClassVar[type[VLPOutput]] = VLPOutput

    def __init__(
        self,
        objectives: list[Objective] | None = None,
        *,
        optim: OptimConfig | None = None,
        init_from: str | None = None,
    ) -> None:
        super().__init__()
        self.objectives = nn.ModuleList(objectives or [])
        names = [o.name for o in self.objectives]
        if len(set(names)) != len(names):
            raise ConfigError(f"two objectives share a name: {names}")
        self.optim = optim or OptimConfig()
        self.init_from = init_from
        self._checked_modalities: set = set()
        self.results: dict[str, dict] = {}  # evaluation results by "<stage>[/<source>]"
        self._task_metrics: dict[str, tuple] = {}  # "<stage>_<source>" → (task head, its metric)
        self.nonfinite_steps = 0  # steps skipped because of a NaN/inf loss or gradient
        self.step_skipped = False  # this training step was skipped (read by optimizer_step hooks)
        self._drop_gradients = False  # a skipped step's zero loss under several processes
        for objective in self.objectives:
            objective.check(self.output_type, type(self).__name__)

    def set_decoder(self, decoder: nn.Module | None, context_dim: int) -> None:
        """Attach an encoder-decoder model's text decoder (``self.decoder``), read by the
        generation objectives (``vlp.objectives.generation``) through ``decoder_context``;
        check that the generation objectives have one and that it fits the context width."""
        self.decoder = decoder
        needs = [o for o in self.objectives if getattr(o, "needs_decoder", False)]
        if needs and decoder is None:
            raise ConfigError(
                f"objectives {[type(o).__name__ for o in needs]} generate text and need model.decoder "
                "(vlp.blocks.TextDecoder)"
            )
        if decoder is None:
            return
        width = getattr(decoder, "context_dim", context_dim)
        if width != context_dim:
            raise ConfigError(
                f"model.decoder cross-attends to width {width}, but {type(self).__name__}'s decoder context "
                f"has width {context_dim}: set the decoder's context_dim"
            )
        for o in needs:
            o.check_decoder(decoder)

    # -- checks before step 1: parts against parts, data against parts --------------------
    def feature_dims(self) -> dict[str, int]:
        """Widths of the views objectives read, by name: "match" (``match_features``), "mlm"
        (``mlm_hidden``), "itc" (``image_embeds`` / ``text_embeds``), "fused_image" (the
        fusion's image stream), "image_tokens" (the vision tower's tokens). A family lists
        the views it has; objectives check their heads against them (``Objective.check_width``)."""
        return {}

    def check_objectives(self) -> None:
        """Every objective checks its heads and the objectives it depends on against the built
        model (``Objective.check_model``). A family calls it once its parts exist."""
        for objective in self.objectives:
            objective.check_model(self)

    def check_data(self, datamodule) -> None:
        """ConfigError, naming both sides, unless ``datamodule``'s tokenizer (vocabulary,
        ``max_length``) and ``image_size`` fit the towers (``text_encoder.vocab_size`` /
        ``max_length``, ``image_encoder.image_size_error``) and every objective
        (``Objective.check_data``). Runs in ``setup``, when the model first meets the data."""
        tokenizer = getattr(datamodule, "tokenizer", None)
        image_size = getattr(datamodule, "image_size", None)
        text = getattr(self, "text_encoder", None)
        if tokenizer is not None and text is not None:
            rows = getattr(text, "vocab_size", None)
            if rows is not None and tokenizer.vocab_size > rows:
                raise ConfigError(
                    f"data.tokenizer has {tokenizer.vocab_size} tokens but model.text_encoder's embedding has "
                    f"{rows} rows: use the text model's own tokenizer or a text model with vocab_size >= "
                    f"{tokenizer.vocab_size}"
                )
            positions, length = getattr(text, "max_length", None), getattr(tokenizer, "max_length", None)
            if positions is not None and length is not None and length > positions:
                raise ConfigError(
                    f"data.tokenizer.max_length is {length} but model.text_encoder takes at most {positions} "
                    f"tokens (its position embeddings): set data.tokenizer max_length <= {positions}"
                )
        image = getattr(self, "image_encoder", None)
        if image_size is not None and hasattr(image, "image_size_error"):
            reason = image.image_size_error(image_size)
            if reason:
                raise ConfigError(f"data.image_size is {image_size} but model.image_encoder {reason}")
        for objective in self.objectives:
            objective.check_data(self, tokenizer, image_size)

    # -- to implement ---------------------------------------------------------------------
    def forward(self, batch: dict) -> VLPOutput:
        raise NotImplementedError

    # -- training -------------------------------------------------------------------------
    def objectives_for(self, batch: dict) -> list[Objective]:
        modality = batch.get("modality", "pair")
        return [o for o in self.objectives if modality in o.modalities]

    def compute_objectives(
        self, output: VLPOutput, batch: dict, objectives: list[Objective]
    ) -> tuple[torch.Tensor, dict]:
        """Run the objectives; return the weighted total loss and every named value."""
        values: dict[str, torch.Tensor] = {}
        total = None
        for objective in objectives:
            result = objective(output, batch, self)
            key = f"{objective.name}_loss"
            if key not in result:
                raise KeyError(f"{type(objective).__name__} returned {sorted(result)} without {key!r}")
            values.update(result)
            total = objective.weight * result[key] if total is None else total + objective.weight * result[key]
        return total, values

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        self.step_skipped = False
        self._stop_with_any_rank()
        objectives = self.objectives_for(batch)
        if batch.get("modality") not in self._checked_modalities:  # first batch of each modality
            for o in objectives:
                o.check_batch(batch)
            self._checked_modalities.add(batch.get("modality"))
        if not objectives:
            raise ConfigError(
                f"no objective of {type(self).__name__} handles {batch.get('modality')!r} batches; "
                f"objectives: {[(o.name, o.modalities) for o in self.objectives]}"
            )
        output = self(batch)
        loss, values = self.compute_objectives(output, batch, objectives)
        if not self._all_ranks_finite(loss):
            bad = [k for k, v in values.items() if k.endswith("_loss") and not torch.isfinite(v).all()]
            self._nonfinite(f"the loss is not finite ({', '.join(bad) or 'the weighted total'})")
            if self._trainer is not None and self.trainer.world_size > 1:
                # Lightning refuses a None step under several processes: a zero loss reaches every
                # parameter (DDP syncs their gradients) and on_before_optimizer_step drops them
                self._drop_gradients = True
                return sum((p * 0).sum() for p in self.parameters() if p.requires_grad)
            return None  # Lightning skips the optimiser step
        bs = batch_size_of(batch)
        self.log("train/loss", loss, prog_bar=True, batch_size=bs)
        for k, v in values.items():
            self.log(f"train/{k}", v, prog_bar=k.endswith("_loss") and len(values) > 2, batch_size=bs)
        if "num_skipped" in batch:
            self.log("train/skipped", float(batch["num_skipped"]), on_step=False, on_epoch=True, reduce_fx="sum")
        return loss

    def _datamodule(self):
        """The trainer's datamodule, or None (no trainer, or plain DataLoaders)."""
        return getattr(self.trainer, "datamodule", None) if self._trainer is not None else None

    # -- non-finite losses and gradients -------------------------------------------------------
    def _all_ranks_finite(self, value: torch.Tensor) -> bool:
        """Whether ``value`` is finite on every rank (so that all ranks skip a step together)."""
        finite = bool(torch.isfinite(value).all())
        if self._trainer is not None and self.trainer.world_size > 1:
            finite = self.trainer.strategy.reduce_boolean_decision(finite, all=True)
        return finite

    def _stop_with_any_rank(self) -> None:
        """Under several ranks, a data limit passed on one rank (``WebDataModule.pending_error``:
        too many skipped samples or unreadable shards in training) stops every rank at the same
        step, each with that rank's message or a sentence pointing to it."""
        if self._trainer is None or self.trainer.world_size == 1:
            return
        dm = self._datamodule()
        if dm is None or not hasattr(dm, "pending_error"):
            return
        mine = dm.pending_error
        if self.trainer.strategy.reduce_boolean_decision(mine is not None, all=False):
            raise mine or DataError(
                "train: another rank passed the data limits (max_skip_fraction / max_bad_shard_fraction); "
                "its error message names the samples and shards"
            )

    def _nonfinite(self, what: str) -> None:
        """Stop (a ``FloatingPointError`` naming the step), or count a skipped step while
        ``optim.max_nonfinite_steps`` allows."""
        step = self.trainer.global_step if self._trainer is not None else 0
        self.nonfinite_steps += 1
        if self.nonfinite_steps > self.optim.max_nonfinite_steps:
            raise NonFiniteError(
                f"training step {step}: {what}; stopped before any checkpoint of this state was written "
                f"({self.nonfinite_steps - 1} such step(s) skipped before, optim.max_nonfinite_steps="
                f"{self.optim.max_nonfinite_steps}). Lower optim.lr, add warm-up or gradient clipping"
            )
        self.step_skipped = True
        log.warning("training step %d: %s; step skipped (%d so far)", step, what, self.nonfinite_steps)
        self.log("train/nonfinite_steps", float(self.nonfinite_steps), on_step=True, on_epoch=False)

    def on_before_optimizer_step(self, optimizer) -> None:
        """Gradients that became NaN/inf (finite loss) stop the run before the weights take them;
        with fp16 loss scaling the scaler skips such steps itself."""
        if self._drop_gradients:  # a skipped step under several processes
            self._drop_gradients = False
            optimizer.zero_grad(set_to_none=True)  # the optimiser step then changes nothing
            return
        if self._trainer is not None and str(self.trainer.precision).startswith("16"):
            return
        grads = [p.grad for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
        if not grads:
            return
        norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))
        if not self._all_ranks_finite(norm):
            bad = [n for n, p in self.named_parameters() if p.grad is not None and not torch.isfinite(p.grad).all()]
            self._nonfinite(f"gradients are not finite ({len(bad)} tensors, e.g. {bad[:3]})")
            optimizer.zero_grad(set_to_none=True)  # the optimiser step then changes nothing

    # -- optimisation ---------------------------------------------------------------------
    def no_weight_decay_names(self) -> set[str]:
        """Full parameter names listed by submodules' ``no_weight_decay()`` (timm convention)."""
        names: set[str] = set()
        for prefix, module in self.named_modules():
            fn = getattr(module, "no_weight_decay", None)
            if callable(fn) and module is not self:
                names |= {f"{prefix}.{n}" if prefix else n for n in fn()}
        return names

    def apply_freeze(self) -> list[str]:
        """Turn off gradients of the parameters matching ``optim.freeze``; → their names."""
        frozen, unused = [], set(self.optim.freeze)
        for name, p in self.named_parameters():
            hits = [pat for pat in self.optim.freeze if fnmatch.fnmatchcase(name, pat)]
            if hits:
                p.requires_grad_(False)
                frozen.append(name)
                unused -= set(hits)
        if unused:
            raise ConfigError(f"optim.freeze patterns match no parameter: {sorted(unused)}")
        return frozen

    def param_groups(self) -> list[dict]:
        """Parameter groups: (lr multiplier) x (decay / no decay); frozen parameters left out."""
        if self.optim.freeze:
            log.info("optim.freeze: %d parameter tensors frozen", len(self.apply_freeze()))
        skip = self.no_weight_decay_names()
        prefixes = sorted(self.optim.lr_mult, key=len, reverse=True)
        unused = set(prefixes)
        groups: dict[tuple[float, bool], dict] = {}
        for name, p in self.named_parameters():
            if not p.requires_grad:
                continue
            mult = 1.0
            for prefix in prefixes:
                if name == prefix or name.startswith(prefix + "."):
                    mult = self.optim.lr_mult[prefix]
                    unused.discard(prefix)
                    break
            decay = p.ndim >= 2 and name not in skip
            g = groups.setdefault((mult, decay), {"params": [], "names": [], "lr_mult": mult})
            g["params"].append(p)
            g["names"].append(name)
            g["weight_decay"] = self.optim.weight_decay if decay else 0.0
        if unused:
            raise ConfigError(f"optim.lr_mult prefixes match no trainable parameter: {sorted(unused)}")
        for g in groups.values():
            g["lr"] = self.optim.lr * g["lr_mult"]
        return list(groups.values())

    def configure_optimizers(self):
        groups = self.param_groups()
        # fused AdamW is the fastest on GPUs, but Lightning cannot clip gradients of a fused
        # optimizer under mixed precision: fall back to the (default) foreach kernels then.
        clipping = bool(self._trainer is not None and self.trainer.gradient_clip_val)
        fused = self.device.type == "cuda" and not clipping
        opt_groups = [{k: v for k, v in g.items() if k != "names"} for g in groups]
        optimizer = torch.optim.AdamW(
            opt_groups, lr=self.optim.lr, betas=tuple(self.optim.betas), eps=self.optim.eps, fused=fused
        )
        total = int(self.trainer.estimated_stepping_batches) if self.trainer else 0
        if not math.isfinite(total) or total <= 0:
            total = 0
        warmup = self.optim.warmup_steps
        warmup = int(warmup * total) if 0 < warmup < 1 else int(warmup)
        schedule = _Schedule(
            warmup=warmup, total=total, schedule=self.optim.schedule, min_ratio=self.optim.min_lr_ratio
        )
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # -- evaluation ---------------------------------------------------------------------------
    # A batch whose modality a task head (an objective with ``evaluate``: VQA, NLVR2, VE,
    # Retrieval) handles is evaluated by that head, whatever the family; other batches go to
    # the family's own _eval_step / _eval_epoch_end.
    def task_head(self, modality: str) -> Objective | None:
        """The objective that evaluates ``modality`` batches, if any."""
        return next((o for o in self.objectives if modality in o.modalities and hasattr(o, "evaluate")), None)

    def _eval_step(self, stage: str, batch: dict, idx: int) -> None:
        raise ConfigError(f"{type(self).__name__} has no {stage} evaluation for {batch.get('modality')!r} data")

    def _eval_epoch_end(self, stage: str) -> None:
        pass

    @torch.no_grad()
    def _eval_batch(self, stage: str, batch: dict, idx: int) -> None:
        head = self.task_head(batch.get("modality", "pair"))
        if head is None:
            self._eval_step(stage, batch, idx)
            return
        key = f"{stage}_{idx}"
        if key not in self._task_metrics:
            self._task_metrics[key] = (head, head.new_metric().to(self.device))
        head.evaluate(self._task_metrics[key][1], self(batch), batch, self)

    def _task_epoch_end(self, stage: str) -> None:
        """Summarise, log and (on test) print every task head's metric of ``stage``."""
        names = self._source_names(stage)
        for key in sorted(k for k in self._task_metrics if k.startswith(stage + "_")):
            (head, metric), idx = self._task_metrics.pop(key), int(key.rsplit("_", 1)[1])
            prefix = stage if len(names) <= 1 else f"{stage}/{names[idx]}"
            title = f"{names[idx] if names else stage}: {head.name} ({type(self).__name__})"
            scores, table = head.summarize(metric, title=title)
            self.log_dict({f"{prefix}/{head.name}_{k}": v for k, v in scores.items()}, rank_zero_only=True)
            self.results[prefix] = {"scores": scores, "task": head.name, "chance": head.chance}
            if stage == "test":
                self.report("\n" + table + "\n")

    def _source_names(self, stage: str) -> list[str]:
        """Names of the evaluation sources (one per DataLoader) of ``stage``."""
        dm = self._datamodule()
        return dm.eval_source_names(stage) if hasattr(dm, "eval_source_names") else []

    def validation_step(self, batch: dict, batch_idx: int, dataloader_idx: int = 0) -> None:
        self._eval_batch("val", batch, dataloader_idx)

    def test_step(self, batch: dict, batch_idx: int, dataloader_idx: int = 0) -> None:
        self._eval_batch("test", batch, dataloader_idx)

    def on_validation_epoch_end(self) -> None:
        dm = self._datamodule()
        if dm is not None and hasattr(dm, "skip_report") and not self.trainer.sanity_checking:
            dm.finish_stage("val", dm.skip_report("val"))  # on every rank: the counts are summed over ranks
        self._task_epoch_end("val")
        self._eval_epoch_end("val")

    def on_test_epoch_end(self) -> None:
        self._task_epoch_end("test")
        self._eval_epoch_end("test")

    # -- reporting ------------------------------------------------------------------------
    def num_parameters(self) -> int:
        """Parameters of the model itself: momentum (EMA) twins, which only make training
        targets, are not counted."""
        twins = {id(p) for _, twin in getattr(self, "momentum_pairs", list)() for p in twin.parameters()}
        return sum(p.numel() for p in self.parameters() if id(p) not in twins)

    def on_test_end(self) -> None:
        """Write the test results to ``<log dir>/test_results.json`` (read by ``vlp compare``),
        with the datamodule's count of skipped test samples under ``"skipped"``. A test whose
        skips exceed the datamodule's ``max_skip_fraction`` stops with a DataError instead."""
        results = self.results
        if self._trainer is None:
            return
        dm = self._datamodule()
        skipped = None
        if dm is not None and hasattr(dm, "skip_report"):
            skipped = dm.skip_report("test")  # on every rank: the counts are summed over ranks
            dm.finish_stage("test", skipped)
        # log_dir is a collective (broadcast from rank zero) under several processes: every rank asks
        folder = Path(self.trainer.log_dir or self.trainer.default_root_dir)
        if not results or not self.trainer.is_global_zero:
            return
        folder.mkdir(parents=True, exist_ok=True)
        record = {
            "model": type(self).__name__,
            "num_parameters": self.num_parameters(),
            "results": {k: v for k, v in results.items() if k.startswith("test")},
        }
        if skipped is not None:
            record["skipped"] = skipped
        path = folder / RESULTS_FILE
        path.write_text(json.dumps(record, indent=1) + "\n")
        self.report(f"test results: {path}")

    def report(self, text: str) -> None:
        """Print a result table to stdout, once (on global rank zero)."""
        if self._trainer is None or self.trainer.is_global_zero:
            print(text, flush=True)

    # -- initialisation from a checkpoint -------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint[OBJECTIVES_KEY] = [o.name for o in self.objectives]  # for init_from (by name)

    def on_fit_start(self) -> None:
        """Before step 1: every checkpoint folder must be writable (Lightning's atomic save
        ignores a ``PermissionError``, which would leave a run with no checkpoint)."""
        if self.trainer.is_global_zero:
            for callback in self.trainer.checkpoint_callbacks:
                check_writable(getattr(callback, "dirpath", None))

    def setup(self, stage: str) -> None:
        datamodule = self._datamodule()
        if datamodule is not None:
            self.check_data(datamodule)
        if stage == "fit" and self.init_from and not (self.trainer and self.trainer.ckpt_path):
            self.load_init_from(self.init_from)

    def load_init_from(self, path: str) -> None:
        """Start from the weights in ``path`` (``init_from``): position embeddings of another
        resolution are interpolated, queues of another size dropped; missing and unused keys
        are logged. Objectives with an ``on_init_from`` hook then adapt their state (e.g. a
        feature queue forgets the sample ids of the pretraining data)."""
        # heads follow their objective's name, not its list position
        state = load_state_dict_by_objective(path, [o.name for o in self.objectives])
        state, notes = fit_state_to_model(state, self, where=f"init_from {path}")
        own = self.state_dict()
        if not any(k in own for k in state):
            raise CheckpointError(
                f"init_from {path} shares no tensor name with {type(self).__name__} ({len(state)} tensors, e.g. "
                f"{list(state)[:3]}; the model has e.g. {list(own)[:3]}): it is a checkpoint of another model, "
                "or needs `vlp convert` first"
            )
        missing, unexpected = self.load_state_dict(state, strict=False)
        log.info("init_from %s: %d missing, %d unexpected keys", path, len(missing), len(unexpected))
        for note in notes:
            log.warning("init_from: %s", note)
        if missing:
            log.warning("init_from: not in checkpoint (newly initialised): %s", _short(missing))
        if unexpected:
            log.warning("init_from: in checkpoint but unused: %s", _short(unexpected))
        for objective in self.objectives:
            if hasattr(objective, "on_init_from"):
                objective.on_init_from()


def check_writable(folder: str | None) -> None:
    """Create ``folder`` (a local checkpoint folder) and write and remove a probe file in it;
    raise :class:`CheckpointError` naming it when that fails. Remote folders are not probed."""
    if not folder or "://" in str(folder):
        return
    path = Path(folder)
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".vlp-write-check-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise CheckpointError(
            f"checkpoint folder {path} is not writable ({type(e).__name__}: {e.strerror or e}); "
            "no checkpoint could be saved there"
        ) from None


def batch_size_of(batch: dict) -> int:
    """Samples in a collated batch (images, texts or interleaved documents)."""
    for key in ("image", "text_ids", "images"):
        if key in batch:
            return int(batch[key].shape[0])
    return 1


def _short(keys: list[str], n: int = 20) -> str:
    return ", ".join(keys[:n]) + (f", ... ({len(keys) - n} more)" if len(keys) > n else "")
