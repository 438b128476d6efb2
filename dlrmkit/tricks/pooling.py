"""Sum pooling of per-index rows into bags, written with ops that export to ONNX.

`sum_bags` is what `nn.EmbeddingBag(mode="sum")` does after its lookup, for rows that
are computed per index (quotient-remainder products, quantized or exported lookups).
It uses only scatter-add and cumsum on tensors whose sizes come from the inputs, so a
traced graph keeps a dynamic batch size and a dynamic number of lookups.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


def bag_of_each_index(offsets: torch.Tensor, num_indices_like: torch.Tensor) -> torch.Tensor:
    """[N] bag number of every index, from [B] bag starts (empty bags allowed).

    Index k belongs to bag b with offsets[b] <= k < offsets[b + 1], i.e. b is the number
    of starts offsets[1:] that are <= k: a scatter of ones at the starts, then a cumsum.
    """
    marks = torch.zeros_like(num_indices_like, dtype=torch.int64)
    marks = torch.cat([marks, marks[:1].new_zeros(1)])  # N + 1 slots: starts may equal N
    starts = offsets[1:]
    marks = marks.scatter_add(0, starts, torch.ones_like(starts))
    return torch.cumsum(marks, 0)[:-1]


def sum_bags(rows: torch.Tensor, offsets: torch.Tensor, per_sample_weights: torch.Tensor | None = None) -> torch.Tensor:
    """[B, D] sums of `rows` ([N, D], one per index) over the bags starting at `offsets` ([B])."""
    if per_sample_weights is not None:
        rows = rows * per_sample_weights.unsqueeze(1).to(rows.dtype)
    bag = bag_of_each_index(offsets, rows[:, 0])
    out = torch.zeros_like(offsets, dtype=rows.dtype).unsqueeze(1).repeat(1, rows.shape[1])
    return out.scatter_add(0, bag.unsqueeze(1).expand(-1, rows.shape[1]), rows)


def lookup_rows(bag: nn.Module, indices: torch.Tensor) -> torch.Tensor:
    """[N, D] rows of a table for each index (no pooling).

    An `nn.EmbeddingBag` is read directly (sparse gradients kept); any other bag module
    (e.g. a quantized one) is called with one index per bag.
    """
    if isinstance(bag, nn.EmbeddingBag):
        return F.embedding(indices, bag.weight, sparse=bag.sparse)
    return bag(indices, torch.arange(indices.shape[0], device=indices.device))
