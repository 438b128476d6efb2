"""Shared helpers of the tests/test_data_*.py files: a naive reference parser and small files."""

import os

import numpy as np

import data_utils

MISSING = 1 << 32


def naive_row(line: bytes):
    """The meaning of one raw line, written the slow obvious way."""
    fields = line.rstrip(b"\n").rstrip(b"\r").split(b"\t")
    assert len(fields) == 40, fields
    ints = [min(max(0, int(x)), 2**31 - 1) if x else 0 for x in fields[1:14]]
    cats = [int(x, 16) if x else MISSING for x in fields[14:]]
    return int(fields[0]), ints, cats


def naive_key(value, max_ind_range=-1):
    """The key a categorical is numbered by: the value, or value % M; missing stays apart."""
    return value if max_ind_range <= 0 or value == MISSING else value % max_ind_range


def naive_ids(cats, max_ind_range=-1):
    """Per-feature ids in order of first appearance of their keys, as the original."""
    keys = np.vectorize(lambda v: naive_key(v, max_ind_range), otypes=[np.int64])(np.asarray(cats, dtype=np.int64))
    ids = np.empty(keys.shape, dtype=np.int64)
    counts = []
    for t in range(keys.shape[1]):
        seen = {}
        for i, k in enumerate(keys[:, t].tolist()):
            ids[i, t] = seen.setdefault(k, len(seen))
        counts.append(len(seen))
    return ids, counts


def row_text(label=0, ints=None, cats=None) -> bytes:
    """One raw line from Python values; None or "" fields are empty (missing)."""
    ints = ints if ints is not None else [1] * 13
    cats = cats if cats is not None else ["0a1b2c3d"] * 26
    fields = [str(label)] + ["" if v is None else str(v) for v in ints] + ["" if v is None else v for v in cats]
    return "\t".join(fields).encode() + b"\n"


def fake_kaggle(directory, rows, seed=0) -> str:
    path = os.path.join(str(directory), "train.txt")
    data_utils.make_fake(path, rows, seed=seed, log=lambda *a: None)
    return path


def fake_terabyte(directory, rows, seed=0, compress=False) -> str:
    prefix = os.path.join(str(directory), "day")
    data_utils.make_fake(prefix, rows, days=24, seed=seed, compress=compress, log=lambda *a: None)
    return prefix


def preprocess_quietly(raw, out_dir, data_set="kaggle", **kwargs):
    messages = []
    processed = data_utils.preprocess(raw, str(out_dir), data_set, log=messages.append, progress=False, **kwargs)
    return processed, messages


def load_days(processed):
    """All processed rows in day order: label, dense, sparse."""
    days = range(len(processed.day_rows))
    return tuple(np.concatenate([np.load(processed.day_file(d, kind)) for d in days])
                 for kind in ("label", "dense", "sparse"))
