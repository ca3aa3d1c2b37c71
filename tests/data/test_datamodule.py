"""Round trip: shards written here → WebDataModule → batches, for every modality."""

from __future__ import annotations

import logging

import pytest
import torch
from helpers import MINILM, jpeg_bytes, write_tar

from vlp.data import HFTokenizer, Manifest, Source, Split, WebDataModule
from vlp.errors import ConfigError, DataError

IMG = 32


def _samples(modality: str, n: int, start: int = 0) -> list[dict]:
    out = []
    for i in range(start, start + n):
        key = f"s{i:05d}"
        color = (i * 40 % 256, 80, 160)
        if modality == "pair":
            out.append(
                {"__key__": key, "jpg": jpeg_bytes(color), "txt": f"caption number {i}", "json": {"image_id": i}}
            )
        elif modality == "image":
            out.append({"__key__": key, "jpg": jpeg_bytes(color), "cls": str(i % 3)})
        elif modality == "text":
            out.append({"__key__": key, "txt": f"just some text {i}"})
        elif modality == "vqa":
            out.append(
                {
                    "__key__": key,
                    "jpg": jpeg_bytes(color),
                    "json": {
                        "image_id": i,
                        "question": "what color?",
                        "answers": ["red"] * 10,
                        "question_type": "color",
                    },
                }
            )
        elif modality == "retrieval":
            out.append(
                {
                    "__key__": key,
                    "jpg": jpeg_bytes(color),
                    "json": {"image_id": i, "captions": [f"cap {i} {j}" for j in range(3)]},
                }
            )
        elif modality == "interleaved":
            k = 1 + i % 3
            sample = {"__key__": key, "json": {"text": " ".join(f"<image> picture {j}." for j in range(k))}}
            for j in range(k):
                sample[f"{j}.jpg"] = jpeg_bytes(color)
            out.append(sample)
    return out


def _manifest(tmp_path, modality: str, shards: int = 2, per_shard: int = 6, extra: list | None = None) -> str:
    urls = []
    for s in range(shards):
        samples = _samples(modality, per_shard, start=s * per_shard)
        if s == 0 and extra:
            samples = extra + samples
        urls.append(write_tar(tmp_path / modality / f"part-{s:03d}.tar", samples))
    n = shards * per_shard + len(extra or [])
    m = Manifest(
        name=f"toy_{modality}",
        modality=modality,
        splits={"train": Split(urls=urls, num_samples=n), "test": Split(urls=urls, num_samples=n)},
    )
    path = tmp_path / f"{modality}.yaml"
    m.save(path)
    return str(path)


def _dm(tokenizer, **kwargs) -> WebDataModule:
    defaults = dict(tokenizer=tokenizer, image_size=IMG, batch_size=4, num_workers=0, shuffle_buffer=4)
    return WebDataModule(**{**defaults, **kwargs})


EXPECTED = {
    "pair": {"image": (4, 3, IMG, IMG), "text_ids": 4, "image_id": (4,), "text_image_id": (4,)},
    "image": {"image": (4, 3, IMG, IMG), "label": (4,)},
    "text": {"text_ids": 4},
    "vqa": {"image": (4, 3, IMG, IMG), "text_ids": 4, "image_id": (4,)},
    "retrieval": {"image": (4, 3, IMG, IMG), "text_ids": 12, "text_image_id": (12,)},
    "interleaved": {"images": 4, "num_images": (4,), "text_ids": 4, "images_mask": 4, "media_mask": 4, "lm_labels": 4},
}


@pytest.mark.parametrize("modality", list(EXPECTED))
def test_round_trip_every_modality(tmp_path, tokenizer, modality):
    path = _manifest(tmp_path, modality)
    if modality == "interleaved":  # <image> is the media token: one id
        tokenizer = HFTokenizer(MINILM, max_length=32, special_tokens=["<image>", "<|endofchunk|>"])
    dm = _dm(tokenizer, test=[Source(path, split="test")])
    dm.setup("test")
    batches = list(dm.test_dataloader())
    assert sum(len(b["keys"]) for b in batches) == 12  # every sample exactly once
    batch = dm.on_before_batch_transfer(batches[0], 0)
    assert batch["modality"] == modality and batch["num_skipped"] == 0
    for key, shape in EXPECTED[modality].items():
        got = batch[key].shape
        assert (got[0] == shape) if isinstance(shape, int) else (tuple(got) == shape), (key, got)
    if "text_ids" in batch:
        assert batch["text_mask"].shape == batch["text_ids"].shape
        assert batch["text_mask"][:, 0].all()
    if modality == "retrieval":
        assert torch.equal(batch["text_image_id"], batch["image_id"].repeat_interleave(3))
    key = "images" if modality == "interleaved" else "image"
    if key in batch:  # uint8 from the workers, normalised float after the device transfer
        assert batch[key].dtype == torch.uint8
        batch = dm.on_after_batch_transfer(batch, 0)
        assert batch[key].dtype == torch.float32 and torch.isfinite(batch[key]).all()
    if modality == "interleaved":
        n = batch["num_images"]
        assert batch["images"].shape[1] == int(n.max())
        for i, k in enumerate(n.tolist()):  # zero padding after each document's images
            assert batch["images"][i, k:].abs().sum() == 0
            assert batch["images"][i, :k].abs().sum() > 0
        assert torch.equal(batch["images_mask"].sum(1), n)
        assert torch.equal(batch["media_mask"].sum(1), n)


def test_normalising_on_the_device_equals_normalising_in_the_worker(tmp_path, tokenizer):
    path = _manifest(tmp_path, "pair")
    got = {}
    for on_device in (True, False):
        dm = _dm(tokenizer, test=[Source(path, split="test")], normalize_on_device=on_device)
        dm.setup("test")
        got[on_device] = dm.on_after_batch_transfer(next(iter(dm.test_dataloader())), 0)["image"]
    assert got[False].dtype == got[True].dtype == torch.float32
    torch.testing.assert_close(got[True], got[False], atol=1e-5, rtol=0)


def test_corrupt_image_and_empty_caption_are_counted_and_logged(tmp_path, tokenizer, caplog):
    bad = [
        {"__key__": "corrupt", "jpg": b"\xff\xd8 definitely not a jpeg", "txt": "a caption"},
        {"__key__": "truncated", "jpg": jpeg_bytes()[:40], "txt": "a caption"},
        {"__key__": "empty", "jpg": jpeg_bytes(), "txt": "   "},
    ]
    path = _manifest(tmp_path, "pair", extra=bad)
    dm = _dm(tokenizer, test=[Source(path, split="test")], max_skip_fraction=0.5, min_samples_for_skip_check=1)
    dm.setup("test")
    good, skipped = 0, 0
    with caplog.at_level(logging.WARNING, logger="vlp.data"):
        for b in dm.test_dataloader():
            b = dm.on_before_batch_transfer(b, 0)
            good += len(b["keys"])
            skipped += b["num_skipped"]
    assert (good, skipped) == (12, 3)
    stats = dm.stats["train"]  # no trainer attached: counted under "train"
    assert stats["reasons"] == {"corrupt image": 2, "empty caption": 1}
    text = caplog.text
    assert "corrupt" in text and "truncated" in text and "empty caption" in text


def test_too_many_skips_stop_with_a_clear_error(tmp_path, tokenizer):
    bad = [{"__key__": f"bad{i}", "jpg": b"nope", "txt": "x"} for i in range(6)]
    path = _manifest(tmp_path, "pair", extra=bad)
    dm = _dm(tokenizer, test=[Source(path, split="test")], max_skip_fraction=0.1, min_samples_for_skip_check=4)
    dm.setup("test")
    with pytest.raises(DataError, match=r"skipped .*max_skip_fraction"):
        for b in dm.test_dataloader():
            dm.on_before_batch_transfer(b, 0)


def test_missing_shard_is_reported_by_path_before_training(tmp_path, tokenizer):
    path = _manifest(tmp_path, "pair")
    (tmp_path / "pair" / "part-001.tar").unlink()
    dm = _dm(tokenizer, train=[Source(path)])
    with pytest.raises(DataError, match=r"part-001\.tar"):
        dm.setup("fit")


def test_unknown_split_and_missing_manifest(tmp_path, tokenizer):
    path = _manifest(tmp_path, "pair")
    with pytest.raises(ConfigError, match="no split 'nope'"):
        _dm(tokenizer, train=[Source(path, split="nope")]).setup("fit")
    with pytest.raises(ConfigError, match="manifest file not found"):
        _dm(tokenizer, train=[Source(str(tmp_path / "missing.yaml"))]).setup("fit")


@pytest.mark.parametrize("workers", [0, 2])
def test_training_stream_has_exact_length_and_mixes_modalities(tmp_path, tokenizer, workers):
    pair, text = _manifest(tmp_path, "pair", shards=2), _manifest(tmp_path, "text", shards=2)
    dm = _dm(tokenizer, train=[Source(pair), Source(text)], num_workers=workers, epoch_length=40)
    dm.setup("fit")
    loader = dm.train_dataloader()
    assert len(loader) == 10  # 40 samples / batch 4
    batches = list(loader)
    assert len(batches) == 10  # loops over the shards, cut to the epoch length
    modalities = [b["modality"] for b in batches]
    assert set(modalities) == {"pair", "text"}
    if workers == 0:  # round robin, batch by batch
        assert modalities[:4] == ["pair", "text", "pair", "text"]


def test_shards_are_split_by_rank(tmp_path, tokenizer):
    path = _manifest(tmp_path, "pair", shards=4, per_shard=3)
    seen = []
    for rank in range(2):
        dm = _dm(tokenizer, test=[Source(path, split="test")])
        dm._rank = lambda rank=rank: (rank, 2)
        dm.setup("test")
        seen.append(sorted(k for b in dm.test_dataloader() for k in b["keys"]))
    assert len(seen[0]) == len(seen[1]) == 6
    assert not set(seen[0]) & set(seen[1])  # disjoint, and together complete


@pytest.mark.parametrize("shards, world, workers", [(1, 2, 0), (1, 3, 2), (2, 3, 0), (3, 2, 2)])
def test_evaluation_is_split_by_sample_when_shards_are_fewer_than_readers(tmp_path, tokenizer, shards, world, workers):
    """COCO/Flickr val and test are one shard each: with fewer shards than ranks (or workers),
    every rank reads them and keeps its share of the samples, so no rank is left without data
    and every sample is evaluated exactly once."""
    path = _manifest(tmp_path, "pair", shards=shards, per_shard=7)
    seen = []
    for rank in range(world):
        dm = _dm(tokenizer, test=[Source(path, split="test")], num_workers=workers)
        dm._rank = lambda rank=rank: (rank, world)
        dm.setup("test")
        seen.append([k.rsplit(":", 1)[1] for b in dm.test_dataloader() for k in b["keys"]])
    everything = [k for keys in seen for k in keys]
    assert sorted(everything) == sorted(f"s{i:05d}" for i in range(shards * 7))  # each sample once
    assert all(seen), [len(k) for k in seen]  # every rank has samples
    assert max(map(len, seen)) - min(map(len, seen)) <= max(1, workers) * (1 + shards)


def test_resampled_mode_needs_no_shard_split(tmp_path, tokenizer):
    path = _manifest(tmp_path, "pair", shards=1)
    dm = _dm(tokenizer, train=[Source(path)], resampled=True, epoch_length=24, num_workers=2)
    dm._rank = lambda: (1, 4)  # 1 shard, 4 ranks x 2 workers: fine when resampled
    dm.setup("fit")
    assert len(list(dm.train_dataloader())) == len(dm.train_dataloader())


def test_too_few_shards_without_resampling_is_a_clear_error(tmp_path, tokenizer):
    path = _manifest(tmp_path, "pair", shards=1)
    dm = _dm(tokenizer, train=[Source(path)], epoch_length=8)
    dm._rank = lambda: (1, 2)
    dm.setup("fit")
    with pytest.raises(DataError, match="resampled"):
        list(dm.train_dataloader())


def test_weighted_mixing_follows_weights(tmp_path, tokenizer):
    a = _manifest(tmp_path / "a", "pair", shards=1, per_shard=8)
    b = _manifest(tmp_path / "b", "pair", shards=1, per_shard=8)
    dm = _dm(tokenizer, train=[Source(a, weight=3.0), Source(b, weight=1.0)], epoch_length=400, shuffle_buffer=0)
    dm.setup("fit")
    keys = [k for batch in dm.train_dataloader() for k in batch["keys"]]
    frac_a = sum("/a/" in k for k in keys) / len(keys)
    assert 0.65 < frac_a < 0.85  # expected 0.75


def test_real_photos_go_through(tmp_path, tokenizer):
    """Odd sizes, grayscale and punctuation from real Flickr photos."""
    import json

    from helpers import shared_data_dir

    root = shared_data_dir("flickr8k_1k")  # skips where absent, fails under CI
    items = json.loads((root / "captions.json").read_text())[:8]
    samples = [
        {
            "__key__": f"f{i}",
            "jpg": (root / "images" / it["image"]).read_bytes(),
            "json": {"image_id": i, "captions": it["captions"]},
        }
        for i, it in enumerate(items)
    ]
    url = write_tar(tmp_path / "flickr.tar", samples)
    Manifest(name="flickr", modality="retrieval", splits={"test": Split(urls=url, num_samples=8)}).save(
        tmp_path / "f.yaml"
    )
    dm = _dm(tokenizer, test=[Source(str(tmp_path / "f.yaml"), split="test")], image_size=64)
    dm.setup("test")
    batches = [dm.on_before_batch_transfer(b, 0) for b in dm.test_dataloader()]
    assert sum(b["image"].shape[0] for b in batches) == 8
    assert sum(b["text_ids"].shape[0] for b in batches) == 40
    assert all(b["num_skipped"] == 0 for b in batches)
    assert all(torch.isfinite(b["image"]).all() for b in batches)


def test_fit_without_train_sources_is_a_config_error(tokenizer):
    with pytest.raises(ConfigError, match="data.train"):
        _dm(tokenizer).setup("fit")


def test_torch_threads_budget_against_loader_workers(tmp_path, tokenizer, monkeypatch):
    """torch_threads: auto gives the model the cores the workers leave (at least 1); an integer
    is taken as given; anything else is refused naming the key."""
    import os

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(8)), raising=False)
    path = _manifest(tmp_path, "pair")
    before = torch.get_num_threads()
    try:
        dm = _dm(tokenizer, train=[Source(path)], num_workers=3, torch_threads="auto")
        assert dm.budget_threads() == 5
        monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")  # two ranks share the 8 cores
        assert dm.budget_threads() == 1
        dm.setup("fit")
        assert torch.get_num_threads() == 1
        assert _dm(tokenizer, num_workers=2, torch_threads=3).budget_threads() == 3
    finally:
        torch.set_num_threads(before)
    with pytest.raises(ConfigError, match="torch_threads must be null, 'auto' or a positive integer"):
        _dm(tokenizer, torch_threads="many")
