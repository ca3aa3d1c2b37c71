"""The contract every family shares: objectives keyed by name with their own name, weight
and modalities; heads sized from the model; declared hooks dispatched for every family
(after each optimiser step, after init_from); capabilities checked when the model is built;
image-only and text-only batches. The objective below is written here alone, touching no
model file, and runs on CLIP, ALBEF and METER."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import quiet_trainer
from torch import nn

from tests.models.test_albef import batch as albef_batch
from tests.models.test_albef import tiny_albef
from tests.models.test_clip import tiny_clip
from tests.models.test_meter import tiny_meter
from vlp.errors import ConfigError
from vlp.objectives import ITC, ITM, MLM, MomentumITC, Objective


class CaptionLength(Objective):
    """Predict each caption's length (number of real tokens) from its ITC feature: a new
    objective with its own head, sized from the model's "itc" width in ``setup``, and an
    ``after_optimizer_step`` hook that counts steps."""

    default_name = "length"
    requires = ("text_embeds",)

    def __init__(self, weight: float = 1.0, **kwargs) -> None:
        super().__init__(weight, **kwargs)
        self.head: nn.Module | None = None
        self.steps = 0

    def needs(self) -> dict[str, str]:
        return {"contrastive": "to read the caption features"}

    def setup(self, model: nn.Module) -> None:
        self.head = nn.Linear(self.width_of("dim", None, model, "itc"), 1)

    def after_optimizer_step(self, model: nn.Module, *, skipped: bool = False) -> None:
        self.steps += 1

    def forward(self, output, batch: dict, model: nn.Module) -> dict[str, torch.Tensor]:
        target = batch["text_mask"].float().sum(1)  # (B,)
        pred = self.head(output.text_embeds).squeeze(-1)  # (B,)
        return self.named(loss=F.mse_loss(pred, target), mae=(pred - target).abs().mean().detach())


def families(objective: Objective) -> dict[str, nn.Module]:
    return {
        "clip": tiny_clip(objectives=[ITC(), objective]),
        "albef": tiny_albef(objectives=[MomentumITC(queue_size=8), objective]),
        "meter": tiny_meter(objectives=[ITC(), objective]),  # METER builds ITC features for its ITC
    }


@pytest.mark.parametrize("family", ["clip", "albef", "meter"])
def test_an_objective_written_outside_vlp_runs_on_every_family(family):
    model = families(CaptionLength(weight=0.5))[family]
    head = model.objectives["length"].head
    assert head.in_features == model.feature_dims()["itc"]  # sized from the model, no dim in the recipe
    b = albef_batch(0)
    model.train()
    loss = model.training_step(b, 0)
    loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in head.parameters())
    assert any(k.startswith("objectives.length.head.") for k in model.state_dict())  # keyed by name
    # its hook after every optimiser step, once per step under accumulation, in every family
    trainer = quiet_trainer(max_epochs=1, accumulate_grad_batches=2)
    trainer.fit(
        model, train_dataloaders=torch.utils.data.DataLoader([albef_batch(s) for s in range(4)], batch_size=None)
    )
    assert trainer.global_step == 2 and model.objectives["length"].steps == 2


def test_the_weighted_total_and_named_values():
    model = tiny_clip(objectives=[ITC(weight=2.0), CaptionLength(weight=0.5, name="len")])
    b = albef_batch(1)
    out = model(b)
    total, values = model.compute_objectives(out, b, model.objectives_for(b))
    assert set(values) == {"itc_loss", "itc_acc", "itc_temperature", "len_loss", "len_mae"}
    torch.testing.assert_close(total, 2.0 * values["itc_loss"] + 0.5 * values["len_loss"])


def test_one_class_twice_under_two_names_and_duplicate_names_refused():
    model = tiny_albef(
        objectives=[MLM(name="mlm_pair", distill=False), MLM(name="mlm_text", weight=0.3, distill=False)],
        use_momentum=False,
    )
    assert list(model.objectives) == ["mlm_pair", "mlm_text"]
    b = albef_batch(0)
    out = model(b)
    _, values = model.compute_objectives(out, b, model.objectives_for(b))
    assert {"mlm_pair_loss", "mlm_text_loss"} <= set(values)
    assert model.objectives["mlm_text"].head.bias.numel() == 50  # vocab read from the word embeddings
    with pytest.raises(ConfigError, match=r"two objectives are named \['itm'\].*MLM\(name: mlm_text\)"):
        tiny_albef(objectives=[ITM(), ITM()])
    with pytest.raises(ConfigError, match="objective name 'Bad.Name'"):
        ITM(name="Bad.Name")


def test_modalities_are_a_constructor_argument():
    model = tiny_clip(objectives=[ITC(), CaptionLength(modalities=["text"])])
    assert [o.name for o in model.objectives_for({"modality": "pair"})] == ["itc"]
    assert [o.name for o in model.objectives_for({"modality": "text"})] == ["length"]


def test_missing_capabilities_fail_at_construction_with_a_sentence():
    # METER + hard-negative ITM without ITC: no ITC features to sample negatives from
    with pytest.raises(ConfigError, match=r"itm \(ITM\) needs a model with 'contrastive'.*add vlp.objectives.ITC"):
        tiny_meter(objectives=[ITM()])
    tiny_meter(objectives=[ITM(hard_negatives=False)])  # uniform negatives need no ITC
    with pytest.raises(ConfigError, match=r"needs a model with 'fusion'.*dual encoder has no fusion"):
        tiny_clip(objectives=[ITM(hard_negatives=False)])
    with pytest.raises(ConfigError, match=r"needs a model with 'momentum'.*use_momentum: true"):
        tiny_albef(objectives=[MLM()], use_momentum=False)
    with pytest.raises(ConfigError, match=r"momentum.*METER has no momentum model"):
        tiny_meter(objectives=[MLM(distill=True)])


def test_given_head_widths_are_checked_against_the_model():
    with pytest.raises(ConfigError, match=r"has dim 48, but ALBEF's match features are 32 wide.*leave dim out"):
        tiny_albef(objectives=[ITM(dim=48)], use_momentum=False)


@pytest.mark.parametrize("family", ["clip", "albef", "meter"])
def test_image_only_and_text_only_batches(family):
    model = {"clip": tiny_clip(), "albef": tiny_albef(), "meter": tiny_meter(objectives=[ITC()])}[family].eval()
    b = albef_batch(0)
    images = model({"modality": "image", "image": b["image"]})
    texts = model({"modality": "text", "text_ids": b["text_ids"], "text_mask": b["text_mask"]})
    assert images.image_embeds.shape[0] == 4 and images.text_embeds is None
    assert texts.text_embeds.shape[0] == 4 and texts.image_embeds is None
    with torch.no_grad():
        both = model(b)
    torch.testing.assert_close(images.image_embeds, both.image_embeds)  # each view is computed alone
    torch.testing.assert_close(texts.text_embeds, both.text_embeds)


def test_init_from_without_momentum_keys_syncs_the_momentum_copies(tmp_path):
    source = tiny_albef(use_momentum=False, objectives=[ITC(), MLM(distill=False)])
    with torch.no_grad():
        for p in source.parameters():
            p.add_(torch.randn_like(p) * 0.1)  # weights unlike any fresh model's
    path = tmp_path / "finetuned.ckpt"
    torch.save({"state_dict": source.state_dict()}, path)  # no *_m keys
    model = tiny_albef(objectives=[MomentumITC(queue_size=8), MLM()])
    model.load_init_from(str(path))
    pairs = model.momentum_pairs()
    assert len(pairs) == 6  # 5 towers/projections + the MLM head
    for online, twin in pairs:
        for (name, a), b in zip(online.named_parameters(), twin.parameters(), strict=True):
            torch.testing.assert_close(b, a, msg=name)
    torch.testing.assert_close(model.fusion.blocks[0].attn.qkv.weight, source.fusion.blocks[0].attn.qkv.weight)


def test_special_tokens_grow_the_text_towers_embedding_when_the_model_meets_the_data():
    """The tokenizer's size is the one value data and model share: <image> and <|endofchunk|>
    added to the MiniLM tokenizer give a text tower of MiniLM's vocabulary two rows (old rows
    kept, new ones at their mean) and the new ids embed; a tokenizer larger than the tower by
    more than its added tokens is still refused."""
    from types import SimpleNamespace

    from helpers import MINILM, tiny_bert

    from vlp.data import HFTokenizer
    from vlp.models import CLIP

    tok = HFTokenizer(MINILM, max_length=16, special_tokens=["<image>", "<|endofchunk|>"])
    rows = tok.vocab_size - 2  # the tokenizer's own vocabulary
    model = CLIP(tiny_clip().image_encoder, tiny_bert(rows, 32), [ITC()], embed_dim=16)
    before = model.text_encoder.model.get_input_embeddings().weight.detach().clone()
    model.check_data(SimpleNamespace(tokenizer=tok, image_size=None))
    weight = model.text_encoder.model.get_input_embeddings().weight
    assert weight.shape[0] == tok.vocab_size == rows + 2
    torch.testing.assert_close(weight[:rows], before)
    torch.testing.assert_close(weight[rows:], before.mean(0).expand(2, -1))
    ids = tok(["a photo <image> of <|endofchunk|>"])["input_ids"]
    assert ids.max() >= rows
    model.text_encoder(ids, torch.ones_like(ids))
    small = CLIP(tiny_clip().image_encoder, tiny_bert(rows - 10, 32), [ITC()], embed_dim=16)
    with pytest.raises(ConfigError, match=f"data.tokenizer has {rows + 2} tokens"):
        small.check_data(SimpleNamespace(tokenizer=tok, image_size=None))
