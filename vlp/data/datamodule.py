"""``WebDataModule``: one LightningDataModule for every family and modality.

```yaml
data:
  class_path: vlp.data.WebDataModule
  init_args:
    train:
      - {manifest: data_manifests/cc3m.yaml, weight: 3.0}
      - {manifest: data_manifests/sbu.yaml}
    val: [{manifest: data_manifests/coco_karpathy.yaml, split: val}]
    tokenizer: {class_path: vlp.data.HFTokenizer, init_args: {name_or_path: bert-base-uncased}}
    image_size: 256
    batch_size: 64          # per device
```

Skipped samples (corrupt image, empty caption, broken shard) arrive with each batch;
they are counted per stage and epoch, the first ones are logged by key, and past
``max_skip_fraction`` the run stops with a :class:`~vlp.errors.DataError`.
"""

from __future__ import annotations

import logging
from collections import Counter, defaultdict
from dataclasses import dataclass

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader

from vlp.data.collate import IMAGE_KEYS, Collator
from vlp.data.manifest import check_local_shards, expand_urls, load_manifest
from vlp.data.masking import Masker
from vlp.data.pipeline import SampleDecoder
from vlp.data.stream import ModalityGroup, ShardStream, SourceStream, StreamConfig
from vlp.data.tokenization import Tokenizer
from vlp.data.transforms import ImageTransform
from vlp.errors import ConfigError, DataError
from vlp.utils.paths import resolve_path

log = logging.getLogger("vlp.data")


@dataclass
class Source:
    """One dataset split to read.

    Args:
        manifest: path of the manifest YAML (``data_manifests/cc3m.yaml``).
        split: which of the manifest's splits.
        weight: sampling weight among sources of the same modality (training).
        urls: override the manifest's urls (e.g. a local mirror).
    """

    manifest: str
    split: str = "train"
    weight: float = 1.0
    urls: str | None = None


class WebDataModule(pl.LightningDataModule):
    """Streams webdataset shards of any modality for training and evaluation.

    Args:
        train / val / test / predict: lists of sources per stage. Training mixes them
            (sample-level by weight within a modality, batch-level round robin across
            modalities); each evaluation source gets its own DataLoader.
        tokenizer: tokenises every text field (captions, questions, documents).
        image_size: side of the square model input.
        batch_size: per-device training batch size; ``eval_batch_size`` for evaluation.
        num_workers: DataLoader workers per device.
        shuffle_buffer: samples held for shuffling (training).
        resampled: draw training shards with replacement (each rank from all shards):
            the mode for multi-node runs or fewer shards than ranks x workers.
        epoch_length: training samples per epoch over all ranks (default: the sum of
            the training sources' ``num_samples``).
        maskers: MLM / patch maskers applied in the collator (training and eval).
        norm / crop_scale / hflip: image transform settings (see ``ImageTransform``).
        normalize_on_device: workers hand over uint8 images and the normalisation runs
            after the batch reached the device (``on_after_batch_transfer``): 4x less
            worker time and copy volume. Batches read from the DataLoaders outside a
            Trainer then hold uint8 images; pass them through :meth:`finish_batch`.
        max_skip_fraction: stop when more than this fraction of samples is skipped...
        min_samples_for_skip_check: ...once at least this many samples were seen.
        check_shards: verify that every local shard exists before the first step.
    """

    def __init__(
        self,
        *,
        train: list[Source] | None = None,
        val: list[Source] | None = None,
        test: list[Source] | None = None,
        predict: list[Source] | None = None,
        tokenizer: Tokenizer | None = None,
        image_size: int = 224,
        batch_size: int = 64,
        eval_batch_size: int | None = None,
        num_workers: int = 4,
        shuffle_buffer: int = 2000,
        resampled: bool = False,
        epoch_length: int | None = None,
        maskers: list[Masker] | None = None,
        norm: str = "clip",
        crop_scale: tuple[float, float] = (0.5, 1.0),
        hflip: float = 0.0,
        normalize_on_device: bool = True,
        max_skip_fraction: float = 0.01,
        min_samples_for_skip_check: int = 1000,
        check_shards: bool = True,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.sources = {"train": train or [], "val": val or [], "test": test or [], "predict": predict or []}
        self.tokenizer = tokenizer
        self.image_size = image_size
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.num_workers = num_workers
        self.shuffle_buffer = shuffle_buffer
        self.resampled = resampled
        self.epoch_length = epoch_length
        self.maskers = list(maskers or [])
        self.norm = norm
        self.crop_scale = tuple(crop_scale)
        self.hflip = hflip
        self.normalize_on_device = normalize_on_device
        self.max_skip_fraction = max_skip_fraction
        self.min_samples_for_skip_check = min_samples_for_skip_check
        self.check_shards = check_shards
        self.seed = seed
        self.groups: dict[str, list[ModalityGroup]] = {}
        self.stats: dict[str, dict] = defaultdict(lambda: {"seen": 0, "skipped": 0, "reasons": Counter(), "epoch": 0})

    # -- building streams -------------------------------------------------------------------
    def _load_sources(self, stage: str, train: bool) -> list[ModalityGroup]:
        transform = self.image_transform(train)
        groups: dict[str, ModalityGroup] = {}
        for i, src in enumerate(self.sources[stage]):
            where = f"data.{stage}[{i}]"
            manifest = load_manifest(resolve_path(src.manifest))
            split = manifest.split(src.split)
            modality = manifest.modality_of(src.split)
            urls = expand_urls(src.urls or split.urls)
            name = f"{manifest.name}/{src.split}"
            if self.check_shards:
                check_local_shards(urls, f"{where} ({name})")
            decoder = SampleDecoder(modality, manifest.fields, transform)
            stream = SourceStream(name, urls, src.weight, decoder)
            key = modality if train else f"{modality}#{i}"  # evaluation: one loader per source
            if key not in groups:
                groups[key] = ModalityGroup(modality, [], Collator(modality, self.tokenizer, self.maskers))
            groups[key].sources.append(stream)
            groups[key].num_samples += split.num_samples
        return list(groups.values())

    def image_transform(self, train: bool) -> ImageTransform:
        return ImageTransform(
            self.image_size,
            train=train,
            crop_scale=self.crop_scale,
            hflip=self.hflip if train else 0.0,
            norm=self.norm,
            normalize=not self.normalize_on_device,
        )

    def setup(self, stage: str | None = None) -> None:
        wanted = {"fit": ["train", "val"], "validate": ["val"], "test": ["test"], "predict": ["predict"]}
        for s in (
            wanted.get(stage, ["train", "val", "test", "predict"]) if stage else ["train", "val", "test", "predict"]
        ):
            if s not in self.groups and self.sources[s]:
                self.groups[s] = self._load_sources(s, train=(s == "train"))
        if stage == "fit" and not self.sources["train"]:
            raise ConfigError("data.train lists no sources, so there is nothing to fit on")

    def _rank(self) -> tuple[int, int]:
        trainer = getattr(self, "trainer", None)
        return (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)

    def num_train_batches(self) -> int:
        rank, world = self._rank()
        total = self.epoch_length or sum(g.num_samples for g in self.groups["train"])
        return max(1, total // (self.batch_size * world))

    def _loader(self, stage: str, groups: list[ModalityGroup]) -> DataLoader:
        rank, world = self._rank()
        train = stage == "train"
        config = StreamConfig(
            batch_size=self.batch_size if train else self.eval_batch_size,
            train=train,
            resampled=self.resampled and train,
            shuffle_buffer=self.shuffle_buffer,
            num_batches=self.num_train_batches() if train else None,
            rank=rank,
            world_size=world,
            seed=self.seed,
            groups=groups,
        )
        workers = self.num_workers
        if not train:  # no idle workers for small eval sets
            workers = min(workers, max(len(s.urls[rank::world]) for g in groups for s in g.sources))
        return DataLoader(
            ShardStream(config),
            batch_size=None,
            num_workers=workers,
            persistent_workers=False,
            pin_memory=torch.cuda.is_available(),
            prefetch_factor=4 if workers > 0 else None,
        )

    def _stage_loaders(self, stage: str):
        if stage not in self.groups:
            self.setup({"train": "fit", "val": "validate", "test": "test", "predict": "predict"}[stage])
        groups = self.groups.get(stage, [])
        if stage == "train":
            return self._loader("train", groups)
        loaders = [self._loader(stage, [g]) for g in groups]
        return loaders[0] if len(loaders) == 1 else loaders

    def train_dataloader(self):
        return self._stage_loaders("train")

    def val_dataloader(self):
        return self._stage_loaders("val") if self.sources["val"] else []

    def test_dataloader(self):
        if not self.sources["test"]:
            raise ConfigError("data.test lists no sources; add one to the recipe or pass --data.init_args.test")
        return self._stage_loaders("test")

    def predict_dataloader(self):
        return self._stage_loaders("predict")

    def eval_source_names(self, stage: str) -> list[str]:
        """Names (``manifest/split``) of the evaluation DataLoaders, in order."""
        if stage not in self.groups:
            self.setup({"val": "validate", "test": "test", "predict": "predict"}[stage])
        return [g.sources[0].name for g in self.groups.get(stage, [])]

    # -- on the device ------------------------------------------------------------------------
    def finish_batch(self, batch):
        """Normalise uint8 images (``image``, NLVR2's ``image2``, interleaved ``images``) where
        the batch now is; padded image slots of interleaved documents stay zero."""
        if not isinstance(batch, dict):
            return batch
        if getattr(self, "_normalizer", None) is None:
            self._normalizer = self.image_transform(train=False)  # same normalisation for both
        transform = self._normalizer
        for key in IMAGE_KEYS:
            if key in batch:
                batch[key] = transform.normalize_batch(batch[key])
        if "images" in batch and not batch["images"].is_floating_point():
            images = transform.normalize_batch(batch["images"])  # (B, N, 3, H, W)
            slots = torch.arange(images.shape[1], device=images.device)  # (N,)
            real = slots[None, :] < batch["num_images"].to(images.device)[:, None]  # (B, N)
            batch["images"] = images * real[:, :, None, None, None]
        return batch

    def on_after_batch_transfer(self, batch, dataloader_idx: int):
        return self.finish_batch(batch)

    # -- skip accounting (runs in the main process) -----------------------------------------
    def on_before_batch_transfer(self, batch, dataloader_idx: int):
        if not isinstance(batch, dict) or "skipped" not in batch:
            return batch
        trainer = getattr(self, "trainer", None)
        stage = "train" if trainer is None or trainer.training else ("val" if trainer.validating else "eval")
        epoch = trainer.current_epoch if trainer is not None else 0
        self.record(stage, epoch, len(batch["keys"]), batch.pop("skipped"))
        batch["num_skipped"] = self.stats[stage]["last"]
        return batch

    def record(self, stage: str, epoch: int, num_good: int, skipped: list) -> None:
        st = self.stats[stage]
        if epoch != st["epoch"]:
            self.log_summary(stage)
            st.update(seen=0, skipped=0, reasons=Counter(), epoch=epoch)
        st["seen"] += num_good + len(skipped)
        st["skipped"] += len(skipped)
        st["last"] = len(skipped)
        for s in skipped:
            st["reasons"][s.reason.split(" (")[0]] += 1
            if st["skipped"] - len(skipped) < 20:  # the first few by name, then the summary
                log.warning("skipped %s: %s", s.key, s.reason)
        if st["seen"] >= self.min_samples_for_skip_check and st["skipped"] > self.max_skip_fraction * st["seen"]:
            raise DataError(
                f"{stage}: {st['skipped']} of {st['seen']} samples skipped "
                f"({st['skipped'] / st['seen']:.1%} > max_skip_fraction={self.max_skip_fraction:.1%}); "
                f"reasons: {dict(st['reasons'])}"
            )

    def log_summary(self, stage: str) -> None:
        st = self.stats.get(stage)
        if st and st["skipped"]:
            log.warning(
                "%s epoch %d: skipped %d of %d samples: %s",
                stage,
                st["epoch"],
                st["skipped"],
                st["seen"],
                dict(st["reasons"]),
            )

    def teardown(self, stage: str) -> None:
        for s in list(self.stats):
            self.log_summary(s)
        self.stats.clear()


__all__ = ["DataError", "Source", "WebDataModule"]
