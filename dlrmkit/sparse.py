"""`SparseFeatures`: the one sparse-batch type, from the loaders to the model and the distributed exchange.

The layout is TorchRec's `KeyedJaggedTensor` with the tables as keys: every bag of every
table in one flat `indices` array, table-major, and one `offsets` array of bag starts.

    indices: [N] int64    row ids, each relative to its own table
    offsets: [T * B + 1]  int64, bag (t, b) is indices[offsets[t*B + b] : offsets[t*B + b + 1]]
    weights: [N] float32  optional per-index weights (weighted pooling), or None
    batch_size B, num_tables T

A bag may hold any number of ids, zero included, and bags differ per table and per sample
(multi-hot). Everything that needs table boundaries asks this type for them
(`table_bounds`, `table`, `tables`, `per_index`, `index_rows`); nothing else recomputes them.

    >>> sf = SparseFeatures.from_lengths(torch.tensor([1, 2, 1, 0]), torch.tensor([3, 0, 1, 2]), batch_size=2)
    >>> sf.num_tables, sf.table_bounds().tolist()
    (2, [0, 3, 4])
    >>> [ids.tolist() for ids, _, _ in sf.tables()]
    [[3, 0, 1], [2]]
"""

from __future__ import annotations

import dataclasses

import numpy as np
import torch


@dataclasses.dataclass
class SparseFeatures:
    """The sparse ids of B samples for T tables in the flat layout (see the module docstring).

    `batch_size` counts the bags of each table. In a distributed run a process holds the ids of
    its own tables for the whole global batch, while its dense rows are a share of it: the
    sparse batch size is then the global one.
    """

    indices: torch.Tensor
    offsets: torch.Tensor
    batch_size: int
    num_tables: int
    weights: torch.Tensor | None = None

    # ---------------------------------------------------------------- construction
    @classmethod
    def from_lengths(cls, lengths, indices, batch_size: int, weights=None) -> "SparseFeatures":
        """From bag lengths ([T * B] or [T, B], table-major) and the flat indices (tensors or NumPy)."""
        lengths = torch.as_tensor(np.asarray(lengths) if not isinstance(lengths, torch.Tensor) else lengths)
        lengths = lengths.reshape(-1).to(torch.int64)
        offsets = torch.zeros(lengths.numel() + 1, dtype=torch.int64, device=lengths.device)
        torch.cumsum(lengths, 0, out=offsets[1:])
        indices = torch.as_tensor(indices).reshape(-1).to(torch.int64)
        num_tables = lengths.numel() // batch_size if batch_size else 0
        return cls(indices, offsets, int(batch_size), num_tables, weights)

    @classmethod
    def one_hot(cls, ids) -> "SparseFeatures":
        """Exactly one id per table per sample: `ids` is [B, T] (tensor or NumPy)."""
        batch_size, num_tables = ids.shape
        if isinstance(ids, torch.Tensor):
            indices = ids.t().reshape(-1).to(torch.int64)
        else:  # one copy: transposed to table-major while converted
            indices = torch.from_numpy(np.ascontiguousarray(np.asarray(ids).T, dtype=np.int64).reshape(-1))
        offsets = torch.arange(batch_size * num_tables + 1, dtype=torch.int64, device=indices.device)
        return cls(indices, offsets, int(batch_size), int(num_tables))

    @classmethod
    def from_original(cls, lS_o, lS_i, batch_size: int) -> "SparseFeatures":
        """From the original's per-table layout.

        lS_o: [T, B] tensor or a list of T [B] tensors (each table's offsets into its own ids);
        lS_i: a list of T 1-D tensors or a [T, N] tensor (each table's ids).
        """
        lS_i = list(lS_i)
        device = lS_i[0].device if lS_i else torch.device("cpu")
        starts = [0]
        for ids in lS_i:
            starts.append(starts[-1] + ids.numel())
        bag_starts = [lS_o[t].reshape(-1).to(device=device, dtype=torch.int64) + starts[t] for t in range(len(lS_i))]
        offsets = torch.cat(bag_starts + [torch.tensor([starts[-1]], dtype=torch.int64, device=device)])
        indices = (torch.cat([ids.reshape(-1).to(torch.int64) for ids in lS_i]) if lS_i
                   else torch.zeros(0, dtype=torch.int64, device=device))
        return cls(indices, offsets, int(batch_size), len(lS_i))

    # ---------------------------------------------------------------- table boundaries
    def table_bounds(self) -> torch.Tensor:
        """[T + 1] position in `indices` where each table's ids begin, then the end."""
        return self.offsets[:: self.batch_size] if self.num_tables else self.offsets[:1]

    def lengths(self) -> torch.Tensor:
        """[T * B] number of ids in each bag."""
        return torch.diff(self.offsets)

    def table(self, t: int):
        """(indices [N_t], offsets [B] relative to them, weights [N_t] or None) of table t.

        Traceable: the slice bounds are tensors, so an exported graph keeps B and N dynamic."""
        batch_size = self.batch_size
        start, end = self.offsets[t * batch_size], self.offsets[(t + 1) * batch_size]
        weights = self.weights[start:end] if self.weights is not None else None
        return self.indices[start:end], self.offsets[t * batch_size : (t + 1) * batch_size] - start, weights

    def tables(self):
        """Yields `table(t)` for every table, reading the boundaries once (one host sync on a GPU)."""
        bounds = self.table_bounds().tolist()
        batch_size = self.batch_size
        for t in range(self.num_tables):
            start, end = bounds[t], bounds[t + 1]
            weights = self.weights[start:end] if self.weights is not None else None
            yield self.indices[start:end], self.offsets[t * batch_size : (t + 1) * batch_size] - start, weights

    def per_index(self, table_values: torch.Tensor) -> torch.Tensor:
        """Each index's value of its table: [..., T] per-table values -> [..., N] (any leading dims)."""
        if torch.jit.is_tracing():  # exportable ops only (ONNX): the table of each index by scatter + cumsum
            starts = self.offsets[torch.arange(self.num_tables, device=self.offsets.device) * self.batch_size]
            return table_values[..., bag_of_each_index(starts, self.indices)]
        per_table = torch.diff(self.table_bounds())
        if table_values.dim() == 1:
            return torch.repeat_interleave(table_values, per_table, output_size=self.indices.numel())
        # whole rows gathered (tables first), not single elements along the last dimension
        rows = torch.repeat_interleave(table_values.movedim(-1, 0).contiguous(), per_table, dim=0,
                                       output_size=self.indices.numel())
        return rows.movedim(0, -1)

    def index_rows(self, first_row: torch.Tensor) -> torch.Tensor:
        """[N] row of each index in a stack of all tables whose table t starts at row first_row[t] ([T])."""
        return self.indices + self.per_index(first_row)

    # ---------------------------------------------------------------- reshaping
    def select_tables(self, tables) -> "SparseFeatures":
        """The ids of `tables` only (global table numbers, in the given order), same batch size.

        What a process keeps of a global batch in a model-parallel run."""
        tables = list(tables)
        bounds = self.table_bounds().tolist()
        batch_size = self.batch_size
        offsets, indices, weights, base = [], [], [], 0
        for t in tables:
            start, end = bounds[t], bounds[t + 1]
            offsets.append(self.offsets[t * batch_size : (t + 1) * batch_size] - (start - base))
            indices.append(self.indices[start:end])
            if self.weights is not None:
                weights.append(self.weights[start:end])
            base += end - start
        offsets.append(torch.tensor([base], dtype=self.offsets.dtype, device=self.offsets.device))
        return SparseFeatures(
            indices=torch.cat(indices) if indices else self.indices[:0],
            offsets=torch.cat(offsets),
            batch_size=batch_size,
            num_tables=len(tables),
            weights=(torch.cat(weights) if weights else self.weights[:0]) if self.weights is not None else None,
        )

    def last_samples(self, keep: int) -> "SparseFeatures":
        """The bags of the last `keep` samples in every table (batch size `keep`), weights included."""
        first = self.batch_size - keep
        lengths = self.lengths().view(self.num_tables, self.batch_size)
        sample = torch.arange(self.batch_size, device=self.offsets.device).repeat(self.num_tables)
        sample_of_index = torch.repeat_interleave(sample, lengths.reshape(-1), output_size=self.indices.numel())
        kept = sample_of_index >= first
        weights = self.weights[kept] if self.weights is not None else None
        return SparseFeatures.from_lengths(lengths[:, first:], self.indices[kept], keep, weights)

    def with_weights(self, weights: torch.Tensor | None) -> "SparseFeatures":
        """The same ids with per-index weights ([N])."""
        return dataclasses.replace(self, weights=weights)

    # ---------------------------------------------------------------- devices
    def to(self, device, non_blocking: bool = False) -> "SparseFeatures":
        return self._map(lambda t: t.to(device, non_blocking=non_blocking))

    def pin_memory(self) -> "SparseFeatures":
        return self._map(lambda t: t.pin_memory())

    def record_stream(self, stream) -> None:
        """Marks the tensors as used on `stream` (their memory is reused only after that use)."""
        for tensor in self._tensors():
            tensor.record_stream(stream)

    def _tensors(self):
        return [t for t in (self.indices, self.offsets, self.weights) if t is not None]

    def _map(self, fn) -> "SparseFeatures":
        return dataclasses.replace(self, indices=fn(self.indices), offsets=fn(self.offsets),
                                   weights=fn(self.weights) if self.weights is not None else None)


def bag_of_each_index(starts: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """[N] number of the bag each of the N `indices` belongs to, from [K] bag starts (empty bags allowed).

    Index k belongs to bag b with starts[b] <= k < starts[b + 1], i.e. b is the number of starts[1:]
    that are <= k: a scatter of ones at those starts, then a cumulative sum. Only ops that export to
    ONNX, on tensors whose sizes come from the inputs, so a traced graph keeps N dynamic.
    """
    marks = torch.zeros_like(indices, dtype=torch.int64)
    marks = torch.cat([marks, marks[:1].new_zeros(1)])  # N + 1 slots: starts may equal N
    later = starts[1:]
    marks = marks.scatter_add(0, later, torch.ones_like(later))
    return torch.cumsum(marks, 0)[:-1]
