"""Several image views per sample (FLAVA's codebook view next to the model input)."""

from __future__ import annotations

import io

import pytest
import torch
from helpers import write_tar
from PIL import Image

from vlp.data import Manifest, Source, Split, WebDataModule
from vlp.data.transforms import ImageTransform, MultiViewTransform, ViewSpec, parse_views
from vlp.errors import ConfigError

IMG = 32


def _photo(i: int) -> bytes:
    """A 48x40 image with a gradient, so that different crops give different pixels."""
    x = torch.linspace(0, 255, 48)[None, :].expand(40, 48)
    y = torch.linspace(0, 255, 40)[:, None].expand(40, 48)
    rgb = torch.stack([x, y, (x + y + 40 * i) % 256], dim=-1).to(torch.uint8).numpy()
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="PNG")
    return buf.getvalue()


def _manifest(tmp_path, n: int = 8) -> str:
    samples = [{"__key__": f"s{i}", "png": _photo(i), "txt": f"caption {i}"} for i in range(n)]
    url = write_tar(tmp_path / "pairs.tar", samples)
    m = Manifest(name="toy", modality="pair", splits={s: Split(urls=url, num_samples=n) for s in ("train", "test")})
    m.save(tmp_path / "pair.yaml")
    return str(tmp_path / "pair.yaml")


def _dm(tokenizer, **kwargs) -> WebDataModule:
    defaults = dict(tokenizer=tokenizer, image_size=IMG, batch_size=4, num_workers=0, shuffle_buffer=0, seed=0)
    return WebDataModule(**{**defaults, **kwargs})


VIEWS = {
    "codebook": {"size": 16, "norm": "unit"},
    "same": {"size": IMG},
    "own": {"size": IMG, "crop_scale": [0.1, 0.2]},
}


def test_views_have_their_shapes_ranges_and_the_main_crop(tmp_path, tokenizer):
    dm = _dm(tokenizer, train=[Source(_manifest(tmp_path))], views=VIEWS, crop_scale=(0.2, 0.6), epoch_length=8)
    dm.setup("fit")
    batch = dm.finish_batch(next(iter(dm.train_dataloader())))
    assert batch["image"].shape == batch["image_same"].shape == batch["image_own"].shape == (4, 3, IMG, IMG)
    assert batch["image_codebook"].shape == (4, 3, 16, 16)
    code = batch["image_codebook"]
    assert code.dtype == torch.float32 and code.min() >= 0 and code.max() <= 1  # norm: unit
    assert batch["image"].min() < 0  # clip normalisation
    # no crop_scale: the very crop of ``image`` (same size and norm: the same pixels)
    torch.testing.assert_close(batch["image_same"], batch["image"])
    # ...and at 16 px the same crop, downsampled (close to resizing the main view)
    mean = torch.tensor(ImageTransform(IMG)._mean)[:, None, None]
    std = torch.tensor(ImageTransform(IMG)._std)[:, None, None]
    small = torch.nn.functional.interpolate(batch["image"] * std + mean, size=16, mode="area")
    assert (small - code).abs().mean() < 0.03
    assert (batch["image_own"] - batch["image"]).abs().mean() > 0.05  # its own crop


def test_evaluation_views_are_centre_crops_and_main_image_is_unchanged(tmp_path, tokenizer):
    path = _manifest(tmp_path)
    plain = _dm(tokenizer, test=[Source(path, split="test")])
    multi = _dm(tokenizer, test=[Source(path, split="test", views={"codebook": {"size": 16, "norm": "unit"}})])
    got = []
    for dm in (plain, multi):
        dm.setup("test")
        got.append(dm.finish_batch(next(iter(dm.test_dataloader()))))
    torch.testing.assert_close(got[0]["image"], got[1]["image"])
    assert "image_codebook" not in got[0] and got[1]["image_codebook"].shape == (4, 3, 16, 16)
    expected = ImageTransform(16, norm="unit")(Image.open(io.BytesIO(_photo(0))).convert("RGB"))
    torch.testing.assert_close(got[1]["image_codebook"][0], expected)


def test_multi_view_transform_shares_the_flip():
    img = Image.open(io.BytesIO(_photo(1))).convert("RGB")
    main = ImageTransform(IMG, train=True, crop_scale=(0.3, 0.5), hflip=0.5)
    tf = MultiViewTransform(main, {"same": ViewSpec(IMG, "clip")})
    for seed in range(6):
        torch.manual_seed(seed)
        out = tf(img)
        torch.testing.assert_close(out["same"], out[""])


def test_bad_views_are_config_errors_naming_the_view(tmp_path, tokenizer):
    with pytest.raises(ConfigError, match=r"data.init_args.views.codebook.size must be an integer"):
        parse_views({"codebook": {"size": "big"}}, "data.init_args.views")
    with pytest.raises(ConfigError, match=r"views.codebook: unknown key\(s\) \['sise'\]"):
        parse_views({"codebook": {"sise": 3, "size": 3}}, "views")
    with pytest.raises(ConfigError, match=r"views.codebook.norm must be one of"):
        parse_views({"codebook": {"size": 3, "norm": "nope"}}, "views")
    with pytest.raises(ConfigError, match=r"views.id: a view name"):
        parse_views({"id": {"size": 3}}, "views")
    a, b = _manifest(tmp_path / "a"), _manifest(tmp_path / "b")
    dm = _dm(
        tokenizer,
        test=[Source(a, split="test", views={"c": {"size": 8}}), Source(b, split="test", views={"c": {"size": 9}})],
    )
    with pytest.raises(ConfigError, match=r"data.test\[1\].views.c is .* but data.test\[0\].views.c is"):
        dm.setup("test")


def test_module_views_leave_interleaved_documents_alone_and_a_source_cannot_ask(tmp_path, tokenizer):
    from helpers import jpeg_bytes

    doc = {"__key__": "d0", "json": {"text": "<image> a picture"}, "0.jpg": jpeg_bytes()}
    url = write_tar(tmp_path / "docs.tar", [doc])
    Manifest(name="docs", modality="interleaved", splits={"test": Split(urls=url, num_samples=1)}).save(
        tmp_path / "docs.yaml"
    )
    docs = str(tmp_path / "docs.yaml")
    tok = type(tokenizer)(tokenizer.name_or_path, special_tokens=["<image>", "<|endofchunk|>"])
    dm = _dm(tok, test=[Source(docs, split="test")], views={"codebook": {"size": 16}})
    dm.setup("test")
    assert next(iter(dm.test_dataloader()))["images"].shape == (1, 1, 3, IMG, IMG)
    dm = _dm(tok, test=[Source(docs, split="test", views={"codebook": {"size": 16}})])
    with pytest.raises(ConfigError, match=r"data.test\[0\].views: extra image views are not supported"):
        dm.setup("test")
