"""Optimizers for DLRM: SGD, Adagrad and row-wise Adagrad, each taking sparse
embedding gradients on CPU and CUDA alike."""

from optim.sparse_optimizers import OPTIMIZERS, Adagrad, RWSAdagrad, make_optimizer

__all__ = ["OPTIMIZERS", "Adagrad", "RWSAdagrad", "make_optimizer"]
