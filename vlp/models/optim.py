"""Optimisation shared by every family: AdamW with weight-decay groups (``p.ndim >= 2`` and
not in a module's ``no_weight_decay()``), per-prefix learning-rate multipliers, frozen
parameters, and a warm-up + cosine/linear/constant schedule stepped every optimiser step.
"""

from __future__ import annotations

import fnmatch
import logging
import math
from dataclasses import dataclass, field

import torch
from torch import nn

from vlp.errors import ConfigError

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


def no_weight_decay_names(model: nn.Module) -> set[str]:
    """Full parameter names listed by submodules' ``no_weight_decay()`` (timm convention)."""
    names: set[str] = set()
    for prefix, module in model.named_modules():
        fn = getattr(module, "no_weight_decay", None)
        if callable(fn) and module is not model:
            names |= {f"{prefix}.{n}" if prefix else n for n in fn()}
    return names


def apply_freeze(model: nn.Module, patterns: list[str]) -> list[str]:
    """Turn off gradients of the parameters matching ``patterns`` (fnmatch); → their names."""
    frozen, unused = [], set(patterns)
    for name, p in model.named_parameters():
        hits = [pat for pat in patterns if fnmatch.fnmatchcase(name, pat)]
        if hits:
            p.requires_grad_(False)
            frozen.append(name)
            unused -= set(hits)
    if unused:
        raise ConfigError(f"optim.freeze patterns match no parameter: {sorted(unused)}")
    return frozen


def param_groups(model: nn.Module, optim: OptimConfig) -> list[dict]:
    """Parameter groups: (lr multiplier) x (decay / no decay); frozen parameters left out."""
    if optim.freeze:
        log.info("optim.freeze: %d parameter tensors frozen", len(apply_freeze(model, optim.freeze)))
    skip = no_weight_decay_names(model)
    prefixes = sorted(optim.lr_mult, key=len, reverse=True)
    unused = set(prefixes)
    groups: dict[tuple[float, bool], dict] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        mult = 1.0
        for prefix in prefixes:
            if name == prefix or name.startswith(prefix + "."):
                mult = optim.lr_mult[prefix]
                unused.discard(prefix)
                break
        decay = p.ndim >= 2 and name not in skip
        g = groups.setdefault((mult, decay), {"params": [], "names": [], "lr_mult": mult})
        g["params"].append(p)
        g["names"].append(name)
        g["weight_decay"] = optim.weight_decay if decay else 0.0
    if unused:
        raise ConfigError(f"optim.lr_mult prefixes match no trainable parameter: {sorted(unused)}")
    for g in groups.values():
        g["lr"] = optim.lr * g["lr_mult"]
    return list(groups.values())


def build_optimizer(groups: list[dict], optim: OptimConfig, *, total_steps: int, fused: bool) -> dict:
    """AdamW over ``groups`` and its per-step schedule, as Lightning's ``configure_optimizers``
    returns them. ``total_steps`` 0 (unknown) keeps the peak lr after warm-up."""
    opt_groups = [{k: v for k, v in g.items() if k != "names"} for g in groups]
    optimizer = torch.optim.AdamW(opt_groups, lr=optim.lr, betas=tuple(optim.betas), eps=optim.eps, fused=fused)
    total = total_steps if math.isfinite(total_steps) and total_steps > 0 else 0
    warmup = optim.warmup_steps
    warmup = int(warmup * total) if 0 < warmup < 1 else int(warmup)
    schedule = _Schedule(warmup=warmup, total=total, schedule=optim.schedule, min_ratio=optim.min_lr_ratio)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
