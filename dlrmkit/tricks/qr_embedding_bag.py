"""Quotient-remainder (QR) compositional embeddings, Shi et al. 2019, arXiv:1909.02107.

A table of n rows is replaced by two: a quotient table of ceil(n/m) rows indexed by
i // m and a remainder table of m rows indexed by i % m (m = --qr-collisions). The
embedding of category i is op(Q[i // m], R[i % m]) with op one of
- mult:   element-wise product   (dim D)
- add:    sum                    (dim D)
- concat: [Q; R]                 (dim 2D)
so a table costs (ceil(n/m) + m) * D parameters instead of n * D.

Bags sum the composed embeddings of their indices, as for a plain table. (The original
pooled Q and R separately and then combined the sums, which for `mult` differs from the
paper's embedding when a bag holds more than one index.)
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from dlrmkit.embeddings import sum_bags, table_rows

QR_OPERATIONS = ("mult", "add", "concat")


class QREmbeddingBag(nn.Module):
    """QR embedding bag, called like nn.EmbeddingBag(mode="sum"): bag(indices, offsets, per_sample_weights)."""

    def __init__(self, num_categories: int, embedding_dim: int, num_collisions: int, operation: str = "mult",
                 sparse: bool = True):
        super().__init__()
        if operation not in QR_OPERATIONS:
            raise ValueError(f"QR operation {operation!r} is not one of {', '.join(QR_OPERATIONS)}")
        if num_collisions < 1:
            raise ValueError(f"QR collisions must be at least 1, got {num_collisions}")
        self.num_categories = int(num_categories)
        self.embedding_dim = int(embedding_dim)
        self.num_collisions = int(num_collisions)
        self.operation = operation
        self.output_dim = 2 * self.embedding_dim if operation == "concat" else self.embedding_dim
        num_quotients = math.ceil(self.num_categories / self.num_collisions)
        self.embs_q = nn.EmbeddingBag(num_quotients, self.embedding_dim, mode="sum", sparse=sparse)
        self.embs_r = nn.EmbeddingBag(self.num_collisions, self.embedding_dim, mode="sum", sparse=sparse)
        self.reset_parameters()

    def reset_parameters(self):
        # U(-b, b) with b = sqrt(1/n) like a plain table; for products each factor gets
        # b = (1/n)^(1/4) so that Q*R has the plain table's scale. (The original's
        # uniform_(w, sqrt(1/n)) drew from U(sqrt(1/n), 1): its argument is the lower bound.)
        bound = (1.0 / self.num_categories) ** (0.25 if self.operation == "mult" else 0.5)
        with torch.no_grad():
            self.embs_q.weight.uniform_(-bound, bound)
            self.embs_r.weight.uniform_(-bound, bound)

    def split(self, indices: torch.Tensor):
        quotient = torch.div(indices, self.num_collisions, rounding_mode="floor")
        return quotient, torch.remainder(indices, self.num_collisions)

    def compose(self, q: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
        if self.operation == "mult":
            return q * r
        if self.operation == "add":
            return q + r
        return torch.cat([q, r], dim=1)

    def embed(self, indices: torch.Tensor) -> torch.Tensor:
        """[N, output_dim] embedding of each index."""
        q, r = self.split(indices)
        return self.compose(table_rows(self.embs_q, q), table_rows(self.embs_r, r))

    def forward(self, indices, offsets, per_sample_weights=None):
        if self.operation == "mult":
            return sum_bags(self.embed(indices), offsets, per_sample_weights)
        # sums commute with add and concat: pool each table with the fused kernel
        q, r = self.split(indices)
        return self.compose(self.embs_q(q, offsets, per_sample_weights=per_sample_weights),
                            self.embs_r(r, offsets, per_sample_weights=per_sample_weights))

    def extra_repr(self):
        return (f"{self.num_categories}, {self.embedding_dim}, collisions={self.num_collisions}, "
                f"operation={self.operation}")
