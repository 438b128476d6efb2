"""Record per-table reuse-distance distributions for --data-generation=synthetic.

Reads the categorical ids of a data set in row order, one access trace per table, and
writes each table's distribution file (the format of --data-trace-file, see dlrmkit/trace_data.py).

Usage:
    # from processed Criteo data: this trainer's (--processed-data-file, as the trainer spells it, or one
    # set's folder such as ./input/kaggleAdDisplayChallenge_processed/kaggle-dictionary) or the original's
    # .npz (arrays X_cat [rows, 26], ...)
    python tools/record_trace.py --input=./input/kaggleAdDisplayChallenge_processed.npz \
        --output=./input/dist_emb_j.log --max-rows=1000000
    # from raw Criteo text (label, 13 integer and 26 categorical tab-separated columns)
    python tools/record_trace.py --input=train.txt --output=./input/dist_emb_j.log --tables=0-2
    # from one recorded access trace (ids separated by commas or whitespace; or a .npy array)
    python tools/record_trace.py --input=trace.log --output=./input/dist_emb_0.log

then train on ids drawn from those distributions:
    python dlrm_s_pytorch.py --data-generation=synthetic --data-trace-file=./input/dist_emb_j.log ...

`j` in --output is replaced by the table number. Raw-text values are read as the preprocessing
reads them (hex values, so `0000000A` and `a` are `0000000a`; an empty field is a value of its own)
and get ids in order of first appearance; reuse distances do not depend on the ids.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from dlrmkit.trace_data import distribution_from_trace, trace_file_for_table, write_trace_distribution  # noqa: E402

CRITEO_DENSE, CRITEO_SPARSE = 13, 26


class InputError(ValueError):
    pass


def read_npz(path, max_rows):
    with np.load(path) as data:
        if "X_cat" not in data:
            raise InputError(f"{path}: no X_cat array (expected the processed Criteo format: X_int, X_cat, y)")
        x_cat = data["X_cat"]
    if x_cat.ndim != 2:
        raise InputError(f"{path}: X_cat has shape {x_cat.shape}, expected [rows, tables]")
    return [x_cat[:max_rows, t].astype(np.int64) for t in range(x_cat.shape[1])]


def read_npy(path, max_rows):
    array = np.load(path)
    if array.ndim == 1:
        array = array[:, None]
    if array.ndim != 2 or not np.issubdtype(array.dtype, np.integer):
        raise InputError(f"{path}: expected an integer array [rows] or [rows, tables], got {array.dtype} {array.shape}")
    return [array[:max_rows, t].astype(np.int64) for t in range(array.shape[1])]


def read_criteo_text(path, max_rows):
    """Per table, the ids of the first max_rows rows: categorical values parsed as the preprocessing
    parses them (hex values, missing apart) and numbered in order of first appearance."""
    import data_utils

    blocks, rows = [], 0
    try:
        for raw in data_utils.read_line_blocks(path):
            blocks.append(data_utils.parse_block(raw, path, rows + 1).categorical)
            rows += blocks[-1].shape[1]
            if rows >= max_rows:
                break
    except data_utils.DataError as e:
        raise InputError(str(e))
    values = np.concatenate(blocks, axis=1)[:, :max_rows] if blocks else np.zeros((CRITEO_SPARSE, 0), np.int64)
    return [data_utils.Numbering().add(np.ascontiguousarray(v)).astype(np.int64) for v in values]


def read_trace_text(path, max_rows):
    with open(path) as f:
        text = f.read().replace(",", " ")
    try:
        ids = np.array(text.split(), dtype=np.int64)
    except ValueError as e:
        raise InputError(f"{path}: expected integer ids separated by commas or whitespace ({e})")
    return [ids[:max_rows]]


def processed_set_dir(path):
    """The folder of this trainer's processed set that `path` names: the set's own folder (its metadata.json), the
    folder --processed-data-file names (when it holds one set) or that flag's .npz spelling of it; None when
    `path` names none (InputError when it names several or an empty folder)."""
    import data_utils

    base = path[:-4] if path.endswith(".npz") and not os.path.isfile(path) else path
    if not os.path.isdir(base):
        return None
    if data_utils.read_set_metadata(base) is not None:
        return base
    sets = data_utils.processed_sets(base)
    if not sets:
        raise InputError(f"{path}: no processed data in {base}")
    if len(sets) > 1:
        raise InputError(f"{path}: {len(sets)} processed sets in {base} ({', '.join(map(os.path.basename, sets))}); "
                         f"give one, e.g. --input={sets[0]}")
    return sets[0]


def read_processed_set(out_dir, max_rows):
    """Per table, the ids of the first max_rows rows of a processed set (its days in order)."""
    import data_utils

    processed = data_utils.ProcessedData(out_dir, data_utils.read_set_metadata(out_dir))
    parts, rows = [], 0
    for day in range(len(processed.day_rows)):
        if rows >= max_rows:
            break
        try:
            sparse = np.load(processed.day_file(day, "sparse"), mmap_mode="r")
        except (OSError, ValueError) as e:
            raise InputError(f"{processed.day_file(day, 'sparse')}: cannot read ({e})")
        parts.append(np.asarray(sparse[: max_rows - rows]))
        rows += len(parts[-1])
    ids = np.concatenate(parts) if parts else np.zeros((0, CRITEO_SPARSE), np.int64)
    return [ids[:, t].astype(np.int64) for t in range(ids.shape[1])]


def read_columns(path, max_rows):
    out_dir = processed_set_dir(path)
    if out_dir is not None:
        return read_processed_set(out_dir, max_rows)
    if os.path.isdir(path):
        raise InputError(f"{path}: is a directory without processed data (expected a processed set, a .npz, "
                         ".npy, raw Criteo text or a trace of ids)")
    if not os.path.isfile(path):
        raise InputError(f"{path}: no such file")
    if path.endswith(".npz"):
        return read_npz(path, max_rows)
    if path.endswith(".npy"):
        return read_npy(path, max_rows)
    with open(path) as f:
        first = f.readline()
    if first.count("\t") == CRITEO_DENSE + CRITEO_SPARSE:
        return read_criteo_text(path, max_rows)
    return read_trace_text(path, max_rows)


def parse_tables(text, count):
    if text in ("", "all"):
        return list(range(count))
    tables = []
    for part in text.split(","):
        lo, _, hi = part.partition("-")
        tables.extend(range(int(lo), int(hi or lo) + 1))
    bad = [t for t in tables if not 0 <= t < count]
    if bad:
        raise InputError(f"--tables: table {bad[0]} does not exist (the input has {count})")
    return tables


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--input", required=True, help="processed data (this trainer's or the original's .npz), .npy, "
                        "raw Criteo text, or a trace of ids")
    parser.add_argument("--output", default="./input/dist_emb_j.log", help="distribution file; j -> table number")
    parser.add_argument("--tables", default="all", help="tables to record, e.g. 0,3-5")
    parser.add_argument("--max-rows", type=int, default=1_000_000, help="rows read from the input (first rows)")
    parser.add_argument("--enable-padding", action="store_true",
                        help="add ceil(rows / max distance) first accesses (the original's trace padding)")
    args = parser.parse_args(argv)
    if args.max_rows < 1:
        parser.error("--max-rows must be at least 1")
    try:
        columns = read_columns(args.input, args.max_rows)
        tables = parse_tables(args.tables, len(columns))
        if len(tables) > 1 and trace_file_for_table(args.output, 0) == args.output:
            raise InputError(f"--output {args.output} has no j to number {len(tables)} tables")
        for t in tables:
            start = time.perf_counter()
            trace = columns[t]
            if trace.size == 0:
                raise InputError(f"{args.input}: no rows to record")
            dist = distribution_from_trace(trace, args.enable_padding)
            path = trace_file_for_table(args.output, t)
            write_trace_distribution(path, dist)
            median = dist.distances[np.searchsorted(dist.cumulative, 0.5)]
            print(f"table {t}: {trace.size} accesses, {dist.ids.size} distinct ids, "
                  f"{100 * dist.probabilities[0]:.1f}% first accesses, median distance {median}, "
                  f"{time.perf_counter() - start:.1f} s -> {path}")
    except (InputError, OSError) as e:
        print(f"record_trace.py: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
