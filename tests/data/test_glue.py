"""GLUE-format tsv files: every task's column layout read by its table, bad rows counted
with their line numbers, conversion to ``text_pair`` shards and batches from them."""

from __future__ import annotations

import json
import logging

import pytest
import torch

from vlp.data import Source, WebDataModule
from vlp.data.collate import text_pair_batch
from vlp.data.commands import data_main
from vlp.data.glue import GLUE_TASKS, convert_glue, read_glue_tsv
from vlp.data.manifest import load_manifest
from vlp.data.pipeline import SampleDecoder, Skipped
from vlp.errors import ConfigError, DataError

T = "\t"


def _tsv(path, rows: list[list[str]], bom: bool = False) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(("\ufeff" if bom else "") + "\n".join(T.join(r) for r in rows) + "\n", encoding="utf-8")


# Each task's real layout (header names and column order as GLUE ships them).
LAYOUTS = {
    "cola": (
        None,  # no header in train/dev
        [["gj04", "1", "", "Our friends won't buy this analysis."], ["gj04", "0", "*", "They drank the pub."]],
        [("Our friends won't buy this analysis.", None, 1), ("They drank the pub.", None, 0)],
    ),
    "sst2": (
        ["sentence", "label"],
        [['it \'s a "charming" journey ', "1"], ["unflinchingly bleak", "0"]],
        [('it \'s a "charming" journey', None, 1), ("unflinchingly bleak", None, 0)],
    ),
    "mrpc": (
        ["Quality", "#1 ID", "#2 ID", "#1 String", "#2 String"],
        [["1", "702876", "702977", "Amrozi accused his brother .", "Referring to him , Amrozi accused ."]],
        [("Amrozi accused his brother .", "Referring to him , Amrozi accused .", 1)],
    ),
    "qqp": (
        ["id", "qid1", "qid2", "question1", "question2", "is_duplicate"],
        [["133273", "213221", "213222", "How is the life?", "What is life like?", "0"]],
        [("How is the life?", "What is life like?", 0)],
    ),
    "stsb": (
        ["index", "genre", "filename", "year", "old_index", "source1", "source2", "sentence1", "sentence2", "score"],
        [["0", "main-captions", "MSRvid", "2012test", "0001", "none", "none", "A plane.", "An air plane.", "5.000"]],
        [("A plane.", "An air plane.", 5.0)],
    ),
    "mnli": (  # dev: label1..label5 then gold_label
        ["index", "promptID", "pairID", "genre", "sentence1_binary_parse", "sentence2_binary_parse"]
        + ["sentence1_parse", "sentence2_parse", "sentence1", "sentence2"]
        + ["label1", "label2", "label3", "label4", "label5", "gold_label"],
        [
            ["0", "63735", "63735n", "slate", "( x )", "( y )", "(ROOT x)", "(ROOT y)", "The cat sat.", "A cat."]
            + ["neutral", "entailment", "neutral", "neutral", "neutral", "neutral"]
        ],
        [("The cat sat.", "A cat.", 1)],
    ),
    "qnli": (
        ["index", "question", "sentence", "label"],
        [["0", "What came into force?", "The law came into force.", "not_entailment"]],
        [("What came into force?", "The law came into force.", 1)],
    ),
    "rte": (
        ["index", "sentence1", "sentence2", "label"],
        [["0", "No weapons were found.", "Weapons were found.", "entailment"]],
        [("No weapons were found.", "Weapons were found.", 0)],
    ),
    "wnli": (
        ["index", "sentence1", "sentence2", "label"],
        [["0", "I stuck a pin through a carrot.", "The carrot had a hole.", "1"]],
        [("I stuck a pin through a carrot.", "The carrot had a hole.", 1)],
    ),
}


@pytest.mark.parametrize("task", sorted(LAYOUTS))
def test_every_task_layout_is_read_by_its_table(tmp_path, task):
    header, rows, expected = LAYOUTS[task]
    path = tmp_path / "dev.tsv"
    _tsv(path, ([header] if header else []) + rows, bom=task == "mrpc")  # MRPC's files start with a BOM
    samples, skipped = read_glue_tsv(path, task)
    assert skipped == []
    got = [(s["text"], s.get("text_b"), s["label"]) for s in samples]
    assert got == expected
    assert [s["line"] for s in samples] == list(range(2 if header else 1, len(rows) + (2 if header else 1)))
    assert ("text_b" in samples[0]) == (GLUE_TASKS[task].text_b is not None)


def test_test_files_have_no_labels(tmp_path):
    _tsv(tmp_path / "test.tsv", [["index", "sentence"], ["0", "uneasy mishmash"]])
    samples, skipped = read_glue_tsv(tmp_path / "test.tsv", "cola")  # CoLA's test file has a header
    assert samples == [{"text": "uneasy mishmash", "index": 0, "line": 2}] and skipped == []
    _tsv(tmp_path / "qqp.tsv", [["id", "question1", "question2"], ["0", "Why?", "How?"]])
    samples, _ = read_glue_tsv(tmp_path / "qqp.tsv", "qqp")
    assert samples[0]["text_b"] == "How?" and "label" not in samples[0]


def test_bad_rows_are_counted_with_their_line_numbers(tmp_path):
    rows = [
        ["index", "sentence1", "sentence2", "label"],
        ["0", "a", "b", "entailment"],
        ["1", "a only"],  # line 3: missing columns
        ["2", "a", "b", "neutral"],  # line 4: not an RTE label
        ["3", " ", "b", "entailment"],  # line 5: empty sentence
        ["4", "a", "b", "not_entailment"],
    ]
    _tsv(tmp_path / "dev.tsv", rows)
    samples, skipped = read_glue_tsv(tmp_path / "dev.tsv", "rte")
    assert [s["label"] for s in samples] == [0, 1] and [s["line"] for s in samples] == [2, 6]
    assert skipped == [
        {"line": 3, "reason": "2 column(s), expected at least 4"},
        {"line": 4, "reason": "unknown label 'neutral'"},
        {"line": 5, "reason": "empty text"},
    ]
    _tsv(tmp_path / "s.tsv", [["index", "sentence1", "sentence2", "score"], ["0", "a", "b", "nan"]])
    assert read_glue_tsv(tmp_path / "s.tsv", "stsb")[1] == [{"line": 2, "reason": "unknown label 'nan'"}]
    with pytest.raises(ConfigError, match="unknown GLUE task 'squad'"):
        read_glue_tsv(tmp_path / "dev.tsv", "squad")
    with pytest.raises(DataError, match="no column 'sentence'"):
        read_glue_tsv(tmp_path / "dev.tsv", "sst2")
    (tmp_path / "latin.tsv").write_bytes(b"sentence\tlabel\ncaf\xe9\t1\n")
    with pytest.raises(ConfigError, match="not valid utf-8.*line 2"):
        read_glue_tsv(tmp_path / "latin.tsv", "sst2")


def test_quotes_are_text(tmp_path):
    """GLUE is read with QUOTE_NONE: a quote opens no field, so a tab after it still splits."""
    _tsv(tmp_path / "train.tsv", [["sentence", "label"], ['"the film', "1"], ['ends "well" ', "0"]])
    samples, skipped = read_glue_tsv(tmp_path / "train.tsv", "sst2")
    assert [s["text"] for s in samples] == ['"the film', 'ends "well"'] and not skipped


def test_convert_writes_text_pair_shards_and_a_manifest(tmp_path, tokenizer, caplog):
    header, rows, _ = LAYOUTS["mrpc"]
    rows = [[str(i % 2), "1", "2", f"first sentence {i}", f"second sentence {i}"] for i in range(7)]
    _tsv(tmp_path / "MRPC" / "train.tsv", [header, *rows, ["1", "broken"]])
    _tsv(tmp_path / "MRPC" / "dev.tsv", [header, *rows[:3]])
    _tsv(
        tmp_path / "MRPC" / "test.tsv",
        [["index", "#1 ID", "#2 ID", "#1 String", "#2 String"], ["0", "1", "2", "a", "b"]],
    )
    out = tmp_path / "glue" / "mrpc"
    with pytest.raises(DataError, match=r"1 of 8 rows unusable .*line 9: 2 column"):
        convert_glue("mrpc", tmp_path / "MRPC", out)  # default max_skip_fraction 0.01
    with caplog.at_level(logging.WARNING):
        data_main(
            ["glue", "--task", "mrpc", "--dir", str(tmp_path / "MRPC"), "--out", str(out), "--samples-per-shard", "3"]
            + ["--max-skip-fraction", "0.2"]
        )
    assert "line 9 skipped: 2 column(s)" in caplog.text
    manifest = load_manifest(out / "manifest.yaml")
    assert manifest.modality == "text_pair" and manifest.extra["task"] == "mrpc"
    assert {k: v.num_samples for k, v in manifest.splits.items()} == {"train": 7, "dev": 3, "test": 1}
    assert manifest.splits["train"].shard_sizes == [3, 3, 1]
    assert manifest.extra["metrics"] == ["acc", "f1"] and manifest.extra["labelled"] == ["train", "dev"]
    assert manifest.extra["skipped"]["train"]["count"] == 1
    assert json.loads((out / "train-skipped.json").read_text()) == [
        {"line": 9, "reason": "2 column(s), expected at least 5"}
    ]
    dm = WebDataModule(
        tokenizer=tokenizer, batch_size=4, num_workers=0, test=[Source(str(out / "manifest.yaml"), split="train")]
    )
    dm.setup("test")
    batches = [dm.on_before_batch_transfer(b, 0) for b in dm.test_dataloader()]
    assert [len(b["keys"]) for b in batches] == [4, 3] and all(b["modality"] == "text_pair" for b in batches)
    b = batches[0]
    assert b["label"].tolist() == [0, 1, 0, 1] and b["label"].dtype == torch.long
    assert b["text_pair_ids"].shape == b["text_pair_mask"].shape == b["text_pair_types"].shape
    decoded = tokenizer.tok.decode(b["text_pair_ids"][1][b["text_pair_mask"][1].bool()])
    assert decoded == "[CLS] first sentence 1 [SEP] second sentence 1 [SEP]"
    types = b["text_pair_types"][1][b["text_pair_mask"][1].bool()].tolist()
    assert types == [0, 0, 0, 0, 0, 1, 1, 1, 1]  # [CLS] a [SEP] | b [SEP]
    # the unlabelled test split: every sample is a skip naming why
    dm = WebDataModule(
        tokenizer=tokenizer, batch_size=4, num_workers=0, test=[Source(str(out / "manifest.yaml"), split="test")]
    )
    dm.setup("test")
    with pytest.raises(DataError, match="no label in json"):
        list(dm.test_dataloader())


def test_decoder_and_collate_of_text_pair(tokenizer):
    decoder = SampleDecoder("text_pair", {"image": "jpg", "text": "txt", "json": "json", "label": "cls"}, None)

    def decode(meta):
        return decoder({"__key__": "k", "__url__": "u", "json": json.dumps(meta).encode()})

    single = decode({"text": "a  good film", "label": 1})
    assert single == {"text": "a good film", "text_b": None, "label": 1, "key": "u:k"}
    score = decode({"text": "a", "text_b": "b", "label": 3.8})
    for meta, reason in (
        ({"text": "a", "label": True}, "label must be an integer class or a finite score, got True"),
        ({"text": "a", "label": "pos"}, "label must be an integer"),
        ({"text": "a"}, "no label in json"),
        ({"text": "", "label": 0}, "empty text"),
        ({"text": "a", "text_b": " ", "label": 0}, "empty text_b"),
    ):
        got = decode(meta)
        assert isinstance(got, Skipped) and got.reason.startswith(reason), (meta, got)
    batch = text_pair_batch([single, {**single, "label": 0}], tokenizer)
    assert "text_pair_types" not in batch and batch["label"].tolist() == [1, 0]
    batch = text_pair_batch([score, {**score, "label": 2}], tokenizer)
    assert batch["label"].dtype == torch.float and batch["label"].tolist() == pytest.approx([3.8, 2.0])
    with pytest.raises(DataError, match="mixes sentence pairs and single sentences"):
        text_pair_batch([single, score], tokenizer)
    from vlp.data import OpenCLIPTokenizer

    with pytest.raises(ConfigError, match="OpenCLIPTokenizer cannot encode sentence pairs"):
        text_pair_batch([score], OpenCLIPTokenizer())


def test_committed_glue_manifests_match_the_converter():
    """data_manifests/glue_<task>.yaml name the shards `vlp data glue` writes (10,000 a shard)
    under ${VLP_DATA_ROOT:-data}/glue/<task>, with every split of the task's table."""
    import math

    from vlp.data.convert import shard_pattern

    for task, spec in GLUE_TASKS.items():
        m = load_manifest(f"data_manifests/glue_{task}.yaml")
        assert m.modality == "text_pair" and list(m.splits) == list(spec.splits)
        assert m.extra["metrics"] == list(spec.metrics) and m.extra["num_labels"] == spec.num_labels
        for name, split in m.splits.items():
            root = f"${{VLP_DATA_ROOT:-data}}/glue/{task}"
            assert split.urls == shard_pattern(root, name, math.ceil(split.num_samples / 10000))


def test_inspect_guesses_text_pair_for_json_only_shards():
    from collections import Counter

    from vlp.data.commands import _guess_modality

    assert _guess_modality(Counter({"json": 5})) == "text_pair"
