"""Starting from a checkpoint whose recipe lists other objectives, or lists them in another
order: each head's weights follow its objective's name (``init_from`` and ``vlp test --ckpt``
with a new recipe), and heads the new recipe lacks are reported, not silently mis-loaded."""

from __future__ import annotations

import torch

from tests.models.test_meter import D, V, tiny_meter
from vlp.objectives import ITM, MLM, Retrieval
from vlp.utils.checkpoint import split_unused_heads


def pretrained(tmp_path, **extra):
    model = tiny_meter()  # objectives [MLM, ITM]
    torch.nn.init.normal_(model.objectives["itm"].head.weight)  # make the ITM head recognisable
    path = tmp_path / "pre.ckpt"
    torch.save({"state_dict": model.state_dict(), **extra}, path)
    return model, path


def test_unused_heads_are_the_objectives_the_model_lacks():
    keys = ["objectives.mlm.head.a", "objectives.mlm.head.b", "objectives.itm.head.w", "fusion.x"]
    assert split_unused_heads(keys, ["itm", "irtr"]) == (["mlm"], ["objectives.itm.head.w", "fusion.x"])


def test_init_from_loads_each_head_by_objective_name(tmp_path):
    source, path = pretrained(tmp_path)
    model = tiny_meter(objectives=[ITM(dim=2 * D, hard_negatives=False), Retrieval(negatives=2)])
    model.load_init_from(str(path))
    torch.testing.assert_close(model.objectives["itm"].head.weight, source.objectives["itm"].head.weight)
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
