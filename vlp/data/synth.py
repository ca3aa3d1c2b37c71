"""The synthetic "shapes" benchmark: every modality, deterministic, written in seconds.

Images of one to three shapes (small/large; 8 colours; circle/square/triangle) on a noisy
grey background; compositional captions ("a small red circle left of a large blue square")
in several templates, so word order and attribute binding matter. Relations are
unambiguous by construction (:func:`relation_holds`). Same seed, same bytes.

Under ``out/``, for ``size = N`` (default 20,000; samples per split):
pair/train N (1/2/3-shape scenes, 20/50/30%) · retrieval/val 4*(max(200, N//40)//4) and
/test 4*(max(500, N//20)//4) · image/train N//4 and /test 24*(max(480, N//20)//24)
(one shape, class "colour kind", balanced test) · text/train N · vqa/train N//2, /val
max(200, N//40), /test max(500, N//20) · interleaved/train N//10 documents of 2-3 images;
plus ``info.json`` (counts, chance levels, vocabulary, templates), ``classes.json`` (class
names, zero-shot prompts) and ``manifests/shapes_<modality>.yaml``.

Retrieval val/test are groups of four 2-shape scenes on one layout: a base "A rel B", its
colour swap, its position swap and both. Captions of one template have the same bag of
words across a group, so a bag-of-words model cannot rank them: at best it finds the group
and guesses (R@1 1/4, recorded as ``bag_of_words_best``); R@1 is the telling metric. No
training scene contains a relation of a held-out group; held-out groups are capped at half
of the 840 possible.
"""

from __future__ import annotations

import io
import itertools
import json
import random
from collections import Counter
from dataclasses import dataclass
from functools import lru_cache
from math import comb
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from vlp.data.convert import ShardSink, shard_pattern
from vlp.data.manifest import Manifest, Split
from vlp.errors import ConfigError

COLORS = {
    "red": (220, 40, 40),
    "green": (40, 180, 60),
    "blue": (40, 80, 235),
    "yellow": (240, 220, 40),
    "purple": (150, 60, 200),
    "cyan": (40, 210, 220),
    "orange": (250, 140, 20),
    "white": (245, 245, 245),
}
KINDS = ("circle", "square", "triangle")
SIZES = {"small": 0.2, "large": 0.32}  # side as a fraction of the image side
RELATIONS = ("left of", "right of", "above", "below")
INVERSE = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}
GAP, PAD, ALIGN = 0.04, 0.04, 0.5  # min gap between shapes, border, max off-axis / on-axis
NOISE_TILES, JPEG_QUALITY = 32, 90
TEMPLATES = {
    1: ("a {A}", "there is a {A}", "a single {A}", "a {A} on a gray background", "an image of a {A}"),
    2: (
        "a {A} {rel} a {B}",
        "a {B} {inv} a {A}",
        "the {A} is {rel} the {B}",
        "there is a {A} {rel} a {B}",
        "a {B} with a {A} {rel} it",
        "the {B} is {inv} the {A}",
    ),
    3: (
        "a {A} {r1} a {B} and a {C} {r2} the {B}",
        "a {B} with a {A} {r1} it and a {C} {r2} it",
        "the {A} is {r1} the {B} and the {C} is {r2} it",
        "a {C} {r2} a {B} and a {A} {r1} the {B}",
        "the {B} is {inv1} the {A} and {inv2} the {C}",
    ),
}
CLASSES = tuple(f"{c} {k}" for c in COLORS for k in KINDS)
CLASS_TEMPLATES = (
    "a photo of a {}.",
    "a {}.",
    "a picture of a {}.",
    "a drawing of a {}.",
    "a small {}.",
    "a large {}.",
)
QUESTION_TYPES = ("color", "count", "exist", "spatial")
GROUP_SIZE = 4


@dataclass(frozen=True)
class Shape:
    size: str
    color: str
    kind: str
    x: float = 0.5  # centre, as a fraction of the image side (y grows downwards)
    y: float = 0.5

    @property
    def name(self) -> str:
        return f"{self.size} {self.color} {self.kind}"

    @property
    def half(self) -> float:
        return SIZES[self.size] / 2


@dataclass(frozen=True)
class Scene:
    shapes: tuple[Shape, ...]
    relations: tuple[tuple[int, str, int], ...] = ()  # (i, rel, j): shapes[i] rel shapes[j]
    background: int = 64  # grey level
    noise: int = 0  # index of the noise tile

    def relation_keys(self) -> frozenset[str]:
        """Symbolic relations with "left of"/"above" only: "small red circle left of ..."."""
        keys = []
        for i, rel, j in self.relations:
            a, b = self.shapes[i], self.shapes[j]
            if rel in ("right of", "below"):
                a, b, rel = b, a, INVERSE[rel]
            keys.append(f"{a.name} {rel} {b.name}")
        return frozenset(keys)

    def key(self) -> str:
        """The scene's symbolic description (positions, background and noise ignored)."""
        names, relations = sorted(s.name for s in self.shapes), sorted(self.relation_keys())
        return " | ".join(names) + " || " + " | ".join(relations)

    def to_dict(self) -> dict:  # dataclasses.asdict deep-copies: too slow for 60k scenes
        shapes = [{"size": s.size, "color": s.color, "kind": s.kind, "x": s.x, "y": s.y} for s in self.shapes]
        return {
            "shapes": shapes,
            "relations": [list(r) for r in self.relations],
            "background": self.background,
            "noise": self.noise,
        }

    @classmethod
    def from_dict(cls, d: dict) -> Scene:
        return cls(
            tuple(Shape(**s) for s in d["shapes"]), tuple(tuple(r) for r in d["relations"]), d["background"], d["noise"]
        )


def relation_holds(a: Shape, b: Shape, rel: str) -> bool:
    """``a rel b`` unambiguously: their boxes are GAP apart along the relation's axis and
    the offset on the other axis is at most ALIGN times the distance along it."""
    if rel in ("right of", "below"):
        a, b, rel = b, a, INVERSE[rel]
    du, dv = (b.x - a.x, b.y - a.y) if rel == "left of" else (b.y - a.y, b.x - a.x)
    return du >= a.half + b.half + GAP - 1e-9 and abs(dv) <= ALIGN * du + 1e-9


def caption(scene: Scene, template_index: int = 0) -> str:
    """The scene described by template ``TEMPLATES[len(scene.shapes)][template_index]``."""
    s, fill = scene.shapes, {}
    if len(s) == 1:
        fill = {"A": s[0].name}
    elif len(s) == 2:
        ((i, rel, j),) = scene.relations
        fill = {"A": s[i].name, "B": s[j].name, "rel": rel, "inv": INVERSE[rel]}
    else:
        (_, r1, _), (_, r2, _) = scene.relations  # (0, r1, 1), (2, r2, 1)
        fill = {
            "A": s[0].name,
            "B": s[1].name,
            "C": s[2].name,
            "r1": r1,
            "r2": r2,
            "inv1": INVERSE[r1],
            "inv2": INVERSE[r2],
        }
    return TEMPLATES[len(s)][template_index].format(**fill)


@lru_cache(maxsize=4)
def _noise_bank(image_size: int) -> np.ndarray:
    rng = np.random.default_rng(image_size)
    return rng.integers(-8, 9, size=(NOISE_TILES, image_size, image_size, 3), dtype=np.int16)


def render_scene(scene: Scene, image_size: int = 64) -> Image.Image:
    """Draw ``scene``; a pure function of the scene (noise comes from a fixed tile bank)."""
    pixels = _noise_bank(image_size)[scene.noise % NOISE_TILES] + scene.background  # (H, W, 3)
    img = Image.fromarray(pixels.astype(np.uint8))
    draw = ImageDraw.Draw(img)
    for s in scene.shapes:
        cx, cy, h = s.x * image_size, s.y * image_size, s.half * image_size
        box = (round(cx - h), round(cy - h), round(cx + h) - 1, round(cy + h) - 1)
        if s.kind == "circle":
            draw.ellipse(box, fill=COLORS[s.color])
        elif s.kind == "square":
            draw.rectangle(box, fill=COLORS[s.color])
        else:
            draw.polygon([((box[0] + box[2]) / 2, box[1]), (box[0], box[3]), (box[2], box[3])], fill=COLORS[s.color])
    return img


def _jpeg(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=JPEG_QUALITY)
    return buf.getvalue()


# -- sampling scenes ------------------------------------------------------------------------
Attrs = tuple[str, str, str]  # (size, color, kind)
_SIZE_NAMES, _COLOR_NAMES = tuple(SIZES), tuple(COLORS)


def _attrs(rng: random.Random, n: int) -> list[Attrs]:
    while True:  # (colour, kind) pairwise distinct, so "the red circle" names one shape
        out = [(rng.choice(_SIZE_NAMES), rng.choice(_COLOR_NAMES), rng.choice(KINDS)) for _ in range(n)]
        if len({a[1:] for a in out}) == n:
            return out


def _place_next_to(rng: random.Random, c: Attrs, b: Shape, rel: str) -> Shape | None:
    """A shape ``c rel b`` next to a placed ``b``, or None when ``b`` leaves no room."""
    ec, horizontal = SIZES[c[0]] / 2, rel in ("left of", "right of")
    ub, vb = (b.x, b.y) if horizontal else (b.y, b.x)
    sign = -1 if rel in ("left of", "above") else 1
    d_min, d_max = b.half + ec + GAP, (ub - ec - PAD) if sign < 0 else (1 - PAD - ec - ub)
    if d_max < d_min:
        return None
    d = rng.uniform(d_min, d_max)
    lo, hi = max(PAD + ec, vb - ALIGN * d), min(1 - PAD - ec, vb + ALIGN * d)
    if lo > hi:
        return None
    u, v = ub + sign * d, rng.uniform(lo, hi)
    x, y = (u, v) if horizontal else (v, u)
    shape = Shape(*c, round(x, 3), round(y, 3))
    return shape if relation_holds(shape, b, rel) else None  # rounding may break it (rare)


def _place_alone(rng: random.Random, a: Attrs) -> Shape:
    lo, hi = PAD + SIZES[a[0]] / 2, 1 - PAD - SIZES[a[0]] / 2
    return Shape(*a, round(rng.uniform(lo, hi), 3), round(rng.uniform(lo, hi), 3))


def _place_pair(rng: random.Random, a: Attrs, b: Attrs, rel: str) -> tuple[Shape, Shape] | None:
    sb = _place_alone(rng, b)
    sa = _place_next_to(rng, a, sb, rel)
    return sa and (sa, sb)


def _apart(s: Shape, t: Shape) -> bool:
    gap = s.half + t.half + GAP
    return abs(s.x - t.x) >= gap or abs(s.y - t.y) >= gap


def random_scene(rng: random.Random, num_shapes: int, exclude: frozenset[str] = frozenset()) -> Scene:
    """A scene of ``num_shapes`` shapes none of whose relations is in ``exclude``.

    Attributes and relations are drawn first, then positions until they fit, so that
    attributes stay uniform (retrying with new attributes would favour small shapes)."""
    while True:
        attrs = _attrs(rng, num_shapes)
        if num_shapes == 1:
            relations = ()
        elif num_shapes == 2:  # canonical direction; the templates say both
            relations = ((0, rng.choice(("left of", "above")), 1),)
        else:  # A r1 B on one axis, C r2 B on the other
            r1 = rng.choice(RELATIONS)
            relations = ((0, r1, 1), (2, rng.choice(RELATIONS[2:] if r1 in RELATIONS[:2] else RELATIONS[:2]), 1))
        symbolic = Scene(tuple(Shape(*a) for a in attrs), relations)
        if not symbolic.relation_keys() & exclude:
            break
    shapes = None
    while not shapes:
        if num_shapes == 1:
            shapes = (_place_alone(rng, attrs[0]),)
        elif num_shapes == 2:
            shapes = _place_pair(rng, attrs[0], attrs[1], relations[0][1])
        else:
            pair = _place_pair(rng, attrs[0], attrs[1], relations[0][1])
            c = pair and _place_next_to(rng, attrs[2], pair[1], relations[1][1])
            shapes = c and _apart(c, pair[0]) and (*pair, c)
    return Scene(tuple(shapes), relations, rng.randint(40, 90), rng.randrange(NOISE_TILES))


def hard_negative_bases() -> list[tuple[Attrs, str, Attrs]]:
    """One base "A rel B" per group: 840 groups of 4 symbolic scenes that share a bag of words."""
    attrs = [(s, c, k) for s in SIZES for c in COLORS for k in KINDS]
    seen, bases = set(), []
    for a in attrs:
        for b in attrs:
            if a[1] == b[1] or (a[0], a[2]) == (b[0], b[2]):  # else a swap gives an equal scene
                continue
            for rel in ("left of", "above"):
                members = _group_members(a, rel, b)
                if not seen & set(members):
                    seen.update(members)
                    bases.append((a, rel, b))
    return bases


def _group_members(a: Attrs, rel: str, b: Attrs) -> list[tuple[Attrs, str, Attrs]]:
    a2, b2 = (a[0], b[1], a[2]), (b[0], a[1], b[2])  # colours exchanged
    return [(a, rel, b), (a2, rel, b2), (b, rel, a), (b2, rel, a2)]  # base, colour, position, both


def _group(rng: random.Random, base: tuple[Attrs, str, Attrs]) -> list[Scene]:
    """The four scenes of a group on one layout: positions p (left/top) and q."""
    a, rel, b = base
    while True:
        pair = _place_pair(rng, a, b, rel)
        if pair is None:
            continue
        p, q = pair
        big = max(SIZES.values()) / 2  # either shape must fit at either position
        if all(big <= v <= 1 - big for v in (p.x, p.y, q.x, q.y)):
            break
    return [
        Scene(
            (Shape(*s, p.x, p.y), Shape(*t, q.x, q.y)), ((0, rel, 1),), rng.randint(40, 90), rng.randrange(NOISE_TILES)
        )
        for s, _, t in _group_members(a, rel, b)
    ]


# -- questions --------------------------------------------------------------------------------
def make_question(scene: Scene, rng: random.Random) -> tuple[str, str, str]:
    """(question, answer, question_type) about ``scene``; yes/no answers are balanced."""
    shapes = scene.shapes
    while True:
        qtype = rng.choice(QUESTION_TYPES if scene.relations else QUESTION_TYPES[:3])
        if qtype == "color":
            kinds = Counter(s.kind for s in shapes)
            sized = Counter((s.size, s.kind) for s in shapes)
            s = rng.choice(shapes)
            if kinds[s.kind] == 1:
                return f"what color is the {s.kind}?", s.color, qtype
            if sized[(s.size, s.kind)] == 1:
                return f"what color is the {s.size} {s.kind}?", s.color, qtype
        elif qtype == "count":
            if rng.random() < 0.5:
                return "how many shapes are there?", str(len(shapes)), qtype
            kind = rng.choice(KINDS)
            return f"how many {kind}s are there?", str(sum(s.kind == kind for s in shapes)), qtype
        elif qtype == "exist":
            present = {(s.color, s.kind) for s in shapes}
            if rng.random() < 0.5:
                color, kind = rng.choice(sorted(present))
            else:
                color, kind = rng.choice(sorted({(c, k) for c in COLORS for k in KINDS} - present))
            return f"is there a {color} {kind}?", "yes" if (color, kind) in present else "no", qtype
        else:
            i, rel, j = rng.choice(scene.relations)
            a, b = shapes[i], shapes[j]
            if rng.random() < 0.5:  # swap the roles: "what is right of A?" -> B
                a, b, rel = b, a, INVERSE[rel]
            if rng.random() < 0.5:
                asked = rel if rng.random() < 0.5 else INVERSE[rel]
                answer = "yes" if asked == rel else "no"
                return f"is the {a.color} {a.kind} {asked} the {b.color} {b.kind}?", answer, qtype
            matches = [s for s in shapes if s is not b and relation_holds(s, b, rel)]
            if matches == [a]:
                return f"what is {rel} the {b.color} {b.kind}?", f"{a.color} {a.kind}", qtype


def vqa_answers() -> list[str]:
    """Every answer the generator can give (a fixed classifier vocabulary)."""
    pairs = {f"{c} {k}" for c in COLORS for k in KINDS}
    return sorted({*COLORS, "yes", "no", "0", "1", "2", "3"} | pairs)


def vocabulary() -> list[str]:
    words = {w for ts in TEMPLATES.values() for t in ts for w in t.split() if not w.startswith("{")}
    words |= {*SIZES, *COLORS, *KINDS} | {w for r in RELATIONS for w in r.split()}
    return sorted(words)


# -- chance levels ----------------------------------------------------------------------------
def retrieval_chance(num_images: int, captions_per_image: int, ks: tuple = (1, 5, 10)) -> dict:
    """Expected R@K of a random ranking: t2i K/N; i2t 1 - C(M-c, K) / C(M, K)."""
    n, c = num_images, captions_per_image
    m = n * c
    out = {"images": n, "captions": m, "captions_per_image": c}
    out.update({f"t2i_r{k}": min(k, n) / n for k in ks})
    out.update({f"i2t_r{k}": 1 - comb(m - c, k) / comb(m, k) for k in ks})
    return out


def vqa_majority(train: list[tuple[str, str]], test: list[tuple[str, str]]) -> dict:
    """Accuracy on ``test`` of answering each question type with its most common train answer."""
    by_type: dict[str, Counter] = {}
    for qtype, answer in train:
        by_type.setdefault(qtype, Counter())[answer] += 1
    majority = {t: c.most_common(1)[0][0] for t, c in sorted(by_type.items())}
    out = {"majority_answer": majority}
    for t in majority:
        answers = [a for qt, a in test if qt == t]
        out[t] = sum(a == majority[t] for a in answers) / max(1, len(answers))
    out["overall"] = sum(a == majority.get(t) for t, a in test) / max(1, len(test))
    return out


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
    root, ids, qa = Path(out), itertools.count(), {}
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
    }
    manifests = {}
    for modality, splits in info["splits"].items():
        manifests[modality] = Manifest(
            name=f"shapes_{modality}",
            modality=modality,
            splits={
                k: Split(shard_pattern(f"{root}/{modality}", k, v["num_shards"]), v["num_samples"])
                for k, v in splits.items()
            },
            license="CC0-1.0 (generated)",
            description=f"Synthetic shapes benchmark (vlp data synth --seed {info['seed']} --size "
            f"{info['size']}), {modality}: {what[modality]}.",
            extra=extra.get(modality, {}),
        )
    return manifests
