"""Per-source batch size / maskers / mixing weight, and mixing across modality groups."""

from __future__ import annotations

import itertools
from collections import Counter

import pytest
import torch
from helpers import jpeg_bytes, write_tar

from vlp.data import Manifest, MLMMasker, PatchMasker, Source, Split, WebDataModule
from vlp.data.stream import mixing_schedule
from vlp.errors import ConfigError

IMG = 32


def _manifest(tmp_path, modality: str, shards: int = 2, per_shard: int = 6) -> str:
    urls = []
    for s in range(shards):
        samples = []
        for i in range(s * per_shard, (s + 1) * per_shard):
            key, color = f"{modality}{i:04d}", (i * 40 % 256, 80, 160)
            if modality == "pair":
                samples.append({"__key__": key, "jpg": jpeg_bytes(color), "txt": f"a caption {i}"})
            elif modality == "image":
                samples.append({"__key__": key, "jpg": jpeg_bytes(color), "cls": str(i % 3)})
            else:
                samples.append({"__key__": key, "txt": f"just some text {i}"})
        urls.append(write_tar(tmp_path / modality / f"part-{s:03d}.tar", samples))
    n = shards * per_shard
    m = Manifest(name=f"toy_{modality}", modality=modality, splits={"train": Split(urls=urls, num_samples=n)})
    path = tmp_path / f"{modality}.yaml"
    m.save(path)
    return str(path)


def _dm(tokenizer, **kwargs) -> WebDataModule:
    defaults = dict(tokenizer=tokenizer, image_size=IMG, batch_size=2, num_workers=0, shuffle_buffer=0)
    return WebDataModule(**{**defaults, **kwargs})


def test_weights_schedule_is_a_fixed_proportional_interleave():
    steps = list(itertools.islice(mixing_schedule("weights", [2.0, 1.0, 1.0], seed=0, epoch=0), 12))
    assert steps == [0, 1, 2, 0] * 3  # credits: hand-computed smooth weighted round robin
    long = Counter(itertools.islice(mixing_schedule("weights", [3.0, 1.5, 0.5], seed=0, epoch=0), 1000))
    assert [long[g] for g in range(3)] == [600, 300, 100]
    assert list(itertools.islice(mixing_schedule("round_robin", [5.0, 1.0], 0, 0), 4)) == [0, 1, 0, 1]


def test_sample_schedule_depends_on_seed_and_epoch_only_and_follows_weights():
    def first(seed, epoch, n=4000):
        return list(itertools.islice(mixing_schedule("sample", [2.0, 1.0, 1.0], seed=seed, epoch=epoch), n))

    steps = first(7, 3)
    assert steps == first(7, 3)  # a fresh generator per step: reproducible anywhere
    assert steps != first(7, 4) and steps != first(8, 3)
    freq = Counter(steps)
    assert abs(freq[0] / 4000 - 0.5) < 0.03 and abs(freq[1] / 4000 - 0.25) < 0.03


@pytest.mark.parametrize(("mixing", "workers"), [("sample", 0), ("weights", 0), ("sample", 2)])
def test_every_rank_picks_the_same_modality_at_each_step(tmp_path, tokenizer, mixing, workers):
    train = [
        Source(_manifest(tmp_path, "pair"), mix_weight=2.0),
        Source(_manifest(tmp_path, "text"), mix_weight=1.0),
        Source(_manifest(tmp_path, "image"), mix_weight=1.0),
    ]
    got = []
    for rank in range(2):
        dm = _dm(tokenizer, train=train, mixing=mixing, epoch_length=96, seed=5, num_workers=workers, resampled=True)
        dm._rank = lambda rank=rank: (rank, 2)
        dm.setup("fit")
        got.append([b["modality"] for b in dm.train_dataloader()])
    assert len(got[0]) == 24 and got[0] == got[1]  # 96 samples / (2 ranks x batch 2)
    names = ["pair", "text", "image"]
    expected = [names[g] for g in itertools.islice(mixing_schedule(mixing, [2.0, 1.0, 1.0], 5, 0), 24)]
    assert got[0] == expected  # step i follows the schedule, whatever the number of workers
    freq = Counter(got[0])
    assert freq["pair"] > freq["text"] and freq["pair"] > freq["image"]
    if mixing == "weights":
        assert freq == {"pair": 12, "text": 6, "image": 6}


def test_round_robin_stays_the_default(tmp_path, tokenizer):
    train = [Source(_manifest(tmp_path, "pair")), Source(_manifest(tmp_path, "text"))]
    runs = []
    for extra in ({}, {"mixing": "round_robin"}):
        dm = _dm(tokenizer, train=train, epoch_length=16, seed=1, **extra)
        dm.setup("fit")
        runs.append(list(dm.train_dataloader()))
    assert [b["modality"] for b in runs[0]] == ["pair", "text"] * 4
    for a, b in zip(*runs, strict=True):
        assert a["keys"] == b["keys"] and torch.equal(a["text_ids"], b["text_ids"])


def test_per_source_batch_size_and_maskers(tmp_path, tokenizer):
    train = [
        Source(_manifest(tmp_path, "pair"), batch_size=3, maskers=[MLMMasker(), PatchMasker((2, 2), mode="random")]),
        Source(_manifest(tmp_path, "text"), batch_size=5),  # the module's maskers: MLM
        Source(_manifest(tmp_path, "image"), maskers=[]),  # the module's batch size, no masking
    ]
    dm = _dm(tokenizer, train=train, batch_size=4, maskers=[MLMMasker()], epoch_length=48, seed=0)
    dm.setup("fit")
    assert dm.num_train_batches() == 12  # 48 samples / (3 + 5 + 4) / 3 samples per step
    by = {b["modality"]: b for b in dm.train_dataloader()}
    assert len(by["pair"]["keys"]) == 3 and len(by["text"]["keys"]) == 5 and len(by["image"]["keys"]) == 4
    assert {"mlm_input_ids", "mlm_labels", "image_mask"} <= set(by["pair"])
    assert by["pair"]["image_mask"].shape == (3, 4)
    assert "mlm_input_ids" in by["text"] and "image_mask" not in by["text"]
    assert "image_mask" not in by["image"] and "mlm_input_ids" not in by["image"]


def test_weighted_steps_per_epoch_use_each_groups_share(tmp_path, tokenizer):
    train = [
        Source(_manifest(tmp_path, "pair"), batch_size=8, mix_weight=3.0),
        Source(_manifest(tmp_path, "text"), batch_size=2, mix_weight=1.0),
    ]
    dm = _dm(tokenizer, train=train, mixing="weights", epoch_length=130)
    dm.setup("fit")
    assert dm.num_train_batches() == 20  # 130 // (0.75 * 8 + 0.25 * 2)


def test_conflicting_group_settings_and_bad_values_name_the_source(tmp_path, tokenizer):
    a, b = _manifest(tmp_path / "a", "pair"), _manifest(tmp_path / "b", "pair")
    with pytest.raises(ConfigError, match=r"data.train\[1\].batch_size .* but data.train\[0\].batch_size is 4"):
        _dm(tokenizer, train=[Source(a, batch_size=4), Source(b, batch_size=8)]).setup("fit")
    _dm(tokenizer, train=[Source(a, maskers=[MLMMasker()]), Source(b, maskers=[MLMMasker()])]).setup("fit")
    with pytest.raises(ConfigError, match=r"data.train\[0\].mix_weight .* must be a number > 0"):
        _dm(tokenizer, train=[Source(a, mix_weight=0)]).setup("fit")
    with pytest.raises(ConfigError, match=r"data.train\[0\].batch_size .* must be an integer >= 1"):
        _dm(tokenizer, train=[Source(a, batch_size=0)]).setup("fit")
    with pytest.raises(ConfigError, match="data.init_args.mixing must be one of round_robin, weights, sample"):
        _dm(tokenizer, mixing="random")


def test_recipe_keys_parse(tmp_path):
    from jsonargparse import ArgumentParser

    parser = ArgumentParser()
    parser.add_class_arguments(WebDataModule, "data")
    cfg = parser.parse_string(
        """
data:
  mixing: sample
  views: {codebook: {size: 112, norm: unit}}
  train:
    - {manifest: pairs.yaml, batch_size: 8, mix_weight: 2,
       maskers: [{class_path: vlp.data.MLMMasker, init_args: {mlm_probability: 0.3}}]}
    - {manifest: images.yaml, maskers: [], views: {codebook: {size: 112, norm: [[0.5, 0.5, 0.5], [0.5, 0.5, 0.5]]}}}
"""
    )
    dm = parser.instantiate(cfg).data
    first, second = dm.sources["train"]
    assert dm.mixing == "sample" and first.batch_size == 8 and first.mix_weight == 2
    assert first.maskers[0].mlm_probability == 0.3 and second.maskers == [] and second.batch_size is None
    assert dm.views["codebook"].size == 112 and dm.views["codebook"].norm == "unit"
    assert second.views == {"codebook": {"size": 112, "norm": [[0.5, 0.5, 0.5], [0.5, 0.5, 0.5]]}}


def test_an_evaluation_source_may_set_its_batch_size(tmp_path, tokenizer):
    path = _manifest(tmp_path, "pair")
    dm = WebDataModule(tokenizer=tokenizer, image_size=IMG, batch_size=2, num_workers=0)
    dm.sources["test"] = [Source(path, split="train", batch_size=5), Source(path, split="train")]
    dm.setup("test")
    first, second = dm.test_dataloader()
    assert [len(b["keys"]) for b in first] == [5, 5, 2]
    assert [len(b["keys"]) for b in second] == [2] * 6  # eval_batch_size: the module's batch_size


def test_a_resumed_sample_stream_continues_and_other_mixing_warns(tmp_path, tokenizer, caplog):
    train = [Source(_manifest(tmp_path, "pair"), mix_weight=2.0), Source(_manifest(tmp_path, "text"))]

    def loader(mixing="sample"):
        dm = _dm(tokenizer, train=train, mixing=mixing, epoch_length=24, seed=3)
        dm.setup("fit")
        return dm.train_dataloader()

    whole = [(b["modality"], b["keys"]) for b in loader()]
    first = loader()
    it = iter(first)
    seen = [next(it) for _ in range(5)]
    state = first.state_dict()
    del it
    assert state["mixing"] == "sample" and state["groups"] == [["pair", 2, 2.0], ["text", 2, 1.0]]
    resumed = loader()
    resumed.load_state_dict(state)
    assert [(b["modality"], b["keys"]) for b in seen + list(resumed)] == whole
    old = {k: v for k, v in state.items() if k not in ("mixing", "groups")}  # a checkpoint of an older version
    resumed = loader()
    resumed.load_state_dict(old)
    assert [(b["modality"], b["keys"]) for b in seen + list(resumed)] == whole
    other = loader("weights")
    with caplog.at_level("WARNING", logger="vlp.data"):
        other.load_state_dict(state)
    assert "mixing sample -> weights" in caplog.text
