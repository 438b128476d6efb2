"""SGD, Adagrad and row-wise sparse Adagrad with fused sparse updates, on any device.

Sparse gradients (from `EmbeddingBag(sparse=True)`, above all the one weight of
`dlrmkit.embeddings.BatchedEmbeddingBags`) are coalesced once per step by
`coalesce_rows` (sort the row ids, sum each row's values with one
`embedding_bag` call) and applied with a few whole-tensor row operations (`add_rows_`): no
per-table Python loop, none of `torch.sparse`'s serial CPU kernels, and on CUDA
no host synchronisation (no tensor size depends on the data there). Dense
parameters are updated together with `torch._foreach_*` kernels.

- `SGD`: p -= lr * g; `update_bags_` applies it to sum-pooled rows straight from the gradient of
  their bags (`kernels.bag_sgd_`), for a lookup whose backward does the step itself
  (`BatchedEmbeddingBags.fuse_optimizer`).
- `Adagrad`: element-wise accumulator, as `torch.optim.Adagrad`; `update_bags_` as SGD's (on the CPU
  natively: `kernels.adagrad_bag_rows_`).
- `RWSAdagrad`: element-wise for dense gradients, one accumulator per row for
  sparse ones: the mean of the squared gradient of that row (the original's
  `optim/rwsadagrad.py`), 1/D of Adagrad's state.

The original refused the GPU for Adagrad and row-wise Adagrad; these run anywhere.
With `torch.amp.GradScaler` (fp16), `GradScaler.step` hands these optimizers the
scale and the inf/NaN flag as device tensors (`_step_supports_amp_scaling`):
gradients are unscaled inside the step and a step with inf/NaN gradients
changes nothing, without reading the flag on the host.
"""

from __future__ import annotations

from collections import defaultdict

import torch
import torch.nn.functional as F

from dlrmkit import kernels
from dlrmkit.sparse import bag_of_each_index


def coalesce_rows(grad: torch.Tensor, sync_free: bool | None = None):
    """(rows, values) of a sparse row gradient [R, ...]: each touched row once, rows sorted, values summed.

    With `sync_free` (the default off the CPU) no tensor size depends on the data: the result
    keeps the input's nnz, its entries past the distinct rows being zero-valued repeats of the
    last row, which additive updates (`add_rows_`) ignore. On the CPU reading the number of
    distinct rows costs nothing and the result is exact-size.
    """
    if grad.sparse_dim() != 1:
        raise ValueError(f"expected a row-sparse gradient (sparse_dim 1), got sparse_dim {grad.sparse_dim()}")
    rows, values = grad._indices()[0], grad._values()
    if grad.is_coalesced() or rows.numel() == 0:
        return rows, values
    if sync_free is None:
        sync_free = rows.device.type != "cpu"
    n = rows.numel()
    distinct, order, starts = row_segments(rows, sync_free)
    return distinct, segment_sums(values.reshape(n, -1), order, starts).view(-1, *values.shape[1:])


def segment_sums(values: torch.Tensor, order: torch.Tensor, starts: torch.Tensor) -> torch.Tensor:
    """[S, D]: row k the sum of values[order[starts[k]:starts[k + 1]]] (the last: to the end), in that order
    (`row_segments`' segments of values [N, D]): embedding_bag as a parallel segment sum."""
    return F.embedding_bag(order, values, starts, mode="sum")


def lookup_gradient_rows(bag_grads: torch.Tensor, bag_of: torch.Tensor, index_weights=None) -> torch.Tensor:
    """[N, D] the values of the sparse gradient a sum-pooled lookup's backward gives its N ids: the gradient
    row of each id's bag (bag_of [N]), times its index weight (index_weights [N] or None)."""
    values = bag_grads.index_select(0, bag_of)
    if index_weights is not None:
        values.mul_(index_weights.unsqueeze(1).to(values.dtype))
    return values


def row_segments(rows: torch.Tensor, sync_free: bool = False):
    """(distinct rows [S], order [N], starts [S]) of N row ids (int64, N >= 1): order sorts them (stable: a row's
    ids in ascending position), and the ids of the k-th distinct row are order[starts[k]:starts[k + 1]] (the
    last: to N); `sync_free`: as `coalesce_rows` says, S = N with the unused segments starting at N."""
    n = rows.numel()
    sorted_rows, order = torch.sort(rows, stable=True)
    is_first = torch.ones_like(sorted_rows, dtype=torch.bool)
    torch.ne(sorted_rows[1:], sorted_rows[:-1], out=is_first[1:])
    if sync_free:
        segment = torch.cumsum(is_first, 0) - 1  # segment of each sorted entry
        starts = torch.searchsorted(segment, torch.arange(n, device=rows.device))  # n for unused segments
    else:
        starts = is_first.nonzero().squeeze(1)
    return sorted_rows[starts.clamp(max=n - 1)], order, starts


def add_rows_(target: torch.Tensor, rows: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """target[rows[i]] += values[i], duplicates summed: scatter_add_ over an expanded index, which
    PyTorch runs as a parallel sort-and-reduce on the CPU (index_add_ walks the rows one by one)."""
    if values.dim() == 1:
        return target.index_add_(0, rows, values)
    return target.scatter_add_(0, rows.view(-1, *([1] * (values.dim() - 1))).expand_as(values), values)


def _group_by_device_and_dtype(*tensor_lists):
    groups = defaultdict(lambda: tuple([] for _ in tensor_lists))
    for items in zip(*tensor_lists):
        key = (items[0].device, items[0].dtype)
        for bucket, item in zip(groups[key], items):
            bucket.append(item)
    return groups.values()


def torch_optimizer_kind(param_groups) -> str | None:
    """"SGD" or "Adagrad" (torch.optim's, or the original's RWSAdagrad) for the param_groups of a torch.optim-style
    state by the settings they hold; None when they hold neither's."""
    keys = set().union(*(group.keys() for group in param_groups)) if param_groups else set()
    if keys & {"initial_accumulator_value", "lr_decay"}:
        return "Adagrad"
    if keys & {"momentum", "dampening", "nesterov"}:
        return "SGD"
    return None


class _FusedSparseOptimizer:
    """Splits gradients into one foreach update of the dense ones and one fused update per sparse one.

    It has what the trainer, checkpoints and `torch.amp.GradScaler` use of `torch.optim.Optimizer`
    (`param_groups`, `state`, `zero_grad`, `state_dict`/`load_state_dict` in torch's format) without
    deriving from it: constructing any `torch.optim.Optimizer` imports `torch._dynamo`, 1-2 s of
    start-up on these machines.
    """

    _step_supports_amp_scaling = True  # see GradScaler.step: sets self.grad_scale and self.found_inf
    needs_coalesced_rows = True

    def __init__(self, params, defaults, consume_grads=False):
        self.defaults = dict(defaults)
        # the caller drops the gradients after each step, so a step may overwrite them (a training
        # loop that zeroes them next): saves a pass and a buffer the size of a sparse gradient
        self.consume_grads = consume_grads
        self.state = defaultdict(dict)
        self.param_groups = []
        groups = list(params)
        if not groups:
            raise ValueError("optimizer got an empty parameter list")
        for group in groups if isinstance(groups[0], dict) else [{"params": groups}]:
            self.add_param_group(group)

    def add_param_group(self, group: dict):
        group = dict(group)
        params = group["params"]
        group["params"] = [params] if isinstance(params, torch.Tensor) else list(params)
        for key, value in self.defaults.items():
            group.setdefault(key, value)
        seen = {id(p) for g in self.param_groups for p in g["params"]}
        if any(id(p) in seen for p in group["params"]):
            raise ValueError("some parameters appear in more than one parameter group")
        self.param_groups.append(group)

    def zero_grad(self, set_to_none: bool = True):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                if set_to_none or p.grad.is_sparse:
                    p.grad = None
                else:
                    p.grad.detach_().zero_()

    def state_dict(self) -> dict:
        """{"state": {param number: {...}}, "param_groups": [{..., "params": [param numbers]}]}, as torch's, and
        "optimizer": the class's name (`load_state_dict` refuses another's state; torch.optim ignores it)."""
        numbers, groups = {}, []
        for group in self.param_groups:
            packed = {k: v for k, v in group.items() if k != "params"}
            packed["params"] = [numbers.setdefault(id(p), len(numbers)) for p in group["params"]]
            groups.append(packed)
        state = {numbers[id(p)]: dict(s) for p, s in self.state.items() if id(p) in numbers}
        return {"state": state, "param_groups": groups, "optimizer": type(self).__name__}

    def load_state_dict(self, state_dict: dict):
        saved_groups, saved_state = state_dict["param_groups"], state_dict["state"]
        saved_by = state_dict.get("optimizer", type(self).__name__)  # absent from torch's and older states
        if saved_by != type(self).__name__:
            raise ValueError(f"the state was saved by {saved_by}, not {type(self).__name__}")
        kind = torch_optimizer_kind(saved_groups)  # torch.optim's (the original's checkpoints): by its settings
        if "optimizer" not in state_dict and kind is not None and kind != self._torch_kind:
            raise ValueError(f"the state was saved by an {kind}-like optimizer (its settings "
                             f"{sorted(k for k in saved_groups[0] if k != 'params')}), not {type(self).__name__}")
        if len(saved_groups) != len(self.param_groups):
            raise ValueError("the saved state has a different number of parameter groups")
        by_number = {}
        for saved, group in zip(saved_groups, self.param_groups):
            if len(saved["params"]) != len(group["params"]) and saved_state:
                raise ValueError(f"the saved state has {len(saved['params'])} parameters in a group of "
                                 f"{len(group['params'])}")
            by_number.update(zip(saved["params"], group["params"]))
        state = defaultdict(dict)
        for number, param_state in saved_state.items():
            p = by_number[int(number)]
            for key, value in param_state.items():
                if isinstance(value, torch.Tensor):
                    if value.dim() and value.shape not in self._state_shapes(p):
                        raise ValueError(f"saved '{key}' of shape {list(value.shape)} for a parameter of shape "
                                         f"{list(p.shape)}")
                    # a copy: the saved dict may belong to a live optimizer
                    value = value.to(device=p.device, dtype=p.dtype if value.is_floating_point() else value.dtype,
                                     copy=True)
                state[p][key] = value
        self.state = state
        for saved, group in zip(saved_groups, self.param_groups):
            group.update({k: v for k, v in saved.items() if k != "params"})

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        grad_factor = self._amp_grad_factor()
        for group in self.param_groups:
            dense_params, dense_grads = [], []
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    if self.needs_coalesced_rows:
                        rows, values = coalesce_rows(p.grad)
                    else:
                        rows, values = p.grad._indices()[0], p.grad._values()
                    self._sparse_update(p, rows, _unscale(values, grad_factor), group)
                else:
                    dense_params.append(p)
                    dense_grads.append(_unscale(p.grad, grad_factor))
            for params, grads in _group_by_device_and_dtype(dense_params, dense_grads):
                self._dense_update(params, grads, group)
        return loss

    def _state_shapes(self, p) -> tuple:
        """The shapes a tensor of p's saved state may have: p's, or one value per row (row-wise state)."""
        return p.shape, p.shape[:1]

    def _bags_group(self, p, indices, offsets, bag_grads, index_weights) -> dict:
        """p's parameter group, for an `update_bags_` of these operands; ValueError when p is not a parameter
        of this optimizer or the operands do not fit together, RuntimeError under GradScaler."""
        group = next((g for g in self.param_groups if any(q is p for q in g["params"])), None)
        if group is None:
            raise ValueError("update_bags_ got a tensor that is not one of this optimizer's parameters")
        if self._amp_grad_factor() is not None:
            raise RuntimeError("a fused embedding update cannot unscale gradients (GradScaler): unfuse it")
        if bag_grads.dim() != 2 or bag_grads.shape[0] != offsets.numel() - 1 or bag_grads.shape[1] != p.shape[1]:
            raise ValueError(f"update_bags_: a gradient of shape {list(bag_grads.shape)} for {offsets.numel() - 1} "
                             f"bags of width {p.shape[1]}")
        if index_weights is not None and index_weights.shape != indices.shape:
            raise ValueError(f"update_bags_: {index_weights.numel()} index weights for {indices.numel()} ids")
        return group

    def _amp_grad_factor(self):
        """1/scale, or 0 when GradScaler found inf/NaN gradients (a device tensor); None without GradScaler."""
        grad_scale = getattr(self, "grad_scale", None)
        found_inf = getattr(self, "found_inf", None)
        if grad_scale is None and found_inf is None:
            return None
        device = (grad_scale if grad_scale is not None else found_inf).device
        factor = torch.ones((), dtype=torch.float32, device=device)
        if grad_scale is not None:
            factor = factor / grad_scale
        if found_inf is not None:
            factor = torch.where(found_inf > 0, torch.zeros_like(factor), factor)
        return factor

    def _dense_update(self, params, grads, group):
        raise NotImplementedError

    def _sparse_update(self, p, rows, values, group):
        raise NotImplementedError


def _unscale(grad, factor):
    if factor is None:
        return grad
    # a skipped step (factor 0) must not turn inf * 0 into NaN
    return torch.nan_to_num(grad, nan=0.0, posinf=0.0, neginf=0.0).mul_(factor.to(grad.dtype))


class SGD(_FusedSparseOptimizer):
    """Plain SGD (no momentum, no weight decay), p -= lr * g, as the original's torch.optim.SGD."""

    needs_coalesced_rows = False  # additive: duplicate rows are summed by add_rows_ itself
    _torch_kind = "SGD"  # the torch.optim state it loads (torch_optimizer_kind)
    bags_dtypes = (torch.float32, torch.bfloat16)  # of the tables update_bags_ takes

    def __init__(self, params, lr=0.01, consume_grads=False):
        if lr < 0.0:
            raise ValueError(f"invalid learning rate {lr}")
        super().__init__(params, dict(lr=lr), consume_grads)

    def _dense_update(self, params, grads, group):
        torch._foreach_add_(params, grads, alpha=-group["lr"])

    def _sparse_update(self, p, rows, values, group):
        values = values.to(p.dtype)
        add_rows_(p, rows, values.mul_(-group["lr"]) if self.consume_grads else values * -group["lr"])

    def update_bags_(self, p, indices, offsets, bag_grads, index_weights=None, bags_per_table=0, table_ids=None):
        """p -= lr * (the gradient of sum-pooled bags of p's rows), at once: what `step()` does with
        the sparse gradient `F.embedding_bag(indices, p, offsets, mode="sum", per_sample_weights=
        index_weights, include_last_offset=True, sparse=True)` gets from `bag_grads` [K, D], bit for
        bit, without that [N, D] gradient (`kernels.bag_sgd_`). Called in the backward of a collection
        fused with this optimizer (`BatchedEmbeddingBags.fuse_optimizer`); uses p's group's current lr. For a
        bfloat16 p, `bags_per_table` and `table_ids` (the model's number of each table) choose the rounding
        bits as `kernels.bag_sgd_` says."""
        group = self._bags_group(p, indices, offsets, bag_grads, index_weights)
        seed = 0
        if p.dtype == torch.bfloat16:  # stochastic rounding: other random bits at every update, resumable
            state = self.state[p]
            seed = state["rounding_seed"] = state.get("rounding_seed", 0) + 1
        kernels.bag_sgd_(p, indices, offsets, bag_grads, -group["lr"], index_weights, seed=seed,
                         bags_per_table=bags_per_table, table_ids=table_ids)


ADAGRAD_EPS = 1e-10  # torch.optim.Adagrad's, the original's


class _Adagrad(_FusedSparseOptimizer):
    row_wise_sparse = False
    _torch_kind = "Adagrad"

    def __init__(self, params, lr=0.01, eps=ADAGRAD_EPS, initial_accumulator_value=0.0, consume_grads=False):
        if lr < 0.0:
            raise ValueError(f"invalid learning rate {lr}")
        super().__init__(params, dict(lr=lr, eps=eps, initial_accumulator_value=initial_accumulator_value),
                         consume_grads)

    def _state_shapes(self, p) -> tuple:
        return (p.shape, p.shape[:1]) if self.row_wise_sparse else (p.shape,)

    def _state_for(self, p, sparse, group):
        state = self.state[p]
        if "sum" not in state:
            shape = p.shape[:1] if (sparse and self.row_wise_sparse) else p.shape
            state["sum"] = torch.full(shape, group["initial_accumulator_value"], dtype=p.dtype, device=p.device)
        return state["sum"]

    def _dense_update(self, params, grads, group):
        sums = [self._state_for(p, False, group) for p in params]
        torch._foreach_addcmul_(sums, grads, grads)
        std = torch._foreach_sqrt(sums)
        torch._foreach_add_(std, group["eps"])
        torch._foreach_addcdiv_(params, grads, std, value=-group["lr"])

    def _sparse_update(self, p, rows, values, group):
        values = values.to(p.dtype)
        acc = self._state_for(p, True, group)
        if self.row_wise_sparse:
            add_rows_(acc, rows, values.square().mean(dim=1))
            std = acc.index_select(0, rows).sqrt_().add_(group["eps"]).unsqueeze(1)
        else:
            add_rows_(acc, rows, values.square())
            std = acc.index_select(0, rows).sqrt_().add_(group["eps"])
        step = values.div_(std) if self.consume_grads else values.div(std)
        add_rows_(p, rows, step.mul_(-group["lr"]))


class Adagrad(_Adagrad):
    """Adagrad with element-wise state for dense and sparse gradients."""

    bags_dtypes = (torch.float32,)  # of the tables update_bags_ takes

    @torch.no_grad()
    def update_bags_(self, p, indices, offsets, bag_grads, index_weights=None, bags_per_table=0, table_ids=None):
        """Adagrad's step on p's rows from the gradient of sum-pooled bags of them, at once: what `step()` does
        with the sparse gradient `F.embedding_bag(indices, p, offsets, mode="sum", per_sample_weights=
        index_weights, include_last_offset=True, sparse=True)` gets from `bag_grads` [K, D], for a float32 p
        (ValueError for another): natively without that [N, D] gradient (`kernels.adagrad_bag_rows_`: the same
        up to the rounding of the square root), else through it (bit for bit). Called in the backward of a
        collection fused with this optimizer (`BatchedEmbeddingBags.fuse_optimizer`); uses p's group's current
        lr and eps. Adagrad is not additive: p's rows must be looked up once per backward (two lookups would
        be two steps). bags_per_table and table_ids: unused (SGD's rounding of bfloat16 tables)."""
        group = self._bags_group(p, indices, offsets, bag_grads, index_weights)
        if p.dtype not in self.bags_dtypes:
            raise ValueError(f"a fused Adagrad update takes float32 tables, not {p.dtype}: unfuse it")
        state = self._state_for(p, True, group)  # as step() would, even when no row is looked up
        if indices.numel() == 0:
            return
        bag_grads = bag_grads.contiguous()
        bag_of = bag_of_each_index(offsets[:-1], indices)
        distinct, order, starts = row_segments(indices)
        if kernels.adagrad_bag_rows_(p, state, distinct, torch.cat([starts, starts.new_tensor([indices.numel()])]),
                                     order, bag_of, bag_grads, index_weights, group["lr"], group["eps"]):
            return
        # the lookup's sparse gradient, then what step() does with it
        values = lookup_gradient_rows(bag_grads, bag_of, index_weights)
        self._sparse_update(p, distinct, segment_sums(values, order, starts), group)


class RWSAdagrad(_Adagrad):
    """Row-wise sparse Adagrad: element-wise for dense gradients, one value per row for sparse ones."""

    row_wise_sparse = True


OPTIMIZERS = {
    "sgd": SGD,
    "adagrad": Adagrad,
    "rwsadagrad": RWSAdagrad,
}


def make_optimizer(name: str, params, lr: float, consume_grads: bool = False,
                   eps: float | None = None) -> "_FusedSparseOptimizer":
    """The optimizer `name` (sgd, adagrad, rwsadagrad) over `params` at learning rate `lr`; `eps`: the
    Adagrads' epsilon added to the root of the squared-gradient sums (default ADAGRAD_EPS).

    It offers what the trainer uses of `torch.optim.Optimizer` (see `_FusedSparseOptimizer`);
    `consume_grads`: the caller never reads gradients after a step (the training loop), so the
    step may overwrite them instead of copying. Raises ValueError for another name."""
    if name not in OPTIMIZERS:
        raise ValueError(f"--optimizer={name} is not one of {', '.join(OPTIMIZERS)}")
    if eps is None:
        return OPTIMIZERS[name](params, lr=lr, consume_grads=consume_grads)
    if not issubclass(OPTIMIZERS[name], _Adagrad):
        raise ValueError(f"an epsilon applies to the Adagrad optimizers, not --optimizer={name}")
    return OPTIMIZERS[name](params, lr=lr, eps=eps, consume_grads=consume_grads)
