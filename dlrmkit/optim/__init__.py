"""Optimizers for DLRM: SGD, Adagrad and row-wise Adagrad, each taking sparse
embedding gradients on CPU and CUDA alike, with fused sparse updates."""

from dlrmkit.optim.sparse_optimizers import ADAGRAD_EPS, OPTIMIZERS, SGD, Adagrad, RWSAdagrad, coalesce_rows, make_optimizer

__all__ = ["ADAGRAD_EPS", "OPTIMIZERS", "SGD", "Adagrad", "RWSAdagrad", "coalesce_rows", "make_optimizer"]
