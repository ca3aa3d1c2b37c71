"""The IterableDataset behind every DataLoader of :class:`~vlp.data.WebDataModule`.

Work is split first by rank, then by DataLoader worker. Training streams loop over
their shards forever (reshuffled each pass, or resampled with replacement) and are cut
to an exact number of batches per rank, so every rank steps the same number of times
under DDP. Evaluation streams read each shard exactly once and are not cut.

Several sources of one modality are mixed sample by sample with their weights; several
modalities are interleaved batch by batch (``mixing``): round robin (FLAVA's recipe), a
fixed interleave proportional to each group's weight, or a weighted draw per step from a
generator seeded by (seed, epoch, step) only, so every rank picks the same modality at
the same step (under DDP different modalities touch different parameters).

A stream is a deterministic function of (seed, epoch, rank, worker): its shard order,
shuffle buffer, image crops and masks draw from generators seeded by those four numbers
only, never from the process's global RNG. :class:`StreamLoader` saves how far an epoch
got in the checkpoint, so that a resumed run continues with the very next batch.
"""

from __future__ import annotations

import itertools
import logging
import random
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from vlp.data.collate import Collator, batches
from vlp.data.pipeline import SampleDecoder, read_shards
from vlp.errors import DataError
from vlp.utils.distributed import gather_objects

log = logging.getLogger("vlp.data")

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
    exact_sizes: bool = False  # shard_sizes are the manifest's counts (else an estimate)


@dataclass
class ModalityGroup:
    modality: str
    sources: list[SourceStream]
    collate: Collator
    num_samples: int = 0
    batch_size: int | None = None  # None: the stream's batch_size
    weight: float = 1.0  # share of the steps under mixing "weights" / "sample"


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
    mixing: str = "round_robin"  # across groups: round_robin | weights | sample


#: How training batches of several modality groups are interleaved.
MIXING = ("round_robin", "weights", "sample")


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


def stream_seed(seed: int, epoch: int, rank: int, worker: int) -> int:
    """A 63-bit seed that depends on its four arguments only (string seeds of
    ``random.Random`` are hashed with SHA-512, the same in every process)."""
    return random.Random(f"vlp-stream/{seed}/{epoch}/{rank}/{worker}").getrandbits(63)


def _own_rng(items: Iterator, seed: int) -> Iterator:
    """Produce every item of ``items`` with torch's and Python's global generators set to a
    private state seeded by ``seed``, then put the caller's state back: image transforms
    and maskers (which draw from the global generators) become a function of ``seed``, and
    the model's dropout in the main process (``num_workers: 0``) is left undisturbed."""
    inner_torch = torch.Generator().manual_seed(seed).get_state()
    inner_py = random.Random(seed).getstate()
    while True:
        outer_torch, outer_py = torch.get_rng_state(), random.getstate()
        torch.set_rng_state(inner_torch)
        random.setstate(inner_py)
        try:
            item = next(items)
        except StopIteration:
            return
        finally:
            inner_torch, inner_py = torch.get_rng_state(), random.getstate()
            torch.set_rng_state(outer_torch)
            random.setstate(outer_py)
        yield item


def eval_share(num_shards: int, rank: int, world_size: int) -> tuple[int, bool]:
    """(shards rank ``rank`` reads, whether it reads them all and keeps a share of the samples).
    Evaluation splits by shard when every rank gets one, else by sample: every rank then reads
    every shard and keeps its own samples, so no rank is left without data."""
    if num_shards >= world_size:
        return len(range(rank, num_shards, world_size)), False
    return num_shards, True


def eval_shards(urls: list[str], rank: int, world: int, worker: int, workers: int) -> tuple[list[str], int, int]:
    """One evaluation reader's ``(shards, stride, offset)``: shards are split over ranks, then
    over workers; where there are fewer shards than readers the samples are split instead, so
    every sample is read by exactly one (rank, worker) and none is left without data."""
    if len(urls) >= world:
        mine, stride, offset = urls[rank::world], 1, 0
    else:
        mine, stride, offset = list(urls), world, rank
    if len(mine) >= workers:
        return mine[worker::workers], stride, offset
    return mine, stride * workers, offset + stride * worker


def worker_share(num_batches: int, worker: int, num_workers: int) -> int:
    """How many of ``num_batches`` consecutive batches worker ``worker`` yields: the DataLoader
    asks its workers in turn (batch ``i`` comes from worker ``i % num_workers``)."""
    return num_batches // num_workers + (1 if worker < num_batches % num_workers else 0)


class ShardStream(IterableDataset):
    """Batches of one rank; ``epoch`` and ``skip_batches`` are set by :class:`StreamLoader`
    before each pass (workers receive a copy when they start)."""

    def __init__(self, config: StreamConfig) -> None:
        super().__init__()
        self.config = config
        self.epoch = 0
        self.skip_batches = 0  # batches of this epoch (over all workers) already trained on

    # -- which shards this worker reads ------------------------------------------------------
    def _shards(self, source: SourceStream, worker: int, num_workers: int) -> tuple[list[str], int, int]:
        """This worker's shards and, for evaluation data with fewer shards than readers, its
        share of their samples: ``(shards, stride, offset)`` keeps every ``stride``-th sample
        from ``offset`` (1, 0: all of them)."""
        c = self.config
        if c.train and c.resampled:
            return source.urls, 1, 0  # every worker samples from all shards
        if not c.train:
            return eval_shards(source.urls, c.rank, c.world_size, worker, num_workers)
        per_rank = source.urls[c.rank :: c.world_size]
        mine = per_rank[worker::num_workers]
        if not mine:
            raise DataError(
                f"{source.name}: {len(source.urls)} shard(s) cannot be split across "
                f"{c.world_size} rank(s) x {num_workers} worker(s); use fewer workers, more shards, "
                "or resampled: true"
            )
        return mine, 1, 0

    def _raw(self, source: SourceStream, shards: list[str], rng: random.Random) -> Iterator:
        c = self.config
        if not c.train:
            yield from read_shards(shards, source.shard_sizes, source.exact_sizes)
            return
        while True:  # training: loop forever; the caller cuts the epoch
            if c.resampled:
                order = [rng.choice(shards) for _ in range(len(shards))]
            else:
                order = list(shards)
                rng.shuffle(order)
            yield from read_shards(order, source.shard_sizes, source.exact_sizes)

    def _group_examples(self, group: ModalityGroup, worker: int, num_workers: int, rng: random.Random) -> Iterator:
        c = self.config
        streams, weights = [], []
        for source in group.sources:
            shards, stride, offset = self._shards(source, worker, num_workers)
            if shards:
                raw = self._raw(source, shards, rng)
                if stride > 1:  # evaluation split by sample
                    raw = itertools.islice(raw, offset, None, stride)
                raw = _shuffle(raw, c.shuffle_buffer if c.train else 0, rng)
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
        # the DataLoader asks worker 0 first; after k batches the next one is due from worker
        # k % num_workers, so in a resumed pass worker 0 takes up that worker's stream
        worker = (worker + self.skip_batches) % num_workers
        rng = random.Random(stream_seed(c.seed, self.epoch, c.rank, worker))
        global_seed = rng.getrandbits(63)
        iterators = [
            batches(self._group_examples(g, worker, num_workers, rng), g.batch_size or c.batch_size, g.collate)
            for g in c.groups
        ]
        if c.mixing == "round_robin" or len(iterators) == 1 or not c.train:
            mixed = _round_robin(iterators)
        else:  # this worker's steps of the epoch's schedule: batch i comes from worker i % num_workers
            steps = mixing_schedule(c.mixing, [g.weight for g in c.groups], c.seed, self.epoch)
            mixed = _scheduled(iterators, itertools.islice(steps, worker, None, num_workers))
        stream = _own_rng(mixed, global_seed)
        if c.num_batches is not None:
            share = worker_share(c.num_batches, worker, num_workers)
            # a resumed epoch: recompute (decode, crop, mask) the batches trained on before, so
            # that every generator is where it was, and hand out only the ones after them
            done = min(share, worker_share(self.skip_batches, worker, num_workers))
            stream = itertools.islice(stream, done, share)
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


def mixing_schedule(mode: str, weights: list[float], seed: int, epoch: int) -> Iterator[int]:
    """The group index of every step of an epoch (endless), the same on every rank.

    ``weights``: a deterministic interleave in which each group gets its share of every
    window of steps (smooth weighted round robin: weights 2:1 give 0, 1, 0, 0, 1, 0...).
    ``sample``: at step ``s`` a weighted draw from a generator seeded by (seed, epoch, s)
    only. ``round_robin``: 0, 1, ..., n-1, 0, 1, ...
    """
    n = len(weights)
    if mode == "round_robin":
        yield from itertools.cycle(range(n))
    elif mode == "weights":
        total, credit = sum(weights), [0.0] * n
        while True:
            for g in range(n):
                credit[g] += weights[g]
            g = max(range(n), key=credit.__getitem__)  # ties: the first group
            credit[g] -= total
            yield g
    elif mode == "sample":
        for step in itertools.count():
            yield random.Random(f"vlp-mix/{seed}/{epoch}/{step}").choices(range(n), weights=weights)[0]
    else:
        raise ValueError(f"mixing must be one of {MIXING}, got {mode!r}")


def _scheduled(iterators: list[Iterator], schedule: Iterator[int]) -> Iterator:
    """The next item of ``iterators[g]`` for each ``g`` of ``schedule`` (training streams are endless)."""
    for g in schedule:
        try:
            yield next(iterators[g])
        except StopIteration:
            return


def global_rng_state() -> dict:
    """The global generators of this process: torch (CPU, and CUDA once initialised), Python, NumPy."""
    keys, pos, has_gauss, gauss = np.random.get_state()[1:]
    state = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": pos, "has_gauss": has_gauss, "gauss": gauss},
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_global_rng_state(state: dict) -> None:
    """Put back what :func:`global_rng_state` returned."""
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    cuda = state.get("cuda")
    if cuda is not None and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)


#: settings that decide which batches a training stream yields, in the order of a warning
STREAM_SETTINGS = ("num_workers", "world_size", "batch_size", "num_batches", "seed", "mixing", "groups")
#: settings older checkpoints lack: compared only when the checkpoint has them
NEWER_SETTINGS = ("mixing", "groups")


class StreamLoader(DataLoader):
    """The training DataLoader over a :class:`ShardStream`, resumable in the middle of an epoch.

    Lightning stores ``state_dict()`` with the fit loop in every checkpoint and hands it to
    ``load_state_dict()`` on resume, before the first batch. The state holds the epoch, the
    batches handed out in it so far (counted here, in the main process, as they leave), the
    settings that decide the stream (:data:`STREAM_SETTINGS`) and the global generators of
    every rank (:func:`global_rng_state`; Lightning saves none), so that dropout and every
    other draw in the model continue as in an uninterrupted run. On the next pass each
    worker recomputes its share of the batches already trained on and yields the rest.

    A resume with other settings cannot find its place in the stream: a warning names the
    settings that changed and the rest of the epoch is read from the start of the new stream.

    Args:
        stream: the training stream.
        epoch_fn: returns the current epoch (the Trainer's), or None when there is none;
            passes without an epoch count up from the last one (or from :meth:`set_epoch`).
        **kwargs: DataLoader arguments; ``batch_size`` must be None (the stream yields batches).
    """

    def __init__(self, stream: ShardStream, *, epoch_fn: Callable[[], int | None] | None = None, **kwargs) -> None:
        # the base seed the DataLoader draws for its workers comes from this generator, not the global one
        kwargs.setdefault("generator", torch.Generator().manual_seed(stream.config.seed))
        super().__init__(stream, **kwargs)
        self.epoch_fn = epoch_fn
        self.epoch = 0
        self.batches = 0  # handed out in ``epoch``
        self._next_epoch = 0
        self._resume: dict | None = None

    def set_epoch(self, epoch: int) -> None:
        """The epoch of the next pass (when no Trainer tells it)."""
        self._next_epoch = epoch

    def settings(self) -> dict:
        c = self.dataset.config
        return {
            "num_workers": self.num_workers,
            "world_size": c.world_size,
            "batch_size": c.batch_size,
            "num_batches": c.num_batches,
            "seed": c.seed,
            "mixing": c.mixing,
            # per group: modality, batch size and mixing weight
            "groups": [[g.modality, g.batch_size or c.batch_size, g.weight] for g in c.groups],
        }

    def state_dict(self) -> dict:
        return {
            "epoch": self.epoch,
            "batches": self.batches,
            **self.settings(),
            "rng": gather_objects(global_rng_state()),
        }

    def load_state_dict(self, state: dict) -> None:
        rngs = state.get("rng") or []
        rank = self.dataset.config.rank
        if rngs:
            set_global_rng_state(rngs[rank] if rank < len(rngs) else rngs[0])
        own = self.settings()
        changed = [
            f"{k} {state.get(k)} -> {own[k]}"
            for k in STREAM_SETTINGS
            if state.get(k) != own[k] and (k in state or k not in NEWER_SETTINGS)
        ]
        if changed and state.get("batches"):
            log.warning(
                "resuming with other data settings than the checkpoint's (%s): the stream cannot continue "
                "where it stopped, so the rest of epoch %d is read from the start of the new stream "
                "(the %d batches trained on before this resume may come again)",
                ", ".join(changed),
                state.get("epoch", 0),
                state["batches"],
            )
            return
        self._resume = state

    def __iter__(self) -> Iterator:
        epoch = self.epoch_fn() if self.epoch_fn is not None else None
        epoch = self._next_epoch if epoch is None else epoch
        skip = 0
        if self._resume is not None:
            saved, self._resume = self._resume, None
            if saved["epoch"] == epoch:
                skip = saved["batches"]
        self.dataset.epoch, self.dataset.skip_batches = epoch, skip
        self.epoch, self.batches, self._next_epoch = epoch, skip, epoch + 1
        for batch in super().__iter__():
            self.batches += 1
            yield batch
