"""Bad input in the sample stream: lost and truncated shards, skips during evaluation,
16-bit images, non-UTF-8 text, and DataModule settings out of range."""

from __future__ import annotations

import io
import itertools
import json

import numpy as np
import pytest
import torch
from helpers import jpeg_bytes, quiet_trainer, write_tar
from PIL import Image

from vlp.data import Manifest, Source, Split, WebDataModule
from vlp.data.collate import Collator, batches
from vlp.data.manifest import DEFAULT_FIELDS
from vlp.data.pipeline import SampleDecoder, Skipped, read_shards
from vlp.data.transforms import decode_image
from vlp.errors import ConfigError, DataError
from vlp.models.base import VLPModule

IMG = 32


def _pairs(n: int, start: int = 0) -> list[dict]:
    return [
        {"__key__": f"s{i:04d}", "jpg": jpeg_bytes((i * 30 % 256, 90, 160)), "txt": f"caption {i}"}
        for i in range(start, start + n)
    ]


def _manifest(tmp_path, sizes: list[int], *, garbage: tuple[int, ...] = (), shard_sizes: bool = True, extra=()) -> str:
    """A pair manifest with one shard per entry of ``sizes``; shards in ``garbage`` hold junk
    bytes; ``extra`` samples go first into shard 0."""
    urls, start = [], 0
    for s, n in enumerate(sizes):
        path = tmp_path / "shards" / f"part-{s:03d}.tar"
        samples = (list(extra) if s == 0 else []) + _pairs(n, start)
        write_tar(path, samples)
        if s in garbage:
            path.write_bytes(b"this is not a tar file " * 40)
        urls.append(str(path))
        start += n
    total = sum(sizes) + len(extra)
    split = Split(
        urls=urls, num_samples=total, shard_sizes=[sizes[0] + len(extra), *sizes[1:]] if shard_sizes else None
    )
    path = tmp_path / "toy.yaml"
    Manifest(name="toy", modality="pair", splits={"test": split, "train": split}).save(path)
    return str(path)


def _dm(tokenizer, **kwargs) -> WebDataModule:
    defaults = dict(tokenizer=tokenizer, image_size=IMG, batch_size=4, num_workers=0, shuffle_buffer=0)
    return WebDataModule(**{**defaults, **kwargs})


def _drain(dm: WebDataModule, loader) -> None:
    for b in loader:
        dm.on_before_batch_transfer(b, 0)


# -- 1. a lost shard counts as the samples it held --------------------------------------------
@pytest.mark.parametrize("with_sizes", [True, False])
def test_unreadable_shard_counts_the_samples_it_should_hold(tmp_path, tokenizer, with_sizes):
    """A garbage shard among four counts as its 5 samples (manifest shard_sizes, or 20 / 4 shards), not as 1."""
    path = _manifest(tmp_path, [5, 5, 5, 5], garbage=(2,), shard_sizes=with_sizes)
    dm = _dm(tokenizer, test=[Source(path, split="test")], max_skip_fraction=1.0, max_bad_shard_fraction=1.0)
    dm.setup("test")
    _drain(dm, dm.test_dataloader())
    st = dm.stats["train"]  # no trainer attached: counted under "train"
    assert (st["seen"], st["skipped"]) == (20, 5)
    assert st["reasons"] == {"unreadable shard": 5}
    assert list(st["bad_shards"]) == [str(tmp_path / "shards" / "part-002.tar")]


def test_shard_estimate_rounds_up_when_the_manifest_has_no_shard_sizes(tmp_path, tokenizer):
    """Without shard_sizes, a lost shard of a 13-sample, 3-shard split counts ceil(13 / 3) = 5 samples."""
    path = _manifest(tmp_path, [5, 4, 4], garbage=(1,), shard_sizes=False)
    dm = _dm(tokenizer, test=[Source(path, split="test")], max_skip_fraction=1.0, max_bad_shard_fraction=1.0)
    dm.setup("test")
    _drain(dm, dm.test_dataloader())
    assert (dm.stats["train"]["seen"], dm.stats["train"]["skipped"]) == (14, 5)


def test_too_many_unreadable_shards_stop_training_naming_them(tmp_path, tokenizer):
    """One garbage shard of four (> max_bad_shard_fraction=5%) stops a training epoch with a DataError naming it."""
    path = _manifest(tmp_path, [5, 5, 5, 5], garbage=(1,))
    dm = _dm(tokenizer, train=[Source(path)], epoch_length=40, max_skip_fraction=1.0)
    dm.setup("fit")
    with pytest.raises(DataError, match=r"(?s)1 of 4 shard\(s\) could not be read .*part-001\.tar"):
        _drain(dm, dm.train_dataloader())


def test_stream_of_only_unreadable_shards_stops_instead_of_looping_forever():
    """An endless stream that yields nothing but skip records raises a DataError instead of hanging."""
    lost = Skipped("shard a.tar", "unreadable shard (ReadError: invalid header)", count=100, shard="a.tar")
    with pytest.raises(DataError, match=r"all 1000000 samples of this stream were skipped"):
        next(batches(itertools.repeat(lost), 4, Collator("text", None)))


# -- 2. a truncated tar ----------------------------------------------------------------------
def test_truncated_tar_yields_complete_samples_once_then_counts_its_lost_tail(tmp_path):
    """A 10-sample tar cut at 60% of its bytes: each complete sample once, no partial one, then one skip for the rest."""
    url = write_tar(tmp_path / "cut.tar", _pairs(10))
    data = (tmp_path / "cut.tar").read_bytes()
    (tmp_path / "cut.tar").write_bytes(data[: int(len(data) * 0.6)])
    decoder = SampleDecoder("pair", DEFAULT_FIELDS, lambda img: img)
    out = [decoder(s) for s in read_shards([url], {url: 10})]
    good = [o["key"] for o in out if not isinstance(o, Skipped)]
    skips = [o for o in out if isinstance(o, Skipped)]
    assert 0 < len(good) < 10 and len(good) == len(set(good))
    assert good == [f"{url}:s{i:04d}" for i in range(len(good))]  # in order, none twice
    assert len(skips) == 1 and out[-1] is skips[0]  # no partial sample ("no txt field"), one shard record
    assert skips[0].shard == url and skips[0].count == 10 - len(good)
    assert skips[0].reason.startswith("unreadable shard")


def test_shard_cut_on_a_member_boundary_counts_what_the_manifest_says_it_lacks(tmp_path):
    """A tar that ends cleanly after 6 of the 10 samples its manifest lists: 6 samples, then one
    skip counting the 4 missing; with an estimated size (no shard_sizes) nothing is claimed."""
    url = write_tar(tmp_path / "short.tar", _pairs(6))
    out = list(read_shards([url], {url: 10}, exact=True))
    skips = [o for o in out if isinstance(o, Skipped)]
    assert len(out) == 7 and len(skips) == 1 and out[-1] is skips[0]
    assert skips[0].count == 4 and skips[0].shard == url and skips[0].reason.startswith("short shard (6 of the 10")
    assert not any(isinstance(o, Skipped) for o in read_shards([url], {url: 10}))


# -- 3. skips during evaluation --------------------------------------------------------------
class _Counter(VLPModule):
    """Counts the evaluated samples; the results are what on_test_end writes."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))

    def test_step(self, batch, batch_idx, dataloader_idx=0):
        self.results.setdefault("test", {"samples": 0})["samples"] += len(batch["keys"])

    def validation_step(self, batch, batch_idx, dataloader_idx=0):
        pass


def _trainer(tmp_path):
    return quiet_trainer(default_root_dir=str(tmp_path))


def _bad(n: int) -> list[dict]:
    return [{"__key__": f"bad{i}", "jpg": b"not an image", "txt": "a caption"} for i in range(n)]


def test_test_skips_are_written_to_test_results(tmp_path, tokenizer):
    """1 corrupt image of 9 test samples under max_skip_fraction=0.2: test_results.json lists it under "skipped"."""
    path = _manifest(tmp_path, [4, 4], extra=_bad(1))
    dm = _dm(tokenizer, test=[Source(path, split="test")], max_skip_fraction=0.2)
    _trainer(tmp_path).test(_Counter(), datamodule=dm)
    record = json.loads((tmp_path / "test_results.json").read_text())
    assert record["results"]["test"] == {"samples": 8}
    skipped = record["skipped"]
    assert (skipped["seen"], skipped["skipped"], skipped["reasons"]) == (9, 1, {"corrupt image": 1})


def test_test_skips_past_the_limit_stop_a_small_test_set(tmp_path, tokenizer):
    """2 corrupt images of 10 test samples (far fewer than min_samples_for_skip_check) stop `vlp test` with a DataError."""
    path = _manifest(tmp_path, [4, 4], extra=_bad(2))
    dm = _dm(tokenizer, test=[Source(path, split="test")])
    with pytest.raises(DataError, match=r"test: 2 of 10 samples skipped .*max_skip_fraction"):
        _trainer(tmp_path).test(_Counter(), datamodule=dm)
    assert not (tmp_path / "test_results.json").exists()


def test_validation_skips_past_the_limit_stop_at_the_end_of_the_run(tmp_path, tokenizer):
    """2 corrupt images of 10 validation samples stop validation when it ends, with a DataError."""
    path = _manifest(tmp_path, [4, 4], extra=_bad(2))
    dm = _dm(tokenizer, val=[Source(path, split="test")])
    with pytest.raises(DataError, match=r"val: 2 of 10 samples skipped"):
        _trainer(tmp_path).validate(_Counter(), datamodule=dm)


def test_end_of_test_check_uses_the_counts_of_all_ranks(monkeypatch):
    """Rank 0 skipped 0 of 50, rank 1 5 of 50: the report sums both and the end-of-test check (5% > 2%) stops."""
    import vlp.data.datamodule as datamodule

    dm = WebDataModule(max_skip_fraction=0.02)
    dm.record("test", 0, 50, [])
    other = {"seen": 50, "skipped": 5, "reasons": {"corrupt image": 5}, "bad_shards": {}}
    monkeypatch.setattr(datamodule, "gather_objects", lambda local: [local, other])
    report = dm.skip_report("test")
    assert (report["seen"], report["skipped"], report["reasons"]) == (100, 5, {"corrupt image": 5})
    with pytest.raises(DataError, match=r"test: 5 of 100 samples skipped"):
        dm.finish_stage("test", report)


# -- 4. 16-bit images ------------------------------------------------------------------------
def test_16_bit_png_keeps_its_gradient():
    """A 16-bit grayscale PNG gradient 0, 4096, ..., 61440 decodes to round(v / 257), not to white."""
    row = np.arange(0, 65536, 4096, dtype=np.uint16)  # 16 values
    buf = io.BytesIO()
    Image.fromarray(np.repeat(row[None], 2, axis=0)).save(buf, format="PNG")
    img = np.asarray(decode_image(buf.getvalue()))  # (2, 16, 3)
    expected = [0, 16, 32, 48, 64, 80, 96, 112, 128, 143, 159, 175, 191, 207, 223, 239]
    assert img.shape == (2, 16, 3) and img.dtype == np.uint8
    assert img[0, :, 0].tolist() == expected
    assert (img[..., 0] == img[..., 1]).all() and (img[..., 1] == img[..., 2]).all()


def test_32_bit_integer_and_float_images_are_scaled_not_clipped():
    """An "I" TIFF with values up to 65535 is scaled by 1/257; an "F" TIFF in [0, 1] by 255."""
    for array, expected in (
        (np.array([[0, 257, 32896, 65535]], dtype=np.int32), [0, 1, 128, 255]),
        (np.array([[0.0, 0.25, 0.5, 1.0]], dtype=np.float32), [0, 64, 128, 255]),
    ):
        buf = io.BytesIO()
        Image.fromarray(array).save(buf, format="TIFF")
        assert np.asarray(decode_image(buf.getvalue()))[0, :, 0].tolist() == expected


# -- 5. text that is not UTF-8 ---------------------------------------------------------------
@pytest.mark.parametrize(
    "modality, sample, reason",
    [
        ("pair", {"jpg": jpeg_bytes(), "txt": b"caf\xe9 au lait"}, "caption is not UTF-8 (byte 0xe9 at offset 3)"),
        (
            "retrieval",
            {"jpg": jpeg_bytes(), "json": b'{"captions": ["caf\xe9"]}'},
            "json is not UTF-8 (byte 0xe9 at offset 18)",
        ),
        ("image", {"jpg": jpeg_bytes(), "cls": b"\xff1"}, "cls label is not UTF-8 (byte 0xff at offset 0)"),
    ],
)
def test_text_that_is_not_utf8_is_a_counted_skip(modality, sample, reason):
    """A caption, json or cls field with invalid UTF-8 bytes is skipped with the byte and offset, not decoded with U+FFFD."""
    out = SampleDecoder(modality, DEFAULT_FIELDS, lambda img: img)({"__key__": "k", "__url__": "u.tar", **sample})
    assert out == Skipped("u.tar:k", reason)


# -- 6. DataModule settings out of range -----------------------------------------------------
@pytest.mark.parametrize(
    "key, value",
    [
        ("batch_size", 0),
        ("batch_size", -4),
        ("eval_batch_size", 0),
        ("num_workers", -1),
        ("shuffle_buffer", -1),
        ("max_skip_fraction", 1.5),
        ("max_bad_shard_fraction", -0.1),
        ("epoch_length", 0),
        ("image_size", 0),
    ],
)
def test_out_of_range_settings_are_config_errors(key, value):
    """batch_size 0 / -4 and other settings out of range are a ConfigError naming data.init_args.<key>."""
    with pytest.raises(ConfigError, match=rf"data\.init_args\.{key} must be"):
        WebDataModule(**{key: value})


@pytest.mark.parametrize("size", [0, -4])
def test_batches_refuses_batch_size_below_one(size):
    """batches() with batch_size 0 or -4 raises ValueError at once instead of buffering forever."""
    with pytest.raises(ValueError, match="batch_size must be an integer >= 1"):
        next(batches(iter([{"key": "a", "text": "x"}]), size, Collator("text", None)))
