"""Distributed DLRM on torch.distributed: model-parallel embeddings, data-parallel MLPs.

Launch the same command under torchrun or mpirun; one process per GPU (or per CPU socket):

    # one machine, 8 GPUs
    torchrun --nproc_per_node=8 dlrm_s_pytorch.py --use-gpu ...flags...
    # two machines (run on each, --node_rank 0 and 1)
    torchrun --nnodes=2 --node_rank=0 --nproc_per_node=8 --master_addr=10.0.0.1 --master_port=29500 \\
        dlrm_s_pytorch.py --use-gpu ...flags...
    # MPI (Open MPI, MPICH, Intel MPI, MVAPICH): the gloo/nccl group is built from the MPI variables
    mpirun -np 4 -x MASTER_ADDR=10.0.0.1 python dlrm_s_pytorch.py ...flags...

How a run is split over W processes (ranks):
- each embedding table lives on exactly one rank: tables are placed greedily by size (rows x dim),
  the largest first, each on the rank holding the fewest bytes so far (`place_tables`);
- every rank reads the whole global batch j (datasets give `ds[j]`, a pure function of j) and keeps
  the sparse ids of its own tables for all B samples (`SparseFeatures.select_tables`) plus dense
  features and targets of its rows [r*B/W, (r+1)*B/W) (`ShardedDataset`);
- its embedding collection (`ModelParallelEmbeddings`, wrapping the collection of its own tables)
  pools them for all B samples, and an all-to-all (`_ExchangePooled`, an autograd function; the
  reverse all-to-all in backward) hands every rank the pooled embeddings [B/W, T, D] of its rows;
- bottom and top MLPs are replicated, their gradients averaged by DistributedDataParallel; the
  embedding gradients are not averaged by DDP: the all-to-all scales them so that the update equals
  the single-process one on the whole global batch (see `dlrm_s_pytorch.train`);
- evaluation splits each test batch over the ranks (unevenly for a short last batch) and computes
  the metrics over the predictions gathered from all ranks; only rank 0 prints and writes files;
- checkpoints hold the whole single-process model: the tables are gathered on rank 0 to save and
  handed out from rank 0 on load, so runs of any world size (1 included) load each other's.

A rank that exits or crashes makes the others stop with an error naming the problem: the process
group has a timeout (--dist-timeout) and lost connections surface as `DistributedError`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import gc
import inspect
import os
import re
import sys
import tempfile
import time

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import Dataset

import dlrm_data
from dlrmkit.embeddings import EmbeddingCollection

BACKENDS = ("gloo", "nccl", "mpi")


class DistributedError(Exception):
    """A user-facing error of a distributed run: printed as one line, exit status 1."""


# ============================================================================ launcher environment
@dataclasses.dataclass
class LaunchInfo:
    """Where this process stands, as told by its launcher."""

    rank: int
    world_size: int
    local_rank: int
    launcher: str
    local_world_size: int | None = None


# (launcher, world size, rank, local rank, local size) variables, the first present wins
LAUNCHER_VARIABLES = (
    ("torchrun", "WORLD_SIZE", "RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE"),
    ("Open MPI", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_LOCAL_RANK",
     "OMPI_COMM_WORLD_LOCAL_SIZE"),
    ("MVAPICH", "MV2_COMM_WORLD_SIZE", "MV2_COMM_WORLD_RANK", "MV2_COMM_WORLD_LOCAL_RANK",
     "MV2_COMM_WORLD_LOCAL_SIZE"),
    ("MPICH/PMI", "PMI_SIZE", "PMI_RANK", "MPI_LOCALRANKID", "MPI_LOCALNRANKS"),
)


def launch_info(environ=None, local_rank_flag: int = -1) -> LaunchInfo | None:
    """The launcher's view of this process, or None for a plain single process.

    torchrun sets RANK/WORLD_SIZE/LOCAL_RANK; mpirun sets OMPI_COMM_WORLD_* (Open MPI),
    MV2_COMM_WORLD_* (MVAPICH) or PMI_RANK/PMI_SIZE/MPI_LOCALRANKID (MPICH, Intel MPI).
    `--local_rank` (torch.distributed.launch) counts when the environment has no local rank.
    """
    environ = os.environ if environ is None else environ
    for launcher, size_var, rank_var, local_var, local_size_var in LAUNCHER_VARIABLES:
        if size_var not in environ:
            continue
        world_size = _env_int(environ, size_var)
        rank = _env_int(environ, rank_var) if rank_var in environ else None
        if rank is None:
            if world_size == 1:
                rank = 0
            else:
                raise DistributedError(f"{size_var}={world_size} is set but {rank_var} is not: launch with "
                                       f"{'torchrun' if launcher == 'torchrun' else 'mpirun'}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise DistributedError(f"{rank_var}={rank} is not a rank of {size_var}={world_size}")
        if local_var in environ:
            local_rank = _env_int(environ, local_var)
        elif local_rank_flag >= 0:
            local_rank = local_rank_flag
        else:
            local_rank = rank
        local_size = _env_int(environ, local_size_var) if local_size_var in environ else None
        return LaunchInfo(rank, world_size, local_rank, launcher, local_size)
    return None


def _env_int(environ, name) -> int:
    try:
        return int(environ[name])
    except ValueError:
        raise DistributedError(f"environment variable {name}={environ[name]!r} is not an integer")


def launch_world_size(environ=None) -> int:
    """Processes the launcher started (1 without a launcher); no process group needed."""
    info = launch_info(environ)
    return info.world_size if info else 1


def choose_backend(requested: str, use_gpu: bool, cuda_available: bool | None = None) -> str:
    """--dist-backend, checked; by default nccl for GPU runs, gloo otherwise."""
    cuda_available = torch.cuda.is_available() if cuda_available is None else cuda_available
    if requested and requested not in BACKENDS:
        raise DistributedError(f"--dist-backend {requested!r} is not one of {', '.join(BACKENDS)}")
    backend = requested or ("nccl" if use_gpu and cuda_available else "gloo")
    if backend == "nccl" and not (use_gpu and cuda_available):
        raise DistributedError("--dist-backend=nccl needs --use-gpu and CUDA"
                               + ("" if cuda_available else f" (not available in torch {torch.__version__})")
                               + "; use --dist-backend=gloo for CPU runs")
    if backend == "mpi" and not dist.is_mpi_available():
        raise DistributedError("--dist-backend=mpi needs a PyTorch built with MPI; this one is not "
                               "(gloo and nccl work under mpirun too)")
    return backend


# ============================================================================ process group
def init_distributed(backend: str, use_gpu: bool, local_rank_flag: int, timeout_s: float) -> LaunchInfo | None:
    """Joins the process group the launcher set up; None (and nothing done) for a single process.

    On ranks other than 0, stdout goes to /dev/null from here on (`session` restores it).
    """
    info = launch_info(os.environ, local_rank_flag)
    if info is None:
        return None
    if not dist.is_available():
        raise DistributedError("this PyTorch has no torch.distributed; cannot run under a launcher")
    backend = choose_backend(backend, use_gpu)
    device_id = None
    if use_gpu and torch.cuda.is_available():
        if info.local_rank >= torch.cuda.device_count():
            raise DistributedError(f"local rank {info.local_rank} has no GPU: {torch.cuda.device_count()} visible "
                                   "(start at most one process per GPU on each machine)")
        torch.cuda.set_device(info.local_rank)
        device_id = torch.device("cuda", info.local_rank)
    kwargs = dict(timeout=datetime.timedelta(seconds=timeout_s))
    if backend != "mpi":
        _default_master_address(info)
        kwargs.update(init_method="env://", rank=info.rank, world_size=info.world_size)
        if backend == "nccl":
            kwargs["device_id"] = device_id
    try:
        with _stderr_replayed_on_success():
            dist.init_process_group(backend, **kwargs)
    except (RuntimeError, ValueError) as e:
        where = f"{os.environ.get('MASTER_ADDR')}:{os.environ.get('MASTER_PORT')}" if backend != "mpi" else "MPI"
        raise DistributedError(f"could not set up the {backend} process group of "
                               f"{info.world_size} processes at {where} within --dist-timeout={timeout_s:g} s "
                               f"(did every process start?): {_first_line(e)}") from None
    if info.rank != 0:
        _silence_stdout()
    return info


@contextlib.contextmanager
def _stderr_replayed_on_success():
    """Holds what is written to file descriptor 2 while the body runs: written out after it when it succeeds,
    dropped when it raises. A rendezvous that fails logs each failed connection attempt from PyTorch's C++
    library with 20-50 lines of stack frames; the error it raises says the same in one line."""
    sys.stderr.flush()
    try:
        saved = os.dup(2)
        held = tempfile.TemporaryFile()
    except OSError:  # no descriptors to spare: nothing held
        yield
        return
    with held:
        os.dup2(held.fileno(), 2)
        try:
            yield
        except BaseException:
            sys.stderr.flush()
            os.dup2(saved, 2)
            raise
        else:
            sys.stderr.flush()
            os.dup2(saved, 2)
            held.seek(0)
            for block in iter(lambda: held.read(1 << 16), b""):
                while block:
                    block = block[os.write(2, block):]
        finally:
            os.close(saved)


def _default_master_address(info: LaunchInfo):
    """torchrun sets MASTER_ADDR/PORT; under mpirun they default to this machine when all ranks are here."""
    os.environ.setdefault("MASTER_PORT", "29500")
    port = os.environ["MASTER_PORT"].strip()
    if not (port.isdigit() and 0 < int(port) < 65536):
        raise DistributedError(f"MASTER_PORT={os.environ['MASTER_PORT']} is not a port number (1 to 65535)")
    if "MASTER_ADDR" in os.environ:
        return
    if info.launcher == "torchrun" or info.world_size == 1 or info.local_world_size == info.world_size:
        os.environ["MASTER_ADDR"] = "127.0.0.1"
        return
    raise DistributedError(f"MASTER_ADDR is not set: with {info.launcher} on several machines set it to the "
                           "address of rank 0's machine (Open MPI: mpirun -x MASTER_ADDR=10.0.0.1 -x MASTER_PORT=29500; "
                           "MPICH: mpirun -genv MASTER_ADDR 10.0.0.1 -genv MASTER_PORT 29500)")


_saved_stdout = []


def _silence_stdout():
    _saved_stdout.append(sys.stdout)
    sys.stdout = open(os.devnull, "w")


def is_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def world_size() -> int:
    return dist.get_world_size() if is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if is_initialized() else 0


def is_rank0() -> bool:
    """True in the process that prints and writes files (the only one in a single-process run)."""
    return rank() == 0


COMMUNICATION_FAILURES = ("Connection closed", "Connection reset", "Connection refused", "Broken pipe",
                          "timed out", "Timed out", "Application timeout", "pair closure", "NCCL", "gloo", "Gloo",
                          "peer")


def _is_communication_failure(error: BaseException) -> bool:
    return isinstance(error, dist.DistError) or (
        isinstance(error, RuntimeError) and any(s in str(error) for s in COMMUNICATION_FAILURES))


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    text = re.sub(r"^\[[^\]]*\.(cc|cpp|h):\d+\]\s*", "", text)  # gloo's source location
    return text.split(" This is typically caused")[0]


@contextlib.contextmanager
def session(timeout_s: float = 0):
    """Wraps a whole run: turns a lost peer into a DistributedError and tears the group down."""
    broken = finished = False
    try:
        yield
        finished = True
    except RuntimeError as e:  # torch.distributed's errors are RuntimeErrors
        if not (is_initialized() and _is_communication_failure(e)):
            raise
        broken = True
        wait = f", or did not answer within --dist-timeout={timeout_s:g} s" if timeout_s else ""
        raise DistributedError(f"lost contact with the other processes of this run (one exited or crashed{wait}): "
                               f"{_first_line(e)}") from None
    finally:
        while _saved_stdout:
            sys.stdout.close()
            sys.stdout = _saved_stdout.pop()
        if is_initialized() and not broken:
            _tear_down(wait_for_peers=finished)


def _tear_down(wait_for_peers: bool):
    """Ends a healthy process group while the interpreter is whole: what holds it (DDP modules in
    reference cycles, pending work) is freed first and, after a run that finished, every rank gets
    here before any leaves, so no gloo thread is left to interpreter exit (where it can abort). A rank
    that stopped on an error does not wait: its peers learn of it from the closed connections."""
    gc.collect()
    if wait_for_peers:
        with contextlib.suppress(RuntimeError):
            dist.barrier()
    dist.destroy_process_group()


def error_prefix() -> str:
    """'rank r: ' in a distributed run, so that each process's error says whose it is."""
    info = None
    with contextlib.suppress(DistributedError):
        info = launch_info()
    return f"rank {info.rank}: " if info and info.world_size > 1 else ""


@contextlib.contextmanager
def rank0_first(what: str):
    """Rank 0 runs the block first (e.g. preprocessing into a cache), the others after it succeeded.

    The others wait without a time limit (preprocessing may take long) but notice a dead rank 0,
    whose store then stops answering.
    """
    if world_size() == 1:
        yield
        return
    store = dist.distributed_c10d._get_default_store()
    key = f"dlrm/rank0_first/{what}"
    if rank() == 0:
        try:
            yield
        except BaseException as e:
            store.set(key, f"failed: {_first_line(e)}")
            raise
        store.set(key, "ok")
        return
    while not store.check([key]):
        time.sleep(0.2)
    status = store.get(key).decode()
    if status != "ok":
        raise DistributedError(f"rank 0 {status} while {what}")
    yield


# ============================================================================ table placement
def place_tables(table_bytes, num_ranks: int) -> list[list[int]]:
    """Tables of each rank (ascending ids): largest first onto the least-loaded rank (ties: lowest rank).

    Balancing bytes, not counts: the original gave each rank an equal number of tables, so one rank
    could hold all of Criteo's ten-million-row tables.
    """
    loads = [0] * num_ranks
    placement = [[] for _ in range(num_ranks)]
    for t in sorted(range(len(table_bytes)), key=lambda t: (-table_bytes[t], t)):
        r = min(range(num_ranks), key=lambda r: (loads[r], r))
        placement[r].append(t)
        loads[r] += table_bytes[t]
    return [sorted(tables) for tables in placement]


def table_placement(table_sizes, dim: int, num_ranks: int) -> list[list[int]]:
    """The tables of each rank in a run of `num_ranks` processes (`place_tables` by rows x dim)."""
    return place_tables([int(n) * dim for n in table_sizes], num_ranks)


def tables_of_this_process(table_sizes, dim: int) -> list[int] | None:
    """Ids of the tables this process holds in a model-parallel run; None (all) in a single process."""
    if not is_initialized():
        return None
    return table_placement(table_sizes, dim, world_size())[rank()]


def row_splits(batch_size: int, num_ranks: int) -> list[int]:
    """Rows of a global batch on each rank: equal shares, the remainder (short last batch) to the first ranks."""
    share, extra = divmod(batch_size, num_ranks)
    return [share + (r < extra) for r in range(num_ranks)]


# ============================================================================ data
def shard_batch(batch: dlrm_data.Batch, rank: int, num_ranks: int, tables) -> dlrm_data.Batch:
    """Rank `rank`'s rows of dense features and targets, and the ids of `tables` for every sample."""
    splits = row_splits(batch.batch_size, num_ranks)
    lo = sum(splits[:rank])
    hi = lo + splits[rank]
    return dlrm_data.Batch(batch.dense_x[lo:hi], batch.sparse.select_tables(tables), batch.target[lo:hi])


class ShardedDataset(Dataset):
    """ds[j] = this rank's share of global batch j of `dataset` (`shard_batch`; same length, same batches)."""

    def __init__(self, dataset, rank: int, num_ranks: int, tables):
        self.dataset, self.rank, self.num_ranks, self.tables = dataset, rank, num_ranks, list(tables)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, j) -> dlrm_data.Batch:
        return shard_batch(self.dataset[j], self.rank, self.num_ranks, self.tables)

    def set_epoch(self, epoch: int):
        """Forwards the epoch to a dataset that reshuffles every epoch."""
        if hasattr(self.dataset, "set_epoch"):
            self.dataset.set_epoch(epoch)


# ============================================================================ model
class _ExchangePooled(torch.autograd.Function):
    """All-to-all of pooled embeddings.

    forward: local [sum(rows), T_local, D] (this rank's tables, every rank's rows in rank order)
             -> [rows[rank], T, D], the tables of rank 0 first, then rank 1's, ...
    backward: the reverse all-to-all, times `grad_scale`.
    """

    @staticmethod
    def forward(ctx, local, rows, tables_per_rank, dim, grad_scale):
        me = dist.get_rank()
        send = [n * local.shape[1] * dim for n in rows]
        recv = [rows[me] * t * dim for t in tables_per_rank]
        out = local.new_empty(sum(recv))
        dist.all_to_all_single(out, local.contiguous().view(-1), recv, send)
        ctx.splits, ctx.local_shape = (send, recv), local.shape
        ctx.tables_per_rank, ctx.grad_scale = tables_per_rank, grad_scale
        chunks = out.split(recv)
        return torch.cat([c.view(rows[me], t, dim) for c, t in zip(chunks, tables_per_rank)], dim=1)

    @staticmethod
    def backward(ctx, grad):
        send, recv = ctx.splits
        parts = grad.split(ctx.tables_per_rank, dim=1)
        grad_out = torch.cat([p.contiguous().view(-1) for p in parts])
        grad_local = grad.new_empty(sum(send))
        dist.all_to_all_single(grad_local, grad_out, send, recv)
        return grad_local.view(ctx.local_shape).mul_(ctx.grad_scale), None, None, None, None


class ModelParallelEmbeddings(EmbeddingCollection):
    """The embedding collection of a model-parallel run: this rank's tables, exchanged with all-to-all.

    Built in a process group: `make_local(tables)` builds the collection of this rank's tables (global
    ids, see `place_tables`). Called on the sparse ids of those tables for the whole global batch (a
    shard made by `shard_batch`), it returns [rows of this rank, T, D]: every table, in order.
    """

    def __init__(self, table_sizes, dim: int, make_local):
        super().__init__()
        self.table_sizes = [int(n) for n in table_sizes]
        self.table_ids = list(range(len(self.table_sizes)))  # every table of the model, through the exchange
        self.rank, self.world_size = dist.get_rank(), dist.get_world_size()
        self.placement = table_placement(self.table_sizes, dim, self.world_size)
        self.local = make_local(self.placement[self.rank])
        self.embedding_dim = self.local.embedding_dim
        order = [t for tables in self.placement for t in tables]
        to_global = torch.empty(len(order), dtype=torch.int64)
        to_global[torch.tensor(order, dtype=torch.int64)] = torch.arange(len(order))
        self.identity_order = order == sorted(order)
        self.register_buffer("to_global", to_global, persistent=False)

    def __len__(self):
        return len(self.table_sizes)

    @property
    def local_tables(self) -> list[int]:
        return self.placement[self.rank]

    def pool(self, sparse):
        rows = row_splits(sparse.batch_size, self.world_size)
        # float32 for every rank's part of the exchange (under autocast MD projections give bf16)
        if self.local_tables:
            local = self.local(sparse).float()
        else:  # no tables here: nothing to send, but still part of every exchange (and its backward)
            local = torch.zeros(0, 0, self.embedding_dim, device=self.to_global.device,
                                requires_grad=torch.is_grad_enabled())
        tables_per_rank = [len(tables) for tables in self.placement]
        pooled = _ExchangePooled.apply(local, rows, tables_per_rank, self.embedding_dim, 1.0 / self.world_size)
        return pooled if self.identity_order else pooled.index_select(1, self.to_global)

    def table_parameters(self, t: int) -> dict[str, torch.Tensor]:
        """The tensors of the t-th table held by this rank (global table local_tables[t])."""
        return self.local.table_parameters(t)

    def table_rows(self, t, indices):
        raise NotImplementedError("a model-parallel collection is not exported (gather a checkpoint first)")

    def to_per_table(self):
        raise NotImplementedError("a model-parallel collection is not quantized (gather a checkpoint first)")


_DDP_PARAMETERS = inspect.signature(DistributedDataParallel.__init__).parameters


class DistributedDLRM(DistributedDataParallel):
    """A DLRM_Net whose `emb_l` is a ModelParallelEmbeddings, wrapped for a distributed run.

    DDP averages the MLP gradients; the embedding tables are left out of DDP. `make_full_model`
    builds an uninitialised single-process model: the container that checkpoints are written from
    and read into on rank 0.
    """

    def __init__(self, model, device, make_full_model):
        if not isinstance(model.emb_l, ModelParallelEmbeddings):
            raise TypeError("DistributedDLRM needs a model built with ModelParallelEmbeddings")
        ignored = [name for name, _ in [*model.named_parameters(), *model.named_buffers()] if name.startswith("emb_l.")]
        DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, ignored)
        # the buffers (interaction pair indices) are the same everywhere: no syncing before each forward
        no_buffer_sync = ({"forward_sync_buffers": False} if "forward_sync_buffers" in _DDP_PARAMETERS
                          else {"broadcast_buffers": False})
        super().__init__(model, device_ids=[device.index] if device.type == "cuda" else None, **no_buffer_sync)
        self.placement = model.emb_l.placement
        self.make_full_model = make_full_model


def distribute(model, train_set, test_set, device, make_full_model):
    """The distributed model and this rank's views of the datasets; `model.emb_l` is a
    ModelParallelEmbeddings."""
    tables = model.emb_l.local_tables
    return (DistributedDLRM(model, device, make_full_model),
            ShardedDataset(train_set, rank(), world_size(), tables),
            ShardedDataset(test_set, rank(), world_size(), tables))


# ============================================================================ collectives for the loop
def sum_across(value: torch.Tensor) -> torch.Tensor:
    """The sum of `value` over all ranks (the value itself in a single process)."""
    if world_size() == 1:
        return value
    total = value.clone()
    dist.all_reduce(total)
    return total


def all_gather_rows(rows: torch.Tensor) -> torch.Tensor:
    """Every rank's rows, concatenated in rank order (ranks may hold different counts)."""
    if world_size() == 1:
        return rows
    count = torch.tensor([rows.shape[0]], device=rows.device)
    counts = [torch.zeros_like(count) for _ in range(world_size())]
    dist.all_gather(counts, count)
    counts = [int(c) for c in counts]
    padded = rows.new_zeros((max(counts),) + rows.shape[1:])
    padded[: rows.shape[0]] = rows
    gathered = [torch.empty_like(padded) for _ in counts]
    dist.all_gather(gathered, padded)
    return torch.cat([g[:n] for g, n in zip(gathered, counts)])


def no_grad_sync(model, skip: bool):
    """DDP's no_sync while accumulating micro-batches (gradients are averaged once, at the last one)."""
    if skip and isinstance(model, DistributedDataParallel):
        return model.no_sync()
    return contextlib.nullcontext()


# ============================================================================ checkpoints
# A checkpoint holds the single-process model. Rank 0 builds an uninitialised one on its CPU (the
# "full" model) and tables travel, one tensor at a time, between their owner and that model; the
# replicated MLPs and their optimizer state come from (or go to) every rank directly.
# Optimizer state of a table tensor is per row (Adagrad's sums: sliced with the table's rows) or a
# plain value (e.g. a step count); `specs` describes it: {name: ("rows", tail shape, dtype) | ("value", v)}.
def _table_slots(collection, table_ids):
    """{(table id, tensor name): (tensor, parameter holding it, its first row there)}."""
    params = list(collection.parameters())
    slots = {}
    for i, t in enumerate(table_ids):
        for name, tensor in collection.table_parameters(i).items():
            owner = next(p for p in params if p.untyped_storage().data_ptr() == tensor.untyped_storage().data_ptr())
            first_row = (tensor.storage_offset() - owner.storage_offset()) // max(owner.stride(0), 1)
            slots[(t, name)] = (tensor, owner, first_row)
    return slots


def _state_specs(slots, optimizer):
    """{slot key: specs of the optimizer state of that table tensor}."""
    specs = {}
    for key, (_, param, _) in slots.items():
        state = optimizer.state.get(param, {}) if optimizer is not None else {}
        specs[key] = {
            name: ("rows", tuple(v.shape[1:]), v.dtype)
            if isinstance(v, torch.Tensor) and v.dim() >= 1 and v.shape[0] == param.shape[0]
            else ("value", v.detach().cpu().clone() if isinstance(v, torch.Tensor) else v)
            for name, v in state.items()
        }
    return specs


def _table_views(slots, optimizer, key, specs, target: bool):
    """The table tensor and views of its rows of each per-row optimizer state; a target gets the
    plain values and the per-row state it lacks."""
    tensor, param, first_row = slots[key]
    views = [tensor]
    if optimizer is None or not specs:
        return views
    state = optimizer.state[param]
    for name, spec in sorted(specs.items()):
        if spec[0] == "value":
            if target:
                state[name] = spec[1]
        else:
            if name not in state:
                state[name] = torch.zeros((param.shape[0],) + spec[1], dtype=spec[2], device=param.device)
            views.append(state[name][first_row:first_row + tensor.shape[0]])
    return views


def _move_tables(specs, owners, local, full, toward_rank0: bool, device):
    """Copies every table tensor and its optimizer rows between the rank owning it (`local`: its slots
    and optimizer) and rank 0's full model (`full`), toward rank 0 or from it."""
    me = dist.get_rank()
    for key in sorted(specs):
        owner = owners[key[0]]
        src, dst = (owner, 0) if toward_rank0 else (0, owner)
        if me not in (src, dst):
            continue
        local_views = _table_views(*local, key, specs[key], target=not toward_rank0) if me == owner else None
        full_views = _table_views(*full, key, specs[key], target=toward_rank0) if me == 0 else None
        source, target = (local_views, full_views) if toward_rank0 else (full_views, local_views)
        with torch.no_grad():
            for i in range(len(source if me == src else target)):
                if src == dst:
                    target[i].copy_(source[i])
                elif me == src:
                    dist.send(source[i].detach().to(device).contiguous(), dst=dst)
                else:
                    buffer = torch.empty(target[i].shape, dtype=target[i].dtype, device=device)
                    dist.recv(buffer, src=src)
                    target[i].copy_(buffer)


def _dense_names(module):
    return [name for name, _ in module.named_parameters() if not name.startswith("emb_l.")]


def _full_model_and_optimizer(model, optimizer):
    """An uninitialised single-process model (and an optimizer of the same kind) on the CPU."""
    with torch.random.fork_rng(devices=[]), torch.device("meta"):
        full = model.make_full_model()
    full = full.to_empty(device="cpu")
    full_optimizer = type(optimizer)(full.parameters(), **optimizer.defaults) if optimizer is not None else None
    return full, full_optimizer


def gather_to_rank0(model: DistributedDLRM, optimizer):
    """Every rank calls this; rank 0 gets the whole single-process model and optimizer (on its CPU),
    the others (None, None)."""
    module, emb = model.module, model.module.emb_l
    slots = _table_slots(emb, emb.local_tables)
    every_rank_specs = [None] * dist.get_world_size()
    dist.all_gather_object(every_rank_specs, _state_specs(slots, optimizer))
    specs = {key: spec for part in every_rank_specs for key, spec in part.items()}
    owners = {t: r for r, tables in enumerate(model.placement) for t in tables}
    full = full_optimizer = full_slots = None
    if dist.get_rank() == 0:
        full, full_optimizer = _full_model_and_optimizer(model, optimizer)
        full_slots = _table_slots(full.emb_l, range(len(full.table_sizes)))
        dense = {k: v for k, v in module.state_dict().items() if not k.startswith("emb_l.")}
        assert not full.load_state_dict(dense, strict=False).unexpected_keys
        if optimizer is not None:
            local_params, full_params = dict(module.named_parameters()), dict(full.named_parameters())
            for name in _dense_names(module):
                if optimizer.state.get(local_params[name]):
                    full_optimizer.state[full_params[name]] = {
                        k: v.detach().cpu().clone() if isinstance(v, torch.Tensor) else v
                        for k, v in optimizer.state[local_params[name]].items()}
            for group, full_group in zip(optimizer.param_groups, full_optimizer.param_groups):
                full_group.update({k: v for k, v in group.items() if k != "params"})
    _move_tables(specs, owners, (slots, optimizer), (full_slots, full_optimizer), True, emb.to_global.device)
    if full_optimizer is not None:  # state in parameter order, as a single process has it
        ordered = {p: full_optimizer.state[p] for p in full.parameters() if p in full_optimizer.state}
        full_optimizer.state.clear()
        full_optimizer.state.update(ordered)
    return full, full_optimizer


def rank0_value(value):
    """Rank 0's `value` on every rank (a picklable object; every rank calls this); `value` itself in one process."""
    if not is_initialized():
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def load_distributed(path, model: DistributedDLRM, optimizer, load_single):
    """Every rank calls this: rank 0 reads the checkpoint with `load_single(path, model, optimizer)`
    into a whole single-process model and hands each rank its tables; returns the TrainState."""
    module, emb = model.module, model.module.emb_l
    device = emb.to_global.device
    header = [None]
    full = full_optimizer = full_slots = None
    if dist.get_rank() == 0:
        full, full_optimizer = _full_model_and_optimizer(model, optimizer)
        try:
            state = load_single(path, full, full_optimizer)
        except Exception as e:  # every rank must hear of it, not wait for tables that never come
            header[0] = ("error", str(e))
        else:
            full_slots = _table_slots(full.emb_l, range(len(full.table_sizes)))
            full_params = dict(full.named_parameters())
            dense_state, groups = {}, []
            if full_optimizer is not None:
                dense_state = {name: dict(full_optimizer.state[full_params[name]]) for name in _dense_names(module)
                               if full_optimizer.state.get(full_params[name])}
                groups = [{k: v for k, v in g.items() if k != "params"} for g in full_optimizer.param_groups]
            header[0] = ("ok", state, _state_specs(full_slots, full_optimizer), dense_state, groups)
    dist.broadcast_object_list(header, src=0)
    if header[0][0] == "error":
        raise DistributedError(header[0][1])
    _, state, specs, dense_state, groups = header[0]

    with torch.no_grad():
        for name, param in module.named_parameters():
            if not name.startswith("emb_l."):
                buffer = full.get_parameter(name).detach().to(device) if full is not None else torch.empty_like(param)
                dist.broadcast(buffer, src=0)
                param.copy_(buffer)
    if optimizer is not None:
        local_params = dict(module.named_parameters())
        for name, values in dense_state.items():
            optimizer.state[local_params[name]] = {
                k: v.to(device) if isinstance(v, torch.Tensor) and v.dim() > 0 else v for k, v in values.items()}
        for group, saved in zip(optimizer.param_groups, groups):
            group.update(saved)
    owners = {t: r for r, tables in enumerate(model.placement) for t in tables}
    slots = _table_slots(emb, emb.local_tables)
    _move_tables(specs, owners, (slots, optimizer), (full_slots, full_optimizer), False, device)
    return state
