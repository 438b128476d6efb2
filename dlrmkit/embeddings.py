"""Embedding-table collections: the sparse half of DLRM.

Every collection implements one interface, `EmbeddingCollection`: called on a
`dlrmkit.sparse.SparseFeatures` batch (T tables, B bags each) it returns the pooled
embeddings [B, T, D] (float32, sum pooling, optional per-index weights); `len(c)` tables,
`c[t]` is table t (called like the original's `nn.EmbeddingBag`), `c.table_parameters(t)`
its tensors, `c.table_rows(t, ids)` the embedding of each id with exportable ops, and
`c.to_per_table()` the same tables as one module each. `DLRM_Net` holds one as `emb_l`:

- `BatchedEmbeddingBags` (the default): every table's rows in one weight
  [sum of rows, D]; one `F.embedding_bag` call looks up all tables at once and
  its backward yields one sparse gradient, which the optimizers in `dlrmkit.optim`
  coalesce once and apply in a few fused row operations; fused with SGD or Adagrad
  (`fuse_optimizer`), its backward applies the step to the rows itself.
- `EmbeddingBagList`: one module per table (`emb_l[k]`, as in the original),
  for tables that differ (QR, mixed dimensions, weighted pooling, quantized rows)
  through a per-table factory.
- `extend_distributed.ModelParallelEmbeddings` wraps either for a model-parallel run.

Both save the original's checkpoint keys, `emb_l.<k>.weight`, so checkpoints
move freely between them and the original.

Each table is initialised from its own random stream, seeded by one draw from
torch's global RNG and the table's index (`table_rng`): a table gets the same
initial values in either collection, and whether a process builds all tables
or, in a model-parallel run (`tables=`), only some of them.

    >>> from dlrmkit.sparse import SparseFeatures
    >>> bags = BatchedEmbeddingBags([4, 3, 2], dim=8)
    >>> sparse = SparseFeatures.one_hot(torch.tensor([[3, 0, 1], [2, 1, 0]]))
    >>> bags(sparse).shape
    torch.Size([2, 3, 8])
"""

from __future__ import annotations

import bisect
import contextlib
import math

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from dlrmkit import kernels
from dlrmkit.sparse import SparseFeatures, bag_of_each_index

def uniform_rows_(weight: torch.Tensor, row_ranges) -> torch.Tensor:
    """Fills rows [start, stop) of `weight` with U(-bound, bound) for each (start, stop, bound, seed).

    The rows of a range, flattened, take the values of `kernels.uniform_` from `seed` (a counter-based
    generator): they depend on the seed alone, not on the number of threads or on whether the native kernels
    run, and a 2 GiB table fills at memory speed on all cores (its first touch of the memory then dominates).
    Rows `kernels.uniform_fillable` takes are filled in place, other dense floating-point rows (another dtype
    or device, not contiguous) through a float32 CPU copy; ValueError for other weights. A weight on the
    meta device is left as it is.
    """
    if weight.is_meta:
        return weight
    if not weight.is_floating_point() or weight.layout != torch.strided:
        raise ValueError(f"uniform_rows_ fills dense floating-point weights, not a {weight.dtype} {weight.layout} one")
    with torch.no_grad():
        for start, stop, bound, seed in row_ranges:
            rows = weight[start:stop]
            if kernels.uniform_fillable(rows):
                kernels.uniform_(rows, seed, -bound, bound)
            else:
                rows.copy_(kernels.uniform_(torch.empty(rows.shape, dtype=torch.float32, device="cpu"), seed, -bound,
                                            bound))
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


def sum_bags(rows: torch.Tensor, offsets: torch.Tensor, per_sample_weights: torch.Tensor | None = None) -> torch.Tensor:
    """[B, D] sums of `rows` ([N, D], one per index) over the bags starting at `offsets` ([B]).

    What `nn.EmbeddingBag(mode="sum")` does after its lookup, for rows computed per index
    (quotient-remainder products, exported lookups), with ops that export to ONNX and keep
    the batch size and the number of lookups dynamic (scatter-add and cumsum).
    """
    if per_sample_weights is not None:
        rows = rows * per_sample_weights.unsqueeze(1).to(rows.dtype)
    bag = bag_of_each_index(offsets, rows[:, 0])
    out = torch.zeros_like(offsets, dtype=rows.dtype).unsqueeze(1).repeat(1, rows.shape[1])
    return out.scatter_add(0, bag.unsqueeze(1).expand(-1, rows.shape[1]), rows)


def table_rows(bag: nn.Module, indices: torch.Tensor) -> torch.Tensor:
    """[N, D] embedding of each index of one table module (no pooling).

    An `nn.EmbeddingBag` is read directly (its sparse gradients kept); a module with an
    `embed(indices)` method (QR, MD tables) is asked; any other table module (e.g. quantized
    rows) is called with one index per bag.
    """
    if isinstance(bag, nn.EmbeddingBag):
        if bag.mode != "sum":
            raise ValueError(f"only sum-pooled tables are supported, not mode={bag.mode}")
        return F.embedding(indices, bag.weight, sparse=bag.sparse)
    if hasattr(bag, "embed"):
        return bag.embed(indices)
    return bag(indices, torch.arange(indices.shape[0], device=indices.device))


class TableIndexError(IndexError):
    """An id outside its table: the data do not fit the tables (the trainer reports it in one line)."""


def id_out_of_range(sparse: SparseFeatures, position: int, table_sizes, table_ids=None) -> TableIndexError:
    """The error for the id at `position` of `sparse.indices`, naming its table: the model's number of
    it, `table_ids[t]` (default t), and its rows `table_sizes[t]`."""
    table = bisect.bisect_right(sparse.table_bounds().tolist(), position) - 1
    return TableIndexError(f"embedding index {int(sparse.indices[position])} out of range for table "
                           f"{table_ids[table] if table_ids is not None else table} ({table_sizes[table]} rows)")


def check_ids_in_range(sparse: SparseFeatures, rows_of_table: torch.Tensor, table_sizes, table_ids=None) -> None:
    """Raises TableIndexError (`id_out_of_range`) for the first id outside its table (ids < 0 or >= its
    table's rows); `rows_of_table` [N] holds each id's table size. On a GPU a device-side assertion (no
    host sync)."""
    out_of_range = (sparse.indices < 0) | (sparse.indices >= rows_of_table)
    if sparse.indices.device.type != "cpu":
        torch._assert_async(~out_of_range.any(), "embedding index out of range of its table")
    elif bool(out_of_range.any()):
        raise id_out_of_range(sparse, int(out_of_range.nonzero()[0]), table_sizes, table_ids)


# ids per batch from which a one-pass range check (ids_fit_smallest_table) is tried first on the CPU
ONE_PASS_CHECK_MIN_IDS = 1 << 16


def ids_fit_smallest_table(sparse: SparseFeatures, table_sizes) -> bool:
    """Whether every id lies in [0, rows of the smallest table): one pass (min and max) over the
    ids, which then need no per-table check. Reads the result on the host (meant for the CPU)."""
    if sparse.indices.numel() == 0 or not table_sizes:
        return True
    lo, hi = torch.aminmax(sparse.indices)
    return int(lo) >= 0 and int(hi) < min(table_sizes)


class EmbeddingCollection(nn.Module):
    """The interface of every embedding collection (see the module docstring).

    Subclasses set `table_sizes` (rows of each table held here, in pooling order), `table_ids` (the
    model's number of each of them: 0 .. T-1 unless built with `tables=`, as a process of a
    model-parallel run builds its own) and `embedding_dim` (the pooled width D) and implement `pool`,
    `table_parameters`, `table_rows` and `to_per_table`.
    """

    table_sizes: list
    table_ids: list
    embedding_dim: int

    def forward(self, sparse: SparseFeatures) -> torch.Tensor:
        """Pooled embeddings [B, T, D] of `sparse` (B = sparse.batch_size).

        Raises TableIndexError (on the CPU) for an id outside its table. While traced (ONNX export)
        every table is pooled with exportable ops instead of the fused kernels."""
        if torch.jit.is_tracing():
            return self.exportable_pool(sparse)
        return self.pool(sparse)

    def pool(self, sparse: SparseFeatures) -> torch.Tensor:
        raise NotImplementedError

    def table_parameters(self, t: int) -> dict[str, torch.Tensor]:
        """The tensors holding the t-th table held here (parameters, or row views of one)."""
        raise NotImplementedError

    def table_rows(self, t: int, indices: torch.Tensor) -> torch.Tensor:
        """[N, D] embedding of each id of table t, with ops that export to ONNX."""
        raise NotImplementedError

    def to_per_table(self) -> "EmbeddingBagList":
        """The same tables as one module each (e.g. for per-table quantization)."""
        raise NotImplementedError

    def exportable_pool(self, sparse: SparseFeatures) -> torch.Tensor:
        """`forward` with gathers and scatter-adds only (no data-dependent Python): what ONNX gets."""
        pooled = []
        for t in range(sparse.num_tables):
            indices, offsets, weights = sparse.table(t)
            pooled.append(sum_bags(self.table_rows(t, indices), offsets, weights))
        return torch.stack(pooled, dim=1)


class EmbeddingBagList(EmbeddingCollection, nn.ModuleList):
    """One module per table (`emb_l[k]`, as in the original), each called as bag(indices, offsets, weights).

    `tables` (global table ids, ascending) builds only those tables, e.g. the ones a process owns in a
    model-parallel run; it then pools the sparse ids of just those tables, in that order.
    `make_bag(num_rows, dim)` builds each table module (plain, QR or MD: see dlrmkit.tricks).
    """

    def __init__(self, table_sizes, dim, make_bag=create_embedding_bag, tables=None, out_dim=None):
        seed = draw_tables_seed()
        tables = range(len(table_sizes)) if tables is None else tables
        bags = []
        for t in tables:
            with table_rng(seed, t):
                bags.append(make_bag(table_sizes[t], dim))
        nn.ModuleList.__init__(self, bags)
        self._set_tables([table_sizes[t] for t in tables], out_dim if out_dim is not None else dim, list(tables))

    @classmethod
    def of(cls, modules, table_sizes, embedding_dim) -> "EmbeddingBagList":
        """A list of ready-made table modules (no new tables are initialised)."""
        bags = cls.__new__(cls)
        nn.ModuleList.__init__(bags, modules)
        bags._set_tables(table_sizes, embedding_dim)
        return bags

    def _set_tables(self, table_sizes, embedding_dim, table_ids=None):
        self.table_sizes = [int(n) for n in table_sizes]
        self.table_ids = list(range(len(self.table_sizes)) if table_ids is None else table_ids)
        self.embedding_dim = int(embedding_dim)
        self.register_buffer("num_rows", torch.tensor(self.table_sizes, dtype=torch.int64), persistent=False)

    def pool(self, sparse: SparseFeatures) -> torch.Tensor:
        check_ids_in_range(sparse, sparse.per_index(self.num_rows), self.table_sizes, self.table_ids)
        return torch.stack([bag(indices, offsets, per_sample_weights=weights)
                            for bag, (indices, offsets, weights) in zip(self, sparse.tables())], dim=1)

    def table_parameters(self, t: int) -> dict[str, torch.Tensor]:
        return dict(self[t].named_parameters())

    def table_rows(self, t: int, indices: torch.Tensor) -> torch.Tensor:
        return table_rows(self[t], indices)

    def to_per_table(self) -> "EmbeddingBagList":
        return self


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


class EmbeddingBagFusedUpdate(torch.autograd.Function):
    """Sum-pooled bags of `weight` rows whose backward applies the optimizer's step (SGD, Adagrad) to those rows.

    forward: as `F.embedding_bag(rows, weight, offsets, mode="sum", per_sample_weights=weights,
    include_last_offset=True)`, [K, D] widened to float32 (bfloat16 tables: their sums rounded to bfloat16
    first); backward: `optimizer.update_bags_(weight, rows, offsets, grad, weights, ...)` with the table
    layout (bags_per_table, table_ids), and no gradient for `weight` (nor the ids or constant weights)."""

    @staticmethod
    def forward(ctx, weight, rows, offsets, weights, optimizer, bags_per_table, table_ids):
        ctx.save_for_backward(rows, offsets, *([] if weights is None else [weights]))
        ctx.weight, ctx.optimizer, ctx.tables = weight, optimizer, (bags_per_table, table_ids)
        return F.embedding_bag(rows, weight, offsets, mode="sum", per_sample_weights=weights,
                               include_last_offset=True).float()  # bfloat16 tables: a float32 gradient back

    @staticmethod
    def backward(ctx, grad):
        rows, offsets, *weights = ctx.saved_tensors
        bags_per_table, table_ids = ctx.tables
        ctx.optimizer.update_bags_(ctx.weight, rows, offsets, grad, weights[0] if weights else None,
                                   bags_per_table=bags_per_table, table_ids=table_ids)
        return None, None, None, None, None, None, None


class BatchedEmbeddingBags(EmbeddingCollection):
    """All tables in one weight, looked up by one `F.embedding_bag` with a sparse gradient.

    Table t owns rows [row_starts[t], row_starts[t] + table_sizes[t]) of `weight`; each index is
    shifted by its table's first row on the device (no host sync), and checked to lie inside its
    table, as one `nn.EmbeddingBag` per table would.

    `dtype=torch.bfloat16` stores the rows in bfloat16 (half the memory and memory traffic; the pooled
    sums are added in float32 and come out rounded to bfloat16, then widened to float32): meant for
    training fused with SGD (`fuse_optimizer`), whose update rounds stochastically, so that steps smaller than
    a bfloat16 step are kept on average.
    """

    def __init__(self, table_sizes, dim, tables=None, dtype=torch.float32):
        super().__init__()
        if dtype not in (torch.float32, torch.bfloat16):
            raise ValueError(f"embedding tables are float32 or bfloat16, not {dtype}")
        seed = draw_tables_seed()
        tables = list(range(len(table_sizes)) if tables is None else tables)
        self.table_sizes = [int(table_sizes[t]) for t in tables]
        self.table_ids = tables  # the model's number of each table held here (errors and bf16 rounding use them)
        self.table_id_tensor = torch.tensor(tables, dtype=torch.int64)
        self.embedding_dim = int(dim)
        if any(n < 1 for n in self.table_sizes):
            raise ValueError(f"every embedding table needs at least one row, got {self.table_sizes}")
        self.row_starts = np.cumsum([0] + self.table_sizes[:-1]).tolist() if self.table_sizes else []
        total_rows = sum(self.table_sizes)
        self.weight = nn.Parameter(torch.empty(total_rows, self.embedding_dim, dtype=dtype))
        uniform_rows_(self.weight.data, [(start, start + n, math.sqrt(1.0 / n), table_init_seed(seed, t))
                                         for start, n, t in zip(self.row_starts, self.table_sizes, tables)])
        # [first row, rows] of each table: looked up for every id in one repeat_interleave
        self.register_buffer("row_ranges", torch.tensor([self.row_starts, self.table_sizes], dtype=torch.int64)
                             .view(2, len(self.table_sizes)), persistent=False)
        self.fused_optimizer = None  # see fuse_optimizer

    def __len__(self):
        return len(self.table_sizes)

    def __getitem__(self, table: int) -> EmbeddingTableView:
        if not -len(self) <= table < len(self):
            raise IndexError(f"table {table} out of range ({len(self)} tables)")
        return EmbeddingTableView(self, table % len(self))

    def __iter__(self):
        return (self[t] for t in range(len(self)))

    def extra_repr(self):
        dtype = "" if self.weight.dtype == torch.float32 else f", dtype={self.weight.dtype}"
        return f"tables={len(self)}, rows={self.weight.shape[0]}, dim={self.embedding_dim}{dtype}"

    def pool(self, sparse: SparseFeatures) -> torch.Tensor:
        rows = self.stacked_rows(sparse)
        if (self.fused_optimizer is not None and torch.is_grad_enabled() and self.weight.requires_grad
                and (sparse.weights is None or not sparse.weights.requires_grad)):
            pooled = EmbeddingBagFusedUpdate.apply(self.weight, rows, sparse.offsets, sparse.weights,
                                                   self.fused_optimizer, sparse.batch_size, self.table_id_tensor)
        else:
            pooled = F.embedding_bag(rows, self.weight, sparse.offsets, mode="sum", sparse=True,
                                     per_sample_weights=sparse.weights, include_last_offset=True).float()
        return pooled.view(len(self), sparse.batch_size, self.embedding_dim).transpose(0, 1)

    def stacked_rows(self, sparse: SparseFeatures) -> torch.Tensor:
        """[N] row of each id in the one weight; TableIndexError (on the CPU) for an id outside its table."""
        native = kernels.stacked_rows_checked(sparse.indices, sparse.offsets, sparse.batch_size,
                                              self.row_ranges[0], self.row_ranges[1])
        if native is not None:
            rows, bad = native
            if bad >= 0:
                raise id_out_of_range(sparse, bad, self.table_sizes, self.table_ids)
            return rows
        if (sparse.indices.device.type == "cpu" and sparse.indices.numel() >= ONE_PASS_CHECK_MIN_IDS
                and ids_fit_smallest_table(sparse, self.table_sizes)):
            first_row = sparse.per_index(self.row_ranges[0])  # of each id's table
        else:
            first_row, table_rows = sparse.per_index(self.row_ranges)
            check_ids_in_range(sparse, table_rows, self.table_sizes, self.table_ids)
        return sparse.indices + first_row

    def fuse_optimizer(self, optimizer) -> None:
        """Makes every backward through this collection apply `optimizer`'s step (SGD, Adagrad) to the looked-up
        rows at once (`optimizer.update_bags_`, TorchRec's fused embedding optimizer), instead of leaving
        a sparse gradient for `optimizer.step()`: the same numbers (Adagrad: but for the rounding of its square
        roots), without the [ids, D] gradient.

        After this a backward changes the weight, and `weight.grad` stays None: for training loops
        that step after every backward (no gradient accumulation, scaling or clipping) and, with Adagrad,
        look the collection up once per backward (each lookup's backward is a step). None undoes it.
        """
        if optimizer is not None and not hasattr(optimizer, "update_bags_"):
            raise TypeError(f"{type(optimizer).__name__} cannot update embedding bags in the backward")
        if optimizer is not None and not any(p is self.weight for g in optimizer.param_groups for p in g["params"]):
            raise ValueError("fuse_optimizer: the tables' weight is not one of the optimizer's parameters")
        if optimizer is not None and self.weight.dtype not in optimizer.bags_dtypes:
            raise ValueError(f"fuse_optimizer: {type(optimizer).__name__} updates {self.weight.dtype} tables only "
                             "unfused")
        self.fused_optimizer = optimizer

    def table_parameters(self, t: int) -> dict[str, torch.Tensor]:
        """A row view of the one weight."""
        return {"weight": self[t].weight}

    def table_rows(self, t: int, indices: torch.Tensor) -> torch.Tensor:
        return F.embedding(indices + self.row_starts[t], self.weight)

    def to_per_table(self) -> EmbeddingBagList:
        """The same tables as one nn.EmbeddingBag each (copies)."""
        return EmbeddingBagList.of(
            [nn.EmbeddingBag(n, self.embedding_dim, mode="sum", sparse=True, _weight=self[t].weight.detach().clone())
             for t, n in enumerate(self.table_sizes)], self.table_sizes, self.embedding_dim)

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
