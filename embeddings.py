"""Embedding-table collections: the sparse half of DLRM.

A collection turns the flat sparse layout of `dlrm_data.Batch` (one `indices`
array, `offsets` of T*B+1 bag starts, table-major) into pooled embeddings of
shape [B, T, D]. `DLRM_Net` holds one as `emb_l`.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn


def create_embedding_bag(num_rows: int, dim: int) -> nn.EmbeddingBag:
    """A sum-pooled EmbeddingBag with sparse gradients, rows ~ U(-sqrt(1/n), sqrt(1/n)) as the original."""
    bag = nn.EmbeddingBag(int(num_rows), int(dim), mode="sum", sparse=True)
    bound = math.sqrt(1.0 / num_rows)
    with torch.no_grad():
        bag.weight.uniform_(-bound, bound)
    return bag


class EmbeddingBagList(nn.ModuleList):
    """One module per table (`emb_l[k]`, as in the original), each called as bag(indices, offsets)."""

    def __init__(self, table_sizes, dim, make_bag=create_embedding_bag):
        super().__init__(make_bag(n, dim) for n in table_sizes)

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
