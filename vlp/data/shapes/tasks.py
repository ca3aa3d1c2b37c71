"""NLVR2-style statements about two scenes and SNLI-VE-style hypotheses about one."""

from __future__ import annotations

import random

from vlp.data.shapes.scenes import COLORS, INVERSE, KINDS, RELATIONS, SIZES, Scene, Shape, random_scene, relation_holds

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
