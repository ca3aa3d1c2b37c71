"""Manifests: validation, url expansion, the committed manifests."""

from __future__ import annotations

import glob

import pytest

from vlp.data.manifest import Manifest, Split, check_local_shards, expand_urls, load_manifest
from vlp.errors import ConfigError, DataError


def test_all_committed_manifests_load():
    paths = sorted(glob.glob("data_manifests/*.yaml"))
    names = {load_manifest(p).name for p in paths}
    for required in (
        "cc3m",
        "cc12m",
        "sbu",
        "coco_karpathy",
        "visual_genome",
        "laion400m",
        "imagenet1k",
        "bookcorpus",
        "ccnews",
    ):
        assert required in names
    cc3m = load_manifest("data_manifests/cc3m.yaml")
    assert cc3m.split("train").num_samples == 3318333
    assert len(expand_urls(cc3m.split("train").urls)) == 332


def test_committed_shapes_manifests_match_the_default_synth():
    import inspect

    from vlp.data.manifest import MODALITIES
    from vlp.data.synth import write_shapes

    size = inspect.signature(write_shapes).parameters["size"].default
    for modality in MODALITIES:
        m = load_manifest(f"data_manifests/shapes_{modality}.yaml")
        assert m.modality == modality and f"--size {size}" in m.description
        for split in m.splits.values():
            assert split.urls.startswith("${VLP_DATA_ROOT:-data}/shapes/")
    assert load_manifest("data_manifests/shapes_pair.yaml").split("train").num_samples == size


def test_env_vars_and_braces(monkeypatch):
    monkeypatch.setenv("VLP_DATA_ROOT", "/mnt/x")
    assert expand_urls("${VLP_DATA_ROOT:-data}/a/{0..2}.tar") == ["/mnt/x/a/0.tar", "/mnt/x/a/1.tar", "/mnt/x/a/2.tar"]
    monkeypatch.delenv("VLP_DATA_ROOT")
    assert expand_urls("${VLP_DATA_ROOT:-data}/b.tar") == ["data/b.tar"]
    with pytest.raises(ConfigError, match="NOT_SET_ANYWHERE"):
        expand_urls("${NOT_SET_ANYWHERE}/c.tar")
    assert expand_urls("pipe:aws s3 cp s3://b/{0..1}.tar -") == [
        "pipe:aws s3 cp s3://b/0.tar -",
        "pipe:aws s3 cp s3://b/1.tar -",
    ]


def test_local_glob(tmp_path):
    for i in range(3):
        (tmp_path / f"s{i}.tar").write_bytes(b"")
    assert expand_urls(str(tmp_path / "s*.tar")) == [str(tmp_path / f"s{i}.tar") for i in range(3)]


def test_bad_manifests_name_the_problem(tmp_path):
    p = tmp_path / "m.yaml"
    p.write_text("name: x\nmodality: pairs\nsplits: {train: {urls: a.tar, num_samples: 1}}\n")
    with pytest.raises(ConfigError, match="unknown modality 'pairs'"):
        load_manifest(p)
    p.write_text("name: x\nmodality: pair\nsplitz: {}\n")
    with pytest.raises(ConfigError, match="splitz"):
        load_manifest(p)
    p.write_text("name: x\nmodality: pair\nsplits: {train: {url: a.tar, num_samples: 1}}\n")
    with pytest.raises(ConfigError, match="url"):
        load_manifest(p)


def test_save_load_round_trip(tmp_path):
    m = Manifest(
        name="t",
        modality="pair",
        splits={"train": Split("a/{0..1}.tar", 10), "test": Split("b.tar", 2, "retrieval")},
        fields={"text": "caption"},
    )
    m.save(tmp_path / "t.yaml")
    back = load_manifest(tmp_path / "t.yaml")
    assert back.modality_of("test") == "retrieval" and back.modality_of("train") == "pair"
    assert back.fields["text"] == "caption" and back.fields["image"].startswith("jpg")


def test_missing_shards_listed(tmp_path):
    (tmp_path / "a.tar").write_bytes(b"")
    with pytest.raises(DataError, match=r"1 of 2 shard\(s\) not found:\n  .*b\.tar"):
        check_local_shards([str(tmp_path / "a.tar"), str(tmp_path / "b.tar")], "data.train[0]")
