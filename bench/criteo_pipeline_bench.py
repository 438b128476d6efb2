"""Benchmark of the Criteo pipeline on a generated raw file: rows/s and peak RSS.

    python bench/criteo_pipeline_bench.py --rows 1000000            # preprocessing only
    python bench/criteo_pipeline_bench.py --rows 1000000 --e2e      # + process start to first iteration
    python bench/criteo_pipeline_bench.py --rows 10000000 --multiprocessing

The raw file (made by `data_utils.py make-fake`, kept in --data-dir for the next run) is
read once (so that it comes from the page cache, not the disk), then preprocessed from
scratch in a fresh process; peak RSS is sampled over the whole process
tree (with --multiprocessing: all workers together). --e2e then clears the output again and
times the original's Kaggle benchmark flags with --num-batches=1, from process start to exit
right after the first training iteration, then the same again with the processed data reused
(what is not preprocessing: imports, loading, building the model, the iteration). The load
average is printed because shared machines make these numbers noisy.
"""

import argparse
import os
import shutil
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from dlrmkit import flags  # noqa: E402

ORIGINAL_KAGGLE_FLAGS = [
    "--arch-sparse-feature-size=16", "--arch-mlp-bot=13-512-256-64-16", "--arch-mlp-top=512-256-1",
    "--data-generation=dataset", "--data-set=kaggle", "--loss-function=bce", "--round-targets=True",
    "--learning-rate=0.1", "--mini-batch-size=128", "--print-freq=1024", "--print-time",
    "--test-mini-batch-size=16384", "--test-num-workers=16",
]
ORIGINAL_ROWS_PER_S = 1_000_000 / 172  # the original on a 1M-row file, 2-core machine (172 s)


def tree_rss_kib(pid) -> int:
    """Resident memory of a process and all its descendants (Linux /proc), KiB."""
    total, stack = 0, [pid]
    while stack:
        p = stack.pop()
        try:
            with open(f"/proc/{p}/status") as f:
                total += next((int(line.split()[1]) for line in f if line.startswith("VmRSS:")), 0)
            for task in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{task}/children") as f:
                    stack.extend(int(c) for c in f.read().split())
        except (OSError, ValueError):
            continue
    return total


def run_measured(cmd, env=None):
    """(wall seconds, peak RSS of the process tree in MiB, output) of a command."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    peak = 0
    while proc.poll() is None:
        peak = max(peak, tree_rss_kib(proc.pid))
        time.sleep(0.02)
    wall = time.perf_counter() - start
    output = proc.stdout.read()
    if proc.returncode != 0:
        sys.exit(f"failed ({proc.returncode}): {' '.join(cmd)}\n{output[-3000:]}")
    return wall, peak / 1024, output


def main():
    parser = flags.CommandLineParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    flags.add_number(parser, "--rows", int, 1_000_000, flags.at_least(7),
                     "rows of the generated Kaggle-format file (cut into 7 days)")
    parser.add_argument("--data-dir", default=os.path.join(ROOT, "input", "bench"), help="where files are kept")
    parser.add_argument("--multiprocessing", action="store_true", help="preprocess with --dataset-multiprocessing")
    parser.add_argument("--e2e", action="store_true", help="also time process start -> first training iteration")
    flags.add_number(parser, "--repeat", int, 1, flags.at_least(1), "preprocessing runs (the best and all are printed)")
    args = parser.parse_args()
    problem = flags.check_ranges(parser, args)
    if problem:
        parser.error(problem)

    directory = os.path.join(args.data_dir, f"rows_{args.rows}")
    raw = os.path.join(directory, "train.txt")
    if not os.path.exists(raw):
        t = time.perf_counter()
        if subprocess.run([sys.executable, os.path.join(ROOT, "data_utils.py"), "make-fake", f"--rows={args.rows}",
                           f"--out={raw}"]).returncode != 0:
            sys.exit(1)  # make-fake said why
        print(f"generated {raw} in {time.perf_counter() - t:.1f} s")
    size_mb = os.path.getsize(raw) / 1e6
    with open(raw, "rb") as f:  # read once: the timings measure processing, not the disk
        while f.read(64 << 20):
            pass
    processed = os.path.join(directory, "kaggleAdDisplayChallenge_processed")
    print(f"rows {args.rows:,} ({size_mb:,.0f} MB), {os.cpu_count()} cores, load average {os.getloadavg()[0]:.2f}")

    walls = []
    for _ in range(args.repeat):
        shutil.rmtree(processed, ignore_errors=True)
        cmd = [sys.executable, os.path.join(ROOT, "data_utils.py"), "preprocess", f"--raw-data-file={raw}",
               f"--processed-data-file={processed}.npz"]
        if args.multiprocessing:
            cmd.append("--dataset-multiprocessing")
        wall, peak_mib, _ = run_measured(cmd)
        walls.append(wall)
        print(f"preprocess: {wall:.2f} s, {args.rows / wall:,.0f} rows/s ({size_mb / wall:,.0f} MB/s), "
              f"peak RSS {peak_mib:,.0f} MiB (process tree), {args.rows / wall / ORIGINAL_ROWS_PER_S:.0f}x the "
              f"original's {ORIGINAL_ROWS_PER_S:,.0f} rows/s")
    if args.repeat > 1:
        print(f"preprocess best of {args.repeat}: {min(walls):.2f} s, {args.rows / min(walls):,.0f} rows/s")

    if args.e2e:
        shutil.rmtree(processed, ignore_errors=True)
        cmd = [sys.executable, os.path.join(ROOT, "dlrm_s_pytorch.py"), *ORIGINAL_KAGGLE_FLAGS,
               f"--raw-data-file={raw}", f"--processed-data-file={processed}.npz", "--num-batches=1"]
        if args.multiprocessing:
            cmd.append("--dataset-multiprocessing")
        wall, peak_mib, output = run_measured(cmd)
        if "Finished training it 1/1" not in output:
            sys.exit(f"no training iteration in the output:\n{output[-3000:]}")
        print(f"end to end (process start -> first iteration, original's Kaggle flags, --num-batches=1): {wall:.2f} s, "
              f"peak RSS {peak_mib:,.0f} MiB; the original: {args.rows / ORIGINAL_ROWS_PER_S:,.0f} s at its "
              f"{ORIGINAL_ROWS_PER_S:,.0f} rows/s -> {args.rows / ORIGINAL_ROWS_PER_S / wall:.0f}x")
        rerun, _, _ = run_measured(cmd)
        print(f"the same with the processed data reused (startup, loading, model, one iteration): {rerun:.2f} s")
    print(f"load average at the end {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
