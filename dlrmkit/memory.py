"""How much memory a run needs, and how much this process may use: checked before the model is built.

The estimate is order-of-magnitude honest (measured peaks of random-data runs fall within
0.7x-1x of it), so a run it refuses could not have finished, and a run it lets through
may still fail only when it is within a factor of about 1.5 of the limit.
"""

from __future__ import annotations

import dataclasses
import os
import re

GIB = 1 << 30
FLOAT = 4  # bytes of a float32 (parameters, optimizer state, activations)
ID_BYTES = 64  # per id of a batch: int64 ids and offsets, and NumPy's temporaries while a batch is made
ACTIVATION_COPIES = 3  # per unit and sample: the output, what autograd saves of it, and its gradient
LOADER_BATCHES_PER_WORKER = 3  # two batches prefetched (PyTorch's prefetch_factor) and one being made


@dataclasses.dataclass
class MemoryEstimate:
    """Bytes a run allocates beyond what the process holds already, by part."""

    parameters: int
    optimizer_state: int
    batch: int
    loader: int

    @property
    def total(self) -> int:
        return self.parameters + self.optimizer_state + self.batch + self.loader

    def describe(self) -> str:
        parts = (("parameters", self.parameters), ("optimizer state", self.optimizer_state), ("one batch", self.batch),
                 ("loader buffers", self.loader))
        return ", ".join(f"{name} {gib(n)}" for name, n in parts)


def estimate_memory(table_rows, dim: int, mlps, batch_size: int, ids_per_sample: float, optimizer: str | None,
                    num_workers: int = 0) -> MemoryEstimate:
    """Bytes a run needs, by part (all float32):

        parameters      = 4 * dim * sum(table_rows) + 2 * 4 * MLP weights (with their gradients)
        optimizer state = adagrad: as much again as tables and MLP weights; rwsadagrad: 4 per table
                          row plus the MLP weights; sgd, or None (no training): 0
        one batch       = batch_size * (64 * ids + 2 * 4 * dim * ids + 3 * 4 * (units + (tables + 1) * dim))
        loader buffers  = num_workers * 3 * one batch (two prefetched batches and one being made)

    In one batch: 64 bytes per id for the int64 ids and offsets and the NumPy temporaries that make
    them; the embedding gradient, 2 float32 rows per id; for every MLP unit, and the pooled
    embeddings and dense output that the interaction reads, 3 float32 per sample (output, what
    autograd saves, gradient).

    `table_rows`: rows of each table this process holds; `dim`: the embedding dimension; `mlps`:
    each MLP's widths, input first; `ids_per_sample`: ids looked up per sample, all tables together;
    `optimizer`: the --optimizer name, or None without training."""
    rows = sum(int(n) for n in table_rows)
    weights = sum(a * b + b for widths in mlps for a, b in zip(widths[:-1], widths[1:]))
    units = sum(sum(widths) for widths in mlps) + (len(table_rows) + 1) * dim
    tables = FLOAT * dim * rows
    if optimizer == "adagrad":
        state = tables + FLOAT * weights
    elif optimizer == "rwsadagrad":
        state = FLOAT * (rows + weights)
    else:
        state = 0
    per_sample = ID_BYTES * ids_per_sample + 2 * FLOAT * dim * ids_per_sample + ACTIVATION_COPIES * FLOAT * units
    batch = int(batch_size * per_sample)
    return MemoryEstimate(tables + 2 * FLOAT * weights, state, batch, num_workers * LOADER_BATCHES_PER_WORKER * batch)


def usable_memory() -> tuple[int, str]:
    """(bytes, what limits them): the least of the address-space limit (RLIMIT_AS, `ulimit -v`)
    less what the process maps already, the cgroup v2/v1 memory limit less its non-cache usage,
    and the machine's available memory (psutil, else /proc/meminfo). Limits that cannot be
    read are skipped; with none readable the result is unbounded."""
    found = [(_address_space_left(), "the address-space limit of ulimit -v, less what the process maps already"),
             (_cgroup_memory_left(), "the cgroup memory limit, less its usage"),
             (_available_memory(), "the memory available on this machine")]
    found = [(n, why) for n, why in found if n is not None]
    return min(found) if found else (2**63 - 1, "no memory limit found")


def gib(n: int) -> str:
    return f"{n / GIB:.1f} GiB" if n < 1 << 60 else f"{n / GIB:.3g} GiB"


def _address_space_left() -> int | None:
    try:
        import resource

        soft, _ = resource.getrlimit(resource.RLIMIT_AS)
        if soft == resource.RLIM_INFINITY:
            return None
        mapped = _status_bytes("/proc/self/status", "VmSize")
        return max(0, soft - (mapped or 0))
    except (ImportError, OSError, ValueError):
        return None


def _cgroup_memory_left() -> int | None:
    """Headroom under the tightest cgroup memory limit on the way from this process's cgroup to the root."""
    try:
        with open("/proc/self/cgroup") as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    best = None
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if controllers == "":  # v2
            base, files = "/sys/fs/cgroup", ("memory.max", "memory.current", "file")
        elif "memory" in controllers.split(","):
            base, files = "/sys/fs/cgroup/memory", ("memory.limit_in_bytes", "memory.usage_in_bytes", "total_cache")
        else:
            continue
        parts = [p for p in path.split("/") if p]
        for depth in range(len(parts), -1, -1):
            left = _cgroup_left(os.path.join(base, *parts[:depth]), *files)
            if left is not None:
                best = left if best is None else min(best, left)
    return best


def _cgroup_left(directory, limit_file, usage_file, cache_key) -> int | None:
    try:
        with open(os.path.join(directory, limit_file)) as f:
            limit = f.read().strip()
        if limit == "max" or int(limit) >= 1 << 60:
            return None
        with open(os.path.join(directory, usage_file)) as f:
            usage = int(f.read())
        cache = 0
        try:
            with open(os.path.join(directory, "memory.stat")) as f:
                for line in f:
                    key, value = line.split()
                    if key == cache_key:
                        cache = int(value)  # page cache is given back under pressure
        except (OSError, ValueError):
            pass
        return max(0, int(limit) - max(0, usage - cache))
    except (OSError, ValueError):
        return None


def _available_memory() -> int | None:
    try:
        import psutil

        return int(psutil.virtual_memory().available)
    except ImportError:
        return _status_bytes("/proc/meminfo", "MemAvailable")


def _status_bytes(path, key) -> int | None:
    """A `Key:  N kB` line of a /proc file, in bytes."""
    try:
        with open(path) as f:
            for line in f:
                match = re.match(rf"{key}:\s+(\d+)\s*kB", line)
                if match:
                    return int(match.group(1)) * 1024
    except OSError:
        pass
    return None


def mean_bag_size(rows: int, max_ids: int, fixed: bool) -> float:
    """Ids drawn per bag by the random and synthetic data: `max_ids` when fixed, else
    round(max(1, U * min(rows, max_ids))) for U uniform in [0, 1), about (m + 1) / 2."""
    if fixed:
        return float(max_ids)
    m = min(rows, max_ids)
    return max(1.0, (m + 1) / 2) if m >= 1 else 1.0

