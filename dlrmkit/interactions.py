"""Feature interactions: how DLRM combines the bottom-MLP output with the pooled embeddings.

An interaction is an `nn.Module` called as interaction(x, ly) with
    x:  [B, D_dense] bottom-MLP output,
    ly: [B, T, D] pooled embeddings,
returning [B, W], the input of the top MLP. Each is registered by name in `INTERACTIONS`
(the values of --arch-interaction-op) and says, before any model is built, how wide its
output is (`output_width`) and which dimensions it needs (`check_dims`):

- `dot` (Naumov et al. 2019, arXiv:1906.00091): x followed by the dot products of every pair
  of the T + 1 feature vectors (x and each table's), i > j, or i >= j with `itself`;
- `cat`: x followed by all pooled embeddings, flattened.

A new interaction is one class here and one entry in `INTERACTIONS`.

    >>> interaction = make_interaction("dot", num_tables=3, itself=False)
    >>> interaction(torch.ones(2, 4), torch.ones(2, 3, 4)).shape
    torch.Size([2, 10])
"""

from __future__ import annotations

import torch
import torch.nn as nn


class Interaction(nn.Module):
    """Base of the interactions; see the module docstring."""

    def __init__(self, num_tables: int, itself: bool = False):
        super().__init__()
        self.num_tables = int(num_tables)
        self.itself = bool(itself)

    @staticmethod
    def output_width(num_tables: int, dense_dim: int, emb_dim: int, itself: bool = False) -> int:
        raise NotImplementedError

    @staticmethod
    def check_dims(dense_dim: int, emb_dim: int) -> str | None:
        """Why these widths cannot interact (a sentence), or None when they can."""
        return None


def gram_pairs(features: torch.Tensor, pair_index: torch.Tensor) -> torch.Tensor:
    """The dot products of the feature vectors [B, F, D] at `pair_index` (positions in the flattened
    [F, F] Gram matrix), [B, P], in float32 also under autocast."""
    if torch.is_autocast_enabled(features.device.type):
        with torch.autocast(features.device.type, enabled=False):
            return gram_pairs(features, pair_index)
    features = features.float()
    return torch.bmm(features, features.transpose(1, 2)).flatten(1).index_select(1, pair_index)


class GramPairs(torch.autograd.Function):
    """`gram_pairs` with a backward that uses the Gram matrix's symmetry.

    The pairs' gradient g [B, P] is gathered into the symmetric [F, F] matrix S with g at (i, j)
    and (j, i) (2g at a self-pair (i, i): d(f.f)/df = 2f) by one column gather of [g, 0, 2g_self]
    at `gather_index` (no scatter), and the features' gradient is S @ features: one bmm, where
    autograd through bmm(f, f^T) runs two and adds them.
    """

    @staticmethod
    def forward(ctx, features, pair_index, gather_index, self_pairs):
        ctx.save_for_backward(features, gather_index, self_pairs)
        return gram_pairs(features, pair_index)

    @staticmethod
    def backward(ctx, grad_pairs):
        features, gather_index, self_pairs = ctx.saved_tensors
        batch, num_features, _ = features.shape
        grad_pairs = grad_pairs.float()
        parts = [grad_pairs, grad_pairs.new_zeros(batch, 1)]
        if self_pairs.numel():
            parts.append(grad_pairs.index_select(1, self_pairs) * 2)
        sym = torch.cat(parts, dim=1).index_select(1, gather_index)
        grad = torch.bmm(sym.view(batch, num_features, num_features), features.float())
        return grad.to(features.dtype), None, None, None


class DotInteraction(Interaction):
    """x, then the pairwise dot products of [x, ly_1, ..., ly_T] in the original's order, in float32."""

    def __init__(self, num_tables: int, itself: bool = False):
        super().__init__(num_tables, itself)
        # pairs (i, j), i > j (or i >= j with self-interaction), in the original's row-major order,
        # as positions in the flattened [F, F] Gram matrix: one index_select per forward; (j, i) for the backward
        num_features = self.num_tables + 1
        rows, cols = torch.tril_indices(num_features, num_features, offset=0 if self.itself else -1)
        self.register_buffer("pair_index", rows * num_features + cols, persistent=False)
        # the backward's gather: Gram position -> its pair's column of [g, 0, 2 g_self] (P: the zero);
        # from Python integers (the same row-major pairs), so that a model built on the meta device gets them too
        pairs = [(i, j) for i in range(num_features) for j in range(i + 1 if self.itself else i)]
        gather = [len(pairs)] * (num_features * num_features)
        for p, (i, j) in enumerate(pairs):
            gather[i * num_features + j] = gather[j * num_features + i] = p
        self_pairs = [p for p, (i, j) in enumerate(pairs) if i == j]
        for k, p in enumerate(self_pairs):
            i = pairs[p][0]
            gather[i * num_features + i] = len(pairs) + 1 + k
        self.register_buffer("gather_index", torch.tensor(gather, dtype=torch.int64), persistent=False)
        self.register_buffer("self_pairs", torch.tensor(self_pairs, dtype=torch.int64), persistent=False)

    @staticmethod
    def output_width(num_tables, dense_dim, emb_dim, itself=False):
        num_features = num_tables + 1
        pairs = num_features * (num_features + 1) // 2 if itself else num_features * (num_features - 1) // 2
        return dense_dim + pairs

    @staticmethod
    def check_dims(dense_dim, emb_dim):
        if dense_dim != emb_dim:
            return "the dot interaction needs them equal"
        return None

    def forward(self, x, ly):
        # in float32 under autocast too: tiny products, where bf16 only adds casts and rounding
        x = x.float()
        features = torch.cat([x.unsqueeze(1), ly.float()], dim=1)  # [B, T+1, D]
        if torch.is_grad_enabled() and features.requires_grad:
            pairs = GramPairs.apply(features, self.pair_index, self.gather_index, self.self_pairs)
        else:  # the same arithmetic as plain operators (ONNX export, tracing, inference)
            pairs = gram_pairs(features, self.pair_index)
        return torch.cat([x, pairs], dim=1)


class CatInteraction(Interaction):
    """x, then every pooled embedding: [x, ly_1, ..., ly_T] flattened."""

    @staticmethod
    def output_width(num_tables, dense_dim, emb_dim, itself=False):
        return dense_dim + num_tables * emb_dim

    def forward(self, x, ly):
        return torch.cat([x, ly.to(x.dtype).flatten(1)], dim=1)


INTERACTIONS = {"dot": DotInteraction, "cat": CatInteraction}


def interaction_class(name: str) -> type[Interaction]:
    """The interaction registered as `name`; ValueError naming the choices otherwise."""
    if name not in INTERACTIONS:
        raise ValueError(f"--arch-interaction-op={name} is not supported ({', '.join(INTERACTIONS)})")
    return INTERACTIONS[name]


def make_interaction(name: str, num_tables: int, itself: bool = False) -> Interaction:
    return interaction_class(name)(num_tables, itself)


def interaction_width(name: str, itself: bool, num_tables: int, dense_dim: int, emb_dim: int) -> int:
    """Width of the interaction's output, i.e. the input width the top MLP must have."""
    return interaction_class(name).output_width(num_tables, dense_dim, emb_dim, itself)
