"""Mixed-dimension (MD) embeddings, Ginart et al. 2019, arXiv:1909.11810.

`md_solver` assigns each table a dimension by the alpha-power rule: with the tables'
row counts n_i (optionally divided by their query frequencies), the smallest table keeps
the base dimension d0 and table i gets d_i = d0 * (n_min / n_i) ** alpha (at least 1,
optionally rounded to the nearest power of two). `PrEmbeddingBag` stores n_i x d_i rows
and projects pooled vectors to d0 with a d_i x d0 matrix, so a table costs
n_i * d_i + d_i * d0 parameters (n_i * d0 when d_i = d0, no projection).
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F


def md_solver(table_sizes, alpha: float, d0: int, round_dim: bool = False, frequencies=None) -> list[int]:
    """Dimension of each table (in the given order) by the alpha-power rule, each in [1, d0]: the smallest table
    (per query, with `frequencies`) keeps d0, table i gets round(d0 * n_min^alpha * n_i^-alpha), with `round_dim`
    the nearest power of two. In float32 and in that order, as the original's md_solver: a dimension that lands
    on .5 rounds as it does there."""
    n = torch.tensor([int(v) for v in table_sizes], dtype=torch.float32, device="cpu")  # whatever the default
    if frequencies is not None:
        n = n / torch.tensor(frequencies, dtype=torch.float32, device="cpu")
    if n.numel() == 0:
        return []
    dims = d0 * (n.min() ** float(alpha)) * n ** (-float(alpha))
    dims[int(torch.argmin(n))] = d0
    dims = torch.round(torch.clamp(dims, min=1.0))
    if round_dim:
        dims = 2 ** torch.round(torch.log2(dims))
    return [int(min(d0, d)) for d in dims.tolist()]


class PrEmbeddingBag(nn.Module):
    """A num_embeddings x embedding_dim sum-pooled table projected to base_dim columns."""

    def __init__(self, num_embeddings: int, embedding_dim: int, base_dim: int, sparse: bool = True):
        super().__init__()
        if embedding_dim > base_dim:
            raise ValueError(f"mixed dimension {embedding_dim} is larger than the base dimension {base_dim}")
        self.embs = nn.EmbeddingBag(int(num_embeddings), int(embedding_dim), mode="sum", sparse=sparse)
        bound = math.sqrt(1.0 / num_embeddings)
        with torch.no_grad():
            self.embs.weight.uniform_(-bound, bound)
        if embedding_dim < base_dim:
            self.proj = nn.Linear(int(embedding_dim), int(base_dim), bias=False)
            nn.init.xavier_uniform_(self.proj.weight)
        else:
            self.proj = nn.Identity()
        self.output_dim = int(base_dim)

    def embed(self, indices: torch.Tensor) -> torch.Tensor:
        """[N, base_dim] projected embedding of each index."""
        return self.proj(F.embedding(indices, self.embs.weight))

    def forward(self, indices, offsets, per_sample_weights=None):
        return self.proj(self.embs(indices, offsets, per_sample_weights=per_sample_weights))
