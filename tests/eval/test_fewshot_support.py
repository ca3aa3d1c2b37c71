"""Few-shot demonstrations when the support split is the query split (a train split
evaluated): a query never gets itself, nor, on the same shards, another item of its image,
as a demonstration, with random and RICES draws alike, whatever the batch order."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import jpeg_bytes, write_tar

from tests.eval.fewshot_fixtures import SIZE, flamingo, manifest, query_batches
from tests.eval.fewshot_fixtures import tokenizer as make_tokenizer
from vlp.data.manifest import Manifest, Split
from vlp.data.transforms import ImageTransform
from vlp.errors import ConfigError
from vlp.eval.fewshot import FewShotEvaluator, load_support, random_demos, rices_demos
from vlp.models.evaluation import EvalSource


@pytest.fixture(scope="module")
def tok():
    return make_tokenizer()


@pytest.fixture(scope="module")
def model(tok):
    return flamingo(tok)


def evaluator(modality: str, tok, **options) -> FewShotEvaluator:
    ev = FewShotEvaluator(modality)
    ev.configure(EvalSource(name="toy/train", where="data.test[0]", options={"fewshot": options}, tokenizer=tok))
    return ev


def spy_generate(model, monkeypatch) -> list[torch.Tensor]:
    """The (M, 3, H, W) images of every prompt ``model.generate`` is given."""
    seen: list[torch.Tensor] = []
    real = model.generate

    def spy(ids, mask, images, *args, **kwargs):
        seen.extend(images.clone())
        return real(ids, mask, images, *args, **kwargs)

    monkeypatch.setattr(model, "generate", spy)
    return seen


def same_image(a: torch.Tensor, b: torch.Tensor) -> bool:
    return bool(torch.equal(a, b))


def support_features(model, path: str, split: str = "train") -> tuple[torch.Tensor, list[str]]:
    s = load_support(path, split, image_size=SIZE, norm="clip", max_support=100)
    images = ImageTransform(SIZE, norm="clip").normalize_batch(s.images)
    with torch.no_grad():
        return F.normalize(model.vision_encoder(images).pooled, dim=-1), s.keys


def test_rices_never_picks_the_query_itself(model, tok, tmp_path, monkeypatch):
    path = manifest(tmp_path, "retrieval", 6)  # its train and test splits are one tar
    feats, keys = support_features(model, path)
    batches = query_batches(path, "retrieval", tok, batch_size=4)
    # without the exclusion the query is its own nearest neighbour: RICES puts it last
    plain = rices_demos(feats, feats, 2)
    assert [d[-1] for d in plain] == list(range(6))
    assert [str(k) for b in batches for k in b["keys"]] == keys  # the queries are the support items
    seen = spy_generate(model, monkeypatch)
    ev = evaluator(
        "retrieval", tok, support={"manifest": path}, shots=[2], demos="rices", max_new_tokens=1, num_beams=1
    )
    for b in batches:
        ev.update(model, None, b)
    assert len(seen) == 6
    for images in seen:  # (3, 3, H, W): 2 demonstrations, then the query
        assert not any(same_image(d, images[-1]) for d in images[:-1])
    # the next most similar items take the query's place, in the same order
    want = [[i for i in row if i != q][-2:] for q, row in enumerate(rices_demos(feats, feats, 3))]
    got = rices_demos(feats, feats, 2, exclude=[{q} for q in range(6)])
    assert got == want


def test_random_draws_leave_the_query_out_in_any_batch_order(model, tok, tmp_path, monkeypatch):
    path = manifest(tmp_path, "retrieval", 5)
    opts = dict(support={"manifest": path}, shots=[4], max_new_tokens=1, num_beams=1)  # 4 of 5: every other item

    def run(batch_size: int, reverse: bool) -> dict[str, torch.Tensor]:
        seen = spy_generate(model, monkeypatch)
        batches = query_batches(path, "retrieval", tok, batch_size=batch_size)
        batches = batches[::-1] if reverse else batches
        ev = evaluator("retrieval", tok, **opts)
        for b in batches:
            ev.update(model, None, b)
        keys = [str(k) for b in batches for k in b["keys"]]
        return dict(zip(keys, seen, strict=True))

    a, b = run(2, False), run(1, True)
    assert a.keys() == b.keys() and len(a) == 5
    for key, images in a.items():
        assert torch.equal(images, b[key])  # the same draw, whatever the batches
        # its 4 demonstrations are the 4 other items, each once
        others = [k for k in a if k != key]
        assert sorted(next(k for k in others if same_image(d, a[k][-1])) for d in images[:-1]) == others


def test_random_demos_without_exclusion_are_unchanged():
    key = "shard-0.tar:s0001"
    assert random_demos(10, 3, 0, key, exclude=set()) == random_demos(10, 3, 0, key)
    drawn = random_demos(10, 9, 0, key, exclude={4})
    assert 4 not in drawn and len(set(drawn)) == 9
    with pytest.raises(ConfigError, match=r"10 demonstrations asked for shard-0.tar:s0001 .*1 of them the query's own"):
        random_demos(10, 10, 0, key, exclude={4})


def _pairs_of_three_images(folder) -> str:
    """Pair data: 3 images, each twice (two captions, one ``image_id``), 6 samples."""
    folder.mkdir(parents=True, exist_ok=True)
    colors = [(220, 30, 30), (30, 30, 220), (30, 200, 30)]
    samples = [
        {
            "__key__": f"p{i}",
            "jpg": jpeg_bytes(colors[i % 3], size=(SIZE, SIZE)),
            "txt": f"caption {i} of picture {i % 3}.",
            "json": {"image_id": 100 + i % 3},
        }
        for i in range(6)
    ]
    url = write_tar(folder / "pairs.tar", samples)
    split = Split(urls=url, num_samples=6)
    path = folder / "pairs.yaml"
    Manifest(name="toy_pairs", modality="pair", splits={"train": split, "test": split}).save(path)
    return str(path)


def test_the_other_captions_of_the_query_image_are_left_out(model, tok, tmp_path, monkeypatch):
    path = _pairs_of_three_images(tmp_path)
    seen = spy_generate(model, monkeypatch)
    # 4 shots from 6 items: exactly the 4 items of the two other pictures
    ev = evaluator("pair", tok, support={"manifest": path}, shots=[4], demos="rices", max_new_tokens=1, num_beams=1)
    for b in query_batches(path, "pair", tok, batch_size=4):
        ev.update(model, None, b)
    assert len(seen) == 6
    for images in seen:
        assert not any(same_image(d, images[-1]) for d in images[:-1])
    # 5 shots cannot be drawn without the query's own picture: a clear error
    ev = evaluator("pair", tok, support={"manifest": path}, shots=[5], max_new_tokens=1, num_beams=1)
    with pytest.raises(ConfigError, match=r"shots: 5 demonstrations per query but .*p0 may use only 4 of the 6"):
        ev.update(model, None, query_batches(path, "pair", tok, batch_size=2)[0])


def test_another_split_with_the_same_image_ids_is_not_excluded(model, tok, tmp_path):
    support = _pairs_of_three_images(tmp_path / "support")
    query = _pairs_of_three_images(tmp_path / "query")  # other shards: its image ids are another dataset's
    ev = evaluator("pair", tok, support={"manifest": support}, shots=[1])
    batch = query_batches(query, "pair", tok, batch_size=6)[0]
    ev._prepare(model, batch)
    assert all(not ev.support.own(str(k), int(i)) for k, i in zip(batch["keys"], batch["image_id"], strict=True))
    own = ev.support.own(ev.support.keys[0].replace("file:", ""), 100)  # the same shard, however written
    assert own == {0, 3}
