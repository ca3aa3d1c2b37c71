"""Writing every modality's shards, ``info.json``, ``classes.json`` and the manifests."""

from __future__ import annotations

import itertools
import json
import random
from pathlib import Path

from vlp.data.convert import ShardSink, shard_pattern
from vlp.data.manifest import Manifest, Split
from vlp.data.shapes.chance import pair_task_chance, retrieval_chance, vqa_majority
from vlp.data.shapes.render import _jpeg, render_scene
from vlp.data.shapes.scenes import (
    _SIZE_NAMES,
    CLASS_TEMPLATES,
    CLASSES,
    GROUP_SIZE,
    NOISE_TILES,
    QUESTION_TYPES,
    TEMPLATES,
    Scene,
    _group,
    _group_members,
    _place_alone,
    caption,
    hard_negative_bases,
    make_question,
    random_scene,
    vocabulary,
    vqa_answers,
)
from vlp.data.shapes.tasks import NLVR2_TEMPLATES, VE_LABELS, VE_TYPES, make_nlvr2, make_ve
from vlp.data.shapes.textpair import TEXT_PAIR_KINDS, TEXT_PAIR_LABELS, make_text_pair
from vlp.errors import ConfigError


# -- writing ----------------------------------------------------------------------------------
def write_shapes(
    out: str | Path,
    *,
    seed: int = 0,
    size: int = 20000,
    image_size: int = 64,
    samples_per_shard: int = 1000,
    captions_per_image: int = 5,
) -> dict:
    """Write the benchmark under ``out`` (layout in the module docstring); returns ``info``."""
    if size < 10 or samples_per_shard < 1 or image_size < 16:
        raise ConfigError(
            f"need size >= 10, samples_per_shard >= 1, image_size >= 16; got {size}, {samples_per_shard}, {image_size}"
        )
    if not 1 <= captions_per_image <= len(TEMPLATES[2]):
        raise ConfigError(f"captions_per_image must be in 1..{len(TEMPLATES[2])}, got {captions_per_image}")
    root, ids, qa, statements, hypotheses, flagged = Path(out), itertools.count(), {}, {}, {}, {}
    bases = hard_negative_bases()  # held-out groups: never in a training split
    random.Random(f"shapes-{seed}-held-out").shuffle(bases)
    val_g, test_g = max(200, size // 40) // GROUP_SIZE, max(500, size // 20) // GROUP_SIZE
    if val_g + test_g > len(bases) // 2:
        val_g = round(len(bases) // 2 * val_g / (val_g + test_g))
        test_g = len(bases) // 2 - val_g
    groups = {"val": bases[:val_g], "test": bases[val_g : val_g + test_g]}
    held_out = frozenset(
        f"{' '.join(a)} {rel} {' '.join(b)}" for base in bases[: val_g + test_g] for a, rel, b in _group_members(*base)
    )

    def image(scene: Scene) -> bytes:
        return _jpeg(render_scene(scene, image_size))

    def described(rng: random.Random) -> tuple[Scene, int]:  # a training scene and a template
        scene = random_scene(rng, rng.choices((1, 2, 3), (0.2, 0.5, 0.3))[0], held_out)
        return scene, rng.randrange(len(TEMPLATES[len(scene.shapes)]))

    def pair(rng: random.Random, i: int, split: str) -> dict:
        scene, t = described(rng)
        return {
            "jpg": image(scene),
            "txt": caption(scene, t),
            "json": {"image_id": next(ids), "template": t, "scene": scene.to_dict()},
        }

    pending = []  # the rest of the current retrieval group

    def retrieval(rng: random.Random, i: int, split: str) -> dict:
        if not pending:
            templates = sorted(rng.sample(range(len(TEMPLATES[2])), captions_per_image))
            pending.extend((templates, sc) for sc in _group(rng, groups[split][i // GROUP_SIZE]))
        templates, scene = pending.pop(0)
        return {
            "jpg": image(scene),
            "json": {
                "image_id": next(ids),
                "captions": [caption(scene, t) for t in templates],
                "group_id": i // GROUP_SIZE,
                "templates": templates,
                "scene": scene.to_dict(),
            },
        }

    def classified(rng: random.Random, i: int, split: str) -> dict:
        label = rng.randrange(len(CLASSES)) if split == "train" else i % len(CLASSES)  # balanced
        color, kind = CLASSES[label].split()
        shape = _place_alone(rng, (rng.choice(_SIZE_NAMES), color, kind))
        scene = Scene((shape,), (), rng.randint(40, 90), rng.randrange(NOISE_TILES))
        return {
            "jpg": image(scene),
            "cls": str(label),
            "json": {"image_id": next(ids), "label_name": CLASSES[label], "scene": scene.to_dict()},
        }

    def text(rng: random.Random, i: int, split: str) -> dict:
        return {"txt": caption(*described(rng))}

    def vqa(rng: random.Random, i: int, split: str) -> dict:
        scene, _ = described(rng)
        question, answer, qtype = make_question(scene, rng)
        qa.setdefault(split, []).append((qtype, answer))
        return {
            "jpg": image(scene),
            "json": {
                "image_id": next(ids),
                "question": question,
                "answers": [answer] * 10,
                "question_type": qtype,
                "scene": scene.to_dict(),
            },
        }

    def interleaved(rng: random.Random, i: int, split: str) -> dict:
        docs = [described(rng) for _ in range(rng.randint(2, 3))]
        return {
            **{f"{k}.jpg": image(sc) for k, (sc, _) in enumerate(docs)},
            "json": {
                "text": " ".join(f"<image> {caption(sc, t)}." for sc, t in docs),
                "num_images": len(docs),
                "image_ids": [next(ids) for _ in docs],
                "scenes": [sc.to_dict() for sc, _ in docs],
            },
        }

    nlvr2_templates = tuple(NLVR2_TEMPLATES)

    def nlvr2(rng: random.Random, i: int, split: str) -> dict:  # template and label cycle: balanced
        template, label = nlvr2_templates[i % len(nlvr2_templates)], (i // len(nlvr2_templates)) % 2
        left, right, sentence = make_nlvr2(rng, template, bool(label), held_out)
        statements.setdefault(split, []).append((template, sentence, label))
        return {
            "left.jpg": image(left),
            "right.jpg": image(right),
            "json": {
                "id": next(ids),
                "sentence": sentence,
                "label": label,
                "template": template,
                "scenes": [left.to_dict(), right.to_dict()],
            },
        }

    def ve(rng: random.Random, i: int, split: str) -> dict:  # the label cycles: balanced
        label = i % len(VE_LABELS)
        scene, hypothesis, htype = make_ve(rng, label, held_out)
        hypotheses.setdefault(split, []).append((htype, hypothesis, label))
        n = next(ids)  # one image per sample: the sample's id is its image's id
        return {
            "jpg": image(scene),
            "json": {
                "id": n,
                "image_id": n,
                "hypothesis": hypothesis,
                "label": label,
                "type": htype,
                "scene": scene.to_dict(),
            },
        }

    def pair_cls(rng: random.Random, i: int, split: str) -> dict:  # labels alternate: balanced
        label = i % 2  # 1: the sentence is false of the image (VE's contradictions), 0: it is true
        scene, text, htype = make_ve(rng, VE_LABELS.index("contradiction") if label else 0, held_out)
        flagged.setdefault(split, []).append((htype, text, label))
        n = next(ids)
        return {
            "jpg": image(scene),
            "json": {"id": n, "image_id": n, "text": text, "label": label, "type": htype, "scene": scene.to_dict()},
        }

    def text_pair(rng: random.Random, i: int, split: str) -> dict:  # labels alternate: balanced
        return {"json": make_text_pair(rng, i % 2)}

    def multiple(n: int, k: int) -> int:
        return k * (n // k)

    pair_step, ve_step = 2 * len(nlvr2_templates), len(VE_LABELS)
    plan = [  # (modality, split, samples, sample maker)
        ("pair", "train", size, pair),
        ("retrieval", "val", val_g * GROUP_SIZE, retrieval),
        ("retrieval", "test", test_g * GROUP_SIZE, retrieval),
        ("image", "train", size // 4, classified),
        ("image", "test", len(CLASSES) * (max(480, size // 20) // len(CLASSES)), classified),
        ("text", "train", size, text),
        ("vqa", "train", size // 2, vqa),
        ("vqa", "val", max(200, size // 40), vqa),
        ("vqa", "test", max(500, size // 20), vqa),
        ("interleaved", "train", size // 10, interleaved),
        ("nlvr2", "train", max(pair_step, multiple(size // 2, pair_step)), nlvr2),
        ("nlvr2", "val", multiple(max(200, size // 40), pair_step), nlvr2),
        ("nlvr2", "test", multiple(max(500, size // 20), pair_step), nlvr2),
        ("ve", "train", multiple(size // 2, ve_step), ve),
        ("ve", "val", multiple(max(200, size // 40), ve_step), ve),
        ("ve", "test", multiple(max(500, size // 20), ve_step), ve),
        ("pair_cls", "train", multiple(size // 2, 2), pair_cls),
        ("pair_cls", "val", multiple(max(200, size // 40), 2), pair_cls),
        ("pair_cls", "test", multiple(max(500, size // 20), 2), pair_cls),
        ("text_pair", "train", multiple(size // 2, 2), text_pair),
        ("text_pair", "val", multiple(max(200, size // 40), 2), text_pair),
        ("text_pair", "test", multiple(max(500, size // 20), 2), text_pair),
        # few-shot support sets (demonstrations), last so that every split above keeps its
        # ids; training-distribution scenes of their own draw, small enough to read whole
        ("pair", "support", max(256, size // 40), pair),  # captioning, one caption per image
        ("vqa", "support", max(256, size // 40), vqa),
        ("image", "support", len(CLASSES) * max(8, size // 1000), classified),  # balanced per class
    ]
    splits: dict[str, dict[str, dict]] = {}
    for modality, split, n, make in plan:
        rng = random.Random(f"shapes-{seed}-{modality}-{split}")
        with ShardSink(root / modality, split, samples_per_shard) as sink:
            for i in range(n):
                sink.write({"__key__": f"{i:08d}", **make(rng, i, split)})
        splits.setdefault(modality, {})[split] = {"num_samples": n, "num_shards": sink.num_shards}

    info = {
        "name": "shapes",
        "seed": seed,
        "size": size,
        "image_size": image_size,
        "samples_per_shard": samples_per_shard,
        "captions_per_image": captions_per_image,
        "splits": splits,
        "chance": {
            "retrieval": {
                k: retrieval_chance(v["num_samples"], captions_per_image) for k, v in splits["retrieval"].items()
            },
            "image": {"top1": 1 / len(CLASSES), "top5": 5 / len(CLASSES)},
            "vqa": {k: vqa_majority(qa["train"], qa[k]) for k in ("val", "test")},
            "nlvr2": pair_task_chance(statements, 2),  # labels: 0 false, 1 true
            "ve": pair_task_chance(hypotheses, len(VE_LABELS), by_template=False),
            "pair_cls": pair_task_chance(flagged, 2, by_template=False),  # labels: 0 true, 1 false
            "text_pair": {"acc": 50.0, "bag_of_words_best": 50.0},  # balanced; same bags of words
        },
        "hard_negatives": {
            "group_size": GROUP_SIZE,
            "available_groups": len(bases),
            "groups": {k: len(v) for k, v in groups.items()},
            # a perfect bag-of-words model finds the group, then guesses: chance within a group
            "bag_of_words_best": {
                k: v for k, v in retrieval_chance(GROUP_SIZE, captions_per_image).items() if "_r" in k
            },
        },
        "classes": list(CLASSES),
        "class_templates": list(CLASS_TEMPLATES),
        "templates": {str(k): list(v) for k, v in TEMPLATES.items()},
        "vocabulary": vocabulary(),
        "vqa_answers": vqa_answers(),
        "question_types": list(QUESTION_TYPES),
        "nlvr2_templates": dict(NLVR2_TEMPLATES),
        "ve_labels": list(VE_LABELS),
        "ve_types": dict(VE_TYPES),
        "text_pair_labels": list(TEXT_PAIR_LABELS),
        "text_pair_kinds": list(TEXT_PAIR_KINDS),
    }
    (root / "info.json").write_text(json.dumps(info, indent=1) + "\n")
    classes = {"classnames": list(CLASSES), "templates": list(CLASS_TEMPLATES)}
    (root / "classes.json").write_text(json.dumps(classes, indent=1) + "\n")
    for modality, manifest in shapes_manifests(str(out), info).items():
        manifest.save(root / "manifests" / f"shapes_{modality}.yaml")
    return info


def shapes_manifests(root: str, info: dict) -> dict[str, Manifest]:
    """One Manifest per modality for the shards under ``root``, e.g.
    "${VLP_DATA_ROOT:-data}/shapes" for the repo's data_manifests/."""
    chance = info["chance"]
    extra = {
        "retrieval": {"chance": chance["retrieval"], "hard_negatives": info["hard_negatives"]},
        "image": {"classes": f"{root}/classes.json", "num_classes": len(info["classes"]), "chance": chance["image"]},
        "vqa": {"majority_baseline": chance["vqa"], "question_types": info["question_types"]},
        "nlvr2": {"labels": ["false", "true"], "templates": info["nlvr2_templates"], **chance["nlvr2"]},
        "ve": {"labels": info["ve_labels"], "types": info["ve_types"], **chance["ve"]},
        "pair_cls": {"labels": ["true", "false"], **chance["pair_cls"]},
        "text_pair": {
            "labels": info["text_pair_labels"],
            "kinds": info["text_pair_kinds"],
            "chance": chance["text_pair"],
        },
    }
    what = {
        "pair": "one caption per image, 1-3 shapes",
        "retrieval": f"{info['captions_per_image']} captions per image; groups of 4 minimally "
        "different scenes (colour / position swaps) as hard negatives; scenes never "
        "seen in training",
        "image": f"{len(info['classes'])} classes 'colour kind'; names and prompts in classes.json",
        "text": "captions only",
        "vqa": "color / count / exist / spatial questions, 10 (identical) answers each",
        "interleaved": "documents of 2-3 images, each followed by its caption",
        "nlvr2": "two images and a sentence about the pair, true (1) or false (0); "
        f"{len(info['nlvr2_templates'])} templates, labels balanced per template",
        "ve": "one image and a hypothesis: 0 entailment, 1 neutral, 2 contradiction (SNLI-VE order), balanced",
        "pair_cls": "one image and a sentence, 1 when the sentence is false of the image (a colour changed, "
        "a relation reversed, a count off by one), 0 when true (a binary pair task, Hateful Memes-style), balanced",
        "text_pair": "two captions, 1 when they describe the same scene, 0 when b swaps a's colours and/or "
        "positions (the same bag of words: only word order tells), balanced",
    }
    manifests = {}
    for modality, splits in info["splits"].items():
        manifests[modality] = Manifest(
            name=f"shapes_{modality}",
            modality=modality,
            splits={
                k: Split(
                    shard_pattern(f"{root}/{modality}", k, v["num_shards"]),
                    v["num_samples"],
                    shard_sizes=_shard_sizes(v["num_samples"], v["num_shards"], info["samples_per_shard"]),
                )
                for k, v in splits.items()
            },
            license="CC0-1.0 (generated)",
            description=f"Synthetic shapes benchmark (vlp data synth --seed {info['seed']} --size "
            f"{info['size']}), {modality}: {what[modality]}.",
            extra=extra.get(modality, {}),
        )
    return manifests


def _shard_sizes(num_samples: int, num_shards: int, per_shard: int) -> list[int]:
    """Samples in each shard ``ShardSink`` wrote: ``per_shard`` each, the rest in the last one."""
    return [min(per_shard, num_samples - i * per_shard) for i in range(num_shards)]
