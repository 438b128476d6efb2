"""Benchmark harness: named DLRM configurations on random data, each in a fresh process.

Usage:
    python bench/harness.py --list
    python bench/harness.py                                        # CPU table: every CPU config, fp32 and bf16
    python bench/harness.py --configs kaggle-128 benchmark --precisions fp32 bf16 --baseline a648935
    python bench/harness.py --configs kaggle-16384 --device cuda --precisions bf16 --compile
    python bench/harness.py --configs benchmark --iters 10 --json out/bench.json

Every run is a new Python process that builds and trains exactly as `dlrm_s_pytorch.py` does
(parse_args, make_datasets, build_model, make_optimizer, train) with the configuration's flags:
- start-up: from the parent starting the process to the end of the first training iteration
  (interpreter and torch import, model initialisation, first batch, first step);
- ms/it and samples/s: the mean over `--iters` iterations after `--warmup` ones (and on the CPU the
  median iteration, less sensitive to other work on the machine); the data are the
  configuration's random batches, a pool of `--pool` distinct batches generated once and cycled,
  so the figure is the trainer's step (the original's ms/it excludes data loading too);
- peak memory: the process's maximum resident set (CPU), or the peak of torch.cuda allocations.

`--baseline REV` also runs every configuration and precision with the code of git revision REV of
this repository (e.g. the commit before a change), alternating with this code's runs, so ratios come
from one run on one machine.
"Original" ratios compare with the original facebookresearch/dlrm on the same class of
2-core machine, as quoted in issue 4 (kaggle-128: ~14 ms/it; benchmark: ~370-650 ms/it and
~35 s of start-up); they are reference figures, not measured here.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

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
BENCHMARK = ["--mini-batch-size=2048", "--arch-mlp-bot=512-512-64", "--arch-mlp-top=1024-1024-1024-1",
             "--arch-sparse-feature-size=64", f"--arch-embedding-size={dashed([1000000] * 8)}",
             "--num-indices-per-lookup=100", "--arch-interaction-op=dot", "--numpy-rand-seed=727"]

CONFIGS = {
    # name: (flags, original ms/it or None, original start-up s or None, description)
    "kaggle-128": (KAGGLE + ["--mini-batch-size=128"], 14.0, None, "Criteo Kaggle model, mini-batch 128"),
    "kaggle-2048": (KAGGLE + ["--mini-batch-size=2048"], None, None, "Criteo Kaggle model, mini-batch 2048"),
    "benchmark": (BENCHMARK, 370.0, 35.0, "bench/dlrm_s_benchmark.sh: 8 x 1M x 64, 100 lookups, mini-batch 2048"),
    "terabyte-small": (TERABYTE_SMALL, None, None,
                       f"MLPerf Terabyte model, tables capped at {TERABYTE_SMALL_ROWS:,} rows, mini-batch 2048"),
    "kaggle-16384": (KAGGLE + ["--mini-batch-size=16384"], None, None, "Criteo Kaggle model, mini-batch 16384 (GPU)"),
    "smoke": (["--arch-sparse-feature-size=16", "--arch-mlp-bot=13-64-16", "--arch-mlp-top=64-1",
               "--arch-embedding-size=1000-1000-1000-1000", "--mini-batch-size=128", "--loss-function=bce",
               "--round-targets=True"], None, None, "a tiny model: checks the harness itself in seconds"),
}
CPU_DEFAULT = ["kaggle-128", "kaggle-2048", "benchmark", "terabyte-small"]
ORIGINAL_BENCHMARK_RANGE_MS = (370.0, 650.0)


# ============================================================================ one run (child process)
class BatchPool:
    """`length` batches cycling through the first `size` batches of `dataset`, each generated once."""

    def __init__(self, dataset, size, length):
        self.dataset, self.size, self.length = dataset, min(size, len(dataset)), length
        self.cache = {}

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


def run_one(spec: dict) -> dict:
    """Builds and trains one configuration as dlrm_s_pytorch.run() does; returns the measurements."""
    sys.path.insert(0, spec["code_dir"])
    import torch

    import dlrm_s_pytorch as dlrm

    argv = list(spec["flags"])
    if spec["precision"] != "fp32":
        argv.append(f"--precision={spec['precision']}")
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
    model = dlrm.build_model(args, dense_dim, table_sizes)
    model.to(device)
    if spec["compile"]:
        dlrm.compile_dense(model, device)
    if hasattr(dlrm, "build_optimizer"):
        optimizer = dlrm.build_optimizer(args, model)
    else:  # a --baseline revision from before build_optimizer
        optimizer = dlrm.make_optimizer(args.optimizer, model.parameters(), args.learning_rate)
    build_s = time.perf_counter() - t_build

    stamps = []

    def log(_line):  # called at print time, right after the loss is read back (a sync)
        stamps.append(time.perf_counter())

    def train(nbatches, print_freq):
        run_args = copy.copy(args)
        run_args.print_freq = print_freq
        pool = BatchPool(train_set, spec["pool"], nbatches)
        dlrm.train(run_args, model, optimizer, pool, pool, device, dlrm.TrainState(), nbatches, log=log)

    train(1, 1)
    startup_s = time.time() - spec["spawned_at"]
    train(spec["warmup"], spec["warmup"])
    stamps.clear()
    t0 = time.perf_counter()
    iters = spec["iters"]
    per_iteration = device.type == "cpu"  # reading the loss every iteration costs nothing on the CPU
    train(iters, 1 if per_iteration else iters)
    total_s = stamps[-1] - t0
    step_ms = [1000 * (b - a) for a, b in zip([t0] + stamps[:-1], stamps)] if per_iteration else []
    ms_per_it = 1000 * total_s / iters
    return {
        "ms_per_it": ms_per_it,
        "median_ms_per_it": sorted(step_ms)[len(step_ms) // 2] if step_ms else ms_per_it,
        "samples_per_s": args.mini_batch_size * iters / total_s,
        "startup_s": startup_s,
        "build_s": build_s,
        "peak_mem_gib": peak_memory_gib(device),
        "mini_batch_size": args.mini_batch_size,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
    }


# ============================================================================ driver
def checkout(rev: str) -> str:
    """The files of git revision `rev` of this repository, in a temporary directory."""
    target = tempfile.mkdtemp(prefix=f"dlrm-{rev[:12]}-")
    archive = subprocess.run(["git", "-C", ROOT, "archive", rev], capture_output=True, check=False)
    if archive.returncode != 0:
        raise SystemExit(f"harness: --baseline {rev}: {archive.stderr.decode().strip()}")
    subprocess.run(["tar", "-x", "-C", target], input=archive.stdout, check=True)
    return target


def spawn(name, code, code_dir, precision, opts, compile_run=False) -> dict:
    flags, original_ms, original_startup, _ = CONFIGS[name]
    spec = dict(flags=flags, precision=precision, compile=compile_run, device=opts.device, iters=opts.iters,
                warmup=opts.warmup, pool=opts.pool, code_dir=code_dir, spawned_at=time.time())
    row = dict(config=name, code=code, precision=precision + ("+compile" if compile_run else ""),
               device=opts.device, original_ms=original_ms, original_startup_s=original_startup,
               load_before=os.getloadavg()[0])  # other work on the machine skews the figures
    env = dict(os.environ, PYTHONDONTWRITEBYTECODE="1")
    env.pop("WORLD_SIZE", None)
    try:
        child = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", json.dumps(spec)],
                               capture_output=True, text=True, timeout=opts.timeout, env=env)
    except subprocess.TimeoutExpired:
        return dict(row, error=f"timed out after {opts.timeout} s")
    result = next((line for line in reversed(child.stdout.splitlines()) if line.startswith("{")), None)
    if child.returncode != 0 or result is None:
        tail = (child.stderr.strip().splitlines() or ["no output"])[-1]
        return dict(row, error=f"exit {child.returncode}: {tail}")
    return dict(row, **json.loads(result))


def best_of(tries):
    """The fastest of repeated runs (as the original's script reports the minimum), with the shortest start-up."""
    good = [t for t in tries if "error" not in t]
    if not good:
        return tries[-1]
    best = dict(min(good, key=lambda t: t["ms_per_it"]))
    best["startup_s"] = min(t["startup_s"] for t in good)
    best["runs"] = len(good)
    return best


def add_ratios(rows):
    baseline = {(r["config"], r["precision"]): r for r in rows if r["code"] != "this" and "error" not in r}
    for row in rows:
        if "error" in row:
            continue
        if row.get("original_ms"):
            row["x_original"] = row["original_ms"] / row["ms_per_it"]
        if row.get("original_startup_s"):
            row["x_original_startup"] = row["original_startup_s"] / row["startup_s"]
        base = baseline.get((row["config"], row["precision"].split("+")[0]))  # "bf16+compile" vs "bf16"
        if base is not None and row["code"] == "this":
            row["x_baseline"] = base["ms_per_it"] / row["ms_per_it"]
            row["x_baseline_startup"] = base["startup_s"] / row["startup_s"]


def format_table(rows) -> str:
    header = ["config", "code", "precision", "device", "ms/it", "median ms/it", "samples/s", "start-up s",
              "peak GiB", "× original", "× baseline", "start-up × original"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]

    def ratio(row, key):
        return f"{row[key]:.2f}" if key in row else "—"

    for row in rows:
        if "error" in row:
            cells = [row["config"], row["code"], row["precision"], row["device"], "error: " + row["error"]]
            cells += [""] * (len(header) - len(cells))
        else:
            cells = [row["config"], row["code"], row["precision"], row["device"], f"{row['ms_per_it']:.1f}",
                     f"{row['median_ms_per_it']:.1f}", f"{row['samples_per_s']:,.0f}", f"{row['startup_s']:.1f}",
                     f"{row['peak_mem_gib']:.1f}",
                     ratio(row, "x_original"), ratio(row, "x_baseline"), ratio(row, "x_original_startup")]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description="Run named DLRM configurations on random data and compare them.",
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--configs", nargs="+", default=None, choices=list(CONFIGS),
                        help=f"configurations to run (default: {' '.join(CPU_DEFAULT)} on the CPU, "
                             "kaggle-16384 and benchmark on CUDA)")
    parser.add_argument("--precisions", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16", "fp16"],
                        help="--precision values to run each configuration with")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="where to train")
    parser.add_argument("--compile", action="store_true", help="add --compile to every run of this code")
    parser.add_argument("--baseline", default=None, metavar="REV",
                        help="also run each configuration and precision with git revision REV of this repository")
    parser.add_argument("--iters", type=int, default=20, help="measured iterations per run")
    parser.add_argument("--warmup", type=int, default=5, help="iterations before measuring (at least --pool)")
    parser.add_argument("--pool", type=int, default=4, help="distinct random batches cycled through")
    parser.add_argument("--repeat", type=int, default=1,
                        help="runs of each configuration; the fastest is reported (machines shared with other work)")
    parser.add_argument("--timeout", type=int, default=1800, help="seconds allowed per run")
    parser.add_argument("--json", default=None, metavar="PATH", help="also write the results here as JSON")
    parser.add_argument("--list", action="store_true", help="list the configurations and exit")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    opts = parser.parse_args(argv)
    if min(opts.iters, opts.pool, opts.repeat) < 1:
        parser.error("--iters, --pool and --repeat must be at least 1")
    opts.warmup = max(opts.warmup, opts.pool)
    if opts.configs is None:
        opts.configs = CPU_DEFAULT if opts.device == "cpu" else ["kaggle-16384", "benchmark"]
    return opts


def main(argv=None) -> int:
    opts = parse_args(argv)
    if opts.child is not None:
        print(json.dumps(run_one(json.loads(opts.child))), flush=True)
        return 0
    if opts.list:
        for name, (flags, *_, description) in CONFIGS.items():
            print(f"{name:15s} {description}\n{'':15s} {' '.join(flags)}")
        return 0
    baseline_dir = checkout(opts.baseline) if opts.baseline else None
    runs = []
    for name in opts.configs:
        for p in opts.precisions:
            if baseline_dir:
                runs.append((name, opts.baseline[:12], baseline_dir, p))
            runs.append((name, "this", ROOT, p))
    # repeats go round all runs, so a burst of other work on the machine spoils one try of several runs
    tries = {run: [] for run in runs}
    for attempt in range(opts.repeat):
        for run in runs:
            name, code, code_dir, precision = run
            row = spawn(name, code, code_dir, precision, opts, compile_run=opts.compile and code == "this")
            tries[run].append(row)
            done = row.get("error") or (f"{row['ms_per_it']:.1f} ms/it, start-up {row['startup_s']:.1f} s, "
                                        f"load average before {row['load_before']:.1f}")
            print(f"{name} [{code}, {row['precision']}, {opts.device}] try {attempt + 1}: {done}",
                  file=sys.stderr, flush=True)
    rows = [best_of(tries[run]) for run in runs]
    add_ratios(rows)
    print(format_table(rows))
    low, high = ORIGINAL_BENCHMARK_RANGE_MS
    print(f"\n× original: the original's ms/it on the same class of machine (issue 4) / ours; for the benchmark "
          f"model the fast end of its {low:.0f}-{high:.0f} ms/it range "
          f"(× {high / low:.2f} more against the slow end).")
    if opts.json:
        tmp = f"{opts.json}.tmp{os.getpid()}"
        os.makedirs(os.path.dirname(os.path.abspath(opts.json)), exist_ok=True)
        with open(tmp, "w") as f:
            json.dump({"argv": sys.argv[1:], "host": platform.node(), "cpus": os.cpu_count(), "rows": rows}, f,
                      indent=1)
        os.replace(tmp, opts.json)
    return 0 if all("error" not in r for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
