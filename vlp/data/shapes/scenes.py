"""Scenes and their captions and questions: the vocabulary of the benchmark, sampling of
scenes with unambiguous relations, the hard-negative retrieval groups and VQA questions."""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass

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
