"""The objective interface.

An objective is an ``nn.Module`` that owns its head (if any), declares which fields
of the model's output and of the batch it needs, and returns named values:
``{"<name>_loss": tensor, "<name>_<metric>": tensor, ...}``. The model sums
``weight * <name>_loss`` over its objectives and logs every entry. Removing an
objective from a recipe removes its parameters too.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, ClassVar

import torch
from torch import nn

from vlp.errors import ConfigError

if TYPE_CHECKING:
    from vlp.models.outputs import VLPOutput


def find_objective(model: nn.Module, name: str) -> Objective | None:
    """``model``'s objective called ``name`` (objective names are unique in a model), or None."""
    return next((o for o in getattr(model, "objectives", ()) if o.name == name), None)


class Objective(nn.Module):
    """Base class of training objectives.

    Args:
        weight: multiplier of this objective's loss in the total.
    """

    #: short name, the prefix of every returned key ("itc" → "itc_loss").
    name: ClassVar[str] = "objective"
    #: fields of the model output this objective reads (checked before step 1).
    requires: ClassVar[tuple[str, ...]] = ()
    #: batch keys this objective reads (checked on the first batch).
    requires_batch: ClassVar[tuple[str, ...]] = ()
    #: batch modalities this objective trains on (FLAVA mixes pair, image and text batches).
    modalities: ClassVar[tuple[str, ...]] = ("pair",)

    def __init__(self, weight: float = 1.0) -> None:
        super().__init__()
        self.weight = float(weight)

    def check(self, output_type: type[VLPOutput], model_name: str) -> None:
        """Raise a ConfigError naming what is missing if ``output_type`` lacks a required field."""
        fields = {f.name for f in dataclasses.fields(output_type)}
        missing = [r for r in self.requires if r not in fields]
        if missing:
            raise ConfigError(
                f"objective {type(self).__name__} ({self.name}) needs model outputs {missing}, "
                f"but {model_name} produces {output_type.__name__} with {sorted(fields)}"
            )

    def check_model(self, model: nn.Module) -> None:
        """Raise a ConfigError if this objective does not fit the built ``model``: a head whose
        input width differs from the model view it reads (``model.feature_dims()``), or an
        objective it depends on that is missing. Called once the model's parts exist."""

    def check_data(self, model: nn.Module, tokenizer, image_size: int | None) -> None:
        """Raise a ConfigError if the data's ``tokenizer`` or ``image_size`` does not fit this
        objective (a vocabulary larger than its head predicts). Called when the model first
        meets the DataModule (``VLPModule.check_data``)."""

    def check_width(self, arg: str, width: int, model: nn.Module, view: str) -> None:
        """ConfigError unless ``width`` (this objective's ``arg``) equals the width of the model
        view ``view`` (a key of ``model.feature_dims()``); views the model lacks are not checked."""
        dims = model.feature_dims() if hasattr(model, "feature_dims") else {}
        if view in dims and dims[view] != width:
            raise ConfigError(
                f"objective {type(self).__name__} ({self.name}) has {arg} {width}, but {type(model).__name__}'s "
                f"{view} features are {dims[view]} wide: set {type(self).__name__}({arg}: {dims[view]})"
            )

    def check_batch(self, batch: dict) -> None:
        missing = [k for k in self.requires_batch if k not in batch]
        if missing:
            raise ConfigError(
                f"objective {type(self).__name__} ({self.name}) needs batch keys {missing}; "
                f"the batch has {sorted(k for k in batch)} (is a masker missing from data.maskers?)"
            )

    def forward(self, output: VLPOutput, batch: dict, model: nn.Module | None = None) -> dict[str, torch.Tensor]:
        raise NotImplementedError
