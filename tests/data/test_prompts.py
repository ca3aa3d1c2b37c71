"""Prompts for generation: reading a folder or a file of documents, open prompt batches."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

from tests.helpers import MINILM
from vlp.data import HFTokenizer, Prompts, prompt_batch
from vlp.data.prompts import PromptCollate, PromptDataset, read_prompts
from vlp.data.transforms import ImageTransform
from vlp.errors import ConfigError, DataError


@pytest.fixture(scope="module")
def tok():
    return HFTokenizer(MINILM, max_length=32, special_tokens=["<image>", "<|endofchunk|>"])


def test_open_prompts_keep_no_end_token_and_mark_their_images(tok):
    images = [[torch.zeros(3, 8, 8)], [torch.ones(3, 8, 8), torch.ones(3, 8, 8) * 2]]
    b = prompt_batch(["<image>Output:", "<image>a cat.<|endofchunk|><image>Output:"], images, tok)
    media, eoc = tok.token_id("<image>"), tok.token_id("<|endofchunk|>")
    cls, sep = tok.start_end_ids
    row0 = b["text_ids"][0][b["text_mask"][0]].tolist()
    assert row0 == [cls, media, *tok.tok.convert_tokens_to_ids(["output", ":"])]
    row1 = b["text_ids"][1][b["text_mask"][1]].tolist()
    assert row1[-1] != sep and eoc in row1 and row1.count(media) == 2
    assert b["media_mask"].sum(1).tolist() == [1, 2]
    assert b["images"].shape == (2, 2, 3, 8, 8)
    assert b["images_mask"].tolist() == [[True, False], [True, True]]
    assert torch.equal(b["images"][1, 1], images[1][1])


def test_a_folder_gives_one_prompt_per_image_and_a_bad_image_is_reported(tmp_path, tok):
    for name, color in (("b.png", (255, 0, 0)), ("a.jpg", (0, 255, 0))):
        Image.new("RGB", (20, 20), color).save(tmp_path / name)
    (tmp_path / "c.png").write_bytes(b"not an image")
    (tmp_path / "notes.txt").write_text("ignored")
    spec = Prompts(images=str(tmp_path))
    prompts = read_prompts(spec)
    assert [p["key"] for p in prompts] == ["a.jpg", "b.png", "c.png"]
    ds = PromptDataset(prompts, ImageTransform(16))
    batch = PromptCollate(tok, spec)([ds[i] for i in range(3)])
    assert batch["keys"] == ["a.jpg", "b.png"] and batch["images"].shape[:2] == (2, 1)
    assert batch["errors"][0]["key"] == "c.png" and "cannot read image" in batch["errors"][0]["error"]


def test_documents_file_and_bad_specs(tmp_path):
    Image.new("RGB", (8, 8)).save(tmp_path / "x.png")
    docs = tmp_path / "docs.jsonl"
    docs.write_text(
        json.dumps({"text": "<image>Question: what? Short answer:", "images": ["x.png"], "key": "q1"}) + "\n"
    )
    (p,) = read_prompts(Prompts(documents=str(docs)))
    assert p["key"] == "q1" and p["images"] == [tmp_path / "x.png"]
    docs.write_text(json.dumps({"text": "<image><image>two marks", "images": ["x.png"]}) + "\n")
    with pytest.raises(DataError, match="2 <image> mark"):
        read_prompts(Prompts(documents=str(docs)))
    with pytest.raises(ConfigError, match="exactly one"):
        read_prompts(Prompts())
    with pytest.raises(ConfigError, match="not a folder"):
        read_prompts(Prompts(images=str(tmp_path / "nope")))
    with pytest.raises(ConfigError, match="one <image> mark"):
        read_prompts(Prompts(images=str(tmp_path), prompt="Output:"))
