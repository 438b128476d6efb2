"""Benchmark harness: named DLRM configurations on random data, each in its own process.

Usage:
    python bench/harness.py --list
    python bench/harness.py                                        # CPU table: every CPU config, fp32 and bf16
    python bench/harness.py --configs kaggle-128 benchmark --precisions fp32 bf16 --baseline main
    python bench/harness.py --configs benchmark --original /tmp/dlrm/dlrm_s_pytorch.py   # × the original
    python bench/harness.py --configs kaggle-16384 --device cuda --precisions bf16 --compile

For each configuration and precision the harness starts one process per run, one after the other,
each building and training exactly as `dlrm_s_pytorch.py` does (parse_args, make_datasets,
build_model, build_optimizer, train) with the configuration's flags, then measures them in
`--repeat` alternating rounds of `--iters` iterations (other work on a shared machine hits all
runs of a round alike); figures are medians over the rounds:
- start-up: from the parent starting the process to the end of the first training iteration
  (interpreter and torch import, model initialisation, first batch, first step);
- ms/it and samples/s: the round's wall time over its iterations (after `--warmup` ones); the data
  are a pool of `--pool` distinct random batches generated once and cycled, so the figure is the
  trainer's step (the original's ms/it excludes data loading too); "median ms/it" is the median
  single iteration (CPU);
- peak memory: the process's maximum resident set (CPU), or the peak of torch.cuda allocations.

Runs measured next to ours, and their ratios (the median over the rounds of each round's ratio):
- "reference": a plain-PyTorch DLRM of the same configuration, as the original builds it: one
  `nn.EmbeddingBag` (sum, sparse gradients) per table, the bottom and top MLPs, the dot (or cat, or
  the DCN V2 cross network as TorchRec's LowRankCrossNet, or the projection as its DLRM_Projection)
  interaction, and `torch.optim.SGD` / `torch.optim.Adagrad`, on the same batches and precision.
  "× reference" is its ms/it over ours (above 1: we are faster).
- "dense floor": the dense layers alone, forward, backward and a `torch.optim.SGD` step at the same
  batch size and precision: the bottom and top MLPs, and the interaction's own layers where it has
  them (dcn's cross layers, projection's branches), with constants in place of the pooled embeddings
  (and of the dot products): the least any DLRM step can cost. "× floor" is our ms/it over it
  (1: nothing but the dense layers).
- `--baseline REV`: the same runs with the code of git revision REV of this repository (e.g. the
  commit before a change); "× baseline" is its ms/it over ours.
- `--original PATH`: facebookresearch/dlrm's `dlrm_s_pytorch.py` and ours as whole programs with the
  configuration's flags, printing every iteration: wall ms/it between progress lines (data
  generation included, as a user sees it); "× original" is the original's over ours.
The header names the CPU and its matrix/vector instruction sets (AVX-512, AVX512-BF16, AMX), which
decide what bf16 can gain. A new configuration is one entry in CONFIGS.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import re
import select
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from dlrmkit import outputs  # noqa: E402  (no torch in this process)
from dlrmkit.flags import CommandLineParser  # noqa: E402  (argument parsing only: no torch in this process)

KAGGLE_TABLES = [1460, 583, 10131227, 2202608, 305, 24, 12517, 633, 3, 93145, 5683, 8351593, 3194, 27, 14992,
                 5461306, 10, 5652, 2173, 4, 7046547, 18, 15, 286181, 105, 142572]
TERABYTE_TABLES = [227605432, 39060, 17295, 7424, 20265, 3, 7122, 1543, 63, 130229467, 3067956, 405282, 10, 2209,
                   11938, 155, 4, 976, 14, 292775614, 40790948, 187188510, 590152, 12973, 108, 36]
TERABYTE_SMALL_ROWS = 100_000  # "smaller tables": each capped as --max-ind-range=100000 would


def dashed(values):
    return "-".join(str(v) for v in values)


# the Criteo models as bench/dlrm_s_criteo_{kaggle,terabyte}.sh and the MLPerf scripts train them, on random
# data with one id per table and sample (as in Criteo); the benchmark model as bench/dlrm_s_benchmark.sh
KAGGLE = ["--arch-sparse-feature-size=16", "--arch-mlp-bot=13-512-256-64-16", "--arch-mlp-top=512-256-1",
          f"--arch-embedding-size={dashed(KAGGLE_TABLES)}", "--loss-function=bce", "--round-targets=True",
          "--learning-rate=0.1", "--num-indices-per-lookup=1", "--num-indices-per-lookup-fixed=True"]
TERABYTE_SMALL = ["--arch-sparse-feature-size=128", "--arch-mlp-bot=13-512-256-128",
                  "--arch-mlp-top=1024-1024-512-256-1",
                  f"--arch-embedding-size={dashed(min(n, TERABYTE_SMALL_ROWS) for n in TERABYTE_TABLES)}",
                  "--loss-function=bce", "--round-targets=True", "--learning-rate=1.0",
                  "--num-indices-per-lookup=1", "--num-indices-per-lookup-fixed=True", "--mini-batch-size=2048"]
# MLPerf DLRMv2 (DLRM-DCNv2): the Terabyte model's MLPs and dimension with the cross network, Adagrad, and
# the benchmark's multi-hot bags (214 ids per sample)
MLPERF_MULTI_HOT_SIZES = [3, 2, 1, 2, 6, 1, 1, 1, 1, 7, 3, 8, 1, 6, 9, 5, 1, 1, 1, 12, 100, 27, 10, 3, 1, 1]
DCNV2_SMALL = [f for f in TERABYTE_SMALL if not f.startswith(("--learning-rate", "--num-indices-per-lookup"))] + [
    "--arch-interaction-op=dcn", "--dcn-num-layers=3", "--dcn-low-rank-dim=512", "--optimizer=adagrad",
    "--learning-rate=0.005", "--adagrad-eps=1e-8", f"--multi-hot-sizes={dashed(MLPERF_MULTI_HOT_SIZES)}"]
BENCHMARK = ["--mini-batch-size=2048", "--arch-mlp-bot=512-512-64", "--arch-mlp-top=1024-1024-1024-1",
             "--arch-sparse-feature-size=64", f"--arch-embedding-size={dashed([1000000] * 8)}",
             "--num-indices-per-lookup=100", "--arch-interaction-op=dot", "--numpy-rand-seed=727"]

CONFIGS = {
    # name: (flags, description)
    "kaggle-128": (KAGGLE + ["--mini-batch-size=128"], "Criteo Kaggle model, mini-batch 128"),
    "kaggle-2048": (KAGGLE + ["--mini-batch-size=2048"], "Criteo Kaggle model, mini-batch 2048"),
    "benchmark": (BENCHMARK, "bench/dlrm_s_benchmark.sh: 8 x 1M x 64, 100 lookups, mini-batch 2048"),
    "terabyte-small": (TERABYTE_SMALL, f"MLPerf Terabyte model, tables capped at {TERABYTE_SMALL_ROWS:,} rows, "
                                       "mini-batch 2048"),
    "dcnv2-small": (DCNV2_SMALL, f"MLPerf DLRMv2 (DCN V2 interaction, Adagrad, multi-hot bags), tables capped at "
                                 f"{TERABYTE_SMALL_ROWS:,} rows, mini-batch 2048"),
    "kaggle-16384": (KAGGLE + ["--mini-batch-size=16384"], "Criteo Kaggle model, mini-batch 16384 (GPU)"),
    "smoke": (["--arch-sparse-feature-size=16", "--arch-mlp-bot=13-64-16", "--arch-mlp-top=64-1",
               "--arch-embedding-size=1000-1000-1000-1000", "--mini-batch-size=128", "--loss-function=bce",
               "--round-targets=True"], "a tiny model: checks the harness itself in seconds"),
}
CPU_DEFAULT = ["kaggle-128", "kaggle-2048", "benchmark", "terabyte-small", "dcnv2-small"]
REFERENCE, FLOOR = "reference", "dense floor"  # the plain-PyTorch runs measured next to ours
# each --precisions value as trainer flags; bf16-tables: bf16 MLPs and bfloat16 embedding tables
# (the plain-PyTorch runs read --precision only: theirs stay float32)
PRECISION_FLAGS = {"fp32": [], "bf16": ["--precision=bf16"], "fp16": ["--precision=fp16"],
                   "bf16-tables": ["--precision=bf16", "--embedding-precision=bf16"]}


# ============================================================================ one run (child process)
class BatchPool:
    """`length` batches cycling through the first `size` batches of `dataset`, each generated once
    (`cache` shared between pools of one dataset, so measured iterations never generate data)."""

    def __init__(self, dataset, size, length, cache=None):
        self.dataset, self.size, self.length = dataset, min(size, len(dataset)), length
        self.cache = {} if cache is None else cache

    def __len__(self):
        return self.length

    def __getitem__(self, j):
        if not 0 <= j < self.length:
            raise IndexError(j)
        key = j % self.size
        if key not in self.cache:
            self.cache[key] = self.dataset[key]
        return self.cache[key]


def peak_memory_gib(device):
    import resource

    import torch

    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


MESSAGE = "harness-child: "  # prefix of a child's JSON lines on stdout (the trainer may print other lines)


def emit(message: dict):
    print(MESSAGE + json.dumps(message), flush=True)


def run_child(spec: dict):
    """Builds one configuration (ours as dlrm_s_pytorch.run() does, or a plain-PyTorch one), trains its
    first iteration and a warm-up, says "ready" with its start-up, then measures `iters` iterations per
    "run" line read from stdin until "quit" (peak memory and versions)."""
    sys.path.insert(0, spec["code_dir"])
    import torch

    import dlrm_s_pytorch as dlrm

    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])

    argv = list(spec["flags"])
    argv += PRECISION_FLAGS[spec["precision"]]
    if spec["compile"]:
        argv.append("--compile")
    if spec["device"] == "cuda":
        argv.append("--use-gpu")
    args = dlrm.parse_args(argv + [f"--num-batches={spec['pool']}"])
    args.print_time = False
    dlrm.validate_args(args)
    torch.manual_seed(args.numpy_rand_seed)
    device = dlrm.select_device(args.use_gpu)
    if spec["device"] == "cuda" and device.type != "cuda":
        raise SystemExit("harness: --device cuda but CUDA is not available")
    if hasattr(dlrm, "check_precision"):
        dlrm.check_precision(args.precision, device)
    if device.type == "cpu" and hasattr(dlrm, "keep_freed_memory"):
        dlrm.keep_freed_memory()

    t_build = time.perf_counter()
    train_set, test_set, dense_dim, table_sizes = dlrm.make_datasets(args)
    stamps = []
    if spec["code"] in (REFERENCE, FLOOR):
        steps, build_s = plain_pytorch_steps(spec["code"], args, train_set, dense_dim, table_sizes, device, t_build)

        def train(nbatches, print_freq):
            for j in range(nbatches):
                loss = steps(j % spec["pool"])
                if (j + 1) % print_freq == 0 or j + 1 == nbatches:
                    loss.item()  # as the trainer reads its loss back when it prints
                    stamps.append(time.perf_counter())
    else:
        model = dlrm.build_model(args, dense_dim, table_sizes)
        model.to(device)
        if spec["compile"]:
            dlrm.compile_dense(model, device)
        if hasattr(dlrm, "build_optimizer"):
            optimizer = dlrm.build_optimizer(args, model)
        else:  # a --baseline revision from before build_optimizer
            optimizer = dlrm.make_optimizer(args.optimizer, model.parameters(), args.learning_rate)
        build_s = time.perf_counter() - t_build
        cache = {}

        def log(_line):  # called at print time, right after the loss is read back (a sync)
            stamps.append(time.perf_counter())

        def train(nbatches, print_freq):
            run_args = copy.copy(args)
            run_args.print_freq = print_freq
            pool = BatchPool(train_set, spec["pool"], nbatches, cache)
            dlrm.train(run_args, model, optimizer, pool, pool, device, dlrm.TrainState(), nbatches, log=log)

    train(1, 1)
    startup_s = time.time() - spec["spawned_at"]
    train(spec["warmup"], spec["warmup"])
    emit({"ready": True, "startup_s": startup_s, "build_s": build_s})
    per_iteration = device.type == "cpu"  # reading the loss every iteration costs nothing on the CPU
    iters = spec["iters"]
    for command in sys.stdin:
        if command.strip() != "run":
            break
        stamps.clear()
        t0, cpu0 = time.perf_counter(), time.process_time()
        train(iters, 1 if per_iteration else iters)
        total_s, cpu_s = stamps[-1] - t0, time.process_time() - cpu0
        step_ms = sorted(1000 * (b - a) for a, b in zip([t0] + stamps[:-1], stamps)) if per_iteration else []
        emit({"ms_per_it": 1000 * total_s / iters, "cpu_ms_per_it": 1000 * cpu_s / iters,
              "median_step_ms": step_ms[len(step_ms) // 2] if step_ms else 1000 * total_s / iters})
    emit({
        "peak_mem_gib": peak_memory_gib(device),
        "mini_batch_size": args.mini_batch_size,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
    })


def plain_pytorch_steps(kind, args, train_set, dense_dim, table_sizes, device, t_build):
    """(step(j) -> loss, build seconds) of the plain-PyTorch reference DLRM or of the dense floor."""
    import torch
    import torch.nn as nn
    import torch.nn.functional as F

    def mlp(widths, sigmoid_last):
        layers = []
        for i in range(len(widths) - 1):
            layers += [nn.Linear(widths[i], widths[i + 1]),
                       nn.Sigmoid() if sigmoid_last and i == len(widths) - 2 else nn.ReLU()]
        return nn.Sequential(*layers).to(device)

    bottom_widths = list(args.arch_mlp_bot)
    num_tables, dim = len(table_sizes), args.arch_sparse_feature_size
    num_features = num_tables + 1
    itself = args.arch_interaction_itself
    op, flat_width = args.arch_interaction_op, bottom_widths[-1] + num_tables * dim
    if op == "dot":
        pairs = num_features * (num_features + 1) // 2 if itself else num_features * (num_features - 1) // 2
        top_in = bottom_widths[-1] + pairs
    elif op == "projection":
        branch_sizes = (args.interaction_branch1_layer_sizes, args.interaction_branch2_layer_sizes)
        top_in = bottom_widths[-1] + (branch_sizes[0][-1] // dim) * (branch_sizes[1][-1] // dim)
    else:  # cat, dcn: the flattened features (dcn: crossed)
        top_in = flat_width
    bottom, top = mlp(bottom_widths, False), mlp([top_in] + list(args.arch_mlp_top), True)
    interaction_layers = []  # dcn: (V, U with b) per cross layer; projection: the two branches
    if op == "dcn":
        interaction_layers = [(nn.Linear(flat_width, args.dcn_low_rank_dim, bias=False).to(device),
                               nn.Linear(args.dcn_low_rank_dim, flat_width).to(device))
                              for _ in range(args.dcn_num_layers)]
    elif op == "projection":
        interaction_layers = [nn.Sequential(*[layer for a, b in zip([flat_width, *sizes], sizes)
                                              for layer in (nn.Linear(a, b), nn.ReLU())]).to(device)
                              for sizes in branch_sizes]
    interaction_params = [p for item in interaction_layers
                          for module in (item if isinstance(item, tuple) else (item,)) for p in module.parameters()]
    autocast_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(args.precision)
    batches = [train_set[j] for j in range(min(len(train_set), args.num_batches))]
    weights = torch.tensor(args.loss_weights, device=device)

    def loss_of(z, target):
        z = z.float()
        if args.loss_function == "mse":
            return F.mse_loss(z, target)
        per_sample = F.binary_cross_entropy(z, target, reduction="none")
        if args.loss_function == "wbce":
            per_sample = weights[target.long()] * per_sample
        return per_sample.mean()

    def autocast():
        return torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None)

    rows, cols = torch.tril_indices(num_features, num_features, offset=0 if itself else -1)

    def interact(x, ly):  # the bottom MLP's output [B, d] and the pooled embeddings, T x [B, D]
        if op == "dot":
            features = torch.cat([x.float()] + ly, dim=1).view(x.shape[0], -1, dim)
            gram = torch.bmm(features, features.transpose(1, 2))
            return torch.cat([x.float(), gram[:, rows, cols]], dim=1)
        if op == "dcn":
            x0 = interaction = torch.cat([x.float()] + ly, dim=1)
            for down, up in interaction_layers:
                with autocast():
                    crossed = up(down(interaction))
                interaction = x0 * crossed.float() + interaction
            return interaction
        if op == "projection":
            x0 = torch.cat([x.float()] + ly, dim=1)
            with autocast():
                y, z = (branch(x0) for branch in interaction_layers)
            products = torch.bmm(y.float().view(x.shape[0], -1, dim), z.float().view(x.shape[0], dim, -1))
            return torch.cat([x.float(), products.flatten(1)], dim=1)
        return torch.cat([x.float()] + ly, dim=1)

    def train_step(optimizer, dense_x, target, interaction_of):
        """One step: bottom MLP, interaction_of(its output) (lookups included), top MLP, loss, update."""
        optimizer.zero_grad(set_to_none=True)
        with autocast():
            x = bottom(dense_x)
        interaction = interaction_of(x)
        with autocast():
            z = top(interaction)
        loss = loss_of(z, target)
        loss.backward()
        optimizer.step()
        return loss.detach()

    if kind == FLOOR:
        data = [(b.dense_x.to(device), b.target.to(device)) for b in batches]
        # constants stand in for the pooled embeddings: the dense work (MLPs and the interaction's own
        # layers: dcn's cross layers, projection's branches) without lookups or embedding updates
        constant = [torch.rand(data[0][0].shape[0], dim, device=device) for _ in range(num_tables)]
        dense_params = list(bottom.parameters()) + list(top.parameters()) + interaction_params
        optimizer = torch.optim.SGD(dense_params, lr=args.learning_rate)

        # without layers of its own the interaction's output is constant too (dot: the pairs)
        constant_output = torch.rand(data[0][0].shape[0], top_in - bottom_widths[-1], device=device)

        def step(j):
            dense_x, target = data[j]
            return train_step(optimizer, dense_x, target, lambda x: interact(x, constant) if interaction_layers
                              else torch.cat([x.float(), constant_output], dim=1))

        return step, time.perf_counter() - t_build

    # the reference DLRM: one EmbeddingBag per table, looked up table by table, as the original does
    tables = nn.ModuleList(nn.EmbeddingBag(n, dim, mode="sum", sparse=True) for n in table_sizes).to(device)
    with torch.no_grad():
        for table, n in zip(tables, table_sizes):
            table.weight.uniform_(-(1 / n) ** 0.5, (1 / n) ** 0.5)

    def per_table(batch):  # the original's lS_o / lS_i lists from the flat table-major layout
        offsets, indices, size = batch.offsets, batch.indices, batch.dense_x.shape[0]
        lookups = []
        for t in range(num_tables):
            first, last = int(offsets[t * size]), int(offsets[(t + 1) * size])
            lookups.append(((offsets[t * size:(t + 1) * size] - first).to(device), indices[first:last].to(device)))
        return batch.dense_x.to(device), lookups, batch.target.to(device)

    data = [per_table(b) for b in batches]
    params = list(bottom.parameters()) + list(top.parameters()) + interaction_params + list(tables.parameters())
    if args.optimizer == "sgd":
        optimizer = torch.optim.SGD(params, lr=args.learning_rate)
    else:  # adagrad; rwsadagrad has no torch.optim counterpart: plain Adagrad stands in
        optimizer = torch.optim.Adagrad(params, lr=args.learning_rate)

    def step(j):
        dense_x, lookups, target = data[j]
        return train_step(optimizer, dense_x, target, lambda x: interact(
            x, [table(idx, off) for table, (off, idx) in zip(tables, lookups)]))

    return step, time.perf_counter() - t_build


# ============================================================================ driver
def checkout(rev: str) -> str:
    """The files of git revision `rev` of this repository, in a temporary directory."""
    target = tempfile.mkdtemp(prefix=f"dlrm-{rev[:12]}-")
    archive = subprocess.run(["git", "-C", ROOT, "archive", rev], capture_output=True, check=False)
    if archive.returncode != 0:
        raise SystemExit(f"harness: --baseline {rev}: {archive.stderr.decode().strip()}")
    subprocess.run(["tar", "-x", "-C", target], input=archive.stdout, check=True)
    return target


class Child:
    """One configuration's run in its own process (`run_child`), kept alive between measuring rounds."""

    def __init__(self, name, code, code_dir, precision, opts, compile_run=False):
        flags, _ = CONFIGS[name]
        self.row = dict(config=name, code=code, precision=precision + ("+compile" if compile_run else ""),
                        device=opts.device, load_before=os.getloadavg()[0])  # other work skews the figures
        self.timeout, self.rounds = opts.timeout, []
        spec = dict(flags=flags, precision=precision, compile=compile_run, device=opts.device, iters=opts.iters,
                    warmup=opts.warmup, pool=opts.pool, code=code, code_dir=code_dir, threads=opts.threads,
                    spawned_at=time.time())
        env = dict(os.environ, PYTHONDONTWRITEBYTECODE="1")
        env.pop("WORLD_SIZE", None)
        self.stderr = tempfile.TemporaryFile(mode="w+")
        self.process = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--child", json.dumps(spec)],
                                        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.stderr, text=True)
        self.row.update(self.receive() or {})

    def receive(self):
        """The child's next message, or None after recording why there is none (exit, timeout)."""
        if "error" in self.row:
            return None
        deadline = time.time() + self.timeout
        while True:
            ready, _, _ = select.select([self.process.stdout], [], [], max(0.0, deadline - time.time()))
            line = self.process.stdout.readline() if ready else None
            if line is None or line == "":
                self.fail("timed out after {} s".format(self.timeout) if line is None else None)
                return None
            if line.startswith(MESSAGE):
                return json.loads(line[len(MESSAGE):])

    def fail(self, reason=None):
        self.process.kill()
        code = self.process.wait()
        self.stderr.seek(0)
        tail = (self.stderr.read().strip().splitlines() or ["no output"])[-1]
        self.row["error"] = reason or f"exit {code}: {tail}"

    def measure(self):
        """One round: `--iters` iterations; their ms/it, or None."""
        if "error" in self.row:
            return None
        self.process.stdin.write("run\n")
        self.process.stdin.flush()
        result = self.receive()
        self.rounds.append(result)
        return result

    def finish(self) -> dict:
        """The row: medians over the rounds, and what the child reports when it quits."""
        if "error" not in self.row:
            self.process.stdin.write("quit\n")
            self.process.stdin.flush()
            self.row.update(self.receive() or {})
            self.process.wait()
        rounds = [r for r in self.rounds if r is not None]
        if rounds and "error" not in self.row:
            self.row.update(ms_per_it=median(r["ms_per_it"] for r in rounds),
                            median_ms_per_it=median(r["median_step_ms"] for r in rounds),
                            round_ms=[r["ms_per_it"] for r in rounds], runs=len(rounds),
                            cpu_ms_per_it=median(r["cpu_ms_per_it"] for r in rounds),
                            round_cpu_ms=[r["cpu_ms_per_it"] for r in rounds])
            self.row["samples_per_s"] = self.row["mini_batch_size"] * 1000 / self.row["ms_per_it"]
        self.stderr.close()
        return self.row


def median(values):
    values = sorted(values)
    n = len(values)
    return values[n // 2] if n % 2 else (values[n // 2 - 1] + values[n // 2]) / 2


def add_ratios(rows, cpu_time=False):
    """Ratios of our rows to the plain-PyTorch runs and the baseline of the same configuration and precision:
    the median over the rounds of the ratio within each round (runs of one round measured back to back)."""
    good = [r for r in rows if "error" not in r and "round_ms" in r]
    by_code = {(r["code"], r["config"], r["precision"]): r for r in good}

    def paired(numerators, denominators):
        return median(a / b for a, b in zip(numerators, denominators))

    measure = "round_cpu_ms" if cpu_time else "round_ms"
    for row in good:
        if row["code"] != "this":
            continue
        key = (row["config"], row["precision"].split("+")[0])  # "bf16+compile" against "bf16"
        reference, floor = by_code.get((REFERENCE, *key)), by_code.get((FLOOR, *key))
        baseline = next((r for r in good if r["code"] not in ("this", REFERENCE, FLOOR)
                         and (r["config"], r["precision"]) == key), None)
        if reference is not None:
            row["x_reference"] = paired(reference[measure], row[measure])
            row["x_reference_startup"] = reference["startup_s"] / row["startup_s"]
        if floor is not None:
            row["x_floor"] = paired(row[measure], floor[measure])
        if baseline is not None:
            row["x_baseline"] = paired(baseline[measure], row[measure])
            row["x_baseline_startup"] = baseline["startup_s"] / row["startup_s"]


# ---------------------------------------------------------------------------- whole programs, wall time
PROGRESS = re.compile(r"Finished training it (\d+)/")


def wall_ms_per_it(script, flags, warmup, iters, timeout, cwd):
    """(wall ms/it, start-up s) of `python script flags` printing every iteration: the time between its
    progress lines after `warmup` iterations, data loading included, and from start to the first line."""
    argv = [sys.executable, "-u", script] + list(flags) + [f"--num-batches={warmup + iters}", "--print-freq=1"]
    env = dict(os.environ, PYTHONDONTWRITEBYTECODE="1")
    env.pop("WORLD_SIZE", None)
    started, stamps = time.time(), {}
    with tempfile.TemporaryFile(mode="w+") as err:
        process = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=err, text=True, cwd=cwd, env=env)
        try:
            for line in process.stdout:
                match = PROGRESS.search(line)
                if match:
                    stamps[int(match.group(1))] = time.time()
                if time.time() - started > timeout:
                    break
        finally:
            process.kill()
            code = process.wait()
        if warmup + iters not in stamps or warmup not in stamps:
            err.seek(0)
            tail = (err.read().strip().splitlines() or ["no output"])[-1]
            raise RuntimeError(f"{os.path.basename(script)} exit {code}: {tail}")
    return 1000 * (stamps[warmup + iters] - stamps[warmup]) / iters, stamps[1] - started


def original_rows(name, precisions, opts) -> list:
    """The original's dlrm_s_pytorch.py (fp32 only: it has no --precision) and ours as a program, alternating
    `--repeat` times; "× original" is the original's wall ms/it over ours (its throughput ratio)."""
    flags, _ = CONFIGS[name]
    script = os.path.abspath(opts.original)
    runs = [("original", "fp32", script, list(flags))]
    runs += [("this (program)", p, os.path.join(ROOT, "dlrm_s_pytorch.py"),
              list(flags) + PRECISION_FLAGS[p]) for p in precisions]
    measured = {run[:2]: [] for run in runs}
    errors = {}
    for attempt in range(opts.repeat):
        for code, precision, path, argv in runs:
            try:
                with tempfile.TemporaryDirectory() as cwd:  # what a program writes there (the original: TensorBoard)
                    measured[(code, precision)].append(
                        wall_ms_per_it(path, argv, opts.warmup, opts.iters, opts.timeout, cwd))
            except RuntimeError as e:
                errors[(code, precision)] = str(e)
            print(f"{name} [{code}, {precision}] try {attempt + 1}: "
                  + (errors.get((code, precision)) or f"{measured[(code, precision)][-1][0]:.1f} wall ms/it"),
                  file=sys.stderr, flush=True)
    rows, original = [], measured[("original", "fp32")]
    for code, precision, _, _ in runs:
        row = dict(config=name, code=code, precision=precision, device="cpu")
        tries = measured[(code, precision)]
        if (code, precision) in errors or not tries:
            rows.append(dict(row, error=errors.get((code, precision), "no run")))
            continue
        ms = [t[0] for t in tries]
        row.update(wall_ms_per_it=median(ms), startup_s=min(t[1] for t in tries), round_ms=ms)
        if code != "original" and len(original) == len(ms):
            row["x_original"] = median(o[0] / m for o, m in zip(original, ms))
        rows.append(row)
    return rows


def format_original_table(rows) -> str:
    lines = ["| config | code | precision | wall ms/it | start-up s | × original |", "|---|---|---|---|---|---|"]
    for row in rows:
        if "error" in row:
            lines.append(f"| {row['config']} | {row['code']} | {row['precision']} | error: {row['error']} | | |")
        else:
            ratio = f"{row['x_original']:.2f}" if "x_original" in row else "—"
            lines.append(f"| {row['config']} | {row['code']} | {row['precision']} | {row['wall_ms_per_it']:.1f} | "
                         f"{row['startup_s']:.1f} | {ratio} |")
    return "\n".join(lines)


def machine_description(device: str) -> str:
    """The CPU's model, cores and vector/matrix instruction sets (and the GPU's name), for the table's header."""
    import torch

    model, flags = platform.processor() or platform.machine(), set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "model name" and model in ("", platform.machine(), platform.processor()):
                    model = value.strip()
                elif key.strip() == "flags":
                    flags = set(value.split())
                    break
    except OSError:
        pass
    isa = [name for name in ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "avx512_fp16", "amx_tile", "amx_bf16",
                             "amx_int8") if name in flags]
    text = (f"CPU: {model}, {os.cpu_count()} cores; ISA: {' '.join(isa) or 'unknown'} "
            f"(AVX-512: {'yes' if 'avx512f' in flags else 'no'}, AVX512-BF16: "
            f"{'yes' if 'avx512_bf16' in flags else 'no'}, AMX: {'yes' if 'amx_tile' in flags else 'no'}); "
            f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    if device == "cuda" and torch.cuda.is_available():
        text += f"; GPU: {torch.cuda.get_device_name(0)}"
    return text


def format_table(rows) -> str:
    header = ["config", "code", "precision", "device", "ms/it", "median ms/it", "CPU ms/it", "samples/s", "start-up s",
              "peak GiB", "× reference", "× floor", "× baseline", "start-up × reference"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]

    def ratio(row, key):
        return f"{row[key]:.2f}" if key in row else "—"

    for row in rows:
        if "error" in row:
            cells = [row["config"], row["code"], row["precision"], row["device"], "error: " + row["error"]]
            cells += [""] * (len(header) - len(cells))
        else:
            cells = [row["config"], row["code"], row["precision"], row["device"], f"{row['ms_per_it']:.1f}",
                     f"{row['median_ms_per_it']:.1f}", f"{row['cpu_ms_per_it']:.1f}", f"{row['samples_per_s']:,.0f}",
                     f"{row['startup_s']:.1f}",
                     f"{row['peak_mem_gib']:.1f}",
                     ratio(row, "x_reference"), ratio(row, "x_floor"), ratio(row, "x_baseline"),
                     ratio(row, "x_reference_startup")]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def parse_args(argv=None):
    parser = CommandLineParser(description="Run named DLRM configurations on random data and compare them.",
                               formatter_class=argparse.ArgumentDefaultsHelpFormatter)  # one-line errors
    parser.add_argument("--configs", nargs="+", default=None, choices=list(CONFIGS),
                        help=f"configurations to run (default: {' '.join(CPU_DEFAULT)} on the CPU, "
                             "kaggle-16384 and benchmark on CUDA)")
    parser.add_argument("--precisions", nargs="+", default=["fp32", "bf16"], choices=list(PRECISION_FLAGS),
                        help="--precision values to run each configuration with (bf16-tables: bf16 with "
                             "--embedding-precision=bf16)")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="where to train")
    parser.add_argument("--compile", action="store_true", help="add --compile to every run of this code")
    parser.add_argument("--baseline", default=None, metavar="REV",
                        help="also run each configuration and precision with git revision REV of this repository")
    parser.add_argument("--plain", nargs="*", default=["reference", "floor"], choices=["reference", "floor"],
                        help="plain-PyTorch runs measured next to ours (none: --plain without values)")
    parser.add_argument("--iters", type=int, default=20, help="measured iterations per run")
    parser.add_argument("--warmup", type=int, default=5, help="iterations before measuring (at least --pool)")
    parser.add_argument("--pool", type=int, default=4, help="distinct random batches cycled through")
    parser.add_argument("--repeat", type=int, default=3,
                        help="alternating measuring rounds of each configuration and precision; medians reported")
    parser.add_argument("--original", default=None, metavar="PATH",
                        help="also run the original facebookresearch/dlrm dlrm_s_pytorch.py at PATH and ours as whole "
                             "programs on each configuration (CPU), and report wall ms/it and × original")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads in every run (default: torch's, one per core)")
    parser.add_argument("--cpu-time", action="store_true",
                        help="ratios from CPU time (user + system) per iteration instead of wall time: steadier "
                             "on a machine shared with other work (best with --threads 1)")
    parser.add_argument("--timeout", type=int, default=1800, help="seconds allowed per run")
    parser.add_argument("--json", default=None, metavar="PATH", help="also write the results here as JSON")
    parser.add_argument("--list", action="store_true", help="list the configurations and exit")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    opts = parser.parse_args(argv)
    if min(opts.iters, opts.pool, opts.repeat) < 1:
        parser.error("--iters, --pool and --repeat must be at least 1")
    if opts.original and not os.path.isfile(opts.original):
        parser.error(f"--original {opts.original}: no such file (expected facebookresearch/dlrm's dlrm_s_pytorch.py)")
    if opts.device == "cpu" and "fp16" in opts.precisions:
        parser.error("--precisions fp16: float16 runs on CUDA only (--device cuda)")
    if opts.device == "cuda" and not opts.list and opts.child is None:
        import torch

        if not torch.cuda.is_available():
            parser.error("--device cuda: no CUDA device here")
    problem = outputs.output_problem(opts.json) if opts.json else None
    if problem:
        parser.error(f"--json {opts.json}: {problem}")
    opts.warmup = max(opts.warmup, opts.pool)
    opts.plain = [FLOOR if p == "floor" else p for p in opts.plain]
    if opts.configs is None:
        opts.configs = CPU_DEFAULT if opts.device == "cpu" else ["kaggle-16384", "benchmark"]
    return opts


def main(argv=None) -> int:
    opts = parse_args(argv)
    if opts.child is not None:
        run_child(json.loads(opts.child))
        return 0
    if opts.list:
        for name, (flags, description) in CONFIGS.items():
            print(f"{name:15s} {description}\n{'':15s} {' '.join(flags)}")
        return 0
    baseline_dir = checkout(opts.baseline) if opts.baseline else None
    header = machine_description(opts.device)
    print(header, file=sys.stderr, flush=True)
    rows, original = [], []
    for name in opts.configs:
        for precision in opts.precisions:
            # the runs of one configuration and precision: started one after the other (start-up alone on
            # the machine), then measured in alternating rounds, so other work on the machine hits them alike
            runs = [(plain, ROOT) for plain in opts.plain]
            if baseline_dir:
                runs.append((opts.baseline[:12], baseline_dir))
            runs.append(("this", ROOT))
            children = []
            for code, code_dir in runs:
                child = Child(name, code, code_dir, precision, opts, compile_run=opts.compile and code == "this")
                children.append(child)
                state = child.row.get("error") or f"start-up {child.row['startup_s']:.1f} s"
                print(f"{name} [{code}, {child.row['precision']}, {opts.device}]: {state}", file=sys.stderr, flush=True)
            for attempt in range(opts.repeat):
                for child in children:
                    result = child.measure()
                    done = child.row.get("error") or f"{result['ms_per_it']:.1f} ms/it"
                    print(f"{name} [{child.row['code']}, {child.row['precision']}] round {attempt + 1}: {done}, "
                          f"load average {os.getloadavg()[0]:.1f}", file=sys.stderr, flush=True)
            rows += [child.finish() for child in children]
        if opts.original and opts.device == "cpu":
            original += original_rows(name, opts.precisions, opts)
    add_ratios(rows, opts.cpu_time)
    print(header + "\n")
    print(format_table(rows))
    basis = "CPU time (user + system)" if opts.cpu_time else "wall time"
    print(f"\nMedians of {opts.repeat} alternating rounds of {opts.iters} iterations; ratios from {basis}. × reference: the plain-PyTorch "
          "DLRM's ms/it over ours (one nn.EmbeddingBag per table, torch.optim); × floor: our ms/it over the dense "
          "floor's (the dense layers alone); × baseline: --baseline's ms/it over ours; each the median of the ratios within "
          "a round. All measured in this run.")
    if original:
        print("\n" + format_original_table(original))
        print("\nWhole programs on the configuration's random data, printing every iteration: wall time between "
              "progress lines (data generation included), medians of alternating runs; × original: the original's "
              "wall ms/it (fp32: it has no --precision) over ours.")
    if opts.json:
        def write(tmp):
            with open(tmp, "w") as f:
                json.dump({"argv": sys.argv[1:], "host": platform.node(), "cpus": os.cpu_count(), "machine": header,
                           "rows": rows, "original": original}, f, indent=1)
        try:
            outputs.write_atomically("--json", opts.json, write)
        except outputs.OutputError as e:
            print(f"harness.py: error: {e}", file=sys.stderr)
            return 1
    return 0 if all("error" not in r for r in rows + original) else 1


if __name__ == "__main__":
    sys.exit(main())
