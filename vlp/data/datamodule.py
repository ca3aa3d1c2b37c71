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
they are counted per stage and epoch (a broken shard as the samples it should have held),
the first ones are logged by key, and past ``max_skip_fraction`` of the samples or
``max_bad_shard_fraction`` of the shards the run stops with a :class:`~vlp.errors.DataError`.
Evaluation stages are checked once more when they end, over all their samples, and
:meth:`WebDataModule.skip_report` gives the counts (``test_results.json`` has them).
"""

from __future__ import annotations

import logging
import math
import os
from collections import Counter, defaultdict
from dataclasses import dataclass

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader

from vlp.data.collate import IMAGE_KEYS, PAIR_FORMATS, Collator
from vlp.data.manifest import check_local_shards, expand_urls, load_manifest
from vlp.data.masking import Masker
from vlp.data.mmc4 import MMC4Options
from vlp.data.pipeline import SampleDecoder, skipped_count
from vlp.data.prompts import PromptCollate, PromptDataset, Prompts, read_prompts
from vlp.data.stream import MIXING, ModalityGroup, ShardStream, SourceStream, StreamConfig, StreamLoader, eval_share
from vlp.data.tokenization import Tokenizer
from vlp.data.transforms import ImageTransform, MultiViewTransform, ViewSpec, parse_views
from vlp.errors import ConfigError, DataError
from vlp.utils.distributed import gather_objects
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
        batch_size: batch size of this source's modality group (default: the module's
            ``batch_size``, or ``eval_batch_size`` for evaluation).
        maskers: maskers of this source's batches (default: the module's ``maskers``);
            ``[]`` turns masking off, e.g. MLM for text batches, MLM + patches for pairs.
        mix_weight: weight of this source's modality group among the groups under
            ``mixing: weights`` or ``sample`` (default 1).
        views: extra views of each image, ``{name: {size, norm, crop_scale}}`` (default:
            the module's ``views``); the batch gets ``image_<name>`` next to ``image``.
        evaluation: options of this evaluation source's evaluator, e.g. for an image split
            ``{classes: path/to/classes.json, templates: simple_imagenet_templates}``, or
            ``{probe_train: true}``: the linear probe's training split (docs/evaluation.md).
        mmc4: options of MMC4-layout interleaved documents, ``{sim_threshold: 0.24,
            max_num_images: 6, min_num_images: 1}`` (over the manifest's ``extra.mmc4``;
            see ``vlp.data.mmc4``).
        pair_format: ``caption`` (default) or ``interleaved``: a pair source's batches as
            one-image documents ``<image>caption<|endofchunk|>`` with the interleaved keys
            (``images`` ... ``lm_labels``), ``modality`` still ``pair``.

    Sources of one modality form one group (one batch stream): the group settings above
    given on several of its sources must agree.
    """

    manifest: str
    split: str = "train"
    weight: float = 1.0
    urls: str | None = None
    batch_size: int | None = None
    maskers: list[Masker] | None = None
    mix_weight: float | None = None
    views: dict[str, dict] | None = None
    evaluation: dict | None = None
    mmc4: dict | None = None
    pair_format: str | None = None


#: Source settings that belong to its modality group (None: the module's default).
GROUP_SETTINGS = ("batch_size", "maskers", "mix_weight", "views", "pair_format")


class WebDataModule(pl.LightningDataModule):
    """Streams webdataset shards of any modality for training and evaluation.

    Args:
        train / val / test / predict: lists of sources per stage. Training mixes them
            (sample-level by weight within a modality, batch-level across modalities by
            ``mixing``); each evaluation source gets its own DataLoader.
        mixing: how training batches of several modality groups follow each other:
            ``round_robin`` (one batch of each in turn), ``weights`` (a fixed interleave in
            proportion to the groups' ``mix_weight``) or ``sample`` (a draw per step with
            those weights, seeded by (seed, epoch, step): the same modality on every rank).
        tokenizer: tokenises every text field (captions, questions, documents).
        image_size: side of the square model input.
        batch_size: per-device training batch size; ``eval_batch_size`` for evaluation.
        num_workers: DataLoader workers per device.
        torch_threads: intra-op threads of the training process: None leaves torch's default
            (all cores), "auto" gives the model the cores the loader workers leave free
            (cores per process - num_workers, at least 1), an integer sets it. On a small CPU
            the workers and the model share the cores (``make bench`` ``train_workers``).
        shuffle_buffer: samples held for shuffling (training).
        resampled: draw training shards with replacement (each rank from all shards):
            the mode for multi-node runs or fewer shards than ranks x workers.
        epoch_length: training samples per epoch over all ranks (default: the sum of
            the training sources' ``num_samples``).
        maskers: MLM / patch maskers applied in the collator (training and eval).
        norm / crop_scale / hflip: image transform settings (see ``ImageTransform``).
        views: extra views of every image, ``{name: {size, norm, crop_scale}}``: the batch
            gets ``image_<name>`` (B, 3, size, size) next to ``image``; without
            ``crop_scale`` a view is the same crop as ``image`` at its own size and
            normalisation (FLAVA's codebook view: ``{codebook: {size: 112, norm: unit}}``).
        normalize_on_device: workers hand over uint8 images and the normalisation runs
            after the batch reached the device (``on_after_batch_transfer``): 4x less
            worker time and copy volume. Batches read from the DataLoaders outside a
            Trainer then hold uint8 images; pass them through :meth:`finish_batch`.
        max_skip_fraction: stop when more than this fraction of samples is skipped...
        min_samples_for_skip_check: ...once at least this many samples were seen in the
            epoch; evaluation stages are also checked when they end, with no minimum.
        max_bad_shard_fraction: stop when more than this fraction of a stage's shards (on
            this rank) could not be read in an epoch; the error names them.
        check_shards: verify that every local shard exists before the first step.
        seed: seed of the training streams (default: the run's ``seed_everything``). The
            batches of an epoch are a function of (seed, epoch, rank, worker) only; the
            training DataLoader saves its place in checkpoints (see
            :class:`~vlp.data.stream.StreamLoader`).
        prompts: prompts for ``vlp predict`` with a generative model (a folder of images or
            a file of documents, :class:`~vlp.data.prompts.Prompts`); replaces ``predict``.
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
        torch_threads: int | str | None = None,
        shuffle_buffer: int = 2000,
        resampled: bool = False,
        epoch_length: int | None = None,
        maskers: list[Masker] | None = None,
        mixing: str = "round_robin",
        norm: str = "clip",
        crop_scale: tuple[float, float] = (0.5, 1.0),
        hflip: float = 0.0,
        views: dict[str, dict] | None = None,
        normalize_on_device: bool = True,
        max_skip_fraction: float = 0.01,
        min_samples_for_skip_check: int = 1000,
        max_bad_shard_fraction: float = 0.05,
        check_shards: bool = True,
        seed: int | None = None,
        prompts: Prompts | None = None,
    ) -> None:
        super().__init__()
        _check_settings(
            batch_size=batch_size,
            eval_batch_size=eval_batch_size,
            image_size=image_size,
            num_workers=num_workers,
            shuffle_buffer=shuffle_buffer,
            epoch_length=epoch_length,
            min_samples_for_skip_check=min_samples_for_skip_check,
            max_skip_fraction=max_skip_fraction,
            max_bad_shard_fraction=max_bad_shard_fraction,
        )
        if mixing not in MIXING:
            raise ConfigError(f"data.init_args.mixing must be one of {', '.join(MIXING)}, got {mixing!r}")
        self.mixing = mixing
        self.views = parse_views(views, "data.init_args.views")
        self._view_specs: dict[str, tuple] = {}  # view name → (spec, where): one spec per name
        self._view_normalizers: dict[str, ImageTransform] = {}
        self.sources = {"train": train or [], "val": val or [], "test": test or [], "predict": predict or []}
        self.tokenizer = tokenizer
        self.image_size = image_size
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.num_workers = num_workers
        if not (
            torch_threads is None or torch_threads == "auto" or (isinstance(torch_threads, int) and torch_threads > 0)
        ):
            raise ConfigError(
                f"data.init_args.torch_threads must be null, 'auto' or a positive integer, got {torch_threads!r}"
            )
        self.torch_threads = torch_threads
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
        self.max_bad_shard_fraction = max_bad_shard_fraction
        self.check_shards = check_shards
        self.seed = seed
        self.prompts = prompts
        self.groups: dict[str, list[ModalityGroup]] = {}
        self.pending_error: DataError | None = None  # a training limit passed on this rank (several ranks)
        self.stats: dict[str, dict] = defaultdict(_new_stats)
        self._active_stage: str | None = None
        self._ended: dict[str, Counter] = defaultdict(Counter)  # stage → loader → worker streams ended
        self._loaders_done: dict[str, set[int]] = defaultdict(set)  # stage → exhausted loaders

    @property
    def vocab_size(self) -> int:
        """The tokenizer's vocabulary, added special tokens included: what a recipe links to
        the text model's embedding size (LightningCLI ``link_arguments``)."""
        if self.tokenizer is None:
            raise ConfigError("data.init_args.tokenizer is not set, so there is no vocab_size to link")
        return self.tokenizer.vocab_size

    # -- building streams -------------------------------------------------------------------
    def _load_sources(self, stage: str, train: bool) -> list[ModalityGroup]:
        groups: dict[str, ModalityGroup] = {}
        settings_of: dict[str, dict] = {}  # group → setting → (value, where it was given)
        for i, src in enumerate(self.sources[stage]):
            where = f"data.{stage}[{i}]"
            manifest = load_manifest(resolve_path(src.manifest))
            split = manifest.split(src.split)
            modality = manifest.modality_of(src.split)
            urls = expand_urls(src.urls or split.urls)
            name = f"{manifest.name}/{src.split}"
            if self.check_shards:
                check_local_shards(urls, f"{where} ({name})")
            if src.mmc4 is not None and modality != "interleaved":
                raise ConfigError(f"{where}.mmc4 ({name}) applies to interleaved sources; this one is {modality}")
            mmc4 = MMC4Options.parse(manifest.extra.get("mmc4"), src.mmc4, where=f"{where}.mmc4 ({name})")
            decoder = SampleDecoder(modality, manifest.fields, None, mmc4=mmc4)  # its group's transform: below
            sizes, exact = expected_shard_sizes(split, urls)
            stream = SourceStream(name, urls, src.weight, decoder, shard_sizes=sizes, exact_sizes=exact)
            key = modality if train else f"{modality}#{i}"  # evaluation: one loader per source
            if src.pair_format is not None and modality != "pair":
                raise ConfigError(f"{where}.pair_format ({name}) applies to pair sources; this one is {modality}")
            settings = _group_settings(src, where, name, settings_of.get(key))
            settings_of[key] = settings
            if key not in groups:
                groups[key] = ModalityGroup(modality, [], None)
            groups[key].sources.append(stream)
            groups[key].num_samples += split.num_samples
        for key, group in groups.items():
            given = {k: v for k, (v, _) in settings_of[key].items()}
            maskers = self.maskers if given["maskers"] is None else given["maskers"]
            pair_format = given["pair_format"] or "caption"
            group.collate = Collator(group.modality, self.tokenizer, maskers, pair_format=pair_format)
            group.batch_size = given["batch_size"]
            group.weight = 1.0 if given["mix_weight"] is None else given["mix_weight"]
            views = given["views"]
            documents = group.modality == "interleaved" or pair_format == "interleaved"
            if views is None:  # the module's views: for every group of single images
                views = {} if documents or group.modality in ("text", "text_pair") else self.views
            self._register_views(views, group, settings_of[key]["views"][1] or "data.init_args.views", documents)
            transform = self.image_transform(train, views)
            for stream in group.sources:
                stream.decoder.transform = transform
        return list(groups.values())

    def _register_views(self, views: dict, group: ModalityGroup, where: str, documents: bool = False) -> None:
        if views and documents:
            raise ConfigError(f"{where}.views: extra image views are not supported for interleaved documents")
        for name, spec in views.items():
            seen = self._view_specs.setdefault(name, (spec, where))
            if seen[0] != spec:  # finish_batch normalises image_<name> one way
                raise ConfigError(
                    f"{where}.views.{name} is {spec} but {seen[1]}.views.{name} is {seen[0]}: one name, one view"
                )

    def image_transform(self, train: bool, views: dict[str, ViewSpec] | None = None):
        """The ``ImageTransform`` of ``image``, or with ``views`` a ``MultiViewTransform``."""
        main = ImageTransform(
            self.image_size,
            train=train,
            crop_scale=self.crop_scale,
            hflip=self.hflip if train else 0.0,
            norm=self.norm,
            normalize=not self.normalize_on_device,
        )
        return MultiViewTransform(main, views) if views else main

    def setup(self, stage: str | None = None) -> None:
        if stage == "fit" and self.torch_threads is not None:
            torch.set_num_threads(self.budget_threads())
        wanted = {"fit": ["train", "val"], "validate": ["val"], "test": ["test"], "predict": ["predict"]}
        for s in (
            wanted.get(stage, ["train", "val", "test", "predict"]) if stage else ["train", "val", "test", "predict"]
        ):
            if s not in self.groups and self.sources[s]:
                self.groups[s] = self._load_sources(s, train=(s == "train"))
        if stage == "fit" and not self.sources["train"]:
            raise ConfigError("data.train lists no sources, so there is nothing to fit on")

    def budget_threads(self) -> int:
        """The training process's torch threads under ``torch_threads``: the cores this process
        may use (its affinity, shared by the ranks on this machine) less the loader workers."""
        if isinstance(self.torch_threads, int):
            return self.torch_threads
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        local = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
        threads = max(1, cores // max(1, local) - self.num_workers)
        log.info("data.torch_threads auto: %d torch thread(s) beside %d loader worker(s)", threads, self.num_workers)
        return threads

    def _rank(self) -> tuple[int, int]:
        trainer = getattr(self, "trainer", None)
        return (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)

    def num_train_batches(self) -> int:
        """Training steps per rank and epoch: the epoch's samples over the samples a step
        takes on average (each group's batch size by its share of the steps)."""
        rank, world = self._rank()
        groups = self.groups["train"]
        total = self.epoch_length or sum(g.num_samples for g in groups)
        sizes = [g.batch_size or self.batch_size for g in groups]
        if len(set(sizes)) <= 1:
            return max(1, total // (self.batch_size if not sizes else sizes[0]) // world)
        shares = [1.0] * len(groups) if self.mixing == "round_robin" else [g.weight for g in groups]
        per_step = sum(b * w for b, w in zip(sizes, shares, strict=True)) / sum(shares)
        return max(1, int(total // (per_step * world)))

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
            seed=self._stream_seed(),
            groups=groups,
            mixing=self.mixing,
        )
        workers = self.num_workers
        if not train:  # no idle workers for small eval sets (split by sample past one shard per worker)
            workers = min(workers, max(eval_share(len(s.urls), rank, world)[0] for g in groups for s in g.sources))
        kwargs = dict(
            batch_size=None,
            num_workers=workers,
            persistent_workers=False,  # workers must start each epoch with its epoch and resume position
            pin_memory=torch.cuda.is_available(),
            prefetch_factor=4 if workers > 0 else None,
            # the base seed each pass draws comes from here: evaluation leaves training's RNG alone
            generator=torch.Generator().manual_seed(config.seed),
        )
        if train:  # resumable mid-epoch; each epoch reshuffles by the Trainer's epoch
            return StreamLoader(ShardStream(config), epoch_fn=self._current_epoch, **kwargs)
        return DataLoader(ShardStream(config), **kwargs)

    def _stream_seed(self) -> int:
        if self.seed is not None:
            return self.seed
        return int(os.environ.get("PL_GLOBAL_SEED", 0))  # set by seed_everything on every rank

    def _current_epoch(self) -> int | None:
        trainer = getattr(self, "trainer", None)
        return trainer.current_epoch if trainer is not None else None

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
        if self.prompts is not None:  # prompts for a generative model (vlp.data.prompts)
            if self.tokenizer is None:
                raise ConfigError("data.prompts needs data.init_args.tokenizer (the model's)")
            dataset = PromptDataset(read_prompts(self.prompts), self.image_transform(train=False))
            return torch.utils.data.DataLoader(
                dataset, batch_size=self.prompts.batch_size, collate_fn=PromptCollate(self.tokenizer, self.prompts)
            )
        return self._stage_loaders("predict")

    def eval_source_names(self, stage: str) -> list[str]:
        """Names (``manifest/split``) of the evaluation DataLoaders, in order."""
        if stage not in self.groups:
            self.setup({"val": "validate", "test": "test", "predict": "predict"}[stage])
        return [g.sources[0].name for g in self.groups.get(stage, [])]

    def eval_sources(self, stage: str) -> list[dict]:
        """Per evaluation DataLoader of ``stage``, in order: its ``name``, ``split``, ``dataset`` (manifest
        name), ``where`` (``data.<stage>[i]``), the manifest's ``extra`` and the source's
        ``evaluation`` options (what ``vlp.models.evaluation.EvalSource`` holds)."""
        out = []
        for i, src in enumerate(self.sources[stage]):
            where = f"data.{stage}[{i}]"
            if src.evaluation is not None and not isinstance(src.evaluation, dict):
                raise ConfigError(f"{where}.evaluation must be a mapping of options, got {src.evaluation!r}")
            manifest = load_manifest(resolve_path(src.manifest))
            name = f"{manifest.name}/{src.split}"
            out.append(
                dict(
                    name=name,
                    split=src.split,
                    dataset=manifest.name,
                    where=where,
                    extra=dict(manifest.extra),
                    options=dict(src.evaluation or {}),
                )
            )
        return out

    def eval_source_modalities(self, stage: str) -> list[str]:
        """Modalities of the evaluation DataLoaders of ``stage``, in order (the model creates
        one evaluator per loader on every rank before the first batch)."""
        if stage not in self.groups:
            self.setup({"val": "validate", "test": "test", "predict": "predict"}[stage])
        return [g.modality for g in self.groups.get(stage, [])]

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
        for name, (spec, _) in self._view_specs.items():
            for key in (f"image_{name}", f"image2_{name}"):
                if key in batch:
                    if name not in self._view_normalizers:
                        self._view_normalizers[name] = ImageTransform(spec.size, norm=spec.norm)
                    batch[key] = self._view_normalizers[name].normalize_batch(batch[key])
        if "images" in batch and not batch["images"].is_floating_point():
            images = transform.normalize_batch(batch["images"])  # (B, N, 3, H, W)
            slots = torch.arange(images.shape[1], device=images.device)  # (N,)
            real = slots[None, :] < batch["num_images"].to(images.device)[:, None]  # (B, N)
            batch["images"] = images * real[:, :, None, None, None]
        return batch

    def on_after_batch_transfer(self, batch, dataloader_idx: int):
        return self.finish_batch(batch)

    # -- skip accounting (runs in the main process) -----------------------------------------
    def _stage(self) -> str:
        trainer = getattr(self, "trainer", None)
        if trainer is None or trainer.training:
            return "train"
        if trainer.sanity_checking:
            return "sanity"
        if trainer.validating:
            return "val"
        return "test" if trainer.testing else "predict"

    def on_before_batch_transfer(self, batch, dataloader_idx: int):
        if not isinstance(batch, dict) or "skipped" not in batch:
            return batch
        stage = self._stage()
        if stage != self._active_stage and self._active_stage in EVAL_STAGES:
            self.finish_stage(self._active_stage)  # e.g. training resumed after a validation run
        self._active_stage = stage
        trainer = getattr(self, "trainer", None)
        epoch = trainer.current_epoch if trainer is not None else 0
        self.record(stage, epoch, len(batch["keys"]), batch.pop("skipped"))
        batch["num_skipped"] = self.stats[stage]["last"]
        streams = batch.pop("end_of_stream", None)
        if streams is not None and stage in EVAL_STAGES:
            ended = self._ended[stage]
            ended[dataloader_idx] += 1
            if ended[dataloader_idx] == streams:  # every worker stream of this loader is through
                self._loaders_done[stage].add(dataloader_idx)
                done = len(self._loaders_done[stage]) >= max(1, len(self.groups.get(stage, [])))
                if done and not self._checked_at_end(stage):
                    self.finish_stage(stage)
        return batch

    def record(self, stage: str, epoch: int, num_good: int, skipped: list) -> None:
        """Count ``num_good`` samples and the skip records of one batch; stop past the limits."""
        st = self.stats[stage]
        if st["done"] or epoch != st["epoch"]:  # a new epoch, or a new run of an evaluation stage
            if not st["done"]:
                self.log_summary(stage)
            st.update(_new_stats(), epoch=epoch)
            self._ended.pop(stage, None)
            self._loaders_done.pop(stage, None)
        lost = skipped_count(skipped)
        st["seen"] += num_good + lost
        st["skipped"] += lost
        st["last"] = lost
        for s in skipped:
            st["reasons"][s.reason.split(" (")[0]] += s.count
            if s.shard is not None:
                st["bad_shards"][s.shard] = st["bad_shards"].get(s.shard, 0) + s.count
            if st["records"] < 20:  # the first few by name, then the summary
                log.warning("skipped %s: %s", s.key, s.reason)
            st["records"] += 1
        if self._checked_at_end(stage):
            return
        try:
            if st["seen"] >= self.min_samples_for_skip_check:
                self._check_fraction(stage)
            self._check_bad_shards(stage, st["bad_shards"], self._num_shards(stage), st["epoch"])
        except DataError as e:
            if stage != "train" or self._rank()[1] == 1:
                raise
            # several ranks: this rank's limit is passed; every rank stops together at the next
            # training step (VLPModule asks all ranks with one all-reduce), none waits alone
            self.pending_error = self.pending_error or e

    def _checked_at_end(self, stage: str) -> bool:
        """Under several ranks, validation and test are checked only when they end, over the
        counts of all ranks (VLPModule calls :meth:`skip_report` and :meth:`finish_stage` on
        every rank): a check that stopped one rank alone would leave the others waiting."""
        return stage in ("val", "test") and self._rank()[1] > 1

    def _check_bad_shards(self, stage: str, bad_shards: dict, shards: int, epoch: int) -> None:
        if bad_shards and shards and len(bad_shards) > self.max_bad_shard_fraction * shards:
            bad = list(bad_shards)
            shown = "\n  ".join(bad[:10]) + (f"\n  ... and {len(bad) - 10} more" if len(bad) > 10 else "")
            raise DataError(
                f"{stage}: {len(bad)} of {shards} shard(s) could not be read in epoch {epoch} "
                f"(> max_bad_shard_fraction={self.max_bad_shard_fraction:.1%}); see the warnings above:\n  {shown}"
            )

    def _check_fraction(self, stage: str, counts: dict | None = None) -> None:
        st = counts or self.stats[stage]
        if st["skipped"] > self.max_skip_fraction * st["seen"]:
            raise DataError(
                f"{stage}: {st['skipped']} of {st['seen']} samples skipped "
                f"({st['skipped'] / st['seen']:.1%} > max_skip_fraction={self.max_skip_fraction:.1%}); "
                f"reasons: {dict(st['reasons'])}"
            )

    def _num_shards(self, stage: str, all_ranks: bool = False) -> int:
        """Shards this rank (or, ``all_ranks``, every rank) reads in ``stage`` (all of them for
        resampled training)."""
        rank, world = self._rank()
        groups = self.groups.get("val" if stage == "sanity" else stage, [])
        if all_ranks or (stage == "train" and self.resampled):
            return sum(len(s.urls) for g in groups for s in g.sources)
        return sum(len(s.urls[rank::world]) for g in groups for s in g.sources)

    def finish_stage(self, stage: str, report: dict | None = None) -> None:
        """End of a run of an evaluation stage (its loaders are exhausted, another stage began,
        or the test ended): log the summary and check ``max_skip_fraction`` over all of its
        samples, however few. With ``report`` (:meth:`skip_report`, summed over ranks) the
        checks (``max_skip_fraction``, and ``max_bad_shard_fraction`` of the shards of all
        ranks) use the totals of all ranks, so that every rank stops or goes on alike."""
        st = self.stats.get(stage)
        if st is None or (st["done"] and report is None):
            return
        if not st["done"]:
            self.log_summary(stage)
        st["done"] = True
        counts = report or st
        if counts["seen"]:
            self._check_fraction(stage, counts)
        if report is not None:
            self._check_bad_shards(stage, report["bad_shards"], self._num_shards(stage, all_ranks=True), st["epoch"])

    def skip_report(self, stage: str) -> dict:
        """Counts of the last (or current) epoch or run of ``stage``, summed over ranks:
        ``{"seen", "skipped", "fraction", "reasons", "bad_shards"}``; seen and skipped count
        samples (good + skipped), a lost shard counting as the samples it should have held."""
        st = self.stats.get(stage) or _new_stats()
        local = {k: st[k] for k in ("seen", "skipped", "reasons", "bad_shards")}
        report = {"seen": 0, "skipped": 0, "fraction": 0.0, "reasons": Counter(), "bad_shards": {}}
        for part in gather_objects(local):
            report["seen"] += part["seen"]
            report["skipped"] += part["skipped"]
            report["reasons"].update(part["reasons"])
            report["bad_shards"].update(part["bad_shards"])
        report["fraction"] = report["skipped"] / report["seen"] if report["seen"] else 0.0
        report["reasons"] = dict(report["reasons"])
        return report

    def log_summary(self, stage: str) -> None:
        st = self.stats.get(stage)
        if st and st["skipped"]:
            log.warning(
                "%s epoch %d: skipped %d of %d samples: %s%s",
                stage,
                st["epoch"],
                st["skipped"],
                st["seen"],
                dict(st["reasons"]),
                f"; unreadable shards: {list(st['bad_shards'])}" if st["bad_shards"] else "",
            )

    # -- resume: the training skip counts go on where they were ----------------------------
    def state_dict(self) -> dict:
        """The training skip counts of every rank (Lightning saves this in each checkpoint), so
        that a resumed epoch goes on counting towards its limits instead of starting afresh."""
        st = self.stats.get("train")
        mine = None if st is None else {**st, "reasons": dict(st["reasons"]), "bad_shards": dict(st["bad_shards"])}
        return {"train_skips": gather_objects(mine)}

    def load_state_dict(self, state: dict) -> None:
        parts = state.get("train_skips") or []
        rank, world = self._rank()
        if len(parts) != world or parts[rank] is None:
            return  # another world size, or nothing counted yet: the counts start afresh
        st = dict(parts[rank])
        st["reasons"] = Counter(st["reasons"])
        self.stats["train"] = {**_new_stats(), **st}

    def teardown(self, stage: str) -> None:
        for s in list(self.stats):
            if not self.stats[s]["done"]:
                self.log_summary(s)
        self.stats.clear()
        self._ended.clear()
        self._loaders_done.clear()
        self._active_stage = None


#: Stages read once per run; their skip fraction is checked when they end.
EVAL_STAGES = ("val", "test", "predict")


def _new_stats() -> dict:
    return {
        "seen": 0,
        "skipped": 0,
        "reasons": Counter(),
        "bad_shards": {},  # url → samples lost with it
        "records": 0,
        "last": 0,
        "epoch": 0,
        "done": False,
    }


def expected_shard_sizes(split, urls: list[str]) -> tuple[dict[str, int], bool]:
    """Samples each of ``urls`` should hold, and whether that is exact: the split's
    ``shard_sizes`` when they match the urls one to one (exact), otherwise
    ``num_samples / len(urls)`` rounded up (an estimate)."""
    sizes = getattr(split, "shard_sizes", None)
    if sizes is not None and len(sizes) == len(urls):
        return dict(zip(urls, sizes, strict=True)), True
    each = math.ceil(split.num_samples / len(urls)) if urls else 0
    return dict.fromkeys(urls, each), False


def _group_settings(src: Source, where: str, name: str, before: dict | None) -> dict:
    """The group settings ``src`` gives (None = not given), checked, merged with those other
    sources of its group gave (``before``: setting → (value, where)); a conflict is a ConfigError."""
    bs, weight, maskers, pair_format = src.batch_size, src.mix_weight, src.maskers, src.pair_format
    views = None if src.views is None else parse_views(src.views, f"{where}.views")
    if bs is not None and (isinstance(bs, bool) or not isinstance(bs, int) or bs < 1):
        raise ConfigError(f"{where}.batch_size ({name}) must be an integer >= 1 or null, got {bs!r}")
    if weight is not None and (isinstance(weight, bool) or not isinstance(weight, int | float) or not weight > 0):
        raise ConfigError(f"{where}.mix_weight ({name}) must be a number > 0 or null, got {weight!r}")
    if maskers is not None and (not isinstance(maskers, list | tuple) or not all(callable(m) for m in maskers)):
        raise ConfigError(f"{where}.maskers ({name}) must be a list of maskers (class_path: ...), got {maskers!r}")
    if pair_format is not None and pair_format not in PAIR_FORMATS:
        raise ConfigError(f"{where}.pair_format ({name}) must be one of {', '.join(PAIR_FORMATS)}, got {pair_format!r}")
    merged = dict(before or dict.fromkeys(GROUP_SETTINGS, (None, None)))
    given = {"batch_size": bs, "maskers": maskers, "mix_weight": weight, "views": views, "pair_format": pair_format}
    for key, value in given.items():
        if value is None:
            continue
        old, old_where = merged[key]
        if old is not None and _comparable(old) != _comparable(value):
            raise ConfigError(
                f"{where}.{key} ({name}) is {value!r} but {old_where}.{key} is {old!r}: sources of one "
                "modality share one batch stream, so its batch_size, maskers, mix_weight, views and pair_format must agree"
            )
        merged[key] = (list(value) if key == "maskers" else value, f"{where}")
    return merged


def _comparable(value):
    """Maskers compare by class and settings (two recipes' copies of one masker agree)."""
    if isinstance(value, list | tuple):
        return [(type(m), vars(m)) for m in value]
    return value


def _check_settings(**values) -> None:
    """ConfigError naming ``data.init_args.<key>`` for a setting outside its range."""
    ints = {
        "batch_size": 1,
        "eval_batch_size": 1,
        "image_size": 1,
        "num_workers": 0,
        "shuffle_buffer": 0,
        "epoch_length": 1,
        "min_samples_for_skip_check": 0,
    }
    optional = ("eval_batch_size", "epoch_length")
    for key, low in ints.items():
        v = values[key]
        if v is None and key in optional:
            continue
        if isinstance(v, bool) or not isinstance(v, int) or v < low:
            none = " or null" if key in optional else ""
            raise ConfigError(f"data.init_args.{key} must be an integer >= {low}{none}, got {v!r}")
    for key in ("max_skip_fraction", "max_bad_shard_fraction"):
        v = values[key]
        if isinstance(v, bool) or not isinstance(v, int | float) or not 0 <= v <= 1:
            raise ConfigError(f"data.init_args.{key} must be a fraction between 0 and 1, got {v!r}")


__all__ = ["DataError", "Source", "WebDataModule"]
