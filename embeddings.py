"""Embedding-table collections: the sparse half of DLRM.

A collection turns the flat sparse layout of `dlrm_data.Batch` (one `indices`
array, `offsets` of T*B+1 bag starts, table-major) into pooled embeddings of
shape [B, T, D]. `DLRM_Net` holds one as `emb_l`.

Each table is initialised from its own random stream, seeded by one draw from
torch's global RNG and the table's index (`table_rng`): a table gets the same
initial values whether a process builds all tables or, in a model-parallel
run, only some of them.
"""

from __future__ import annotations

import contextlib
import math

import numpy as np
import torch
import torch.nn as nn


def create_embedding_bag(num_rows: int, dim: int) -> nn.EmbeddingBag:
    """A sum-pooled EmbeddingBag with sparse gradients, rows ~ U(-sqrt(1/n), sqrt(1/n)) as the original."""
    bag = nn.EmbeddingBag(int(num_rows), int(dim), mode="sum", sparse=True)
    bound = math.sqrt(1.0 / num_rows)
    with torch.no_grad():
        bag.weight.uniform_(-bound, bound)
    return bag


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
