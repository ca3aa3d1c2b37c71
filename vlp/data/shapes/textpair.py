"""The ``text_pair`` split of shapes: do two captions describe the same scene?

Sentence a describes a two-shape scene "A rel B" with one template; sentence b describes,
with another template, either the same scene (label 1: "a red circle left of a blue
square" / "a blue square right of a red circle") or one of its three hard negatives
(label 0): the colours exchanged, the positions exchanged, or both (the retrieval groups'
swaps, :func:`~vlp.data.shapes.scenes._group_members`). A template's caption of any of
the four scenes has the same bag of words, and b's template and scene words are drawn
independently of the label, so the bags of words of (a, b) have one distribution for both
labels: a bag-of-words model is at chance (50%), and only word order tells the label.
Labels alternate (balanced); deterministic for a seed.
"""

from __future__ import annotations

import random

from vlp.data.shapes.scenes import (
    _COLOR_NAMES,
    _SIZE_NAMES,
    KINDS,
    TEMPLATES,
    Attrs,
    Scene,
    Shape,
    _group_members,
    caption,
)

#: what sentence b describes: the same scene, or one of its swaps (label 0)
TEXT_PAIR_KINDS = ("same", "colour swap", "position swap", "both swaps")
TEXT_PAIR_LABELS = ("different", "same")


def _describe(scene: tuple[Attrs, str, Attrs], template: int) -> str:
    a, rel, b = scene
    return caption(Scene((Shape(*a), Shape(*b)), ((0, rel, 1),)), template)


def make_text_pair(rng: random.Random, label: int) -> dict:
    """One sample's ``json``: {text, text_b, label, kind, templates, scene}."""
    while True:  # colours differ and (size, kind) differ, so that every swap is another scene
        a = (rng.choice(_SIZE_NAMES), rng.choice(_COLOR_NAMES), rng.choice(KINDS))
        b = (rng.choice(_SIZE_NAMES), rng.choice(_COLOR_NAMES), rng.choice(KINDS))
        if a[1] != b[1] and (a[0], a[2]) != (b[0], b[2]):
            break
    rel = rng.choice(("left of", "above"))
    members = _group_members(a, rel, b)  # base, colour swap, position swap, both
    t1 = rng.randrange(len(TEMPLATES[2]))
    t2 = rng.choice([t for t in range(len(TEMPLATES[2])) if t != t1])
    kind = 0 if label else rng.randrange(1, 4)
    return {
        "text": _describe(members[0], t1),
        "text_b": _describe(members[kind], t2),
        "label": label,
        "kind": TEXT_PAIR_KINDS[kind],
        "templates": [t1, t2],
        "scene": [" ".join(a), rel, " ".join(b)],
    }
