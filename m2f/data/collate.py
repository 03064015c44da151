"""Batching: normalise + pad images, pad target masks, and a deterministic resumable sampler.

``collate(batch, pixel_mean, pixel_std, size_divisibility)`` turns a list of dataset items into::

    images       float32 [B, 3, Hp, Wp]   (x - mean) / std, zero-padded (after normalisation)
    image_sizes  [(h, w)] * B              valid region of each image
    targets      [{"labels": int64 [N_b], "masks": bool [N_b, Hp, Wp] (False in the padding)}]
    meta         [dict] * B                every other key of the item (image_id, file_name,
                                           orig_size, is_thing, sem_seg [h, w], ...)

:class:`TrainingSampler` yields, for iteration ``i`` (from ``start_iter`` on, forever), the batch of
``(index, item_seed)`` pairs determined only by ``(seed, i, rank, world_size, batch_size)``: a resumed
run sees exactly the same data.  Datasets of :mod:`m2f.data.datasets` accept ``(index, seed)`` keys.
"""
from __future__ import annotations

import math
from functools import partial
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import torch

__all__ = ["collate", "TrainingSampler", "InferenceSampler", "build_loader", "mix_seed"]


def collate(batch: Sequence[Dict[str, Any]], pixel_mean: Sequence[float], pixel_std: Sequence[float],
            size_divisibility: int = 32) -> Dict[str, Any]:
    """See the module docstring.  ``Hp, Wp`` = the largest ``h, w`` rounded up to ``size_divisibility``."""
    if len(batch) == 0:
        raise ValueError("collate: empty batch")
    sizes = [tuple(int(s) for s in item["image"].shape[-2:]) for item in batch]
    d = max(1, int(size_divisibility))
    Hp = int(math.ceil(max(h for h, _ in sizes) / d) * d)
    Wp = int(math.ceil(max(w for _, w in sizes) / d) * d)
    mean = torch.as_tensor(pixel_mean, dtype=torch.float32).view(3, 1, 1)
    std = torch.as_tensor(pixel_std, dtype=torch.float32).view(3, 1, 1)
    images = torch.zeros(len(batch), 3, Hp, Wp, dtype=torch.float32)  # [B, 3, Hp, Wp]
    targets, meta = [], []
    for b, (item, (h, w)) in enumerate(zip(batch, sizes)):
        images[b, :, :h, :w] = (item["image"].float() - mean) / std
        m = item["masks"]  # [N, h, w]
        masks = torch.zeros(m.shape[0], Hp, Wp, dtype=torch.bool)
        masks[:, :h, :w] = m
        targets.append({"labels": item["labels"].long(), "masks": masks})
        meta.append({k: v for k, v in item.items() if k not in ("image", "labels", "masks")})
    return {"images": images, "image_sizes": sizes, "targets": targets, "meta": meta}


def mix_seed(*xs: int) -> int:
    """A 63-bit hash of a tuple of ints, stable across processes and machines."""
    h = 0x9E3779B97F4A7C15
    for x in xs:
        h ^= (int(x) + 0x9E3779B97F4A7C15 + ((h << 6) & 0xFFFFFFFFFFFFFFFF) + (h >> 2)) & 0xFFFFFFFFFFFFFFFF
        h = (h * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    return h & 0x7FFFFFFFFFFFFFFF


class TrainingSampler(torch.utils.data.Sampler):
    """Infinite batch sampler over ``size`` items.

    The global stream is epoch after epoch of permutations seeded by ``(seed, epoch)`` (or
    ``0..size-1`` when ``shuffle=False``).  Iteration ``i`` uses stream positions
    ``[i * B * world + rank * B, ... + B)``, so each batch depends only on
    ``(seed, i, rank, world_size, batch_size)``; each element comes with an item seed
    ``mix_seed(seed, position)`` for its augmentation.  Yields lists of ``(index, item_seed)``."""

    def __init__(self, size: int, batch_size: int, seed: int = 0, start_iter: int = 0, rank: int = 0,
                 world_size: int = 1, shuffle: bool = True):
        from m2f.errors import InputError

        if size < 1:
            raise InputError("training dataset is empty")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} not in [0, {world_size})")
        self.size, self.batch_size, self.seed = size, batch_size, seed
        self.start_iter, self.rank, self.world_size, self.shuffle = start_iter, rank, world_size, shuffle
        self._perm: Tuple[int, Optional[torch.Tensor]] = (-1, None)

    def _perm_of(self, epoch: int) -> torch.Tensor:
        if self._perm[0] != epoch:
            if self.shuffle:
                g = torch.Generator().manual_seed(mix_seed(self.seed, epoch, 1))
                perm = torch.randperm(self.size, generator=g)
            else:
                perm = torch.arange(self.size)
            self._perm = (epoch, perm)
        return self._perm[1]

    def batch_at(self, it: int) -> List[Tuple[int, int]]:
        """The ``(index, item_seed)`` pairs of iteration ``it`` for this rank."""
        base = (it * self.world_size + self.rank) * self.batch_size
        out = []
        for j in range(self.batch_size):
            p = base + j
            epoch, pos = divmod(p, self.size)
            out.append((int(self._perm_of(epoch)[pos]), mix_seed(self.seed, p, 2)))
        return out

    def __iter__(self) -> Iterator[List[Tuple[int, int]]]:
        it = self.start_iter
        while True:
            yield self.batch_at(it)
            it += 1

    def __len__(self) -> int:  # infinite; DataLoader only needs __iter__
        raise TypeError("TrainingSampler is infinite")


class InferenceSampler(torch.utils.data.Sampler):
    """Finite, ordered shard of ``range(size)`` for ``rank`` (contiguous blocks, all items once)."""

    def __init__(self, size: int, rank: int = 0, world_size: int = 1):
        per = int(math.ceil(size / world_size))
        self.indices = list(range(rank * per, min(size, (rank + 1) * per)))

    def __iter__(self):
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


def build_loader(dataset, batch_size: int, shuffle: bool = True, seed: int = 0, num_workers: int = 0,
                 start_iter: int = 0, pixel_mean: Sequence[float] = (123.675, 116.28, 103.53),
                 pixel_std: Sequence[float] = (58.395, 57.12, 57.375), size_divisibility: int = 32,
                 train: bool = True, rank: Optional[int] = None, world_size: Optional[int] = None):
    """A DataLoader of collated batches.

    ``train=True``: infinite, deterministic and resumable (:class:`TrainingSampler`; ``batch_size`` is
    per rank).  ``train=False``: one ordered pass over this rank's shard.  ``rank``/``world_size``
    default to torch.distributed's when initialised, else 0/1."""
    if rank is None or world_size is None:
        dist = torch.distributed
        if dist.is_available() and dist.is_initialized():
            rank, world_size = dist.get_rank(), dist.get_world_size()
        else:
            rank, world_size = 0, 1
    fn = partial(collate, pixel_mean=pixel_mean, pixel_std=pixel_std, size_divisibility=size_divisibility)
    if train:
        sampler = TrainingSampler(len(dataset), batch_size, seed, start_iter, rank, world_size, shuffle)
        return torch.utils.data.DataLoader(dataset, batch_sampler=sampler, num_workers=num_workers, collate_fn=fn,
                                           persistent_workers=num_workers > 0)
    return torch.utils.data.DataLoader(dataset, batch_size=batch_size, sampler=InferenceSampler(len(dataset), rank,
                                       world_size), num_workers=num_workers, collate_fn=fn)
