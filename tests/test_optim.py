"""Each optimizer's sparse update equals a dense reimplementation."""

import pytest
import torch
import torch.nn.functional as F

from dlrmkit.optim import make_optimizer


def sparse_and_dense_grads(seed=0):
    torch.manual_seed(seed)
    weight = torch.randn(10, 4)
    indices = torch.tensor([1, 3, 3, 7, 1, 9])
    offsets = torch.tensor([0, 2, 4])
    upstream = torch.randn(3, 4)
    w_sparse = weight.clone().requires_grad_(True)
    (F.embedding_bag(indices, w_sparse, offsets, mode="sum", sparse=True) * upstream).sum().backward()
    w_dense = weight.clone().requires_grad_(True)
    (F.embedding_bag(indices, w_dense, offsets, mode="sum") * upstream).sum().backward()
    return weight, w_sparse, w_dense


def reference_step(name, weight, grad, state, lr, eps=1e-10, row_wise=False):
    """Dense reference: rows with no gradient are untouched (sparse semantics)."""
    touched = grad.abs().sum(1) > 0
    if name == "sgd":
        return weight - lr * grad
    new = weight.clone()
    if row_wise:
        state[touched] += (grad[touched] ** 2).mean(1)
        new[touched] -= lr * grad[touched] / (state[touched].sqrt() + eps).unsqueeze(1)
    else:
        state[touched] += grad[touched] ** 2
        new[touched] -= lr * grad[touched] / (state[touched].sqrt() + eps)
    return new


@pytest.mark.parametrize("name,row_wise", [("sgd", False), ("adagrad", False), ("rwsadagrad", True)])
def test_sparse_update_matches_dense_reference(name, row_wise):
    weight, w_sparse, w_dense = sparse_and_dense_grads()
    assert w_sparse.grad.is_sparse
    opt = make_optimizer(name, [w_sparse], lr=0.1)
    state = torch.zeros(10) if row_wise else torch.zeros(10, 4)
    expected = weight
    for _ in range(2):  # two steps: the accumulator carries over
        expected = reference_step(name, expected, w_dense.grad, state, 0.1, row_wise=row_wise)
        opt.step()
    torch.testing.assert_close(w_sparse.detach(), expected)


@pytest.mark.parametrize("name", ["adagrad", "rwsadagrad"])
def test_dense_parameters_get_elementwise_adagrad(name):
    torch.manual_seed(0)
    p = torch.randn(3, 2, requires_grad=True)
    g = torch.randn(3, 2)
    start = p.detach().clone()
    p.grad = g.clone()
    make_optimizer(name, [p], lr=0.5).step()
    torch.testing.assert_close(p.detach(), start - 0.5 * g / (g.abs() + 1e-10))


def test_unknown_optimizer_is_an_error():
    with pytest.raises(ValueError, match="--optimizer=adam"):
        make_optimizer("adam", [torch.zeros(1, requires_grad=True)], 0.1)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("name", ["sgd", "adagrad", "rwsadagrad"])
def test_sparse_optimizers_run_on_cuda(name):
    weight, w_sparse, _ = sparse_and_dense_grads()
    cpu_opt = make_optimizer(name, [w_sparse], lr=0.1)
    w_cuda = w_sparse.detach().cuda().requires_grad_(True)
    w_cuda.grad = w_sparse.grad.cuda()
    make_optimizer(name, [w_cuda], lr=0.1).step()
    cpu_opt.step()
    torch.testing.assert_close(w_cuda.detach().cpu(), w_sparse.detach())


@pytest.mark.parametrize("name", ["sgd", "adagrad", "rwsadagrad"])
def test_a_step_leaves_gradients_alone_unless_told_it_may_consume_them(name):
    weight, w_sparse, _ = sparse_and_dense_grads()
    twin = weight.clone().requires_grad_(True)
    twin.grad = w_sparse.grad.clone()
    before = w_sparse.grad.to_dense()
    make_optimizer(name, [w_sparse], lr=0.1).step()
    torch.testing.assert_close(w_sparse.grad.to_dense(), before)  # readable after the step, as torch.optim
    make_optimizer(name, [twin], lr=0.1, consume_grads=True).step()  # what the training loop builds
    torch.testing.assert_close(twin.detach(), w_sparse.detach())
