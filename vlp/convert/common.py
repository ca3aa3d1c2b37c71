"""What the converters share: the report of a conversion, reading a checkpoint's state
dict, writing the converted one, building a family's model from a recipe's ``model:``
section. The key maps themselves live in ``albef.py`` and ``meter.py``."""

from __future__ import annotations

import copy
import os
import re
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from vlp.errors import CheckpointError, ConfigError, VLPError


@dataclass
class ConversionReport:
    """What a conversion did with every key.

    Attributes:
        source / output: the files (when converting files).
        loaded: model keys filled from the checkpoint.
        missing: model keys not filled: they keep their initial values.
        unknown: checkpoint keys the converter does not know (a different model, or a
            different version of ALBEF): never ignored silently.
        unused: known checkpoint keys with no place in this model → why (e.g. the MLM head
            of a model without an MLM objective, momentum copies of a model without them).
        dropped: checkpoint keys left out on purpose → why (tied or derived tensors).
        momentum_copied: momentum modules the checkpoint lacks, filled from the online weights.
        interpolated: position embeddings resized to the model's patch grid.
        notes: other adaptations (zero token-type table, reshaped queues...).
        warnings: things to look at (a tied weight that was not tied, a clamped temperature).
        recipe: the ``model:`` recipe section of a model built from the checkpoint's shapes.
    """

    source: str = "<state dict>"
    output: str | None = None
    loaded: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    unknown: list[str] = field(default_factory=list)
    unused: dict[str, str] = field(default_factory=dict)
    dropped: dict[str, str] = field(default_factory=dict)
    momentum_copied: list[str] = field(default_factory=list)
    interpolated: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    recipe: dict | None = None
    family: str = "ALBEF"

    @property
    def ok(self) -> bool:
        """Every checkpoint key is known and every model key was filled."""
        return not self.unknown and not self.missing

    def summary(self, max_keys: int = 10) -> str:
        """A human-readable account, keys grouped by reason and shortened to ``max_keys``."""

        def keys(items: list[str]) -> str:
            more = f", ... ({len(items) - max_keys} more)" if len(items) > max_keys else ""
            return ", ".join(items[:max_keys]) + more

        def by_reason(d: dict[str, str]) -> list[str]:
            groups: dict[str, list[str]] = defaultdict(list)
            for k, why in d.items():
                groups[why].append(k)
            return [f"    {len(ks)} key(s): {why}\n      {keys(ks)}" for why, ks in groups.items()]

        where = self.source + (f" -> {self.output}" if self.output else "")
        lines = [f"{self.family} conversion {where}: {len(self.loaded)} model keys loaded"]
        if self.unknown:
            lines.append(f"  UNKNOWN checkpoint keys ({len(self.unknown)}): {keys(self.unknown)}")
        if self.missing:
            lines.append(
                f"  MISSING model keys, left at their initial values ({len(self.missing)}): {keys(self.missing)}"
            )
        if self.unused:
            lines += ["  unused (no place in this model):", *by_reason(self.unused)]
        if self.dropped:
            lines += ["  dropped on purpose:", *by_reason(self.dropped)]
        if self.momentum_copied:
            lines.append(f"  momentum copies filled from the online weights: {', '.join(self.momentum_copied)}")
        lines += [f"  interpolated: {s}" for s in self.interpolated]
        lines += [f"  note: {s}" for s in self.notes]
        lines += [f"  WARNING: {s}" for s in self.warnings]
        lines.append(
            "  OK: every checkpoint key known, every model key filled" if self.ok else "  NOT a complete conversion"
        )
        return "\n".join(lines)


# -- reading ------------------------------------------------------------------------------
def extract_state_dict(ckpt: Any, where: str = "<checkpoint>") -> dict[str, Tensor]:
    """The model state dict of an ALBEF/LAVIS/vlp checkpoint (``model``, ``state_dict`` or
    ``module`` entry, or the mapping itself), without a DDP ``module.`` prefix."""
    if isinstance(ckpt, dict):
        for key in ("model", "state_dict", "module"):
            if isinstance(ckpt.get(key), dict):
                ckpt = ckpt[key]
                break
    if not isinstance(ckpt, dict) or not ckpt:
        raise CheckpointError(f"{where}: no state dict found (expected a 'model' mapping of tensors)")
    bad = [k for k, v in ckpt.items() if not isinstance(v, Tensor)]
    if bad:
        raise CheckpointError(f"{where}: the state dict holds non-tensor entries {bad[:5]}")
    if all(k.startswith("module.") for k in ckpt):
        ckpt = {k[len("module.") :]: v for k, v in ckpt.items()}
    # torch.distributed's activation-checkpoint wrapper inserts this into module paths
    return {k.replace("_checkpoint_wrapped_module.", ""): v for k, v in ckpt.items()}


def save_state_dict(state: dict[str, Tensor], path: str, converted_by: str = "vlp convert albef") -> None:
    """Write a vlp state dict: safetensors for ``*.safetensors`` (``converted_by`` in its
    metadata), else ``torch.save({"state_dict": ...})``."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tensors = {k: v.detach().contiguous() for k, v in state.items()}
    if path.endswith(".safetensors"):
        from safetensors.torch import save_file

        save_file(tensors, path, metadata={"format": "pt", "converted_by": converted_by})
    else:
        torch.save({"state_dict": tensors}, path)


def count_indices(keys, pattern: str) -> int:
    """How many distinct values the first group of ``pattern`` takes over ``keys`` (layers)."""
    return len({m[1] for k in keys if (m := re.match(pattern, k))})


def build_model(cls: type[nn.Module], model_config: dict) -> nn.Module:
    """A ``cls`` (a family) from a recipe's ``model:`` section (``class_path`` / ``init_args``),
    with the towers' own vlp errors raised as they are (jsonargparse wraps them)."""
    from jsonargparse import ArgumentParser

    parser = ArgumentParser(exit_on_error=False)
    parser.add_subclass_arguments(cls, "model")
    try:
        namespace = parser.parse_object({"model": copy.deepcopy(model_config)})  # parsing edits dicts in place
        return parser.instantiate(namespace).model
    except Exception as e:
        cause = e
        while cause is not None and not isinstance(cause, VLPError):
            cause = cause.__cause__ or cause.__context__
        if cause is not None:
            raise cause from None
        raise ConfigError(f"cannot build the {cls.__name__} model: {str(e).strip().splitlines()[0]}") from None


def read_model_section(path: str | os.PathLike) -> dict:
    """The ``model:`` section of a recipe YAML."""
    import yaml

    from vlp.utils.paths import resolve_path

    path = resolve_path(str(path))
    if not os.path.isfile(path):
        raise ConfigError(f"recipe not found: {path}")
    with open(path) as f:
        config = yaml.safe_load(f) or {}
    if "model" not in config:
        raise ConfigError(f"{path} has no 'model:' section")
    return config["model"]
