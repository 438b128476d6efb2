"""Batched embedding tables against one nn.EmbeddingBag per table: outputs, updates, checkpoints."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from dlrmkit import embeddings, kernels
from dlrm_s_pytorch import DLRM_Net, create_embeddings, interaction_width
from dlrmkit.embeddings import BatchedEmbeddingBags, EmbeddingBagList
from dlrmkit.optim import coalesce_rows, make_optimizer
from dlrmkit.sparse import SparseFeatures
from helpers import random_batch

TABLES = [5, 1, 7, 3]


def naive_pool(tables_weights, batch):
    """Loops: bag (t, b) = sum of rows of table t named in it."""
    B, T = batch.batch_size, batch.num_tables
    out = torch.zeros(B, T, tables_weights[0].shape[1])
    for t in range(T):
        for b in range(B):
            start, stop = int(batch.offsets[t * B + b]), int(batch.offsets[t * B + b + 1])
            for i in batch.indices[start:stop].tolist():
                out[b, t] += tables_weights[t][i]
    return out


def test_batched_pooling_equals_one_embedding_bag_per_table():
    torch.manual_seed(0)
    per_table = EmbeddingBagList(TABLES, 4)
    batched = BatchedEmbeddingBags(TABLES, 4)
    batched.load_state_dict(per_table.state_dict())
    batch = random_batch()
    expected = naive_pool([bag.weight.detach() for bag in per_table], batch)
    torch.testing.assert_close(per_table(batch.sparse), expected)
    torch.testing.assert_close(batched(batch.sparse), expected)


def twin_nets(tables=(5, 1, 7, 3), dim=4):
    """Two DLRM_Nets with identical parameters: batched tables and one EmbeddingBag per table."""
    torch.manual_seed(0)
    width = interaction_width("dot", False, len(tables), dim, dim)
    kwargs = dict(arch_interaction_op="dot", sigmoid_top=1)
    batched = DLRM_Net(dim, list(tables), [3, 8, dim], [width, 6, 1], **kwargs)
    per_table = DLRM_Net(dim, list(tables), [3, 8, dim], [width, 6, 1],
                         embeddings=create_embeddings(list(tables), dim, per_table=True), **kwargs)
    per_table.load_state_dict(batched.state_dict())
    assert isinstance(batched.emb_l, BatchedEmbeddingBags) and isinstance(per_table.emb_l, EmbeddingBagList)
    return batched, per_table


def train_steps(model, optimizer, batches):
    losses = []
    for batch in batches:
        optimizer.zero_grad()
        z = model(batch.dense_x, batch.offsets, batch.indices)
        loss = F.binary_cross_entropy(z, batch.target)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("name", ["sgd", "adagrad", "rwsadagrad"])
def test_batched_updates_equal_per_table_updates(name):
    batched, per_table = twin_nets()
    batches = [random_batch(seed=s) for s in range(4)]
    losses_batched = train_steps(batched, make_optimizer(name, batched.parameters(), 0.1), batches)
    losses_per_table = train_steps(per_table, make_optimizer(name, per_table.parameters(), 0.1), batches)
    assert losses_batched == pytest.approx(losses_per_table, rel=1e-5)
    after_batched, after_per_table = batched.state_dict(), per_table.state_dict()
    assert list(after_batched) == list(after_per_table)
    for key in after_per_table:
        torch.testing.assert_close(after_batched[key], after_per_table[key], rtol=1e-5, atol=1e-6)
    assert not torch.equal(after_batched["emb_l.0.weight"], twin_nets()[0].state_dict()["emb_l.0.weight"])


@pytest.mark.filterwarnings("ignore:Sparse invariant checks")  # torch.optim.Adagrad's own sparse tensors
@pytest.mark.parametrize("name,torch_optimizer", [("sgd", torch.optim.SGD), ("adagrad", torch.optim.Adagrad)])
def test_batched_updates_equal_torch_optimizers_on_per_table_bags(name, torch_optimizer):
    batched, per_table = twin_nets()
    batches = [random_batch(seed=s) for s in range(3)]
    train_steps(batched, make_optimizer(name, batched.parameters(), 0.1), batches)
    train_steps(per_table, torch_optimizer(per_table.parameters(), lr=0.1), batches)
    for key, value in per_table.state_dict().items():
        torch.testing.assert_close(batched.state_dict()[key], value, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("native", [True, False])
@pytest.mark.parametrize("name", ["sgd", "adagrad"])
def test_fused_optimizer_training_equals_the_optimizer_step(name, native, monkeypatch):
    if not native:  # the fallback without the kernels: through the sparse gradient
        monkeypatch.setattr(kernels, "_library", lambda: (None, "switched off by the test"))
    elif not kernels.native():
        pytest.skip(f"no native kernels: {kernels.status()}")
    fused, _ = twin_nets()
    unfused, _ = twin_nets()
    batches = [random_batch(seed=s) for s in range(5)]
    optimizer = make_optimizer(name, fused.parameters(), 0.1)
    fused.emb_l.fuse_optimizer(optimizer)
    losses_fused = train_steps(fused, optimizer, batches)
    unfused_optimizer = make_optimizer(name, unfused.parameters(), 0.1)
    losses = train_steps(unfused, unfused_optimizer, batches)
    assert fused.emb_l.weight.grad is None  # the update happened in the backward
    # bit for bit, but for the native Adagrad's square root (correctly rounded; PyTorch's may be 1 ulp off)
    same = torch.equal if name == "sgd" or not native else (
        lambda a, b: torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7) is None)
    assert losses_fused == losses if name == "sgd" or not native else losses_fused == pytest.approx(losses, rel=1e-6)
    for key, value in unfused.state_dict().items():
        assert same(fused.state_dict()[key], value), key
    for key, value in unfused_optimizer.state_dict()["state"].items():  # Adagrad's sums too
        assert all(same(optimizer.state_dict()["state"][key][k], v) for k, v in value.items()), key


@pytest.mark.parametrize("native", [True, False])
def test_adagrad_update_of_bags_equals_its_step_on_the_lookups_sparse_gradient(native, monkeypatch):
    """Weighted ids, repeated rows within and across bags, empty bags, the threaded kernel."""
    if not native:
        monkeypatch.setattr(kernels, "_library", lambda: (None, "switched off by the test"))
    elif not kernels.native():
        pytest.skip(f"no native kernels: {kernels.status()}")
    monkeypatch.setattr(kernels, "OPENMP_MIN_ELEMENTS", 1)
    monkeypatch.setattr(kernels, "PARALLEL_MIN_ELEMENTS", 1)
    previous = torch.get_num_threads()
    torch.set_num_threads(3)  # three parts of the segments, whatever the machine
    try:
        check_adagrad_update_of_bags(native)
    finally:
        torch.set_num_threads(previous)


def check_adagrad_update_of_bags(native):
    g = torch.Generator().manual_seed(0)
    rows, dim, bags = 40, 16, 30
    lengths = torch.randint(0, 7, (bags,), generator=g)
    indices = torch.randint(0, rows, (int(lengths.sum()),), generator=g)
    offsets = torch.cat([torch.zeros(1, dtype=torch.int64), lengths.cumsum(0)])
    bag_grads = torch.randn(bags, dim, generator=g)
    for index_weights in (None, torch.rand(indices.numel(), generator=g)):
        start = torch.randn(rows, dim, generator=g)
        fused_weight, stepped_weight = torch.nn.Parameter(start.clone()), torch.nn.Parameter(start.clone())
        fused, stepped = (make_optimizer("adagrad", [w], 0.05, eps=1e-8) for w in (fused_weight, stepped_weight))
        for _ in range(3):  # the second and later steps start from non-zero sums
            fused.update_bags_(fused_weight, indices, offsets, bag_grads, index_weights)
            pooled = F.embedding_bag(indices, stepped_weight, offsets, mode="sum", sparse=True,
                                     per_sample_weights=index_weights, include_last_offset=True)
            pooled.backward(bag_grads)
            stepped.step()
            stepped.zero_grad()
        if native:  # the float32 arithmetic of the step, with a correctly rounded square root
            torch.testing.assert_close(fused_weight, stepped_weight, rtol=1e-6, atol=1e-7)
            torch.testing.assert_close(fused.state[fused_weight]["sum"], stepped.state[stepped_weight]["sum"])
            weight, state = naive_adagrad_steps(start, indices, offsets, bag_grads,
                                                index_weights, 0.05, 1e-8, steps=3)
            assert torch.equal(fused_weight, weight) and torch.equal(fused.state[fused_weight]["sum"], state)
        else:
            assert torch.equal(fused_weight, stepped_weight)
            assert torch.equal(fused.state[fused_weight]["sum"], stepped.state[stepped_weight]["sum"])


def test_update_bags_refuses_operands_that_do_not_fit_and_adagrad_keeps_its_state_for_empty_batches():
    weight = torch.nn.Parameter(torch.zeros(4, 2))
    indices, offsets = torch.tensor([0, 3, 1]), torch.tensor([0, 2, 3])
    for name in ("sgd", "adagrad"):
        optimizer = make_optimizer(name, [weight], 0.1)
        with pytest.raises(ValueError, match="a gradient of shape \\[1, 2\\] for 2 bags"):
            optimizer.update_bags_(weight, indices, offsets, torch.ones(1, 2))
        with pytest.raises(ValueError, match="2 index weights for 3 ids"):
            optimizer.update_bags_(weight, indices, offsets, torch.ones(2, 2), torch.ones(2))
    with pytest.raises(ValueError, match="float32 tables"):
        half = torch.nn.Parameter(torch.zeros(4, 2, dtype=torch.bfloat16))
        make_optimizer("adagrad", [half], 0.1).update_bags_(half, indices, offsets, torch.ones(2, 2))
    adagrad = make_optimizer("adagrad", [weight], 0.1)
    adagrad.update_bags_(weight, indices[:0], torch.zeros(3, dtype=torch.int64), torch.ones(2, 2))  # empty bags
    assert torch.equal(adagrad.state[weight]["sum"], torch.zeros(4, 2))  # as step() leaves it


def test_the_fused_adagrad_kernel_refuses_operands_it_would_walk_out_of():
    if not kernels.native():
        pytest.skip(f"no native kernels: {kernels.status()}")
    weight, state, grad = torch.zeros(4, 2), torch.zeros(4, 2), torch.ones(3, 2)
    good = dict(rows=torch.tensor([0, 2]), starts=torch.tensor([0, 1, 3]), order=torch.tensor([2, 0, 1]),
                bag_of=torch.tensor([0, 1, 2]))
    assert kernels.adagrad_bag_rows_(weight, state, *good.values(), grad, None, 0.1, 1e-8)
    for name, bad in [("rows", torch.tensor([2, 0])), ("rows", torch.tensor([1, 1])), ("rows", torch.tensor([0, 4])),
                      ("starts", torch.tensor([0, 2, 2])), ("starts", torch.tensor([1, 1, 3])),
                      ("order", torch.tensor([0, 1, 3])), ("bag_of", torch.tensor([0, 1, 3]))]:
        with pytest.raises(ValueError, match="adagrad_bag_rows_"):
            kernels.adagrad_bag_rows_(weight, state, *dict(good, **{name: bad}).values(), grad, None, 0.1, 1e-8)


def naive_adagrad_steps(weight, indices, offsets, bag_grads, index_weights, lr, eps, steps):
    """Loops in NumPy float32: each row's gradient summed over its ids in order, then Adagrad's update."""
    weight, state = weight.numpy().copy(), np.zeros(tuple(weight.shape), np.float32)
    grads = bag_grads.numpy()
    for _ in range(steps):
        row_grads = {}
        for b in range(len(offsets) - 1):
            for j in range(int(offsets[b]), int(offsets[b + 1])):
                value = grads[b] * (np.float32(index_weights[j]) if index_weights is not None else np.float32(1))
                r = int(indices[j])
                row_grads[r] = row_grads[r] + value if r in row_grads else np.float32(0) + value
        for r, g in row_grads.items():
            state[r] = state[r] + g * g
            weight[r] = weight[r] + (g / (np.sqrt(state[r]) + np.float32(eps))) * np.float32(-lr)
    return torch.from_numpy(weight), torch.from_numpy(state)


def test_only_optimizers_that_update_bags_can_be_fused():
    bags_ = BatchedEmbeddingBags([4, 3], 2)
    with pytest.raises(TypeError, match="RWSAdagrad cannot update embedding bags"):
        bags_.fuse_optimizer(make_optimizer("rwsadagrad", bags_.parameters(), 0.1))
    with pytest.raises(ValueError, match="not one of the optimizer's parameters"):
        bags_.fuse_optimizer(make_optimizer("sgd", [torch.nn.Parameter(torch.zeros(1))], 0.1))
    half = BatchedEmbeddingBags([4, 3], 2, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="Adagrad updates torch.bfloat16 tables only unfused"):
        half.fuse_optimizer(make_optimizer("adagrad", half.parameters(), 0.1))
    half.fuse_optimizer(make_optimizer("sgd", half.parameters(), 0.1))  # SGD's rounds stochastically
    other = torch.nn.Parameter(torch.zeros(3, 2))
    with pytest.raises(ValueError, match="not one of this optimizer's parameters"):
        make_optimizer("sgd", [other], 0.1).update_bags_(bags_.weight, torch.tensor([0]), torch.tensor([0, 1]),
                                                         torch.ones(1, 2))


def test_the_trainer_fuses_sgd_and_adagrad_only_where_every_step_follows_one_backward():
    import dlrm_s_pytorch as dlrm

    base = ["--arch-sparse-feature-size=4", "--arch-mlp-bot=3-4", "--arch-mlp-top=8-1",
            "--arch-embedding-size=5-6", "--data-size=64", "--mini-batch-size=8"]
    for extra, fused in [([], True), (["--optimizer=adagrad"], True), (["--optimizer=rwsadagrad"], False),
                         (["--mlperf-grad-accum-iter=2"], False),
                         (["--optimizer=adagrad", "--mlperf-grad-accum-iter=2"], False)]:
        args = dlrm.parse_args(base + extra)
        model = dlrm.build_model(args, 3, [5, 6])
        optimizer = dlrm.build_optimizer(args, model)
        assert (model.emb_l.fused_optimizer is optimizer) == fused, extra


def test_state_dict_has_the_original_keys_and_moves_between_layouts(tmp_path):
    batched, per_table = twin_nets()
    assert [k for k in batched.state_dict() if k.startswith("emb_l")] == [f"emb_l.{t}.weight" for t in range(4)]
    shapes = {k: v.shape for k, v in per_table.state_dict().items()}
    assert {k: v.shape for k, v in batched.state_dict().items()} == shapes
    path = tmp_path / "m.pt"
    torch.save(per_table.state_dict(), path)
    fresh, _ = twin_nets()
    with torch.no_grad():
        fresh.emb_l.weight.zero_()
    fresh.load_state_dict(torch.load(path))
    batch = random_batch()
    torch.testing.assert_close(fresh(batch.dense_x, batch.offsets, batch.indices),
                               per_table(batch.dense_x, batch.offsets, batch.indices))


def test_loading_a_state_dict_with_a_wrong_table_names_it():
    batched, _ = twin_nets()
    state = batched.state_dict()
    state["emb_l.2.weight"] = torch.zeros(8, 4)
    del state["emb_l.3.weight"]
    with pytest.raises(RuntimeError) as error:
        batched.load_state_dict(state)
    assert "size mismatch for emb_l.2.weight" in str(error.value) and "emb_l.3.weight" in str(error.value)


def test_emb_l_k_is_a_view_of_table_k_usable_like_an_embedding_bag():
    batched, per_table = twin_nets()
    assert len(batched.emb_l) == 4 and [bag.weight.shape[0] for bag in batched.emb_l] == TABLES
    torch.testing.assert_close(batched.emb_l[2].weight, per_table.emb_l[2].weight)
    indices, offsets = torch.tensor([6, 0, 6]), torch.tensor([0, 1])
    torch.testing.assert_close(batched.emb_l[2](indices, offsets), per_table.emb_l[2](indices, offsets))
    with torch.no_grad():
        batched.emb_l[3].weight.fill_(2.0)  # writes reach the shared weight
    weight = batched.emb_l.weight.detach()
    assert float(weight[-3:].sum()) == 2.0 * 3 * 4 and float(weight[:-3].abs().max()) < 1.0


def test_an_index_past_its_table_is_an_error_not_a_row_of_the_next_table():
    batched = BatchedEmbeddingBags([4, 3, 2], 2)
    batched(SparseFeatures.one_hot(torch.tensor([[3, 2, 1]])))  # one id per table, batch of 1
    with pytest.raises(IndexError, match="embedding index 3 out of range for table 1 \\(3 rows\\)"):
        batched(SparseFeatures.one_hot(torch.tensor([[0, 3, 0]])))
    with pytest.raises(IndexError, match="embedding index -1 out of range for table 2"):
        batched(SparseFeatures.one_hot(torch.tensor([[0, 0, -1]])))


def test_the_one_pass_range_check_of_large_batches_pools_and_refuses_alike(monkeypatch):
    monkeypatch.setattr(embeddings, "ONE_PASS_CHECK_MIN_IDS", 1)  # every batch takes the one-pass check
    batched = BatchedEmbeddingBags([4, 3, 5], 2)
    ids = torch.tensor([[3, 2, 4], [1, 0, 2]])  # 4 and 3 exceed the smallest table: the per-table check
    for sample_ids in (ids, ids.clamp(max=2)):  # the latter fits every table: the one pass alone
        pooled = batched(SparseFeatures.one_hot(sample_ids))
        rows = sample_ids + torch.tensor([0, 4, 7])
        torch.testing.assert_close(pooled, batched.weight.detach()[rows])
    with pytest.raises(IndexError, match="embedding index 3 out of range for table 1 \\(3 rows\\)"):
        batched(SparseFeatures.one_hot(torch.tensor([[0, 3, 0]])))
    with pytest.raises(IndexError, match="embedding index -1 out of range for table 2"):
        batched(SparseFeatures.one_hot(torch.tensor([[0, 0, -1]])))


def test_initialisation_is_per_table_uniform_and_seeded(monkeypatch):
    monkeypatch.setattr(kernels, "UNIFORM_PARALLEL_MIN_ELEMENTS", 64)  # exercises the threads
    torch.manual_seed(3)
    first = BatchedEmbeddingBags([1000, 4, 300], 8)
    torch.manual_seed(3)
    torch.set_num_threads(1)
    try:
        second = BatchedEmbeddingBags([1000, 4, 300], 8)
    finally:
        torch.set_num_threads(max(2, torch.get_num_threads()))
    assert first.weight.dtype == torch.float32
    assert torch.equal(first.weight, second.weight)  # same seed, same values, whatever the threads
    for table, rows in zip(first, [1000, 4, 300]):
        bound, weight = math.sqrt(1.0 / rows), table.weight.detach()
        assert float(weight.abs().max()) <= bound
        if rows > 4:
            assert float(weight.abs().max()) > 0.9 * bound and abs(float(weight.mean())) < 0.05 * bound
    torch.manual_seed(4)
    assert not torch.equal(BatchedEmbeddingBags([1000, 4, 300], 8).weight, first.weight)


@pytest.mark.parametrize("sync_free", [False, True])
def test_coalesce_rows_sums_each_row_once(sync_free):
    torch.manual_seed(0)
    rows = torch.tensor([7, 1, 7, 3, 1, 7, 0])
    values = torch.randn(7, 3)
    grad = torch.sparse_coo_tensor(rows[None], values, (9, 3))
    out_rows, out_values = coalesce_rows(grad, sync_free=sync_free)
    expected = grad.coalesce()
    if sync_free:  # padded to nnz with zero-valued repeats of the last row
        assert out_rows.numel() == 7 and torch.equal(out_rows[:4], expected.indices()[0])
        assert torch.equal(out_values[4:], torch.zeros(3, 3)) and bool((out_rows[4:] == 7).all())
    else:
        assert torch.equal(out_rows, expected.indices()[0])
    torch.testing.assert_close(torch.zeros(9, 3).index_add_(0, out_rows, out_values), expected.to_dense())


@pytest.mark.parametrize("name", ["sgd", "adagrad", "rwsadagrad"])
def test_padded_sync_free_coalescing_gives_the_same_update(name, monkeypatch):
    """The CUDA code path (no data-dependent sizes), run on the CPU."""
    import dlrmkit.optim.sparse_optimizers as so

    batched, _ = twin_nets()
    twin, _ = twin_nets()
    batches = [random_batch(seed=s) for s in range(3)]
    train_steps(batched, make_optimizer(name, batched.parameters(), 0.1), batches)
    monkeypatch.setattr(so, "coalesce_rows", lambda grad: coalesce_rows(grad, sync_free=True))
    train_steps(twin, make_optimizer(name, twin.parameters(), 0.1), batches)
    for key, value in batched.state_dict().items():
        torch.testing.assert_close(twin.state_dict()[key], value, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("name", ["sgd", "adagrad", "rwsadagrad"])
def test_grad_scaler_contract_unscales_and_skips_on_inf(name):
    """GradScaler.step hands `grad_scale` and `found_inf` to optimizers with _step_supports_amp_scaling."""
    batched, twin = twin_nets()[0], twin_nets()[0]
    batch = random_batch()
    reference = make_optimizer(name, batched.parameters(), 0.1)
    train_steps(batched, reference, [batch])
    scaled = make_optimizer(name, twin.parameters(), 0.1)
    assert scaled._step_supports_amp_scaling
    scaled.zero_grad()
    (F.binary_cross_entropy(twin(batch.dense_x, batch.offsets, batch.indices), batch.target) * 1024.0).backward()
    scaled.grad_scale, scaled.found_inf = torch.tensor(1024.0), torch.tensor(0.0)
    scaled.step()
    for key, value in batched.state_dict().items():
        torch.testing.assert_close(twin.state_dict()[key], value, rtol=1e-5, atol=1e-7)
    before = {k: v.clone() for k, v in twin.state_dict().items()}
    for p in twin.parameters():
        p.grad = p.grad * float("inf")
    scaled.found_inf = torch.tensor(1.0)
    scaled.step()
    assert all(torch.equal(before[k], v) for k, v in twin.state_dict().items())


def test_optimizer_state_dict_round_trips_in_torch_format():
    batched, twin = twin_nets()[0], twin_nets()[0]
    batches = [random_batch(seed=s) for s in range(4)]
    opt = make_optimizer("rwsadagrad", batched.parameters(), 0.1)
    train_steps(batched, opt, batches[:2])
    saved_model, saved_opt = batched.state_dict(), opt.state_dict()
    # torch's two keys (torch.optim ignores the third: which optimizer saved it)
    assert set(saved_opt) == {"state", "param_groups", "optimizer"} and saved_opt["param_groups"][0]["params"][0] == 0
    assert saved_opt["optimizer"] == "RWSAdagrad"
    assert saved_opt["state"][0]["sum"].shape == (16,)  # row-wise: one value per row of the batched weight
    twin.load_state_dict(saved_model)
    resumed = make_optimizer("rwsadagrad", twin.parameters(), 0.1)
    resumed.load_state_dict(saved_opt)
    assert train_steps(twin, resumed, batches[2:]) == train_steps(batched, opt, batches[2:])
    with pytest.raises(ValueError):
        make_optimizer("adagrad", torch.nn.Linear(2, 2).parameters(), 0.1).load_state_dict(saved_opt)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("name", ["sgd", "adagrad", "rwsadagrad"])
def test_cuda_batched_training_matches_cpu(name):
    batched, _ = twin_nets()
    on_gpu, _ = twin_nets()
    on_gpu.cuda()
    batches = [random_batch(seed=s) for s in range(3)]
    train_steps(batched, make_optimizer(name, batched.parameters(), 0.1), batches)
    train_steps(on_gpu, make_optimizer(name, on_gpu.parameters(), 0.1), [b.to("cuda") for b in batches])
    for key, value in batched.state_dict().items():
        torch.testing.assert_close(on_gpu.state_dict()[key].cpu(), value, rtol=1e-4, atol=1e-6)
