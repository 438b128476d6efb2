"""Trace-driven synthetic data: --data-generation=synthetic with --data-trace-file.

Each table's sparse ids are drawn so that their LRU reuse (stack) distances follow the
distribution recorded from a real access trace, as in the original's
dlrm_data_pytorch.py (trace_profile / trace_generate_lru). Dense features and targets
are random, as with --data-generation=random.

Distribution file (the original's format, one per table; `j` in the file name of
--data-trace-file is replaced by the table number, e.g. ./input/dist_emb_j.log ->
dist_emb_0.log, dist_emb_1.log, ...), three lines of ", "-separated numbers:
    1. the distinct ids of the recorded trace, in order of first access
    2. the stack distances that occur, ascending: 0 marks the first access of an id,
       d >= 1 an id last accessed d distinct ids ago (d = 1: the previous access)
    3. the cumulative probability of each of those distances

Record one with `python tools/record_trace.py` from a Criteo data set or a raw trace.

Generation (per table, one stream read across consecutive batches, so the ids the
model sees have the recorded reuse distribution): an LRU stack holding every id of
line 1 (the last first-accessed on top); each access draws a distance d from the
distribution; d > 0 reuses the d-th most recent id, d = 0 (a first access in the
recording) takes the least recently used one; --data-trace-enable-padding never draws
d = 0. (The original started each bag cold, from an empty stack, restricting d to the
ids seen so far: every bag began with the same ids, and long distances were under-drawn.)
Ids are used as generated (the original dropped repeats within a bag, which changed the
very reuse pattern it reproduces); ids beyond a table's rows are taken modulo its rows.
"""

from __future__ import annotations

import collections
import dataclasses
import math
import os
import sys

import numpy as np
from torch.utils.data import Dataset

from dlrm_data import Batch, RandomDataConfig, batch_from_tables

MAX_STREAM_LENGTH = 1 << 20  # accesses generated per table; longer data sets cycle through them


class TraceFileError(ValueError):
    """A missing or malformed distribution file; the message names the file and line."""


@dataclasses.dataclass
class TraceDistribution:
    ids: np.ndarray  # distinct ids, first-access order
    distances: np.ndarray  # stack distances, ascending, distances[0] == 0
    cumulative: np.ndarray  # P(distance <= distances[k]), last == 1

    @property
    def probabilities(self) -> np.ndarray:
        return np.diff(self.cumulative, prepend=0.0)


# ---------------------------------------------------------------------------- files
def trace_file_for_table(pattern: str, table: int) -> str:
    """The pattern with the last `j` of its file name replaced by the table number."""
    directory, name = os.path.split(pattern)
    k = name.rfind("j")
    if k < 0:
        return pattern
    return os.path.join(directory, name[:k] + str(table) + name[k + 1:])


def _numbers(text: str, kind, path: str, line: int):
    try:
        values = [kind(v) for v in text.replace(",", " ").split()]
        return np.array(values, dtype=np.float64 if kind is float else np.int64)
    except (ValueError, OverflowError) as e:  # not a number, or an id beyond int64
        raise TraceFileError(f"{path}:{line}: expected comma-separated {kind.__name__}s ({e})")


def read_trace_distribution(path: str) -> TraceDistribution:
    try:
        with open(path) as f:
            lines = f.read().splitlines()
    except OSError as e:
        raise TraceFileError(f"{path}: cannot read the trace distribution ({e.strerror or e})")
    except UnicodeDecodeError as e:
        raise TraceFileError(f"{path}: not a text file of a trace distribution (byte {e.start}: {e.reason})")
    lines = [line for line in lines if line.strip()]
    if len(lines) != 3:
        raise TraceFileError(f"{path}: expected 3 lines (ids, stack distances, cumulative probabilities), "
                             f"found {len(lines)}")
    ids = _numbers(lines[0], int, path, 1)
    distances = _numbers(lines[1], int, path, 2)
    cumulative = _numbers(lines[2], float, path, 3)
    if ids.size == 0 or (ids < 0).any():
        raise TraceFileError(f"{path}:1: the ids must be a non-empty list of non-negative integers")
    if distances.size == 0 or distances[0] != 0 or (np.diff(distances) <= 0).any():
        raise TraceFileError(f"{path}:2: the stack distances must be ascending and start with 0 (first accesses)")
    if distances[-1] > ids.size:
        raise TraceFileError(f"{path}:2: stack distance {distances[-1]} exceeds the {ids.size} distinct ids of line 1")
    if cumulative.size != distances.size:
        raise TraceFileError(f"{path}:3: {cumulative.size} probabilities for {distances.size} stack distances")
    if not np.isfinite(cumulative).all():
        raise TraceFileError(f"{path}:3: the cumulative probabilities must be numbers (found nan or inf)")
    if cumulative[0] < 0:
        raise TraceFileError(f"{path}:3: cumulative probabilities cannot be negative (the first is {cumulative[0]})")
    if (np.diff(cumulative) < 0).any() or abs(cumulative[-1] - 1.0) > 1e-3:
        raise TraceFileError(f"{path}:3: cumulative probabilities must be non-decreasing and end at 1 "
                             f"(ends at {cumulative[-1]})")
    return TraceDistribution(ids, distances, cumulative / cumulative[-1])


def write_trace_distribution(path: str, dist: TraceDistribution):
    """Writes the three-line format (to a temporary name, then renamed)."""
    def join(values):
        return ", ".join(str(v) for v in values)

    text = "\n".join([join(dist.ids.tolist()), join(dist.distances.tolist()),
                      join(repr(float(p)) for p in dist.cumulative)]) + "\n"
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


# ---------------------------------------------------------------------------- profiling
def stack_distances(trace) -> np.ndarray:
    """LRU stack distance of every access: 0 for a first access, else 1 + the number of
    distinct other ids accessed since the previous access of the same id.

    O(L log L) with a Fenwick tree marking, for each id, the time of its latest access.
    """
    trace = np.asarray(trace, dtype=np.int64)
    length = trace.size
    tree = [0] * (length + 1)
    last = {}
    out = [0] * length
    for k, x in enumerate(trace.tolist()):
        previous = last.get(x)
        if previous is not None:
            # latest-access marks in (previous, k): prefix(k) - prefix(previous + 1)
            count, i = 0, k
            while i > 0:
                count += tree[i]
                i -= i & -i
            i = previous + 1
            while i > 0:
                count -= tree[i]
                i -= i & -i
            out[k] = count + 1
            i = previous + 1
            while i <= length:
                tree[i] -= 1
                i += i & -i
        last[x] = k
        i = k + 1
        while i <= length:
            tree[i] += 1
            i += i & -i
    return np.array(out, dtype=np.int64)


def distribution_from_trace(trace, enable_padding: bool = False) -> TraceDistribution:
    """The distribution file's content for a recorded trace of ids.

    enable_padding adds ceil(L / max distance) first accesses, as the original's
    trace_profile meant to: long traces over few ids otherwise rarely draw new ids.
    """
    trace = np.asarray(trace, dtype=np.int64)
    if trace.size == 0:
        raise ValueError("the trace is empty")
    distances = stack_distances(trace)
    _, first = np.unique(trace, return_index=True)
    ids = trace[np.sort(first)]
    values, counts = np.unique(distances, return_counts=True)
    if enable_padding and values[-1] > 0:
        counts[0] += math.ceil(trace.size / values[-1])
    return TraceDistribution(ids, values, np.cumsum(counts) / counts.sum())


# ---------------------------------------------------------------------------- generation
def generate_accesses(dist: TraceDistribution, length: int, rng: np.random.Generator,
                      enable_padding: bool = False) -> np.ndarray:
    """`length` ids whose LRU stack distances are drawn from `dist`.

    The LRU stack starts warm: every id of the trace in it, the last first-accessed one
    the most recent. A distance d > 0 reuses the d-th most recent id; d = 0 (a first
    access in the recorded trace) takes the least recently used id, or is never drawn
    with enable_padding.
    """
    distances, cumulative = dist.distances, dist.cumulative
    last = distances.size - 1
    u = rng.random(length)
    if enable_padding and last > 0:  # remap u onto the support without d = 0
        u = (1.0 - cumulative[0]) * u + cumulative[0]
        drawn = distances[np.clip(np.searchsorted(cumulative, u, side="right"), 1, last)]
    else:
        drawn = distances[np.minimum(np.searchsorted(cumulative, u, side="left"), last)]
    lru = collections.deque(dist.ids.tolist())  # front: least recently used; back: most recent
    out = [0] * length
    for k, d in enumerate(drawn.tolist()):
        if d == 0:
            x = lru.popleft()
        else:
            x = lru[-d]
            del lru[-d]
        lru.append(x)
        out[k] = x
    return np.array(out, dtype=np.int64)


class SyntheticTraceDataset(Dataset):
    """Random dense features and targets; each table's ids from its trace distribution.

    Bag sizes follow --num-indices-per-lookup(-fixed) as for random data. Table t's ids
    are one generated stream (at most `max_stream_length` long, then repeated) read in
    batch order, so dataset[j] is a pure function of j: the same for any worker or resume.
    """

    def __init__(self, dense_dim, table_sizes, num_samples, batch_size, seed, config: RandomDataConfig | None,
                 trace_file_pattern: str, enable_padding: bool = False, split: int = 0,
                 max_stream_length: int = MAX_STREAM_LENGTH, notes=None):
        self.dense_dim = int(dense_dim)
        self.table_sizes = [int(n) for n in table_sizes]
        self.num_samples = int(num_samples)
        self.batch_size = int(batch_size)
        self.seed, self.split = int(seed), int(split)
        self.config = config or RandomDataConfig()
        notes = notes if notes is not None else (lambda text: print(text, file=sys.stderr))

        # first lookup of every batch in each table's stream
        totals = np.array([[sizes.sum() for sizes in self._bag_sizes(j)] for j in range(len(self))], dtype=np.int64)
        self.starts = np.zeros((len(self) + 1, len(self.table_sizes)), dtype=np.int64)
        np.cumsum(totals.reshape(len(self), -1), axis=0, out=self.starts[1:])
        self.streams = []
        for t, rows in enumerate(self.table_sizes):
            path = trace_file_for_table(trace_file_pattern, t)
            dist = read_trace_distribution(path)
            if dist.ids.max() >= rows:
                notes(f"note: {path}: ids reach {dist.ids.max()} but table {t} has {rows} rows; "
                      f"ids are taken modulo {rows}")
            length = int(min(max(self.starts[-1, t], 1), max_stream_length))
            rng = np.random.default_rng([self.seed, self.split, 2, t])
            self.streams.append(generate_accesses(dist, length, rng, enable_padding) % rows)

    def __len__(self) -> int:
        return math.ceil(self.num_samples / self.batch_size)

    def samples_in_batch(self, j: int) -> int:
        return min(self.batch_size, self.num_samples - j * self.batch_size)

    def _bag_sizes(self, j):
        n = self.samples_in_batch(j)
        cfg = self.config
        rng = np.random.default_rng([self.seed, self.split, 1, j])
        for rows in self.table_sizes:
            yield cfg.bag_sizes(rng, n, rows)

    def __getitem__(self, j: int) -> Batch:
        if not 0 <= j < len(self):
            raise IndexError(j)
        n = self.samples_in_batch(j)
        rng = np.random.default_rng([self.seed, self.split, 0, j])
        dense_x = rng.random((n, self.dense_dim), dtype=np.float32)
        target = rng.random((n, 1), dtype=np.float32)
        if self.config.round_targets:
            target = np.round(target)
        lengths, indices = [], []
        for t, sizes in enumerate(self._bag_sizes(j)):
            stream = self.streams[t]
            positions = np.arange(self.starts[j, t], self.starts[j, t] + sizes.sum()) % stream.size
            lengths.append(sizes)
            indices.append(stream[positions])
        return batch_from_tables(dense_x, lengths, indices, target)
