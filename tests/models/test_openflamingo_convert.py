"""``vlp convert openflamingo``: the checkpoint formats OpenFlamingo writes, the key map, the
media rows picked by token (not by id), the report, bad input, the CLI end to end."""

from __future__ import annotations

import pytest
import torch
import yaml

pytest.importorskip("open_clip")
pytest.importorskip("transformers")

from tests.models.test_openflamingo_parity import EOC, LMS, MEDIA, VISION, V, build_pair  # noqa: E402
from tests.reference.openflamingo_reference import openflamingo_checkpoint  # noqa: E402
from vlp.convert.commands import convert_main  # noqa: E402
from vlp.convert.openflamingo import (  # noqa: E402
    openflamingo_to_vlp,
    read_openflamingo_checkpoint,
)
from vlp.errors import CheckpointError  # noqa: E402
from vlp.utils.checkpoint import load_state_dict  # noqa: E402


class ImageFirstTok:
    """vlp's usual order: <image> then <|endofchunk|> (ids 100, 101, the reverse of OpenFlamingo's)."""

    vocab_size = V + 2
    special_tokens = ["<image>", "<|endofchunk|>"]

    def token_id(self, token: str) -> int:
        return {"<image>": V, "<|endofchunk|>": V + 1}[token]


@pytest.fixture(scope="module")
def pair():
    ref, model, _ = build_pair("gpt2", 2, True)
    return ref, model, openflamingo_checkpoint(ref)


def test_checkpoint_holds_openflamingos_keys(pair):
    _, _, state = pair
    assert "perceiver.latents" in state
    assert "lang_encoder.transformer.h.1.gated_cross_attn_layer.attn.to_q.weight" in state
    assert "lang_encoder.transformer.wte.weight" in state  # the input embedding trains
    assert not any(".decoder_layer." in k or "gated_cross_attn_layers" in k or "vision" in k for k in state)


def test_training_checkpoint_with_module_prefix_reads_as_the_flat_state(pair, tmp_path):
    _, _, state = pair
    path = tmp_path / "checkpoint_0.pt"
    torch.save(
        {
            "epoch": 0,
            "model_state_dict": {f"module.{k}": v for k, v in state.items()},
            "optimizer_state_dict": {"state": {}, "param_groups": [{"lr": 1e-4, "params": [0]}]},
            "lr_scheduler_state_dict": {"last_epoch": 3},
        },
        path,
    )
    read = read_openflamingo_checkpoint(path)
    assert sorted(read) == sorted(state)
    assert all(torch.equal(read[k], state[k]) for k in state)


def test_media_rows_are_taken_by_token_not_by_id(pair):
    ref, _, state = pair
    _, model, _ = build_pair("gpt2", 2, True, seed=5)
    model.set_tokenizer(ImageFirstTok())  # <image>=100 in vlp, 101 in the checkpoint
    model._media_rows_set = False
    report = openflamingo_to_vlp(state, model, media_token_id=MEDIA, eoc_token_id=EOC)
    wte = ref.lang_encoder.transformer.wte.weight
    assert model.media_token_ids.tolist() == [V, V + 1]
    torch.testing.assert_close(model.media_embeddings, wte[[MEDIA, EOC]], rtol=0, atol=0)
    torch.testing.assert_close(model.media_head, wte[[MEDIA, EOC]], rtol=0, atol=0)  # GPT-2: tied
    assert "checkpoint <image>=101" in report.summary()


def test_full_state_dict_duplicates_and_frozen_tensors_are_dropped_with_reasons(pair):
    ref, model, _ = pair
    full = {k: v.clone() for k, v in ref.state_dict().items()}
    report = openflamingo_to_vlp(full, model)
    assert not report.unknown and not report.missing and not report.warnings, report.summary()
    reasons = set(report.dropped.values())
    assert any("duplicate" in r for r in reasons) and any("frozen" in r for r in reasons)
    assert report.dropped["lang_encoder.transformer.h.0.decoder_layer.attn.c_attn.weight"].startswith("frozen")


def test_unknown_keys_are_listed_and_a_different_lm_warned(pair):
    _, model, state = pair
    odd = dict(state)
    odd["lang_encoder.transformer.h.0.decoder_layer.attn.c_attn.weight"] = torch.zeros(32, 96)
    odd["perceiver.extra"] = torch.zeros(3)
    report = openflamingo_to_vlp(odd, model)
    assert report.unknown == ["perceiver.extra"]
    assert any("differ from the recipe's" in w for w in report.warnings)
    assert "NOT a complete conversion" in report.summary()


def test_untied_head_keeps_the_recipes_rows_with_a_warning():
    _, _, report = build_pair("llama", 1, True)
    assert report.ok
    assert any("no output embedding (lang_encoder.lm_head.weight" in w for w in report.warnings)


def test_another_layout_is_refused_by_name(pair):
    _, model, _ = pair
    with pytest.raises(CheckpointError, match="not an OpenFlamingo checkpoint.*vlp checkpoint"):
        openflamingo_to_vlp({"lang_model.model.x": torch.zeros(1)}, model)


def test_cross_attention_placement_mismatch_names_the_setting(pair):
    _, _, state = pair  # cross-attention before layers 1 and 3
    _, every_one, _ = build_pair("gpt2", 1, True)
    with pytest.raises(CheckpointError, match=r"layers \[1, 3\].*cross_attn_every_n_layers=1\) before \[0, 1, 2, 3\]"):
        openflamingo_to_vlp(state, every_one)


def test_perceiver_size_mismatch_names_the_key(pair):
    _, model, state = pair
    bad = dict(state, **{"perceiver.latents": torch.zeros(8, 32)})
    with pytest.raises(CheckpointError, match=r"perceiver.latents has shape \(8, 32\).*\(4, 32\)"):
        openflamingo_to_vlp(bad, model)


def test_unreadable_files_get_clear_errors(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        read_openflamingo_checkpoint(tmp_path / "none.pt")
    torch.save({"epoch": 1, "note": "no tensors"}, tmp_path / "bad.pt")
    with pytest.raises(CheckpointError, match="no OpenFlamingo state dict"):
        read_openflamingo_checkpoint(tmp_path / "bad.pt")


def test_cli_converts_a_checkpoint_for_a_recipe(pair, tmp_path):
    ref, _, state = pair
    torch.save(state, tmp_path / "of.pt")
    recipe = {
        "model": {
            "class_path": "vlp.models.Flamingo",
            "init_args": {
                "vision_encoder": {
                    "class_path": "vlp.encoders.OpenCLIPVisionEncoder",
                    "init_args": {"model_name": "ViT-B-32", "model_kwargs": VISION},
                },
                "lang_model": {"class_path": "vlp.encoders.HFCausalLM", "init_args": {"config": LMS["gpt2"][0]}},
                "cross_attn_every_n_layers": 2,
                "perceiver": {"depth": 2, "num_latents": 4, "num_heads": 2, "dim_head": 8},
                "cross_attn": {"num_heads": 2, "dim_head": 8},
            },
        },
        "data": {"init_args": {"tokenizer": {"class_path": "tests.models.test_openflamingo_convert.ImageFirstTok"}}},
    }
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    out = tmp_path / "vlp.safetensors"
    report = convert_main(
        ["openflamingo", str(tmp_path / "of.pt"), "--config", str(tmp_path / "recipe.yaml"), "--out", str(out)]
    )
    assert not report.unknown and not report.missing
    assert any("differ from the recipe's" in w for w in report.warnings)  # the recipe's LM is random here
    written = load_state_dict(out)
    assert "media_embeddings" in written and not any(".decoder_layer." in k for k in written)
    key = "lang_model.model.transformer.h.3.gated_cross_attn_layer.attn_gate"
    torch.testing.assert_close(written[key], state["lang_encoder.transformer.h.3.gated_cross_attn_layer.attn_gate"])
    wte = ref.lang_encoder.transformer.wte.weight
    torch.testing.assert_close(written["media_embeddings"], wte[[MEDIA, EOC]])  # OpenFlamingo's ids by default
