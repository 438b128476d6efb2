"""The native kernels equal PyTorch's operators bit for bit, and fall back to them cleanly."""

import copy
import os
import platform
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from dlrmkit import kernels
from dlrmkit.optim import make_optimizer
from helpers import random_batch

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


def test_the_file_mapped_at_an_address_is_read_from_the_maps():
    maps = "\n".join([
        "7f0000-7f1000 r-xp 00000000 08:01 1 /venv/lib/python3.11/site-packages/torch/lib/libgomp.so.1",
        "7f2000-7f3000 r-xp 00000000 08:01 2 /usr/lib/x86_64-linux-gnu/libgomp.so.1.0.0",
        "7f4000-7f5000 rw-p 00000000 00:00 0",
        "7f6000-7f7000 rw-p 00000000 00:00 0 [heap]",
    ])
    assert kernels._mapped_file(0x7f0800, maps).endswith("torch/lib/libgomp.so.1")
    assert kernels._mapped_file(0x7f2000, maps).endswith("libgomp.so.1.0.0")
    assert kernels._mapped_file(0x7f4800, maps) is None and kernels._mapped_file(0x7f1000, maps) is None


@pytest.mark.slow  # two kernel builds, about 1.5 s each
@needs_native
def test_an_openmp_build_that_does_not_load_gives_way_to_one_without(tmp_path, monkeypatch):
    real_load = kernels._load

    def load(path):
        if "-openmp" in path.name:
            raise OSError("libomp.so: cannot open shared object file")
        return real_load(path)

    monkeypatch.setattr(kernels, "_load", load)
    assert build_status(tmp_path, monkeypatch) == "native"
    assert any(p.suffix == ".so" and "-openmp" not in p.name for p in (tmp_path / "cache").iterdir())


def _update_in_a_forked_child(queue):
    weight, ids, offsets, grad, _ = bags(500, 64, 3000, 40, seed=1)
    kernels.bag_sgd_(weight, ids, offsets, grad, -0.1)
    queue.put(float(weight.sum()))


@needs_native
def test_a_forked_child_updates_rows_with_a_pool_its_parent_used(monkeypatch):
    import multiprocessing

    monkeypatch.setattr(kernels, "PARALLEL_MIN_ELEMENTS", 1)
    monkeypatch.setattr(kernels, "threading_kind", lambda: "python")
    previous = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        weight, ids, offsets, grad, _ = bags(500, 64, 3000, 40, seed=1)
        kernels.bag_sgd_(weight, ids, offsets, grad, -0.1)  # the pool's threads start here
        context = multiprocessing.get_context("fork")
        queue = context.Queue()
        child = context.Process(target=_update_in_a_forked_child, args=(queue,))
        child.start()
        child.join(timeout=60)
        hung = child.is_alive()
        if hung:
            child.kill()
        assert not hung and child.exitcode == 0 and queue.get(timeout=5) == float(weight.sum())
    finally:
        torch.set_num_threads(previous)


def test_pytorchs_openmp_threads_and_a_python_pool_update_the_same_rows(monkeypatch):
    """With an OpenMP build sharing PyTorch's runtime the updates run on its threads; the rows are the
    same bit for bit as with the threads of a Python pool."""
    if kernels.threading_kind() != "openmp":
        pytest.skip(f"the kernels run on {kernels.threading_kind()} threads here")
    monkeypatch.setattr(kernels, "PARALLEL_MIN_ELEMENTS", 1)
    weight, ids, offsets, grad, index_weights = bags(500, 16, 3000, 40, seed=3, weighted=True)
    previous = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        results = {}
        for kind in ("openmp", "python"):
            monkeypatch.setattr(kernels, "threading_kind", lambda kind=kind: kind)
            f32, b16 = weight.clone(), weight.bfloat16()
            kernels.bag_sgd_(f32, ids, offsets, grad, -0.1, index_weights)
            kernels.bag_sgd_(b16, ids, offsets, grad, -0.1, index_weights, seed=5, bags_per_table=1000)
            results[kind] = (f32, b16)
    finally:
        torch.set_num_threads(previous)
    assert torch.equal(results["openmp"][0], results["python"][0])
    assert torch.equal(results["openmp"][1], results["python"][1])


PREFETCH_INSTRUCTION = {"x86_64": "prefetch", "AMD64": "prefetch", "aarch64": "prfm", "arm64": "prfm"}


@needs_native
def test_the_built_row_updates_prefetch_the_rows_ahead(built):
    """The update kernels' prefetches survive compilation: a compiler may delete calls to a helper
    whose only effect is a prefetch (without them the bfloat16 update of rows of a table larger than
    the caches takes several times as long)."""
    instruction = PREFETCH_INSTRUCTION.get(platform.machine())
    if instruction is None or not sys.platform.startswith("linux") or not shutil.which("objdump"):
        pytest.skip("no objdump, or a system whose machine code this test does not know")
    library = next(p for p in (built / "cache").iterdir() if p.suffix == ".so")
    result = subprocess.run(["objdump", "-d", "--no-show-raw-insn", str(library)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    for kernel in ("bag_sgd_f32", "bag_sgd_bf16"):
        body = result.stdout.split(f"<{kernel}>:\n", 1)[1].split("\n\n", 1)[0]
        assert instruction in body.lower(), f"{kernel} has no {instruction} instruction"


def build_status(tmp_path, monkeypatch, **env):
    """kernels.status() as a new process would find it (the library built or loaded afresh) with `env`."""
    monkeypatch.setenv("DLRM_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("DLRM_NATIVE_KERNELS", raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    library, problem = kernels._library.__wrapped__()
    return "native" if library is not None else f"PyTorch fallback: {problem}"


def test_without_a_compiler_or_when_switched_off_the_pytorch_fallback_is_used(tmp_path, monkeypatch):
    assert build_status(tmp_path, monkeypatch, CC=str(tmp_path / "no-such-cc")).startswith(
        f"PyTorch fallback: {tmp_path / 'no-such-cc'} could not run")
    assert build_status(tmp_path, monkeypatch, DLRM_NATIVE_KERNELS="0") == \
        "PyTorch fallback: DLRM_NATIVE_KERNELS is off"


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """A folder whose cache/ holds the kernels built there (once for the tests of this file that need a build)."""
    folder = tmp_path_factory.mktemp("built")
    with pytest.MonkeyPatch.context() as monkeypatch:
        assert build_status(folder, monkeypatch) == "native"
    return folder


@needs_native
def test_the_kernel_is_built_once_into_the_cache_folder(built, monkeypatch):
    files = sorted((built / "cache").iterdir())  # the library and its digest, no temporary files left
    assert len(files) == 2 and files[0].suffix == ".so" and files[1].name == files[0].name + ".sha256"
    stamps = [p.stat().st_mtime_ns for p in files]
    assert build_status(built, monkeypatch) == "native"
    assert [p.stat().st_mtime_ns for p in sorted((built / "cache").iterdir())] == stamps  # reused


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
            model.emb_l.fuse_optimizer(None)
        assert (model.emb_l.fused_optimizer is not None) == fused
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
    monkeypatch.delenv("DLRM_NATIVE_KERNELS", raising=False)
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
    assert problem is not None or sorted(f.suffix for f in private.iterdir()) == [".sha256", ".so"]


@needs_native
@pytest.mark.slow  # a build of the kernels each
@pytest.mark.parametrize("damage", ["truncated", "overwritten in the middle", "digest missing"])
def test_a_damaged_cached_library_is_built_again_not_loaded(damage, built, tmp_path, monkeypatch):
    """A library that dlopen would accept but that is not what the build wrote can crash the process
    (SIGBUS) when loaded: it must be built again."""
    library = next(p for p in (built / "cache").iterdir() if p.suffix == ".so")
    good = library.read_bytes()
    other = tmp_path / "other" / "cache"  # a copy: the built one is mapped in this process
    other.mkdir(parents=True)
    copy = other / library.name
    if damage == "truncated":
        copy.write_bytes(good[:8000])
    elif damage == "overwritten in the middle":
        copy.write_bytes(good[:4000] + bytes(1000) + good[5000:])
    else:
        copy.write_bytes(good)
    if damage != "digest missing":
        (other / (library.name + ".sha256")).write_text((library.parent / (library.name + ".sha256")).read_text())
    assert build_status(tmp_path / "other", monkeypatch) == "native"
    assert copy.read_bytes() == good


def test_a_compiler_given_with_its_options_in_cc_is_used(tmp_path, monkeypatch):
    if not (shutil.which("cc") or shutil.which("gcc")):
        pytest.skip("no C compiler")
    assert build_status(tmp_path, monkeypatch, CC=f"{shutil.which('cc') or shutil.which('gcc')} -O2") == "native"


@pytest.mark.slow  # two kernel builds, about 1.5 s each
@needs_native
def test_builds_at_once_never_share_a_temporary_file(tmp_path, monkeypatch):
    """Processes in other PID namespaces (containers sharing a cache folder) may have the same pid (two
    builds at once: a file named after it would be shared)."""
    monkeypatch.setattr(kernels.os, "getpid", lambda: 4242)
    out = tmp_path / "kernels-x.so"
    with ThreadPoolExecutor(2) as pool:
        problems = list(pool.map(lambda _: kernels._compile([shutil.which("cc") or shutil.which("gcc")], out, openmp=False),
                                 range(2)))
    assert problems == [None, None]
    assert kernels._intact(out) and sorted(p.name for p in tmp_path.iterdir()) == ["kernels-x.so",
                                                                                   "kernels-x.so.sha256"]


@needs_native
@pytest.mark.parametrize("case", ["two of four tables", "last offset past the ids", "negative offset",
                                  "offsets of a larger batch"])
def test_malformed_bags_give_pytorchs_error_not_a_crash(case):
    from dlrmkit.embeddings import BatchedEmbeddingBags
    from dlrmkit.sparse import SparseFeatures

    bags_ = BatchedEmbeddingBags([5, 1, 7, 3], 2)
    ids = torch.tensor([1, 0, 2, 1, 0, 3, 2, 1])
    offsets = {"two of four tables": torch.tensor([0, 2, 4, 8]),
               "last offset past the ids": torch.tensor([0, 1, 2, 3, 4, 5, 6, 7, 20]),
               "negative offset": torch.tensor([0, -5, 2, 3, 4, 5, 6, 7, 8]),
               "offsets of a larger batch": torch.tensor([0, 1, 2, 3, 4, 5, 6, 7, 8])}[case]
    batch_size = 4 if case == "offsets of a larger batch" else 2
    sparse = SparseFeatures(ids, offsets, batch_size, 4)
    with pytest.raises((RuntimeError, IndexError, ValueError)):
        bags_(sparse)
    with pytest.raises(ValueError, match="offsets that do not walk"):
        kernels.bag_sgd_(torch.zeros(5, 2), ids, torch.tensor([0, 3, 20]), torch.ones(2, 2), -0.1)
    with pytest.raises(ValueError, match="outside the weight's 5 rows"):
        kernels.bag_sgd_(torch.zeros(5, 2), torch.tensor([1, 9]), torch.tensor([0, 1, 2]), torch.ones(2, 2), -0.1)


def test_with_accumulation_the_rate_in_force_mid_window_is_the_last_updates():
    """What a checkpoint or the run logs record inside an accumulation window: the rate of the last update."""
    import dlrm_s_pytorch as dlrm

    args = dlrm.parse_args(["--arch-sparse-feature-size=4", "--arch-mlp-bot=3-4", "--arch-mlp-top=8-1",
                            "--arch-embedding-size=50-60", "--data-size=64", "--mini-batch-size=8",
                            "--learning-rate=0.5", "--lr-num-warmup-steps=4", "--mlperf-grad-accum-iter=3",
                            "--print-freq=4"])
    train_set, test_set, dense_dim, table_sizes = dlrm.make_datasets(args)
    model = dlrm.build_model(args, dense_dim, table_sizes)
    optimizer = dlrm.build_optimizer(args, model)
    rates = []  # in force when a line is printed: after batch 4, inside the window of batches 4-6
    dlrm.train(args, model, optimizer, train_set, test_set, torch.device("cpu"), dlrm.TrainState(), 6,
               log=lambda line: rates.append(optimizer.param_groups[0]["lr"]))
    assert rates[0] == dlrm.lr_for_update(1, 0.5, 4, 0, 0) != dlrm.lr_for_update(2, 0.5, 4, 0, 0)


# --------------------------------------------------------------------------- bfloat16 tables
@needs_native
def test_bf16_updates_round_stochastically_without_bias():
    """Steps far below bfloat16's resolution at 1.0 (2^-7) still move the weight, by the right amount on average,
    and a sum that bfloat16 holds exactly is stored exactly."""
    weight = torch.ones(4, 64, dtype=torch.bfloat16)
    ids, offsets, grad = torch.tensor([0, 1, 2, 3]), torch.tensor([0, 4]), torch.ones(1, 64)
    for step in range(1000):
        kernels.bag_sgd_(weight, ids, offsets, grad, -1e-4, seed=step)
    mean = weight.float().mean().item()
    assert abs(mean - 0.9) < 0.002  # 256 elements, each a sum of 1000 unbiased roundings
    exact = torch.ones(1, 8, dtype=torch.bfloat16)
    kernels.bag_sgd_(exact, torch.tensor([0]), torch.tensor([0, 1]), torch.ones(1, 8), 0.5, seed=3)
    assert torch.equal(exact, torch.full((1, 8), 1.5, dtype=torch.bfloat16))
    special = torch.tensor([[float("inf"), float("-inf"), float("nan"), 0.0]], dtype=torch.bfloat16)
    kernels.bag_sgd_(special, torch.tensor([0]), torch.tensor([0, 1]), torch.ones(1, 4), 0.0, seed=1)
    assert special[0, :2].tolist() == [float("inf"), float("-inf")] and special[0, 2].isnan() and special[0, 3] == 0


@needs_native
def test_bf16_updates_depend_on_the_seed_only_not_on_threads(monkeypatch):
    monkeypatch.setattr(kernels, "PARALLEL_MIN_ELEMENTS", 1)
    _, ids, offsets, grad, index_weights = bags(500, 16, 3000, 40, seed=2, weighted=True)
    start = torch.randn(500, 16).bfloat16()
    results = {}
    for threads, seed in [(1, 7), (2, 7), (3, 7), (2, 8)]:
        previous = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            w = start.clone()
            kernels.bag_sgd_(w, ids, offsets, grad, -1e-3, index_weights, seed=seed)
            results[threads, seed] = w
        finally:
            torch.set_num_threads(previous)
    assert torch.equal(results[1, 7], results[2, 7]) and torch.equal(results[1, 7], results[3, 7])
    assert not torch.equal(results[2, 7], results[2, 8])
    error = results[2, 7].float() - reference_sgd(start.float(), ids, offsets, grad, index_weights, lr=1e-3)
    assert abs(error.mean().item()) < 2e-3 and error.abs().mean().item() < 0.05  # unbiased roundings


def test_bf16_tables_need_sgd_on_the_cpu_one_step_per_batch(run_main):
    base = ["--arch-embedding-size=100-200", "--data-size=256", "--mini-batch-size=64", "--embedding-precision=bf16"]
    for extra, name in [(["--optimizer=adagrad"], "--optimizer=adagrad"), (["--qr-flag"], "--qr-flag"),
                        (["--mlperf-grad-accum-iter=2"], "--mlperf-grad-accum-iter=2")]:
        code, out, err = run_main(*base, *extra)
        assert code == 1 and err == (f"dlrm_s_pytorch.py: error: not supported yet: --embedding-precision=bf16 "
                                     f"with {name} (bfloat16 tables are trained on the CPU with SGD, one step "
                                     "per batch)\n"), err


@needs_native
def test_bf16_tables_resume_exactly_from_a_checkpoint_of_weights_and_optimizer():
    """The rounding's random bits follow the optimizer's update count, which its state_dict carries:
    a model and optimizer restored from a checkpoint continue exactly as the ones never stopped."""
    import dlrm_s_pytorch as dlrm

    args = dlrm.parse_args(["--arch-sparse-feature-size=4", "--arch-mlp-bot=3-4", "--arch-mlp-top=8-1",
                            "--arch-embedding-size=50-60", "--embedding-precision=bf16", "--learning-rate=0.2"])
    batches = [random_batch(tables=[50, 60], seed=s) for s in range(6)]

    def trained(model, optimizer, some):
        for batch in some:
            optimizer.zero_grad()
            F.binary_cross_entropy(model(batch.dense_x, batch.sparse), batch.target).backward()
            optimizer.step()

    torch.manual_seed(0)
    model = dlrm.build_model(args, 3, [50, 60])
    optimizer = dlrm.build_optimizer(args, model)
    assert model.emb_l.weight.dtype == torch.bfloat16 and model.emb_l.fused_optimizer is optimizer
    trained(model, optimizer, batches[:3])
    saved = copy.deepcopy((model.state_dict(), optimizer.state_dict()))
    trained(model, optimizer, batches[3:])
    torch.manual_seed(1)  # other initial weights, all overwritten by the checkpoint
    restored = dlrm.build_model(args, 3, [50, 60])
    restored_optimizer = dlrm.build_optimizer(args, restored)
    restored.load_state_dict(saved[0])
    restored_optimizer.load_state_dict(saved[1])
    trained(restored, restored_optimizer, batches[3:])
    for key, value in model.state_dict().items():
        assert torch.equal(value, restored.state_dict()[key]), key
    fp32 = dlrm.build_model(dlrm.parse_args(["--arch-sparse-feature-size=4", "--arch-mlp-bot=3-4",
                                             "--arch-mlp-top=8-1", "--arch-embedding-size=50-60"]), 3, [50, 60])
    fp32.load_state_dict(model.state_dict())  # float32 tables take a bfloat16 checkpoint
    assert torch.equal(fp32.emb_l.weight, model.emb_l.weight.float())


@pytest.mark.parametrize("collection", ["batched", "batched without native kernels", "one module per table"])
def test_a_bad_id_names_the_models_table_in_a_collection_of_some_tables(collection, monkeypatch):
    """A model-parallel process holds some of the model's tables: errors name the model's table number."""
    from dlrmkit.embeddings import BatchedEmbeddingBags, EmbeddingBagList, TableIndexError
    from dlrmkit.sparse import SparseFeatures

    if collection == "batched without native kernels":
        monkeypatch.setattr(kernels, "_library", lambda: (None, "switched off by the test"))
    make = EmbeddingBagList if collection == "one module per table" else BatchedEmbeddingBags
    held = make([5, 1, 7, 3], 2, tables=[1, 3])  # the model's tables 1 (1 row) and 3 (3 rows)
    sparse = SparseFeatures.one_hot(torch.tensor([[0, 2], [0, 4]]))
    with pytest.raises(TableIndexError, match=r"^embedding index 4 out of range for table 3 \(3 rows\)$"):
        held(sparse)


def test_bf16_tables_are_batched_tables_only():
    import dlrm_s_pytorch as dlrm

    assert dlrm.create_embeddings([5, 7], 4, dtype=torch.bfloat16).weight.dtype == torch.bfloat16
    with pytest.raises(ValueError, match="batched tables only"):
        dlrm.create_embeddings([5, 7], 4, per_table=True, dtype=torch.bfloat16)


def test_bf16_tables_print_with_debug_mode_and_run_inference_without_native_kernels(run_main, monkeypatch):
    base = ["--arch-embedding-size=100-200", "--data-size=256", "--mini-batch-size=64", "--embedding-precision=bf16"]
    if kernels.native():
        code, out, err = run_main(*base, "--debug-mode")
        assert code == 0, err
        assert "initial parameters (weights and bias):" in out
    monkeypatch.setattr(kernels, "_library", lambda: (None, "switched off by the test"))
    code, out, err = run_main(*base, "--inference-only")
    assert code == 0, err
    code, out, err = run_main(*base)
    assert code == 1 and err == ("dlrm_s_pytorch.py: error: --embedding-precision=bf16 needs the native kernels to "
                                 "train: PyTorch fallback: switched off by the test\n"), err


@needs_native
def test_bf16_rounding_of_a_table_is_the_same_in_a_process_holding_only_some_tables():
    """Model-parallel runs: a table's stochastic rounding must not depend on which other tables its process
    holds (the bits follow the model's table number and the id's position among that table's ids)."""
    from dlrmkit.embeddings import BatchedEmbeddingBags

    sizes = [5, 1, 7, 3]
    torch.manual_seed(0)
    full = BatchedEmbeddingBags(sizes, 8, dtype=torch.bfloat16)
    torch.manual_seed(0)
    some = BatchedEmbeddingBags(sizes, 8, tables=[2, 3], dtype=torch.bfloat16)
    for t in (2, 3):
        assert torch.equal(full[t].weight, some[t - 2].weight)  # the same initial rows either way
    initial = full.weight.detach().clone()
    batch = random_batch(batch_size=16, tables=sizes, max_bag=6, seed=3)
    upstream = torch.randn(16, 4, 8)
    for bags_, sparse, grad in ((full, batch.sparse, upstream), (some, batch.sparse.select_tables([2, 3]),
                                                                 upstream[:, 2:])):
        optimizer = make_optimizer("sgd", bags_.parameters(), 0.01)
        bags_.fuse_optimizer(optimizer)
        for _ in range(3):
            (bags_(sparse) * grad).sum().backward()
    for t in (2, 3):
        assert torch.equal(full[t].weight, some[t - 2].weight), t
    assert not torch.equal(full.weight, initial)


def in_order_dot_interaction(x, ly, itself, grad_out):
    """The dot interaction and its gradient with PyTorch operators, every sum taken term by term in
    float32 in the order the kernels document (d ascending; j ascending): their numbers bit for bit."""
    features = torch.cat([x.unsqueeze(1), ly], 1)
    batch, num_features, dim = features.shape
    pairs = [(i, j) for i in range(num_features) for j in range(i + 1 if itself else i)]
    out = [x]
    for i, j in pairs:
        acc = torch.zeros(batch)
        for d in range(dim):
            acc = acc + features[:, i, d] * features[:, j, d]
        out.append(acc.unsqueeze(1))
    g = grad_out[:, dim:]
    S = torch.zeros(batch, num_features, num_features)
    for p, (i, j) in enumerate(pairs):
        S[:, i, j] = S[:, j, i] = g[:, p] * 2 if i == j else g[:, p]
    grads = []
    for i in range(num_features):
        acc = torch.zeros(batch, dim)
        for j in range(num_features):  # S[i, i] = 0 without itself: added too, as in S @ features
            acc = acc + S[:, i, j, None] * features[:, j]
        grads.append(grad_out[:, :dim] + acc if i == 0 else acc)
    return torch.cat(out, 1), grads[0], torch.stack(grads[1:], 1) if len(grads) > 1 else ly.new_zeros(ly.shape)


@needs_native
@pytest.mark.parametrize("itself", [False, True])
@pytest.mark.parametrize("batch,tables,dim", [(5, 3, 4), (40, 26, 16), (9, 8, 64), (6, 2, 128), (7, 4, 32),
                                              (11, 5, 17), (3, 0, 16), (0, 5, 16)])
def test_native_dot_interaction_sums_in_the_documented_order_bit_for_bit(batch, tables, dim, itself):
    g = torch.Generator().manual_seed(batch + tables + dim)
    x = torch.randn(batch, dim + 3, generator=g)[:, 2 : dim + 2]  # rows with a stride of their own
    ly = torch.randn(tables, batch, dim, generator=g).transpose(0, 1)  # the lookup's [T, B, D], transposed
    width = dim + (tables + 1) * (tables + 2 if itself else tables) // 2
    grad_out = torch.randn(batch, width, generator=g)
    expected, expected_gx, expected_gly = in_order_dot_interaction(x, ly, itself, grad_out)
    out = kernels.dot_interaction(x, ly, itself)
    grad_x, grad_ly = kernels.dot_interaction_backward(x, ly, grad_out, itself)
    assert out.shape == (batch, width) and torch.equal(out, expected)
    assert torch.equal(grad_x, expected_gx) and torch.equal(grad_ly, expected_gly)
    assert grad_ly.stride() == ly.stride()  # the lookup's backward reads it as [T, B, D] without a copy
    # bfloat16 out: the same results rounded as PyTorch rounds them; a bfloat16 gradient: widened exactly
    rounded = kernels.dot_interaction(x, ly, itself, torch.bfloat16)
    assert rounded.dtype == torch.bfloat16 and torch.equal(rounded, expected.bfloat16())
    grad_bf16 = grad_out.bfloat16()
    expected_gx, expected_gly = kernels.dot_interaction_backward(x, ly, grad_bf16.float(), itself)
    grad_x, grad_ly = kernels.dot_interaction_backward(x, ly, grad_bf16, itself)
    assert grad_x.dtype == grad_ly.dtype == torch.float32
    assert torch.equal(grad_x, expected_gx) and torch.equal(grad_ly, expected_gly)


@needs_native
def test_native_dot_interaction_rounds_to_bfloat16_as_pytorch_does():
    """Ties to even, the largest values, overflow to infinity, subnormals, infinities and NaN."""
    special = torch.tensor([1 + 2**-8, 1 + 3 * 2**-8, 1 + 2**-8 + 2**-20, -(1 + 2**-8), 3.3895314e38, 3.4e38,
                            1e-40, -1e-41, float("inf"), float("-inf"), 0.0, -0.0, 1.0, 2.0])
    x = torch.zeros(len(special) + 1, 2)
    x[:, 0] = torch.cat([special, torch.tensor([float("nan")])])
    ly = torch.zeros(len(x), 1, 2)
    ly[:, 0, 0] = 1.0  # the one pair's product: x[:, 0] * 1
    rounded = kernels.dot_interaction(x, ly, False, torch.bfloat16)
    expected = kernels.dot_interaction(x, ly, False).bfloat16()
    assert torch.equal(rounded[:-1], expected[:-1]) and torch.isnan(rounded[-1, 0]) and torch.isnan(rounded[-1, 2])
    assert kernels.dot_interaction(x, ly, False, torch.float16) is None  # not a dtype the kernel writes


@needs_native
def test_native_dot_interaction_does_not_depend_on_the_number_of_threads(monkeypatch):
    g = torch.Generator().manual_seed(0)
    x, ly = torch.randn(301, 16, generator=g), torch.randn(301, 26, 16, generator=g)
    grad_out = torch.randn(301, 16 + 27 * 26 // 2, generator=g)
    results = []
    for threads, kind, minimum in [(1, "openmp", 1), (2, "openmp", 1), (3, "openmp", 1), (2, "python", 1)]:
        monkeypatch.setattr(torch, "get_num_threads", lambda threads=threads: threads)
        monkeypatch.setattr(kernels, "threading_kind", lambda kind=kind: kind)
        monkeypatch.setattr(kernels, "INTERACTION_OPENMP_MIN_WORK", minimum)
        monkeypatch.setattr(kernels, "PARALLEL_MIN_ELEMENTS", minimum)
        results.append((kernels.dot_interaction(x, ly), *kernels.dot_interaction_backward(x, ly, grad_out)))
    for result in results[1:]:
        assert all(torch.equal(a, b) for a, b in zip(result, results[0]))


@needs_native
@pytest.mark.parametrize("itself", [False, True])
def test_the_models_dot_interaction_is_native_on_the_cpu_and_matches_the_pytorch_path(itself, monkeypatch):
    from dlrmkit.interactions import InteractionConfig, NativeDotInteraction

    interaction = InteractionConfig("dot", itself=itself).build(num_tables=5, dense_dim=8, emb_dim=8)
    g = torch.Generator().manual_seed(1)
    x, ly = torch.randn(12, 8, generator=g), torch.randn(5, 12, 8, generator=g).transpose(0, 1)

    def run(native, autocast=True):
        monkeypatch.setattr(kernels, "dot_interaction_runs", lambda *_: native)
        xs, lys = x.clone().requires_grad_(), ly.detach().clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):  # float32 products under autocast too
            assert interaction(xs.bfloat16(), lys).dtype == torch.float32  # the module's output
            out = interaction.top_input(xs.bfloat16(), lys, autocast_layer=True)  # as the top MLP reads it
        # a gradient bfloat16 holds, as a bf16 top MLP's first layer hands back
        out.backward(torch.arange(out.numel(), dtype=torch.float32).view(out.shape).cos().bfloat16().to(out.dtype))
        return out, xs.grad, lys.grad

    native, fallback, native_fp32 = run(True), run(False), run(True, autocast=False)
    assert type(native[0].grad_fn).__name__ == NativeDotInteraction.__name__ + "Backward"
    # into an autocast layer under bf16 autocast the native output comes rounded to bfloat16 (what that layer
    # casts it to): the float32 products rounded, and the same gradients
    assert fallback[0].dtype == native_fp32[0].dtype == torch.float32 and native[0].dtype == torch.bfloat16
    assert torch.equal(native[0], native_fp32[0].bfloat16())
    assert torch.equal(native[1], native_fp32[1]) and torch.equal(native[2], native_fp32[2])
    for a, b in zip(native, fallback):
        torch.testing.assert_close(a, b.to(a.dtype), rtol=1e-5, atol=1e-5)


@needs_native
def test_the_native_dot_interaction_can_be_differentiated_twice(monkeypatch):
    from dlrmkit.interactions import InteractionConfig

    def gradient_penalty_grad(native):
        monkeypatch.setattr(kernels, "dot_interaction_runs", lambda *_: native)
        torch.manual_seed(0)
        interaction, layer = InteractionConfig("dot").build(3, 8, 8), torch.nn.Linear(5, 8)
        dense = torch.randn(4, 5, requires_grad=True)
        out = interaction(layer(dense), torch.randn(4, 3, 8))
        (grad,) = torch.autograd.grad((out ** 2).sum(), dense, create_graph=True)
        grad.pow(2).sum().backward()
        return layer.weight.grad

    torch.testing.assert_close(gradient_penalty_grad(True), gradient_penalty_grad(False))


@needs_native
def test_the_dot_interaction_kernels_take_only_plain_tensors_they_can_hold():
    from torch._subclasses.fake_tensor import FakeTensorMode

    from dlrmkit.interactions import InteractionConfig

    interaction = InteractionConfig("dot").build(3, 16, 16)
    with FakeTensorMode(allow_non_fake_inputs=True):  # no data behind the pointer: PyTorch's operators
        assert interaction(torch.empty(4, 16), torch.empty(4, 3, 16)).shape == (4, 16 + 6)
    ones = torch.ones(2, 3, 16)
    assert torch.equal(interaction(torch.ones(2, 16), torch._neg_view(ones))[:, 16:],
                       interaction(torch.ones(2, 16), -ones)[:, 16:])  # the lazy negation honoured
    wide = kernels.INTERACTION_MAX_DIM + 1  # wider rows than the backward keeps on the stack
    x, ly = torch.randn(2, wide, requires_grad=True), torch.randn(2, 2, wide)
    assert not kernels.dot_interaction_runs(x, ly)
    interaction = InteractionConfig("dot").build(2, wide, wide)
    interaction(x, ly).sum().backward()
    assert x.grad.shape == (2, wide)


@needs_native
def test_tracing_and_functorch_transforms_see_the_dot_interaction_as_pytorch_operators():
    from torch.fx.experimental.proxy_tensor import make_fx

    from dlrmkit.interactions import InteractionConfig

    interaction = InteractionConfig("dot").build(3, 8, 8)
    g = torch.Generator().manual_seed(2)
    x, ly = torch.randn(4, 8, generator=g), torch.randn(4, 3, 8, generator=g)
    traced = make_fx(interaction)(x, ly)  # a graph of the arithmetic, not of empty outputs
    x2, ly2 = torch.randn(4, 8, generator=g), torch.randn(4, 3, 8, generator=g)
    torch.testing.assert_close(traced(x2, ly2), interaction(x2, ly2))
    batched = torch.func.vmap(interaction)(x.unsqueeze(0).expand(2, 4, 8), ly.unsqueeze(0).expand(2, 4, 3, 8))
    torch.testing.assert_close(batched[1], interaction(x, ly))
    # torch.func.grad (and per-sample gradients under vmap) equal autograd's
    loss = lambda x, ly: (interaction(x, ly) ** 2).sum()  # noqa: E731
    grads = torch.func.grad(loss, argnums=(0, 1))(x, ly)
    xs, lys = x.clone().requires_grad_(), ly.clone().requires_grad_()
    loss(xs, lys).backward()
    torch.testing.assert_close(grads, (xs.grad, lys.grad))
    per_sample = torch.func.vmap(torch.func.grad(lambda x, ly: loss(x[None], ly[None])))(x, ly)
    torch.testing.assert_close(per_sample, xs.grad)  # each sample's own part of the sum


def test_the_random_bag_kernels_refuse_what_they_cannot_take():
    ids, sizes = np.arange(5, dtype=np.int64), np.array([2, 3], dtype=np.int64)
    assert kernels.pad_bags(ids, sizes.astype(">i8"), 3, 99) is None  # another byte order
    assert kernels.pad_bags(ids.astype(np.int32), sizes, 3, 2**31 + 5) is None  # a pad int32 cannot hold
    assert kernels.distinct_sorted_bags(np.zeros((2, 3), dtype=np.int64), 2**70) is None
    if kernels.native():
        assert kernels.pad_bags(ids, sizes, 3, 99).tolist() == [[0, 1, 99], [2, 3, 4]]
        lengths, distinct = kernels.distinct_sorted_bags(np.array([[1, 1, 9], [2, 3, 4]]), 9)
        assert lengths.tolist() == [1, 3] and distinct.tolist() == [1, 2, 3, 4]


@needs_native
@pytest.mark.parametrize("count", [0, 1, 2, 7, 4096, 100_001])
def test_pcg64_float32_draws_equal_numpys_and_leave_the_generator_where_numpy_does(count, monkeypatch):
    monkeypatch.setattr(kernels, "RANDOM_OPENMP_MIN_WORDS", 1)
    numpy_rng, ours = np.random.default_rng([4, 0, 9]), np.random.default_rng([4, 0, 9])
    expected = numpy_rng.random(count, dtype=np.float32)
    previous = torch.get_num_threads()
    try:
        torch.set_num_threads(3)
        drawn = kernels.pcg64_random_f32(ours.bit_generator, count)
    finally:
        torch.set_num_threads(previous)
    assert drawn.dtype == np.float32 and np.array_equal(drawn, expected)
    assert ours.bit_generator.state == numpy_rng.bit_generator.state  # an odd count keeps a half word, as NumPy
    assert np.array_equal(ours.random(3, dtype=np.float32), numpy_rng.random(3, dtype=np.float32))
    assert np.array_equal(ours.random(3), numpy_rng.random(3))


def test_pcg64_skip_moves_a_pcg64_as_drawing_would_and_refuses_others():
    drawn, skipped = np.random.default_rng(3), np.random.default_rng(3)
    drawn.random(1, dtype=np.float32), skipped.random(1, dtype=np.float32)  # both hold half a word
    drawn.random(7)
    start = skipped.bit_generator.state["state"]["state"]
    assert kernels.pcg64_skip(skipped.bit_generator, 7) == start  # where the skipped words begin
    assert skipped.bit_generator.state == drawn.bit_generator.state
    assert np.array_equal(skipped.random(2, dtype=np.float32), drawn.random(2, dtype=np.float32))
    for generator, words in ((np.random.Philox(1), 3), (np.random.PCG64(1), -1), (np.random.PCG64(1), 2**128)):
        with pytest.raises(ValueError, match="pcg64_skip"):
            kernels.pcg64_skip(generator, words)


def test_pcg64_draws_leave_other_generators_to_numpy():
    with pytest.raises(ValueError, match="negative count"):
        kernels.pcg64_random_f32(np.random.default_rng(1).bit_generator, -1)
    if kernels.native():  # a NumPy integer count, as NumPy's own random() takes
        assert kernels.pcg64_random_f32(np.random.default_rng(1).bit_generator, np.int64(5)).shape == (5,)
    buffered = np.random.default_rng(1)
    buffered.random(1, dtype=np.float32)  # holds half a word
    state = buffered.bit_generator.state
    assert kernels.pcg64_random_f32(buffered.bit_generator, 10) is None
    assert buffered.bit_generator.state == state
    assert kernels.pcg64_random_f32(np.random.Philox(1), 10) is None


@needs_native
def test_uniform_bags_refuse_sizes_and_tables_they_would_write_past():
    sizes = np.array([2, 3, 1, 0], dtype=np.int64)
    with pytest.raises(ValueError, match="bag sizes"):
        kernels.uniform_bags(sizes, 2, [1, 2], 5, [10, 10], 2, 10)  # a bag wider than the rows
    with pytest.raises(ValueError, match="bag sizes"):
        kernels.uniform_bags(sizes, 3, [1, 2], 5, [10, 10], 3, 10)  # not 2 tables of 3 bags
    with pytest.raises(ValueError, match="table sizes"):
        kernels.uniform_bags(sizes, 2, [1, 2], 5, [10, 11], 3, 10)  # ids above the pad
    with pytest.raises(ValueError, match="bag sizes"):
        kernels.uniform_bags(sizes.astype(float), 2, [1, 2], 5, [10, 10], 3, 10)  # sizes that are not integers
    with pytest.raises(ValueError, match="bag sizes"):
        kernels.uniform_bags(sizes[:0], 0, [1, 2], 5, [10, 10], 3, 10)  # tables of no bags
    with pytest.raises(ValueError, match="PCG64 state"):
        kernels.uniform_bags(sizes, 2, [1], 5, [10, 10], 3, 10)  # one state for two tables
    with pytest.raises(ValueError, match="PCG64 state"):
        kernels.uniform_bags(sizes, 2, [1, 2**128], 5, [10, 10], 3, 10)  # a state beyond 128 bits
    with pytest.raises(ValueError, match="PCG64 state"):
        kernels.uniform_bags(sizes, 2, [1, 2], 4, [10, 10], 3, 10)  # an even increment: no PCG64 has one
    bags = kernels.uniform_bags(sizes, 2, [1, 2], 5, [10, 1], 3, 10)
    assert bags.shape == (4, 3) and bags.dtype == np.int32
    assert bags[2].tolist() == [0, 10, 10] and bags[3].tolist() == [10, 10, 10]  # a 1-row table: id 0


def splitmix64_words(seed, first_word, count):
    """SplitMix64's words first_word .. first_word + count - 1 from `seed`, in Python integers (the reference)."""
    mask = (1 << 64) - 1
    words = []
    for w in range(first_word, first_word + count):
        x = (seed + (w + 1) * 0x9E3779B97F4A7C15) & mask
        x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & mask
        x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & mask
        words.append(x ^ (x >> 31))
    return words


def test_uniform_values_are_splitmix64_bits_scaled_in_float32():
    seed, low, high = 2**63 + 12345, -0.25, 0.75
    values = kernels.uniform_(torch.empty(101), seed, low, high)
    words = splitmix64_words(seed, 0, 51)
    for e in range(101):
        bits = (words[e // 2] >> (32 * (e % 2))) & 0xFFFFFFFF  # element 2w: the low half of word w
        u = np.float32(bits >> 8) * np.float32(2.0 ** -24)
        expected = np.float32(low) + (np.float32(high) - np.float32(low)) * u
        assert values[e].item() == float(expected), e
    assert float(values.min()) >= low and float(values.max()) < high


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_uniform_is_the_same_natively_with_numpy_and_on_any_threads(dtype, monkeypatch):
    sizes = [1, 2, 7, 64, 1001, 70_003]
    monkeypatch.setattr(kernels, "UNIFORM_PARALLEL_MIN_ELEMENTS", 1)
    monkeypatch.setattr(kernels, "PARALLEL_MIN_ELEMENTS", 1)
    monkeypatch.setattr(kernels, "UNIFORM_NUMPY_CHUNK", 333)  # odd-sized: every other piece starts on an odd element
    results = []
    for native, threads in [(True, 1), (True, 2), (True, 3), (False, 1)]:
        with monkeypatch.context() as m:
            if not native:
                m.setattr(kernels, "_library", lambda: (None, "switched off by the test"))
            previous = torch.get_num_threads()
            torch.set_num_threads(threads)
            try:
                results.append([kernels.uniform_(torch.empty(n, dtype=dtype), 99 + n, -0.5, 0.5) for n in sizes])
            finally:
                torch.set_num_threads(previous)
    for other in results[1:]:
        for a, b in zip(results[0], other):
            assert torch.equal(a.view(torch.int16 if dtype == torch.bfloat16 else torch.int32),
                               b.view(torch.int16 if dtype == torch.bfloat16 else torch.int32))
    if dtype == torch.bfloat16:  # rounded to nearest from the float32 values
        float32 = kernels.uniform_(torch.empty(sizes[-1]), 99 + sizes[-1], -0.5, 0.5)
        assert torch.equal(results[0][-1], float32.bfloat16())
    if not kernels.native():
        pytest.skip("no native kernels here: only the NumPy path was compared with itself")


def test_uniform_refuses_what_it_cannot_fill():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        fake = torch.empty(4)
    for tensor in (torch.empty(4, 4).t(), torch.empty(4, dtype=torch.float64), fake, torch.zeros(4)._neg_view()):
        with pytest.raises(ValueError, match="plain contiguous float32 or bfloat16 CPU tensors"):
            kernels.uniform_(tensor, 1, 0.0, 1.0)
    for seed in (-1, 2**64):
        with pytest.raises(ValueError, match="outside \\[0, 2\\^64\\)"):
            kernels.uniform_(torch.empty(4), seed, 0.0, 1.0)
    for seed in (3.0, 3.7, "3", None, True, torch.tensor(3.0)):
        with pytest.raises(ValueError, match="the seed must be an integer"):
            kernels.uniform_(torch.empty(4), seed, 0.0, 1.0)
    assert torch.equal(kernels.uniform_(torch.empty(4), np.int64(3), 0.0, 1.0),
                       kernels.uniform_(torch.empty(4), 3, 0.0, 1.0))
    for low, high in ((1.0, 0.0), (float("nan"), 1.0), (0.0, float("inf")), (-3e38, 3e38)):
        with pytest.raises(ValueError, match="not finite float32 numbers low <= high"):
            kernels.uniform_(torch.empty(4), 1, low, high)
    for low, high in (("0", "1"), (torch.zeros(2), 1.0), (False, True)):
        with pytest.raises(ValueError, match="bounds must be real numbers"):
            kernels.uniform_(torch.empty(4), 1, low, high)


def test_table_rows_fill_whatever_the_default_dtype():
    from dlrmkit.embeddings import EmbeddingBagList, uniform_rows_

    reference = uniform_rows_(torch.empty(10, 4), [(0, 10, 0.5, 3)])
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        assert torch.equal(uniform_rows_(torch.empty(10, 4), [(0, 10, 0.5, 3)]), reference.double())
        assert len(EmbeddingBagList([10, 20], 4)) == 2
    finally:
        torch.set_default_dtype(previous)


def test_table_rows_of_any_dtype_or_layout_take_the_same_values():
    from dlrmkit.embeddings import uniform_rows_

    ranges = [(0, 3, 0.5, 7), (3, 10, 0.1, 8)]
    reference = uniform_rows_(torch.empty(10, 6), ranges)
    assert torch.equal(uniform_rows_(torch.empty(10, 6, dtype=torch.float64), ranges), reference.double())
    strided = uniform_rows_(torch.empty(6, 10).t(), ranges)  # rows that are not contiguous: through a copy
    assert torch.equal(strided, reference)
    assert torch.equal(reference[:3], kernels.uniform_(torch.empty(3, 6), 7, -0.5, 0.5))
    assert torch.equal(reference[3:], kernels.uniform_(torch.empty(7, 6), 8, -0.1, 0.1))
