"""The synthetic "shapes" benchmark: every modality, deterministic, written in seconds.

Images of one to three shapes (small/large; 8 colours; circle/square/triangle) on a noisy
grey background; compositional captions ("a small red circle left of a large blue square")
in several templates, so word order and attribute binding matter. Relations are
unambiguous by construction (:func:`relation_holds`). Same seed, same bytes.

Under ``out/``, for ``size = N`` (default 20,000; samples per split):
pair/train N (1/2/3-shape scenes, 20/50/30%) · retrieval/val 4*(max(200, N//40)//4) and
/test 4*(max(500, N//20)//4) · image/train N//4 and /test 24*(max(480, N//20)//24)
(one shape, class "colour kind", balanced test) · text/train N · vqa/train N//2, /val
max(200, N//40), /test max(500, N//20) · interleaved/train N//10 documents of 2-3 images ·
nlvr2 and ve (downstream tasks of METER-style fine-tuning), each /train N//2, /val
max(200, N//40), /test max(500, N//20), rounded down to a multiple of 10 (nlvr2: 5
templates x 2 labels; train at least 10) or 3 (ve: 3 labels) so that labels are
exactly balanced; plus
``info.json`` (counts, chance levels, vocabulary, templates), ``classes.json`` (class
names, zero-shot prompts) and ``manifests/shapes_<modality>.yaml``.

nlvr2 (NLVR2-style): two scenes (``left.jpg``, ``right.jpg``) and a sentence about the pair
from one of :data:`NLVR2_TEMPLATES` ("the left image has more circles than the right
image"), label 1 true / 0 false, half of each template true. ve (SNLI-VE-style): one scene
and a hypothesis, label 0 entailment (a true statement), 1 neutral (a property the images
never show: material, temperature, author, drawing order) or 2 contradiction (a colour
changed, a relation reversed, a count off by one), a third each. Sentences are drawn so
that, apart from ve's neutral ones, the sentence alone says nothing about the label
(``sentence_only`` in ``info.json`` measures it). Their scenes, like every training
scene, avoid the relations of the held-out retrieval groups.

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


# -- NLVR2-style statements about two images ------------------------------------------------
NUMBERS = ("no", "one", "two", "three", "four", "five", "six")
NLVR2_TEMPLATES = {  # name -> sentence pattern; each needs both images to decide
    "more": "the {side} image has more {noun}s than the {other} image",
    "both": "both images contain a {color} {kind}",
    "relation": "the {side} image contains a {color} shape {rel} a {color2} shape",
    "exactly_one": "exactly one image contains a [{size}] {kind}",
    "total": "the two images contain {number} {noun}s in total",
}
SIDES = ("left", "right")
_THINGS = (*KINDS, *(f"{size} {kind}" for size in SIZES for kind in KINDS))  # for "exactly_one"


def _a(word: str) -> str:
    return f"{'an' if word[0] in 'aeiou' else 'a'} {word}"


def _count(scene: Scene, noun: str) -> int:
    """Shapes of kind ``noun`` ("shape": all of them)."""
    return sum(noun in ("shape", s.kind) for s in scene.shapes)


def _number(n: int, noun: str) -> str:
    return f"{NUMBERS[n]} {noun}{'' if n == 1 else 's'}"


def _loosely(a: Shape, b: Shape, rel: str) -> bool:
    """``a`` is on the ``rel`` side of ``b`` by centres: what a reader might still call "rel"."""
    if rel in ("right of", "below"):
        a, b, rel = b, a, INVERSE[rel]
    return a.x < b.x if rel == "left of" else a.y < b.y


def colour_relation(scene: Scene, c1: str, rel: str, c2: str) -> bool | None:
    """Whether ``scene`` has a ``c1`` shape ``rel`` a ``c2`` shape: True (unambiguously, see
    :func:`relation_holds`), False (no such pair even by centres), None (in between)."""
    pairs = [(a, b) for a in scene.shapes for b in scene.shapes if a is not b and (a.color, b.color) == (c1, c2)]
    if any(relation_holds(a, b, rel) for a, b in pairs):
        return True
    return None if any(_loosely(a, b, rel) for a, b in pairs) else False


def nlvr2_statements(left: Scene, right: Scene, template: str) -> list[tuple[str, bool]]:
    """Every sentence of ``template`` that is clearly true or clearly false of the pair
    (sentences about things in neither image, or counts of zero, are left out)."""
    scenes, out = {"left": left, "right": right}, []
    if template == "more":
        for side, other in (SIDES, SIDES[::-1]):
            for noun in ("shape", *KINDS):
                n, m = _count(scenes[side], noun), _count(scenes[other], noun)
                if n + m:
                    out.append((f"the {side} image has more {noun}s than the {other} image", n > m))
    elif template == "both":
        sets = [{(s.color, s.kind) for s in sc.shapes} for sc in (left, right)]
        for color, kind in sorted(sets[0] | sets[1]):
            out.append((f"both images contain {_a(color)} {kind}", (color, kind) in sets[0] & sets[1]))
    elif template == "relation":
        named = {
            (a.color, rel, b.color)
            for sc in (left, right)
            for a in sc.shapes
            for b in sc.shapes
            for rel in RELATIONS
            if a.color != b.color and relation_holds(a, b, rel)
        }
        for side in SIDES:
            for c1, rel, c2 in sorted(named):
                truth = colour_relation(scenes[side], c1, rel, c2)
                if truth is not None:
                    out.append((f"the {side} image contains {_a(c1)} shape {rel} {_a(c2)} shape", truth))
    elif template == "exactly_one":
        for thing in _THINGS:
            present = [any(thing in (s.kind, f"{s.size} {s.kind}") for s in sc.shapes) for sc in (left, right)]
            if any(present):  # false means: in both
                out.append((f"exactly one image contains {_a(thing)}", present[0] != present[1]))
    elif template == "total":
        for noun in ("shape", *KINDS):
            n = _count(left, noun) + _count(right, noun)
            for m in (n - 1, n, n + 1):
                if n and 1 <= m < len(NUMBERS):  # false means: off by one
                    out.append((f"the two images contain {_number(m, noun)} in total", m == n))
    else:
        raise ValueError(f"unknown nlvr2 template {template!r}")
    return out


def make_nlvr2(
    rng: random.Random, template: str, label: bool, exclude: frozenset[str] = frozenset()
) -> tuple[Scene, Scene, str]:
    """(left, right, sentence): two scenes of 1-3 shapes and a ``template`` sentence whose
    truth value is ``label``. Where the drawn scenes would make some sentences likelier true
    than false ("exactly one", totals), the sentence is drawn first and the scenes until its
    truth is ``label``, so that the sentence alone says nothing about the label."""
    target = None
    if template == "exactly_one":
        target = f"exactly one image contains {_a(rng.choice(_THINGS))}"
    elif template == "total":
        noun = rng.choice(("shape", *KINDS))
        target = f"the two images contain {_number(rng.choice((2, 3, 4, 5, 6) if noun == 'shape' else (1, 2, 3)), noun)} in total"
    while True:
        left, right = (random_scene(rng, rng.randint(1, 3), exclude) for _ in SIDES)
        options = [s for s, truth in nlvr2_statements(left, right, template) if truth == label and target in (None, s)]
        if options:
            return left, right, rng.choice(options)


# -- SNLI-VE-style hypotheses about one image -------------------------------------------------
VE_LABELS = ("entailment", "neutral", "contradiction")  # label index order (SNLI / SNLI-VE)
VE_TYPES = {  # hypothesis type -> pattern; the first three are entailed or contradicted
    "exist": "there is a {color} {kind}",
    "count": "there are {number} {noun}s",
    "relation": "the {color} {kind} is {rel} the {color2} {kind2}",
    # neutral: properties the images never show
    "material": "the {color} {kind} is made of {material}",
    "temperature": "the {color} {kind} is {warm|cold} to the touch",
    "author": "the {color} {kind} was drawn by {author}",
    "order": "the {color} {kind} was drawn {first|last}",
}
MATERIALS = ("wood", "metal", "glass", "paper", "plastic", "stone")
AUTHORS = ("a child", "a robot", "an artist")


def make_ve(rng: random.Random, label: int, exclude: frozenset[str] = frozenset()) -> tuple[Scene, str, str]:
    """(scene, hypothesis, type) with SNLI-VE label ``label`` (index into VE_LABELS):
    entailment a true statement, contradiction a drawn shape's colour changed, a relation
    reversed or a count off by one, neutral a property the images never show."""
    if label == 1:
        scene = random_scene(rng, rng.randint(1, 3), exclude)
        s = rng.choice(scene.shapes)
        name = f"{s.color} {s.kind}"
        htype = rng.choice(("material", "temperature", "author", "order")[: 4 if len(scene.shapes) > 1 else 3])
        if htype == "material":
            return scene, f"the {name} is made of {rng.choice(MATERIALS)}", htype
        if htype == "temperature":
            return scene, f"the {name} is {rng.choice(('warm', 'cold'))} to the touch", htype
        if htype == "author":
            return scene, f"the {name} was drawn by {rng.choice(AUTHORS)}", htype
        return scene, f"the {name} was drawn {rng.choice(('first', 'last'))}", htype
    true, htype = label == 0, rng.choice(("exist", "count", "relation"))
    if htype == "count":  # the number first: a count alone must not give the label away
        noun = rng.choice(("shape", *KINDS))
        m = rng.choice((1, 2, 3) if noun == "shape" else (0, 1, 2))
        while True:
            scene = random_scene(rng, rng.randint(1, 3), exclude)
            if abs(_count(scene, noun) - m) == (0 if true else 1):
                return scene, f"there {'is' if m == 1 else 'are'} {_number(m, noun)}", htype
    while True:
        scene = random_scene(rng, rng.randint(1, 3), exclude)
        shapes = scene.shapes
        if htype == "exist":  # contradiction: a drawn shape in a colour no shape of its kind has
            s = rng.choice(shapes)
            color = s.color
            if not true:
                color = rng.choice([c for c in COLORS if all((c, s.kind) != (t.color, t.kind) for t in shapes)])
            return scene, f"there is {_a(color)} {s.kind}", htype
        triples = [(a, rel, b) for a in shapes for b in shapes for rel in RELATIONS if relation_holds(a, b, rel)]
        if triples:  # contradiction: the relation reversed
            a, rel, b = rng.choice(triples)
            return scene, f"the {a.color} {a.kind} is {rel if true else INVERSE[rel]} the {b.color} {b.kind}", htype


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


def sentence_only(train: list[tuple[str, str, int]], test: list[tuple[str, str, int]]) -> dict:
    """Accuracy on ``test`` (template, sentence, label) rows of a model that never looks at the
    images: each sentence gets its most common train label (unseen ones the template's)."""
    by_text: dict[str, Counter] = {}
    by_template: dict[str, Counter] = {}
    for t, text, label in train:
        by_text.setdefault(text, Counter())[label] += 1
        by_template.setdefault(t, Counter())[label] += 1
    hits: dict[str, list[bool]] = {}
    for t, text, label in test:
        guess = (by_text.get(text) or by_template.get(t) or Counter({None: 1})).most_common(1)[0][0]
        hits.setdefault(t, []).append(guess == label)
    out = {t: sum(h) / len(h) for t, h in sorted(hits.items())}
    out["overall"] = sum(sum(h) for h in hits.values()) / max(1, len(test))
    return out


def pair_task_chance(rows: dict[str, list[tuple[str, str, int]]], num_labels: int, by_template: bool = True) -> dict:
    """Baselines of a classification task from its (template, sentence, label) rows per split:
    the majority label from train (per template, or overall), the label balance (binary:
    the fraction of 1s per template; else the fraction of each label), and the accuracy of
    a model that reads the sentence only (:func:`sentence_only`)."""

    def keyed(split: str) -> list[tuple[str, int]]:
        return [(t if by_template else "all", y) for t, _, y in rows[split]]

    def balance(split: str) -> dict | list:
        groups: dict[str, list[int]] = {}
        for t, y in sorted(keyed(split)):
            groups.setdefault(t, []).append(y)
        if not by_template:
            return [sum(y == k for y in groups["all"]) / len(groups["all"]) for k in range(num_labels)]
        groups["overall"] = [y for _, _, y in rows[split]]
        return {t: sum(ys) / len(ys) for t, ys in groups.items()}  # binary: the fraction of 1s

    evals = [k for k in ("val", "test") if k in rows]
    majority = {k: vqa_majority(keyed("train"), keyed(k)) for k in evals}
    if not by_template:
        majority = {
            k: {"majority_label": v["majority_answer"]["all"], "accuracy": v["overall"]} for k, v in majority.items()
        }
    return {
        "majority_baseline": majority,
        "label_balance": {k: balance(k) for k in rows},
        "sentence_only": {k: sentence_only(rows["train"], rows[k]) for k in evals},
    }


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
    root, ids, qa, statements, hypotheses = Path(out), itertools.count(), {}, {}, {}
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
