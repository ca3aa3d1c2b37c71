"""The objective interface.

An objective is an ``nn.Module`` with its own ``name``, ``weight`` and ``modalities``
(constructor arguments, so a recipe can hold two MLMs), that owns its head, declares the
model capabilities it needs (``needs``, checked when the model is built) and returns
named values ``{"<name>_loss": tensor, "<name>_<metric>": tensor, ...}``. The model
keeps its objectives in an ``nn.ModuleDict`` keyed by name, sums ``weight * <name>_loss``
and logs every entry; dropping an objective drops its parameters.

Hooks, all declared here and dispatched by :class:`~vlp.models.base.VLPModule` for
every family (none of them is looked up with ``hasattr``):

==============================  ===============================================================
``setup(model)``                once the model's parts exist: size heads from the model's
                                widths (``model.feature_dims()``), check the ones given
``check_data(model, tok, size)`` when the model meets the DataModule
``after_optimizer_step(model,   after every optimiser step (EMA teachers, queues); ``skipped``
skipped)``                      when the step was dropped for a non-finite loss
``after_init_from(model)``      after ``init_from`` loaded weights
``momentum_pairs()``            (online, EMA twin) module pairs the model's EMA updates
``evaluator(model)``            an :class:`~vlp.eval.evaluator.Evaluator` for the batches of
                                ``eval_modalities`` (task heads: VQA, NLVR2, VE, Retrieval)
==============================  ===============================================================
"""

from __future__ import annotations

import dataclasses
import re
from typing import TYPE_CHECKING, ClassVar

import torch
from torch import nn

from vlp.errors import ConfigError

if TYPE_CHECKING:
    from vlp.eval.evaluator import Evaluator
    from vlp.models.outputs import VLPOutput

_NAME = re.compile(r"^[a-z][a-z0-9_]*$")


def find_objective(model: nn.Module, kind: type) -> Objective | None:
    """``model``'s first objective that is an instance of ``kind`` (e.g. the ITC whose
    temperature ITM's hard negatives use), or None."""
    objectives = getattr(model, "objectives", None)
    return next((o for o in (objectives.values() if objectives is not None else ()) if isinstance(o, kind)), None)


def names_by_kind(model: nn.Module) -> dict[str, str]:
    """``default_name`` → instance name of ``model``'s objectives (the first of each kind):
    converters write official heads as ``objectives.<kind>.*`` (``itc``, ``mlm``, ``vqa``)
    and find them in a model whose recipe may have renamed them."""
    out: dict[str, str] = {}
    for o in model.objectives.values():
        out.setdefault(o.default_name, o.name)
    return out


class Objective(nn.Module):
    """Base class of training objectives.

    Args:
        weight: multiplier of this objective's loss in the total.
        name: the key of this objective in the model and the prefix of everything it
            returns and logs (default: the class's ``default_name``, e.g. "itc").
        modalities: the batch modalities it trains on (default: the class's); FLAVA runs
            one MLM on ``text`` batches and another on ``pair`` batches.
    """

    #: the name an instance gets unless the recipe gives one.
    default_name: ClassVar[str] = "objective"
    #: batch modalities trained on by default.
    default_modalities: ClassVar[tuple[str, ...]] = ("pair",)
    #: fields of the model output this objective reads (checked at construction).
    requires: ClassVar[tuple[str, ...]] = ()
    #: batch keys this objective reads (checked on the first batch).
    requires_batch: ClassVar[tuple[str, ...]] = ()
    #: model capabilities (``vlp.models.protocols``) this objective trains: a model builds
    #: the parts of a capability only when an objective provides or needs it (METER's ITC
    #: projections exist with an ITC objective).
    provides: ClassVar[tuple[str, ...]] = ()
    #: batch modalities whose evaluation this objective's ``evaluator`` handles.
    eval_modalities: ClassVar[tuple[str, ...]] = ()

    def __init__(self, weight: float = 1.0, *, name: str | None = None, modalities: list[str] | None = None) -> None:
        super().__init__()
        self.weight = float(weight)
        self.name = name or self.default_name
        if not _NAME.match(self.name):
            raise ConfigError(
                f"objective name {self.name!r} ({type(self).__name__}): use lower-case letters, digits and _"
            )
        self.modalities = tuple(modalities) if modalities is not None else self.default_modalities
        if not self.modalities:
            raise ConfigError(f"objective {self.name} ({type(self).__name__}) has no modalities")

    def key(self, suffix: str) -> str:
        """``"<name>_<suffix>"``: the key of a returned or logged value."""
        return f"{self.name}_{suffix}"

    def named(self, **values: torch.Tensor) -> dict[str, torch.Tensor]:
        """``{"<name>_<k>": v}``: what ``forward`` returns (``loss`` among them)."""
        return {self.key(k): v for k, v in values.items()}

    # -- what the objective needs from the model ----------------------------------------
    def needs(self) -> dict[str, str]:
        """Model capabilities this objective needs → why (shown when one is missing). The
        capabilities are written down in :mod:`vlp.models.protocols`."""
        return {}

    def check(self, output_type: type[VLPOutput], model_name: str) -> None:
        """Raise a ConfigError naming what is missing if ``output_type`` lacks a required field."""
        fields = {f.name for f in dataclasses.fields(output_type)}
        missing = [r for r in self.requires if r not in fields]
        if missing:
            raise ConfigError(
                f"objective {self.name} ({type(self).__name__}) needs model outputs {missing}, "
                f"but {model_name} produces {output_type.__name__} with {sorted(fields)}"
            )

    def check_width(self, arg: str, width: int, model: nn.Module, view: str) -> None:
        """ConfigError unless ``width`` (this objective's ``arg``) equals the width of the model
        view ``view`` (a key of ``model.feature_dims()``); views the model lacks are not checked."""
        dims = model.feature_dims()
        view = self.view_for(view, dims)
        if view in dims and dims[view] != width:
            what = (
                f"word embeddings have {dims[view]} rows"
                if view == "vocab"
                else f"{view} features are {dims[view]} wide"
            )
            raise ConfigError(
                f"objective {self.name} ({type(self).__name__}) has {arg} {width}, but {type(model).__name__}'s "
                f"{what}: set {type(self).__name__}({arg}: {dims[view]}) or leave {arg} out (it is then read from "
                "the model)"
            )

    def width_of(self, arg: str, given: int | None, model: nn.Module, view: str) -> int:
        """The width of a head's input: ``given`` (checked against the model's ``view``) or,
        when None, the model's ``view`` width."""
        if given is not None:
            self.check_width(arg, given, model, view)
            return given
        dims = model.feature_dims()
        view = self.view_for(view, dims)
        if view not in dims:
            raise ConfigError(
                f"objective {self.name} ({type(self).__name__}) reads the model's {view!r} features, which "
                f"{type(model).__name__} does not have (it has {sorted(dims)}); set {type(self).__name__}({arg}: ...)"
            )
        return dims[view]

    def view_for(self, view: str, dims: dict[str, int]) -> str:
        """``view`` specialised to this objective's modalities: a model whose heads read streams
        of different widths per batch modality names them ``<view>/<modality>`` (FLAVA: MLM on
        ``text`` batches reads the text tower, ``mlm/text``; on ``pair`` batches the multimodal
        encoder, ``mlm``). Used when every modality of the objective has the same one."""
        special = {f"{view}/{m}" for m in self.modalities if f"{view}/{m}" in dims}
        plain = any(f"{view}/{m}" not in dims for m in self.modalities)
        return special.pop() if len(special) == 1 and not plain else view

    def check_batch(self, batch: dict) -> None:
        missing = [k for k in self.requires_batch if k not in batch]
        if missing:
            raise ConfigError(
                f"objective {self.name} ({type(self).__name__}) needs batch keys {missing}; "
                f"the batch has {sorted(k for k in batch)} (is a masker missing from data.maskers?)"
            )

    # -- hooks --------------------------------------------------------------------------
    def setup(self, model: nn.Module) -> None:
        """Build or check heads against the built ``model`` (widths from ``model.feature_dims()``).
        Called once by the family's constructor, after its parts exist."""

    def check_data(self, model: nn.Module, tokenizer, image_size: int | None) -> None:
        """Raise a ConfigError if the data's ``tokenizer`` or ``image_size`` does not fit this
        objective (a vocabulary larger than its head predicts)."""

    def after_optimizer_step(self, model: nn.Module, *, skipped: bool = False) -> None:
        """Update training state (queues) after an optimiser step, never in forward. ``skipped``:
        the step was dropped (non-finite), so what its batches produced is dropped too."""

    def after_init_from(self, model: nn.Module) -> None:
        """Adapt state after ``init_from`` loaded weights (a queue forgets the sample ids of the
        data it was trained on)."""

    def momentum_pairs(self) -> list[tuple[nn.Module, nn.Module]]:
        """(online, EMA twin) pairs of this objective's own modules (ALBEF's MLM head)."""
        return []

    def evaluator(self, model: nn.Module) -> Evaluator | None:
        """A fresh evaluator of ``eval_modalities`` batches, or None."""
        return None

    def forward(self, output: VLPOutput, batch: dict, model: nn.Module) -> dict[str, torch.Tensor]:
        raise NotImplementedError
