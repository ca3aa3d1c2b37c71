"""Starting from a checkpoint whose recipe lists other objectives, or lists them in another
order: each head's weights follow its objective's name (``init_from`` and ``vlp test --ckpt``
with a new recipe), and heads the new recipe lacks are reported, not silently mis-loaded."""

from __future__ import annotations

import torch
import yaml

from tests.models.test_meter import D, V, tiny_meter
from vlp.objectives import ITM, MLM, Retrieval
from vlp.utils.checkpoint import match_objectives, objective_names_of, split_unused_heads


def pretrained(tmp_path, **extra):
    model = tiny_meter()  # objectives [MLM, ITM]
    torch.nn.init.normal_(model.objectives[1].head.weight)  # make the ITM head recognisable
    path = tmp_path / "pre.ckpt"
    torch.save({"state_dict": model.state_dict(), **extra}, path)
    return model, path


def test_objective_names_from_the_saved_list_or_the_saved_recipe():
    recipe = {
        "model": {
            "class_path": "vlp.models.METER",
            "init_args": {
                "objectives": [
                    {"class_path": "vlp.objectives.MLM", "init_args": {}},
                    {"class_path": "vlp.objectives.GenerativeITM", "init_args": {}},
                ]
            },
        }
    }
    assert objective_names_of({"vlp_objectives": ["itm", "vqa"]}) == ["itm", "vqa"]
    assert objective_names_of({"vlp_config": yaml.safe_dump(recipe)}) == ["mlm", "itm"]
    assert objective_names_of({"vlp_config": "model: {class_path: x}"}) is None  # no objectives key
    assert objective_names_of({"state_dict": {}}) is None


def test_match_objectives_reindexes_by_name_and_names_the_unused():
    state = {"objectives.0.a": 0, "objectives.1.b": 1, "fusion.w": 2, "objectives.2.c": 3}
    out = match_objectives(state, ["mlm", "itm", "itc"], ["itm", "irtr", "itc"])
    assert out == {"objectives[mlm].a": 0, "objectives.0.b": 1, "fusion.w": 2, "objectives.2.c": 3}
    assert split_unused_heads(["objectives[mlm].a", "objectives[mlm].b", "fusion.x"]) == (["mlm"], ["fusion.x"])


def test_init_from_loads_each_head_by_objective_name(tmp_path):
    source, path = pretrained(tmp_path, vlp_objectives=["mlm", "itm"])
    model = tiny_meter(objectives=[ITM(dim=2 * D, hard_negatives=False), Retrieval(negatives=2)])
    model.load_init_from(str(path))
    torch.testing.assert_close(model.objectives[0].head.weight, source.objectives[1].head.weight)
    torch.testing.assert_close(
        model.fusion.text_layers[0].attn.qkv.weight, source.fusion.text_layers[0].attn.qkv.weight
    )
    # the same order as the checkpoint still loads everything
    again = tiny_meter(
        objectives=[MLM(dim=D, vocab_size=V, distill=False, tie_weights=False), ITM(dim=2 * D, hard_negatives=False)]
    )
    again.load_init_from(str(path))
    for (name, got), want in zip(again.state_dict().items(), source.state_dict().values(), strict=True):
        torch.testing.assert_close(got, want, msg=name)


def test_a_plain_state_dict_stays_positional(tmp_path):
    source, path = pretrained(tmp_path)  # no objective names saved: keys are positional
    model = tiny_meter()
    model.load_init_from(str(path))
    torch.testing.assert_close(model.objectives[1].head.weight, source.objectives[1].head.weight)
