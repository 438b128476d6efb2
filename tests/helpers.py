"""Helpers shared by the tests: a planted-signal dataset, a naive reference parser of raw
Criteo lines, small generated Criteo files. (pytest fixtures are in conftest.py.)"""

import math
import os
import re
import time

import numpy as np

import data_utils
import dlrm_data

MISSING = 1 << 32


PLANTED_TABLES = (50, 20, 10)


def planted_dataset(num_samples, batch_size, seed, tables=PLANTED_TABLES) -> dlrm_data.OneHotDataset:
    """4 dense features and one id per table; clicks depend on dense feature 0 and on the id in
    table 0 (a learnable signal)."""
    rng = np.random.default_rng(seed)
    dense = rng.random((num_samples, 4), dtype=np.float32)
    ids = np.stack([rng.integers(0, n, num_samples) for n in tables], axis=1)
    effect = np.random.default_rng(99).normal(0, 2, tables[0])
    logit = 4 * (dense[:, 0] - 0.5) + effect[ids[:, 0]]
    labels = (rng.random(num_samples) < 1 / (1 + np.exp(-logit))).astype(np.float32)
    return dlrm_data.OneHotDataset(dense, ids, labels, batch_size)


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


def random_batch(batch_size=6, tables=(5, 1, 7, 3), max_bag=4, seed=0):
    """Bags of 0..max_bag ids (empty bags included), repeated rows across and within bags."""
    rng = np.random.default_rng(seed)
    lengths = [rng.integers(0, max_bag + 1, batch_size) for _ in tables]
    indices = [rng.integers(0, n, int(l.sum())) for n, l in zip(tables, lengths)]
    target = rng.random(batch_size).round()
    return dlrm_data.batch_from_tables(rng.random((batch_size, 3)), lengths, indices, target)


def write_job_file(path, report):
    """A preprocessing-pool task for tests: writes the file `path` names (its process id in it), reports one."""
    with open(path, "w") as f:
        f.write(str(os.getpid()))
    report(1)


def write_job_file_and_wait(path, report):
    """A preprocessing-pool task for tests that never ends by itself: writes its process id to `path`, sleeps."""
    write_job_file(path, report)
    time.sleep(60)


TEST_LINES = re.compile(r"^ accuracy ([\d.]+) %, best ([\d.]+) %\n test loss=([\d.]+), auc=([\w.]+)"
                        r"(?: \(the test set has one class\))?, best auc=([\w.]+)", re.M)


def parse_tests(out: str) -> list[tuple]:
    """(accuracy %, best %, loss, auc, best auc) of each test in a run's output: the original's line, then ours
    (`undefined` AUC as NaN)."""
    return [tuple(math.nan if v == "undefined" else float(v) for v in m.groups()) for m in TEST_LINES.finditer(out)]
