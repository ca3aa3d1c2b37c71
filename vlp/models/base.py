"""``VLPModule``: what every family shares.

* objectives in an ``nn.ModuleDict`` keyed by name; the model capabilities each needs are
  checked when the family is built (:mod:`vlp.models.protocols`), then each sizes its
  head from the model (``Objective.setup``);
* the objective loop: run every objective whose modalities match the batch, sum
  ``weight * <name>_loss``, log every returned value under ``train/``;
* the hooks after every optimiser step (the family's EMA, the objectives' queues) and
  after ``init_from`` (momentum copies the checkpoint lacks start as copies of the
  online weights);
* the optimiser (:mod:`vlp.models.optim`) and non-finite step checks;
* one evaluation path (:mod:`vlp.eval.evaluator`): an evaluator per evaluation source,
  created on every rank when the epoch starts, its scores computed on every rank.

A family subclasses it, sets ``output_type``, lists its ``capabilities()`` and
``feature_dims()``, implements ``forward(batch)`` (image-only and text-only batches
included) and, for pair data without a task head, ``default_evaluator()``.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import ClassVar

import lightning.pytorch as pl
import torch
from torch import nn

from vlp.encoders.text import resize_token_embeddings
from vlp.errors import CheckpointError, ConfigError, DataError, NonFiniteError
from vlp.eval.compare import RESULTS_FILE
from vlp.eval.evaluator import Evaluator
from vlp.models.evaluation import EvaluationLoop
from vlp.models.optim import OptimConfig, build_optimizer, lr_lambda, param_groups
from vlp.models.outputs import VLPOutput
from vlp.models.protocols import CAPABILITIES
from vlp.objectives.base import Objective
from vlp.utils.checkpoint import fit_state_to_model, load_state_dict

__all__ = ["OptimConfig", "VLPModule", "batch_size_of", "check_writable", "lr_lambda"]

log = logging.getLogger("vlp")


class VLPModule(EvaluationLoop, pl.LightningModule):
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
        if isinstance(objectives, dict | nn.ModuleDict):  # another model's objectives
            objectives = objectives.values()
        objectives = list(objectives or [])
        names = [o.name for o in objectives]
        twice = sorted({n for n in names if names.count(n) > 1})
        if twice:
            raise ConfigError(
                f"two objectives are named {twice}: give each its own name (e.g. MLM(name: mlm_text)) — names: {names}"
            )
        self.objectives = nn.ModuleDict({o.name: o for o in objectives})  # keyed by name
        self.optim = optim or OptimConfig()
        self.init_from = init_from
        self._checked_modalities: set = set()
        self.results: dict[str, dict] = {}  # evaluation results by "<stage>[/<source>]"
        self._evaluators: dict[str, list[Evaluator | None]] = {}  # stage → one per source
        self.nonfinite_steps = 0  # steps skipped because of a NaN/inf loss or gradient
        self.step_skipped = False  # this training step was skipped (read by optimizer_step hooks)
        self._drop_gradients = False  # a skipped step under several processes
        self.decoder = None

    def set_decoder(self, decoder: nn.Module | None, context_dim: int) -> None:
        """Attach an encoder-decoder model's text decoder (``self.decoder``), read by the
        generation objectives through ``decoder_context``; check it fits the context width."""
        self.decoder = decoder
        if decoder is None:
            return
        width = getattr(decoder, "context_dim", context_dim)
        if width != context_dim:
            raise ConfigError(
                f"model.decoder cross-attends to width {width}, but {type(self).__name__}'s decoder context "
                f"has width {context_dim}: set the decoder's context_dim"
            )

    # -- the protocol: what the model provides, what the objectives need ----------------------
    def capabilities(self) -> set[str]:
        """The capabilities (:mod:`vlp.models.protocols`) this model provides, as built."""
        return set()

    def capability_hint(self, capability: str) -> str:
        """How to give this model ``capability`` (appended to the error), or ""."""
        return ""

    def provided_by_objectives(self) -> set[str]:
        """Capabilities some objective trains (``Objective.provides``): a family builds the parts
        of such a capability only when asked (METER's ITC projections)."""
        return {c for o in self.objectives.values() for c in o.provides}

    def feature_dims(self) -> dict[str, int]:
        """Widths of the views objectives read, by name: "match" (``match_features``), "mlm"
        (``mlm_hidden``), "itc" (``image_embeds`` / ``text_embeds``), "fused_image" (the
        fusion's image stream), "image_tokens" (the vision tower's tokens), "vocab" (rows of
        the word embeddings), "text" (``text_features``). A family lists the views it has;
        objectives size or check their heads against them (``Objective.width_of``)."""
        return {}

    def setup_objectives(self) -> None:
        """Check every objective's needs against ``capabilities()`` (a ConfigError naming the
        objective, the capability and the fix), then let each size its heads from the model
        (``Objective.setup``). A family calls it once its parts exist."""
        have = self.capabilities()
        for cap in have:
            proto, _ = CAPABILITIES[cap]
            if not isinstance(self, proto):
                raise TypeError(f"{type(self).__name__} claims {cap!r} but lacks the methods of {proto.__name__}")
        for objective in self.objectives.values():
            for cap, why in objective.needs().items():
                if cap not in have:
                    hint = self.capability_hint(cap)
                    raise ConfigError(
                        f"objective {objective.name} ({type(objective).__name__}) needs a model with {cap!r} "
                        f"({CAPABILITIES[cap][1]}) {why}; {type(self).__name__} as configured does not provide it"
                        + (f": {hint}" if hint else "")
                    )
        for objective in self.objectives.values():
            objective.check(self.output_type, type(self).__name__)
            objective.setup(self)

    def check_data(self, datamodule) -> None:
        """Grow the text tower's embedding for special tokens added to the tokenizer (the
        tokenizer's size is the one value data and model share); then a ConfigError, naming
        both sides, unless ``datamodule``'s tokenizer (vocabulary,
        ``max_length``) and ``image_size`` fit the towers (``text_encoder.vocab_size`` /
        ``max_length``, ``image_encoder.image_size_error``) and every objective
        (``Objective.check_data``). Runs in ``setup``, when the model first meets the data."""
        tokenizer = getattr(datamodule, "tokenizer", None)
        image_size = getattr(datamodule, "image_size", None)
        text = getattr(self, "text_encoder", None)
        if tokenizer is not None and text is not None:
            rows = getattr(text, "vocab_size", None)
            added = len(getattr(tokenizer, "special_tokens", None) or ())
            if rows is not None and added and rows < tokenizer.vocab_size <= rows + added:
                # special tokens added to the tokenizer (<image>, <|endofchunk|>): the text tower's
                # embedding grows to match, new rows at the mean of the old ones
                resize_token_embeddings(text, tokenizer.vocab_size)
                log.info(
                    "model.text_encoder: embedding grown from %d to %d rows for the tokenizer's special tokens %s",
                    rows,
                    tokenizer.vocab_size,
                    tokenizer.special_tokens,
                )
                rows = tokenizer.vocab_size
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
        for objective in self.objectives.values():
            objective.check_data(self, tokenizer, image_size)

    # -- to implement ---------------------------------------------------------------------
    def forward(self, batch: dict) -> VLPOutput:
        raise NotImplementedError

    def text_features(
        self, input_ids: torch.Tensor, mask: torch.Tensor, token_types: torch.Tensor | None = None
    ) -> torch.Tensor:
        """The "text" capability: the text tower's pooled features (B, Dt) of ``input_ids``
        (B, L), a sentence or a pair as one sequence with its ``token_types`` (text task heads,
        GLUE). A family whose text view is not ``self.text_encoder``'s pooled output overrides it."""
        out = self.text_encoder(input_ids, mask, **({} if token_types is None else {"token_type_ids": token_types}))
        return out.pooled  # (B, Dt)

    # -- training -------------------------------------------------------------------------
    def objectives_for(self, batch: dict) -> list[Objective]:
        modality = batch.get("modality", "pair")
        return [o for o in self.objectives.values() if modality in o.modalities]

    def requested(self, batch: dict, field: str) -> bool:
        """Whether an objective of ``batch``'s modality reads output ``field`` (forward computes
        an optional view, such as the fused pairs, only when one does)."""
        return any(field in o.requires for o in self.objectives_for(batch))

    def compute_objectives(
        self, output: VLPOutput, batch: dict, objectives: list[Objective]
    ) -> tuple[torch.Tensor, dict]:
        """Run the objectives; return the weighted total loss and every named value."""
        values: dict[str, torch.Tensor] = {}
        total = None
        for objective in objectives:
            result = objective(output, batch, self)
            key = objective.key("loss")
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
                f"objectives: {[(o.name, o.modalities) for o in self.objectives.values()]}"
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

    # -- after the optimiser step: EMA teachers, queues ------------------------------------------
    def optimizer_step(self, *args, **kwargs) -> None:
        super().optimizer_step(*args, **kwargs)
        self.after_optimizer_step(skipped=self.step_skipped)

    def after_optimizer_step(self, *, skipped: bool = False) -> None:
        """After every optimiser step (once per step under gradient accumulation): the family's
        own updates (ALBEF's EMA; override and call super), then every objective's
        ``after_optimizer_step`` (queues). Callbacks run after it, so a checkpoint written at
        the end of a step holds the updated state. ``skipped``: a non-finite step."""
        for objective in self.objectives.values():
            objective.after_optimizer_step(self, skipped=skipped)

    def momentum_pairs(self) -> list[tuple[nn.Module, nn.Module]]:
        """(online, EMA twin) module pairs: the family's and the objectives' (``Objective.momentum_pairs``)."""
        return [pair for o in self.objectives.values() for pair in o.momentum_pairs()]

    @torch.no_grad()
    def momentum_update(self, momentum: float) -> None:
        """EMA of every twin: ``twin = m * twin + (1 - m) * online``, one fused pass (``lerp_``)."""
        online, twins = [], []
        for a, b in self.momentum_pairs():
            online += list(a.parameters())
            twins += list(b.parameters())
        if twins:
            torch._foreach_lerp_(twins, online, 1 - momentum)

    # -- optimisation ---------------------------------------------------------------------
    def param_groups(self) -> list[dict]:
        """Parameter groups: (lr multiplier) x (decay / no decay); frozen parameters left out."""
        return param_groups(self, self.optim)

    def configure_optimizers(self):
        # fused AdamW is the fastest on GPUs, but Lightning cannot clip gradients of a fused
        # optimizer under mixed precision: fall back to the (default) foreach kernels then.
        clipping = bool(self._trainer is not None and self.trainer.gradient_clip_val)
        total = int(self.trainer.estimated_stepping_batches) if self._trainer is not None else 0
        fused = self.device.type == "cuda" and not clipping
        return build_optimizer(self.param_groups(), self.optim, total_steps=total, fused=fused)

    # -- reporting ------------------------------------------------------------------------
    def num_parameters(self) -> int:
        """Parameters of the model itself: momentum (EMA) twins, which only make training
        targets, are not counted."""
        twins = {id(p) for _, twin in self.momentum_pairs() for p in twin.parameters()}
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
        are logged. EMA twins the checkpoint lacks start as copies of their online modules
        (a fine-tuning checkpoint without ``*_m`` keys), then every objective's
        ``after_init_from`` adapts its state (a queue forgets the pretraining sample ids)."""
        state = load_state_dict(path)  # heads are keyed by objective name
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
        synced = self._sync_missing_twins(set(missing))
        missing = [k for k in missing if k not in synced]
        if synced:
            log.info(
                "init_from: %d momentum tensors not in the checkpoint copied from their online weights", len(synced)
            )
        if missing:
            log.warning("init_from: not in checkpoint (newly initialised): %s", _short(missing))
        if unexpected:
            log.warning("init_from: in checkpoint but unused: %s", _short(unexpected))
        for objective in self.objectives.values():
            objective.after_init_from(self)

    @torch.no_grad()
    def _sync_missing_twins(self, missing: set[str]) -> set[str]:
        """Copy online weights into every EMA twin with a tensor in ``missing``; → the synced keys."""
        names = {id(m): n for n, m in self.named_modules()}
        synced: set[str] = set()
        for online, twin in self.momentum_pairs():
            prefix = names[id(twin)] + "."
            keys = {prefix + k for k in twin.state_dict()}
            if keys & missing:
                twin.load_state_dict(online.state_dict())
                synced |= keys
        return synced


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
    for key in ("image", "text_ids", "images", "text_pair_ids"):
        if key in batch:
            return int(batch[key].shape[0])
    return 1


def _short(keys: list[str], n: int = 20) -> str:
    return ", ".join(keys[:n]) + (f", ... ({len(keys) - n} more)" if len(keys) > n else "")
