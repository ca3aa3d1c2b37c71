"""Zero-shot image classification (vlp.eval.classification): hand-computed accuracies on a
model whose embeddings are fixed, template averaging, top-5 only with 5+ classes, class
files; tiny CLIP on a shapes image split through ``model.evaluate``; zero-shot + probe on
1 and 2 processes (gloo); the real-photo pipeline check; ``vlp test`` printing the table."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from helpers import MINILM, free_port, quiet_trainer, run_in, shared_data_dir, shrink_recipe, tiny_bert
from torch import nn

from vlp.errors import ConfigError
from vlp.eval.classification import (
    ImageClassificationEvaluator,
    accuracy_ks,
    load_classes,
    topk_hits,
    zero_shot_weights,
)
from vlp.models.evaluation import EvaluationLoop
from vlp.models.outputs import DualEncoderOutput

REPO = Path(__file__).resolve().parents[2]


class TextTable:
    """A tokenizer giving every text of ``texts`` its own id (one token, no padding)."""

    def __init__(self, texts: list[str]) -> None:
        self.ids = {t: i for i, t in enumerate(texts)}

    def __call__(self, texts: list[str]) -> dict:
        ids = torch.tensor([[self.ids[t]] for t in texts])
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


class FixedEmbeddings(EvaluationLoop, nn.Module):
    """image_embeds = the batch's ``image`` rows; text_embeds = rows of ``text_table`` by id."""

    def __init__(self, text_table: torch.Tensor) -> None:
        nn.Module.__init__(self)
        self.table = nn.Parameter(text_table, requires_grad=False)
        self.objectives, self.results, self._evaluators, self._trainer = {}, {}, {}, None

    def forward(self, batch: dict) -> DualEncoderOutput:
        out = DualEncoderOutput()
        if "image" in batch:
            out.image_embeds = batch["image"]
        if "text_ids" in batch:
            out.text_embeds = self.table[batch["text_ids"][:, 0]]
        return out

    def default_evaluator(self, modality: str):
        return ImageClassificationEvaluator() if modality == "image" else None

    def _datamodule(self):
        return None

    def report(self, text: str) -> None:
        print(text)

    def log_dict(self, *args, **kwargs) -> None:
        pass


def fixed_model(classnames, templates, class_vectors, scales=None):
    """Prompt ``t`` of class ``c`` embeds as ``scales[t] * class_vectors[c]`` (+ a per-template
    offset when given as (C, T, E))."""
    texts = [t.format(c) for c in classnames for t in templates]
    if class_vectors.ndim == 2:
        s = torch.ones(len(templates)) if scales is None else torch.tensor(scales)
        table = (class_vectors[:, None, :] * s[None, :, None]).reshape(len(texts), -1)
    else:
        table = class_vectors.reshape(len(texts), -1)
    return FixedEmbeddings(table), TextTable(texts)


def image_batch(vectors, labels, start=0) -> dict:
    return {
        "modality": "image",
        "image": torch.tensor(vectors, dtype=torch.float),
        "label": torch.tensor(labels),
        "keys": [f"{start + i:06d}" for i in range(len(labels))],
    }


SIX = ["ant", "bee", "cat", "dog", "eel", "fox"]
TWO_TEMPLATES = ["a {}.", "the {}."]


def test_zero_shot_accuracy_matches_a_hand_count(tmp_path):
    model, tok = fixed_model(SIX, TWO_TEMPLATES, torch.eye(6), scales=[1.0, 3.0])  # class weights = e_c
    images = [
        [0.9, 0.1, 0.0, 0.0, 0.0, 0.0],  # label 0: top-1 hit
        [0.1, 0.2, 0.9, 0.3, 0.0, -1.0],  # label 1: ranked 3rd: top-5 hit only
        [0.1, 0.2, 0.9, 0.3, 0.0, -1.0],  # label 5: ranked last: miss
        [0.0, 0.0, 0.0, 0.2, 0.0, 0.8],  # label 5: top-1 hit
    ]
    result = model.evaluate(
        [image_batch(images[:2], [0, 1]), image_batch(images[2:], [5, 5], 2)],
        modality="image",
        options={"classes": _classes_file(tmp_path, SIX, TWO_TEMPLATES)},
        tokenizer=tok,
    )
    assert result["scores"] == pytest.approx({"zeroshot_top1": 50.0, "zeroshot_top5": 75.0})
    assert result["chance"] == pytest.approx({"zeroshot_top1": 100 / 6, "zeroshot_top5": 500 / 6})
    assert result["num_images"] == 4 and result["num_classes"] == 6


def test_template_embeddings_are_normalised_then_averaged_then_renormalised():
    per_prompt = torch.tensor(
        [  # (C=2, T=2, E=2)
            [[3.0, 0.0], [0.0, 1.0]],  # normalised: (1, 0), (0, 1) → mean (0.5, 0.5)
            [[1.0, 1.0], [-2.0, 0.0]],
        ]
    )
    model, tok = fixed_model(["x", "y"], TWO_TEMPLATES, per_prompt)
    weights = zero_shot_weights(model, tok, ["x", "y"], TWO_TEMPLATES, batch_size=3)
    want = F.normalize(F.normalize(per_prompt, dim=-1).mean(1), dim=-1)
    torch.testing.assert_close(weights, want)
    torch.testing.assert_close(weights[0], torch.tensor([0.5, 0.5]).div(0.5**0.5))
    # the raw scale of a template does not weigh it more (normalised before the mean)
    assert not torch.allclose(weights, F.normalize(per_prompt.mean(1), dim=-1))


def test_top5_only_with_five_or_more_classes(tmp_path):
    assert accuracy_ks(4) == (1,) and accuracy_ks(5) == (1, 5)
    logits = torch.tensor([[0.1, 0.9, 0.5, 0.3, 0.2, 0.0], [1.0, 0.0, 0.2, 0.1, 0.3, 0.4]])
    assert topk_hits(logits, torch.tensor([2, 1]), (1, 5)) == {1: 0, 5: 1}
    assert topk_hits(logits, torch.tensor([1, 0]), (1, 5)) == {1: 2, 5: 2}
    four = SIX[:4]
    model, tok = fixed_model(four, ["{}"], torch.eye(4))
    result = model.evaluate(
        [image_batch([[1.0, 0, 0, 0], [0, 0, 1.0, 0]], [0, 1])],
        modality="image",
        options={"classes": _classes_file(tmp_path, four, ["{}"])},
        tokenizer=tok,
    )
    assert result["scores"] == {"zeroshot_top1": 50.0}  # no top-5 of 4 classes


def _classes_file(folder: Path, names, templates, key="templates") -> str:
    path = folder / "classes.json"
    path.write_text(json.dumps({"classnames": names, key: templates}))
    return str(path)


def test_class_files_and_their_errors(tmp_path):
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"classnames": ["a", "b"], "simple": ["a {}."], "openai": ["{}!", "a {} ."]}))
    assert load_classes(str(path), "openai") == (["a", "b"], ["{}!", "a {} ."])
    assert load_classes(str(path), ["x {}"]) == (["a", "b"], ["x {}"])
    with pytest.raises(ConfigError, match=r"no template list 'templates'.*\['openai', 'simple'\]"):
        load_classes(str(path))
    with pytest.raises(ConfigError, match="exactly one"):
        load_classes(str(path), ["no slot"])
    with pytest.raises(ConfigError, match="not found"):
        load_classes(str(tmp_path / "missing.json"))
    model, tok = fixed_model(["a"], ["{}"], torch.eye(1))
    with pytest.raises(ConfigError, match="needs class names and prompt templates"):
        model.evaluate([image_batch([[1.0]], [0])], modality="image", tokenizer=tok)
    with pytest.raises(ConfigError, match=r"unknown option\(s\) \['clases'\]"):
        model.evaluate([], modality="image", options={"clases": str(path)}, tokenizer=tok)


# -- tiny CLIP on a shapes image split ---------------------------------------------------------
def clip_for_minilm(width: int = 32):
    from vlp.encoders import TimmVisionEncoder
    from vlp.models import CLIP

    torch.manual_seed(0)
    image = TimmVisionEncoder(
        "vit_tiny_patch16_224",
        img_size=32,
        pool="cls",
        model_kwargs={"patch_size": 8, "embed_dim": width, "depth": 1, "num_heads": 2},
    )
    return CLIP(image, tiny_bert(30522, width, max_position_embeddings=32), embed_dim=16).eval()


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    from vlp.data.synth import write_shapes

    root = tmp_path_factory.mktemp("zs") / "shapes"
    write_shapes(root, seed=0, size=200, samples_per_shard=100, image_size=32)
    return root


def _datamodule(test: list[dict]):
    from vlp.data import HFTokenizer, Source, WebDataModule

    return WebDataModule(
        test=[Source(**s) for s in test],
        tokenizer=HFTokenizer(MINILM, max_length=16),
        image_size=32,
        eval_batch_size=64,
        num_workers=0,
        norm="half",
    )


def _batches(dm, idx: int) -> list[dict]:
    loaders = dm.test_dataloader()
    loader = loaders[idx] if isinstance(loaders, list) else loaders
    return [dm.finish_batch(b) for b in loader]


def test_tiny_clip_on_a_shapes_image_split_through_evaluate(shapes):
    manifest = str(shapes / "manifests" / "shapes_image.yaml")
    dm = _datamodule([{"manifest": manifest, "split": "train"}, {"manifest": manifest, "split": "test"}])
    dm.setup("test")
    train, test = _batches(dm, 0), _batches(dm, 1)
    model = clip_for_minilm()
    result = model.evaluate(
        test,
        modality="image",
        options={"classes": str(shapes / "classes.json")},
        tokenizer=dm.tokenizer,
        probe_train=train,
    )
    scores = result["scores"]
    assert set(scores) == {"zeroshot_top1", "zeroshot_top5", "probe_top1", "probe_top5"}
    assert all(0 <= v <= 100 for v in scores.values())
    assert result["num_images"] == 480 and result["num_classes"] == 24 and result["probe_train_images"] == 50
    assert result["chance"]["zeroshot_top1"] == pytest.approx(100 / 24)
    # the zero-shot top-1 is a count of hits out of 480
    assert (scores["zeroshot_top1"] * 480 / 100) == pytest.approx(round(scores["zeroshot_top1"] * 4.8))


def test_a_probe_train_source_nobody_uses_is_an_error(shapes):
    manifest = str(shapes / "manifests" / "shapes_image.yaml")
    dm = _datamodule([{"manifest": manifest, "split": "train", "evaluation": {"probe_train": True}}])
    model = clip_for_minilm()
    with pytest.raises(ConfigError, match="probe_train source but no other image source"):
        quiet_trainer().test(model, datamodule=dm, verbose=False)


def test_trainer_test_scores_zero_shot_and_probe_from_the_manifest_classes(shapes, capsys):
    manifest = str(shapes / "manifests" / "shapes_image.yaml")
    dm = _datamodule(
        [
            {"manifest": manifest, "split": "train", "evaluation": {"probe_train": True}},
            {"manifest": manifest, "split": "test", "evaluation": {"probe_l2": [0.01]}},
        ]
    )
    model = clip_for_minilm()
    quiet_trainer().test(model, datamodule=dm, verbose=False)
    record = model.results["test/shapes_image/test"]
    assert set(record["scores"]) == {"zeroshot_top1", "zeroshot_top5", "probe_top1", "probe_top5"}
    assert record["probe_l2"] == 0.01 and record["probe_train_images"] == 50
    assert not any("train" in k for k in model.results)  # the probe's split is not scored itself
    out = capsys.readouterr().out
    assert "zero-shot" in out and "linear probe" in out and "chance" in out


# -- the real photos ---------------------------------------------------------------------------
@pytest.mark.slow
def test_zero_shot_runs_on_50_real_photos(tmp_path):
    from vlp.data.convert import convert_folder

    root = shared_data_dir("imagenet_sample_1k")
    with open(root / "labels.csv", newline="") as f:
        rows = list(csv.DictReader(f))[::20][:50]  # 50 photos of 50 classes
    labels = tmp_path / "labels.csv"
    labels.write_text("image,label\n" + "".join(f"{r['image']},{r['label']}\n" for r in rows))
    manifest = convert_folder(
        root / "images", tmp_path / "inet", labels=labels, classnames=root / "classnames_templates.json"
    )
    assert manifest.extra["converted"]["train"]["num_classes"] == 1000
    dm = _datamodule(
        [
            {
                "manifest": str(tmp_path / "inet" / "manifest.yaml"),
                "split": "train",
                "evaluation": {"templates": "simple_imagenet_templates"},
            }
        ]
    )
    model = clip_for_minilm()
    quiet_trainer().test(model, datamodule=dm, verbose=False)
    record = model.results["test"]
    assert record["num_images"] == 50 and record["num_classes"] == 1000
    assert set(record["scores"]) == {"zeroshot_top1", "zeroshot_top5"}
    for key, value in record["scores"].items():
        assert 0 <= value <= 100 and (value / 2) == pytest.approx(round(value / 2)), (key, value)  # k/50
    assert record["chance"]["zeroshot_top5"] == pytest.approx(0.5)


# -- 1 versus 2 processes ----------------------------------------------------------------------
WORKER = Path(__file__).with_name("classification_worker.py")


def _run(out: Path, split: str, world: int) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}
    procs = [
        subprocess.Popen(
            [sys.executable, str(WORKER), str(out), split],
            env={**env, "WORLD_SIZE": str(world), "RANK": str(r)},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for r in range(world)
    ]
    logs = []
    for p in procs:
        try:
            logs.append(p.communicate(timeout=240)[0])
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            pytest.fail("a rank did not finish (a collective left waiting)")
    for p, log in zip(procs, logs, strict=True):
        assert p.returncode == 0, log[-3000:]
    return torch.load(out, weights_only=False)


@pytest.mark.slow
def test_zero_shot_and_probe_agree_on_one_and_two_processes(tmp_path):
    one = _run(tmp_path / "one.pt", "uneven", 1)
    assert set(one["scores"]) == {"zeroshot_top1", "zeroshot_top5", "probe_top1", "probe_top5"}
    assert one["num_images"] == 18 and one["probe_train_images"] == 30
    for split in ("uneven", "empty"):
        two = _run(tmp_path / f"two-{split}.pt", split, 2)
        assert two["scores"] == pytest.approx(one["scores"], abs=1e-6), split
        assert {k: v for k, v in two.items() if k != "scores"} == {k: v for k, v in one.items() if k != "scores"}


# -- the CLI -----------------------------------------------------------------------------------
@pytest.mark.slow
def test_vlp_test_prints_the_classification_table(shapes, tmp_path, capsys):
    import yaml

    cfg = yaml.safe_load((REPO / "recipes" / "tiny" / "clip.yaml").read_text())
    shrink_recipe(cfg, 32, steps=1)
    manifest = str(shapes / "manifests" / "shapes_image.yaml")
    data = cfg["data"]["init_args"]
    data.update(
        image_size=32,
        num_workers=0,
        test=[
            {"manifest": manifest, "split": "train", "evaluation": {"probe_train": True}},
            {"manifest": manifest, "split": "test"},
        ],
    )
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(cfg))
    run_in(tmp_path, ["test", "--config", str(tmp_path / "recipe.yaml"), "--trainer.enable_progress_bar=false"])
    out = capsys.readouterr().out
    assert "shapes_image/test: classification (CLIP)" in out
    assert "zero-shot" in out and "linear probe" in out and "480 images, 24 classes" in out
    results = json.loads(next(tmp_path.rglob("test_results.json")).read_text())["results"]
    assert set(results["test/shapes_image/test"]["scores"]) >= {"zeroshot_top1", "probe_top1"}


def test_albef_scores_zero_shot_and_probes_its_vit_cls_token():
    from tests.eval.classification_worker import CLASSES, TEMPLATES, HashTokenizer, image_batches
    from tests.models.test_albef import V, tiny_albef

    model = tiny_albef().eval()
    test, train = image_batches(0, [6]), image_batches(1, [12])
    out = model(test[0])
    torch.testing.assert_close(model.probe_features(out, test[0]), out.image_tokens[:, 0])
    record = model.evaluate(
        test,
        modality="image",
        options={"classes": CLASSES, "templates": TEMPLATES, "probe_l2": 0.1},
        tokenizer=HashTokenizer(V),
        probe_train=train,
    )
    assert set(record["scores"]) == {"zeroshot_top1", "zeroshot_top5", "probe_top1", "probe_top5"}
    assert record["num_images"] == 6 and record["probe_train_images"] == 12
