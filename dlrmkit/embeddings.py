"""Embedding-table collections: the sparse half of DLRM.

A collection turns the flat sparse layout of `dlrm_data.Batch` (one `indices`
array, `offsets` of T*B+1 bag starts, table-major) into pooled embeddings of
shape [B, T, D]. `DLRM_Net` holds one as `emb_l`:

- `BatchedEmbeddingBags` (the default): every table's rows in one weight
  [sum of rows, D]; one `F.embedding_bag` call looks up all tables at once and
  its backward yields one sparse gradient, which the optimizers in `optim/`
  coalesce once and apply in a few fused row operations.
- `EmbeddingBagList`: one module per table (`emb_l[k]`, as in the original),
  for tables that differ (QR, mixed dimensions, weighted pooling) through a
  per-table factory.

Both save the original's checkpoint keys, `emb_l.<k>.weight`, so checkpoints
move freely between them and the original.

Each table is initialised from its own random stream, seeded by one draw from
torch's global RNG and the table's index (`table_rng`): a table gets the same
initial values in either collection, and whether a process builds all tables
or, in a model-parallel run (`tables=`), only some of them.

    >>> bags = BatchedEmbeddingBags([4, 3, 2], dim=8)
    >>> offsets, indices = torch.tensor([0, 1, 3, 4, 5, 6, 7]), torch.tensor([3, 0, 1, 2, 0, 1, 0])
    >>> bags.pool(offsets, indices, batch_size=2).shape
    torch.Size([2, 3, 8])
"""

from __future__ import annotations

import bisect
import contextlib
import math
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

INIT_CHUNK_ELEMENTS = 1 << 22  # 16 MiB of float32 per random-number stream


def uniform_rows_(weight: torch.Tensor, row_ranges) -> torch.Tensor:
    """Fills rows [start, stop) of `weight` with U(-bound, bound) for each (start, stop, bound, seed).

    Float32 straight from torch, on all cores: each range is cut into fixed-size chunks, chunk c
    drawn from a generator seeded with seed + c, so the result depends on the seeds only (not on
    the number of threads) and a 2 GiB table fills in about a second instead of the original's
    float64 NumPy detour. A weight on the meta device is left as it is.
    """
    if weight.is_meta:
        return weight
    rows_per_chunk = max(1, INIT_CHUNK_ELEMENTS // max(1, weight.shape[1]))
    chunks = [(lo, min(lo + rows_per_chunk, stop), bound, seed + c)
              for start, stop, bound, seed in row_ranges
              for c, lo in enumerate(range(start, stop, rows_per_chunk))]

    def fill(chunk):
        lo, hi, bound, seed = chunk
        generator = torch.Generator(device=weight.device).manual_seed(seed)
        weight[lo:hi].uniform_(-bound, bound, generator=generator)

    with torch.no_grad():
        if weight.device.type == "cpu" and len(chunks) > 1 and torch.get_num_threads() > 1:
            with ThreadPoolExecutor(max_workers=torch.get_num_threads()) as pool:
                list(pool.map(fill, chunks))
        else:
            for chunk in chunks:
                fill(chunk)
    return weight


def draw_tables_seed() -> int:
    """One draw from torch's global CPU RNG that seeds the initial values of every table."""
    return int(torch.randint(0, 2**62, (1,), device="cpu"))


@contextlib.contextmanager
def table_rng(seed: int, table: int):
    """Torch's CPU RNG seeded from (seed, table) while table `table` is built, restored afterwards."""
    table_seed = int(np.random.SeedSequence([seed, table]).generate_state(1, np.uint64)[0]) & (2**63 - 1)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(table_seed)
        yield


def table_init_seed(seed: int, table: int) -> int:
    """The seed `create_embedding_bag` draws for table `table` inside `table_rng(seed, table)`."""
    with table_rng(seed, table):
        return draw_tables_seed()


def create_embedding_bag(num_rows: int, dim: int) -> nn.EmbeddingBag:
    """A sum-pooled EmbeddingBag with sparse gradients, rows ~ U(-sqrt(1/n), sqrt(1/n)) as the original."""
    num_rows, dim = int(num_rows), int(dim)
    bag = nn.EmbeddingBag(num_rows, dim, mode="sum", sparse=True, _weight=torch.empty(num_rows, dim))
    uniform_rows_(bag.weight.data, [(0, num_rows, math.sqrt(1.0 / num_rows), draw_tables_seed())])
    return bag


class EmbeddingBagList(nn.ModuleList):
    """One module per table (`emb_l[k]`, as in the original), each called as bag(indices, offsets).

    `tables` (global table ids, ascending) builds only those tables, e.g. the ones a process owns in a
    model-parallel run; `pool` then expects the sparse input of just those tables, in that order.
    """

    def __init__(self, table_sizes, dim, make_bag=create_embedding_bag, tables=None):
        seed = draw_tables_seed()
        tables = range(len(table_sizes)) if tables is None else tables
        bags = []
        for t in tables:
            with table_rng(seed, t):
                bags.append(make_bag(table_sizes[t], dim))
        super().__init__(bags)

    @classmethod
    def of(cls, modules) -> "EmbeddingBagList":
        """A list of ready-made table modules (no new tables are initialised)."""
        bags = cls.__new__(cls)
        nn.ModuleList.__init__(bags, modules)
        return bags

    def pool(self, offsets: torch.Tensor, indices: torch.Tensor, batch_size: int,
             per_sample_weights: torch.Tensor | None = None) -> torch.Tensor:
        """Pooled embeddings [B, T, D] from the flat layout; optional [N] weights, one per index."""
        # each table's slice of the flat index array (.tolist() is free on CPU, one sync on GPU)
        starts = offsets[::batch_size].tolist()
        pooled = []
        for t, bag in enumerate(self):
            table_offsets = offsets[t * batch_size : (t + 1) * batch_size] - starts[t]
            table = slice(starts[t], starts[t + 1])
            weights = per_sample_weights[table] if per_sample_weights is not None else None
            pooled.append(bag(indices[table], table_offsets, per_sample_weights=weights))
        return torch.stack(pooled, dim=1)

    def table_parameters(self, t: int) -> dict[str, torch.Tensor]:
        """The tensors holding the t-th table built here (parameters, or row views of one)."""
        return dict(self[t].named_parameters())


class EmbeddingTableView:
    """`emb_l[k]` of a batched collection: table k as a view, used like the original's nn.EmbeddingBag.

    `.weight` is a view of the shared weight (reads and in-place writes reach the model);
    calling it pools `indices` by `offsets` like `nn.EmbeddingBag(mode="sum")`.
    """

    def __init__(self, collection: "BatchedEmbeddingBags", table: int):
        self.collection = collection
        self.table = table
        self.num_embeddings = collection.table_sizes[table]
        self.embedding_dim = collection.embedding_dim

    @property
    def weight(self) -> torch.Tensor:
        start = self.collection.row_starts[self.table]
        return self.collection.weight[start : start + self.num_embeddings]

    def __call__(self, indices, offsets=None, per_sample_weights=None):
        return F.embedding_bag(indices, self.weight, offsets, mode="sum", per_sample_weights=per_sample_weights)

    def __repr__(self):
        return f"EmbeddingTableView(table={self.table}, rows={self.num_embeddings}, dim={self.embedding_dim})"


class BatchedEmbeddingBags(nn.Module):
    """All tables in one weight, looked up by one `F.embedding_bag` with a sparse gradient.

    Table t owns rows [row_starts[t], row_starts[t] + table_sizes[t]) of `weight`; each index is
    shifted by its table's first row on the device (no host sync), and checked to lie inside its
    table, as one `nn.EmbeddingBag` per table would.
    """

    def __init__(self, table_sizes, dim, tables=None):
        super().__init__()
        seed = draw_tables_seed()
        tables = list(range(len(table_sizes)) if tables is None else tables)
        self.table_sizes = [int(table_sizes[t]) for t in tables]
        self.embedding_dim = int(dim)
        if any(n < 1 for n in self.table_sizes):
            raise ValueError(f"every embedding table needs at least one row, got {self.table_sizes}")
        self.row_starts = [0]
        for n in self.table_sizes[:-1]:
            self.row_starts.append(self.row_starts[-1] + n)
        total_rows = sum(self.table_sizes)
        self.weight = nn.Parameter(torch.empty(total_rows, self.embedding_dim))
        uniform_rows_(self.weight.data, [(start, start + n, math.sqrt(1.0 / n), table_init_seed(seed, t))
                                         for start, n, t in zip(self.row_starts, self.table_sizes, tables)])
        self.register_buffer("first_row", torch.tensor(self.row_starts, dtype=torch.int64), persistent=False)
        self.register_buffer("num_rows", torch.tensor(self.table_sizes, dtype=torch.int64), persistent=False)

    def __len__(self):
        return len(self.table_sizes)

    def __getitem__(self, table: int) -> EmbeddingTableView:
        if not -len(self) <= table < len(self):
            raise IndexError(f"table {table} out of range ({len(self)} tables)")
        return EmbeddingTableView(self, table % len(self))

    def __iter__(self):
        return (self[t] for t in range(len(self)))

    def extra_repr(self):
        return f"tables={len(self)}, rows={self.weight.shape[0]}, dim={self.embedding_dim}"

    def pool(self, offsets: torch.Tensor, indices: torch.Tensor, batch_size: int) -> torch.Tensor:
        """Pooled embeddings [B, T, D] from the flat layout."""
        num_tables = len(self.table_sizes)
        per_table = torch.diff(offsets[::batch_size])  # indices of each table
        n = indices.numel()
        self._check_in_range(indices, torch.repeat_interleave(self.num_rows, per_table, output_size=n), per_table)
        rows = indices + torch.repeat_interleave(self.first_row, per_table, output_size=n)
        pooled = F.embedding_bag(rows, self.weight, offsets, mode="sum", sparse=True, include_last_offset=True)
        return pooled.view(num_tables, batch_size, self.embedding_dim).transpose(0, 1)

    def to_table_list(self) -> EmbeddingBagList:
        """The same tables as one nn.EmbeddingBag each (copies), e.g. for per-table quantization."""
        return EmbeddingBagList.of(
            nn.EmbeddingBag(n, self.embedding_dim, mode="sum", sparse=True, _weight=self[t].weight.detach().clone())
            for t, n in enumerate(self.table_sizes))

    def table_parameters(self, t: int) -> dict[str, torch.Tensor]:
        """The tensors holding the t-th table built here: a row view of the one weight."""
        return {"weight": self[t].weight}

    def _check_in_range(self, indices, table_rows, per_table):
        out_of_range = (indices < 0) | (indices >= table_rows)
        if indices.device.type != "cpu":
            # a device-side assertion: no host sync on the hot path
            torch._assert_async(~out_of_range.any(), "embedding index out of range of its table")
        elif bool(out_of_range.any()):
            position = int(out_of_range.nonzero()[0])
            table = bisect.bisect_right(torch.cumsum(per_table, 0).tolist(), position)
            raise IndexError(f"embedding index {int(indices[position])} out of range for table {table} "
                             f"({self.table_sizes[table]} rows)")

    # -- checkpoints: the original's keys, one `<k>.weight` per table (views of the one weight)
    def _save_to_state_dict(self, destination, prefix, keep_vars):
        weight = self.weight if keep_vars else self.weight.detach()
        for t, (start, n) in enumerate(zip(self.row_starts, self.table_sizes)):
            destination[f"{prefix}{t}.weight"] = weight[start : start + n]

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        expected = {f"{prefix}{t}.weight": t for t in range(len(self))}
        whole = f"{prefix}weight"  # a state_dict of the raw parameter, e.g. from named_parameters()
        with torch.no_grad():
            if whole in state_dict and not any(k in state_dict for k in expected):
                self._copy_rows(state_dict[whole], 0, self.weight.shape[0], whole, error_msgs)
            else:
                for key, t in expected.items():
                    if key not in state_dict:
                        missing_keys.append(key)
                    else:
                        self._copy_rows(state_dict[key], self.row_starts[t], self.table_sizes[t], key, error_msgs)
        if strict:
            unexpected_keys.extend(k for k in state_dict if k.startswith(prefix) and k not in expected and k != whole)

    def _copy_rows(self, value, start, rows, key, error_msgs):
        expected_shape = torch.Size([rows, self.embedding_dim])
        if not isinstance(value, torch.Tensor) or value.shape != expected_shape:
            shape = value.shape if isinstance(value, torch.Tensor) else type(value).__name__
            error_msgs.append(f"size mismatch for {key}: copying a param with shape {shape} from checkpoint, "
                              f"the shape in current model is {expected_shape}.")
            return
        self.weight[start : start + rows].copy_(value)
