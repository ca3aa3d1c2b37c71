"""Model, objective and data disagreements are ConfigErrors before step 1: heads sized for
another width, ITM hard negatives without ITC features, a tokenizer or image size the towers
cannot take, typos inside free-form tower configs."""

from __future__ import annotations

import logging

import lightning.pytorch as pl
import pytest
import torch
from helpers import MINILM, quiet_trainer, tiny_bert

from vlp.blocks import CoAttentionFusion, TextDecoder
from vlp.data import HFTokenizer, WebDataModule
from vlp.encoders import BertFusion, HFTextEncoder, OpenCLIPVisionEncoder, TimmVisionEncoder
from vlp.errors import ConfigError
from vlp.models import ALBEF, CLIP, METER
from vlp.objectives import ITC, ITM, MIM, MLM, NLVR2, VQA, DenoisingLM, MomentumITC

D, W, VOCAB = 32, 24, 30522  # fusion width, tower width, the MiniLM tokenizer's vocabulary


def vit(img_size: int = 32, **kwargs) -> TimmVisionEncoder:
    return TimmVisionEncoder(
        "vit_tiny_patch16_224",
        img_size=img_size,
        pool="cls",
        model_kwargs=dict(patch_size=16, embed_dim=W, depth=1, num_heads=2, **kwargs),
    )


def bert(model_type: str = "bert", **overrides) -> HFTextEncoder:
    settings = {"intermediate_size": 48, "max_position_embeddings": 40, "model_type": model_type, **overrides}
    return tiny_bert(settings.pop("vocab_size", VOCAB), settings.pop("hidden_size", W), **settings)


def meter(objectives, *, image=None, text=None, fusion_dim: int = D, **kwargs) -> METER:
    torch.manual_seed(0)
    fusion = CoAttentionFusion(fusion_dim, 1, 2, mlp_ratio=2.0)
    return METER(image or vit(), text or bert(), fusion, objectives, hidden_size=D, embed_dim=16, **kwargs)


def albef(objectives, *, context_dim: int = W, **kwargs) -> ALBEF:
    torch.manual_seed(0)
    fusion = BertFusion(W, 1, 2, context_dim=context_dim, mlp_ratio=2.0)
    return ALBEF(vit(), bert(), fusion, objectives, embed_dim=16, **kwargs)


def data(max_length: int = 16, image_size: int = 32) -> WebDataModule:
    return WebDataModule(tokenizer=HFTokenizer(MINILM, max_length=max_length), image_size=image_size)


def meter_objectives(mlm_vocab: int = VOCAB) -> list:
    return [MLM(dim=D, vocab_size=mlm_vocab, distill=False, tie_weights=False), ITM(dim=2 * D), ITC()]


# -- what a good recipe looks like ------------------------------------------------------------
def test_matching_parts_and_data_pass_every_check():
    """Heads of the model's widths, MiniLM's tokenizer and a 32 px ViT: every check passes."""
    meter(meter_objectives()).check_data(data())
    albef([MomentumITC(queue_size=8, embed_dim=16), ITM(dim=W), MLM(dim=W, vocab_size=VOCAB)]).check_data(data())
    CLIP(vit(), bert(), [ITC()], embed_dim=16).check_data(data(max_length=40))


# -- 1. hard-negative ITM without ITC ---------------------------------------------------------
def test_meter_hard_negative_itm_without_itc_is_refused():
    """METER with ITM(hard_negatives=True) and no ITC objective: ConfigError naming ITC and hard_negatives."""
    with pytest.raises(ConfigError, match=r"to sample hard negatives.*hard_negatives: false.*add vlp.objectives.ITC"):
        meter([ITM(dim=2 * D, hard_negatives=True)])
    meter([ITM(dim=2 * D, hard_negatives=False)])  # uniform negatives need no ITC


def test_albef_hard_negative_itm_without_itc_is_logged(caplog):
    """ALBEF with hard-negative ITM and no ITC: builds (its projections exist) and warns that nothing trains them."""
    with caplog.at_level(logging.WARNING, logger="vlp"):
        albef([ITM(dim=W)], use_momentum=False)
    assert "no ITC objective trains" in caplog.text


# -- 2. head and fusion widths ------------------------------------------------------------------
@pytest.mark.parametrize(
    "build, message",
    [
        (lambda: meter([ITM(dim=D, hard_negatives=False)]), r"itm \(ITM\) has dim 32.*64 wide: set ITM\(dim: 64\)"),
        (
            lambda: meter([MLM(dim=2 * D, vocab_size=VOCAB, distill=False, tie_weights=False)]),
            r"mlm \(MLM\) has dim 64.*mlm features are 32 wide: set MLM\(dim: 32\)",
        ),
        (lambda: meter([VQA(dim=D, answers=["yes", "no"])]), r"vqa \(VQA\) has dim 32.*set VQA\(dim: 64\)"),
        (lambda: meter([MIM(dim=D, encoder_dim=D, patch_size=16)]), r"mim \(MIM\) has encoder_dim 32.*24 wide"),
        (lambda: meter(meter_objectives(), fusion_dim=2 * D), r"model.fusion is 64 wide but METER's hidden_size is 32"),
        (lambda: albef([ITM(dim=2 * W)], use_momentum=False), r"itm \(ITM\) has dim 48.*set ITM\(dim: 24\)"),
        (
            lambda: albef([MomentumITC(queue_size=8, embed_dim=32), ITM(dim=W)]),
            r"itc \(MomentumITC\) has embed_dim 32.*itc features are 16 wide",
        ),
        (
            lambda: albef([ITM(dim=W, hard_negatives=False), MLM(dim=W, vocab_size=1000, distill=False)]),
            r"mlm \(MLM\) has vocab_size 1000.*word embeddings.*30522 rows",
        ),
        (lambda: albef([ITM(dim=W, hard_negatives=False)], context_dim=2 * W), r"fusion cross-attends to width 48"),
    ],
    ids=[
        "meter-itm",
        "meter-mlm",
        "meter-vqa",
        "meter-mim",
        "meter-fusion",
        "albef-itm",
        "albef-itc",
        "albef-mlm-tied",
        "albef-fusion",
    ],
)
def test_head_or_fusion_of_another_width_is_refused_at_construction(build, message):
    """A head or fusion whose input width differs from the model view it reads: ConfigError naming the key and the width."""
    with pytest.raises(ConfigError, match=message):
        build()


def test_nlvr2_token_type_outside_the_model_is_refused():
    """NLVR2's right image as token type 2 in a METER with num_token_types 2: ConfigError naming num_token_types."""
    with pytest.raises(ConfigError, match=r"token type 2, but METER has num_token_types 2: set num_token_types: 3"):
        meter([NLVR2(dim=2 * D)])


# -- 3. a vocabulary smaller than the tokenizer's --------------------------------------------------
def test_text_embedding_smaller_than_the_tokenizer_is_refused():
    """A 2,000-row text embedding fed by the 30,522-token MiniLM tokenizer: ConfigError naming both sizes."""
    model = meter(meter_objectives(mlm_vocab=2000), text=bert(vocab_size=2000))
    with pytest.raises(
        ConfigError, match=r"data.tokenizer has 30522 tokens but model.text_encoder's embedding has 2000"
    ):
        model.check_data(data())


def test_mlm_head_smaller_than_the_tokenizer_is_refused():
    """An untied MLM head over 2,000 tokens with the 30,522-token tokenizer: ConfigError naming MLM's
    vocab_size, when the model is built (the head must cover the text tower's vocabulary) or, for a
    tower smaller than the tokenizer, when the data is met."""
    with pytest.raises(ConfigError, match=r"mlm \(MLM\) has vocab_size 2000.*word embeddings have 30522 rows"):
        meter(meter_objectives(mlm_vocab=2000))


# -- 4. an image size the vision tower does not take --------------------------------------------------
def test_image_size_of_a_fixed_size_vit_is_refused():
    """48 px data for a timm ViT built for 32 px: ConfigError naming data.image_size, the tower's size and img_size."""
    with pytest.raises(
        ConfigError, match=r"data.image_size is 48 but .*vit_tiny_patch16_224\) takes 32x32 images only"
    ):
        meter(meter_objectives()).check_data(data(image_size=48))


def test_image_size_off_the_patch_grid_is_refused():
    """40 px data for a dynamic-size ViT with 16 px patches: ConfigError naming the patch size; 48 px passes."""
    model = meter(meter_objectives(), image=vit(dynamic_img_size=True))
    with pytest.raises(ConfigError, match=r"data.image_size is 40 but .*multiples of its 16x16 patches"):
        model.check_data(data(image_size=40))
    model.check_data(data(image_size=48))


def test_image_size_of_an_open_clip_tower_is_refused():
    """48 px data for an open_clip ViT of 32 px: ConfigError pointing at force_image_size."""
    tower = OpenCLIPVisionEncoder(
        "ViT-B-32",
        model_kwargs={
            "embed_dim": 16,
            "vision_cfg": {"image_size": 32, "patch_size": 16, "width": W, "layers": 1, "head_width": 12},
        },
    )
    with pytest.raises(ConfigError, match=r"data.image_size is 48 .*takes 32x32 images only.*force_image_size: 48"):
        meter(meter_objectives(), image=tower).check_data(data(image_size=48))


# -- 5. captions longer than the text tower's positions ------------------------------------------------
def test_max_length_above_the_position_embeddings_is_refused():
    """tokenizer max_length 64 for a BERT with 40 positions: ConfigError naming both numbers."""
    with pytest.raises(ConfigError, match=r"data.tokenizer.max_length is 64 but model.text_encoder takes at most 40"):
        meter(meter_objectives()).check_data(data(max_length=64))


def test_roberta_position_offset_counts():
    """RoBERTa with 40 position rows takes 38 tokens (positions start after padding_idx 1): max_length 39 is refused."""
    model = meter(meter_objectives(), text=bert("roberta"))
    model.check_data(data(max_length=38))
    with pytest.raises(ConfigError, match=r"max_length is 39 but model.text_encoder takes at most 38"):
        model.check_data(data(max_length=39))


def test_max_length_above_the_decoder_positions_is_refused():
    """DenoisingLM rewriting 16-token captions with a decoder of 8 positions: ConfigError naming the decoder's max_length."""
    decoder = TextDecoder(VOCAB, D, 1, 2, mlp_ratio=2.0, max_length=8)
    model = meter([DenoisingLM(tokenizer=HFTokenizer(MINILM, max_length=16))], decoder=decoder)
    with pytest.raises(ConfigError, match=r"max_length is 16 but model.decoder.*max_length 8: set .* >= 15"):
        model.check_data(data(max_length=16))
    model.check_data(data(max_length=9))


class _Data(pl.LightningDataModule):
    def __init__(self, max_length: int) -> None:
        super().__init__()
        self.tokenizer, self.image_size = HFTokenizer(MINILM, max_length=max_length), 32

    def train_dataloader(self):
        raise AssertionError("the data check runs before any batch is read")


def test_fit_checks_the_datamodule_before_step_one(tmp_path):
    """Trainer.fit with a tokenizer longer than the text positions: ConfigError from setup, before any batch."""
    trainer = quiet_trainer(max_steps=1, default_root_dir=tmp_path)
    with pytest.raises(ConfigError, match="data.tokenizer.max_length is 64"):
        trainer.fit(meter(meter_objectives()), datamodule=_Data(max_length=64))


# -- 6. typos inside free-form tower configs ------------------------------------------------------------
def test_timm_model_kwargs_typo_names_the_key():
    """timm model_kwargs {drop_path_rat: 0.1}: ConfigError naming the key and drop_path_rate."""
    with pytest.raises(ConfigError, match=r"no argument 'drop_path_rat' \(model_kwargs\): did you mean drop_path_rate"):
        vit(drop_path_rat=0.1)


def test_hf_config_typo_names_the_key():
    """HF config {num_hiden_layers: 2}, random init or over a pretrained model: ConfigError naming num_hidden_layers."""
    with pytest.raises(ConfigError, match=r"'num_hiden_layers' \(did you mean num_hidden_layers\?\)"):
        bert(num_hiden_layers=2)
    with pytest.raises(ConfigError, match=r"not fields of BertConfig: 'num_hiden_layers'"):
        HFTextEncoder(MINILM, config={"num_hiden_layers": 2})
