"""Data for the DLRM trainer: the batch type and the random-data generator.

Every data source yields `Batch` objects: dense features, one flat `indices`
array holding the sparse ids of all tables (table-major), and one flat
`offsets` array of `num_tables * batch_size + 1` bag starts into it. This is
the KeyedJaggedTensor layout of TorchRec; the model consumes it directly.

    >>> ds = RandomDataset(dense_dim=4, table_sizes=[4, 3, 2], num_samples=6,
    ...                    batch_size=2, seed=123)
    >>> batch = ds[0]
    >>> batch.dense_x.shape, batch.offsets.shape
    (torch.Size([2, 4]), torch.Size([7]))

A dataset here is any object with `len(ds)` (number of batches) and `ds[j]`
(the j-th batch, a pure function of j so that workers, resumes and
distributed ranks all see the same batches).
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset


@dataclasses.dataclass
class Batch:
    """One mini-batch in the flat (KeyedJaggedTensor-like) layout.

    dense_x: [B, dense_dim] float32
    offsets: [T * B + 1] int64; bag (t, b) is indices[offsets[t*B + b]:offsets[t*B + b + 1]]
    indices: [N] int64 row ids, each relative to its own table
    target:  [B, 1] float32
    """

    dense_x: torch.Tensor
    offsets: torch.Tensor
    indices: torch.Tensor
    target: torch.Tensor

    @property
    def batch_size(self) -> int:
        return self.dense_x.shape[0]

    @property
    def num_tables(self) -> int:
        return (self.offsets.shape[0] - 1) // max(self.batch_size, 1)

    def to(self, device, non_blocking: bool = False) -> "Batch":
        return Batch(*(t.to(device, non_blocking=non_blocking) for t in self._tensors()))

    def pin_memory(self) -> "Batch":
        return Batch(*(t.pin_memory() for t in self._tensors()))

    def _tensors(self):
        return (self.dense_x, self.offsets, self.indices, self.target)

    # The original's per-table layout, for users' code and for printing.
    @property
    def lS_o(self) -> torch.Tensor:
        """[T, B] offsets, each table's relative to its own index list."""
        per_table = self.offsets[:-1].view(self.num_tables, self.batch_size)
        return per_table - per_table[:, :1]

    @property
    def lS_i(self) -> list[torch.Tensor]:
        starts = self.offsets[:: self.batch_size].tolist()
        return [self.indices[starts[t] : starts[t + 1]] for t in range(self.num_tables)]


def batch_from_tables(dense_x, per_table_lengths, per_table_indices, target) -> Batch:
    """Builds a Batch from per-table bag lengths ([B] each) and index arrays (NumPy)."""
    lengths = np.concatenate(per_table_lengths).astype(np.int64)
    offsets = np.zeros(lengths.size + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    indices = np.concatenate(per_table_indices).astype(np.int64, copy=False)
    return Batch(
        dense_x=torch.from_numpy(np.ascontiguousarray(dense_x, dtype=np.float32)),
        offsets=torch.from_numpy(offsets),
        indices=torch.from_numpy(indices),
        target=torch.from_numpy(np.ascontiguousarray(target, dtype=np.float32).reshape(-1, 1)),
    )


def batch_from_original(dense_x, lS_o, lS_i, target=None) -> Batch:
    """Converts the original's (X, lS_o, lS_i) layout to a Batch.

    lS_o: [T, B] tensor or list of T [B] tensors (per-table offsets);
    lS_i: list of T 1-D tensors or a [T, N] tensor (per-table indices).
    """
    batch_size = dense_x.shape[0]
    lS_i = list(lS_i)
    starts = [0]
    for idx in lS_i:
        starts.append(starts[-1] + idx.numel())
    offsets = [lS_o[t].reshape(-1).to(torch.int64) + starts[t] for t in range(len(lS_i))]
    end = torch.tensor([starts[-1]], dtype=torch.int64, device=dense_x.device)
    offsets = torch.cat([o.to(dense_x.device) for o in offsets] + [end])
    indices = torch.cat([i.reshape(-1).to(torch.int64) for i in lS_i]) if lS_i else end[:0]
    if target is None:
        target = torch.zeros(batch_size, 1)
    return Batch(dense_x, offsets, indices.to(dense_x.device), target)


# --------------------------------------------------------------------------- random data
RANDOM_DISTRIBUTIONS = ("uniform", "gaussian")


@dataclasses.dataclass
class RandomDataConfig:
    """The original's --rand-data-* and --num-indices-per-lookup* settings."""

    num_indices_per_lookup: int = 10
    num_indices_per_lookup_fixed: bool = False
    distribution: str = "uniform"
    rand_min: float = 0.0
    rand_max: float = 1.0
    rand_mu: float = -1.0
    rand_sigma: float = 1.0
    round_targets: bool = False


class RandomDataset(Dataset):
    """Random dense features, sparse lookups and targets, as the original's RandomDataset.

    Batch j is generated from its own seed (seed, split, j): vectorised, and the
    same whatever the order of access, the number of workers or a resume.
    - bag sizes: fixed `num_indices_per_lookup`, or round(max(1, U * min(rows, k)));
    - uniform ids: round(U * (rows - 1)); gaussian ids: N(mu, sigma) clipped to
      [rand_min, rand_max] (mu = -1 means their midpoint) and to the table;
    - ids are unique within a bag (sorted), so a bag may shrink, as in the original;
    - dense features U[0, 1), targets U[0, 1) (rounded with round_targets).
    """

    def __init__(self, dense_dim, table_sizes, num_samples, batch_size, seed=123,
                 config: RandomDataConfig | None = None, split: int = 0):
        self.dense_dim = int(dense_dim)
        self.table_sizes = [int(n) for n in table_sizes]
        self.num_samples = int(num_samples)
        self.batch_size = int(batch_size)
        self.seed = int(seed)
        self.split = int(split)
        self.config = config or RandomDataConfig()
        if self.config.distribution not in RANDOM_DISTRIBUTIONS:
            raise ValueError(f"--rand-data-dist={self.config.distribution} is not one of {', '.join(RANDOM_DISTRIBUTIONS)}")

    def __len__(self) -> int:
        return math.ceil(self.num_samples / self.batch_size)

    def samples_in_batch(self, j: int) -> int:
        return min(self.batch_size, self.num_samples - j * self.batch_size)

    def __getitem__(self, j: int) -> Batch:
        if not 0 <= j < len(self):
            raise IndexError(j)
        n = self.samples_in_batch(j)
        rng = np.random.default_rng([self.seed, self.split, j])
        dense_x = rng.random((n, self.dense_dim), dtype=np.float32)
        lengths, indices = [], []
        for rows in self.table_sizes:
            bag_lengths, bag_indices = self._lookups(rng, n, rows)
            lengths.append(bag_lengths)
            indices.append(bag_indices)
        target = rng.random((n, 1), dtype=np.float32)
        if self.config.round_targets:
            target = np.round(target)
        return batch_from_tables(dense_x, lengths, indices, target)

    def _lookups(self, rng, n, rows):
        cfg = self.config
        if cfg.num_indices_per_lookup_fixed:
            sizes = np.full(n, cfg.num_indices_per_lookup, dtype=np.int64)
        else:
            u = rng.random(n)
            sizes = np.round(np.maximum(1.0, u * min(rows, cfg.num_indices_per_lookup))).astype(np.int64)
        total = int(sizes.sum())
        if cfg.distribution == "uniform":
            ids = np.round(rng.random(total) * (rows - 1)).astype(np.int64)
        else:
            mu = (cfg.rand_max + cfg.rand_min) / 2.0 if cfg.rand_mu == -1 else cfg.rand_mu
            values = np.clip(rng.normal(mu, cfg.rand_sigma, total), cfg.rand_min, cfg.rand_max)
            ids = np.clip(values.astype(np.int64), 0, rows - 1)
        # unique ids within each bag: sort by (bag, id) and drop repeats
        bag = np.repeat(np.arange(n, dtype=np.int64), sizes)
        keys = np.sort(bag * rows + ids)  # sorted unique: np.unique's hashing is ~6x slower here
        keys = keys[np.concatenate(([True], keys[1:] != keys[:-1]))]
        return np.bincount(keys // rows, minlength=n), keys % rows


def make_loader(dataset, first_batch=0, num_workers=0, pin_memory=False):
    """Iterates dataset[first_batch:] (each item is a whole Batch) with optional workers."""
    return DataLoader(
        dataset,
        batch_size=None,
        sampler=range(first_batch, len(dataset)),
        num_workers=num_workers,
        pin_memory=pin_memory,
        persistent_workers=False,
    )
