"""Few-shot evaluation on real photos through the Trainer: ImageNet photos converted with
``convert_folder`` (classification: support and query of disjoint classes) and Flickr8k
photos (captioning), a tiny random Flamingo. Pipeline facts, not accuracy: every query is
scored once, scores are multiples of 100 / #queries, the chance level is 100 / #classes, the
images the LM sees are the photos decoded, resized and CLIP-normalised."""

from __future__ import annotations

import csv
import json

import pytest
import torch
import torchvision.transforms.v2 as T
from helpers import quiet_trainer, shared_data_dir
from PIL import Image

from tests.eval.fewshot_fixtures import SIZE, flamingo
from tests.eval.fewshot_fixtures import tokenizer as make_tokenizer
from vlp.data import WebDataModule
from vlp.data.convert import convert_folder
from vlp.data.datamodule import Source

CLIP_MEAN = torch.tensor([0.48145466, 0.4578275, 0.40821073])[:, None, None]
CLIP_STD = torch.tensor([0.26862954, 0.26130258, 0.27577711])[:, None, None]


@pytest.fixture(scope="module")
def tok():
    return make_tokenizer()


def clip_view(path) -> torch.Tensor:
    """A photo as the eval transform should give it, written out here: shorter side to SIZE
    (bicubic), centre crop, [0, 1], CLIP mean/std."""
    img = Image.open(path).convert("RGB")
    img = T.CenterCrop(SIZE)(T.Resize(SIZE, interpolation=T.InterpolationMode.BICUBIC, antialias=True)(img))
    x = T.functional.pil_to_tensor(img).float() / 255
    return (x - CLIP_MEAN) / CLIP_STD  # (3, SIZE, SIZE)


def test_fewshot_classification_on_30_imagenet_classes(tmp_path, tok, monkeypatch):
    root = shared_data_dir("imagenet_sample_1k")
    with open(root / "labels.csv", newline="") as f:
        rows = list(csv.DictReader(f))[::30][:30]  # 30 photos of 30 classes
    names = [r["clip_classname"] for r in rows]
    classes = tmp_path / "classes.json"
    classes.write_text(json.dumps({"classnames": names}))
    for split, part in (("train", range(20)), ("test", range(20, 30))):  # support: 20 classes, query: 10 others
        labels = tmp_path / f"{split}.csv"
        labels.write_text("image,label\n" + "".join(f"{rows[i]['image']},{i}\n" for i in part))
        manifest = convert_folder(root / "images", tmp_path / "inet", labels=labels, classnames=classes, split=split)
    assert manifest.extra["converted"]["test"]["num_classes"] == 30
    path = str(tmp_path / "inet" / "manifest.yaml")

    model = flamingo(tok)
    seen = []
    real = model.token_logprobs

    def spy(batch):
        seen.append(batch)
        return real(batch)

    monkeypatch.setattr(model, "token_logprobs", spy)
    options = {"fewshot": {"support": {"manifest": path, "split": "train"}, "shots": [0, 2], "batch_size": 150}}
    dm = WebDataModule(
        test=[Source(path, split="test", evaluation=options)],
        tokenizer=tok,
        image_size=SIZE,
        batch_size=4,
        num_workers=0,
    )
    quiet_trainer().test(model, datamodule=dm, verbose=False)

    record = model.results["test"]
    assert record["num_items"] == 10 and record["support_items"] == 20
    assert record["support"] == f"{manifest.name}/train"
    assert set(record["scores"]) == {"top1@0", "top5@0", "top1@2", "top5@2"}
    for key, value in record["scores"].items():
        assert 0 <= value <= 100 and value / 10 == pytest.approx(round(value / 10)), (key, value)  # k of 10
    assert record["chance"]["top1@2"] == pytest.approx(100 / 30) and record["chance"]["top5@0"] == pytest.approx(
        500 / 30
    )
    # 10 queries x 30 names per shot count; 0 shots: the query image alone, 2 shots: 2 + 1
    rows_by_images = {}
    for b in seen:
        rows_by_images[b["images"].shape[1]] = rows_by_images.get(b["images"].shape[1], 0) + len(b["images"])
    assert rows_by_images == {1: 300, 2 + 1: 300}
    # every image the LM sees is one of the photos, decoded, resized to 32 and CLIP-normalised
    support = torch.stack([clip_view(root / "images" / rows[i]["image"]) for i in range(20)])  # (20, 3, 32, 32)
    query = torch.stack([clip_view(root / "images" / rows[i]["image"]) for i in range(20, 30)])
    two_shot = torch.cat([b["images"] for b in seen if b["images"].shape[1] == 3])  # (300, 3, 3, 32, 32)
    assert two_shot.shape[-3:] == (3, SIZE, SIZE) and two_shot.dtype == torch.float32

    def nearest(x: torch.Tensor, bank: torch.Tensor) -> tuple[int, float]:
        err = (bank - x).abs().mean(dim=(1, 2, 3))
        return int(err.argmin()), float(err.min())

    queries_seen, demos_seen = set(), set()
    for row in two_shot[::30]:  # one row per query prompt
        q, err = nearest(row[-1], query)
        assert err < 1e-4, err
        queries_seen.add(q)
        for demo in row[:-1]:
            d, err = nearest(demo, support)
            assert err < 1e-4, err
            demos_seen.add(d)
    assert queries_seen == set(range(10)) and demos_seen <= set(range(20))


def test_fewshot_captioning_on_flickr_photos(tmp_path, tok):
    root = shared_data_dir("flickr8k_1k")
    with open(root / "captions.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    photos = list(dict.fromkeys(r["image"] for r in rows))[:30]
    for split, part in (("train", photos[:20]), ("test", photos[20:])):
        captions = tmp_path / f"{split}.csv"
        with open(captions, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["image", "caption_index", "caption"])
            w.writerows([r["image"], r["caption_index"], r["caption"]] for r in rows if r["image"] in part)
        convert_folder(root / "images", tmp_path / "flickr", captions=captions, split=split)
    path = str(tmp_path / "flickr" / "manifest.yaml")
    model = flamingo(tok)
    opts = {"support": {"manifest": path}, "shots": [0, 2], "demos": "rices", "max_new_tokens": 3, "num_beams": 1}
    dm = WebDataModule(
        test=[Source(path, split="test", evaluation={"fewshot": opts})],
        tokenizer=tok,
        image_size=SIZE,
        batch_size=5,
        num_workers=0,
    )
    quiet_trainer().test(model, datamodule=dm, verbose=False)
    record = model.results["test"]
    assert record["num_items"] == 10 and record["support_items"] == 20 and record["demos"] == "rices"
    assert set(record["scores"]) == {"cider@0", "bleu4@0", "cider@2", "bleu4@2"}
    assert all(v >= 0 for v in record["scores"].values())
    assert record["chance"]["cider@0"] > 0  # the most frequent support caption against 5 references each
