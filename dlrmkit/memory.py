"""How much memory a run needs, and how much this process may use: checked before the model is built.

The estimate is meant to be honest, not a safety margin: the measured peak memory of random-data
runs (batch- or table-dominated, 1 to 150 ids per sample) was 0.7 to 0.95 of it.
"""

from __future__ import annotations

import dataclasses
import os
import re

GIB = 1 << 30
FLOAT = 4  # bytes of a float32 (parameters, optimizer state, activations)
ID_BYTES = 48  # per id of a batch: int64 ids and offsets, and NumPy's temporaries while a batch is made
ACTIVATION_COPIES = 3  # per unit and sample: the output, what autograd saves of it, and its gradient
INFERENCE_COPIES = 1  # per unit and sample without training: the outputs alone (no autograd, no gradients)
LOADER_BATCHES_PER_WORKER = 3  # two batches prefetched (PyTorch's prefetch_factor) and one being made


@dataclasses.dataclass
class MemoryEstimate:
    """Bytes a run allocates beyond what the process holds already, by part."""

    parameters: int
    optimizer_state: int
    batch: int  # batch_inputs included
    loader: int
    batch_inputs: int = 0  # what the loader hands over: ids, offsets, dense features, targets
    data: int = 0  # what the data source holds (synthetic data's id streams and batch index)
    checkpoint: int = 0  # a checkpoint being loaded, read whole into host memory first

    @property
    def total(self) -> int:
        return self.parameters + self.optimizer_state + self.batch + self.loader + self.data + self.checkpoint

    def on_device(self) -> dict:
        """Parts in the accelerator's memory when the model runs there (the rest stays in host memory)."""
        return {"parameters": self.parameters, "optimizer state": self.optimizer_state, "one batch": self.batch}

    def in_host_memory(self, model_on_device: bool) -> dict:
        parts = {"loader buffers": self.loader, "data": self.data, "checkpoint": self.checkpoint}
        if model_on_device:
            return {"batch inputs": self.batch_inputs, **parts}
        return {**self.on_device(), **parts}


def weight_count(mlps) -> int:
    """Weights and biases of MLPs given as widths, input first: sum of a * b + b over their layers a -> b."""
    return sum(a * b + b for widths in mlps for a, b in zip(widths[:-1], widths[1:]))


def unit_count(mlps) -> int:
    """Units of MLPs given as widths, input first (the activations a sample keeps per copy)."""
    return sum(sum(widths) for widths in mlps)


def estimate_memory(table_rows, dim: int, mlps, batch_size: int, ids_per_sample: float, optimizer: str | None,
                    num_workers: int = 0, table_element_bytes: int = 4) -> MemoryEstimate:
    """Bytes a run needs, by part (all float32, the tables' rows table_element_bytes each: 2 in bfloat16):

        parameters      = E * dim * sum(table_rows) + 2 * 4 * MLP weights (with their gradients);
                          without an optimizer (no training) E * dim * sum(table_rows) + 4 * MLP weights
        optimizer state = adagrad: as much again as tables and MLP weights; rwsadagrad: 4 per table
                          row plus the MLP weights; sgd, or None (no training): 0
        batch inputs    = batch_size * (48 * ids + 4 * (dense features + 1))
        one batch       = batch inputs + batch_size * (2 * 4 * dim * ids + 3 * 4 * (units + (tables + 1) * dim));
                          without an optimizer (no training) batch inputs + batch_size * 4 * (units + (tables + 1) * dim)
        loader buffers  = num_workers * 3 * batch inputs (two prefetched batches and one being made)

    Per id, 48 bytes: the int64 ids and offsets and the NumPy temporaries that make them; the
    embedding gradient, 2 float32 rows per id. For every MLP unit, and the pooled embeddings and
    dense output that the interaction reads, 3 float32 per sample (output, what autograd saves,
    gradient). The dense features (the first MLP's input) and the target are float32.

    `table_rows`: rows of each table this process holds; `dim`: the embedding dimension; `mlps`:
    each MLP's widths, input first; `ids_per_sample`: ids looked up per sample, all tables together;
    `optimizer`: the --optimizer name, or None without training."""
    rows = sum(int(n) for n in table_rows)
    weights = weight_count(mlps)
    units = unit_count(mlps) + (len(table_rows) + 1) * dim
    tables = table_element_bytes * dim * rows
    if optimizer == "adagrad":
        state = tables + FLOAT * weights
    elif optimizer == "rwsadagrad":
        state = FLOAT * (rows + weights)
    else:
        state = 0
    inputs = batch_size * (ID_BYTES * ids_per_sample + FLOAT * (mlps[0][0] + 1))
    if optimizer is None:
        batch = int(inputs + batch_size * INFERENCE_COPIES * FLOAT * units)
    else:
        batch = int(inputs + batch_size * (2 * FLOAT * dim * ids_per_sample + ACTIVATION_COPIES * FLOAT * units))
    weight_copies = 1 if optimizer is None else 2  # the weights, and their gradients when training
    return MemoryEstimate(tables + weight_copies * FLOAT * weights, state, batch, int(num_workers * LOADER_BATCHES_PER_WORKER * inputs),
                          batch_inputs=int(inputs))


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


def device_memory(device) -> tuple[int, str]:
    """(bytes, what they are): the free memory of a CUDA device."""
    import torch

    free, _ = torch.cuda.mem_get_info(device)
    return int(free), f"the free memory of {device}"


def describe(parts: dict) -> str:
    """`name size, ...` of the parts that need any memory."""
    return ", ".join(f"{name} {gib(n)}" for name, n in parts.items() if n > 0)


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
    """Ids drawn per bag by the random and synthetic data: `max_ids` when fixed, else the mean of
    max(1, round(U * m)) for U uniform in [0, 1) and m = min(rows, max_ids), which is m/2 + 1/(2m)."""
    if fixed:
        return float(max_ids)
    m = max(1, min(rows, max_ids))
    return m / 2 + 1 / (2 * m)
