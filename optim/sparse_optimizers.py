"""Adagrad and row-wise sparse Adagrad that run on any device.

Dense gradients get the usual element-wise Adagrad update. Sparse gradients
(from `EmbeddingBag(sparse=True)`) touch only the rows they name:
- `Adagrad`: element-wise accumulator, as `torch.optim.Adagrad`;
- `RWSAdagrad`: one accumulator per row, the mean of the squared gradient of
  that row (the original's `optim/rwsadagrad.py`), 1/D of Adagrad's state.

Both use `index_add_`/`index_select` on the coalesced gradient, which works on
CPU and CUDA (the original refused the GPU for these).
"""

from __future__ import annotations

import torch


class _SparseAwareAdagrad(torch.optim.Optimizer):
    row_wise_sparse = False

    def __init__(self, params, lr=0.01, eps=1e-10, initial_accumulator_value=0.0):
        if lr < 0.0:
            raise ValueError(f"invalid learning rate {lr}")
        super().__init__(params, dict(lr=lr, eps=eps, initial_accumulator_value=initial_accumulator_value))

    def _state_for(self, p, sparse):
        state = self.state[p]
        if "sum" not in state:
            init = self.param_groups[0]["initial_accumulator_value"]
            shape = p.shape[:1] if (sparse and self.row_wise_sparse) else p.shape
            state["sum"] = torch.full(shape, init, dtype=p.dtype, device=p.device)
        return state["sum"]

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure() if closure is not None else None
        for group in self.param_groups:
            lr, eps = group["lr"], group["eps"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                grad = p.grad
                if grad.is_sparse:
                    self._sparse_update(p, grad.coalesce(), lr, eps)
                else:
                    acc = self._state_for(p, sparse=False)
                    acc.addcmul_(grad, grad)
                    p.addcdiv_(grad, acc.sqrt().add_(eps), value=-lr)
        return loss

    def _sparse_update(self, p, grad, lr, eps):
        rows = grad.indices()[0]
        values = grad.values()
        acc = self._state_for(p, sparse=True)
        if self.row_wise_sparse:
            acc.index_add_(0, rows, values.pow(2).mean(dim=1))
            std = acc.index_select(0, rows).sqrt_().add_(eps).unsqueeze(1)
        else:
            acc.index_add_(0, rows, values.pow(2))
            std = acc.index_select(0, rows).sqrt_().add_(eps)
        p.index_add_(0, rows, values / std, alpha=-lr)


class Adagrad(_SparseAwareAdagrad):
    """Adagrad with element-wise state for dense and sparse gradients."""


class RWSAdagrad(_SparseAwareAdagrad):
    """Row-wise sparse Adagrad: element-wise for dense gradients, one value per row for sparse ones."""

    row_wise_sparse = True


OPTIMIZERS = {
    "sgd": torch.optim.SGD,
    "adagrad": Adagrad,
    "rwsadagrad": RWSAdagrad,
}


def make_optimizer(name: str, params, lr: float) -> torch.optim.Optimizer:
    if name not in OPTIMIZERS:
        raise ValueError(f"--optimizer={name} is not one of {', '.join(OPTIMIZERS)}")
    return OPTIMIZERS[name](params, lr=lr)
