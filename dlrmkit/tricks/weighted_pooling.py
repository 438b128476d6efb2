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

from dlrmkit.sparse import SparseFeatures


class PoolingWeights(nn.Module):
    """One weight per row of every table ([sum of rows, 1]); called on a sparse batch, the weight of each id."""

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

    def forward(self, sparse: SparseFeatures) -> torch.Tensor:
        """[N] weight of every id of `sparse` (all tables of the model, in order)."""
        return self._lookup(sparse.index_rows(self.row_starts))

    def _lookup(self, rows):
        if self.learned:
            return F.embedding(rows, self.weight, sparse=True).squeeze(1)
        return self.weight[rows, 0]

    def extra_repr(self):
        return f"rows={self.weight.shape[0]}, learned={self.learned}"
