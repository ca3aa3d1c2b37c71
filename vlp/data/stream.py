"""The IterableDataset behind every DataLoader of :class:`~vlp.data.WebDataModule`.

Work is split first by rank, then by DataLoader worker. Training streams loop over
their shards forever (reshuffled each pass, or resampled with replacement) and are cut
to an exact number of batches per rank, so every rank steps the same number of times
under DDP. Evaluation streams read each shard exactly once and are not cut.

Several sources of one modality are mixed sample by sample with their weights; several
modalities are interleaved batch by batch, round robin (FLAVA's recipe).
"""

from __future__ import annotations

import itertools
import random
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from torch.utils.data import IterableDataset, get_worker_info

from vlp.data.collate import Collator, batches
from vlp.data.pipeline import SampleDecoder, read_shards
from vlp.errors import DataError

# Training streams split ``num_batches`` exactly across workers (see ``ShardStream.__iter__``),
# so Lightning's generic warning about ``__len__`` with several workers does not apply.
warnings.filterwarnings("ignore", message=r"Your `IterableDataset` has `__len__` defined")


@dataclass
class SourceStream:
    """One manifest split, ready to read."""

    name: str
    urls: list[str]
    weight: float
    decoder: SampleDecoder
    shard_sizes: dict[str, int] = field(default_factory=dict)  # url → samples it should hold


@dataclass
class ModalityGroup:
    modality: str
    sources: list[SourceStream]
    collate: Collator
    num_samples: int = 0


@dataclass
class StreamConfig:
    batch_size: int
    train: bool
    resampled: bool = False
    shuffle_buffer: int = 0
    num_batches: int | None = None  # per rank, training only
    rank: int = 0
    world_size: int = 1
    seed: int = 0
    groups: list[ModalityGroup] = field(default_factory=list)


def _shuffle(samples: Iterator, size: int, rng: random.Random) -> Iterator:
    """Reservoir-style shuffle buffer of ``size`` samples."""
    if size <= 1:
        yield from samples
        return
    buffer: list = []
    for s in samples:
        if len(buffer) < size:
            buffer.append(s)
            continue
        i = rng.randrange(size)
        buffer[i], s = s, buffer[i]
        yield s
    rng.shuffle(buffer)
    yield from buffer


class ShardStream(IterableDataset):
    def __init__(self, config: StreamConfig) -> None:
        super().__init__()
        self.config = config

    # -- which shards this worker reads ------------------------------------------------------
    def _shards(self, source: SourceStream, worker: int, num_workers: int) -> list[str]:
        c = self.config
        if c.train and c.resampled:
            return source.urls  # every worker samples from all shards
        per_rank = source.urls[c.rank :: c.world_size]
        mine = per_rank[worker::num_workers]
        if c.train and not mine:
            raise DataError(
                f"{source.name}: {len(source.urls)} shard(s) cannot be split across "
                f"{c.world_size} rank(s) x {num_workers} worker(s); use fewer workers, more shards, "
                "or resampled: true"
            )
        return mine

    def _raw(self, source: SourceStream, shards: list[str], rng: random.Random) -> Iterator:
        c = self.config
        if not c.train:
            yield from read_shards(shards, source.shard_sizes)
            return
        while True:  # training: loop forever; the caller cuts the epoch
            if c.resampled:
                order = [rng.choice(shards) for _ in range(len(shards))]
            else:
                order = list(shards)
                rng.shuffle(order)
            yield from read_shards(order, source.shard_sizes)

    def _group_examples(self, group: ModalityGroup, worker: int, num_workers: int, rng: random.Random) -> Iterator:
        c = self.config
        streams, weights = [], []
        for source in group.sources:
            shards = self._shards(source, worker, num_workers)
            if shards:
                raw = _shuffle(self._raw(source, shards, rng), c.shuffle_buffer if c.train else 0, rng)
                streams.append(map(source.decoder, raw))
                weights.append(source.weight)
        if len(streams) == 1:
            yield from streams[0]
            return
        while streams:  # weighted sample-level mixing; exhausted (eval) streams drop out
            i = rng.choices(range(len(streams)), weights=weights)[0] if c.train else 0
            try:
                yield next(streams[i])
            except StopIteration:
                del streams[i], weights[i]

    def __iter__(self) -> Iterator[dict]:
        c = self.config
        info = get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info else (0, 1)
        # torch.initial_seed() differs per worker and per epoch and follows the global seed
        rng = random.Random(torch.initial_seed() + 7919 * c.rank + c.seed)
        iterators = [
            batches(self._group_examples(g, worker, num_workers, rng), c.batch_size, g.collate) for g in c.groups
        ]
        stream = _round_robin(iterators)
        if c.num_batches is not None:
            share = c.num_batches // num_workers + (1 if worker < c.num_batches % num_workers else 0)
            stream = itertools.islice(stream, share)
        yield from stream

    def __len__(self) -> int:
        if self.config.num_batches is None:
            raise TypeError("evaluation streams have no fixed length")
        return self.config.num_batches


def _round_robin(iterators: list[Iterator]) -> Iterator:
    """Yield one item from each iterator in turn; exhausted iterators drop out."""
    active = list(iterators)
    while active:
        for it in list(active):
            try:
                yield next(it)
            except StopIteration:
                active.remove(it)
