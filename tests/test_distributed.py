"""Distributed runs: W processes on loopback (gloo) equal one process with the same global batch.

Each launch starts W copies of dlrm_s_pytorch.py with the variables torchrun would set, and is
bounded in time. Tables of very different sizes make the placement uneven (one rank holds six
tables, the others one each), and the data sizes leave a short last batch that does not split
evenly, in training and in testing.

Printed losses have six decimals: they are compared to 1e-5 relative plus the 1e-6 of that rounding;
the checkpoints written at the end are compared at full precision.
"""

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

import dlrm_data
import extend_distributed as ext_dist
from helpers import parse_tests

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tiny models

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN_LINE = re.compile(r"^Finished training it (\d+)/\d+ of epoch (\d+), .* loss ([\d.]+)$")
LAUNCHER_PREFIXES = ("OMPI_COMM_WORLD_", "PMI_", "MV2_COMM_WORLD_", "MPI_LOCAL")
LAUNCHER_NAMES = ("WORLD_SIZE", "RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")

MODEL = ["--arch-embedding-size=5000-3-40-1200-7-300-20000-60", "--arch-sparse-feature-size=4",
         "--arch-mlp-bot=4-8-4", "--arch-mlp-top=8-1", "--loss-function=bce", "--round-targets",
         "--num-indices-per-lookup=5"]
# 62 samples in batches of 6: the last batch has 2 (1+1+0 over 3 ranks); test batches of 9: the last has 8
DATA = ["--data-size=62", "--mini-batch-size=6", "--test-mini-batch-size=9", "--test-freq=4"]


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launcher_env(world, rank, port):
    env = {k: v for k, v in os.environ.items() if k not in LAUNCHER_NAMES and not k.startswith(LAUNCHER_PREFIXES)}
    env.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(world), RANK=str(rank),
               LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world), OMP_NUM_THREADS="1")
    return env


def start(world, args, tmp_path, ranks=None, cwd=ROOT):
    """Starts ranks (default: all) of a `world`-process run, as torchrun would; returns (process, out, err)."""
    port = free_port()
    runs = []
    for rank in range(world) if ranks is None else ranks:
        out, err = tmp_path / f"out.{rank}", tmp_path / f"err.{rank}"
        with open(out, "w") as out_file, open(err, "w") as err_file:
            process = subprocess.Popen([sys.executable, os.path.join(ROOT, "dlrm_s_pytorch.py"), *args],
                                       cwd=cwd, env=launcher_env(world, rank, port), stdout=out_file,
                                       stderr=err_file)
        runs.append((process, out, err))
    return runs


def finish(runs, timeout=120):
    """Waits for every process (killing all after `timeout` s); returns [(returncode, stdout, stderr)]."""
    deadline = time.monotonic() + timeout
    try:
        for process, _, _ in runs:
            process.wait(timeout=max(1.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        for process, _, _ in runs:
            process.kill()
            process.wait()
        pytest.fail("a distributed run did not finish in time")
    return [(p.returncode, out.read_text(), err.read_text()) for p, out, err in runs]


def launch(world, args, tmp_path, timeout=120, cwd=ROOT):
    results = finish(start(world, args, tmp_path, cwd=cwd), timeout)
    for rank, (code, out, err) in enumerate(results):
        assert code == 0, f"rank {rank} failed:\n{err[-3000:]}"
    return results


def train_losses(out):
    return [(int(m.group(2)), int(m.group(1)), float(m.group(3))) for m in map(TRAIN_LINE.match, out.splitlines()) if m]


def parse_test_metrics(out):
    return [(acc, loss, auc) for acc, _, loss, auc, _ in parse_tests(out)]


def assert_same_run(distributed_out, single_out):
    distributed, single = train_losses(distributed_out), train_losses(single_out)
    assert len(distributed) == len(single) > 0
    for (e1, j1, a), (e2, j2, b) in zip(distributed, single):
        assert (e1, j1) == (e2, j2)
        assert a == pytest.approx(b, rel=1e-5, abs=1.1e-6)
    distributed, single = parse_test_metrics(distributed_out), parse_test_metrics(single_out)
    assert len(distributed) == len(single) > 0
    for a, b in zip(distributed, single):
        assert a == pytest.approx(b, rel=1e-5, abs=1.1e-6)


def assert_same_checkpoint(path_a, path_b):
    a, b = torch.load(path_a, weights_only=False), torch.load(path_b, weights_only=False)
    assert a["arch"] == b["arch"] and a["train_state"]["updates"] == b["train_state"]["updates"]
    assert a["state_dict"].keys() == b["state_dict"].keys()
    for key in a["state_dict"]:
        torch.testing.assert_close(a["state_dict"][key], b["state_dict"][key], rtol=1e-5, atol=1e-6)
    state_a, state_b = a["opt_state_dict"]["state"], b["opt_state_dict"]["state"]
    assert list(state_a) == list(state_b)
    for index in state_a:
        for name in state_b[index]:
            torch.testing.assert_close(state_a[index][name], state_b[index][name], rtol=1e-5, atol=1e-7)


# ---------------------------------------------------------------- equality with one process
@pytest.mark.parametrize("optimizer", [
    ["--optimizer=sgd", "--learning-rate=0.1"],
    ["--optimizer=rwsadagrad", "--learning-rate=0.1", "--mlperf-grad-accum-iter=2"],
], ids=["sgd", "rwsadagrad"])
@pytest.mark.slow
def test_three_processes_train_and_test_exactly_as_one(run_main, tmp_path, optimizer):
    args = [*MODEL, *DATA, *optimizer]
    results = launch(3, [*args, f"--save-model={tmp_path / 'distributed.pt'}"], tmp_path)
    code, single, _ = run_main(*args, f"--save-model={tmp_path / 'single.pt'}")
    assert code == 0
    (_, out0, err0), *others = results
    assert_same_run(out0, single)
    assert out0.startswith("Running on 3 ranks using gloo backend\nworld size: 3, current rank: 0, local rank: 0\n")
    assert parse_test_metrics(out0)[0][0] > 0  # a real evaluation, not an empty one
    # only rank 0 speaks and writes
    assert all(out == "" and "Traceback" not in err for _, out, err in others)
    assert sorted(p.name for p in tmp_path.glob("*.pt")) == ["distributed.pt", "single.pt"]
    # the checkpoint gathered from three processes is the single-process one
    assert_same_checkpoint(tmp_path / "distributed.pt", tmp_path / "single.pt")


@pytest.mark.slow
def test_two_processes_train_the_dcn_model_on_multi_hot_bags_exactly_as_one(run_main, tmp_path):
    """The cross network is dense: replicated, its gradients averaged like the MLPs'. Bags of eight sizes
    (1 to 7 ids) in Pareto draws: each rank's tables keep their bags whole."""
    args = [*MODEL, "--data-size=62", "--mini-batch-size=6", "--test-mini-batch-size=8", "--test-freq=4",
            "--arch-interaction-op=dcn", "--dcn-num-layers=2", "--dcn-low-rank-dim=5",
            "--optimizer=adagrad", "--learning-rate=0.1", "--multi-hot-sizes=3-1-2-5-1-4-2-7",
            "--multi-hot-distribution-type=pareto"]
    (_, out0, _), (code1, out1, _) = launch(2, [*args, f"--save-model={tmp_path / 'distributed.pt'}"], tmp_path)
    code, single, _ = run_main(*args, f"--save-model={tmp_path / 'single.pt'}")
    assert code == code1 == 0 and out1 == ""
    assert_same_run(out0, single)
    assert_same_checkpoint(tmp_path / "distributed.pt", tmp_path / "single.pt")


@pytest.mark.slow
def test_a_process_without_tables_still_trains_as_one(run_main, tmp_path):
    """Two tables over three processes: the third holds none but takes part in every exchange."""
    args = ["--arch-embedding-size=10-20", "--arch-sparse-feature-size=4", "--arch-mlp-bot=4-8-4",
            "--arch-mlp-top=8-1", "--data-size=48", "--mini-batch-size=6", "--test-freq=4", "--optimizer=adagrad"]
    (_, out0, _), *others = launch(3, args, tmp_path)
    code, single, _ = run_main(*args)
    assert code == 0 and all(code == 0 for code, _, _ in others)
    assert_same_run(out0, single)


@pytest.mark.slow
def test_checkpoints_load_across_world_sizes(run_main, tmp_path):
    args = [*MODEL, "--data-size=40", "--mini-batch-size=4", "--optimizer=rwsadagrad", "--learning-rate=0.2"]
    code, three_epochs, _ = run_main(*args, "--nepochs=3")
    assert code == 0
    reference = {(e, j): loss for e, j, loss in train_losses(three_epochs)}
    code, _, _ = run_main(*args, "--nepochs=1", f"--save-model={tmp_path / 'one_process.pt'}")
    assert code == 0
    # one process -> two processes: epoch 1 continues exactly
    (_, out, _), _ = launch(2, [*args, "--nepochs=2", f"--load-model={tmp_path / 'one_process.pt'}",
                                f"--save-model={tmp_path / 'two_processes.pt'}"], tmp_path)
    resumed = train_losses(out)
    assert {e for e, _, _ in resumed} == {1}
    for e, j, loss in resumed:
        assert loss == pytest.approx(reference[(e, j)], rel=1e-5, abs=1.1e-6)
    code, _, _ = run_main(*args, "--nepochs=2", f"--save-model={tmp_path / 'one_process_two_epochs.pt'}")
    assert code == 0
    assert_same_checkpoint(tmp_path / "two_processes.pt", tmp_path / "one_process_two_epochs.pt")
    # two processes -> one process: epoch 2 continues exactly (optimizer state included)
    code, out, _ = run_main(*args, "--nepochs=3", f"--load-model={tmp_path / 'two_processes.pt'}")
    assert code == 0
    resumed = train_losses(out)
    assert {e for e, _, _ in resumed} == {2}
    for e, j, loss in resumed:
        assert loss == pytest.approx(reference[(e, j)], rel=1e-5, abs=1.1e-6)


# ---------------------------------------------------------------- failures
@pytest.mark.slow
def test_a_dying_rank_stops_the_others_with_a_clear_error(tmp_path):
    args = ["--data-size=1000000", "--mini-batch-size=2", "--print-freq=1"]
    runs = start(2, args, tmp_path)
    (rank0, out0, _), (rank1, _, _) = runs
    deadline = time.monotonic() + 60
    while "Finished training it 5/" not in out0.read_text():
        assert time.monotonic() < deadline and rank0.poll() is None, "training did not start"
        time.sleep(0.1)
    rank1.send_signal(signal.SIGKILL)
    killed_at = time.monotonic()
    (code, out, err), _ = finish(runs, timeout=60)
    assert code == 1 and time.monotonic() - killed_at < 30
    assert err.strip().splitlines()[-1].startswith(
        "dlrm_s_pytorch.py: rank 0: error: lost contact with the other processes of this run")
    assert "Traceback" not in err and "Finished training it 500000/" not in out


@pytest.mark.slow
def test_a_missing_rank_is_an_error_after_the_timeout(tmp_path):
    started = time.monotonic()
    [(code, _, err)] = finish(start(2, ["--mini-batch-size=2", "--dist-timeout=2"], tmp_path, ranks=[1]), 60)
    assert code == 1 and time.monotonic() - started < 45
    assert err.count("\n") == 1, err  # without the C++ library's log of each attempt
    assert err.startswith(
        "dlrm_s_pytorch.py: rank 1: error: could not set up the gloo process group of 2 processes at 127.0.0.1:")


@pytest.mark.slow
def test_each_process_of_a_profiled_run_writes_its_own_files(tmp_path):
    """Without --profiling-trace-file: the original's time-stamped names, one time stamp for the whole run."""
    args = ["--arch-embedding-size=10-20", "--arch-sparse-feature-size=4", "--arch-mlp-bot=4-8-4",
            "--arch-mlp-top=8-1", "--data-size=32", "--mini-batch-size=8", "--enable-profiling"]
    (tmp_path / "prof").mkdir()
    (_, out0, _), (_, out1, _) = launch(2, args, tmp_path, cwd=tmp_path / "prof")
    traces = sorted((tmp_path / "prof").glob("dlrm_s_pytorch*.json"))
    assert [t.name.rsplit(".", 2)[1] for t in traces] == ["rank0", "rank1"]
    assert traces[0].name.replace("rank0", "rank1") == traces[1].name  # the same time stamp
    for trace in traces:
        assert json.loads(trace.read_text())["traceEvents"]
        for table in ("shape", "total"):
            assert "Self CPU" in trace.with_name(trace.name[:-len(".json")] + f"_{table}.prof").read_text()
    assert "(each process its own, named by its rank)" in out0 and "Wrote the profiler" not in out1


@pytest.fixture
def launched(monkeypatch):
    """Pretends to be rank 0 of a torchrun launch, without starting anything."""
    for name in [*LAUNCHER_NAMES, *(n for n in os.environ if n.startswith(LAUNCHER_PREFIXES))]:
        monkeypatch.setenv(name, "")  # restored (or removed) after the test, also when the run sets it
        monkeypatch.delenv(name)

    def set_env(**variables):
        for name, value in variables.items():
            monkeypatch.setenv(name, str(value))

    return set_env


@pytest.mark.parametrize("argv,message", [
    (["--mini-batch-size=4"], "--mini-batch-size 4 is not divisible by the 3 processes of this run"),
    (["--mini-batch-size=6", "--test-mini-batch-size=10"], "--test-mini-batch-size 10 is not divisible by the 3"),
    (["--mini-batch-size=6", "--dist-backend=nccl"], "--dist-backend=nccl needs --use-gpu and CUDA"),
    (["--mini-batch-size=6", "--dist-backend=tcp"], "--dist-backend 'tcp' is not one of gloo, nccl, mpi"),
])
def test_bad_distributed_flags_are_one_line_errors(run_main, launched, argv, message):
    launched(WORLD_SIZE=3, RANK=0, LOCAL_RANK=0)
    if "nccl" in message and torch.cuda.is_available():
        pytest.skip("CUDA present")
    code, out, err = run_main(*argv)
    assert code == 1 and err.count("\n") == 1 and message in err and err.startswith("dlrm_s_pytorch.py: rank 0: error:")
    assert "Finished" not in out


def test_mpirun_on_several_machines_needs_master_addr(run_main, launched):
    launched(OMPI_COMM_WORLD_SIZE=4, OMPI_COMM_WORLD_RANK=0, OMPI_COMM_WORLD_LOCAL_RANK=0,
             OMPI_COMM_WORLD_LOCAL_SIZE=2)
    code, _, err = run_main("--mini-batch-size=4")
    assert code == 1 and "MASTER_ADDR is not set" in err and "mpirun -x MASTER_ADDR=" in err
    assert "MPICH: mpirun -genv MASTER_ADDR 10.0.0.1" in err


def test_a_master_port_that_is_not_a_number_is_named(run_main, launched):
    launched(WORLD_SIZE=2, RANK=0, LOCAL_RANK=0, MASTER_ADDR="127.0.0.1", MASTER_PORT="abc")
    code, _, err = run_main("--mini-batch-size=4")
    assert code == 1 and err.count("\n") == 1 and "MASTER_PORT=abc is not a port number (1 to 65535)" in err


def test_dist_backend_in_a_single_process_is_a_note(run_main, launched):
    code, out, err = run_main("--dist-backend=gloo", "--mini-batch-size=2", "--data-size=4")
    assert code == 0 and out.count("Finished training it") == 2
    assert err == "note: --dist-backend has no effect in a single process (launch with torchrun or mpirun)\n"


# ---------------------------------------------------------------- pieces
def test_placement_balances_bytes_not_table_counts():
    # Criteo Kaggle's table sizes: three tables hold 75% of the rows
    rows = [1460, 583, 10131227, 2202608, 305, 24, 12517, 633, 3, 93145, 5683, 8351593, 3194, 27, 14992,
            5461306, 10, 5652, 2173, 4, 7046547, 18, 15, 286181, 105, 142572]
    dim = 16
    placement = ext_dist.place_tables([n * dim for n in rows], 4)
    assert sorted(t for tables in placement for t in tables) == list(range(len(rows)))
    loads = [sum(rows[t] for t in tables) for tables in placement]
    # the largest table alone outweighs an even share: the best possible maximum is that table
    assert max(loads) == max(rows)
    assert min(loads) > 0.7 * (sum(rows) - max(rows)) / 3
    # the original's split by count (consecutive tables, equal numbers) is far worse
    by_count = [sum(rows[t] for t in range(r * 7, min((r + 1) * 7, len(rows)))) for r in range(4)]
    assert max(by_count) > 1.2 * max(loads)


def test_placement_weighs_rows_times_dim():
    # equal rows, different widths: bytes decide; ties go to the lowest rank
    assert ext_dist.place_tables([100 * 64, 100 * 8, 100 * 8, 100 * 8], 2) == [[0], [1, 2, 3]]
    assert ext_dist.place_tables([5, 5, 5, 5], 2) == [[0, 2], [1, 3]]
    assert ext_dist.place_tables([7], 3) == [[0], [], []]


def test_row_splits():
    assert ext_dist.row_splits(12, 3) == [4, 4, 4]
    assert ext_dist.row_splits(8, 3) == [3, 3, 2]
    assert ext_dist.row_splits(1, 3) == [1, 0, 0]


@pytest.mark.parametrize("world", [2, 3])
def test_shards_are_the_global_batch_split(world):
    dataset = dlrm_data.RandomDataset(4, [50, 3, 20, 7], num_samples=13, batch_size=8, seed=5)
    placement = ext_dist.place_tables([50, 3, 20, 7], world)
    for j in range(len(dataset)):  # 8 samples, then 5
        batch = dataset[j]
        shards = [ext_dist.ShardedDataset(dataset, r, world, placement[r])[j] for r in range(world)]
        torch.testing.assert_close(torch.cat([s.dense_x for s in shards]), batch.dense_x)
        torch.testing.assert_close(torch.cat([s.target for s in shards]), batch.target)
        assert [s.batch_size for s in shards] == ext_dist.row_splits(batch.batch_size, world)
        full_bags = batch.lS_i
        for r, shard in enumerate(shards):
            assert shard.global_batch_size == batch.batch_size and shard.num_tables == len(placement[r])
            for k, t in enumerate(placement[r]):
                lengths = torch.diff(shard.offsets[k * batch.batch_size:(k + 1) * batch.batch_size + 1])
                bags = slice(t * batch.batch_size, (t + 1) * batch.batch_size)
                torch.testing.assert_close(lengths, torch.diff(batch.offsets)[bags])
                start = int(shard.offsets[k * batch.batch_size])
                torch.testing.assert_close(shard.indices[start:start + int(lengths.sum())], full_bags[t])


def test_tables_are_initialised_the_same_wherever_they_are_built():
    import dlrm_s_pytorch as dlrm

    args = dlrm.parse_args(["--arch-embedding-size=30-20-10-5", "--arch-sparse-feature-size=2"])
    torch.manual_seed(3)
    whole = dlrm.build_model(args, 4, args.arch_embedding_size)
    torch.manual_seed(3)
    part = dlrm.build_model(args, 4, args.arch_embedding_size,
                            dlrm.build_embeddings(args, args.arch_embedding_size, tables=[1, 3]))
    assert len(part.emb_l) == 2
    torch.testing.assert_close(part.emb_l[0].weight, whole.emb_l[1].weight, rtol=0, atol=0)
    torch.testing.assert_close(part.emb_l[1].weight, whole.emb_l[3].weight, rtol=0, atol=0)
    torch.testing.assert_close(part.bot_l[0].weight, whole.bot_l[0].weight, rtol=0, atol=0)


@pytest.mark.parametrize("env,expected", [
    ({"WORLD_SIZE": "4", "RANK": "2", "LOCAL_RANK": "0"}, (2, 4, 0, "torchrun")),
    ({"OMPI_COMM_WORLD_SIZE": "8", "OMPI_COMM_WORLD_RANK": "5", "OMPI_COMM_WORLD_LOCAL_RANK": "1"},
     (5, 8, 1, "Open MPI")),
    ({"PMI_SIZE": "2", "PMI_RANK": "1", "MPI_LOCALRANKID": "1"}, (1, 2, 1, "MPICH/PMI")),
    ({"MV2_COMM_WORLD_SIZE": "2", "MV2_COMM_WORLD_RANK": "0", "MV2_COMM_WORLD_LOCAL_RANK": "0"}, (0, 2, 0, "MVAPICH")),
    ({"WORLD_SIZE": "2", "RANK": "1"}, (1, 2, 3, "torchrun")),  # local rank from --local_rank=3
])
def test_launcher_environments(env, expected):
    info = ext_dist.launch_info(env, local_rank_flag=3)
    assert (info.rank, info.world_size, info.local_rank, info.launcher) == expected


def test_no_launcher_means_one_process_and_bad_variables_are_errors():
    assert ext_dist.launch_info({}) is None and ext_dist.launch_world_size({}) == 1
    with pytest.raises(ext_dist.DistributedError, match="RANK=4 is not a rank of WORLD_SIZE=4"):
        ext_dist.launch_info({"WORLD_SIZE": "4", "RANK": "4"})
    with pytest.raises(ext_dist.DistributedError, match="RANK='x' is not an integer"):
        ext_dist.launch_info({"WORLD_SIZE": "4", "RANK": "x"})


def test_backend_defaults_and_checks():
    assert ext_dist.choose_backend("", use_gpu=False, cuda_available=False) == "gloo"
    assert ext_dist.choose_backend("", use_gpu=True, cuda_available=True) == "nccl"
    assert ext_dist.choose_backend("", use_gpu=True, cuda_available=False) == "gloo"
    assert ext_dist.choose_backend("gloo", use_gpu=True, cuda_available=True) == "gloo"
    with pytest.raises(ext_dist.DistributedError, match="needs --use-gpu and CUDA"):
        ext_dist.choose_backend("nccl", use_gpu=False, cuda_available=True)
    if not torch.distributed.is_mpi_available():
        with pytest.raises(ext_dist.DistributedError, match="needs a PyTorch built with MPI"):
            ext_dist.choose_backend("mpi", use_gpu=False)


# ---------------------------------------------------------------- GPUs (skipped without CUDA)
@pytest.mark.parametrize("world", [1, 2])
def test_nccl_on_gpus_equals_one_gpu(run_main, tmp_path, world):
    if not torch.cuda.is_available() or torch.cuda.device_count() < world:
        pytest.skip(f"needs {world} CUDA device(s)")
    args = [*MODEL, "--data-size=62", "--mini-batch-size=6", "--test-mini-batch-size=8", "--test-freq=4",
            "--optimizer=rwsadagrad", "--learning-rate=0.1", "--use-gpu"]
    (_, out, _), *_ = launch(world, [*args, "--dist-backend=nccl"], tmp_path)
    code, single, _ = run_main(*args)
    assert code == 0
    assert_same_run(out, single)


def test_sharded_dataset_follows_the_epoch_of_a_reshuffled_dataset():
    """Each epoch's shard is a slice of that epoch's global batch (the shuffle is not frozen at epoch 0)."""
    import dlrm_data
    import extend_distributed as ext_dist

    class Reshuffled:
        def __init__(self):
            self.epoch = 0

        def __len__(self):
            return 3

        def set_epoch(self, epoch):
            self.epoch = epoch

        def __getitem__(self, j):
            rng = np.random.default_rng([self.epoch, j])
            return dlrm_data.batch_from_tables(rng.random((4, 2)), [np.ones(4), np.ones(4)],
                                               [rng.integers(0, 5, 4), rng.integers(0, 7, 4)], rng.random(4))

    data = Reshuffled()
    shard = ext_dist.ShardedDataset(data, rank=1, num_ranks=2, tables=[0, 1])
    shard.set_epoch(1)
    assert data.epoch == 1
    torch.testing.assert_close(shard[2].dense_x, data[2].dense_x[2:4])


@pytest.mark.parametrize("message", [
    "[../third_party/gloo/gloo/transport/tcp/pair.cc:534] Connection closed by peer [127.0.0.1]:1234",
    "Application timeout caused pair closure",  # gloo, a peer that stopped answering
    "Timed out waiting 10000ms for send operation to complete",
])
def test_gloo_failures_count_as_a_lost_peer(message):
    assert ext_dist._is_communication_failure(RuntimeError(message))
    assert not ext_dist._is_communication_failure(RuntimeError("mat1 and mat2 shapes cannot be multiplied"))
