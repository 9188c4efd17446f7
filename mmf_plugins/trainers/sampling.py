"""Resumable, sharded, seeded batch sampling for training.

``ResumableBatchSampler`` yields GLOBAL batches (MMF: ``training.batch_size`` is global) forever, one
dataset per batch, choosing the dataset with size-proportional probability (MMF's
``size_proportional`` multitasking) and each dataset's order from a permutation seeded by
``(seed, dataset, epoch)``. Every rank takes its slice ``[rank::world_size]`` of the global batch, so
``batch_size`` is split across devices. Its only state is the number of batches already consumed;
``start_batch`` fast-forwards without touching any data, which makes a resumed run read exactly the
batches the uninterrupted run would have read.

Each index is a ``SeededIndex``: an ``int`` carrying a seed derived from ``(seed, position)``, so a
dataset can reseed ``torch`` before processing the item and random processing (MLM masking, flips)
does not depend on the number of DataLoader workers or on where a run was resumed.
"""

from __future__ import annotations

import torch


class SeededIndex(int):
    """An index that carries the seed to process its item with."""

    def __new__(cls, value: int, seed: int):
        obj = super().__new__(cls, value)
        obj.seed = seed
        return obj

    def __reduce__(self):  # survive the trip to DataLoader workers
        return (SeededIndex, (int(self), self.seed))


class ResumableBatchSampler(torch.utils.data.Sampler):
    def __init__(self, sizes: list[int], batch_size: int, seed: int = 0, rank: int = 0, world_size: int = 1,
                 start_batch: int = 0, shuffle: bool = True, proportional: bool = True, end_batch: int | None = None):
        if batch_size < world_size or batch_size % world_size:
            raise ValueError(f"training.batch_size={batch_size} (global) must be a multiple of the number of "
                             f"processes {world_size}; set it to {max(world_size, batch_size // world_size * world_size)}")
        if not sizes or min(sizes) <= 0:
            raise ValueError(f"every training dataset must be non-empty, got sizes {sizes}")
        self.sizes = list(sizes)
        self.offsets = [sum(sizes[:i]) for i in range(len(sizes))]
        self.batch_size = batch_size
        self.seed = int(seed)
        self.rank, self.world_size = rank, world_size
        self.start_batch = int(start_batch)
        self.end_batch = end_batch  # stop after this many global batches (None: never)
        self.shuffle = shuffle
        self.proportional = proportional
        total = sum(sizes)
        self.weights = torch.tensor([s / total if proportional else 1.0 / len(sizes) for s in sizes], dtype=torch.float64)

    def batches_per_epoch(self) -> int:
        return max(1, sum(self.sizes) // self.batch_size)

    def _order(self, d: int, epoch: int) -> torch.Tensor:
        if not self.shuffle:
            return torch.arange(self.sizes[d])
        g = torch.Generator().manual_seed(self.seed * 1000003 + d * 7919 + epoch)
        return torch.randperm(self.sizes[d], generator=g)

    def __iter__(self):
        choice_gen = torch.Generator().manual_seed(self.seed * 31 + 17)
        cursor = [0] * len(self.sizes)
        epoch = [0] * len(self.sizes)
        orders = [self._order(d, 0) for d in range(len(self.sizes))]
        b = 0
        while self.end_batch is None or b < self.end_batch:
            d = int(torch.multinomial(self.weights, 1, generator=choice_gen)) if len(self.sizes) > 1 else 0
            take = []
            while len(take) < self.batch_size:
                if cursor[d] >= self.sizes[d] or (cursor[d] + self.batch_size - len(take) > self.sizes[d]
                                                  and self.sizes[d] >= self.batch_size and not take):
                    epoch[d] += 1
                    cursor[d] = 0
                    orders[d] = self._order(d, epoch[d])
                n = min(self.batch_size - len(take), self.sizes[d] - cursor[d])
                take.extend(orders[d][cursor[d]:cursor[d] + n].tolist())
                cursor[d] += n
            if b >= self.start_batch:
                mine = take[self.rank::self.world_size]
                # seed of an item = its position in the global stream: the same item gets the same seed
                # whatever the batch size, accumulation, number of processes or resume point
                base = self.seed * 1000003 + b * self.batch_size
                yield [SeededIndex(self.offsets[d] + i, (base + j * self.world_size + self.rank) % (2**62))
                       for j, i in enumerate(mine)]
            b += 1

    def __len__(self):
        return 2**62 if self.end_batch is None else max(0, self.end_batch - self.start_batch)
