"""--weighted-pooling: one weight per embedding row; a bag sums weight[i] * E[i].

As in the original, every row's weight starts at 1: `fixed` keeps them at 1 (a buffer,
saved in checkpoints, never trained: it measures the cost of weighted pooling and lets a
checkpoint carry chosen weights), `learned` trains them (with sparse gradients, like the
embedding rows). All tables' weights live in one [sum(rows), 1] tensor.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


class PoolingWeights(nn.Module):
    def __init__(self, table_sizes, learned: bool):
        super().__init__()
        sizes = torch.tensor([int(n) for n in table_sizes], dtype=torch.int64)
        self.learned = bool(learned)
        weight = torch.ones(int(sizes.sum()), 1)
        if self.learned:
            self.weight = nn.Parameter(weight)
        else:
            self.register_buffer("weight", weight)
        self.register_buffer("row_starts", torch.cumsum(sizes, 0) - sizes, persistent=False)

    def for_table(self, table: int, indices: torch.Tensor) -> torch.Tensor:
        """[N_t] weights of table `table`'s indices."""
        return self._lookup(indices + self.row_starts[table])

    def forward(self, offsets: torch.Tensor, indices: torch.Tensor, batch_size: int) -> torch.Tensor:
        """[N] weight of every index of the flat layout (table-major, T*B+1 offsets)."""
        per_table = offsets[::batch_size]
        counts = per_table[1:] - per_table[:-1]
        first_row = torch.repeat_interleave(self.row_starts, counts, output_size=indices.shape[0])
        return self._lookup(indices + first_row)

    def _lookup(self, rows):
        if self.learned:
            return F.embedding(rows, self.weight, sparse=True).squeeze(1)
        return self.weight[rows, 0]

    def extra_repr(self):
        return f"rows={self.weight.shape[0]}, learned={self.learned}"
