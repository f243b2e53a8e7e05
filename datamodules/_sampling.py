"""Resumable training order: a seeded, epoch-aware shuffle that can start mid-epoch, and a DataLoader
that saves and restores its place in the epoch.

What Lightning 2.6 does on a mid-epoch resume: its own counters (batch index, global step, when to
stop the epoch) resume from the checkpoint, but a plain DataLoader is simply iterated afresh: the
resumed epoch replays the first batches of a new shuffle and never reaches its last ones (Lightning
only warns "your dataloader is not resumable"). Nothing is fast-forwarded. A loader with
``state_dict``/``load_state_dict`` (its ``_Stateful`` protocol) has its state saved under
``loops.fit_loop.state_dict.combined_loader`` and handed back by ``load_state_dict()`` before it is
iterated again, but only when Lightning builds the loader after restoring the checkpoint: a
``configure_optimizers`` that reads ``trainer.estimated_stepping_batches`` (all our tasks) makes it
build the loader first, and the state is silently dropped; ``mamba_dense.tasks.ExactResume`` (in
every ``mamba-dense`` run) hands it over then.

Here the order of an epoch is a pure function of (seed, epoch) (``ResumableSampler``, a
``DistributedSampler`` so that Lightning keeps it under DDP), every index carries the seed of its
sample's augmentation, drawn from (seed, epoch, index) (``SeededIndex``), and ``ResumableLoader``
counts the batches it has handed out and, after ``load_state_dict``, skips that many indices
without loading them. A resumed run therefore sees the same batches with the same augmentation
as an uninterrupted one, for any number of workers (under DDP: on the same number of ranks).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from torch.utils.data import BatchSampler, DataLoader, Dataset, DistributedSampler

__all__ = ["ResumableLoader", "ResumableSampler", "SeededIndex", "reindex"]


class SeededIndex(int):
    """A dataset index that carries ``seed``, the seed of that sample's random augmentation.

    Datasets with ``WorkerSeeded`` reseed their transforms from it, so an item's augmentation depends
    on (run seed, epoch, index) only, not on the worker that loads it or on what was loaded before.
    """

    seed: int

    def __new__(cls, index: int, seed: int) -> SeededIndex:
        obj = super().__new__(cls, index)
        obj.seed = int(seed)
        return obj

    def __reduce__(self) -> tuple[Any, ...]:  # to DataLoader workers: keep the seed
        return (SeededIndex, (int(self), self.seed))

    def __repr__(self) -> str:
        return f"SeededIndex({int(self)}, seed={self.seed})"


def reindex(index: int, new: int) -> int:
    """``new`` with ``index``'s augmentation seed, if it has one (an item served in place of another)."""
    seed = getattr(index, "seed", None)
    return int(new) if seed is None else SeededIndex(new, seed)


class ResumableSampler(DistributedSampler):
    """Shuffled (or ordered) indices of one epoch, a function of (seed, epoch) only, that can start
    part-way through the epoch; under DDP each rank takes its share as ``DistributedSampler`` does.

    Args:
        dataset: the map-style dataset.
        shuffle: permute (seeded by ``seed + epoch``) or keep the dataset order.
        seed: shuffle and augmentation seed; None = ``PL_GLOBAL_SEED`` (set by ``seed_everything``,
            the same on every rank), else 0, as Lightning's own distributed sampler.
        num_replicas, rank: None = from ``torch.distributed`` when initialized, else 1 and 0.
        drop_last: as ``DistributedSampler`` (drop the tail instead of padding ranks evenly).

    Yields ``SeededIndex`` items. ``set_epoch(e)`` picks the epoch (Lightning calls it each epoch);
    ``start`` (samples of this rank's epoch to skip) applies to the next iteration only.
    """

    def __init__(self, dataset: Dataset, shuffle: bool = True, seed: int | None = None,
                 num_replicas: int | None = None, rank: int | None = None, drop_last: bool = False) -> None:
        distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
        if num_replicas is None:
            num_replicas = torch.distributed.get_world_size() if distributed else 1
        if rank is None:
            rank = torch.distributed.get_rank() if distributed else 0
        if seed is None:
            seed = int(os.environ.get("PL_GLOBAL_SEED", 0))
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed,
                         drop_last=drop_last)
        self.start = 0

    def sample_seed(self, index: int) -> int:
        """Augmentation seed of ``index`` in the current epoch."""
        return int(np.random.SeedSequence([self.seed % 2**63, self.epoch, int(index)]).generate_state(1)[0])

    def __iter__(self) -> Iterator[SeededIndex]:
        order = list(super().__iter__())  # this rank's share of the epoch, from (seed, epoch)
        start, self.start = self.start, 0
        for index in order[start:]:
            yield SeededIndex(index, self.sample_seed(index))


class ResumableLoader(DataLoader):
    """A DataLoader that can continue an epoch where a checkpoint left it (Lightning's ``_Stateful``).

    ``state_dict()`` holds the sampler's epoch and seed and the number of batches of that epoch
    handed out so far; after ``load_state_dict()`` the next iteration over the same epoch skips them:
    by index when the sampler is a ``ResumableSampler`` batched by a plain ``BatchSampler`` (nothing is
    loaded), otherwise by loading and dropping them (exact only for a sampler whose order is a function
    of the epoch, e.g. ``SequentialSampler`` or a seeded ``DistributedSampler``).

    Example:
        >>> loader = ResumableLoader(ds, batch_size=4, sampler=ResumableSampler(ds, seed=0))  # doctest: +SKIP
        >>> it = iter(loader); next(it); next(it); state = loader.state_dict()  # doctest: +SKIP
        >>> loader.load_state_dict(state)  # the next epoch-0 iteration starts at batch 2  # doctest: +SKIP
    """

    _yielded = (0, 0)  # (epoch, batches of it handed out)
    _resume: tuple[int, int] | None = None  # (epoch, batches to skip) for the next iteration

    def _order(self) -> Any:
        sampler = self.sampler
        if not hasattr(sampler, "set_epoch") and self.batch_sampler is not None:
            sampler = getattr(self.batch_sampler, "sampler", sampler)
        return sampler

    def _epoch(self) -> int:
        return int(getattr(self._order(), "epoch", 0))

    def state_dict(self) -> dict[str, Any]:
        epoch, batches = self._yielded
        if epoch != self._epoch():  # set_epoch() moved on, the new epoch's iteration has not started
            epoch, batches = self._epoch(), 0
        return {"epoch": epoch, "batches": batches, "seed": getattr(self._order(), "seed", None)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        order = self._order()
        if state_dict.get("seed") is not None and isinstance(order, ResumableSampler):
            order.seed = int(state_dict["seed"])  # the interrupted run's order, whatever the new seed
        if hasattr(order, "set_epoch"):
            order.set_epoch(int(state_dict["epoch"]))
        self._resume = (int(state_dict["epoch"]), int(state_dict["batches"]))

    def __iter__(self) -> Iterator[Any]:
        return self._batches()

    def _batches(self) -> Iterator[Any]:
        # NOTE: a generator, so nothing (no worker, no index) starts before the first next(): Lightning
        # calls iter() on the train loader before it calls set_epoch() at the start of `fit`.
        resume, self._resume = self._resume, None
        epoch = self._epoch()
        skip = resume[1] if resume is not None and resume[0] == epoch else 0
        self._yielded = (epoch, 0)
        order = self._order()
        if skip and isinstance(order, ResumableSampler) and type(self.batch_sampler) is BatchSampler \
                and self.batch_sampler.sampler is order:
            order.start = skip * self.batch_sampler.batch_size
            self._yielded, skip = (epoch, skip), 0
        for batch in super().__iter__():
            self._yielded = (epoch, self._yielded[1] + 1)
            if skip:
                skip -= 1
                continue
            yield batch
