"""Raw Criteo click logs -> processed, memory-mappable arrays for the DLRM trainer.

Usage:
    # a raw Criteo-format file with a learnable signal (no download needed)
    python data_utils.py make-fake --rows 1000000 --out input/train.txt
    python data_utils.py make-fake --rows 2400000 --days 24 --out input/day      # day_0 .. day_23

    # preprocess (the trainer does this itself on first use, with the same flags)
    python data_utils.py preprocess --data-set=kaggle --raw-data-file=input/train.txt \
        --processed-data-file=input/kaggleAdDisplayChallenge_processed.npz

    # the MLPerf DLRMv2 multi-hot expansion of it, written once (bounded memory, resumable);
    # the trainer reads it with --processed-data-file=input/kaggle_multihot
    python data_utils.py multi-hot --data-set=kaggle --processed-data-file=input/kaggleAdDisplayChallenge_processed \
        --multi-hot-sizes=3,2,1,2,6,1,1,1,1,7,3,8,1,6,9,5,1,1,1,12,100,27,10,3,1,1 --out input/kaggle_multihot

Raw format: one row per line, TAB-separated: label (0/1), 13 integers, 26 categoricals of
8 hex digits; an empty field is missing. Integers: missing or negative -> 0 (the model
sees log(x + 1)). Categoricals: hex -> integer, missing -> a value of its own (MISSING);
with --max-ind-range=M a present value is hashed to value % M and missing keeps its own
key (categorical_keys). Each feature's distinct keys are then numbered densely 0..count-1
(over all days, as the original's dictionaries), and the counts are the embedding table
sizes (the original's derived --arch-embedding-size; with M, at most M + 1: M hashed values
and missing).

Days and splits, as the original (so results compare with published ones):
    kaggle:   train.txt cut into 7 equal consecutive "days" (the first days take one
              extra row when it does not divide); days 0-5 train, day 6 halved:
              first half test, second half validation.
    terabyte: day_0 .. day_23 (plain or .gz); days 0-22 train, day 23 halved:
              first half test, second half validation.
--data-sub-sample-rate=r drops that fraction of negatives from the training days only
(a fixed pseudo-random choice per row, so the processed data does not depend on the seed).

Output, in a subdirectory per settings (settings_key: data set, --max-ind-range,
--data-sub-sample-rate) of the directory named by --processed-data-file without its .npz
suffix (default: <raw dir>/kaggleAdDisplayChallenge_processed or terabyte_processed), so
that runs with other settings keep their own processed set:
    day_<d>_label.npy   uint8 [rows]       click or not
    day_<d>_dense.npy   int32 [rows, 13]   integers, missing/negative -> 0
    day_<d>_sparse.npy  int32 [rows, 26]   categorical ids in [0, counts[t])
    dictionary_<t>.npy  int64 [counts[t]]  the key (value, hashed value or MISSING) behind each id
    metadata.json       everything the result depends on; written last
    train.bin, test.bin, val.bin           (only with --mlperf-bin-loader) int32 records
                                           [label, 13 integers, 26 ids], one file per split
A rerun reuses the output only when metadata.json matches the settings and the raw files
(size and mtime); otherwise it says why and rebuilds. An interrupted run resumes with the
days it finished (work/ holds those intermediate files until the end). Every file is
written under a temporary name and renamed when complete.

How it works, in bounded memory (a 2 MiB block of text at a time, plus the dictionaries):
    1. parse, per day: NumPy on the raw bytes (no per-row Python) -> labels, integers, and
       per block ("chunk") each feature's distinct values with chunk-local ids (pyarrow's
       hash-based dictionary_encode);
    2. number, per feature: the distinct values of all chunks (hash-grouped so that each hash
       table fits in cache) -> dictionary_<t>.npy and the global id of every chunk's values;
    3. remap, per day: chunk-local ids -> global ids (a gather).
Days (phases 1 and 3) and features (phase 2) run in parallel with --dataset-multiprocessing.

Multi-hot (`multi-hot`, write_multi_hot): a processed set's ids expanded into the bags of
`dlrmkit.multihot` (one directory of its own: day_<d>_{label,dense,multihot}.npy, the last int32
[rows, sum(sizes)], and metadata.json with the sizes and distribution); the trainer reads the
batches of on-the-fly expansion from it.
"""

from __future__ import annotations

if __name__ == "__main__":  # Ctrl-C while the libraries load: one line, as later in the run
    from dlrmkit.signals import interrupt_quietly_while_loading
    interrupt_quietly_while_loading("data_utils.py")

import argparse
import contextlib
import dataclasses
import gzip
import json
import math
import os
import re
import shutil
import signal
import sys
import tempfile
import time
import zipfile
import zlib

import numpy as np

from dlrmkit import flags, outputs, signals
from dlrmkit.hashing import splitmix64, unit_interval

NUM_DENSE = 13
NUM_SPARSE = 26
NUM_FIELDS = 1 + NUM_DENSE + NUM_SPARSE
MISSING = 1 << 32  # the key of a missing categorical: no 8-hex-digit value and no hashed value equals it
FORMAT = "dlrm-criteo-processed-v2"
DAYS = {"kaggle": 7, "terabyte": 24}
DEFAULT_NAMES = {"kaggle": "kaggleAdDisplayChallenge_processed", "terabyte": "terabyte_processed"}
FIELD_NAMES = ["label"] + [f"I{k}" for k in range(1, NUM_DENSE + 1)] + [f"C{k}" for k in range(1, NUM_SPARSE + 1)]
BLOCK_BYTES = 2 << 20  # raw text parsed per step: <= 51k rows, so chunk-local ids fit in uint16
MAX_LINE_BYTES = 16 << 20
PIECE_VALUES = 1 << 23  # phase 2 numbers at least this many values per step (bounds its memory) ...
GROUP_VALUES = 1 << 16  # ... split into hash groups of about this many (hash tables that fit in cache)
OUTPUT_FILE = re.compile(r"^(day_\d+_(label|dense|sparse)\.npy|dictionary_\d+\.npy|(train|test|val)\.bin|bin\.json|"
                         r"metadata\.json)(\.tmp)?$")
INT32_MAX = np.iinfo(np.int32).max


class DataError(Exception):
    """Bad input or settings: a one-line message naming the file (and line) or flag."""


# ============================================================================ parsing
def _u64(x):
    return np.uint64(x)


# KEEP[L] keeps the last L bytes of an 8-byte little-endian window (the field's characters)
KEEP = np.array([0] + [((1 << 64) - 1) ^ ((1 << (8 * (8 - n))) - 1) for n in range(1, 9)], dtype=np.uint64)
ZEROS = _u64(0x3030303030303030)  # eight ASCII '0'
HIGH_BITS = _u64(0x8080808080808080)


def _left_pad(words, lengths):
    """Windows whose leading (8 - length) bytes are replaced by '0'."""
    keep = KEEP[lengths]
    return (words & keep) | (ZEROS & ~keep)


def _decimal8(p):
    """Values and validity of 8 ASCII digits per uint64 (first character in the lowest byte)."""
    high_nibbles = _u64(0xF0F0F0F0F0F0F0F0)
    ok = ((p & high_nibbles) == ZEROS) & (((p + _u64(0x0606060606060606)) & high_nibbles) == ZEROS)  # '0'..'9'
    v = p - ZEROS
    v = v * _u64(10) + (v >> _u64(8))
    v = ((v & _u64(0x000000FF000000FF)) * _u64(100 + (1000000 << 32))
         + ((v >> _u64(16)) & _u64(0x000000FF000000FF)) * _u64(1 + (10000 << 32))) >> _u64(32)
    return v, ok


def _hex8(p):
    """Values and validity of 8 ASCII hex digits per uint64 (first character in the lowest byte)."""
    ascii7 = (p & HIGH_BITS) == 0
    digit = (p + _u64(0x5050505050505050)) & ~(p + _u64(0x4646464646464646))  # '0' <= c <= '9'
    lower = p | _u64(0x2020202020202020)
    letter = (lower + _u64(0x1F1F1F1F1F1F1F1F)) & ~(lower + _u64(0x1919191919191919))  # 'a' <= c|0x20 <= 'f'
    ok = ascii7 & (((digit | letter) & HIGH_BITS) == HIGH_BITS)
    v = (p & _u64(0x0F0F0F0F0F0F0F0F)) + _u64(9) * ((p >> _u64(6)) & _u64(0x0101010101010101))  # nibble per byte
    # pack: pairs of nibbles into bytes, pairs of bytes into 16 bits, then 32 bits (first character highest)
    v = (v * _u64(16) + (v >> _u64(8))) & _u64(0x00FF00FF00FF00FF)
    v = (v * _u64(256) + (v >> _u64(16))) & _u64(0x0000FFFF0000FFFF)
    return (v * _u64(65536) + (v >> _u64(32))) & _u64(0xFFFFFFFF), ok


@dataclasses.dataclass
class ParsedRows:
    """One block of raw rows: label [n] uint8, dense [n, 13] int32, categorical values
    [26, n] int64 (feature-major; missing -> MISSING)."""

    label: np.ndarray
    dense: np.ndarray
    categorical: np.ndarray

    def select(self, keep):
        return ParsedRows(self.label[keep], self.dense[keep], self.categorical[:, keep])


class _Block:
    """Raw bytes padded with 8 '0' bytes on each side, viewed as overlapping 8-byte windows."""

    def __init__(self, raw: bytes):
        self.bytes = np.full(len(raw) + 16, ord("0"), dtype=np.uint8)
        self.bytes[8 : 8 + len(raw)] = np.frombuffer(raw, dtype=np.uint8)
        # windows[p] = bytes[p : p + 8] as a little-endian uint64
        self.windows = np.ndarray((len(self.bytes) - 7,), dtype="<u8", buffer=self.bytes, strides=(1,))

    def text(self, start, stop, limit=40) -> str:
        value = bytes(self.bytes[start : min(stop, start + limit)]).decode("utf-8", "replace")
        return value + ("..." if stop - start > limit else "")


def categorical_keys(values, max_ind_range):
    """The key each categorical value is numbered by (int64, same shape as `values`).

    max_ind_range <= 0: the value itself. Otherwise a present value is hashed to
    value % max_ind_range and MISSING stays MISSING: hashed values are below both
    max_ind_range and 2**32 (values have 8 hex digits), so missing never shares a key with
    a present value, and two present values share one exactly when they are equal modulo M."""
    if max_ind_range <= 0:
        return values
    keys = values % max_ind_range
    keys[values == MISSING] = MISSING
    return keys


def parse_block(raw: bytes, path: str, first_line: int) -> ParsedRows:
    """Parses whole lines of raw Criteo text (vectorised); raises DataError naming file:line."""
    block = _Block(raw)
    a = block.bytes
    seps = np.flatnonzero(a < 11)  # TAB (9), LF (10), or a control character that has no business here
    kinds = a[seps]
    num_lines = int(np.count_nonzero(kinds == 10))
    # every line: 39 TABs then its newline
    if len(seps) != NUM_FIELDS * num_lines or not (kinds.reshape(num_lines, NUM_FIELDS)[:, :-1] == 9).all():
        _raise_field_count_error(block, seps, kinds, path, first_line)
    ends = seps.reshape(num_lines, NUM_FIELDS)  # field k of line i ends at ends[i, k]
    line_starts = np.empty(num_lines, dtype=np.int64)
    line_starts[0] = 8
    line_starts[1:] = ends[:-1, -1] + 1
    ends[:, -1] -= a[ends[:, -1] - 1] == 13  # CRLF line ends
    lengths = np.empty_like(ends)
    lengths[:, 0] = ends[:, 0] - line_starts
    np.subtract(ends[:, 1:], ends[:, :-1] + 1, out=lengths[:, 1:])

    def fail(row, field, what):
        start = line_starts[row] if field == 0 else ends[row, field - 1] + 1
        value = block.text(start, ends[row, field])
        raise DataError(f"{path}:{first_line + row}: field {field + 1} ({FIELD_NAMES[field]}) {what}, found {value!r}")

    label = a[line_starts] - ord("0")
    bad = (lengths[:, 0] != 1) | (label > 1)
    if bad.any():
        fail(int(np.argmax(bad)), 0, "must be 0 or 1")

    dense, ok = _parse_integers(block, ends[:, 1:14], lengths[:, 1:14])
    if not ok.all():
        row, col = np.unravel_index(int(np.argmax(~ok)), ok.shape)
        fail(int(row), 1 + int(col), "is not an integer")

    cat_lengths = lengths[:, 14:].T
    words = block.windows[ends[:, 14:].T - 8]
    if not (cat_lengths & ~8).any():  # the usual 8 digits or missing: no padding needed
        values, ok = _hex8(words)
        bad = ~ok & (cat_lengths != 0)
    else:
        values, ok = _hex8(_left_pad(words, np.minimum(cat_lengths, 8)))
        bad = ~ok | (cat_lengths > 8)
    if bad.any():
        col, row = np.unravel_index(int(np.argmax(bad)), bad.shape)
        fail(int(row), 14 + int(col), "is not a hex value of at most 8 digits")
    categorical = values.view(np.int64)
    categorical[cat_lengths == 0] = MISSING
    return ParsedRows(label.astype(np.uint8), dense, categorical)


def _parse_integers(block, ends, lengths):
    """[n, 13] int32 from decimal fields (missing -> 0, negative -> 0, > int32 max -> int32 max), validity."""
    values, ok = _parse_unsigned(block, ends, lengths)
    if not ok.all():  # signed values (rare): parse again without the sign
        rows, cols = np.nonzero(~ok)
        field_ends, field_lengths = ends[rows, cols], lengths[rows, cols]
        sign = block.bytes[field_ends - field_lengths]
        unsigned, unsigned_ok = _parse_unsigned(block, field_ends, field_lengths - 1)
        ok[rows, cols] = unsigned_ok & (field_lengths > 1) & ((sign == ord("-")) | (sign == ord("+")))
        values[rows, cols] = np.where(sign == ord("-"), 0, unsigned)
    return values.astype(np.int32), ok


def _parse_unsigned(block, ends, lengths):
    """Values (saturated at int32 max) and validity of fields of decimal digits ending at `ends`."""
    values, ok = _decimal8(_left_pad(block.windows[ends - 8], np.minimum(lengths, 8)))
    long_fields = lengths > 8
    if long_fields.any():  # 9-16 digits: one more window; longer: per value (rare)
        where = np.nonzero(long_fields)
        field_ends, field_lengths = ends[where], lengths[where]
        high, high_ok = _decimal8(_left_pad(block.windows[field_ends - 16], np.clip(field_lengths - 8, 0, 8)))
        long_values = np.minimum(high * _u64(100_000_000) + values[where], _u64(INT32_MAX))
        long_ok = high_ok & ok[where]
        for k in np.flatnonzero(field_lengths > 16):  # leading zeros may make a small value long
            digits = bytes(block.bytes[field_ends[k] - field_lengths[k] : field_ends[k]])
            long_ok[k] = digits.isdigit()
            long_values[k] = min(int(digits), INT32_MAX) if long_ok[k] else INT32_MAX
        values[where], ok[where] = long_values, long_ok
    return values, ok


def _raise_field_count_error(block, seps, kinds, path, first_line):
    """Names the first line with a wrong number of fields or a stray control character."""
    newline = kinds == 10
    line_of = np.cumsum(newline) - newline  # line index of each separator
    fields = np.bincount(line_of)
    control = (kinds != 9) & ~newline
    bad_count_line = int(np.argmax(fields != NUM_FIELDS)) if (fields != NUM_FIELDS).any() else len(fields)
    control_line = int(line_of[np.argmax(control)]) if control.any() else len(fields)
    row = min(bad_count_line, control_line)
    where = f"{path}:{first_line + row}"
    if control_line <= bad_count_line:
        raise DataError(f"{where}: unexpected control character 0x{int(kinds[np.argmax(control)]):02x} "
                        "(not a Criteo text file?)")
    newlines = seps[newline]
    line_start = 8 if row == 0 else newlines[row - 1] + 1
    if newlines[row] == line_start:
        raise DataError(f"{where}: empty line")
    raise DataError(f"{where}: expected {NUM_FIELDS} tab-separated fields "
                    f"(label, {NUM_DENSE} integers, {NUM_SPARSE} categoricals), found {int(fields[row])}")


# ============================================================================ reading raw files
def open_raw(path):
    """A binary file object, decompressing gzip (by content, whatever the name)."""
    with open(path, "rb") as f:
        compressed = f.read(2) == b"\x1f\x8b"
    return gzip.open(path, "rb") if compressed else open(path, "rb")


def read_line_blocks(path, start=0, stop=None, block_bytes=BLOCK_BYTES):
    """Yields blocks of whole lines (each ending with a newline) from bytes [start, stop) of a file."""
    with open_raw(path) as f:
        if start:
            f.seek(start)
        remaining = math.inf if stop is None else stop - start
        offset, carry = start, b""
        while True:
            try:
                data = f.read(int(min(block_bytes, remaining)))
            except (EOFError, zlib.error, gzip.BadGzipFile) as e:
                raise DataError(f"{path}: truncated or corrupt gzip file ({e})")
            remaining -= len(data)
            if not data:
                break
            data = carry + data
            cut = data.rfind(b"\n") + 1
            if cut == 0:
                if len(data) > MAX_LINE_BYTES:
                    raise DataError(f"{path}: no line end in the {len(data) >> 20} MiB after byte {offset} "
                                    "(not a Criteo text file?)")
                carry = data
                continue
            carry = data[cut:]
            offset += cut
            yield data[:cut]
        if carry:
            yield carry + b"\n"  # last line without a newline


def count_lines(path, bar=None) -> tuple[int, list[int], list[int]]:
    """Line count of a plain file, with the lines and bytes of each 16 MiB block."""
    lines, sizes = [], []
    with open(path, "rb") as f:
        while True:
            data = f.read(16 << 20)
            if not data:
                break
            lines.append(data.count(b"\n"))
            sizes.append(len(data))
            last = data[-1:]
            if bar is not None:
                bar.update(len(data))
    total = sum(lines) + (1 if sizes and last != b"\n" else 0)
    return total, lines, sizes


def line_offsets(path, targets, block_lines, block_sizes) -> list[int]:
    """Byte offset where each (0-based) line in `targets` starts."""
    offsets = []
    cum_lines = np.concatenate([[0], np.cumsum(block_lines)])
    cum_bytes = np.concatenate([[0], np.cumsum(block_sizes)])
    with open(path, "rb") as f:
        for target in targets:
            if target == 0:
                offsets.append(0)
                continue
            b = int(np.searchsorted(cum_lines, target, side="left")) - 1  # block holding newline number `target`
            f.seek(int(cum_bytes[b]))
            newlines = np.flatnonzero(np.frombuffer(f.read(int(block_sizes[b])), dtype=np.uint8) == 10)
            offsets.append(int(cum_bytes[b] + newlines[target - cum_lines[b] - 1] + 1))
    return offsets


def day_sizes(total_rows: int, days: int) -> list[int]:
    """The original's cut of one file into `days` consecutive near-equal parts."""
    size, extra = divmod(total_rows, days)
    return [size + (1 if d < extra else 0) for d in range(days)]


def split_days(day_rows) -> dict:
    """Rows of each split as (day, start, stop): all days but the last train; the last day's
    first ceil(n/2) rows test, the rest validation."""
    last = len(day_rows) - 1
    half = (day_rows[last] + 1) // 2
    return {
        "train": [(d, 0, int(day_rows[d])) for d in range(last)],
        "test": [(last, 0, half)],
        "val": [(last, half, int(day_rows[last]))],
    }


# ============================================================================ output files
class NpyWriter:
    """Appends rows to a .npy file under a temporary name; close() fixes the shape and renames it."""

    HEADER_BYTES = 128

    def __init__(self, path, dtype, row_shape=()):
        self.path, self.tmp = path, path + ".tmp"
        self.dtype, self.row_shape, self.rows = np.dtype(dtype), tuple(row_shape), 0
        self.file = open(self.tmp, "wb")
        self.file.write(self._header())

    def _header(self) -> bytes:
        shape = (self.rows,) + self.row_shape
        text = "{'descr': %r, 'fortran_order': False, 'shape': %r, }" % (self.dtype.str, shape)
        pad = self.HEADER_BYTES - 10 - len(text) - 1
        length = (self.HEADER_BYTES - 10).to_bytes(2, "little")
        return b"\x93NUMPY\x01\x00" + length + text.encode() + b" " * pad + b"\n"

    def append(self, array):
        array = np.ascontiguousarray(array, dtype=self.dtype)
        assert array.shape[1:] == self.row_shape
        self.file.write(array.data)
        self.rows += array.shape[0]

    def close(self):
        self.file.seek(0)
        self.file.write(self._header())
        self.file.close()
        os.replace(self.tmp, self.path)

    def discard(self):
        self.file.close()
        if os.path.exists(self.tmp):
            os.remove(self.tmp)


def save_npy(path, array):
    """np.save under a temporary name, then rename (never a half-written file under `path`)."""
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        np.save(f, array)
    os.replace(tmp, path)


def save_json(path, value):
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(value, f, indent=1)
    os.replace(tmp, path)


def load_json(path):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


# ============================================================================ the pipeline
@dataclasses.dataclass
class DayTask:
    """One day to parse: bytes [start, stop) of `path`, whose first line is `first_line` (1-based)."""

    day: int
    path: str
    start: int
    stop: int | None
    first_line: int
    sub_sample_rate: float  # 0 for test/validation days
    max_ind_range: int
    work_dir: str


@dataclasses.dataclass
class ProcessedData:
    out_dir: str
    metadata: dict

    @property
    def day_rows(self) -> list[int]:
        return [day["rows"] for day in self.metadata["days"]]

    @property
    def counts(self) -> list[int]:
        return self.metadata["counts"]

    def day_file(self, day, kind) -> str:
        return os.path.join(self.out_dir, f"day_{day}_{kind}.npy")


STANDARD_RAW_NAMES = {"kaggle": ("train.txt",), "terabyte": ("day",)}


def processed_dir(processed_data_file: str, raw_data_file: str, data_set: str) -> str:
    """Our output directory: --processed-data-file without .npz; without it, next to the raw data, the
    original's default name for Criteo's own file names (train.txt, day_N), else <raw name>_processed,
    so that two raw files in one folder never share (and rebuild back and forth) one processed set."""
    if processed_data_file:
        stem = processed_data_file[:-4] if processed_data_file.endswith(".npz") else processed_data_file
        return stem.rstrip("/") or "."
    folder, name = os.path.split(raw_data_file.rstrip("/"))
    if name in STANDARD_RAW_NAMES[data_set]:
        return os.path.join(folder or ".", DEFAULT_NAMES[data_set])
    return os.path.join(folder or ".", f"{name}_processed")  # the whole name: clicks.txt and clicks.tsv differ


def raw_day_files(raw_data_file: str, data_set: str) -> list[str]:
    """The raw files of a data set: train.txt for kaggle, <prefix>_0 .. <prefix>_23[.gz] for terabyte."""
    if data_set == "kaggle":
        if not os.path.isfile(raw_data_file):
            raise DataError(missing_raw_data(raw_data_file, data_set))
        with open(raw_data_file, "rb") as f:
            if f.read(2) == b"\x1f\x8b":
                raise DataError(f"--raw-data-file {raw_data_file}: gzip-compressed; the kaggle train.txt must be "
                                "decompressed first (gunzip)")
        return [raw_data_file]
    files = []
    for day in range(DAYS["terabyte"]):
        found = _day_file(raw_data_file, day)
        if found is None:
            if day == 0:
                raise DataError(missing_raw_data(raw_data_file, data_set))
            raise DataError(f"--raw-data-file {raw_data_file}: day file {raw_data_file}_{day} (or .gz) not found")
        files.append(found)
    return files


def _day_file(prefix: str, day: int) -> str | None:
    return next((p for p in (f"{prefix}_{day}", f"{prefix}_{day}.gz") if os.path.isfile(p)), None)


def missing_raw_data(path: str, data_set: str) -> str:
    """Why --raw-data-file names no raw data of `data_set`, and the flags that read what is there."""
    flag = f"--raw-data-file {path}"
    days = f"{DAYS['terabyte']} day files <prefix>_0 .. <prefix>_{DAYS['terabyte'] - 1}"
    inside_train, inside_prefix = os.path.join(path, "train.txt"), os.path.join(path, "day")
    if os.path.isdir(path):
        if os.path.isfile(inside_train):
            return f"{flag}: is a directory; use --raw-data-file={inside_train} --data-set=kaggle"
        if _day_file(inside_prefix, 0):
            return f"{flag}: is a directory; use --raw-data-file={inside_prefix} --data-set=terabyte"
        if data_set == "kaggle":
            return f"{flag}: is a directory; --data-set=kaggle reads one file, the Criteo Kaggle train.txt"
        return f"{flag}: is a directory; --data-set=terabyte reads the {days}: give their prefix (e.g. {inside_prefix})"
    if data_set == "kaggle":
        if _day_file(path, 0):
            return f"{flag}: no such file, but {_day_file(path, 0)} exists: --data-set=terabyte reads the {days}"
        if os.path.isfile(path + ".gz"):
            return f"{flag}: no such file, but {path}.gz exists: decompress it first (gunzip {path}.gz; the kaggle " \
                   "train.txt is read uncompressed)"
        reordered = _original_reordered_hint(path, data_set)
        if reordered:
            return f"{flag}: no such file; {reordered}"
        return f"{flag}: no such file (--data-set=kaggle reads the Criteo Kaggle train.txt)"
    reordered = _original_reordered_hint(path, data_set)
    if reordered and not _day_file(path, 0):
        return f"{flag}: day file {path}_0 (or .gz) not found; {reordered}"
    day_file = re.match(r"^(.*)_\d+(\.gz)?$", path)
    if os.path.isfile(path) and day_file and _day_file(day_file.group(1), 0):
        return f"{flag}: is one day file; --data-set=terabyte reads the {days}: use --raw-data-file={day_file.group(1)}"
    if os.path.isfile(path):
        return (f"{flag}: --data-set=terabyte reads the {days}, and {path}_0 does not exist; "
                f"for one file such as the Kaggle train.txt use --data-set=kaggle")
    return f"{flag}: day file {path}_0 (or .gz) not found (--data-set=terabyte reads the {days})"


def _original_reordered_hint(path: str, data_set: str) -> str | None:
    """What to do with the original's --memory-map output for the raw data `path`, when it is there."""
    files = original_reordered_files(path, data_set)
    if files is None:
        return None
    if files["missing"]:
        return (f"the original's --memory-map output beside it is incomplete ({files['missing']} not found)")
    return (f"{files['days'][0]} .. {os.path.basename(files['days'][-1])} are the original's --memory-map output: "
            "add --memory-map to read them")


def source_identity(path) -> dict:
    st = os.stat(path)
    return {"file": os.path.basename(path), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def settings_for(data_set, sources, max_ind_range, sub_sample_rate) -> dict:
    """Everything the processed result depends on."""
    return {
        "format": FORMAT,
        "data_set": data_set,
        "max_ind_range": int(max_ind_range) if max_ind_range > 0 else -1,
        "sub_sample_rate": float(sub_sample_rate),
        "sources": [source_identity(p) for p in sources],
    }


def describe_change(old: dict, new: dict) -> str:
    flags = {"max_ind_range": "--max-ind-range", "sub_sample_rate": "--data-sub-sample-rate", "data_set": "--data-set"}
    for key, flag in flags.items():
        if old.get(key) != new.get(key):
            return f"{flag} was {old.get(key)}, now {new.get(key)}"
    if old.get("format") != new.get("format"):
        return "it was written by another version of this program"
    old_sources = {s["file"]: s for s in old.get("sources", [])}
    for source in new["sources"]:
        before = old_sources.get(source["file"])
        if before is None:
            return f"raw file {source['file']} is new"
        if before != source:
            return f"raw file {source['file']} changed (size or modification time)"
    return "the raw files changed"


def settings_key(data_set, max_ind_range, sub_sample_rate) -> str:
    """Name of the subdirectory holding the processed set of these settings, e.g. kaggle-dictionary,
    terabyte-hash40000000, terabyte-hash10000000-sub0.875."""
    ids = f"hash{int(max_ind_range)}" if max_ind_range > 0 else "dictionary"
    sub = f"-sub{float(sub_sample_rate):g}" if sub_sample_rate > 0 else ""
    return f"{data_set}-{ids}{sub}"


def preprocess(raw_data_file, base_dir, data_set="kaggle", max_ind_range=-1, sub_sample_rate=0.0,
               workers=1, log=print, progress=True) -> ProcessedData:
    """Raw Criteo file(s) -> processed arrays in base_dir/<settings_key>, reusing a matching earlier result.

    `base_dir` may also be one set's own folder (base_dir/<settings_key> of an earlier run): that set is
    read, or rebuilt in place when its raw data changed; other settings than its own are a DataError.
    Processes preprocessing into one `base_dir` take turns (a lock file there): the later one waits, then
    reads what the first built."""
    try:
        if not os.path.isdir(base_dir) and not raw_data_usable(raw_data_file, data_set):  # nothing to build or read
            return _preprocess(raw_data_file, base_dir, data_set, max_ind_range, sub_sample_rate, workers, log,
                               progress)
        with _exclusive(base_dir, log):
            return _preprocess(raw_data_file, base_dir, data_set, max_ind_range, sub_sample_rate, workers, log,
                               progress)
    except OSError as e:  # disk full, permissions, ...
        raise DataError(f"preprocessing into {base_dir} failed: {e.filename or ''}: {e.strerror or e}")


LOCK_FILE = ".preprocessing.lock"


@contextlib.contextmanager
def _exclusive(base_dir, log):
    """Holds an exclusive lock on base_dir's lock file (made with base_dir when missing), waiting for it."""
    import fcntl

    if os.path.isfile(base_dir):  # _preprocess names the problem
        yield
        return
    created = not os.path.isdir(base_dir)
    lock_path = os.path.join(base_dir, LOCK_FILE)
    try:
        os.makedirs(base_dir, exist_ok=True)
        lock = open(lock_path, "a")
    except OSError:  # a read-only folder: a set there can only be read, and nothing needs a turn
        yield
        return
    with lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log(f"Waiting for another process preprocessing into {base_dir}")
            fcntl.flock(lock, fcntl.LOCK_EX)
        except OSError:  # a file system without locks: go on unguarded, as without this lock
            pass
        try:
            yield
        finally:
            if created and os.listdir(base_dir) == [LOCK_FILE]:  # nothing was built: no folder left behind
                with contextlib.suppress(OSError):
                    os.remove(lock_path)
                    os.rmdir(base_dir)


def _preprocess(raw_data_file, base_dir, data_set, max_ind_range, sub_sample_rate, workers, log, progress):
    if data_set not in DAYS:
        raise DataError(f"--data-set={data_set} is not one of {', '.join(DAYS)}")
    if not 0.0 <= sub_sample_rate <= 1.0:
        raise DataError(f"--data-sub-sample-rate must be in [0, 1], got {sub_sample_rate}")
    if os.path.isfile(base_dir):
        split_file = re.match(r"^(.*)_(train|test|val)\.bin$", base_dir)
        if split_file:
            raise DataError(f"--processed-data-file {base_dir}: one of the original's --mlperf-bin-loader files; "
                            f"they are read with --mlperf-bin-loader --data-set=terabyte "
                            f"--processed-data-file={split_file.group(1)}.npz")
        raise DataError(f"--processed-data-file: its folder {base_dir} is a file, not processed data (a directory, "
                        "or the original's .npz); the raw data goes to --raw-data-file")
    own = read_set_metadata(base_dir)
    if own is not None and own["settings"].get("format") == FORMAT:  # one set's own folder, named directly
        out_dir = base_dir
        wanted = settings_for(data_set, [], max_ind_range, sub_sample_rate)
        if not _built_with(own, wanted):
            raise DataError(f"--processed-data-file {base_dir}: holds the processed set of other settings "
                            f"({describe_change(own['settings'], wanted)}); name the folder above it "
                            f"({os.path.dirname(os.path.abspath(base_dir))}) to keep one set per setting")
    else:
        out_dir = os.path.join(base_dir, settings_key(data_set, max_ind_range, sub_sample_rate))
        _adopt_single_set_layout(base_dir, bool(raw_data_file and _raw_data_present(raw_data_file, data_set)), log)
    existing = read_set_metadata(out_dir)
    damage = _damaged_output(out_dir, existing) if existing is not None else None
    if damage:
        if not (raw_data_file and _raw_data_present(raw_data_file, data_set)):
            raise DataError(f"processed data in {out_dir} is damaged ({damage}) "
                            "and the raw data to rebuild it is missing")
        log(f"Rebuilding processed data in {out_dir}: {damage}")
        remove_outputs(out_dir)
        existing = None
    if not (raw_data_file and _raw_data_present(raw_data_file, data_set)):
        wanted = settings_for(data_set, [], max_ind_range, sub_sample_rate)
        if existing is None or not _built_with(existing, wanted):
            others = [m["settings"] for m in map(read_set_metadata, processed_sets(base_dir))
                      if m is not None and m["settings"].get("format") == FORMAT]
            if not others:
                if raw_data_file:
                    raw_day_files(raw_data_file, data_set)  # says which file is missing
                hint = ""
                if os.path.isfile(os.path.join(base_dir, "train.txt")):
                    hint = f" (it holds raw data: --raw-data-file={os.path.join(base_dir, 'train.txt')})"
                elif _day_file(os.path.join(base_dir, "day"), 0):
                    hint = (f" (it holds raw data: --raw-data-file={os.path.join(base_dir, 'day')} "
                            "--data-set=terabyte)")
                raise DataError(f"no processed data in {base_dir} and no --raw-data-file to build it from{hint}")
            raise DataError(f"processed data in {base_dir} was built with other settings "
                            f"({describe_change(others[0], wanted)}); rebuilding it needs the raw data "
                            f"(--raw-data-file {raw_data_file or 'not given'})")
        log(f"Reading pre-processed data={out_dir} (raw data not found: not checked against it)")
        return ProcessedData(out_dir, existing)
    try:
        sources = raw_day_files(raw_data_file, data_set)
    except DataError as missing:  # some raw files gone (removed to free disk once processed?): the set stands
        wanted = settings_for(data_set, [], max_ind_range, sub_sample_rate)
        if existing is None or not _built_with(existing, wanted):
            raise
        log(f"Reading pre-processed data={out_dir} (not checked against the raw data: {missing})")
        return ProcessedData(out_dir, existing)
    settings = settings_for(data_set, sources, max_ind_range, sub_sample_rate)
    if existing is not None:
        if existing.get("settings") == settings:
            log(f"Reading pre-processed data={out_dir}")
            return ProcessedData(out_dir, existing)
        log(f"Rebuilding processed data in {out_dir}: {describe_change(existing['settings'], settings)}")
        remove_outputs(out_dir)
    try:
        return _build(sources, out_dir, settings, workers, log, progress)
    except DataError:  # bad raw data: its unfinished work is of no use (a fixed file is another file)
        remove_outputs(out_dir)
        with contextlib.suppress(OSError):
            os.rmdir(out_dir)  # when empty
        raise


def _built_with(metadata: dict, wanted: dict) -> bool:
    """Whether a set's metadata records the settings `wanted` (settings_for's) apart from the raw files."""
    return all(metadata["settings"].get(k) == wanted[k] for k in wanted if k != "sources")


def read_set_metadata(out_dir):
    """metadata.json of a processed set, or None (none, or not ours)."""
    metadata = load_json(os.path.join(out_dir, "metadata.json"))
    return metadata if isinstance(metadata, dict) and isinstance(metadata.get("settings"), dict) else None


def processed_sets(base_dir) -> list[str]:
    """The settings subdirectories of base_dir that hold a processed set."""
    if not os.path.isdir(base_dir):
        return []
    return sorted(os.path.join(base_dir, name) for name in os.listdir(base_dir)
                  if os.path.isfile(os.path.join(base_dir, name, "metadata.json")))


SINGLE_SET_FORMAT = "dlrm-criteo-processed-v1"  # one set directly in the base directory


def _adopt_single_set_layout(base_dir, can_rebuild: bool, log):
    """Processed data written directly into base_dir by an earlier version moves into its settings'
    subdirectory when its ids are still valid (dictionary ids: missing always had a key of its own);
    hashed ids (missing hashed like a value) are removed, as any stale processed set, when the raw data
    is there to rebuild them (else DataError)."""
    legacy = read_set_metadata(base_dir)
    if legacy is None:
        if os.path.isfile(os.path.join(base_dir, "work", "settings.json")):  # its unfinished work
            shutil.rmtree(os.path.join(base_dir, "work"), ignore_errors=True)
        return
    old = legacy["settings"]
    target = os.path.join(base_dir, settings_key(old.get("data_set"), old.get("max_ind_range", -1),
                                                 old.get("sub_sample_rate", 0.0)))
    if (old.get("format") == SINGLE_SET_FORMAT and old.get("max_ind_range") == -1 and old.get("data_set") in DAYS
            and read_set_metadata(target) is None):
        os.makedirs(target, exist_ok=True)
        old["format"] = FORMAT
        marker = load_json(os.path.join(base_dir, "bin.json"))
        for name in os.listdir(base_dir):
            if OUTPUT_FILE.match(name) and name not in ("metadata.json", "bin.json") and not name.endswith(".tmp"):
                os.replace(os.path.join(base_dir, name), os.path.join(target, name))
        if isinstance(marker, dict):
            marker["settings"] = old
            save_json(os.path.join(target, "bin.json"), marker)
        save_json(os.path.join(target, "metadata.json"), legacy)
        log(f"Moved the processed data in {base_dir} into {target} (one directory per settings)")
    else:
        why = (f"{target} already holds its settings" if read_set_metadata(target) is not None
               else "its ids are stale: missing categoricals were hashed like values")
        if not can_rebuild:
            raise DataError(f"processed data in {base_dir} was written by an earlier version and is not used "
                            f"({why}); rebuilding it needs the raw data (--raw-data-file)")
        log(f"Removing the processed data of an earlier version in {base_dir}: {why}")
    remove_outputs(base_dir)


def _damaged_output(out_dir, metadata):
    """What is wrong with the files that metadata.json lists, or None."""
    processed = ProcessedData(out_dir, metadata)
    path = os.path.join(out_dir, "metadata.json")
    try:
        for day, rows in enumerate(processed.day_rows):
            for kind, row_shape in (("label", ()), ("dense", (NUM_DENSE,)), ("sparse", (NUM_SPARSE,))):
                path = processed.day_file(day, kind)
                array = np.load(path, mmap_mode="r")
                if array.shape != (rows,) + row_shape:
                    return f"{os.path.basename(path)} has shape {array.shape}, not {(rows,) + row_shape}"
    except (OSError, ValueError, KeyError, TypeError) as e:
        return f"{os.path.basename(path)}: {type(e).__name__}: {e}"
    return None


def raw_data_usable(raw_data_file, data_set) -> bool:
    """Whether the raw data can be preprocessed (raw_day_files finds every file)."""
    try:
        return bool(raw_data_file) and bool(raw_day_files(raw_data_file, data_set))
    except DataError:
        return False


def _raw_data_present(raw_data_file, data_set) -> bool:
    if data_set == "kaggle":
        return os.path.exists(raw_data_file)
    return any(os.path.exists(f"{raw_data_file}_{d}{ext}") for d in range(DAYS["terabyte"]) for ext in ("", ".gz"))


def remove_outputs(out_dir, names=OUTPUT_FILE):
    """Removes what a previous run wrote there (only files whose names match `names`: raw day_N files stay)."""
    if not os.path.isdir(out_dir):
        return
    shutil.rmtree(os.path.join(out_dir, "work"), ignore_errors=True)
    metadata = os.path.join(out_dir, "metadata.json")
    if os.path.exists(metadata):
        os.remove(metadata)  # first: an interrupted removal never leaves outputs that look complete
    for name in os.listdir(out_dir):
        if names.match(name):
            os.remove(os.path.join(out_dir, name))


def _build(sources, out_dir, settings, workers, log, progress) -> ProcessedData:
    from tqdm import tqdm

    data_set = settings["data_set"]
    work_dir = os.path.join(out_dir, "work")
    previous = load_json(os.path.join(work_dir, "settings.json"))
    if previous != settings:  # a fresh start: nothing half-done from other settings survives
        if previous is not None:
            log(f"Discarding unfinished preprocessing in {work_dir}: {describe_change(previous, settings)}")
        remove_outputs(out_dir)
        os.makedirs(work_dir, exist_ok=True)
        save_json(os.path.join(work_dir, "settings.json"), settings)
    mode = f"ids hashed into [0, {settings['max_ind_range']})" if settings["max_ind_range"] > 0 else "dictionary ids"
    log(f"Preprocessing {data_set} {', '.join(s['file'] for s in settings['sources'][:2])}"
        f"{' ...' if len(sources) > 2 else ''} -> {out_dir} ({mode}, {workers} process{'es' if workers > 1 else ''})")
    started = time.perf_counter()
    tasks = _day_tasks(sources, data_set, settings, work_dir, progress)

    # phase 1: parse each day into labels, integers, chunk-local categorical ids + each chunk's distinct values
    todo = [t for t in tasks if not _day_parsed(t)]
    fresh = {t.day for t in todo}
    if len(todo) < len(tasks):
        log(f"Resuming: {len(tasks) - len(todo)} of {len(tasks)} days already parsed")
    with tqdm(desc="parse", unit=" rows", unit_scale=True, disable=not progress, mininterval=0.5) as bar:
        run_tasks(_parse_day, todo, workers, bar)
    parsed = [load_json(_marker(t.work_dir, t.day, "parsed")) for t in tasks]
    day_rows = [p["rows"] for p in parsed]
    if parsed[-1]["lines"] == 0:
        raise DataError(f"{tasks[-1].path}: empty file (no rows)"
                        + ("; the last day holds the test and validation rows" if len(tasks) > 1 else ""))
    if sum(p["lines"] for p in parsed[:-1]) == 0:
        raise DataError(f"{tasks[0].path} .. {os.path.basename(tasks[-2].path)}: every training day is empty")

    # phase 2: per categorical feature, number its distinct values
    with tqdm(desc="dictionaries", total=NUM_SPARSE, unit=" features", disable=not progress) as bar:
        run_tasks(_number_feature, [(t, work_dir, out_dir, len(tasks)) for t in range(NUM_SPARSE)], workers, bar)
    counts = [len(np.load(os.path.join(out_dir, f"dictionary_{t}.npy"), mmap_mode="r")) for t in range(NUM_SPARSE)]
    for day in range(len(tasks)):  # numbered: the chunks' distinct values are no longer needed (disk space)
        _remove_if_present(os.path.join(work_dir, f"day_{day}_uniques.npy"))

    # phase 3: chunk-local ids -> global ids
    with tqdm(desc="remap", total=sum(day_rows), unit=" rows", unit_scale=True, disable=not progress,
              mininterval=0.5) as bar:
        run_tasks(_remap_day, [(d, work_dir, out_dir) for d in range(len(tasks)) if not _day_remapped(work_dir, d)],
                  workers, bar)

    metadata = {
        "settings": settings,
        "days": [{"rows": p["rows"], "lines": p["lines"], "source": os.path.basename(t.path)}
                 for p, t in zip(parsed, tasks)],
        "counts": counts,
        "splits": {name: [list(r) for r in ranges] for name, ranges in split_days(day_rows).items()},
        "dense_features": NUM_DENSE,
        "sparse_features": NUM_SPARSE,
        "files": {"label": "day_{day}_label.npy", "dense": "day_{day}_dense.npy", "sparse": "day_{day}_sparse.npy",
                  "dictionary": "dictionary_{feature}.npy"},
    }
    save_json(os.path.join(out_dir, "metadata.json"), metadata)
    shutil.rmtree(work_dir, ignore_errors=True)
    elapsed = time.perf_counter() - started
    lines = sum(p["lines"] for p in parsed)
    parsed_now = sum(p["lines"] for p, t in zip(parsed, tasks) if t.day in fresh)  # a resumed run: its own share
    log(f"Processed {lines} rows ({sum(day_rows)} kept) in {elapsed:.1f} s ({parsed_now / max(elapsed, 1e-9):,.0f} "
        f"rows/s{'' if parsed_now == lines else f' over the {parsed_now} rows parsed by this run'}); "
        f"table sizes {counts}")
    return ProcessedData(out_dir, metadata)


def _day_tasks(sources, data_set, settings, work_dir, progress) -> list[DayTask]:
    from tqdm import tqdm

    rate, max_ind_range = settings["sub_sample_rate"], settings["max_ind_range"]
    last = DAYS[data_set] - 1
    if data_set == "terabyte":
        if os.path.getsize(sources[last]) == 0:  # empty training days are days without rows, as in the original
            raise DataError(f"{sources[last]}: empty file (no rows); the last day holds the test and validation rows")
        return [DayTask(d, path, 0, None, 1, rate if d < last else 0.0, max_ind_range, work_dir)
                for d, path in enumerate(sources)]
    path = sources[0]
    cached = load_json(os.path.join(work_dir, "days.json"))
    if cached is None:
        # a malformed file (commas for tabs, missing fields) is named by file:line before it is counted
        first_block = next(read_line_blocks(path, block_bytes=1 << 16), b"")
        if first_block.strip():
            parse_block(first_block, path, 1)
        with tqdm(desc="count lines", total=os.path.getsize(path), unit="B", unit_scale=True,
                  disable=not progress) as bar:
            total, block_lines, block_sizes = count_lines(path, bar)
        if total == 0:
            raise DataError(f"{path}: empty file (no rows)")
        if total < DAYS["kaggle"]:
            raise DataError(f"{path}: {total} {'row is' if total == 1 else 'rows are'} too few to cut into "
                            f"{DAYS['kaggle']} days")
        sizes = day_sizes(total, DAYS["kaggle"])
        first_lines = np.concatenate([[0], np.cumsum(sizes)]).tolist()
        offsets = line_offsets(path, first_lines[:-1], block_lines, block_sizes) + [os.path.getsize(path)]
        cached = {"first_lines": first_lines, "offsets": offsets}
        save_json(os.path.join(work_dir, "days.json"), cached)
    first_lines, offsets = cached["first_lines"], cached["offsets"]
    return [DayTask(d, path, offsets[d], offsets[d + 1], first_lines[d] + 1, rate if d < last else 0.0,
                    max_ind_range, work_dir) for d in range(DAYS["kaggle"])]


def _remove_if_present(path):
    if os.path.exists(path):
        os.remove(path)


def _marker(work_dir, day, phase):
    return os.path.join(work_dir, f"day_{day}.{phase}.json")


def _day_parsed(task: DayTask) -> bool:
    return load_json(_marker(task.work_dir, task.day, "parsed")) is not None


def _day_remapped(work_dir, day) -> bool:
    return load_json(_marker(work_dir, day, "remapped")) is not None


def _keep_after_sub_sampling(label, day, first_line, rate):
    """Keeps positives and a (1 - rate) share of negatives; a fixed pseudo-random draw per (day, line)."""
    lines = np.arange(first_line, first_line + len(label), dtype=np.uint64)
    u = unit_interval(splitmix64(lines ^ _u64((day + 1) << 40)))
    return (label == 1) | (u >= rate)


def _parse_day(task: DayTask, report):
    import pyarrow as pa
    import pyarrow.compute as pc

    out_dir = os.path.dirname(task.work_dir)
    label = NpyWriter(os.path.join(out_dir, f"day_{task.day}_label.npy"), np.uint8)
    dense = NpyWriter(os.path.join(out_dir, f"day_{task.day}_dense.npy"), np.int32, (NUM_DENSE,))
    local = NpyWriter(os.path.join(task.work_dir, f"day_{task.day}_local.npy"), np.uint16, (NUM_SPARSE,))
    uniques = NpyWriter(os.path.join(task.work_dir, f"day_{task.day}_uniques.npy"), np.int64)
    writers = (label, dense, local, uniques)
    chunks = []  # per chunk: rows, then the number of distinct values of each feature
    line = task.first_line
    try:
        for raw in read_line_blocks(task.path, task.start, task.stop):
            rows = parse_block(raw, task.path, line)
            num_lines = len(rows.label)
            if task.sub_sample_rate > 0:
                rows = rows.select(_keep_after_sub_sampling(rows.label, task.day, line, task.sub_sample_rate))
            line += num_lines
            keys = categorical_keys(rows.categorical, task.max_ind_range)
            local_ids = np.empty((len(rows.label), NUM_SPARSE), dtype=np.uint16)
            sizes = [len(rows.label)]
            for t in range(NUM_SPARSE):
                encoded = pc.dictionary_encode(pa.array(keys[t]))
                local_ids[:, t] = encoded.indices.to_numpy(zero_copy_only=False)
                distinct = encoded.dictionary.to_numpy(zero_copy_only=False)
                uniques.append(distinct)
                sizes.append(len(distinct))
            chunks.append(sizes)
            label.append(rows.label)
            dense.append(rows.dense)
            local.append(local_ids)
            report(num_lines)
    except BaseException:
        for w in writers:
            w.discard()
        raise
    for w in writers:
        w.close()
    save_npy(os.path.join(task.work_dir, f"day_{task.day}_chunks.npy"),
             np.array(chunks, dtype=np.int64).reshape(-1, 1 + NUM_SPARSE))
    save_json(_marker(task.work_dir, task.day, "parsed"), {"rows": label.rows, "lines": line - task.first_line})


def _chunk_segments(work_dir, day):
    """(rows per chunk, start of each (chunk, feature) segment in the uniques file, its length)."""
    chunks = np.load(os.path.join(work_dir, f"day_{day}_chunks.npy"))
    sizes = chunks[:, 1:]
    starts = (np.cumsum(sizes.reshape(-1)) - sizes.reshape(-1)).reshape(sizes.shape)
    return chunks[:, 0], starts, sizes


class Numbering:
    """Numbers the distinct values of a stream of pieces densely 0, 1, 2, ...: the values new in a
    piece get the next ids (grouped by a hash of the value, each group in order of first appearance).

    pyarrow's hash-based dictionary encoding does the work. Values are split by a hash into
    `groups` (a power of 2) so that each hash table stays small enough for the cache; a value
    always falls in the same group, so a group only re-reads its own values from earlier pieces.
    Memory: the distinct values and one piece."""

    def __init__(self, groups=1):
        self.groups = int(groups)
        self.shift = _u64(64 - (self.groups.bit_length() - 1))
        self.known = [np.empty(0, dtype=np.int64)] * self.groups  # distinct values of each group ...
        self.known_ids = [np.empty(0, dtype=np.int64)] * self.groups  # ... and their ids
        self.new_values = []  # the values of ids 0, 1, 2, ... in pieces
        self.count = 0

    def add(self, values) -> np.ndarray:
        """The id (int32) of each of `values` (int64)."""
        import pyarrow as pa
        import pyarrow.compute as pc

        if self.groups > 1:
            group = (splitmix64(values.view(np.uint64)) >> self.shift).astype(np.uint8)
            order = np.argsort(group, kind="stable")  # a radix sort: linear time
            bounds = np.concatenate([[0], np.cumsum(np.bincount(group, minlength=self.groups))])
            values = values[order]
        else:
            bounds = [0, len(values)]
        ids = np.empty(len(values), dtype=np.int32)
        for g in range(self.groups):
            known = self.known[g]
            encoded = pc.dictionary_encode(pa.array(np.concatenate([known, values[bounds[g] : bounds[g + 1]]])))
            union = encoded.dictionary.to_numpy(zero_copy_only=False)  # starts with `known`, in order
            new = union[len(known) :]
            self.known_ids[g] = np.concatenate([self.known_ids[g], np.arange(self.count, self.count + len(new))])
            self.known[g] = union
            self.new_values.append(new)
            self.count += len(new)
            indices = encoded.indices.to_numpy(zero_copy_only=False)[len(known) :]
            ids[bounds[g] : bounds[g + 1]] = self.known_ids[g][indices]
        if self.groups > 1:
            ids[order] = ids.copy()
        return ids

    def dictionary(self) -> np.ndarray:
        return np.concatenate(self.new_values) if self.new_values else np.empty(0, dtype=np.int64)


def _number_feature(job, report):
    """Phase 2 for one feature: global ids of every chunk's distinct values, and the dictionary."""
    feature, work_dir, out_dir, num_days = job
    dictionary_path = os.path.join(out_dir, f"dictionary_{feature}.npy")
    if not os.path.exists(dictionary_path):
        segments = [_chunk_segments(work_dir, day) for day in range(num_days)]
        total = sum(int(sizes[:, feature].sum()) for _, _, sizes in segments)
        groups = min(256, 1 << max(0, math.ceil(math.log2(max(1, total / GROUP_VALUES)))))
        numbering = Numbering(groups)
        ids = NpyWriter(os.path.join(work_dir, f"ids_{feature}.npy"), np.int32)
        piece, piece_size = [], 0
        for day, (_, starts, sizes) in enumerate(segments):
            uniques = np.load(os.path.join(work_dir, f"day_{day}_uniques.npy"), mmap_mode="r")
            for start, size in zip(starts[:, feature], sizes[:, feature]):
                piece.append(uniques[start : start + size])
                piece_size += size
                # pieces at least as large as the dictionary: re-reading it costs at most as much as the piece
                if piece_size >= max(PIECE_VALUES, numbering.count):
                    ids.append(numbering.add(np.concatenate(piece)))
                    piece, piece_size = [], 0
        ids.append(numbering.add(np.concatenate(piece) if piece else np.empty(0, dtype=np.int64)))
        ids.close()
        save_npy(dictionary_path, numbering.dictionary())
    report(1)


def _remap_day(job, report):
    """Phase 3 for one day: chunk-local ids -> global ids (a gather per chunk and feature)."""
    day, work_dir, out_dir = job
    global_ids = [np.load(os.path.join(work_dir, f"ids_{t}.npy"), mmap_mode="r") for t in range(NUM_SPARSE)]
    local = np.load(os.path.join(work_dir, f"day_{day}_local.npy"), mmap_mode="r")
    rows, starts, sizes = _chunk_segments(work_dir, day)
    # where this day's segments start in each feature's ids file: after all earlier days' segments
    base = sum((_chunk_segments(work_dir, d)[2].sum(axis=0) for d in range(day)), np.zeros(NUM_SPARSE, np.int64))
    within = np.cumsum(sizes, axis=0) - sizes
    sparse = NpyWriter(os.path.join(out_dir, f"day_{day}_sparse.npy"), np.int32, (NUM_SPARSE,))
    try:
        first = 0
        for c in range(len(rows)):
            chunk_local = np.asarray(local[first : first + rows[c]])
            ids = np.empty(chunk_local.shape, dtype=np.int32)
            for t in range(NUM_SPARSE):
                lo = base[t] + within[c, t]
                ids[:, t] = np.asarray(global_ids[t][lo : lo + sizes[c, t]])[chunk_local[:, t]]
            sparse.append(ids)
            first += rows[c]
            report(int(rows[c]))
    except BaseException:
        sparse.discard()
        raise
    sparse.close()
    save_json(_marker(work_dir, day, "remapped"), {"rows": int(first)})
    del local
    _remove_if_present(os.path.join(work_dir, f"day_{day}_local.npy"))


_worker_progress = None  # in pool processes: a shared counter the parent turns into progress


def _init_worker(counter, parent_pid):
    global _worker_progress
    _worker_progress = counter
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # a worker forked from the trainer: not its unwinding handler
    _exit_with_parent(parent_pid)


def _exit_with_parent(parent_pid):
    """Has Linux kill this worker when its parent dies (killed, out of memory, a scheduler's cancel): a pool worker
    outlives it otherwise, holding the parent's pipes open. `parent_pid`: the pool's process, the worker's parent
    under the fork and spawn start methods; under forkserver the parent is the fork server, which lives on while
    workers hold its pipe, so a thread watches the pool's process instead. Elsewhere nothing is done."""
    import ctypes
    import signal

    PR_SET_PDEATHSIG = 1
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0) != 0:
            return
    except (OSError, AttributeError):  # not Linux
        return
    import multiprocessing
    import threading
    import time

    if multiprocessing.get_start_method() != "forkserver":
        if os.getppid() != parent_pid:
            os._exit(1)  # the parent died before the request took effect
        return

    def watch():  # the fork server outlives the pool's process: look for that process itself
        while True:
            try:
                os.kill(parent_pid, 0)
            except ProcessLookupError:
                os._exit(1)
            except PermissionError:  # alive, another user's: cannot be ours
                pass
            time.sleep(0.5)

    threading.Thread(target=watch, daemon=True, name="exit-with-parent").start()


def _report_to_parent(n):
    with _worker_progress.get_lock():
        _worker_progress.value += n


def _call_in_worker(fn, job):
    return fn(job, _report_to_parent)


def run_tasks(fn, jobs, workers, bar):
    """fn(job, report) for each job: in this process, or in a pool of `workers` processes."""
    if workers <= 1 or len(jobs) <= 1:
        for job in jobs:
            fn(job, bar.update)
        return
    import multiprocessing as mp
    from concurrent.futures import FIRST_EXCEPTION, ProcessPoolExecutor, wait

    from concurrent.futures.process import BrokenProcessPool

    counter = mp.Value("q", 0)
    reported = 0
    with ProcessPoolExecutor(min(workers, len(jobs)), initializer=_init_worker, initargs=(counter, os.getpid())) as pool:
        pending = [pool.submit(_call_in_worker, fn, job) for job in jobs]
        while pending:
            done, pending = wait(pending, timeout=0.3, return_when=FIRST_EXCEPTION)
            bar.update(counter.value - reported)
            reported = counter.value
            for f in done:
                if f.exception() is not None:
                    for other in pending:
                        other.cancel()
                    if isinstance(f.exception(), BrokenProcessPool):
                        raise DataError("a preprocessing process died (out of memory?); rerun to resume")
                    raise f.exception()


# ============================================================================ other formats
def npz_problem(error: Exception) -> str:
    """Why np.load could not read an .npz, in a few words: NumPy takes a file that is not a zip archive for a
    pickle and advises loading it unsafely, which is not what to do with a damaged data file."""
    if isinstance(error, ValueError) and "allow_pickle" in str(error):
        return "not a NumPy .npz archive"
    if isinstance(error, KeyError) and error.args:
        return f"KeyError: {error.args[0]}"
    return f"{type(error).__name__}: {error}"


def original_stem(raw_data_file: str, data_set: str) -> str:
    """Where the original writes its files for this raw data: `<raw>` for Terabyte's day files, `<raw dir>/<raw
    name up to its first dot>` for Kaggle's train.txt (`<stem>_day_count.npz`, `<stem>_fea_count.npz`, ...)."""
    name = os.path.basename(raw_data_file)
    return os.path.join(os.path.dirname(raw_data_file), name.split(".")[0] if data_set == "kaggle" else name)


def original_day_counts(raw_data_file: str, data_set: str) -> tuple[str | None, list[int] | None]:
    """(path, rows of each day) of the original's day count file beside the raw data (`<raw>_day_count.npz`,
    for Kaggle `<raw name up to its first dot>_day_count.npz`); the rows are None when it does not exist
    (path None without a raw data file). DataError when it is not DAYS[data_set] counts, the last (the
    test day) not empty."""
    if not raw_data_file:
        return None, None
    count_file = original_stem(raw_data_file, data_set) + "_day_count.npz"
    if not os.path.exists(count_file):
        return count_file, None
    try:
        with np.load(count_file) as data:
            sizes = np.asarray(data["total_per_file"])
    except (OSError, ValueError, KeyError, EOFError, zlib.error, zipfile.BadZipFile) as e:
        raise DataError(f"{count_file}: not a readable day count file ({npz_problem(e)})")
    if sizes.ndim != 1 or sizes.dtype.kind not in "iu" or (sizes < 0).any():
        raise DataError(f"{count_file}: total_per_file should be the rows of each day (integers, none "
                        f"negative), found {sizes.dtype} {sizes.shape}")
    if len(sizes) != DAYS[data_set] or sizes[-1] == 0:
        last = int(sizes[-1]) if len(sizes) else 0
        raise DataError(f"{count_file}: {data_set} data has {DAYS[data_set]} days, the last one the test "
                        f"day (not empty); found {len(sizes)} day counts, the last {last}")
    return count_file, [int(n) for n in sizes]


def load_original_npz(path, raw_data_file="", data_set="kaggle", sub_sample_rate=0.0, note=print):
    """The original's processed file (X_int, X_cat, y, counts) and its day sizes.

    Day sizes come from the original's <raw>_day_count.npz when present (DataError when it counts
    other rows), else for Kaggle the original's cut of all rows into equal consecutive days (said through
    `note`); Terabyte's days differ, and so do sub-sampled Kaggle data's (`sub_sample_rate` > 0), so
    without the file it is a DataError."""
    try:
        with np.load(path) as data:
            missing = [k for k in ("X_int", "X_cat", "y", "counts") if k not in data.files]
            if missing:
                raise DataError(f"--processed-data-file {path}: not an original processed file "
                                f"(no {', '.join(missing)})")
            X_int, X_cat, y, counts = data["X_int"], data["X_cat"], data["y"], data["counts"]
    except (OSError, ValueError, EOFError, zlib.error, zipfile.BadZipFile) as e:  # truncated, not a zip
        raise DataError(f"--processed-data-file {path}: not a readable .npz ({npz_problem(e)})")
    if not (X_int.ndim == 2 and X_cat.ndim == 2 and y.ndim == 1 and len(X_int) == len(X_cat) == len(y)
            and X_int.shape[1] == NUM_DENSE and X_cat.shape[1] == NUM_SPARSE):
        raise DataError(f"--processed-data-file {path}: X_int {X_int.shape}, X_cat {X_cat.shape}, y {y.shape} "
                        f"do not fit together (rows of {NUM_DENSE} integers and {NUM_SPARSE} categoricals)")
    if counts.shape != (X_cat.shape[1],):
        raise DataError(f"--processed-data-file {path}: counts {counts.shape} should hold one table size per "
                        f"categorical column ({X_cat.shape[1]})")
    count_file, days = original_day_counts(raw_data_file, data_set)
    if days is not None and sum(days) != len(y):
        raise DataError(f"{count_file}: its days hold {sum(days)} rows, {path} holds {len(y)}: the day counts "
                        "of other data")
    if days is None and (data_set == "terabyte" or sub_sample_rate > 0):
        # unequal days (sub-sampling shortens the training days): an equal cut would test on other days' rows
        where = count_file or ("<prefix>_day_count.npz beside the raw day files" if data_set == "terabyte"
                               else "<raw name>_day_count.npz beside the raw train.txt")
        which = "Terabyte data" if data_set == "terabyte" else f"data of --data-sub-sample-rate={sub_sample_rate:g}"
        raw = "<prefix of the raw day files>" if data_set == "terabyte" else "<the raw train.txt>"
        raise DataError(f"--processed-data-file {path}: the original's {which} is cut into its days by the "
                        f"original's day counts ({where}), not found; give --raw-data-file={raw} where that file "
                        "lies")
    if days is None:  # Kaggle's days are the original's equal cut of train.txt
        days = day_sizes(len(y), DAYS[data_set])
        where = count_file or "<raw name>_day_count.npz beside the raw train.txt, given --raw-data-file"
        note(f"note: {path}: without the original's day counts ({where}) its {len(y)} rows are cut into "
             f"{DAYS[data_set]} equal days, as the original cut train.txt: right for data processed without "
             "--data-sub-sample-rate")
    dense = np.maximum(X_int, 0).astype(np.int32, copy=False)
    return np.asarray(y).astype(np.uint8), dense, X_cat.astype(np.int32, copy=False), [int(c) for c in counts], days


def original_bin_files(processed_data_file: str, raw_data_file: str, data_set: str) -> dict | None:
    """The original's --mlperf-bin-loader files of Criteo Terabyte (its --memory-map --mlperf-logging flow), or
    None when there are none: split -> path of `<folder>/<stem>_train.bin` and `_test.bin` (`_val.bin` when
    present), where `<stem>` is --processed-data-file's name up to its first dot, and "counts" ->
    `<raw>_fea_count.npz` (the table sizes). DataError when only some of them exist."""
    if data_set != "terabyte" or not processed_data_file.rstrip("/"):
        return None
    folder, name = os.path.split(processed_data_file.rstrip("/"))
    stem = os.path.join(folder, name.split(".")[0])
    files = {split: f"{stem}_{split}.bin" for split in ("train", "test", "val")}
    found = [path for path in files.values() if os.path.exists(path)]
    if not found:
        return None
    missing = next((path for split, path in files.items() if split != "val" and not os.path.exists(path)), None)
    if missing:
        raise DataError(f"--processed-data-file {processed_data_file}: the original's --mlperf-bin-loader file "
                        f"{missing} is missing (found {', '.join(found)}): restore it, or move the original's .bin "
                        "files away to preprocess the raw day files instead")
    if not os.path.exists(files["val"]):
        del files["val"]
    files["counts"] = f"{raw_data_file}_fea_count.npz"
    if not raw_data_file or not os.path.exists(files["counts"]):
        raise DataError(f"--processed-data-file {processed_data_file}: the original's {files['train']} needs its "
                        f"table sizes, <raw>_fea_count.npz"
                        + (f" ({files['counts']} not found)" if raw_data_file else "")
                        + ": give --raw-data-file=<the prefix of the raw day files the original was given>")
    return files


def original_table_sizes(path) -> np.ndarray:
    """The `counts` of the original's `<raw>_fea_count.npz`: 26 positive integers, the size of each table
    (before --max-ind-range folds them). DataError when the file is not that."""
    try:
        with np.load(path) as data:
            counts = np.asarray(data["counts"])
    except (OSError, ValueError, KeyError, EOFError, zlib.error, zipfile.BadZipFile) as e:
        raise DataError(f"{path}: not the original's table sizes file ({npz_problem(e)})")
    if counts.shape != (NUM_SPARSE,) or counts.dtype.kind not in "iu" or (counts <= 0).any():
        raise DataError(f"{path}: counts should be {NUM_SPARSE} positive integers (one table size per "
                        f"categorical feature), found {counts.dtype} {counts.shape}")
    return counts


def read_original_bin_files(files: dict, splits=("train", "test"), max_ind_range=-1,
                            checked_rows=256) -> tuple[dict, list[int]]:
    """(split -> rows, table sizes) of the original's --mlperf-bin-loader files (`original_bin_files`) of
    `splits`: int32 records [label, 13 integers, 26 ids], and the `counts` of its fea_count.npz, at most
    `max_ind_range` when it is above 0 (the original folds the ids into it when they are used). DataError (one
    line) when a split has no file, a file is not a whole number of records, the training or test file is
    empty, the counts are not 26 positive integers, or an id of `checked_rows` rows spread over each file lies
    outside its table."""
    record = 4 * NUM_FIELDS
    rows = {}
    for split in splits:
        path = files.get(split)
        if path is None:
            raise DataError(f"the original's {split} split is not there ({files['train'][:-len('train.bin')]}"
                            f"{split}.bin)")
        if not os.path.isfile(path):
            raise DataError(f"{path}: not a file")
        size = os.path.getsize(path)
        if size % record:
            raise DataError(f"{path}: {size} bytes is not a whole number of {record}-byte records (label, "
                            f"{NUM_DENSE} integers, {NUM_SPARSE} ids as int32): truncated?")
        rows[split] = size // record
    empty = next((files[split] for split in ("train", "test") if rows.get(split) == 0), None)
    if empty:
        raise DataError(f"{empty}: empty")
    counts = original_table_sizes(files["counts"])
    tables = np.minimum(counts, max_ind_range) if max_ind_range > 0 else counts
    for split, n in rows.items():
        records = np.memmap(files[split], dtype=np.int32, mode="r").reshape(-1, NUM_FIELDS)
        sampled = np.unique(np.linspace(0, n - 1, min(n, checked_rows)).astype(np.int64))
        ids = records[sampled, 1 + NUM_DENSE :].astype(np.int64)
        if max_ind_range > 0:
            ids %= max_ind_range
        outside = np.argwhere((ids < 0) | (ids >= tables))
        if len(outside):
            k, t = outside[0]
            raise DataError(f"{files[split]}: row {sampled[k]} holds id {ids[k, t]} of categorical feature {t}, "
                            f"outside the {tables[t]} rows of its table by {files['counts']}: the table sizes "
                            "of other data?")
    return rows, [int(c) for c in tables]


def write_bin_files(processed: ProcessedData, log=print) -> dict:
    """The one-file-per-split binary format (int32 records [label, 13 integers, 26 ids]) of the
    original's --mlperf-bin-loader, built once from the processed days; returns split -> path."""
    paths = {split: os.path.join(processed.out_dir, f"{split}.bin") for split in ("train", "test", "val")}
    splits = split_days(processed.day_rows)
    sizes = {split: 4 * NUM_FIELDS * sum(stop - start for _, start, stop in ranges) for split, ranges in splits.items()}
    stamp = {"settings": processed.metadata["settings"], "days": processed.metadata["days"]}
    marker = os.path.join(processed.out_dir, "bin.json")
    if load_json(marker) == stamp:
        found = {split: os.path.getsize(p) if os.path.isfile(p) else None for split, p in paths.items()}
        if found == sizes:
            return paths
        damaged = [split for split, size in found.items() if size is not None and size != sizes[split]]
        if damaged:
            log(f"Rewriting the --mlperf-bin-loader files: {paths[damaged[0]]} holds {found[damaged[0]]} bytes, not "
                f"the {sizes[damaged[0]]} of its rows")
    log(f"Writing {', '.join(paths.values())}")
    tmp = None
    try:
        _remove_if_present(marker)
        for split, ranges in splits.items():
            tmp = paths[split] + ".tmp"
            with open(tmp, "wb") as f:
                for day, start, stop in ranges:
                    label = np.load(processed.day_file(day, "label"), mmap_mode="r")
                    dense = np.load(processed.day_file(day, "dense"), mmap_mode="r")
                    sparse = np.load(processed.day_file(day, "sparse"), mmap_mode="r")
                    for lo in range(start, stop, 1 << 18):
                        hi = min(stop, lo + (1 << 18))
                        records = np.empty((hi - lo, NUM_FIELDS), dtype=np.int32)
                        records[:, 0] = label[lo:hi]
                        records[:, 1 : 1 + NUM_DENSE] = dense[lo:hi]
                        records[:, 1 + NUM_DENSE :] = sparse[lo:hi]
                        f.write(records.data)
            os.replace(tmp, paths[split])
            tmp = None
        save_json(marker, stamp)
    except OSError as e:  # disk full, a file size limit, a read-only folder
        if tmp is not None:
            _remove_if_present(tmp)
        raise DataError(f"writing the --mlperf-bin-loader files into {processed.out_dir} failed: "
                        f"{e.filename or tmp or ''}: {e.strerror or e}")
    return paths


# ============================================================================ the original's --memory-map files
ORIGINAL_REORDERED_FORMAT = "dlrm-original-reordered-v1"
CONVERT_ROWS = 1 << 16  # rows decompressed and checked per step


def original_reordered_files(raw_data_file: str, data_set: str) -> dict | None:
    """The original's --memory-map output for the raw data `raw_data_file`:
    "days" -> its `<prefix>_<d>_reordered.npz` of each day (prefix `<raw>` for Terabyte, `<raw dir>/<raw name up to
    its first dot>_day` for Kaggle), "counts" -> `<stem>_fea_count.npz` (original_stem), "missing" -> the first of
    these not found (None when all are there), "raw" -> `raw_data_file`; None when none of its days is there."""
    if not raw_data_file or data_set not in DAYS:
        return None
    stem = original_stem(raw_data_file, data_set)
    prefix = stem + "_day" if data_set == "kaggle" else stem
    days = [f"{prefix}_{d}_reordered.npz" for d in range(DAYS[data_set])]
    if not any(os.path.isfile(day) for day in days):
        return None
    files = {"days": days, "counts": stem + "_fea_count.npz", "prefix": prefix, "raw": raw_data_file}
    files["missing"] = next((p for p in days + [files["counts"]] if not os.path.isfile(p)), None)
    return files


def read_original_reordered(files: dict, data_set: str, out_dir: str, log=print, progress=False) -> ProcessedData:
    """The original's --memory-map day files (`original_reordered_files`) as a processed set, converted once into
    `out_dir`: day_<d>_{label,dense,sparse}.npy as our preprocessing writes them, read
    memory-mapped (its files are compressed .npz, which cannot be), in bounded memory (CONVERT_ROWS rows at a time).
    Rows stay in the files' order; ids as the files hold them (its dictionaries' ids, below its counts; the
    original folds them by --max-ind-range when used). A rerun reuses the conversion while the original's files
    are unchanged (size and modification time). DataError (one line) when one is missing or damaged, or holds
    what the original's preprocessing does not write (a label not 0/1, a value that is not an integer, an id
    outside its table), or when the days' rows differ from its `<stem>_day_count.npz`."""
    if files["missing"]:
        raise DataError(f"the original's --memory-map files of {files['raw']} are incomplete: {files['missing']} not "
                        f"found (its days are {files['days'][0]} .. {os.path.basename(files['days'][-1])})")
    count_file, day_counts = original_day_counts(files["raw"], data_set)
    sources = files["days"] + [files["counts"]] + ([count_file] if day_counts is not None else [])
    settings = {"format": ORIGINAL_REORDERED_FORMAT, "data_set": data_set,
                "sources": [source_identity(p) for p in sources]}
    existing = read_set_metadata(out_dir)
    if existing is not None and existing["settings"] == settings and _damaged_output(out_dir, existing) is None:
        return ProcessedData(out_dir, existing)  # (also from a read-only folder)
    try:
        os.makedirs(out_dir, exist_ok=True)
        with _exclusive(out_dir, log):
            existing = read_set_metadata(out_dir)  # converted meanwhile by another process?
            if existing is not None and existing["settings"] == settings and _damaged_output(out_dir, existing) is None:
                return ProcessedData(out_dir, existing)
            if existing is not None:
                log(f"Converting again into {out_dir}: {_conversion_change(out_dir, existing, settings)}")
            try:
                return _convert_original_reordered(files, out_dir, settings, day_counts, count_file, log, progress)
            except (DataError, OSError):  # a damaged or foreign file, a full disk: nothing half-converted stays
                with contextlib.suppress(OSError):
                    remove_outputs(out_dir)
                raise
    except OSError as e:  # disk full, a read-only folder
        raise DataError(f"converting the original's --memory-map files into {out_dir} failed: "
                        f"{e.filename or ''}: {e.strerror or e} (--processed-data-file=<folder>/<name>.npz converts "
                        "them into <folder>/<name>/)")


def _conversion_change(out_dir: str, existing: dict, settings: dict) -> str:
    """Why a conversion of the original's files is made again."""
    if existing["settings"] == settings:
        return _damaged_output(out_dir, existing) or "its files are damaged"
    before = {s["file"]: s for s in existing["settings"].get("sources", [])}
    changed = next((s["file"] for s in settings["sources"] if before.get(s["file"]) != s), None)
    return f"{changed} changed (size or modification time)" if changed else "the original's files changed"


def _convert_original_reordered(files, out_dir, settings, day_counts, count_file, log, progress) -> ProcessedData:
    from tqdm import tqdm

    counts = original_table_sizes(files["counts"])
    remove_outputs(out_dir)
    log(f"Converting the original's --memory-map files {files['days'][0]} .. {os.path.basename(files['days'][-1])} "
        f"into {out_dir} (once: read memory-mapped from there)")
    day_rows = []
    with tqdm(desc="convert", unit=" rows", unit_scale=True, disable=not progress, mininterval=0.5) as bar:
        for day, path in enumerate(files["days"]):
            day_rows.append(_convert_original_day(path, day, out_dir, counts, files["counts"], bar))
    if day_counts is not None and day_counts != day_rows:
        day = next(d for d, (a, b) in enumerate(zip(day_counts, day_rows)) if a != b)
        raise DataError(f"{count_file}: day {day} has {day_counts[day]} rows by it, {files['days'][day]} holds "
                        f"{day_rows[day]}: the day counts of other data")
    if day_rows[-1] == 0:
        raise DataError(f"{files['days'][-1]}: no rows (the last day holds the test and validation rows)")
    metadata = {
        "settings": settings,
        "days": [{"rows": rows, "source": os.path.basename(p)} for rows, p in zip(day_rows, files["days"])],
        "counts": [int(c) for c in counts],
        "splits": {name: [list(r) for r in ranges] for name, ranges in split_days(day_rows).items()},
        "dense_features": NUM_DENSE,
        "sparse_features": NUM_SPARSE,
        "files": {"label": "day_{day}_label.npy", "dense": "day_{day}_dense.npy", "sparse": "day_{day}_sparse.npy"},
    }
    save_json(os.path.join(out_dir, "metadata.json"), metadata)
    return ProcessedData(out_dir, metadata)


def _convert_original_day(path, day, out_dir, counts, counts_file, bar) -> int:
    """One day file of the original's --memory-map output (y, X_int, X_cat, float64 as it writes them) ->
    day_<day>_{label,dense,sparse}.npy in out_dir; returns its rows."""
    outputs = (("y", "label", np.uint8, ()), ("X_int", "dense", np.int32, (NUM_DENSE,)),
               ("X_cat", "sparse", np.int32, (NUM_SPARSE,)))
    rows = {}
    try:
        with zipfile.ZipFile(path) as archive:
            names = set(archive.namelist())
            missing = [name for name, *_ in outputs if name + ".npy" not in names]
            if missing:
                raise DataError(f"{path}: not one of the original's --memory-map day files (no {', '.join(missing)})")
            for name, kind, dtype, row_shape in outputs:
                writer = NpyWriter(os.path.join(out_dir, f"day_{day}_{kind}.npy"), dtype, row_shape)
                try:
                    for first, block in _npz_member_blocks(archive, path, name, row_shape):
                        writer.append(_checked_values(block, kind, path, name, first, counts, counts_file))
                        if kind == "label":
                            bar.update(len(block))
                    writer.close()
                except BaseException:
                    writer.discard()
                    raise
                rows[name] = writer.rows
    except (zipfile.BadZipFile, zlib.error, EOFError, ValueError) as e:
        raise DataError(f"{path}: not a readable .npz ({npz_problem(e)})")
    if len(set(rows.values())) > 1:
        raise DataError(f"{path}: y, X_int and X_cat hold {rows['y']}, {rows['X_int']} and {rows['X_cat']} rows")
    return rows["y"]


def _npz_member_blocks(archive, path, name, row_shape, block_rows=CONVERT_ROWS):
    """(first row, rows) blocks of the array `name` of an open .npz archive (compressed or not), decompressed
    as they are read."""
    with archive.open(name + ".npy") as f:
        version = np.lib.format.read_magic(f)
        read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, fortran_order, dtype = read_header(f)
        if dtype.kind not in "buif" or len(shape) != 1 + len(row_shape) or tuple(shape[1:]) != row_shape:
            what = f"rows of {row_shape[0]} numbers" if row_shape else "one number per row"
            raise DataError(f"{path}: {name} is {dtype} {shape}, not {what}: not one of the original's --memory-map "
                            "day files")
        row_bytes = dtype.itemsize * int(np.prod(row_shape, dtype=np.int64))
        if fortran_order and row_shape:  # columns first: read whole (NumPy writes C order unless asked)
            data = f.read()
            whole = np.frombuffer(data, dtype=dtype, count=len(data) // dtype.itemsize)
            if whole.size != int(np.prod(shape)):
                raise DataError(f"{path}: {name} is truncated")
            whole = whole.reshape(shape, order="F")
            for first in range(0, shape[0], block_rows):
                yield first, np.ascontiguousarray(whole[first : first + block_rows])
            return
        for first in range(0, shape[0], block_rows):
            n = min(block_rows, shape[0] - first)
            data = f.read(n * row_bytes)
            if len(data) != n * row_bytes:
                raise DataError(f"{path}: {name} is truncated (row {first + len(data) // max(row_bytes, 1)} of "
                                f"{shape[0]})")
            yield first, np.frombuffer(data, dtype=dtype).reshape((n,) + row_shape)


def _checked_values(block, kind, path, name, first, counts, counts_file):
    """A block of labels, integers or ids as our processed files hold them (uint8 0/1, int32 >= 0, int32 ids
    below their table's size); DataError naming the row of the first value that is not that."""
    def fail(bad, what):
        at = tuple(np.argwhere(bad)[0])
        column = f", column {at[1]}" if len(at) > 1 else ""
        raise DataError(f"{path}: {name} row {first + at[0]}{column} holds {block[at].item()!r}, {what}")

    if block.dtype.kind == "f":
        bad = ~np.isfinite(block) | (block != np.trunc(block))
        if bad.any():
            fail(bad, "not an integer")
    if kind == "label":
        bad = (block != 0) & (block != 1)
        if bad.any():
            fail(bad, "not a click label (0 or 1)")
        return block.astype(np.uint8)
    if kind == "dense":
        block = np.maximum(block, 0)  # as the original's processed files (negative integers -> 0)
        bad = block > INT32_MAX
        if bad.any():
            fail(bad, f"above {INT32_MAX}")
        return block.astype(np.int32)
    bad = (block < 0) | (block >= counts)
    if bad.any():
        fail(bad, f"outside its table of {counts[np.argwhere(bad)[0][1]]} rows by {counts_file}: the table sizes "
                  "of other data?")
    return block.astype(np.int32)


# ============================================================================ multi-hot data
MULTI_HOT_FORMAT = "dlrm-criteo-multihot-v1"
MULTI_HOT_FILE = re.compile(r"^(day_\d+_(label|dense|multihot)\.npy|metadata\.json|work\.json)(\.tmp)?$")
MULTI_HOT_CHUNK_ROWS = 1 << 16  # rows expanded per step: bounded memory (~ 64k x sum(sizes) x 8 bytes)


def read_multi_hot_metadata(path: str):
    """metadata.json of a materialized multi-hot set in directory `path`, or None (none, or not one)."""
    metadata = load_json(os.path.join(path, "metadata.json")) if os.path.isdir(path) else None
    return metadata if isinstance(metadata, dict) and metadata.get("format") == MULTI_HOT_FORMAT else None


def unfinished_multi_hot(path: str) -> bool:
    """Whether directory `path` holds a multi-hot set whose writing was interrupted (work.json, no metadata.json)."""
    return os.path.isfile(os.path.join(path, "work.json")) and read_multi_hot_metadata(path) is None


def multi_hot_damage(processed: ProcessedData):
    """What is wrong with the day files of a multi-hot set, or None."""
    for day in range(len(processed.day_rows)):
        problem = _multi_hot_day_damage(processed, day)
        if problem:
            return problem
    return None


def _multi_hot_day_damage(processed: ProcessedData, day: int):
    rows, width = processed.day_rows[day], sum(processed.metadata["multi_hot"]["sizes"])
    for kind, row_shape in (("label", ()), ("dense", (NUM_DENSE,)), ("multihot", (width,))):
        path = processed.day_file(day, kind)
        try:
            shape = np.load(path, mmap_mode="r").shape
        except (OSError, ValueError) as e:
            return f"{os.path.basename(path)}: {e.strerror if isinstance(e, OSError) and e.strerror else e}"
        if shape != (rows,) + row_shape:
            return f"{os.path.basename(path)} has shape {shape}, not {(rows,) + row_shape}"
    return None


def write_multi_hot(processed: ProcessedData, out_dir: str, multi_hot, log=print, progress=False,
                    chunk_rows: int | None = None) -> ProcessedData:
    """Writes the multi-hot expansion (`dlrmkit.multihot.MultiHot`) of a processed one-hot set to `out_dir`.

    Per day: day_<d>_label.npy, day_<d>_dense.npy (copies) and day_<d>_multihot.npy int32
    [rows, sum(sizes)] (each row's bags side by side, table after table), written `chunk_rows` rows
    at a time (default MULTI_HOT_CHUNK_ROWS) under temporary names and renamed when complete; metadata.json (the multi-hot settings,
    the source set's settings, table sizes, day sizes) last. A rerun with the same settings reuses the
    result, an interrupted one resumes with its finished days (work.json records what they are for).
    Raises DataError for an output directory that holds other files."""
    metadata = {"format": MULTI_HOT_FORMAT, "multi_hot": multi_hot.settings(), "source": processed.metadata["settings"],
                "counts": list(processed.counts), "days": [{"rows": int(r)} for r in processed.day_rows],
                "dense_features": NUM_DENSE, "sparse_features": NUM_SPARSE}
    result = ProcessedData(out_dir, metadata)
    check_multi_hot_out(out_dir, processed.out_dir)
    os.makedirs(out_dir, exist_ok=True)
    existing = load_json(os.path.join(out_dir, "metadata.json"))
    if existing == metadata and multi_hot_damage(result) is None:
        log(f"Multi-hot data in {out_dir} is already written with these settings")
        return result
    work = os.path.join(out_dir, "work.json")
    if existing is not None or load_json(work) != metadata:  # nothing of other settings survives
        remove_outputs(out_dir, MULTI_HOT_FILE)
    save_json(work, metadata)
    sizes, chunk_rows = multi_hot.sizes, chunk_rows or MULTI_HOT_CHUNK_ROWS
    log(f"Writing multi-hot data ({multi_hot.distribution}, {sum(sizes)} ids per sample) from {processed.out_dir} "
        f"-> {out_dir}")
    from tqdm import tqdm

    todo = [d for d in range(len(processed.day_rows)) if _multi_hot_day_damage(result, d) is not None]
    if len(todo) < len(processed.day_rows):
        log(f"Resuming: {len(processed.day_rows) - len(todo)} of {len(processed.day_rows)} days already written")
    with tqdm(desc="multi-hot", total=sum(processed.day_rows[d] for d in todo), unit=" rows", unit_scale=True,
              disable=not progress, mininterval=0.5) as bar:
        for day in todo:
            sources = [np.load(processed.day_file(day, kind), mmap_mode="r") for kind in ("label", "dense", "sparse")]
            writers = [NpyWriter(result.day_file(day, "label"), np.uint8),
                       NpyWriter(result.day_file(day, "dense"), np.int32, (NUM_DENSE,)),
                       NpyWriter(result.day_file(day, "multihot"), np.int32, (sum(sizes),))]
            try:
                for lo in range(0, processed.day_rows[day], chunk_rows):
                    label, dense, ids = (np.asarray(a[lo : lo + chunk_rows]) for a in sources)
                    for writer, rows in zip(writers, (label, dense, multi_hot.rows(ids))):
                        writer.append(rows)
                    bar.update(len(label))
                for writer in writers:
                    writer.close()
            except BaseException:
                for writer in writers:
                    writer.discard()
                raise
    save_json(os.path.join(out_dir, "metadata.json"), metadata)
    os.remove(work)
    return result


def check_multi_hot_out(out_dir: str, processed_out_dir: str):
    """Raises DataError when `out_dir` cannot take a multi-hot set: the one-hot set itself, a file, or a
    directory holding files that are not a multi-hot set's."""
    if os.path.abspath(out_dir) == os.path.abspath(processed_out_dir):
        raise DataError(f"--out {out_dir}: is the processed one-hot set itself; give a directory of its own")
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise DataError(f"--out {out_dir}: is a file; give a directory")
    others = sorted(name for name in os.listdir(out_dir) if not MULTI_HOT_FILE.match(name)) \
        if os.path.isdir(out_dir) else []
    if others:
        raise DataError(f"--out {out_dir}: holds other files ({', '.join(others[:3])}); give an empty or new directory")
    existing = os.path.abspath(out_dir)  # the directory itself, or the nearest folder above it that exists
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise DataError(f"--out {out_dir}: {existing} is a file, not a folder")
    try:  # a real folder made and removed: os.access says yes for root where mkdir fails (/proc, read-only mounts)
        os.rmdir(tempfile.mkdtemp(prefix=".multi-hot-write-test-", dir=existing))
    except OSError as e:
        raise DataError(f"--out {out_dir}: nothing can be written in {existing} ({e.strerror or e})")


def check_multi_hot_settings(out_dir: str, multi_hot):
    """Raises DataError when `out_dir` holds a finished multi-hot set of other bag settings: it is
    never replaced silently (a set per directory; remove it or give another --out)."""
    existing = read_multi_hot_metadata(out_dir)
    if existing is not None and existing.get("multi_hot") != multi_hot.settings():
        old = existing.get("multi_hot", {})
        raise DataError(f"--out {out_dir}: holds a finished multi-hot set of other settings (sizes "
                        f"{'-'.join(map(str, old.get('sizes', [])))}, {old.get('distribution')}); give another "
                        "--out, or remove that directory to replace it")


def materialize_multi_hot(args, log=print, progress=False) -> ProcessedData:
    """`data_utils.py multi-hot`: the processed set the data flags name (built from the raw data if
    needed), expanded by --multi-hot-sizes / --multi-hot-distribution-type into --out."""
    from dlrmkit.multihot import MultiHot

    if args.processed_data_file.endswith(".npz") and os.path.isfile(args.processed_data_file):
        raise DataError(f"--processed-data-file {args.processed_data_file}: the original's .npz is expanded on the "
                        "fly by the trainer; materializing needs a processed directory (python data_utils.py "
                        "preprocess)")
    if not (args.raw_data_file or args.processed_data_file):
        raise DataError("give the processed one-hot set (--processed-data-file) or its raw data (--raw-data-file)")
    base = processed_dir(args.processed_data_file, args.raw_data_file, args.data_set)
    if read_multi_hot_metadata(base) is not None:
        raise DataError(f"--processed-data-file {base}: is multi-hot already; give the one-hot processed set")
    if not args.out:
        raise DataError("--out is empty; give the directory to write the multi-hot set into")
    try:
        multi_hot = MultiHot(args.multi_hot_sizes, [1] * NUM_SPARSE, args.multi_hot_distribution_type)
    except ValueError as e:
        raise DataError(str(e))
    check_multi_hot_out(args.out, os.path.join(base, settings_key(args.data_set, args.max_ind_range,
                                                                   args.data_sub_sample_rate)))
    check_multi_hot_settings(args.out, multi_hot)
    processed = preprocess(args.raw_data_file, base, args.data_set, args.max_ind_range, args.data_sub_sample_rate,
                           os.cpu_count() if args.dataset_multiprocessing else 1, log=log, progress=progress)
    multi_hot = MultiHot(args.multi_hot_sizes, processed.counts, args.multi_hot_distribution_type)
    try:
        return write_multi_hot(processed, args.out, multi_hot, log, progress)
    except OSError as e:  # disk full, permissions, ...
        raise DataError(f"writing multi-hot data into {args.out} failed: {e.filename or ''}: {e.strerror or e}")


# ============================================================================ fake raw data
KAGGLE_COUNTS = [1460, 583, 10131227, 2202608, 305, 24, 12517, 633, 3, 93145, 5683, 8351593, 3194, 27, 14992,
                 5461306, 10, 5652, 2173, 4, 7046547, 18, 15, 286181, 105, 142572]
DENSE_MISSING = [0.45, 0.0, 0.21, 0.22, 0.03, 0.22, 0.04, 0.0, 0.04, 0.45, 0.04, 0.76, 0.22]
SPARSE_MISSING = [0.0, 0.0, 0.03, 0.03, 0.0, 0.12, 0.0, 0.0, 0.0, 0.0, 0.0, 0.03, 0.0, 0.0, 0.0, 0.03, 0.0, 0.0,
                  0.44, 0.44, 0.03, 0.76, 0.0, 0.03, 0.44, 0.44]
HEX_DIGITS = np.frombuffer(b"0123456789abcdef", dtype=np.uint8)
FAKE_MISSING_INT = np.iinfo(np.int64).min
FAKE_LOG_CENTERS = np.linspace(0.5, 4.0, NUM_DENSE)
FAKE_CHUNK_ROWS = 20_000


def fake_rows(num_rows, seed, first_row=0):
    """Criteo-like rows with a planted signal: the click probability depends on the integers
    and on the values of the low-cardinality categoricals (fake_click_logit). Returns label [n],
    ints [n, 13], cats [n, 26] (int64; missing: ints FAKE_MISSING_INT, cats -1). Rows depend
    on (seed, first_row) only, not on how a file is cut into chunks."""
    rng = np.random.default_rng([seed, first_row])
    n = num_rows
    log_ints = np.clip(rng.normal(FAKE_LOG_CENTERS, 1.2, size=(n, NUM_DENSE)), 0, 16)
    ints = np.floor(np.expm1(log_ints)).astype(np.int64)
    negative = rng.random(n) < 0.1  # I2 is sometimes negative in the real data
    ints[negative, 1] = -rng.integers(1, 4, int(negative.sum()))
    # categorical value ranks: a few values are very frequent, as in the real data
    ranks = (np.array(KAGGLE_COUNTS) * rng.random((n, NUM_SPARSE)) ** 3).astype(np.int64)
    logit = fake_click_logit(log_ints, ranks, seed)
    label = (rng.random(n) < 1.0 / (1.0 + np.exp(-logit))).astype(np.int64)
    ints[rng.random((n, NUM_DENSE)) < np.array(DENSE_MISSING)] = FAKE_MISSING_INT
    cats = (splitmix64((ranks * NUM_SPARSE + np.arange(NUM_SPARSE)).astype(np.uint64)) >> _u64(32)).astype(np.int64)
    cats[rng.random((n, NUM_SPARSE)) < np.array(SPARSE_MISSING)] = -1
    return label, ints, cats


def fake_click_logit(log_ints, ranks, seed):
    """The planted signal: a linear function of log(1 + integers), plus an effect in [-1, 1)
    of each value of the categoricals with at most 1000 distinct values; about 1 click in 4."""
    weights = np.random.default_rng(seed + 1).normal(0, 0.5, NUM_DENSE)
    logit = -2.0 + (log_ints - FAKE_LOG_CENTERS) @ weights
    for t in np.flatnonzero(np.array(KAGGLE_COUNTS) <= 1000):
        effect = splitmix64((ranks[:, t] * 131 + t + 7 * seed).astype(np.uint64)) >> _u64(11)
        logit += 2.0 * (effect.astype(np.float64) / float(1 << 53) - 0.5)
    return logit


def format_rows(label, ints, cats) -> bytes:
    """Raw Criteo text of rows, vectorised: every field is laid out at a fixed width, then
    the characters to keep are selected (row-major, so lines come out in order)."""
    n = len(label)
    pieces = [np.stack([label + ord("0"), np.full(n, 9)], axis=1).astype(np.uint8)]  # label, TAB
    keep = [np.ones((n, 2), bool)]
    width = 10  # digits; enough for the generator's values
    powers = 10 ** np.arange(width - 1, -1, -1, dtype=np.int64)
    for k in range(NUM_DENSE):
        value = ints[:, k]
        missing = value == FAKE_MISSING_INT
        magnitude = np.where(missing, 0, np.abs(value))
        assert (magnitude < 10 * powers[0]).all()
        num_digits = 1 + (magnitude[:, None] >= powers[:-1]).sum(axis=1)
        digits = ((magnitude[:, None] // powers) % 10 + ord("0")).astype(np.uint8)
        sign, tab = np.full((n, 1), ord("-"), np.uint8), np.full((n, 1), 9, np.uint8)
        pieces.append(np.concatenate([sign, digits, tab], axis=1))
        show = np.ones((n, width + 2), bool)  # sign, digits, TAB
        show[:, 0] = (value < 0) & ~missing
        show[:, 1 : width + 1] = (np.arange(width) >= width - num_digits[:, None]) & ~missing[:, None]
        keep.append(show)
    shifts = np.arange(28, -4, -4, dtype=np.int64)
    for t in range(NUM_SPARSE):
        value = cats[:, t]
        end = 9 if t < NUM_SPARSE - 1 else 10  # TAB, or the newline after the last field
        pieces.append(np.concatenate([HEX_DIGITS[(np.maximum(value, 0)[:, None] >> shifts) & 15],
                                      np.full((n, 1), end, np.uint8)], axis=1))
        show = np.ones((n, 9), bool)
        show[value < 0, :8] = False
        keep.append(show)
    return np.concatenate(pieces, axis=1)[np.concatenate(keep, axis=1)].tobytes()


def make_fake(out, rows, days=1, seed=0, compress=False, log=print, progress=False):
    """Writes `rows` fake rows to `out` (days == 1) or split over <out>_0 .. <out>_<days-1> (`compress`: gzipped,
    <out>_<day>.gz). DataError when a day would be empty, `compress` asks a single (kaggle) file to be gzipped,
    or a file cannot be written."""
    if days > 1 and rows < days:
        raise DataError(f"--rows {rows} cannot fill {days} day files (a day file holds at least one row)")
    if compress and days == 1:
        raise DataError("--gzip compresses day files (--days > 1): the kaggle train.txt is read uncompressed")
    paths = [out] if days == 1 else [f"{out}_{d}" + (".gz" if compress else "") for d in range(days)]
    per_day = day_sizes(rows, days)
    for path in paths:  # before any work: each file can be created
        problem = outputs.output_problem(path)
        if problem:
            raise DataError(f"--out {path}: {problem}")
    first = 0
    from tqdm import tqdm

    with tqdm(desc="make-fake", total=rows, unit=" rows", unit_scale=True, disable=not progress) as bar:
        for path, n in zip(paths, per_day):
            def write(tmp):
                with (gzip.open(tmp, "wb", compresslevel=1) if compress else open(tmp, "wb")) as f:
                    for lo in range(0, n, FAKE_CHUNK_ROWS):
                        f.write(format_rows(*fake_rows(min(FAKE_CHUNK_ROWS, n - lo), seed, first + lo)))
                        bar.update(min(FAKE_CHUNK_ROWS, n - lo))
            try:
                outputs.write_atomically("--out", path, write)
            except outputs.OutputError as e:
                raise DataError(str(e))
            first += n
    log(f"Wrote {rows} rows to {paths[0]}{' .. ' + paths[-1] if days > 1 else ''}")
    return paths


# ============================================================================ command line
def build_parser() -> argparse.ArgumentParser:
    parser = flags.CommandLineParser(prog="data_utils.py", description="Criteo data: fake raw files, preprocessing")
    commands = parser.add_subparsers(dest="command", required=True)
    fake = commands.add_parser("make-fake", help="write a raw Criteo-format file with a learnable signal")
    flags.add_number(fake, "--rows", int, None, flags.at_least(1), "number of rows (all days together)", required=True)
    fake.add_argument("--out", required=True, help="output file (with --days > 1: prefix of <out>_<day>)")
    flags.add_number(fake, "--days", int, 1, flags.at_least(1),
                     "1: one file (kaggle train.txt); 24: terabyte day files")
    flags.add_number(fake, "--seed", int, 0, flags.at_least(0), "random seed")
    fake.add_argument("--gzip", action="store_true", help="gzip the day files (with --days > 1)")
    prep = commands.add_parser("preprocess", help="raw Criteo data -> processed arrays (as the trainer on first use); "
                                                  "the default command: the original's `data_utils.py --flags` works")
    flags.add_data_flags(prep, list(DAYS), raw_required=True)
    prep.add_argument("--data-randomize", type=str, default="total", choices=["total", "day", "none"],
                      help="the original's; no effect here: the trainer orders the rows as it reads them")
    flags.add_bool_flag(prep, "--memory-map", False, "the original's; no effect here: the trainer's --memory-map "
                                                     "reads the same processed set")
    hot = commands.add_parser("multi-hot", help="write the multi-hot expansion of a processed set once "
                                                 "(the trainer reads it with --processed-data-file=OUT)")
    flags.add_data_flags(hot, list(DAYS), bin_loader=False)
    flags.add_multi_hot_flags(hot, required=True)
    hot.add_argument("--out", required=True, help="output directory of the multi-hot set")
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0].startswith("--") and argv[0] != "--help":  # the original's command line: no command
        argv = ["preprocess", *argv]
    args = parser.parse_args(argv)
    # as Ctrl-C (temporary files removed, finished days kept), but not around a pool of preprocessing
    # processes: its workers die with this process (PR_SET_PDEATHSIG) and a rerun resumes
    pool = args.command == "preprocess" and args.dataset_multiprocessing
    try:
        signals.restore_interrupt()  # from here on Ctrl-C unwinds (KeyboardInterrupt, below)
        with signals.sigterm_unwinds(unwind=not pool):
            return run(args, parser)
    except DataError as e:
        print(f"data_utils.py: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt as e:
        stopped = "terminated" if isinstance(e, signals.Terminated) else "interrupted"
        resumes = "" if args.command == "make-fake" else "; a rerun resumes with the finished days"
        print(f"data_utils.py: {stopped}{resumes}", file=sys.stderr)
        return signals.exit_status(e)


def run(args, parser) -> int:
    """The command `args` names (DataError for bad input)."""
    problem = flags.check_ranges(parser, args)
    if problem:
        raise DataError(problem)
    if args.command == "make-fake":
        make_fake(args.out, args.rows, args.days, args.seed, args.gzip, progress=sys.stderr.isatty())
        return 0
    if args.command == "multi-hot":
        materialize_multi_hot(args, progress=sys.stderr.isatty())
        return 0
    for flag, given in (("--data-randomize", args.data_randomize != "total"), ("--memory-map", args.memory_map)):
        if given:
            print(f"note: {flag} has no effect on preprocessing (it is the trainer's: the processed set serves "
                  "every order and both loaders)", file=sys.stderr)
    out_dir = processed_dir(args.processed_data_file, args.raw_data_file, args.data_set)
    processed = preprocess(args.raw_data_file, out_dir, args.data_set, args.max_ind_range,
                           args.data_sub_sample_rate, os.cpu_count() if args.dataset_multiprocessing else 1,
                           progress=sys.stderr.isatty())  # bars on a terminal only, never in a log
    if args.mlperf_bin_loader:
        write_bin_files(processed)
    return 0


if __name__ == "__main__":
    sys.exit(main())
