"""MMC4 documents (OpenFlamingo's preprocessing), untrainable documents, pairs as documents."""

from __future__ import annotations

import base64
import itertools
import random
import re

import pytest
import torch
from helpers import MINILM, jpeg_bytes, write_tar

from vlp.data import HFTokenizer, Manifest, SampleDecoder, Skipped, Source, Split, Tokenizer, WebDataModule
from vlp.data.collate import Collator, batches
from vlp.data.interleaved import media_text
from vlp.data.manifest import DEFAULT_FIELDS
from vlp.data.mmc4 import MMC4Error, MMC4Options, assign, check_document, document_text, plan_document
from vlp.errors import ConfigError, DataError

I = -100  # noqa: E741


class WordTokenizer(Tokenizer):
    """Whitespace words and special tokens; pad 0, <s> 1, </s> 2, <image> 3, <|endofchunk|> 4
    (as in test_interleaved.py)."""

    def __init__(self, words: str, max_length: int = 32) -> None:
        self.vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<image>": 3, "<|endofchunk|>": 4}
        for w in words.split():
            self.vocab.setdefault(w, len(self.vocab))
        self.max_length = max_length

    def token_id(self, token: str) -> int:
        return self.vocab[token]

    def __call__(self, texts):
        rows = []
        for t in texts:
            words = [
                w for p in re.split(r"(<image>|<\|endofchunk\|>)", t) for w in ([p] if p in self.vocab else p.split())
            ]
            rows.append(([1] + [self.vocab[w] for w in words] + [2])[: self.max_length])
        n = max(map(len, rows))
        ids = torch.tensor([r + [0] * (n - len(r)) for r in rows])
        return {"input_ids": ids, "attention_mask": (ids != 0).long()}


TOK = WordTokenizer("intro a red circle . blue square")  # intro 5, a 6, red 7, circle 8, . 9, blue 10, square 11


def _img(value: int) -> torch.Tensor:
    return torch.full((3, 2, 2), value, dtype=torch.uint8)


# -- the assignment -----------------------------------------------------------------------
def _brute_force(cost):
    n, m = len(cost), len(cost[0])
    if n <= m:
        return min(sum(cost[i][p[i]] for i in range(n)) for p in itertools.permutations(range(m), n))
    return min(sum(cost[p[j]][j] for j in range(m)) for p in itertools.permutations(range(n), m))


@pytest.mark.parametrize("shape", [(1, 1), (2, 3), (3, 3), (4, 2), (3, 5), (5, 4)])
def test_assignment_is_one_to_one_and_of_minimum_cost(shape):
    rng = random.Random(str(shape))
    for _ in range(20):
        cost = [[round(rng.uniform(-1, 1), 2) for _ in range(shape[1])] for _ in range(shape[0])]
        cols = assign(cost)
        chosen = [c for c in cols if c is not None]
        assert len(chosen) == min(shape) and len(set(chosen)) == len(chosen)
        total = sum(cost[i][c] for i, c in enumerate(cols) if c is not None)
        assert total == pytest.approx(_brute_force(cost))


def test_assignment_matches_scipy_in_total_cost():
    optimize = pytest.importorskip("scipy.optimize")
    rng = random.Random(0)
    cost = [[rng.random() for _ in range(9)] for _ in range(6)]
    rows, cols = optimize.linear_sum_assignment(cost)
    ours = assign(cost)
    assert sum(cost[i][c] for i, c in enumerate(ours)) == pytest.approx(sum(cost[r][c] for r, c in zip(rows, cols)))


# -- the plan and the text ----------------------------------------------------------------
def test_plan_matches_one_to_one_then_thresholds_then_caps_in_reading_order():
    # images x sentences; image 0 and 1 both prefer sentence 2: the assignment gives 2 to
    # image 1 (0.9) and sentence 3 to image 0 (0.5); image 2 matches only below threshold;
    # image 3 lacks bytes; image 4 takes sentence 0
    sim = [
        [0.0, 0.1, 0.8, 0.5],
        [0.0, 0.1, 0.9, 0.1],
        [0.2, 0.1, 0.0, 0.0],
        [0.9, 0.9, 0.9, 0.9],
        [0.7, 0.3, 0.0, 0.0],
    ]
    plan = plan_document(sim, [True, True, True, False, True], MMC4Options())
    assert plan.images == [4, 1, 0] and plan.sentences == [0, 2, 3]  # by sentence
    assert dict(plan.dropped) == {"missing": 1, "below sim_threshold": 1}
    capped = plan_document(sim, [True, True, True, False, True], MMC4Options(max_num_images=2))
    assert capped.images == [4, 1] and capped.dropped["over max_num_images"] == 1


def test_more_images_than_sentences_leaves_the_worst_unmatched():
    plan = plan_document([[0.3], [0.6], [0.5]], [True] * 3, MMC4Options())
    assert plan.images == [1] and dict(plan.dropped) == {"unmatched": 2}


def test_document_text_is_openflamingos_format_and_what_media_text_makes():
    text = document_text(["Intro  text.", "A red circle.", "It is big.", "A blue <image> square."], [1, 3])
    assert text == "Intro text.<image>A red circle. It is big.<|endofchunk|><image>A blue square.<|endofchunk|>"
    assert media_text(text, 2, "k") == text
    first = document_text(["A cat.", "More."], [0])
    assert first == "<image>A cat. More.<|endofchunk|>" and media_text(first, 1, "k") == first


def test_malformed_documents_name_the_field():
    with pytest.raises(MMC4Error, match="text_list"):
        check_document({"text_list": [], "image_info": [], "similarity_matrix": []})
    with pytest.raises(MMC4Error, match=r"similarity_matrix shape \(it needs one row per image: 2 x 1\)"):
        check_document({"text_list": ["a"], "image_info": [{}, {}], "similarity_matrix": [[0.5]]})
    with pytest.raises(MMC4Error, match="row 0 has 2 entries"):
        check_document({"text_list": ["a"], "image_info": [{}], "similarity_matrix": [[0.5, 0.1]]})


def test_options_are_checked_and_layered():
    opts = MMC4Options.parse({"sim_threshold": 0.3, "max_num_images": 4}, {"max_num_images": 2})
    assert opts == MMC4Options(sim_threshold=0.3, max_num_images=2, min_num_images=1)
    with pytest.raises(ConfigError, match=r"data.train\[0\].mmc4: unknown option\(s\) \['sim'\]"):
        MMC4Options.parse({"sim": 0.3}, where="data.train[0].mmc4")
    with pytest.raises(ConfigError, match="min_num_images must be an integer >= 1"):
        MMC4Options(min_num_images=0)
    with pytest.raises(ConfigError, match=r"min_num_images \(3\) is above mmc4.max_num_images \(2\)"):
        MMC4Options(min_num_images=3, max_num_images=2)


# -- decoding MMC4 samples ----------------------------------------------------------------
def _b64(color) -> str:
    return base64.b64encode(jpeg_bytes(color)).decode()


def _doc(key: str, inline: bool = True, sims=((0.1, 0.0, 0.5), (0.0, 0.3, 0.0), (0.1, 0.1, 0.1))) -> dict:
    """Three sentences, three images: image 1 → sentence 1, image 0 → sentence 2, image 2
    below the threshold."""
    infos = [{"image_name": f"img{j}.jpg", "matched_text_index": 0, "matched_sim": 0.3} for j in range(3)]
    sample = {"__key__": key}
    for j, info in enumerate(infos):
        if inline:
            info["image_base64"] = _b64((80 * j, 0, 0))
        else:
            sample[f"img{j}.jpg"] = jpeg_bytes((80 * j, 0, 0))  # members named by image_name
    sample["json"] = {"text_list": ["Intro.", "A red circle.", "A blue square."], "image_info": infos}
    sample["json"]["similarity_matrix"] = [list(r) for r in sims]
    return sample


def _decoder(**mmc4) -> SampleDecoder:
    return SampleDecoder("interleaved", dict(DEFAULT_FIELDS), lambda im: torch.tensor(im.getpixel((0, 0))), mmc4)


def _raw(sample: dict) -> dict:
    import json

    return {k: json.dumps(v).encode() if k == "json" else v for k, v in sample.items()}


@pytest.mark.parametrize("inline", [True, False])
def test_an_mmc4_sample_becomes_a_marked_document_and_counts_its_dropped_image(inline):
    ex = _decoder()(_raw(_doc("d0", inline)))
    assert ex["text"] == "Intro.<image>A red circle.<|endofchunk|><image>A blue square.<|endofchunk|>"
    reds = [int(t[0]) for t in ex["images"]]  # images 1 and 0, in mark order (red 80, red 0)
    assert abs(reds[0] - 80) <= 2 and reds[1] <= 2
    (drop,) = ex["dropped"]
    assert drop.reason == "mmc4 image below sim_threshold (1 of 3 in the document)" and drop.count == 1


def test_per_source_options_change_what_is_kept():
    ex = _decoder(sim_threshold=0.05)(_raw(_doc("d0")))  # image 2 now matches sentence 0
    assert ex["text"].count("<image>") == 3 and "dropped" not in ex
    skip = _decoder(min_num_images=3)(_raw(_doc("d1")))
    assert isinstance(skip, Skipped) and skip.count == 1
    assert skip.reason == (
        "mmc4 document with too few images (2 kept of 3, min_num_images=3; dropped: 1 below sim_threshold)"
    )


def test_missing_and_corrupt_images_are_dropped_with_their_reason():
    sample = _doc("d0")
    del sample["json"]["image_info"][0]["image_base64"]  # missing: image 1 alone is left
    sample["json"]["image_info"][1]["image_base64"] = base64.b64encode(b"not a jpeg").decode()
    skip = _decoder()(_raw(sample))
    assert isinstance(skip, Skipped) and "dropped: 1 below sim_threshold, 1 corrupt, 1 missing" in skip.reason
    sample = _doc("d1")
    sample["json"]["image_info"][1]["image_base64"] = "%%%"
    ex = _decoder()(_raw(sample))
    assert ex["text"].count("<image>") == 1 and sorted(d.reason.split(" (")[0] for d in ex["dropped"]) == [
        "mmc4 image below sim_threshold",
        "mmc4 image corrupt",
    ]


def test_mmc4_shards_through_the_datamodule_with_manifest_and_source_options(tmp_path):
    samples = [_doc(f"doc{i}", inline=i % 2 == 0) for i in range(4)]
    samples.append({"__key__": "broken", "json": {"text_list": ["a"], "image_info": [{}], "similarity_matrix": []}})
    url = write_tar(tmp_path / "mmc4.tar", samples)
    Manifest(
        name="mmc4_tiny",
        modality="interleaved",
        splits={"test": Split(urls=url, num_samples=5)},
        extra={"mmc4": {"sim_threshold": 0.05, "max_num_images": 6}},
    ).save(tmp_path / "mmc4.yaml")
    tok = HFTokenizer(MINILM, max_length=48, special_tokens=["<image>", "<|endofchunk|>"])

    def first_batch(**source):
        dm = WebDataModule(
            test=[Source(str(tmp_path / "mmc4.yaml"), split="test", **source)],
            tokenizer=tok,
            image_size=16,
            batch_size=8,
            num_workers=0,
            max_skip_fraction=1.0,
        )
        dm.setup("test")
        batch = dm.on_before_batch_transfer(next(iter(dm.test_dataloader())), 0)
        return dm, batch

    dm, batch = first_batch()  # the manifest's threshold: all three images (no trainer: counted as train)
    assert batch["num_images"].tolist() == [3, 3, 3, 3] and batch["num_skipped"] == 1
    assert dm.skip_report("train")["reasons"] == {"mmc4 similarity_matrix shape": 1}
    dm, batch = first_batch(mmc4={"max_num_images": 2, "sim_threshold": 0.24})  # the source's, over it
    assert batch["num_images"].tolist() == [2, 2, 2, 2] and batch["images"].shape == (4, 2, 3, 16, 16)
    assert dm.skip_report("train")["reasons"] == {
        "mmc4 similarity_matrix shape": 1,
        "mmc4 image below sim_threshold": 4,
    }
    assert batch["num_skipped"] == 5 and ((batch["lm_labels"] != I).sum(1) > 0).all()
    with pytest.raises(ConfigError, match=r"data.test\[0\].mmc4 \(mmc4_tiny/test\): unknown option"):
        first_batch(mmc4={"threshold": 0.3})


# -- no trainable token -------------------------------------------------------------------
def test_documents_cut_before_their_first_image_leave_the_batch_as_skips():
    tok = WordTokenizer("intro a red circle . blue square", max_length=5)
    examples = [
        {"text": "intro intro intro intro <image> a", "images": [_img(1)], "key": "late"},  # cut before <image>
        {"text": "<image> red circle", "images": [_img(2)], "key": "ok"},
        {"text": "intro intro intro <image> blue", "images": [_img(3)], "key": "edge"},  # <image> is the last token
    ]
    b = Collator("interleaved", tok)(examples, [Skipped("before", "corrupt image")])
    assert b["keys"] == ["ok"] and b["text_ids"].tolist() == [[1, 3, 7, 8, 4]]
    assert b["lm_labels"].tolist() == [[I, 7, 8, 4, I]] and b["num_images"].tolist() == [1]
    assert b["images"].shape == (1, 1, 3, 2, 2) and b["images"][0, 0].eq(2).all()
    assert [s.key for s in b["skipped"]] == ["before", "late", "edge"]
    assert (
        b["skipped"][1].reason
        == "no trainable token (every lm_label is -100: nothing after its first <image> within 5 tokens)"
    )


def test_an_emptied_batch_is_not_emitted_and_its_skips_ride_with_the_next():
    tok = WordTokenizer("intro a red circle", max_length=4)
    late = {"text": "intro intro intro <image> a", "images": [_img(1)]}
    good = {"text": "<image> red", "images": [_img(2)]}
    examples = [{**late, "key": "l0"}, {**late, "key": "l1"}, {**good, "key": "g0"}, {**late, "key": "l2"}]
    out = list(batches(iter(examples), 2, Collator("interleaved", tok)))
    (only,) = out  # [l0, l1] emptied; [g0, l2] kept g0
    assert only["keys"] == ["g0"] and [s.key for s in only["skipped"]] == ["l0", "l1", "l2"]
    assert only["end_of_stream"] == 1
    empty = Collator("interleaved", tok)([{**late, "key": "l0"}])  # called directly: an empty batch
    assert empty["keys"] == [] and empty["text_ids"].shape[0] == 0 and len(empty["skipped"]) == 1
    with pytest.raises(DataError, match=r"(?s)all 2 samples of this stream were skipped.*l1: no trainable token"):
        list(batches(iter([{**late, "key": "l0"}, {**late, "key": "l1"}]), 1, Collator("interleaved", tok)))


def test_untrainable_documents_are_counted_by_the_datamodule(tmp_path):
    long = {"text": "words " * 40 + "<image> a red circle"}
    samples = [{"__key__": "late", "json": long, "0.jpg": jpeg_bytes()}]
    samples.append({"__key__": "ok", "json": {"text": "<image> a red circle"}, "0.jpg": jpeg_bytes()})
    url = write_tar(tmp_path / "docs.tar", samples)
    Manifest(name="docs", modality="interleaved", splits={"train": Split(urls=url, num_samples=2)}).save(
        tmp_path / "docs.yaml"
    )
    tok = HFTokenizer(MINILM, max_length=16, special_tokens=["<image>", "<|endofchunk|>"])
    dm = WebDataModule(
        test=[Source(str(tmp_path / "docs.yaml"))], tokenizer=tok, image_size=16, batch_size=4, num_workers=0
    )
    dm.setup("test")
    batch = dm.on_before_batch_transfer(next(iter(dm.test_dataloader())), 0)
    assert batch["keys"][0].endswith(":ok") and len(batch["keys"]) == 1 and batch["num_skipped"] == 1
    assert batch["images"].shape == (1, 1, 3, 16, 16) and (batch["lm_labels"] != I).any()
    assert dm.skip_report("train")["reasons"] == {"no trainable token": 1}  # no trainer: counted as train


# -- pairs as documents -------------------------------------------------------------------
def test_pairs_collate_as_one_image_documents():
    examples = [
        {"image": _img(5), "text": "a red circle .", "image_id": 7, "key": "p0"},
        {"image": _img(6), "text": "blue square", "image_id": 8, "key": "p1"},
    ]
    b = Collator("pair", TOK, pair_format="interleaved")(examples)
    assert b["modality"] == "pair" and "image" not in b
    assert b["text_ids"].tolist() == [[1, 3, 6, 7, 8, 9, 4, 2], [1, 3, 10, 11, 4, 2, 0, 0]]
    assert b["lm_labels"].tolist() == [[I, 6, 7, 8, 9, 4, 2, I], [I, 10, 11, 4, 2, I, I, I]]
    assert b["media_mask"][:, 1].all() and b["media_mask"].sum() == 2
    assert b["images"].shape == (2, 1, 3, 2, 2) and b["images"][1, 0].eq(6).all()
    assert b["images_mask"].tolist() == [[True], [True]] and b["num_images"].tolist() == [1, 1]
    assert b["image_id"].tolist() == [7, 8] and b["text_image_id"].tolist() == [7, 8]
    plain = Collator("pair", TOK)(examples)
    assert plain["text_ids"].tolist()[1] == [1, 10, 11, 2, 0, 0] and "lm_labels" not in plain
    with pytest.raises(ConfigError, match="pair_format='interleaved' applies to pair sources, not 'vqa'"):
        Collator("vqa", TOK, pair_format="interleaved")


def test_a_pair_source_as_documents_through_the_datamodule(tmp_path):
    url = write_tar(
        tmp_path / "pairs.tar",
        [{"__key__": f"p{i}", "jpg": jpeg_bytes((50 * i, 0, 0)), "txt": f"a red circle {i}"} for i in range(3)],
    )
    Manifest(name="pairs", modality="pair", splits={"train": Split(urls=url, num_samples=3)}).save(
        tmp_path / "pairs.yaml"
    )
    tok = HFTokenizer(MINILM, max_length=16, special_tokens=["<image>", "<|endofchunk|>"])
    dm = WebDataModule(
        test=[Source(str(tmp_path / "pairs.yaml"), split="train", pair_format="interleaved")],
        tokenizer=tok,
        image_size=16,
        batch_size=4,
        num_workers=0,
        views={"small": {"size": 8}},  # module-level views skip document groups
    )
    dm.setup("test")
    batch = dm.finish_batch(dm.on_before_batch_transfer(next(iter(dm.test_dataloader())), 0))
    assert batch["modality"] == "pair" and batch["images"].shape == (3, 1, 3, 16, 16)
    assert batch["images"].dtype == torch.float32 and "image_small" not in batch
    media, eoc = tok.token_id("<image>"), tok.token_id("<|endofchunk|>")
    assert (batch["text_ids"] == media).sum(1).tolist() == [1, 1, 1]
    assert (batch["text_ids"] == eoc).sum(1).tolist() == [1, 1, 1]
    assert set(batch) >= {"images", "images_mask", "num_images", "text_ids", "text_mask", "media_mask", "lm_labels"}


def test_pair_format_is_checked_per_source_and_group(tmp_path):
    url = write_tar(tmp_path / "p.tar", [{"__key__": "p0", "jpg": jpeg_bytes(), "txt": "a"}])
    Manifest(name="p", modality="pair", splits={"train": Split(urls=url, num_samples=1)}).save(tmp_path / "p.yaml")
    Manifest(name="d", modality="interleaved", splits={"train": Split(urls=url, num_samples=1)}).save(
        tmp_path / "d.yaml"
    )
    p, d = str(tmp_path / "p.yaml"), str(tmp_path / "d.yaml")

    def setup(*sources):
        WebDataModule(train=list(sources), tokenizer=TOK, num_workers=0).setup("fit")

    with pytest.raises(ConfigError, match=r"data.train\[0\].pair_format \(p/train\) must be one of caption, inter"):
        setup(Source(p, pair_format="document"))
    with pytest.raises(ConfigError, match=r"data.train\[0\].pair_format \(d/train\) applies to pair sources"):
        setup(Source(d, pair_format="interleaved"))
    with pytest.raises(ConfigError, match=r"data.train\[0\].mmc4 \(p/train\) applies to interleaved sources"):
        setup(Source(p, mmc4={"sim_threshold": 0.3}))
    with pytest.raises(ConfigError, match=r"data.train\[1\].pair_format .* but data.train\[0\].pair_format"):
        setup(Source(p, pair_format="interleaved"), Source(p, pair_format="caption"))
    with pytest.raises(ConfigError, match="views: extra image views are not supported for interleaved documents"):
        setup(Source(p, pair_format="interleaved", views={"small": {"size": 8}}))
