"""Embedding-table variants from the papers the original DLRM cites.

- `qr_embedding_bag.QREmbeddingBag`: quotient-remainder compositional embeddings
  (Shi et al. 2019, arXiv:1909.02107);
- `md_embedding_bag.PrEmbeddingBag` + `md_solver`: mixed-dimension embeddings with a
  projection to the common dimension (Ginart et al. 2019, arXiv:1909.11810);
- `weighted_pooling.PoolingWeights`: one weight per embedding row, fixed or learned.

`table_factory(...)` builds the per-table `make_bag(num_rows, dim)` callable that
`embeddings.EmbeddingBagList` uses, so every table module is called as
bag(indices, offsets, per_sample_weights=None) -> [B, out_dim].
"""

from __future__ import annotations

from dlrmkit.embeddings import create_embedding_bag
from dlrmkit.tricks.md_embedding_bag import PrEmbeddingBag, md_solver
from dlrmkit.tricks.qr_embedding_bag import QREmbeddingBag
from dlrmkit.tricks.weighted_pooling import PoolingWeights

__all__ = ["PoolingWeights", "PrEmbeddingBag", "QREmbeddingBag", "md_solver", "table_factory", "embedding_output_dim"]


def embedding_output_dim(dim: int, qr_flag: bool = False, qr_operation: str = "mult") -> int:
    """Width of every pooled embedding: 2*dim with concatenated QR halves, else dim."""
    return 2 * int(dim) if qr_flag and qr_operation == "concat" else int(dim)


def table_factory(table_sizes, dim, qr_flag=False, qr_operation="mult", qr_collisions=4, qr_threshold=200,
                  md_flag=False, md_threshold=200, md_temperature=0.3, md_round_dims=False, md_dims=None):
    """make_bag(num_rows, dim) for EmbeddingBagList.

    Per table, as the original: QR when qr_flag and rows > qr_threshold, else MD when
    md_flag and rows > md_threshold, else a plain EmbeddingBag. All tables pool to
    `embedding_output_dim(dim, ...)` columns (with QR concat the small plain tables are
    2*dim wide too, so the dot interaction sees one width). The MD dimension of each table comes
    from `md_solver`, or from `md_dims` (one per table, as the original's list-valued m_spa).
    """
    out_dim = embedding_output_dim(dim, qr_flag, qr_operation)
    sizes = [int(n) for n in table_sizes]
    if md_flag and md_dims is None:
        md_dims = md_solver(sizes, md_temperature, out_dim, round_dim=md_round_dims)
    md_dims = dict(zip(sizes, md_dims)) if md_flag else {}

    def make_bag(num_rows, _dim):
        num_rows = int(num_rows)
        if qr_flag and num_rows > qr_threshold:
            return QREmbeddingBag(num_rows, dim, qr_collisions, operation=qr_operation)
        if md_flag and num_rows > md_threshold:
            return PrEmbeddingBag(num_rows, md_dims[num_rows], out_dim)
        return create_embedding_bag(num_rows, out_dim)

    return make_bag
