"""Multi-hot inputs from one-hot ids: the synthetic bags of the MLPerf DLRMv2 (DLRM-DCNv2) benchmark.

Criteo data has one id per table and sample. The MLPerf DLRMv2 benchmark (facebookresearch/dlrm,
`torchrec_dlrm/multi_hot.py`) turns each id into a bag of a fixed size per table: the id itself
followed by `size - 1` synthetic ids of the same table that depend only on (table, id), so that
every process and every run agrees. Multi-hot sizes of the benchmark, one per Criteo table:
3,2,1,2,6,1,1,1,1,7,3,8,1,6,9,5,1,1,1,12,100,27,10,3,1,1.

The scheme here. Id x of table t (R rows) with bag size s becomes

    [x, y_1, ..., y_{s-1}],   y_k = draw(u_k),   u_k = unit_interval(splitmix64(h + (k - 1) * gamma))
    h = splitmix64(x XOR key_t),   key_t = splitmix64(splitmix64(seed) + t),   seed = SEED (0)

(`dlrmkit.hashing`: u_k is the k-th output of a SplitMix64 generator seeded with a hash of
(seed, t, x), a float in [0, 1) with 53 random bits), and

    uniform:  y = floor(u * R)                                   uniform on [0, R)
    pareto:   y = floor((1 - u)^(-1/a) - 1) mod R,  a = 0.25     a Lomax (Pareto II) draw modulo R

The Lomax draw is NumPy's `pareto(a)`: (1 - u)^(-1/a) - 1 is its inverse CDF, 1 - (1 + y)^(-a).
With a = 0.25 the draws are heavy-tailed: P(y = 0) = 1 - 2^(-1/4) = 0.159, P(y < 15) = 1/2, and
about 0.46% exceed 2^31. The value is computed in float64 (at most 2^212, no overflow) and reduced
modulo R exactly (`fmod` is exact), then converted to int64.

Where it differs from the reference, which draws a [R, s - 1] table per table once with
`np.random.seed(0)` and looks the bags up in it:
- the same distributions, other values: a hash per (table, id, k) instead of NumPy's sequential
  stream, so nothing of size R x (s - 1) is stored (the reference's tables of 40M-row Criteo
  tables hold billions of ids) and any id expands on its own, on any worker;
- the reference converts the Pareto draw to int32 before the modulo, which maps the draws above
  2^31 - 1 (0.46% of them) to one id, (-2^31) mod R (on x86, where an out-of-range conversion gives
  -2^31); here they are reduced modulo R exactly, so
  every id keeps the Lomax-modulo-R probability.
Bags are identical whatever the batch, the table sizes of other tables, --numpy-rand-seed, the
number of processes or workers: the seed is fixed, as the reference's.

    >>> mh = MultiHot([3, 1], [1000, 10])
    >>> sf = mh.expand(np.array([[7, 2], [7, 9]]))
    >>> sf.lengths().tolist(), sf.indices[:3].tolist() == sf.indices[3:6].tolist()
    ([3, 3, 1, 1], True)
"""

from __future__ import annotations

import numpy as np
import torch

from dlrmkit.flags import MULTI_HOT_DISTRIBUTIONS as DISTRIBUTIONS
from dlrmkit.hashing import GOLDEN_GAMMA, splitmix64, unit_interval
from dlrmkit.sparse import SparseFeatures

PARETO_SHAPE = 0.25  # the reference's a
SEED = 0  # the reference's np.random.seed(0): fixed, independent of --numpy-rand-seed
SCHEME = "splitmix64-v1"  # recorded with materialized data: bags written by another scheme differ
MLPERF_SIZES = [3, 2, 1, 2, 6, 1, 1, 1, 1, 7, 3, 8, 1, 6, 9, 5, 1, 1, 1, 12, 100, 27, 10, 3, 1, 1]


def sizes_per_table(sizes, num_tables: int) -> list[int]:
    """One bag size per table from --multi-hot-sizes: one value for all tables, or one per table.

    Raises ValueError (a one-line message naming the flag and both counts) for another count."""
    sizes = [int(s) for s in sizes]
    if len(sizes) == 1:
        return sizes * num_tables
    if len(sizes) != num_tables:
        raise ValueError(f"--multi-hot-sizes has {len(sizes)} values but the data has {num_tables} tables "
                         "(give one value for all tables, or one per table)")
    return sizes


class MultiHot:
    """The expansion of one-hot ids into fixed-size bags (see the module docstring for the scheme).

    sizes: bag size per table (>= 1); table_sizes: rows per table; distribution: uniform or pareto.
    Raises ValueError for sizes < 1, another count of sizes than of tables, or an unknown distribution.
    """

    def __init__(self, sizes, table_sizes, distribution: str = "uniform", seed: int = SEED):
        self.table_sizes = [int(n) for n in table_sizes]
        self.sizes = sizes_per_table(sizes, len(self.table_sizes))
        if min(self.sizes, default=1) < 1:
            raise ValueError(f"--multi-hot-sizes: every size must be at least 1, got {min(self.sizes)}")
        if distribution not in DISTRIBUTIONS:
            raise ValueError(f"--multi-hot-distribution-type={distribution} is not one of {', '.join(DISTRIBUTIONS)}")
        self.distribution, self.seed = distribution, int(seed)
        base = splitmix64(np.array([self.seed], dtype=np.uint64))
        self._keys = splitmix64(base + np.arange(len(self.table_sizes), dtype=np.uint64))
        self._columns = np.concatenate([[0], np.cumsum(self.sizes)]).astype(np.int64)

    @property
    def ids_per_sample(self) -> int:
        """Ids of one sample over all tables: sum(sizes)."""
        return int(self._columns[-1])

    def settings(self) -> dict:
        """What the bags depend on (recorded with materialized data and in checkpoints' data order)."""
        return {"sizes": list(self.sizes), "distribution": self.distribution, "seed": self.seed, "scheme": SCHEME}

    # ---------------------------------------------------------------- the bags
    def draw(self, u: np.ndarray, rows: int) -> np.ndarray:
        """Synthetic ids (int64, in [0, rows)) from uniform floats u in [0, 1)."""
        if self.distribution == "uniform":
            return np.minimum(np.floor(u * rows), rows - 1).astype(np.int64)
        lomax = np.floor((1.0 - u) ** (-1.0 / PARETO_SHAPE) - 1.0)  # 1 - u in (0, 1]: finite, at most 2^212
        return np.fmod(lomax, float(rows)).astype(np.int64)

    def bags(self, t: int, ids) -> np.ndarray:
        """[n, sizes[t]] int64: the bag of each of the n ids (int, in [0, table_sizes[t])) of table t;
        column 0 is the id itself."""
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        size = self.sizes[t]
        out = np.empty((len(ids), size), dtype=np.int64)
        out[:, 0] = ids
        if size > 1:
            h = splitmix64(ids.astype(np.uint64) ^ self._keys[t])
            steps = np.arange(size - 1, dtype=np.uint64) * GOLDEN_GAMMA  # wraps mod 2^64, as SplitMix64
            out[:, 1:] = self.draw(unit_interval(splitmix64(h[:, None] + steps[None, :])), self.table_sizes[t])
        return out

    def rows(self, ids) -> np.ndarray:
        """[B, sum(sizes)] int64: each sample's bags side by side, table after table (the materialized
        layout) from one-hot ids [B, T]."""
        ids = np.asarray(ids)
        out = np.empty((ids.shape[0], self.ids_per_sample), dtype=np.int64)
        for t in range(len(self.sizes)):
            out[:, self._columns[t] : self._columns[t + 1]] = self.bags(t, ids[:, t])
        return out

    def expand(self, ids) -> SparseFeatures:
        """The multi-hot SparseFeatures of one-hot ids [B, T] (NumPy or tensor): bag (t, b) has sizes[t] ids."""
        ids = ids.numpy() if isinstance(ids, torch.Tensor) else np.asarray(ids)
        batch_size = ids.shape[0]
        indices = np.concatenate([self.bags(t, ids[:, t]).reshape(-1) for t in range(len(self.sizes))]) \
            if self.sizes else np.zeros(0, np.int64)
        return SparseFeatures.from_lengths(np.repeat(np.array(self.sizes, dtype=np.int64), batch_size),
                                           torch.from_numpy(indices), batch_size)

    def expand_sparse(self, sparse: SparseFeatures) -> SparseFeatures:
        """`expand` of a one-hot SparseFeatures (exactly one id per bag, no weights); ValueError otherwise."""
        if sparse.num_tables != len(self.sizes):
            raise ValueError(f"multi-hot expansion of {sparse.num_tables} tables with {len(self.sizes)} bag sizes")
        bags = sparse.num_tables * sparse.batch_size
        if sparse.weights is not None or sparse.indices.numel() != bags or \
                not torch.equal(sparse.offsets, torch.arange(bags + 1, dtype=sparse.offsets.dtype)):
            raise ValueError("multi-hot expansion needs one-hot input: exactly one id per table and sample")
        return self.expand(sparse.indices.view(sparse.num_tables, sparse.batch_size).t())

    def from_rows(self, rows) -> SparseFeatures:
        """The SparseFeatures of materialized rows [B, sum(sizes)] (the layout of `rows`)."""
        rows = np.asarray(rows)
        if rows.ndim != 2 or rows.shape[1] != self.ids_per_sample:
            raise ValueError(f"multi-hot rows of shape {rows.shape}, expected [B, {self.ids_per_sample}]")
        batch_size = rows.shape[0]
        indices = np.concatenate([rows[:, self._columns[t] : self._columns[t + 1]].reshape(-1).astype(np.int64)
                                  for t in range(len(self.sizes))]) if self.sizes else np.zeros(0, np.int64)
        return SparseFeatures.from_lengths(np.repeat(np.array(self.sizes, dtype=np.int64), batch_size),
                                           torch.from_numpy(indices), batch_size)
