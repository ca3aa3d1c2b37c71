"""DalleTokenizer: parity with transformers' FlavaImageCodebook on a tiny config, loading by
key from files and prefixed checkpoints, clear errors, frozen inside a parent module."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers import FlavaImageCodebook, FlavaImageCodebookConfig

from vlp.data.transforms import NORMS
from vlp.errors import CheckpointError, ConfigError
from vlp.models.optim import OptimConfig, param_groups
from vlp.tokenizers import DalleTokenizer, to_unit


@pytest.fixture(scope="module")
def reference():
    torch.manual_seed(0)
    config = FlavaImageCodebookConfig(hidden_size=16, num_groups=4, num_blocks_per_group=1, vocab_size=64)
    model = FlavaImageCodebook(config).eval()
    with torch.no_grad():
        for p in model.parameters():  # spread the logits so the argmax is not decided by rounding
            p.normal_(0, 0.3)
    return model


def test_matches_transformers(reference):
    tok = DalleTokenizer.from_state_dict(reference.state_dict())
    assert (tok.num_codes, tok.patch_size) == (64, 8)
    pixels = torch.rand(2, 3, 32, 48)
    mapped = 0.8 * pixels + 0.1  # the image processor's logit-Laplace map
    ids = tok(pixels)
    assert ids.shape == (2, 4, 6) and ids.dtype == torch.long
    assert ids.unique().numel() > 1
    torch.testing.assert_close(tok.logits(pixels), reference(mapped))
    torch.testing.assert_close(tok.probs(pixels), reference.get_codebook_probs(mapped))
    assert torch.equal(ids, reference.get_codebook_indices(mapped))
    assert torch.equal(tok.get_codebook_indices(pixels), ids)
    assert torch.equal(tok((pixels * 255).round().to(torch.uint8)), tok((pixels * 255).round() / 255))


def test_two_blocks_per_group(tmp_path):
    torch.manual_seed(1)
    config = FlavaImageCodebookConfig(hidden_size=8, num_groups=4, num_blocks_per_group=2, vocab_size=32)
    model = FlavaImageCodebook(config).eval()
    torch.save(model.state_dict(), tmp_path / "codebook.bin")
    tok = DalleTokenizer(str(tmp_path / "codebook.bin"))
    pixels = torch.rand(1, 3, 16, 16)
    torch.testing.assert_close(tok.logits(pixels), model(0.8 * pixels + 0.1))


def test_loads_files_folders_and_flava_full_prefix(reference, tmp_path):
    from safetensors.torch import save_file

    state = {k: v.contiguous() for k, v in reference.state_dict().items()}
    pixels = torch.rand(1, 3, 16, 16)
    expected = reference.get_codebook_indices(0.8 * pixels + 0.1)
    save_file(state, str(tmp_path / "codebook.safetensors"))
    (tmp_path / "repo").mkdir()
    save_file(state, str(tmp_path / "repo" / "model.safetensors"))
    full = {f"image_codebook.{k}": v for k, v in state.items()}
    full["flava.image_model.embeddings.cls_token"] = torch.zeros(1, 1, 4)  # the rest of flava-full
    torch.save(full, tmp_path / "flava_full.bin")
    for path in ("codebook.safetensors", "repo", "flava_full.bin"):
        assert torch.equal(DalleTokenizer(str(tmp_path / path))(pixels), expected), path
    explicit = DalleTokenizer(str(tmp_path / "flava_full.bin"), prefix="image_codebook.")
    assert torch.equal(explicit(pixels), expected)


def test_bad_checkpoints_name_their_keys(reference, tmp_path):
    state = dict(reference.state_dict())
    extra = {**state, "blocks.output.conv.extra": torch.zeros(1)}
    with pytest.raises(CheckpointError, match=r"1 unknown keys \['blocks.output.conv.extra'\]"):
        DalleTokenizer.from_state_dict(extra)
    short = {k: v for k, v in state.items() if k != "blocks.group_2.group.block_1.id_path.weight"}
    with pytest.raises(CheckpointError, match=r"1 missing keys \['blocks.group_2.group.block_1.id_path.weight'\]"):
        DalleTokenizer.from_state_dict(short)
    with pytest.raises(CheckpointError, match="no codebook keys"):
        DalleTokenizer.from_state_dict({"encoder.weight": torch.zeros(1)})
    with pytest.raises(CheckpointError, match="expected blocks.input.weight"):
        DalleTokenizer.from_state_dict({"blocks.input.weight": torch.zeros(4, 3, 7, 7)})
    wide = {**state, "blocks.output.conv.bias": torch.zeros(65)}
    with pytest.raises(CheckpointError, match=r"1 wrong shapes \['blocks.output.conv.bias \(65,\) != \(64,\)'\]"):
        DalleTokenizer.from_state_dict(wide)
    torch.save([1, 2], tmp_path / "list.pt")
    with pytest.raises(CheckpointError, match="list.pt does not hold a state dict of tensors"):
        DalleTokenizer(str(tmp_path / "list.pt"))
    with pytest.raises(ConfigError, match="does not exist"):
        DalleTokenizer(str(tmp_path / "nope.safetensors"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="holds none of model.safetensors, pytorch_model.bin"):
        DalleTokenizer(str(tmp_path / "empty"))


def test_hub_name_offline_not_cached(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "cache"))
    with pytest.raises(ConfigError, match="HF_HUB_OFFLINE=1 and it is not in the local cache"):
        DalleTokenizer("someone/no-such-codebook")


def test_frozen_inside_a_parent(reference):
    class Parent(nn.Module):
        def __init__(self):
            super().__init__()
            self.head = nn.Linear(4, 4)
            self.image_tokenizer = DalleTokenizer.from_state_dict(reference.state_dict())

    parent = Parent().train()
    tok = parent.image_tokenizer
    assert parent.training and parent.head.training and not tok.training
    assert not any(m.training for m in tok.modules())
    assert not any(p.requires_grad for p in tok.parameters())
    trainable = [p for p in parent.parameters() if p.requires_grad]
    assert len(trainable) == 2  # the head's weight and bias only
    names = [n for g in param_groups(parent, OptimConfig()) for n in g["names"]]
    assert sorted(names) == ["head.bias", "head.weight"]  # the optimiser never sees the tokenizer
    pixels = torch.rand(1, 3, 16, 16, requires_grad=True)
    ids = tok(pixels)
    assert not ids.requires_grad
    with torch.autocast("cpu", dtype=torch.bfloat16):  # targets are computed in fp32 whatever the run's precision
        assert torch.equal(tok(pixels), ids)
        assert tok.probs(pixels).dtype == torch.float32
    assert "DalleTokenizer(\n  num_codes=64, patch_size=8" in repr(tok)
    # its weights travel in the parent's state dict under the parent's attribute name
    assert "image_tokenizer.blocks.input.weight" in parent.state_dict()


def test_encode_from_the_model_batch(reference):
    tok = DalleTokenizer.from_state_dict(reference.state_dict())
    pixels = torch.rand(2, 3, 32, 32)
    mean, std = (torch.tensor(v)[:, None, None] for v in NORMS["clip"])
    batch = (pixels - mean) / std
    torch.testing.assert_close(to_unit(batch, "clip"), pixels)
    # a 32 px batch with 16 px patches (a 2 x 2 grid) → a 16 px dVAE input, 2 x 2 tokens
    ids = tok.encode(batch, norm="clip", grid=2)
    assert ids.shape == (2, 2, 2)
    assert torch.equal(ids, tok(tok.prepare(batch, norm="clip", grid=(2, 2))))
    assert tok.prepare(batch, norm="clip", grid=2).shape == (2, 3, 16, 16)
    assert torch.equal(tok.encode(batch, norm="clip"), tok(pixels.clamp(0, 1)))  # no grid: the batch's size


def test_bad_input_shapes(reference):
    tok = DalleTokenizer.from_state_dict(reference.state_dict())
    with pytest.raises(ConfigError, match="not a multiple of its patch size 8"):
        tok(torch.rand(1, 3, 20, 16))
    with pytest.raises(ConfigError, match=r"RGB images \(B, 3, H, W\)"):
        tok(torch.rand(3, 16, 16))
    with pytest.raises(ConfigError, match="norm must be one of"):
        tok.encode(torch.rand(1, 3, 16, 16), norm="bogus")
