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
exactly balanced; pair_cls (a binary image-sentence task, Hateful Memes-style: 1 when the
sentence is false of the image, VE's contradictions, 0 for its entailments) /train N//2,
/val max(200, N//40), /test max(500, N//20), even; few-shot support sets (demonstrations
drawn like training samples, written last so that they change no other split):
pair/support and vqa/support max(256, N//40), image/support 24*max(8, N//1000) (balanced);
plus
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

Modules: :mod:`~vlp.data.shapes.scenes` (vocabulary, scenes, captions, questions, the
held-out retrieval groups), :mod:`~vlp.data.shapes.render` (drawing),
:mod:`~vlp.data.shapes.tasks` (NLVR2 statements, SNLI-VE hypotheses),
:mod:`~vlp.data.shapes.chance` (chance levels and text-only baselines) and
:mod:`~vlp.data.shapes.writer` (shards, ``info.json``, manifests). ``vlp.data.synth``
re-exports this package for older imports.
"""

from __future__ import annotations

from vlp.data.shapes.chance import pair_task_chance, retrieval_chance, sentence_only, vqa_majority
from vlp.data.shapes.render import render_scene
from vlp.data.shapes.scenes import (
    ALIGN,
    CLASS_TEMPLATES,
    CLASSES,
    COLORS,
    GAP,
    GROUP_SIZE,
    INVERSE,
    JPEG_QUALITY,
    KINDS,
    NOISE_TILES,
    PAD,
    QUESTION_TYPES,
    RELATIONS,
    SIZES,
    TEMPLATES,
    Attrs,
    Scene,
    Shape,
    caption,
    hard_negative_bases,
    make_question,
    random_scene,
    relation_holds,
    vocabulary,
    vqa_answers,
)
from vlp.data.shapes.tasks import (
    AUTHORS,
    MATERIALS,
    NLVR2_TEMPLATES,
    NUMBERS,
    SIDES,
    VE_LABELS,
    VE_TYPES,
    colour_relation,
    make_nlvr2,
    make_ve,
    nlvr2_statements,
)
from vlp.data.shapes.writer import shapes_manifests, write_shapes

__all__ = [
    "ALIGN",
    "AUTHORS",
    "Attrs",
    "CLASSES",
    "CLASS_TEMPLATES",
    "COLORS",
    "GAP",
    "GROUP_SIZE",
    "INVERSE",
    "JPEG_QUALITY",
    "KINDS",
    "MATERIALS",
    "NLVR2_TEMPLATES",
    "NOISE_TILES",
    "NUMBERS",
    "PAD",
    "QUESTION_TYPES",
    "RELATIONS",
    "SIDES",
    "SIZES",
    "Scene",
    "Shape",
    "TEMPLATES",
    "VE_LABELS",
    "VE_TYPES",
    "caption",
    "colour_relation",
    "hard_negative_bases",
    "make_nlvr2",
    "make_question",
    "make_ve",
    "nlvr2_statements",
    "pair_task_chance",
    "random_scene",
    "relation_holds",
    "render_scene",
    "retrieval_chance",
    "sentence_only",
    "shapes_manifests",
    "vocabulary",
    "vqa_answers",
    "vqa_majority",
    "write_shapes",
]
