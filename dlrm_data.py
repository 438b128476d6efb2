"""Data for the DLRM trainer: the batch type and the random-data generator.

Every data source yields `Batch` objects: dense features, the sparse ids of all
tables as one `dlrmkit.sparse.SparseFeatures` (a flat `indices` array, table-major,
and `num_tables * batch_size + 1` bag `offsets` into it: the KeyedJaggedTensor
layout of TorchRec), and targets. The model consumes the sparse part directly.

    >>> ds = RandomDataset(dense_dim=4, table_sizes=[4, 3, 2], num_samples=6,
    ...                    batch_size=2, seed=123)
    >>> batch = ds[0]
    >>> batch.dense_x.shape, batch.offsets.shape
    (torch.Size([2, 4]), torch.Size([7]))

A dataset here is any object with `len(ds)` (number of batches) and `ds[j]`
(the j-th batch, a pure function of j so that workers, resumes and
distributed ranks all see the same batches). A dataset whose batches change
from epoch to epoch (shuffled Criteo data) also has `set_epoch(epoch)`, which
the training loop calls first in every epoch; `ds[j]` is then a pure function
of (j, epoch).

Criteo data (`--data-generation=dataset`): `make_criteo_datasets(args)` runs or
reuses the preprocessing of `data_utils.py` and returns `CriteoDataset`s over
the processed arrays, held in memory, memory-mapped (`--memory-map`) or read
from the one-file-per-split binary format (`--mlperf-bin-loader`); all three
give identical batches.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import math
import os
import sys

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

import data_utils
from dlrmkit import kernels, memory, multihot
from dlrmkit.hashing import splitmix64
from dlrmkit.multihot import MultiHot
from dlrmkit.sparse import SparseFeatures


@dataclasses.dataclass
class Batch:
    """One mini-batch: dense features, the sparse ids of every table, targets.

    dense_x: [B, dense_dim] float32
    sparse:  `SparseFeatures`, the ids of T tables in the flat layout (indices + offsets)
    target:  [B, 1] float32

    In a distributed run a process's batch holds its share of the rows of the global batch
    (dense_x, target) and the ids of its own tables for every sample of it: `batch_size` counts
    the rows here, `global_batch_size` (= sparse.batch_size) those of the whole batch.
    """

    dense_x: torch.Tensor
    sparse: SparseFeatures
    target: torch.Tensor

    @property
    def batch_size(self) -> int:
        return self.dense_x.shape[0]

    @property
    def global_batch_size(self) -> int:
        return self.sparse.batch_size

    @property
    def num_tables(self) -> int:
        return self.sparse.num_tables

    @property
    def offsets(self) -> torch.Tensor:
        return self.sparse.offsets

    @property
    def indices(self) -> torch.Tensor:
        return self.sparse.indices

    def to(self, device, non_blocking: bool = False) -> "Batch":
        return Batch(self.dense_x.to(device, non_blocking=non_blocking), self.sparse.to(device, non_blocking),
                     self.target.to(device, non_blocking=non_blocking))

    def pin_memory(self) -> "Batch":
        return Batch(self.dense_x.pin_memory(), self.sparse.pin_memory(), self.target.pin_memory())

    def record_stream(self, stream) -> None:
        """Marks every tensor as used on `stream` (its memory is reused only after that use)."""
        self.dense_x.record_stream(stream)
        self.target.record_stream(stream)
        self.sparse.record_stream(stream)

    # The original's per-table layout, for users' code and for printing.
    @property
    def lS_o(self) -> torch.Tensor:
        """[T, B] offsets, each table's relative to its own index list."""
        return torch.stack([offsets for _, offsets, _ in self.sparse.tables()]) if self.num_tables else \
            self.offsets.new_zeros(0, self.global_batch_size)

    @property
    def lS_i(self) -> list[torch.Tensor]:
        return [indices for indices, _, _ in self.sparse.tables()]


def batch_from_tables(dense_x, per_table_lengths, per_table_indices, target) -> Batch:
    """A Batch from per-table bag lengths ([B] each) and index arrays (NumPy, any integer type), copied.
    ValueError for lists of different lengths."""
    if len(per_table_lengths) != len(per_table_indices):
        raise ValueError(f"batch_from_tables: {len(per_table_lengths)} tables of lengths, "
                         f"{len(per_table_indices)} of indices")
    lengths, indices = _concatenated(list(zip(per_table_lengths, per_table_indices)))
    dense_x = torch.from_numpy(np.ascontiguousarray(dense_x, dtype=np.float32))
    return Batch(dense_x, SparseFeatures.from_lengths(lengths, indices, dense_x.shape[0]), _targets(target))


def _concatenated(tables, copy: bool = True):
    """(lengths, ids), both int64, of consecutive tables' (lengths, ids) pairs (arrays or sequences): copied,
    but for one table's contiguous int64 arrays without `copy` (arrays the caller made for this)."""
    if not tables:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    if len(tables) == 1 and not copy:
        lengths, ids = tables[0]
        return np.ascontiguousarray(lengths, dtype=np.int64), np.ascontiguousarray(ids, dtype=np.int64)
    return (np.concatenate([lengths for lengths, _ in tables], dtype=np.int64, casting="unsafe"),
            np.concatenate([ids for _, ids in tables], dtype=np.int64, casting="unsafe"))


def batch_from_ids(dense_x, ids, target) -> Batch:
    """A Batch with exactly one id per table per sample: ids is [B, T] (NumPy)."""
    return Batch(torch.from_numpy(np.ascontiguousarray(dense_x, dtype=np.float32)),
                 SparseFeatures.one_hot(np.asarray(ids)), _targets(target))


def _targets(target) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(target, dtype=np.float32).reshape(-1, 1))


# --------------------------------------------------------------------------- random data
RANDOM_DISTRIBUTIONS = ("uniform", "gaussian")
# random bags of consecutive tables share one padded matrix while it holds at most this many times the cells of
# each table padded to its own widest bag, or at most SMALL_GROUP_CELLS (then one call beats several)
GROUP_PADDING = 1.25
SMALL_GROUP_CELLS = 1 << 16


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

    def bag_sizes(self, rng: np.random.Generator, n: int, rows: int) -> np.ndarray:
        """[n] int64 numbers of ids drawn for n bags of a `rows`-row table: num_indices_per_lookup (fixed),
        else round(max(1, U * min(rows, num_indices_per_lookup))) with U from `rng` (n doubles)."""
        if self.num_indices_per_lookup_fixed:
            return np.full(n, self.num_indices_per_lookup, dtype=np.int64)
        u = rng.random(n)
        return np.round(np.maximum(1.0, u * min(rows, self.num_indices_per_lookup))).astype(np.int64)


def _unique_within_bags(ids, sizes, rows):
    """(lengths [n] int64, ids) of bags of `sizes` consecutive `ids` in [0, rows) with repeats dropped and each
    bag's ids sorted (NumPy arrays: lengths int64; ids int64 from the native kernels, else int32 when `rows`
    fits, else int64)."""
    n = len(sizes)
    width = int(sizes.max()) if n else 0
    if n == 0 or width == 0:
        return np.zeros(n, np.int64), ids[:0]
    ids = ids.astype(kernels.id_dtype(rows), copy=False)  # half the bytes to sort where int32 holds them
    full = int(sizes.min()) == width
    if full:
        bags = ids.reshape(n, width)
    else:
        bags = kernels.pad_bags(ids, sizes, width, rows)
        if bags is None:
            bags = np.full((n, width), rows, dtype=ids.dtype)
            bags[np.arange(width) < sizes[:, None]] = ids
    return _distinct_within_bags(bags, full, rows)


def _gaussian_bags(values, sizes, rows):
    """(lengths [n] int64, ids int64) of bags of `sizes` consecutive gaussian `values` (float64, clipped): as the
    original's np.unique(values).astype(int64), each bag's distinct values sorted, then truncated to ids, so
    values that truncate alike give repeated ids. ValueError for an id outside [0, rows)."""
    n = len(sizes)
    width = int(sizes.max()) if n else 0
    if n == 0 or width == 0:
        return np.zeros(n, np.int64), np.zeros(0, np.int64)
    bags = np.full((n, width), np.inf)
    bags[np.arange(width) < sizes[:, None]] = values
    bags.sort(axis=1)
    keep = np.isfinite(bags)
    keep[:, 1:] &= bags[:, 1:] != bags[:, :-1]
    ids = bags[keep].astype(np.int64)
    if ids.size and (ids.min() < 0 or ids.max() >= rows):
        raise ValueError(f"gaussian ids {ids.min()} .. {ids.max()} outside a table of {rows} rows")
    return keep.sum(axis=1, dtype=np.int64), ids


def _distinct_within_bags(bags, full, pad):
    """(lengths [n] int64, ids) of the bags in the rows of the [n, width] matrix `bags`, each row bag b's ids
    then `pad` (above every id) in the rest (none if `full`), with repeats dropped and each bag's ids sorted.
    Sorts `bags` in place: row by row, many short sorts, ~7x faster than one sort of (bag, id) keys."""
    bags.sort(axis=1)
    native = kernels.distinct_sorted_bags(bags, pad)
    if native is not None:
        return native
    repeats = bags[:, 1:] == bags[:, :-1]
    if full and not repeats.any():  # the common case of few draws from a large table: nothing to drop
        return np.full(len(bags), bags.shape[1], dtype=np.int64), bags.reshape(-1)
    keep = np.empty(bags.shape, dtype=bool)
    keep[:, 0] = True
    np.logical_not(repeats, out=keep[:, 1:])
    if not full:
        keep &= bags < pad
    return keep.sum(axis=1, dtype=np.int64), bags[keep]


def _uniform_ids(rng: np.random.Generator, count: int, rows: int) -> np.ndarray:
    """`count` uniform ids rint(U * (rows - 1)) of a `rows`-row table drawn by `rng` with NumPy (int32 where
    `kernels.id_dtype(rows)` is), the numbers `kernels.uniform_bags` draws."""
    draws = rng.random(count)
    draws *= rows - 1
    return np.rint(draws, out=draws).astype(kernels.id_dtype(rows))  # rint: np.round's half-to-even


class RandomDataset(Dataset):
    """Random dense features, sparse lookups and targets, as the original's RandomDataset.

    Batch j is drawn from its own stream, np.random.default_rng([seed, split, j]): vectorised, and
    the same whatever the order of access, the number of workers or a resume. In stream order:
    - dense features U[0, 1) (float32 draws);
    - for each table, its bag sizes: fixed `num_indices_per_lookup`, or round(max(1, U * min(rows, k)));
      then its ids: uniform rint(U * (rows - 1)), or gaussian N(mu, sigma) clipped to
      [rand_min, rand_max] (mu = -1 means their midpoint), each bag's distinct values truncated to ids
      (repeats possible, as the original's np.unique before the cast);
    - targets U[0, 1) (float32 draws; rounded with round_targets).
    Uniform ids are unique within a bag (sorted), so a bag may shrink, as in the original. The native kernels
    draw the dense features and the uniform ids (`kernels.pcg64_random_f32`, `kernels.uniform_bags`; on
    PyTorch's threads from `kernels.RANDOM_OPENMP_MIN_WORDS` draws, each thread from its own place in
    the stream): the same numbers as NumPy's.
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
        if not all(1 <= rows < 2**63 for rows in self.table_sizes):
            raise ValueError(f"RandomDataset: every table needs 1 to 2^63 - 1 rows, not {self.table_sizes}")
        if self.config.num_indices_per_lookup < 0:
            raise ValueError(f"RandomDataset: {self.config.num_indices_per_lookup} ids per lookup")
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
        dense_x = kernels.pcg64_random_f32(rng.bit_generator, n * self.dense_dim)
        if dense_x is None:
            dense_x = rng.random(n * self.dense_dim, dtype=np.float32)
        lengths, indices = self._lookups(rng, n)
        target = rng.random((n, 1), dtype=np.float32)
        if self.config.round_targets:
            target = np.round(target)
        return Batch(torch.from_numpy(dense_x.reshape(n, self.dense_dim)),
                     SparseFeatures.from_lengths(lengths, indices, n), _targets(target))

    def _lookups(self, rng, n):
        """(lengths [T * n] int64, ids) of every table's n bags, table-major. For each table in turn `rng` draws
        the bag sizes, then the ids; where the native kernels draw uniform ids, each table's place in the stream
        is noted and its ids are drawn after the loop (`_uniform_bags_natively`)."""
        cfg = self.config
        bit_generator = rng.bit_generator
        natively = cfg.distribution == "uniform" and kernels.pcg64_native()
        sizes, ids, states = [], [], []
        for rows in self.table_sizes:
            sizes.append(cfg.bag_sizes(rng, n, rows))
            count = int(sizes[-1].sum())
            if natively:
                states.append(kernels.pcg64_skip(bit_generator, count))
            elif cfg.distribution == "uniform":
                ids.append(_uniform_ids(rng, count, rows))
            else:
                mu = (cfg.rand_max + cfg.rand_min) / 2.0 if cfg.rand_mu == -1 else cfg.rand_mu
                ids.append(np.clip(rng.normal(mu, cfg.rand_sigma, count), cfg.rand_min, cfg.rand_max))
        if natively:
            return self._uniform_bags_natively(sizes, states, bit_generator.state["state"]["inc"], n)
        if cfg.distribution == "gaussian":
            return _concatenated([_gaussian_bags(values, bag_sizes, rows)
                                  for values, bag_sizes, rows in zip(ids, sizes, self.table_sizes)], copy=False)
        return _concatenated([_unique_within_bags(*table) for table in zip(ids, sizes, self.table_sizes)], copy=False)

    def _uniform_bags_natively(self, sizes, states, inc, n):
        """_lookups' (lengths, ids) of uniform ids drawn by `kernels.uniform_bags` from the tables' `states`.
        Consecutive tables share one matrix padded to their widest bag (one kernel call, sort and duplicate
        removal) while that costs at most GROUP_PADDING times their own widths, or is small, and their ids
        have one type (int32 or int64: `kernels.id_dtype`)."""
        widths = [int(bag_sizes.max()) for bag_sizes in sizes]
        id_types = [kernels.id_dtype(rows) for rows in self.table_sizes]
        groups = []  # [first table, end, width, sum of the tables' own widths]
        for t, width in enumerate(widths):
            if groups and id_types[t] == id_types[groups[-1][0]]:
                first, _, group_width, own = groups[-1]
                padded = n * max(group_width, width) * (t + 1 - first)
                if padded <= max(GROUP_PADDING * n * (own + width), SMALL_GROUP_CELLS):
                    groups[-1] = [first, t + 1, max(group_width, width), own + width]
                    continue
            groups.append([t, t + 1, width, width])
        tables = []
        for first, end, width, _ in groups:
            rows = self.table_sizes[first:end]
            group_sizes = np.concatenate(sizes[first:end])
            pad = max(rows)  # above every id of these tables
            bags = kernels.uniform_bags(group_sizes, n, states[first:end], inc, rows, width, pad)
            tables.append(_distinct_within_bags(bags, int(group_sizes.min()) == width, pad))
        return _concatenated(tables, copy=False)


class OneHotDataset(Dataset):
    """Batches of in-memory arrays with one id per table: dense [n, d], ids [n, T], labels [n] (NumPy).

    Batch j holds rows [j * batch_size, (j + 1) * batch_size), the last one possibly fewer; the
    dense features are used as given (float32)."""

    def __init__(self, dense, ids, labels, batch_size: int):
        self.dense, self.ids, self.labels = dense, ids, labels
        self.batch_size = int(batch_size)
        self.num_samples = len(labels)

    def __len__(self) -> int:
        return math.ceil(self.num_samples / self.batch_size)

    def __getitem__(self, j: int) -> Batch:
        if not 0 <= j < len(self):
            raise IndexError(j)
        rows = slice(j * self.batch_size, (j + 1) * self.batch_size)
        return batch_from_ids(self.dense[rows], self.ids[rows], self.labels[rows])


class MultiHotDataset(Dataset):
    """`dataset` (one id per table and sample) with each id expanded into its multi-hot bag
    (`dlrmkit.multihot.MultiHot`) in `__getitem__`, so that DataLoader workers expand in parallel.

    Batch j is the expansion of dataset[j]: the same dense features, targets and first id of every
    bag. Every other attribute (set_epoch, samples_in_batch, fingerprint, num_samples, ...) is the
    wrapped dataset's; `dataset` is the wrapped dataset (so a batch's first samples are skipped in it,
    see skip_within_batch).
    """

    def __init__(self, dataset, multi_hot: MultiHot):
        self.dataset, self.multi_hot = dataset, multi_hot

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, j) -> Batch:
        batch = self.dataset[j]
        return dataclasses.replace(batch, sparse=self.multi_hot.expand_sparse(batch.sparse))

    def __getattr__(self, name):
        if name in ("dataset", "multi_hot") or name.startswith("__"):  # not set yet (unpickling)
            raise AttributeError(name)
        return getattr(self.dataset, name)


def with_multi_hot(dataset, multi_hot: MultiHot | None):
    """`dataset` expanded by `multi_hot` (MultiHotDataset), or itself when multi_hot is None (one-hot)."""
    return dataset if multi_hot is None else MultiHotDataset(dataset, multi_hot)


def make_loader(dataset, first_batch=0, num_workers=0, pin_memory=False):
    """Iterates dataset[first_batch:] (each item is a whole Batch) with optional workers.

    Without workers or pinning the batches come straight from the dataset (what a DataLoader
    would yield, without its per-batch bookkeeping on the training loop's time)."""
    if num_workers == 0 and not pin_memory:
        return (dataset[j] for j in range(first_batch, len(dataset)))
    return DataLoader(
        dataset,
        batch_size=None,
        sampler=range(first_batch, len(dataset)),
        num_workers=num_workers,
        pin_memory=pin_memory,
        persistent_workers=False,
    )


def batch_tail(batch: Batch, keep: int) -> Batch:
    """The last `keep` samples of a whole (not distributed) batch: their dense rows, bags and targets."""
    first = batch.batch_size - keep
    return Batch(batch.dense_x[first:], batch.sparse.last_samples(keep), batch.target[first:])


class _SkipWithinBatch(Dataset):
    """`dataset` with the first `skip` samples of batch `j` left out."""

    def __init__(self, dataset, j, skip):
        self.dataset, self.j, self.skip = dataset, int(j), int(skip)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, k) -> Batch:
        if k != self.j:
            return self.dataset[k]
        if hasattr(self.dataset, "batch_of_rows"):  # Criteo batches hold their rows sorted: skip positions
            return self.dataset.batch_of_rows(self.dataset.rows_of_batch(k, self.skip))
        batch = self.dataset[k]
        return batch_tail(batch, batch.batch_size - self.skip)


def skip_within_batch(dataset, j: int, skip: int):
    """`dataset` whose batch j starts at its sample `skip` (a run resumed inside a batch: the samples
    before were trained under another batch size); `dataset` itself when skip is 0. A distributed
    process's shard (it has `.dataset`) gets the global batch shortened before its share is cut."""
    if skip <= 0:
        return dataset
    inner = getattr(dataset, "dataset", None)
    if inner is not None:
        view = copy.copy(dataset)
        view.dataset = skip_within_batch(inner, j, skip)
        return view
    return _SkipWithinBatch(dataset, j, skip)


# --------------------------------------------------------------------------- Criteo data
class FeistelPermutation:
    """A pseudo-random permutation of [0, n), computed element by element.

    A keyed 4-round Feistel network permutes the smallest 2^(2h) >= n; values that land
    outside [0, n) are encrypted again until they fall inside (cycle walking), which keeps
    it a permutation of [0, n). Nothing of size n is stored, so any worker, resumed run or
    rank computes the rows of any batch on its own, for a split of any size.
    """

    ROUNDS = 4

    def __init__(self, n: int, seed_words):
        self.n = int(n)
        self.half_bits = max(1, (max(1, self.n - 1).bit_length() + 1) // 2)
        self.mask = np.uint64((1 << self.half_bits) - 1)
        self.keys = np.random.SeedSequence(list(seed_words)).generate_state(self.ROUNDS, dtype=np.uint64)

    def _encrypt(self, x):
        shift = np.uint64(self.half_bits)
        left, right = x >> shift, x & self.mask
        for key in self.keys:
            left, right = right, left ^ (splitmix64(right ^ key) & self.mask)
        return (left << shift) | right

    def __call__(self, positions) -> np.ndarray:
        x = self._encrypt(np.asarray(positions, dtype=np.uint64))
        outside = np.flatnonzero(x >= self.n)
        while len(outside):
            x[outside] = self._encrypt(x[outside])
            outside = outside[x[outside] >= self.n]
        return x.astype(np.int64)


class ArrayPart:
    """Rows of label [n], dense [n, 13] and sparse [n, 26] arrays held in memory."""

    id_modulus = 0

    def __init__(self, label, dense, sparse):
        self.label, self.dense, self.sparse = label, dense, sparse
        self.rows = len(label)

    def arrays(self):
        return self.label, self.dense, self.sparse


class MappedPart:
    """Rows [start, stop) of processed files, memory-mapped on first use in each process.

    Pickles as file names (not data), so DataLoader workers open their own maps whatever
    the multiprocessing start method. kind "npy": day_<d>_{label,dense,sparse}.npy files;
    kind "bin": one file of int32 records [label, 13 integers, 26 ids]. `id_modulus` M > 0: the ids are folded
    into [0, M) when read (the original's .bin files hold its dictionaries' ids, folded when used).
    """

    def __init__(self, kind, paths, start, stop, id_modulus: int = 0):
        self.kind, self.paths, self.start, self.stop = kind, paths, int(start), int(stop)
        self.id_modulus = int(id_modulus)
        self.rows = self.stop - self.start
        self._arrays = None

    def arrays(self):
        if self._arrays is None:
            if self.kind == "bin":
                records = np.memmap(self.paths[0], dtype=np.int32, mode="r").reshape(-1, data_utils.NUM_FIELDS)
                arrays = records[:, 0], records[:, 1 : 1 + data_utils.NUM_DENSE], records[:, 1 + data_utils.NUM_DENSE :]
            else:
                arrays = tuple(np.load(p, mmap_mode="r") for p in self.paths)
            self._arrays = tuple(a[self.start : self.stop] for a in arrays)
        return self._arrays

    def __getstate__(self):
        return {**self.__dict__, "_arrays": None}


def criteo_batch(label, dense, sparse, multi_hot: MultiHot | None = None) -> Batch:
    """A Batch from gathered rows: dense features log(x + 1) in float32 as the original; `sparse` one id
    per bag [n, 26], or with `multi_hot` materialized bags [n, sum(sizes)] (`MultiHot.from_rows`)."""
    return Batch(
        dense_x=torch.log(torch.from_numpy(np.asarray(dense, dtype=np.float32)) + 1.0),
        sparse=multi_hot.from_rows(sparse) if multi_hot is not None else SparseFeatures.one_hot(sparse),
        target=_targets(label),
    )


class CriteoDataset(Dataset):
    """Batches of one split of Criteo data, gathered from array parts (days, files).

    Batch j holds rows order(j*B), ..., order(j*B + B - 1) of the split (the last batch may be
    smaller), where `order` depends on `randomize`: "none" keeps the file order, "day" permutes
    the rows within each day, "total" permutes all rows; permutations are drawn from
    (seed, epoch), so each epoch is shuffled anew and reproducibly. With `shuffle_batches`
    (the original's --mlperf-bin-shuffle) the batches also come in an order drawn from
    (seed, epoch). ds[j] is a pure function of (j, epoch). With `multi_hot` the parts' sparse arrays
    hold materialized multi-hot bags ([rows, sum(sizes)], data_utils.write_multi_hot).
    """

    def __init__(self, parts, batch_size, randomize="none", seed=123, day_rows=None, shuffle_batches=False,
                 multi_hot: MultiHot | None = None):
        if randomize not in ("none", "day", "total"):
            raise ValueError(f"--data-randomize={randomize} is not one of none, day, total")
        self.parts = list(parts)
        self.part_starts = np.concatenate([[0], np.cumsum([p.rows for p in self.parts])]).astype(np.int64)
        self.num_rows = int(self.part_starts[-1])
        self.batch_size = int(batch_size)
        self.randomize, self.seed, self.shuffle_batches = randomize, int(seed), bool(shuffle_batches)
        self.multi_hot = multi_hot
        day_rows = list(day_rows) if day_rows is not None else [self.num_rows]
        if sum(day_rows) != self.num_rows:
            raise ValueError(f"day sizes {day_rows} do not add up to the {self.num_rows} rows of the split")
        self.day_starts = np.concatenate([[0], np.cumsum(day_rows)]).astype(np.int64)
        self.set_epoch(0)

    def set_epoch(self, epoch: int):
        self.epoch = int(epoch)
        self._batch_order = None
        if self.randomize == "total":
            self._permutations = [FeistelPermutation(self.num_rows, [self.seed, self.epoch, 0])]
        elif self.randomize == "day":
            day_rows = np.diff(self.day_starts)
            self._permutations = [FeistelPermutation(rows, [self.seed, self.epoch, 1, d])
                                  for d, rows in enumerate(day_rows)]

    def __len__(self) -> int:
        return math.ceil(self.num_rows / self.batch_size)

    def samples_in_batch(self, j: int) -> int:
        return min(self.batch_size, self.num_rows - self._batch_position(j) * self.batch_size)

    def _batch_position(self, j: int) -> int:
        """Which B-row slice of the (permuted) split batch j is."""
        if not self.shuffle_batches:
            return j
        if self._batch_order is None:
            self._batch_order = np.random.default_rng([self.seed, self.epoch, 2]).permutation(len(self))
        return int(self._batch_order[j])

    def fingerprint(self, samples: int = 256) -> str:
        """A short digest of the split's size and of `samples` rows spread evenly over it (label, dense,
        sparse): tells two data sets apart (other files, reordered rows) without reading them whole, the
        same whichever loader holds the rows. Of multi-hot bags it takes the first id, the one-hot id, so
        a materialized set has the digest of the one-hot set it expands."""
        positions = np.unique(np.linspace(0, max(self.num_rows - 1, 0), samples).astype(np.int64))
        batch = self.batch_of_rows(positions) if self.num_rows else None
        digest = hashlib.sha1(str(self.num_rows).encode())
        first_ids = batch.sparse.indices[batch.sparse.offsets[:-1]] if batch is not None else None  # one-hot ids
        for tensor in ((batch.dense_x, first_ids, batch.target) if batch is not None else ()):
            digest.update(tensor.numpy().tobytes())
        return digest.hexdigest()[:12]

    def rows_of_batch(self, j: int, skip: int = 0) -> np.ndarray:
        """Rows of the split in batch j, sorted (the order within a batch does not matter); with `skip`,
        without the rows of its first `skip` positions."""
        if not 0 <= j < len(self):
            raise IndexError(j)
        first = self._batch_position(j) * self.batch_size
        positions = np.arange(first + skip, min(first + self.batch_size, self.num_rows), dtype=np.int64)
        if self.randomize == "total":
            rows = self._permutations[0](positions)
        elif self.randomize == "day":
            days = np.searchsorted(self.day_starts, positions, side="right") - 1
            rows = positions.copy()
            for d in np.unique(days):
                mine = days == d
                rows[mine] = self.day_starts[d] + self._permutations[d](positions[mine] - self.day_starts[d])
        else:
            return positions
        rows.sort()
        return rows

    def __getitem__(self, j: int) -> Batch:
        return self.batch_of_rows(self.rows_of_batch(j))

    def batch_of_rows(self, rows) -> Batch:
        """The Batch of these rows of the split (sorted)."""
        bounds = np.searchsorted(rows, self.part_starts)
        pieces = []
        for k, part in enumerate(self.parts):
            local = rows[bounds[k] : bounds[k + 1]] - self.part_starts[k]
            if len(local) == 0:
                continue
            if local[-1] - local[0] + 1 == len(local):  # contiguous rows: a slice reads less
                local = slice(int(local[0]), int(local[-1]) + 1)
            label, dense, sparse = (a[local] for a in part.arrays())
            pieces.append([label, dense, np.remainder(sparse, part.id_modulus) if part.id_modulus else sparse])
        label, dense, sparse = (np.concatenate(p) if len(pieces) > 1 else p[0] for p in zip(*pieces))
        return criteo_batch(label, dense, sparse, self.multi_hot)


@dataclasses.dataclass
class CriteoData:
    """Parts and day sizes of each split (train, test, val) and the embedding table sizes; `multi_hot`:
    the expansion that the parts' sparse arrays hold already (a materialized set), else None; `shuffled`:
    the rows were shuffled when written (the original's .bin files): read in order, --data-randomize aside."""

    parts: dict
    day_rows: dict
    table_sizes: list
    multi_hot: MultiHot | None = None
    shuffled: bool = False


def _split_day_rows(ranges):
    return [stop - start for _, start, stop in ranges]


def open_criteo(args, splits=("train", "test", "val"), log=print, progress=True) -> CriteoData:
    """The processed data named by the flags, preprocessing the raw data when needed.

    --processed-data-file naming an existing .npz: the original's processed file; with --mlperf-bin-loader
    and Terabyte data, the original's .bin files of that name when they exist (`_open_original_bin`).
    Otherwise our processed directory (see data_utils.py), built from --raw-data-file if
    missing or stale; then held in memory, memory-mapped, or as .bin files."""
    processed_file = args.processed_data_file
    if args.mlperf_bin_loader:
        original_bins = data_utils.original_bin_files(processed_file, args.raw_data_file, args.data_set)
        if original_bins is not None:
            return _open_original_bin(args, original_bins, splits, log)
    if args.memory_map:  # as the original: its --memory-map day files, when there, before any other data
        reordered = data_utils.original_reordered_files(args.raw_data_file, args.data_set)
        if reordered is not None:
            if not reordered["missing"] or not data_utils.raw_data_usable(args.raw_data_file, args.data_set):
                return _open_original_reordered(args, reordered, splits, log, progress)
            _note(f"note: the original's --memory-map files of {args.raw_data_file} are incomplete "
                  f"({reordered['missing']} not found): the raw data is preprocessed instead")
    if processed_file.endswith(".npz") and os.path.isfile(processed_file):
        return _open_original_npz(args, splits, log)
    out_dir = data_utils.processed_dir(processed_file, args.raw_data_file, args.data_set)
    if processed_file and data_utils.read_multi_hot_metadata(out_dir) is not None:
        return _open_multi_hot(args, out_dir, splits, log, progress)
    workers = os.cpu_count() if args.dataset_multiprocessing else 1
    processed = data_utils.preprocess(args.raw_data_file, out_dir, args.data_set, args.max_ind_range,
                                      args.data_sub_sample_rate, workers, log=log, progress=progress)
    return _processed_data(args, processed, splits, log, progress)


def _processed_data(args, processed, splits, log, progress, id_modulus=0, shuffled=False) -> CriteoData:
    """The splits of a processed set: as .bin files with --mlperf-bin-loader (written once), memory-mapped with
    --memory-map, else loaded in memory; `id_modulus` M > 0 folds the ids into [0, M) when read."""
    splits = {name: ranges for name, ranges in data_utils.split_days(processed.day_rows).items() if name in splits}
    if args.mlperf_bin_loader:
        paths = data_utils.write_bin_files(processed, log=log)
        parts = {name: [MappedPart("bin", [paths[name]], 0, sum(_split_day_rows(r)), id_modulus)]
                 for name, r in splits.items()}
    elif args.memory_map:
        parts = {name: [MappedPart("npy", [processed.day_file(d, k) for k in ("label", "dense", "sparse")], start, stop,
                                   id_modulus) for d, start, stop in ranges] for name, ranges in splits.items()}
    else:
        assert not id_modulus
        parts = {name: [_load_in_memory(processed, ranges, name, progress)] for name, ranges in splits.items()}
    counts = [min(c, id_modulus) if id_modulus else c for c in processed.counts]
    return CriteoData(parts, {name: _split_day_rows(r) for name, r in splits.items()}, counts, shuffled=shuffled)


def _load_in_memory(processed, ranges, split, progress, sparse_kind="sparse", sparse_width=data_utils.NUM_SPARSE):
    from tqdm import tqdm

    rows = sum(stop - start for _, start, stop in ranges)
    label = np.empty(rows, dtype=np.uint8)
    dense = np.empty((rows, data_utils.NUM_DENSE), dtype=np.int32)
    sparse = np.empty((rows, sparse_width), dtype=np.int32)
    first = 0
    quiet = not progress or rows < 1 << 22
    with tqdm(desc=f"load {split}", total=rows, unit=" rows", unit_scale=True, disable=quiet) as bar:
        for day, start, stop in ranges:
            for target, kind in ((label, "label"), (dense, "dense"), (sparse, sparse_kind)):
                target[first : first + stop - start] = np.load(processed.day_file(day, kind), mmap_mode="r")[start:stop]
            first += stop - start
            bar.update(stop - start)
    return ArrayPart(label, dense, sparse)


def check_multi_hot_flags(args, out_dir: str, metadata: dict):
    """Raises DataError (one line) when the data or multi-hot flags disagree with the materialized
    multi-hot set in `out_dir` (its metadata.json `metadata`); flags left at their default agree."""
    source, recorded = metadata["source"], metadata["multi_hot"]
    where = f"--processed-data-file {out_dir}"
    if recorded.get("scheme") != multihot.SCHEME:
        raise data_utils.DataError(f"{where}: multi-hot data written by another version of this program "
                                   "(rerun python data_utils.py multi-hot)")
    given = {"--data-set": (args.data_set, source["data_set"]),  # flags left at their default are not compared
             "--max-ind-range": (args.max_ind_range if args.max_ind_range > 0 else None, source["max_ind_range"]),
             "--data-sub-sample-rate": (args.data_sub_sample_rate or None, source["sub_sample_rate"])}
    for flag, (value, saved) in given.items():
        if value is not None and value != saved:
            raise data_utils.DataError(f"{where}: multi-hot data of {flag}={saved}, but {flag}={value} was given")
    if args.multi_hot_sizes:
        try:
            sizes = multihot.sizes_per_table(args.multi_hot_sizes, data_utils.NUM_SPARSE)
        except ValueError as e:
            raise data_utils.DataError(str(e))
        if sizes != recorded["sizes"] or args.multi_hot_distribution_type != recorded["distribution"]:
            raise data_utils.DataError(
                f"{where}: holds multi-hot data of sizes {'-'.join(map(str, recorded['sizes']))} "
                f"({recorded['distribution']}), but --multi-hot-sizes={'-'.join(map(str, sizes))} "
                f"--multi-hot-distribution-type={args.multi_hot_distribution_type} were given")
    elif args.multi_hot_distribution_type not in ("uniform", recorded["distribution"]):
        raise data_utils.DataError(f"{where}: holds {recorded['distribution']} multi-hot data, but "
                                   f"--multi-hot-distribution-type={args.multi_hot_distribution_type} was given")
    if args.mlperf_bin_loader:
        raise data_utils.DataError(f"--mlperf-bin-loader: not available for multi-hot data ({where}); "
                                   "its .npy files are memory-mapped with --memory-map")


def _open_multi_hot(args, out_dir, splits, log, progress) -> CriteoData:
    """A materialized multi-hot set (data_utils.write_multi_hot), its settings checked against the flags."""
    metadata = data_utils.read_multi_hot_metadata(out_dir)
    check_multi_hot_flags(args, out_dir, metadata)
    recorded = metadata["multi_hot"]
    where = f"--processed-data-file {out_dir}"
    processed = data_utils.ProcessedData(out_dir, metadata)
    damage = data_utils.multi_hot_damage(processed)
    if damage:
        raise data_utils.DataError(f"{where}: damaged multi-hot data ({damage}); rerun python data_utils.py multi-hot")
    multi_hot = MultiHot(recorded["sizes"], processed.counts, recorded["distribution"], recorded["seed"])
    unchecked = ""
    if args.raw_data_file:  # the set records the raw files it was built from
        try:
            sources = data_utils.raw_day_files(args.raw_data_file, metadata["source"]["data_set"])
        except data_utils.DataError as missing:
            unchecked = f"; not checked against the raw data: {missing}"
        else:
            now = data_utils.settings_for(metadata["source"]["data_set"], sources, metadata["source"]["max_ind_range"],
                                          metadata["source"]["sub_sample_rate"])
            if now["sources"] != metadata["source"].get("sources"):
                raise data_utils.DataError(
                    f"{where}: built from other raw data than --raw-data-file {args.raw_data_file} "
                    f"({data_utils.describe_change(metadata['source'], now)}); rerun python data_utils.py multi-hot")
    log(f"Reading multi-hot data={out_dir} ({recorded['distribution']}, {multi_hot.ids_per_sample} ids per sample"
        f"{unchecked})")
    splits = {name: ranges for name, ranges in data_utils.split_days(processed.day_rows).items() if name in splits}
    if not args.memory_map:  # a multi-hot set is ~15x its one-hot set: loaded whole only when it fits
        rows = sum(stop - start for ranges in splits.values() for _, start, stop in ranges)
        needed = rows * (1 + 4 * (data_utils.NUM_DENSE + multi_hot.ids_per_sample))
        usable, limited_by = memory.usable_memory()
        if needed > usable // 2:
            raise data_utils.DataError(
                f"{where}: loading its {rows} rows takes {memory.gib(needed)} but this process may use "
                f"{memory.gib(usable)} ({limited_by}); add --memory-map to read them from the files")
    if args.memory_map:
        parts = {name: [MappedPart("npy", [processed.day_file(d, k) for k in ("label", "dense", "multihot")],
                                   start, stop) for d, start, stop in ranges] for name, ranges in splits.items()}
    else:
        parts = {name: [_load_in_memory(processed, ranges, name, progress, "multihot", multi_hot.ids_per_sample)]
                 for name, ranges in splits.items()}
    return CriteoData(parts, {name: _split_day_rows(r) for name, r in splits.items()}, list(processed.counts),
                      multi_hot)


def _note(line: str) -> None:
    """A note on stderr, from one process of a distributed run (each reads the same data)."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()) or torch.distributed.get_rank() == 0:
        print(line, file=sys.stderr)


def _note_rows_as_kept(args, what: str) -> None:
    """The data flags that act at preprocessing and have no effect on the original's `what` (.npz or .bin)."""
    if args.data_sub_sample_rate > 0:
        _note(f"note: --data-sub-sample-rate has no effect on the original's {what}: the rows its preprocessing "
              "kept are read")


def _open_original_npz(args, splits, log) -> CriteoData:
    path = args.processed_data_file
    log(f"Reading the original's processed data={path}")
    label, dense, sparse, counts, day_rows = data_utils.load_original_npz(
        path, args.raw_data_file, args.data_set, args.data_sub_sample_rate, note=_note)
    _note_rows_as_kept(args, ".npz")  # sub-sampled when it was written (its day counts checked above)
    if args.max_ind_range > 0:  # as the original: ids folded into [0, M) when the data is used
        np.remainder(sparse, args.max_ind_range, out=sparse)
        counts = [min(c, args.max_ind_range) for c in counts]
    # with both, --memory-map was noted as having no effect with --mlperf-bin-loader
    flag = "--mlperf-bin-loader" if args.mlperf_bin_loader else "--memory-map" if args.memory_map else None
    if flag:
        _note(f"note: {flag} has no effect with the original's .npz (compressed: it is loaded in memory)")
    starts = np.concatenate([[0], np.cumsum(day_rows)])
    parts, rows = {}, {}
    for name, ranges in data_utils.split_days(day_rows).items():
        if name not in splits:
            continue
        lo = int(starts[ranges[0][0]] + ranges[0][1])
        hi = int(starts[ranges[-1][0]] + ranges[-1][2])
        parts[name] = [ArrayPart(label[lo:hi], dense[lo:hi], sparse[lo:hi])]
        rows[name] = _split_day_rows(ranges)
    return CriteoData(parts, rows, counts)


ORIGINAL_REORDERED_DIR = "original-memory-map"  # in our processed data's folder: the conversion of the original's


def _open_original_reordered(args, files, splits, log, progress) -> CriteoData:
    """The original's --memory-map day files (data_utils.original_reordered_files), converted once into our
    memory-mapped day files in `<our processed data's folder>/original-memory-map` (data_utils.processed_dir,
    data_utils.read_original_reordered): train days 0 .. D-2, test and validation the
    halves of the last day, rows in the files' order (its preprocessing ordered them), ids folded by
    --max-ind-range when read, as the original's CriteoDataset with memory_map."""
    out_dir = os.path.join(data_utils.processed_dir(args.processed_data_file, args.raw_data_file, args.data_set),
                           ORIGINAL_REORDERED_DIR)
    processed = data_utils.read_original_reordered(files, args.data_set, out_dir, log=log, progress=progress)
    log(f"Reading the original's --memory-map data={files['prefix']}_<day>_reordered.npz (as {processed.out_dir}), "
        f"in their order; table sizes from {files['counts']}")
    _note_rows_as_kept(args, "--memory-map files")
    if args.data_randomize not in ("none", "total"):  # the default: no note on every run
        _note(f"note: --data-randomize={args.data_randomize} has no effect on the original's --memory-map files: its "
              "preprocessing ordered the rows, read in the files' order as the original does")
    return _processed_data(args, processed, splits, log, progress, id_modulus=max(args.max_ind_range, 0),
                           shuffled=True)


def _open_original_bin(args, files, splits, log) -> CriteoData:
    """The original's Terabyte --mlperf-bin-loader files (data_utils.original_bin_files), memory-mapped: train
    days 0-22, test and validation the halves of day 23, ids folded by --max-ind-range when read, rows in
    the files' order (its preprocessing shuffled them), as the original's CriteoBinDataset."""
    rows, counts = data_utils.read_original_bin_files(files, tuple(splits), args.max_ind_range)
    log(f"Reading the original's --mlperf-bin-loader data={files['train']} ({rows['train']} rows), "
        f"{files['test']} ({rows['test']} rows), in their order; table sizes from {files['counts']}")
    modulus = max(args.max_ind_range, 0)
    _note_rows_as_kept(args, ".bin files")
    if args.data_randomize not in ("none", "total"):  # the default: no note on every run
        _note(f"note: --data-randomize={args.data_randomize} has no effect on the original's .bin files: its "
              "preprocessing shuffled the rows, read in the files' order as the original does")
    day_rows = {name: [rows[name]] for name in splits}
    parts = {name: [MappedPart("bin", [files[name]], 0, rows[name], id_modulus=modulus)] for name in day_rows}
    return CriteoData(parts, day_rows, counts, shuffled=True)


def make_criteo_datasets(args, log=print, progress=True):
    """(train, test, table sizes) for --data-generation=dataset, multi-hot with --multi-hot-sizes (expanded
    on the fly) or when --processed-data-file is a materialized multi-hot set; raises data_utils.DataError."""
    data = open_criteo(args, ("train", "test"), log, progress)
    if sum(data.day_rows["train"]) == 0:
        raise data_utils.DataError("the training split is empty (all rows sub-sampled away?)")
    shuffle_batches = args.mlperf_bin_loader and args.mlperf_bin_shuffle
    randomize = "none" if data.shuffled else args.data_randomize
    train = CriteoDataset(data.parts["train"], args.mini_batch_size, randomize, args.numpy_rand_seed,
                          data.day_rows["train"], shuffle_batches=shuffle_batches, multi_hot=data.multi_hot)
    test = CriteoDataset(data.parts["test"], args.test_mini_batch_size, "none", args.numpy_rand_seed,
                         data.day_rows["test"], multi_hot=data.multi_hot)
    if data.multi_hot is None and args.multi_hot_sizes:  # one-hot data: expanded on the fly
        try:
            multi_hot = MultiHot(args.multi_hot_sizes, data.table_sizes, args.multi_hot_distribution_type)
        except ValueError as e:
            raise data_utils.DataError(str(e))
        train, test = with_multi_hot(train, multi_hot), with_multi_hot(test, multi_hot)
    return train, test, data.table_sizes
