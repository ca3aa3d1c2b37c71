"""Reading checkpoints safely: ``torch.load(weights_only=True)`` or safetensors, never pickle.

Checkpoints from others are untrusted. Every failure names the file.
"""

from __future__ import annotations

import math
import os
import re
from typing import Any

import torch
import torch.nn.functional as F

from vlp.errors import CheckpointError
from vlp.utils.paths import resolve_path


def read_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Load a checkpoint file as plain data (tensors, numbers, strings, containers)."""
    path = resolve_path(path)
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint not found: {path}")
    _refuse_empty(path)
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        try:
            return load_file(path)
        except Exception as e:
            raise CheckpointError(f"cannot read safetensors file {path}: {e}") from None
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        found = re.search(r"Unsupported global: GLOBAL (\S+)", str(e))
        if found:
            raise CheckpointError(
                f"cannot read checkpoint {path} with weights_only=True: it pickles {found[1]}, which needs "
                "arbitrary code to unpickle and is refused (save its state dict alone, or as safetensors)"
            ) from None
        reason = (str(e).strip().splitlines() or ["no message"])[0]
        raise CheckpointError(
            f"cannot read checkpoint {path} with weights_only=True ({type(e).__name__}: {reason}); "
            "it is not a checkpoint, is truncated or corrupt, or needs arbitrary code to unpickle"
        ) from None


def _refuse_empty(path: str) -> None:
    if os.path.getsize(path) == 0:
        raise CheckpointError(f"checkpoint {path} is empty (0 bytes): the save was interrupted or the file was cut")


#: ``ckpt_path`` values that Lightning resolves itself (to a ModelCheckpoint's file)
LIGHTNING_CKPT_NAMES = ("last", "best", "hpc", "registry")


def _is_remote(text: str) -> bool:
    """A URL of a remote filesystem (any ``scheme://`` but ``file://``)."""
    return "://" in text and not text.startswith("file://")


def _local_path(text: str) -> str:
    """A local path, ``file://`` prefix removed and ``${VAR}``/``pkg://`` resolved."""
    return resolve_path(text[len("file://") :] if text.startswith("file://") else text)


def check_ckpt_path(path: str | os.PathLike, *, allow_remote: bool = False) -> str:
    """A ``ckpt_path`` handed to Lightning (resume a fit, or evaluate), checked first: a remote
    URL is refused unless ``allow_remote`` (it is then still read with ``weights_only=True``),
    a local file must exist and be a complete checkpoint (its zip directory is readable: a
    file cut short fails here, in one sentence, instead of deep inside Lightning). Lightning's
    own names (``last``, ``best``, ...) pass through. → the path."""
    text = str(path)
    if text in LIGHTNING_CKPT_NAMES or text.startswith("registry:"):
        return text
    if _is_remote(text):
        if not allow_remote:
            raise CheckpointError(
                f"ckpt_path {text} is remote; vlp does not load checkpoints from the network unless "
                "--allow_remote_ckpt is given (it is then read with weights_only=True)"
            )
        return text
    local = _local_path(text)
    if not os.path.isfile(local):
        raise CheckpointError(f"ckpt_path not found: {local}")
    check_complete(local)
    return local


def check_complete(path: str) -> None:
    """Raise :class:`CheckpointError` unless ``path`` is a whole ``torch.save`` file (the zip
    format: its central directory, written last, is present). Reads only the directory."""
    import zipfile

    _refuse_empty(path)
    try:
        with zipfile.ZipFile(path) as z:
            z.namelist()
    except (zipfile.BadZipFile, OSError) as e:
        raise CheckpointError(
            f"checkpoint {path} is truncated or not a torch checkpoint ({type(e).__name__}: {e}); "
            "resume from an earlier checkpoint"
        ) from None


def _unreadable(path: str) -> str | None:
    """Why ``path`` is not a complete checkpoint, or None when it is."""
    try:
        check_complete(path)
    except CheckpointError as e:
        return str(e)
    return None


def _checkpoint_dirs(callbacks) -> list[str]:
    """The ``dirpath`` of every callback in ``callbacks``: instances, or their configs
    (``{class_path, init_args: {dirpath}}`` as dicts or jsonargparse namespaces)."""
    dirs = []
    for cb in callbacks or []:
        dirpath = getattr(cb, "dirpath", None)
        if dirpath is None and hasattr(cb, "get"):
            dirpath = (cb.get("init_args") or {}).get("dirpath")
        if dirpath and os.path.isdir(resolve_path(str(dirpath))):
            dirs.append(os.path.abspath(resolve_path(str(dirpath))))
    return dirs


def resolve_resume_checkpoint(path: str | os.PathLike, callbacks=None) -> str:
    """The checkpoint a ``fit`` resumes from: ``path`` itself when it is complete; when it is
    empty or cut short (a run killed while saving), the newest complete ``*.ckpt`` beside it,
    with a warning naming both files. ``last`` stands for the newest ``last*.ckpt`` in the
    checkpoint folders (``dirpath``) of ``callbacks`` (Trainer callbacks or their configs);
    when there is no checkpoint at all it is returned as is (Lightning then starts afresh and
    says so). Other Lightning names and remote URLs are returned as is.
    Raises :class:`CheckpointError` when no complete checkpoint is left."""
    import logging

    text = str(path)
    if text == "last":
        dirs = _checkpoint_dirs(callbacks)
        names = [(d, f) for d in dirs for f in os.listdir(d)]
        lasts = [os.path.join(d, f) for d, f in names if f.startswith("last") and f.endswith(".ckpt")]
        target = max(lasts, key=os.path.getmtime) if lasts else None
    elif text in LIGHTNING_CKPT_NAMES or text.startswith("registry:") or _is_remote(text):
        return text
    else:
        target = os.path.abspath(_local_path(text))
        if not os.path.isfile(target):
            return text  # check_ckpt_path names the missing file
        dirs = [os.path.dirname(target)]
    why = _unreadable(target) if target else f"there is no last*.ckpt in {', '.join(dirs) or 'any checkpoint folder'}"
    if why is None:
        return target
    others = {os.path.join(d, f) for d in dirs for f in os.listdir(d) if f.endswith(".ckpt")} - {target}
    for candidate in sorted(others, key=os.path.getmtime, reverse=True):
        if _unreadable(candidate) is None:
            logging.getLogger("vlp").warning(
                "%s: resuming from %s instead, the newest complete checkpoint beside it", why, candidate
            )
            return candidate
    if target is None:
        return text
    raise CheckpointError(f"{why}, and no other complete checkpoint is in {', '.join(dirs)}")


def shape_mismatches(state: dict[str, torch.Tensor], model: torch.nn.Module) -> list[str]:
    """``key: checkpoint (shape), model (shape)`` for every tensor of ``state`` whose shape differs
    from the model's tensor of the same name."""
    own = model.state_dict()
    return [
        f"{k}: checkpoint {tuple(t.shape)}, model {tuple(own[k].shape)}"
        for k, t in state.items()
        if k in own and tuple(t.shape) != tuple(own[k].shape)
    ]


def load_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The model state dict inside a Lightning/vlp checkpoint, or the file itself if it is one."""
    return state_dict_of(read_checkpoint(path), path)


def state_dict_of(ckpt: dict[str, Any], path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The model state dict inside a loaded checkpoint ``ckpt`` (read from ``path``)."""
    for key in ("state_dict", "model", "module"):
        if isinstance(ckpt.get(key), dict):
            ckpt = ckpt[key]
            break
    if not isinstance(ckpt, dict) or not all(isinstance(v, torch.Tensor) for v in ckpt.values()):
        raise CheckpointError(f"{path}: no state dict found (expected a 'state_dict' mapping of tensors)")
    return ckpt


# -- objectives by name ----------------------------------------------------------------------
# Objectives live in an nn.ModuleDict keyed by their name, so their heads are saved as
# ``objectives.<name>.*``: a recipe that lists them in another order, or drops some, still
# finds each head by name, with nothing to re-index.


def split_unused_heads(keys: list[str], own: list[str]) -> tuple[list[str], list[str]]:
    """``keys`` left over by a load → (names of objectives whose heads the model lacks: not
    in ``own``, the model's objective names; the other keys)."""
    names = {k.split(".", 2)[1] for k in keys if k.startswith("objectives.") and k.count(".") >= 2}
    unused = sorted(n for n in names if n not in own)
    return unused, [k for k in keys if not (k.startswith("objectives.") and k.split(".", 2)[1] in unused)]


# -- fitting a state dict to a model of another resolution or queue size -------------------
QUEUE_BUFFERS = ("image_queue", "text_queue", "queue_ptr", "idx_queue")


def interpolate_pos_embed(pos_embed: torch.Tensor, grid: tuple[int, int], num_prefix: int = 1) -> torch.Tensor:
    """(1, P + h*w, D) → (1, P + H*W, D): bicubic over the square patch grid, prefix tokens kept (ALBEF's rule)."""
    n = pos_embed.shape[1] - num_prefix
    side = math.isqrt(n)
    if side * side != n:
        raise CheckpointError(f"pos_embed has {n} patch positions: not a square grid")
    prefix, patches = pos_embed[:, :num_prefix], pos_embed[:, num_prefix:]  # (1, P, D), (1, n, D)
    D = pos_embed.shape[-1]
    patches = patches.reshape(1, side, side, D).permute(0, 3, 1, 2).float()  # (1, D, h, w)
    patches = F.interpolate(patches, size=grid, mode="bicubic", align_corners=False)  # (1, D, H, W)
    patches = patches.permute(0, 2, 3, 1).reshape(1, grid[0] * grid[1], D).to(pos_embed.dtype)  # (1, H*W, D)
    return torch.cat([prefix, patches], dim=1)


def is_pos_embed(key: str, t: torch.Tensor, want: torch.Tensor) -> bool:
    """A ViT position embedding of another grid, same width: timm's ``*.pos_embed``
    (1, P + N, D) or open_clip's ``*.positional_embedding`` (P + N, D) of a vision tower."""
    if key.endswith("pos_embed"):
        return t.ndim == want.ndim == 3 and t.shape[-1] == want.shape[-1]
    return key.endswith("visual.positional_embedding") and t.ndim == want.ndim == 2 and t.shape[-1] == want.shape[-1]


def resize_pos_embed(model: torch.nn.Module, key: str, t: torch.Tensor, want: torch.Tensor) -> tuple[torch.Tensor, str]:
    """``t`` interpolated to the patch grid of ``model``'s ``key`` (its owner's ``grid_size``
    and ``num_prefix_tokens``, timm's and open_clip's attributes); → the tensor and a note."""
    owner = model.get_submodule(key.rsplit(".", 1)[0]) if "." in key else model
    flat = t.ndim == 2  # open_clip: (P + N, D)
    t3, want3 = (t[None], want[None]) if flat else (t, want)
    prefix = int(getattr(owner, "num_prefix_tokens", 1))
    n = want3.shape[1] - prefix
    grid = getattr(getattr(owner, "patch_embed", None), "grid_size", None) or getattr(owner, "grid_size", None)
    grid = tuple(int(g) for g in (grid or (math.isqrt(n), math.isqrt(n))))
    if grid[0] * grid[1] != n:
        raise CheckpointError(f"cannot infer the patch grid of {key} ({n} positions)")
    side = math.isqrt(t3.shape[1] - prefix)
    note = f"{key}: {side}x{side} -> {grid[0]}x{grid[1]} patches (bicubic, prefix tokens kept)"
    out = interpolate_pos_embed(t3, grid, prefix)
    return (out[0] if flat else out), note


def fit_state_to_model(state: dict[str, torch.Tensor], model: torch.nn.Module, where: str) -> tuple[dict, list[str]]:
    """Adapt ``state`` to ``model`` where the difference is expected when fine-tuning: position
    embeddings of another resolution are interpolated, feature queues of another size are
    dropped (the model keeps its own), a token-type table with more types than the
    checkpoint gets its new rows from the checkpoint's last type. Any other shape mismatch raises a
    :class:`CheckpointError` listing the keys. → the adapted state and notes for the log."""
    own = model.state_dict()
    out, notes, mismatched, queues = {}, [], [], set()
    for key, t in state.items():
        want = own.get(key)
        if want is None or t.shape == want.shape:
            out[key] = t
        elif is_pos_embed(key, t, want):
            out[key], note = resize_pos_embed(model, key, t, want)
            notes.append(note)
        elif (
            key.endswith("token_type.weight")
            and t.ndim == 2
            and t.shape[1] == want.shape[1]
            and t.shape[0] < want.shape[0]
        ):
            # more modality types than the checkpoint (METER for NLVR2: a second image type):
            # the new rows start as copies of the checkpoint's last (image) type
            extra = t[-1:].expand(want.shape[0] - t.shape[0], -1)
            out[key] = torch.cat([t, extra])
            notes.append(f"{key}: {t.shape[0]} -> {want.shape[0]} token types (new rows copy the last)")
        elif key.rsplit(".", 1)[-1] in QUEUE_BUFFERS:
            notes.append(f"{key}: queue of another size ({tuple(t.shape)} vs {tuple(want.shape)}), not loaded")
            queues.add(key.rsplit(".", 1)[0])
        else:
            mismatched.append(f"{key}: checkpoint {tuple(t.shape)}, model {tuple(want.shape)}")
    for owner in queues:  # the rest of a dropped queue (its pointer, its ids) goes with it
        for name in QUEUE_BUFFERS:
            out.pop(f"{owner}.{name}", None)
    if mismatched:
        raise CheckpointError(
            f"{where}: {len(mismatched)} tensors do not fit the model: "
            + "; ".join(mismatched[:10])
            + (f"; ... ({len(mismatched) - 10} more)" if len(mismatched) > 10 else "")
        )
    return out, notes
