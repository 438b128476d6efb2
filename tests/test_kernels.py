"""The native kernels equal PyTorch's operators bit for bit, and fall back to them cleanly."""

import os

import pytest
import torch
import torch.nn.functional as F

from dlrmkit import kernels
from dlrmkit.optim import make_optimizer

needs_native = pytest.mark.skipif(kernels.status() != "native", reason=f"no native kernels: {kernels.status()}")


def bags(rows, dim, num_bags, max_bag, seed, weighted=False):
    """(weight [rows, dim], ids, offsets [num_bags + 1], bag gradient, per-id weights): empty bags,
    ids repeated within and across bags."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(0, max_bag + 1, (num_bags,), generator=g)
    offsets = torch.zeros(num_bags + 1, dtype=torch.int64)
    torch.cumsum(lengths, 0, out=offsets[1:])
    ids = torch.randint(0, rows, (int(offsets[-1]),), generator=g)
    weight = torch.randn(rows, dim, generator=g)
    grad = torch.randn(num_bags, dim, generator=g)
    index_weights = torch.rand(ids.numel(), generator=g) if weighted else None
    return weight, ids, offsets, grad, index_weights


def reference_sgd(weight, ids, offsets, grad, index_weights, lr):
    """The unfused step: embedding_bag's sparse backward, then the sparse SGD step."""
    w = weight.clone().requires_grad_(True)
    pooled = F.embedding_bag(ids, w, offsets, mode="sum", sparse=True, per_sample_weights=index_weights,
                             include_last_offset=True)
    pooled.backward(grad)
    make_optimizer("sgd", [w], lr=lr).step()
    return w.detach()


@needs_native
@pytest.mark.parametrize("dim", [1, 3, 16, 17, 64])
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("size", ["small", "parallel"])  # one thread, or every thread on its own rows
def test_native_bag_sgd_equals_the_unfused_step_bit_for_bit(dim, weighted, size, monkeypatch):
    rows, num_bags, max_bag = (50, 40, 5) if size == "small" else (3000, 2000, 60)
    weight, ids, offsets, grad, index_weights = bags(rows, dim, num_bags, max_bag, seed=dim, weighted=weighted)
    if size == "parallel":
        monkeypatch.setattr(kernels, "PARALLEL_MIN_ELEMENTS", 1)
    expected = reference_sgd(weight, ids, offsets, grad, index_weights, lr=0.3)
    native = weight.clone()
    kernels.bag_sgd_(native, ids, offsets, grad, -0.3, index_weights)
    fallback = weight.clone()
    kernels._bag_sgd_torch(fallback, ids, offsets, grad, -0.3, index_weights)
    assert torch.equal(native, expected)
    assert torch.equal(fallback, expected)
    assert not torch.equal(native, weight)


@needs_native
def test_native_bag_sgd_does_not_depend_on_the_number_of_threads(monkeypatch):
    monkeypatch.setattr(kernels, "PARALLEL_MIN_ELEMENTS", 1)
    weight, ids, offsets, grad, _ = bags(500, 64, 3000, 40, seed=1)  # many repeats of each row
    results = []
    for threads in (1, 2, 3):
        previous = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            w = weight.clone()
            kernels.bag_sgd_(w, ids, offsets, grad, -0.1)
            results.append(w)
        finally:
            torch.set_num_threads(previous)
    assert all(torch.equal(results[0], r) for r in results[1:])


def build_status(tmp_path, monkeypatch, **env):
    """kernels.status() as a new process would find it (the library built or loaded afresh) with `env`."""
    monkeypatch.setenv("DLRM_CACHE_DIR", str(tmp_path / "cache"))
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    library, problem = kernels._library.__wrapped__()
    return "native" if library is not None else f"PyTorch fallback: {problem}"


def test_without_a_compiler_or_when_switched_off_the_pytorch_fallback_is_used(tmp_path, monkeypatch):
    assert build_status(tmp_path, monkeypatch, CC=str(tmp_path / "no-such-cc")).startswith(
        f"PyTorch fallback: {tmp_path / 'no-such-cc'} could not run")
    assert build_status(tmp_path, monkeypatch, DLRM_NATIVE_KERNELS="0") == \
        "PyTorch fallback: DLRM_NATIVE_KERNELS is off"


@needs_native
def test_the_kernel_is_built_once_into_the_cache_folder(tmp_path, monkeypatch):
    assert build_status(tmp_path, monkeypatch) == "native"
    built = list((tmp_path / "cache").iterdir())
    assert len(built) == 1 and built[0].name.startswith("kernels-") and built[0].suffix == ".so"
    stamp = built[0].stat().st_mtime_ns
    assert build_status(tmp_path, monkeypatch) == "native"
    assert [p.stat().st_mtime_ns for p in (tmp_path / "cache").iterdir()] == [stamp]  # reused, not rebuilt


def test_a_fused_run_of_the_trainer_follows_the_learning_rate_schedule_as_the_step_does():
    """Warm-up and decay change the rate every update: the fused backward must use the new one."""
    import dlrm_s_pytorch as dlrm

    args = dlrm.parse_args(["--arch-sparse-feature-size=4", "--arch-mlp-bot=3-4", "--arch-mlp-top=8-1",
                            "--arch-embedding-size=50-60-7", "--data-size=256", "--mini-batch-size=16",
                            "--num-indices-per-lookup=4", "--learning-rate=0.5", "--lr-num-warmup-steps=6",
                            "--lr-decay-start-step=8", "--lr-num-decay-steps=6", "--print-freq=100"])
    train_set, test_set, dense_dim, table_sizes = dlrm.make_datasets(args)
    states = []
    for fused in (True, False):
        torch.manual_seed(0)
        model = dlrm.build_model(args, dense_dim, table_sizes)
        optimizer = dlrm.build_optimizer(args, model)
        if not fused:
            model.emb_l.fuse_sgd(None)
        assert (model.emb_l.fused_sgd is not None) == fused
        dlrm.train(args, model, optimizer, train_set, test_set, torch.device("cpu"), dlrm.TrainState(),
                   len(train_set), log=lambda line: None)
        states.append(model.state_dict())
    for key, value in states[1].items():
        assert torch.equal(states[0][key], value), key


@pytest.fixture
def without_native(monkeypatch):
    """The PyTorch fallback of every kernel, in this process."""
    monkeypatch.setattr(kernels, "_library", lambda: (None, "switched off by the test"))


@needs_native
@pytest.mark.parametrize("case", ["in range", "too large", "negative"])
def test_native_stacked_rows_equal_the_fallback_and_name_the_first_bad_id(case, without_native, monkeypatch):
    from dlrmkit.embeddings import BatchedEmbeddingBags
    from dlrmkit.sparse import SparseFeatures

    tables = [5, 1, 7, 3]
    bags_ = BatchedEmbeddingBags(tables, 2)
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(0, 4, (len(tables) * 6,), generator=g)
    ids = torch.cat([torch.randint(0, n, (int(l.sum()),), generator=g)
                     for n, l in zip(tables, lengths.view(len(tables), 6))])
    if case != "in range":
        position = int(lengths.view(len(tables), 6)[:2].sum()) + 1  # the second id of table 2
        ids[position] = 7 if case == "too large" else -1
        ids[position + 1] = 9  # a later bad id is not the one named
    sparse = SparseFeatures.from_lengths(lengths, ids, batch_size=6)
    outcomes = []
    for native in (False, True):
        if native:
            monkeypatch.undo()
        try:
            outcomes.append(bags_.stacked_rows(sparse).tolist())
        except IndexError as e:
            outcomes.append(str(e))
    assert outcomes[0] == outcomes[1]
    if case != "in range":
        assert outcomes[1] == f"embedding index {7 if case == 'too large' else -1} out of range for table 2 (7 rows)"


def test_without_a_usable_cache_folder_only_a_private_temporary_folder_is_built_in(tmp_path, monkeypatch):
    """A cache folder that cannot be made sends the build to <tmp>/dlrm-kernels-<uid>, which is used only
    when it is this user's own and nobody else may write to it (no library planted by another user)."""
    not_a_folder = tmp_path / "file"
    not_a_folder.write_text("")
    monkeypatch.setenv("DLRM_CACHE_DIR", str(not_a_folder / "cache"))
    monkeypatch.setattr(kernels.tempfile, "gettempdir", lambda: str(tmp_path))
    private = tmp_path / f"dlrm-kernels-{os.getuid()}"
    private.mkdir(mode=0o777)
    private.chmod(0o777)
    library, problem = kernels._library.__wrapped__()
    assert library is None and problem == f"{private} belongs to another user or others may write to it"
    private.chmod(0o700)
    library, problem = kernels._library.__wrapped__()
    assert problem is None or problem.startswith("no C compiler")
    assert problem is not None or [f.suffix for f in private.iterdir()] == [".so"]


@needs_native
def test_a_damaged_cached_library_is_built_again(tmp_path, monkeypatch):
    assert build_status(tmp_path, monkeypatch) == "native"
    built, = (tmp_path / "cache").iterdir()
    damaged = tmp_path / "other" / "cache" / built.name  # a copy: the built one is mapped in this process
    damaged.parent.mkdir(parents=True)
    damaged.write_bytes(built.read_bytes()[:100])
    assert build_status(tmp_path / "other", monkeypatch) == "native"
    assert damaged.stat().st_size == built.stat().st_size
