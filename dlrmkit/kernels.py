"""Native CPU kernels for the trainer's hot paths, with PyTorch (or NumPy) operators as the fallback.

`kernels.c` is plain C: on first use it is compiled with the machine's C compiler (`$CC`, else
`cc` or `gcc`; about 1 s, once) for this CPU (`-march=native`), with OpenMP where the compiler has it (the
row updates then run on PyTorch's own OpenMP threads: `threading_kind()`), into a cache folder
(`$DLRM_CACHE_DIR`, else `$XDG_CACHE_HOME/dlrm` or `~/.cache/dlrm`), keyed by the source, the compiler
and the CPU, and loaded with ctypes. Without a compiler, where the build or the load fails, on tensors
it does not take (another device or dtype), or with `DLRM_NATIVE_KERNELS=0`, the row updates and the id
shifts compute the same numbers with PyTorch operators, the random batches' draws from NumPy's PCG64
stream (`pcg64_random_f32`, `uniform_bags`) and the random bags' padding and duplicate removal
(`pad_bags`, `distinct_sorted_bags`) the same numbers with NumPy, and, without the kernels, the
tables' initial values (`uniform_`) the same values with NumPy, only slower: those results never
depend on whether the kernel is used. Three exceptions: the stochastically rounded update of bfloat16
tables has no fallback; the dot interaction's kernels (`dot_interaction`, forward and backward) sum
in an order they document, where the batched matrix products of the PyTorch path
(`dlrmkit.interactions`) sum in their own: the two agree up to float32 rounding; and the fused Adagrad
update (`adagrad_bag_rows_`) rounds its square roots correctly, where PyTorch's CPU sqrt is 1 ulp off
for some values.

    >>> import torch
    >>> weight = torch.zeros(4, 2)
    >>> offsets = torch.tensor([0, 2, 3])                    # bag 0: ids 1, 3; bag 1: id 1
    >>> bag_sgd_(weight, torch.tensor([1, 3, 1]), offsets, torch.ones(2, 2), scale=-0.5)
    >>> weight.tolist()
    [[0.0, 0.0], [-1.0, -1.0], [0.0, 0.0], [-0.5, -0.5]]
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import numbers
import operator
import os
import platform
import shlex
import shutil
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from torch.autograd import forward_ad
from torch.utils._python_dispatch import _get_current_dispatch_mode

from dlrmkit.hashing import GOLDEN_GAMMA, splitmix64

SOURCE = Path(__file__).with_name("kernels.c")
CFLAGS = ["-O3", "-std=c99", "-ffp-contract=off", "-shared", "-fPIC"]
# below this many gradient elements one thread does the update: more threads lose below about this size,
# the threads of a Python pool (which contend with the OpenMP threads PyTorch keeps spinning after its
# operators) below 8 M, PyTorch's own OpenMP threads only below about 0.5 M (both measured)
PARALLEL_MIN_ELEMENTS = 1 << 23
OPENMP_MIN_ELEMENTS = 1 << 19
# the dot interaction's work (batch * features^2 * dim) from which its kernels use several threads (two
# OpenMP threads won down to 16 samples of the Kaggle model, 0.19 M, measured)
INTERACTION_OPENMP_MIN_WORK = 1 << 17
# widest rows the fused Adagrad kernel takes: it sums a row's gradient in a buffer on the stack
ADAGRAD_MAX_DIM = 4096
# from this many values the initial values of a table are drawn on several OpenMP threads (a fraction of a
# millisecond; a Python pool's threads from PARALLEL_MIN_ELEMENTS)
UNIFORM_PARALLEL_MIN_ELEMENTS = 1 << 18
# values per piece of the NumPy fallback of uniform_: its temporaries stay in the cache
UNIFORM_NUMPY_CHUNK = 1 << 16
# from this many 64-bit words a random batch's draws (pcg64_random_f32, uniform_bags) use several OpenMP threads
RANDOM_OPENMP_MIN_WORDS = 1 << 15
# widest embeddings the dot interaction's kernels take: their backward keeps 4 rows of that many floats on the stack
INTERACTION_MAX_DIM = 1024


def cache_dir() -> Path:
    """Where compiled kernels are kept: $DLRM_CACHE_DIR, else $XDG_CACHE_HOME/dlrm or ~/.cache/dlrm."""
    if os.environ.get("DLRM_CACHE_DIR"):
        return Path(os.environ["DLRM_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "dlrm"


def _cpu_identity() -> str:
    """The CPU model and instruction sets (the cache key of a -march=native build)."""
    try:
        with open("/proc/cpuinfo") as f:
            lines = [line for line in f.read(1 << 16).splitlines()
                     if line.split(":")[0].strip() in ("model name", "flags", "Features", "CPU part")]
        return "\n".join(dict.fromkeys(lines))
    except OSError:
        return platform.processor()


def build_flags(openmp: bool) -> list[list[str]]:
    """The compiler flags of a build, with OpenMP or without, in the order they are tried (some compilers
    or CPUs have no -march=native)."""
    return [[*CFLAGS, *(["-fopenmp"] if openmp else []), *arch] for arch in (["-march=native"], [])]


def _compile(compiler: list, out: Path, openmp: bool) -> str | None:
    """Compiles kernels.c (with OpenMP when `openmp`) into `out`, and its SHA-256 into `out`.sha256, each
    written under a name of its own and then renamed (processes building at once never share a file);
    None, or why not."""
    def unique_temporary():
        fd, name = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp")
        os.close(fd)
        return Path(name)

    tmp = unique_temporary()
    try:
        problem = None
        for flags in build_flags(openmp):
            try:
                result = subprocess.run([*compiler, *flags, "-o", str(tmp), str(SOURCE)],
                                        capture_output=True, text=True, timeout=120)
            except (OSError, subprocess.SubprocessError) as e:
                return f"{' '.join(compiler)} could not run ({e})"
            if result.returncode == 0:
                digest = unique_temporary()
                digest.write_text(hashlib.sha256(tmp.read_bytes()).hexdigest())
                os.replace(tmp, out)
                os.replace(digest, out.with_name(out.name + ".sha256"))
                return None
            lines = result.stderr.strip().splitlines()
            problem = f"{' '.join(compiler)} failed: {lines[-1] if lines else f'exit status {result.returncode}'}"
        return problem
    except OSError as e:
        return f"the build could not be saved in {out.parent} ({e})"
    finally:
        tmp.unlink(missing_ok=True)


def _intact(path: Path) -> bool:
    """Whether the library at `path` is the one its build wrote (a damaged library could crash the
    process when loaded, not fail)."""
    try:
        expected = path.with_name(path.name + ".sha256").read_text().strip()
        return hashlib.sha256(path.read_bytes()).hexdigest() == expected
    except OSError:
        return False


def _load(path: Path):
    """The library at `path` with its functions' signatures; OSError when it is not a build of kernels.c."""
    library = ctypes.CDLL(str(path))
    p, i64, u64 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_uint64
    try:
        library.bags_in_bounds.argtypes = [p, i64, p, i64, i64]
        library.bags_in_bounds.restype = ctypes.c_int
        library.bag_sgd_f32.argtypes = [p, i64, p, p, i64, p, p, ctypes.c_float, i64, i64]
        library.bag_sgd_f32.restype = None
        library.bag_sgd_bf16.argtypes = [p, i64, p, p, i64, p, p, ctypes.c_float, ctypes.c_uint64, i64, p, i64, i64]
        library.bag_sgd_bf16.restype = None
        library.stacked_rows_checked.argtypes = [p, i64, p, i64, i64, p, p, p]
        library.stacked_rows_checked.restype = i64
        library.dot_interaction_scratch_floats.argtypes = [i64, i64]
        library.dot_interaction_scratch_floats.restype = i64
        library.dot_interaction_f32.argtypes = [p, i64, p, i64, i64, i64, i64, i64, ctypes.c_int, p, ctypes.c_int, p,
                                                i64, i64]
        library.dot_interaction_f32.restype = None
        library.dot_interaction_backward_f32.argtypes = [p, i64, p, i64, i64, i64, i64, i64, ctypes.c_int, p,
                                                         ctypes.c_int, i64, p, p, i64, i64, p, i64, i64]
        library.dot_interaction_backward_f32.restype = None
        for suffix, id_type in (("i32", ctypes.c_int32), ("i64", ctypes.c_int64)):
            pad = getattr(library, "pad_bags_" + suffix)
            pad.argtypes, pad.restype = [p, p, i64, i64, id_type, p], None
            distinct = getattr(library, "distinct_sorted_bags_" + suffix)
            distinct.argtypes, distinct.restype = [p, i64, i64, i64, p, p], i64
        library.adagrad_bag_rows_f32.argtypes = [p, p, i64, p, p, i64, p, p, p, p, ctypes.c_float, ctypes.c_float,
                                                 i64, i64]
        library.adagrad_bag_rows_f32.restype = None
        for suffix in ("f32", "bf16"):
            fill = getattr(library, "uniform_fill_" + suffix)
            fill.argtypes, fill.restype = [p, i64, ctypes.c_uint64, ctypes.c_float, ctypes.c_float, i64, i64], None
    except AttributeError as e:
        raise OSError(f"not a build of {SOURCE.name}: {e}") from None
    try:  # only where the compiler has 128-bit integers
        library.pcg64_random_f32.argtypes = [p, i64, u64, u64, u64, u64, i64, i64]
        library.pcg64_random_f32.restype = None
        for suffix, id_type in (("i32", ctypes.c_int32), ("i64", ctypes.c_int64)):
            bags = getattr(library, "uniform_bags_" + suffix)
            bags.argtypes, bags.restype = [p, i64, id_type, p, p, i64, i64, p, p, u64, u64, i64, i64], None
        library.pcg64 = True
    except AttributeError:
        library.pcg64 = False
    try:  # only in a build with OpenMP
        library.bag_sgd_f32_threads.argtypes = [p, i64, p, p, i64, p, p, ctypes.c_float, i64]
        library.bag_sgd_f32_threads.restype = None
        library.bag_sgd_bf16_threads.argtypes = [p, i64, p, p, i64, p, p, ctypes.c_float, ctypes.c_uint64, i64, p, i64]
        library.bag_sgd_bf16_threads.restype = None
        library.dot_interaction_f32_threads.argtypes = library.dot_interaction_f32.argtypes[:-1]
        library.dot_interaction_f32_threads.restype = None
        library.dot_interaction_backward_f32_threads.argtypes = library.dot_interaction_backward_f32.argtypes[:-1]
        library.dot_interaction_backward_f32_threads.restype = None
        library.adagrad_bag_rows_f32_threads.argtypes = library.adagrad_bag_rows_f32.argtypes[:-1]
        library.adagrad_bag_rows_f32_threads.restype = None
        for suffix in ("f32", "bf16"):
            fill = getattr(library, f"uniform_fill_{suffix}_threads")
            fill.argtypes, fill.restype = getattr(library, "uniform_fill_" + suffix).argtypes[:-1], None
        if library.pcg64:
            library.pcg64_random_f32_threads.argtypes = library.pcg64_random_f32.argtypes[:-1]
            library.pcg64_random_f32_threads.restype = None
            for suffix in ("i32", "i64"):
                bags = getattr(library, f"uniform_bags_{suffix}_threads")
                bags.argtypes, bags.restype = getattr(library, "uniform_bags_" + suffix).argtypes[:-1], None
        library.openmp_runtime_symbol.argtypes = []
        library.openmp_runtime_symbol.restype = ctypes.c_void_p
        library.openmp = True
    except AttributeError:
        library.openmp = False
    return library


def _mapped_file(address: int, maps: str) -> str | None:
    """The file mapped at `address` in a /proc/PID/maps text, or None."""
    for line in maps.splitlines():
        fields = line.split()
        start, end = (int(x, 16) for x in fields[0].split("-"))
        if start <= address < end:
            return fields[-1] if len(fields) >= 6 else None
    return None


@functools.lru_cache(maxsize=None)
def _shares_pytorchs_openmp() -> bool:
    """Whether the kernels' OpenMP runtime is the one PyTorch's operators use (their threads are then
    PyTorch's; a second runtime would keep threads of its own spinning on the same cores): the file
    holding the kernels' omp_get_num_threads is the one holding libtorch_cpu's."""
    library, _ = _library()
    try:
        with open("/proc/self/maps") as f:
            maps = f.read()
        torch_cpu = next(line.split()[-1] for line in maps.splitlines() if "libtorch_cpu" in line.split()[-1])
        theirs = ctypes.cast(ctypes.CDLL(torch_cpu).omp_get_num_threads, ctypes.c_void_p).value
        ours = library.openmp_runtime_symbol()
    except (OSError, StopIteration, AttributeError, ValueError):
        return False
    runtime = _mapped_file(ours, maps)
    return runtime is not None and runtime == _mapped_file(theirs, maps)


def threading_kind() -> str:
    """How the row updates use several threads: "openmp" (PyTorch's OpenMP threads), "python" (threads
    of a Python pool: no OpenMP build, or one whose OpenMP runtime is not PyTorch's), or "none" (no
    kernels)."""
    library, _ = _library()
    if library is None:
        return "none"
    return "openmp" if library.openmp and _shares_pytorchs_openmp() else "python"


def compiler_command() -> list[str]:
    """The C compiler the kernels are built with, as a command (`$CC` with its options, else cc or gcc);
    [] when there is none."""
    compiler = shlex.split(os.environ.get("CC", "")) or [shutil.which("cc") or shutil.which("gcc") or ""]
    return compiler if compiler[0] else []


@functools.lru_cache(maxsize=None)
def _library():
    """(the loaded library or None, why not)."""
    if os.environ.get("DLRM_NATIVE_KERNELS", "1").strip().lower() in ("0", "false", "no", "off"):
        return None, "DLRM_NATIVE_KERNELS is off"
    compiler = compiler_command()
    if not compiler:
        return None, "no C compiler found (set CC)"
    key = hashlib.sha256("\0".join([SOURCE.read_text(), *compiler, *CFLAGS, _cpu_identity(),
                                    platform.machine()]).encode()).hexdigest()[:16]
    folder = cache_dir()
    try:
        folder.mkdir(parents=True, exist_ok=True)
        if not os.access(folder, os.W_OK):
            raise PermissionError(folder)
    except OSError:  # a read-only home: a folder of this user's own in the temporary directory
        folder = Path(tempfile.gettempdir()) / f"dlrm-kernels-{os.getuid() if hasattr(os, 'getuid') else 0}"
        try:
            folder.mkdir(mode=0o700, exist_ok=True)
            info = folder.stat()
        except OSError as e:
            return None, f"no folder to build in ({e})"
        if hasattr(os, "getuid") and (info.st_uid != os.getuid() or info.st_mode & 0o022):
            return None, f"{folder} belongs to another user or others may write to it"
    problem = None
    for openmp in (True, False):  # a compiler without OpenMP, or an OpenMP build that does not load: without
        path = folder / f"kernels-{key}{'-openmp' if openmp else ''}.so"
        for attempt in range(2):  # a library that is damaged or does not load is built again, once
            if attempt or not _intact(path):
                problem = _compile(compiler, path, openmp)
                if problem:
                    break
            try:
                return _load(path), None
            except OSError as e:
                problem = f"{path} could not be loaded ({e})"
    return None, problem


def native() -> bool:
    """Whether the native kernels are in use (built or loaded on the first call)."""
    return _library()[0] is not None


def status() -> str:
    """"native" when the kernels are in use, else why not (one line)."""
    library, problem = _library()
    return "native" if library is not None else f"PyTorch fallback: {problem}"


@functools.lru_cache(maxsize=4)
def _pool(threads: int) -> ThreadPoolExecutor:
    return ThreadPoolExecutor(max_workers=threads, thread_name_prefix="dlrm-kernel")


if hasattr(os, "register_at_fork"):  # a forked child has the pools but not their threads
    os.register_at_fork(after_in_child=_pool.cache_clear)


def _run_parts(fn, num_parts: int):
    """fn(part) for part in range(num_parts), on as many threads (ctypes releases the GIL)."""
    if num_parts == 1:
        fn(0)
    else:
        list(_pool(num_parts).map(fn, range(num_parts)))


def _native_ok(weight, indices, offsets, grad, index_weights, weight_dtype) -> bool:
    tensors = [weight, indices, offsets, grad] + ([index_weights] if index_weights is not None else [])
    return (all(t.device.type == "cpu" and t.is_contiguous() for t in tensors)
            and weight.dtype == weight_dtype and grad.dtype == torch.float32 and weight.dim() == grad.dim() == 2
            and indices.dtype == offsets.dtype == torch.int64
            and (index_weights is None or index_weights.dtype == torch.float32))


@torch.no_grad()
def bag_sgd_(weight: torch.Tensor, indices: torch.Tensor, offsets: torch.Tensor, grad: torch.Tensor,
             scale: float, index_weights: torch.Tensor | None = None, seed: int = 0, bags_per_table: int = 0,
             table_ids: torch.Tensor | None = None) -> None:
    """SGD on the rows of `weight` that sum-pooled bags looked up, from the gradient of the bags:
    weight[indices[j]] += (grad[b] * index_weights[j]) * scale for every id j of every bag b (scale = -lr).

    weight [R, D] float32 or bfloat16; indices [N] int64 rows of weight; offsets [K + 1] int64, bag b =
    indices[offsets[b]:offsets[b + 1]]; grad [K, D] of the pooled bags; index_weights [N] or None.
    float32: equal bit for bit to what `F.embedding_bag(..., sparse=True)`'s backward, then `optim.SGD`'s
    `grad * -lr` and a scatter-add compute, without their [N, D] gradient. bfloat16: each sum computed in
    float32 and rounded stochastically (unbiased; small steps are not lost), with random bits from `seed`,
    the table (bags_per_table bags each, numbered `table_ids` [T] int64 in the model, default 0, 1, ...;
    0 bags_per_table: one table) and the id's position among its table's ids: native kernels only
    (RuntimeError without them). In place. ValueError for offsets outside the ids, ids outside the weight, a
    gradient with fewer bags or another width, or index weights not one per id.
    """
    num_bags = offsets.numel() - 1
    if num_bags < 1 or indices.numel() == 0:
        return
    if grad.dim() != 2 or grad.shape[0] < num_bags or grad.shape[1] != weight.shape[-1]:
        raise ValueError(f"bag_sgd_: a gradient of shape {list(grad.shape)} for {num_bags} bags of width "
                         f"{weight.shape[-1]}")
    if index_weights is not None and index_weights.numel() != indices.numel():
        raise ValueError(f"bag_sgd_: {index_weights.numel()} index weights for {indices.numel()} ids")
    grad = grad.contiguous()
    library, problem = _library()
    if weight.dtype == torch.bfloat16:
        grad = grad.float()
        if library is None:
            raise RuntimeError(f"bfloat16 embedding tables need the native kernels ({problem})")
        if not _native_ok(weight, indices, offsets, grad, index_weights, torch.bfloat16):
            raise ValueError("bag_sgd_ on a bfloat16 weight takes CPU tensors: contiguous int64 ids and offsets, "
                             "float32 gradient and index weights")
    elif library is None or not _native_ok(weight, indices, offsets, grad, index_weights, torch.float32):
        return _bag_sgd_torch(weight, indices, offsets, grad, scale, index_weights)
    dim = weight.shape[1]
    if not library.bags_in_bounds(indices.data_ptr(), indices.numel(), offsets.data_ptr(), num_bags, weight.shape[0]):
        raise ValueError(f"bag_sgd_: offsets that do not walk [0, {indices.numel()}) ids in order, or an id "
                         f"outside the weight's {weight.shape[0]} rows")
    parts = _parts(indices.numel() * dim)
    pointers = (weight.data_ptr(), dim, indices.data_ptr(), offsets.data_ptr(), num_bags, grad.data_ptr(),
                index_weights.data_ptr() if index_weights is not None else None, float(scale))
    if weight.dtype == torch.bfloat16:
        per_table = bags_per_table or num_bags
        tables_fit = table_ids is None or (table_ids.dtype == torch.int64 and table_ids.is_contiguous()
                                           and table_ids.numel() == num_bags // per_table)
        if num_bags % per_table or not tables_fit:
            raise ValueError(f"bag_sgd_: {num_bags} bags are not {per_table} per table of table_ids")
        ids_pointer = table_ids.data_ptr() if table_ids is not None else None
        arguments, kernel = (*pointers, seed & (2**64 - 1), per_table, ids_pointer), "bag_sgd_bf16"
    else:
        arguments, kernel = pointers, "bag_sgd_f32"
    _run_kernel(library, kernel, arguments, parts)


def _bag_sgd_torch(weight, indices, offsets, grad, scale, index_weights):
    """bag_sgd_ with PyTorch operators: each id's row of the bag gradient, scaled, scatter-added."""
    from dlrmkit.optim.sparse_optimizers import add_rows_, lookup_gradient_rows

    # repeat_interleave, not sparse.bag_of_each_index: it refuses offsets that do not cover the ids exactly
    lengths = torch.diff(offsets)
    bag = torch.repeat_interleave(torch.arange(lengths.numel(), device=grad.device), lengths,
                                  output_size=indices.numel())
    values = lookup_gradient_rows(grad, bag, index_weights)
    add_rows_(weight, indices, values.to(weight.dtype).mul_(scale))


@torch.no_grad()
def adagrad_bag_rows_(weight: torch.Tensor, state: torch.Tensor, rows: torch.Tensor, starts: torch.Tensor,
                      order: torch.Tensor, bag_of: torch.Tensor, grad: torch.Tensor,
                      index_weights: torch.Tensor | None, lr: float, eps: float) -> bool:
    """Element-wise Adagrad on the rows sum-pooled bags looked up, from the gradient of the bags; True when run
    (natively), False when the kernels or these operands are not available (then nothing is changed).

    For each segment s, row r = rows[s] with g = sum over k in [starts[s], starts[s + 1]) of
    grad[bag_of[order[k]]] * index_weights[order[k]], in that order: state[r] += g * g, then
    weight[r] += (g / (sqrt(state[r]) + eps)) * -lr, in float32 operation by operation: what
    `optim.Adagrad.step` computes from the coalesced sparse gradient of the lookup (`coalesce_rows`'
    segments), without that [N, D] gradient, bit for bit but for the square root: correctly rounded here,
    where PyTorch's CPU sqrt is 1 ulp off for about 15 % of float32 values on the machines measured.

    weight, state [R, D] float32 (0 < D <= ADAGRAD_MAX_DIM); rows [S] int64 ascending and distinct; starts
    [S + 1], order [N] (a permutation), bag_of [N] int64 (bags of grad [K, D] float32); index_weights [N]
    float32 or None. ValueError for operands that break those rules (rows not ascending or outside the
    weight, starts, positions or bags out of range).
    """
    library, _ = _library()
    floats = [weight, state, grad] + ([index_weights] if index_weights is not None else [])
    ids = [rows, starts, order, bag_of]
    if (library is None or not all(_plain_cpu_tensor(t) and t.is_contiguous() for t in floats + ids)
            or not all(t.dtype == torch.float32 for t in floats) or not all(t.dtype == torch.int64 for t in ids)
            or weight.dim() != 2 or state.shape != weight.shape or grad.dim() != 2
            or grad.shape[1] != weight.shape[1] or not 0 < weight.shape[1] <= ADAGRAD_MAX_DIM
            or starts.numel() != rows.numel() + 1 or order.numel() != bag_of.numel()):
        return False
    segments, dim, n = rows.numel(), weight.shape[1], order.numel()
    if segments == 0:
        return True
    # what the kernel walks, checked in a few vectorised passes (a fraction of its time): rows ascending (no
    # two parts write one row) inside the weight, segments covering [0, n) in order, positions and bags in range
    if bool((rows[1:] <= rows[:-1]).any()) or int(rows[0]) < 0 or int(rows[-1]) >= weight.shape[0]:
        raise ValueError(f"adagrad_bag_rows_: rows not ascending and distinct inside the weight's "
                         f"{weight.shape[0]} rows")
    if int(starts[0]) != 0 or int(starts[-1]) != n or bool((starts[1:] < starts[:-1]).any()):
        raise ValueError(f"adagrad_bag_rows_: segment starts that do not walk [0, {n}) in order")
    if n and (int(order.min()) < 0 or int(order.max()) >= n or int(bag_of.min()) < 0
              or int(bag_of.max()) >= grad.shape[0]):
        raise ValueError(f"adagrad_bag_rows_: positions outside [0, {n}) or bags outside [0, {grad.shape[0]})")
    if index_weights is not None and index_weights.numel() != n:
        raise ValueError(f"adagrad_bag_rows_: {index_weights.numel()} index weights for {n} ids")
    parts = _parts(n * dim)
    arguments = (weight.data_ptr(), state.data_ptr(), dim, rows.data_ptr(), starts.data_ptr(), segments,
                 order.data_ptr(), bag_of.data_ptr(), grad.data_ptr(),
                 index_weights.data_ptr() if index_weights is not None else None, -float(lr), float(eps))
    _run_kernel(library, "adagrad_bag_rows_f32", arguments, parts)
    return True


def stacked_rows_checked(indices: torch.Tensor, offsets: torch.Tensor, batch_size: int, first_row: torch.Tensor,
                         table_rows: torch.Tensor):
    """(rows, bad): each id's row in a stack of tables, rows[j] = indices[j] + first_row[table of j], and
    the position of the first id outside [0, table_rows[its table]) or -1; None when not run natively
    (also for offsets that do not match the tables and batch size: the caller's fallback names them).

    indices [N], offsets [T * B + 1] in `SparseFeatures`' layout (table t's ids: indices[offsets[t * B]:
    offsets[(t + 1) * B]]), first_row and table_rows [T]: int64 CPU tensors. One pass over the ids."""
    library, _ = _library()
    tensors = (indices, offsets, first_row, table_rows)
    if (library is None or not all(t.device.type == "cpu" and t.dtype == torch.int64 and t.is_contiguous()
                                   and t.dim() == 1 for t in tensors)
            or offsets.numel() != first_row.numel() * batch_size + 1 or table_rows.numel() != first_row.numel()):
        return None
    rows = torch.empty_like(indices)
    bad = library.stacked_rows_checked(indices.data_ptr(), indices.numel(), offsets.data_ptr(), batch_size,
                                       first_row.numel(), first_row.data_ptr(), table_rows.data_ptr(),
                                       rows.data_ptr())
    return None if bad == -2 else (rows, int(bad))  # -2: malformed offsets, for PyTorch's own error


def _parts(work: int, openmp_minimum: int = OPENMP_MIN_ELEMENTS) -> int:
    """Threads for a kernel of `work` elements: all of PyTorch's from `openmp_minimum` on its OpenMP threads,
    from PARALLEL_MIN_ELEMENTS on a Python pool's (which contend with PyTorch's spinning ones), else one."""
    minimum = openmp_minimum if threading_kind() == "openmp" else PARALLEL_MIN_ELEMENTS
    return torch.get_num_threads() if work >= minimum else 1


def _run_kernel(library, kernel: str, arguments: tuple, parts: int) -> None:
    """kernel(*arguments, part, parts) for every part: on PyTorch's OpenMP threads (its `_threads` entry)
    when the kernels share PyTorch's OpenMP runtime, else on a Python pool's threads."""
    if parts > 1 and threading_kind() == "openmp":
        getattr(library, kernel + "_threads")(*arguments, parts)
    else:
        part_of = getattr(library, kernel)
        _run_parts(lambda part: part_of(*arguments, part, parts), parts)


def _num_pairs(features: int, itself: bool) -> int:
    return features * (features + 1) // 2 if itself else features * (features - 1) // 2


def dot_interaction_runs(x: torch.Tensor, ly: torch.Tensor) -> bool:
    """Whether `dot_interaction(x, ly)` runs natively (kernels in use, operands it takes, and nothing that
    would have to see its arithmetic: see `nothing_watches`)."""
    return native() and _interaction_operands_ok(x, ly) and nothing_watches()


def nothing_watches() -> bool:
    """No Python dispatch mode (make_fx tracing, fake or flop-counting tensors), functorch transform (vmap,
    jvp, grad) or forward-mode AD level is active: the kernels read and write memory directly (and code that
    branches on a tensor's values reads them), which those could neither see nor transform."""
    return (_get_current_dispatch_mode() is None and not torch._C._are_functorch_transforms_active()
            and forward_ad._current_level < 0)


def _plain_cpu_tensor(t: torch.Tensor) -> bool:
    """A tensor whose data the kernels may read through its pointer: a plain CPU tensor (not a subclass such as
    FakeTensor, which has no data) without a lazy negation or conjugation bit."""
    return (type(t) in (torch.Tensor, torch.nn.Parameter) and t.device.type == "cpu" and not t.is_neg()
            and not t.is_conj())


def _interaction_operands_ok(x, ly) -> bool:
    return (_plain_cpu_tensor(x) and _plain_cpu_tensor(ly) and x.dtype == ly.dtype == torch.float32
            and x.dim() == 2 and ly.dim() == 3 and x.shape[0] == ly.shape[0] and x.shape[1] == ly.shape[2]
            and x.shape[1] <= INTERACTION_MAX_DIM and x.stride(1) == 1 and ly.stride(2) == 1)


def _interaction_parts(x, ly) -> int:
    """Threads for the dot interaction of x and ly: all of PyTorch's from INTERACTION_OPENMP_MIN_WORK on
    OpenMP threads (a Python pool's threads lose to PyTorch's spinning ones below PARALLEL_MIN_ELEMENTS)."""
    batch, features, dim = x.shape[0], ly.shape[1] + 1, x.shape[1]
    return max(1, min(_parts(batch * features * features * dim, INTERACTION_OPENMP_MIN_WORK), batch))


def _interaction_scratch(library, ly, parts: int) -> torch.Tensor:
    """Working memory of the dot interaction kernels on `parts` threads (keep it referenced while they run)."""
    return torch.empty(parts * library.dot_interaction_scratch_floats(ly.shape[1], ly.shape[2]), dtype=torch.float32)


INTERACTION_DTYPES = (torch.float32, torch.bfloat16)  # of the output and of its gradient


@torch.no_grad()
def dot_interaction(x: torch.Tensor, ly: torch.Tensor, itself: bool = False,
                    out_dtype: torch.dtype = torch.float32) -> torch.Tensor | None:
    """The dot interaction's output [B, D + P]: x, then the dot products of every pair (i, j),
    i > j (i >= j with `itself`), of the F = T + 1 feature vectors [x, ly[:, 0], ..., ly[:, T - 1]] in
    row-major order (the original's), each summed over d in order in float32 (the same with any number
    of threads). x [B, D], ly [B, T, D]: float32 CPU tensors whose last dimension is contiguous (e.g. the
    [T, B, D] lookup output transposed). out_dtype float32, or bfloat16: each float32 result rounded to
    nearest, as `.to(torch.bfloat16)` rounds it (what an autocast bf16 layer reading the output would cast
    it to). None when not run natively (no kernels, other tensors or dtypes)."""
    library, _ = _library()
    if library is None or not _interaction_operands_ok(x, ly) or out_dtype not in INTERACTION_DTYPES:
        return None
    batch, num_tables, dim = ly.shape
    out = torch.empty(batch, dim + _num_pairs(num_tables + 1, itself), dtype=out_dtype)
    if batch == 0:
        return out
    parts = _interaction_parts(x, ly)
    scratch = _interaction_scratch(library, ly, parts)
    arguments = (x.data_ptr(), x.stride(0), ly.data_ptr(), ly.stride(0), ly.stride(1), batch, num_tables, dim,
                 int(bool(itself)), out.data_ptr(), int(out_dtype == torch.bfloat16), scratch.data_ptr())
    _run_kernel(library, "dot_interaction_f32", arguments, parts)
    return out


@torch.no_grad()
def dot_interaction_backward(x: torch.Tensor, ly: torch.Tensor, grad_out: torch.Tensor, itself: bool = False):
    """(grad_x [B, D], grad_ly [B, T, D] laid out as ly, float32) of `dot_interaction(x, ly, itself)` given
    grad_out [B, D + P] float32 or bfloat16 (widened exactly; its last dimension contiguous): with S the
    symmetric [F, F] matrix of the pairs' gradients (twice at a self-pair), grad of feature i = sum over j
    of S[i, j] * feature j, in order, in float32 (plus grad_out[:, :D] for x). None when not run natively."""
    library, _ = _library()
    if (library is None or not _interaction_operands_ok(x, ly) or grad_out.dtype not in INTERACTION_DTYPES
            or grad_out.dim() != 2 or grad_out.stride(1) != 1 or not _plain_cpu_tensor(grad_out)):
        return None
    batch, num_tables, dim = ly.shape
    if grad_out.shape != (batch, dim + _num_pairs(num_tables + 1, itself)):
        return None
    grad_x = torch.empty(batch, dim, dtype=torch.float32)
    grad_ly = torch.empty_like(ly)  # ly's layout (the lookup's backward reads it as [T, B, D] then)
    if batch == 0:
        return grad_x, grad_ly
    parts = _interaction_parts(x, ly)
    scratch = _interaction_scratch(library, ly, parts)
    arguments = (x.data_ptr(), x.stride(0), ly.data_ptr(), ly.stride(0), ly.stride(1), batch, num_tables, dim,
                 int(bool(itself)), grad_out.data_ptr(), int(grad_out.dtype == torch.bfloat16), grad_out.stride(0),
                 grad_x.data_ptr(), grad_ly.data_ptr(), grad_ly.stride(0), grad_ly.stride(1), scratch.data_ptr())
    _run_kernel(library, "dot_interaction_backward_f32", arguments, parts)
    return grad_x, grad_ly


_ID_KERNEL_SUFFIX = {"int32": "i32", "int64": "i64"}  # str(dtype): native byte order only


def _fits(value: int, dtype) -> bool:
    return np.iinfo(dtype).min <= value <= np.iinfo(dtype).max


def pad_bags(ids, sizes, width: int, pad: int):
    """[n, width] array of the n bags of `ids` (bag b: sizes[b] consecutive ids), each row filled up with `pad`;
    None when not run natively. ids: 1-D int32 or int64 NumPy array, sizes: int64 [n] summing to len(ids) with
    none above width."""
    library, _ = _library()
    suffix = _ID_KERNEL_SUFFIX.get(str(ids.dtype))
    if (library is None or suffix is None or not ids.flags.c_contiguous or sizes.dtype != np.int64
            or not sizes.flags.c_contiguous or int(sizes.sum()) != ids.size or (sizes.size and int(sizes.max()) > width)
            or (sizes.size and int(sizes.min()) < 0) or not _fits(pad, ids.dtype)):
        return None
    bags = np.empty((sizes.size, width), dtype=ids.dtype)
    getattr(library, "pad_bags_" + suffix)(ids.ctypes.data, sizes.ctypes.data, sizes.size, width, pad, bags.ctypes.data)
    return bags


def distinct_sorted_bags(bags, rows: int):
    """(lengths [n] int64, ids int64) of the rows of `bags` ([n, width] int32 or int64 NumPy array, each row
    sorted ascending, so that its values below `rows` come first): each row's distinct values below `rows`, in
    order; None when not run natively."""
    library, _ = _library()
    suffix = _ID_KERNEL_SUFFIX.get(str(bags.dtype))
    if library is None or suffix is None or bags.ndim != 2 or not bags.flags.c_contiguous or not _fits(rows, np.int64):
        return None
    n, width = bags.shape
    lengths = np.empty(n, dtype=np.int64)
    out = np.empty(bags.size, dtype=np.int64)  # room for every value: a row's distinct values are written in place
    written = getattr(library, "distinct_sorted_bags_" + suffix)(bags.ctypes.data, n, width, rows, lengths.ctypes.data,
                                                                  out.ctypes.data)
    return lengths, out[:written]


_UINT64 = (1 << 64) - 1


def _halves(value: int) -> tuple[int, int]:
    return value >> 64, value & _UINT64


def pcg64_random_f32(bit_generator, count: int) -> np.ndarray | None:
    """[count] float32: what `np.random.Generator(bit_generator).random(count, dtype=np.float32)` returns, and
    `bit_generator` left where that call leaves it (a half word kept for the next float32 when count is odd);
    on all of PyTorch's threads from RANDOM_OPENMP_MIN_WORDS words. None, the generator untouched, without the
    kernels or for another bit generator than a NumPy PCG64 with no half word buffered. ValueError for a
    negative count."""
    count = operator.index(count)
    if count < 0:
        raise ValueError(f"pcg64_random_f32: a negative count ({count})")
    if not pcg64_native() or type(bit_generator) is not np.random.PCG64:
        return None
    state = bit_generator.state
    if state["has_uint32"]:
        return None
    out = np.empty(count, dtype=np.float32)
    if count == 0:
        return out
    library, _ = _library()
    state = state["state"]
    words = (count + 1) // 2  # each word gives two values, low 32 bits first
    _run_kernel(library, "pcg64_random_f32", (out.ctypes.data, count, *_halves(state["state"]),
                                              *_halves(state["inc"])), _parts(words, RANDOM_OPENMP_MIN_WORDS))
    bit_generator.advance(words - 1)
    last = int(bit_generator.random_raw())
    moved = bit_generator.state  # NumPy keeps the last word's high half, for the next float32 if count is odd
    moved["has_uint32"], moved["uinteger"] = count % 2, last >> 32
    bit_generator.state = moved
    return out


def pcg64_skip(bit_generator, words: int) -> int:
    """Moves a NumPy PCG64 on by `words` 64-bit words (as many doubles of `Generator.random`) as drawing them
    would: a half word buffered by float32 draws stays (PCG64.advance alone drops it). Returns the 128-bit
    state it started from (where the skipped words begin). ValueError for another bit generator or words
    outside [0, 2^128)."""
    words = operator.index(words)
    if type(bit_generator) is not np.random.PCG64 or not 0 <= words < 2**128:
        raise ValueError(f"pcg64_skip: skips 0 to 2^128 - 1 words of a NumPy PCG64, not {words} of "
                         f"{type(bit_generator).__name__}")
    state = bit_generator.state
    bit_generator.advance(words)
    moved = bit_generator.state
    moved["has_uint32"], moved["uinteger"] = state["has_uint32"], state["uinteger"]
    bit_generator.state = moved
    return state["state"]["state"]


def pcg64_native() -> bool:
    """Whether the PCG64 kernels (`pcg64_random_f32`, `uniform_bags`) run: built, with 128-bit integers."""
    library, _ = _library()
    return library is not None and library.pcg64


def uniform_bags(sizes: np.ndarray, bags_per_table: int, states, inc: int, rows, width: int, pad: int):
    """[T * bags_per_table, width] uniform random bags, row b bag b's ids then `pad`: bag b of table
    t = b // bags_per_table holds sizes[b] ids rint(U * (rows[t] - 1)), the U being the doubles
    `np.random.Generator.random` draws from PCG64 state (states[t], inc), bag after bag (table t's bags draw
    sizes[t * bags_per_table:(t + 1) * bags_per_table].sum() of them). Ids int32 when pad < 2^31 - 1, else
    int64. sizes: [T * bags_per_table] integers in [0, width]; rows: T (>= 1) integer table sizes in
    [1, pad]; states: T integers in [0, 2^128); inc: an odd integer in [0, 2^128), as in `PCG64.state`. On
    PyTorch's threads from RANDOM_OPENMP_MIN_WORDS ids. None without the kernels (`pcg64_native`);
    ValueError for arguments outside these bounds."""
    if not pcg64_native():
        return None
    library, _ = _library()
    try:
        rows, states = [operator.index(r) for r in rows], [operator.index(state) for state in states]
        bags_per_table, width, pad, inc = (operator.index(v) for v in (bags_per_table, width, pad, inc))
    except TypeError:
        raise ValueError("uniform_bags: table sizes, states, bags per table, width, pad and increment are "
                         "integers") from None
    num_tables = len(rows)
    sizes = np.asarray(sizes)
    if (num_tables < 1 or bags_per_table < 1 or width < 0 or sizes.dtype.kind not in "iu"
            or sizes.shape != (num_tables * bags_per_table,) or int(sizes.min()) < 0 or int(sizes.max()) > width):
        raise ValueError(f"uniform_bags: bag sizes of shape {sizes.shape} ({sizes.dtype}) are not integers in "
                         f"[0, {width}] for {num_tables} tables of {bags_per_table} bags")
    if not all(1 <= r <= pad for r in rows) or pad >= 2**63:
        raise ValueError(f"uniform_bags: table sizes {rows} not in [1, {pad}], or a pad from 2^63")
    if len(states) != num_tables or not all(0 <= state < 2**128 for state in (*states, inc)) or inc % 2 == 0:
        raise ValueError("uniform_bags: not one PCG64 state in [0, 2^128) per table and an odd increment")
    sizes = np.ascontiguousarray(sizes, dtype=np.int64)
    dtype = id_dtype(pad)
    bags = np.empty((sizes.size, width), dtype=dtype)
    if width == 0:
        return bags
    starts = np.zeros_like(sizes)
    np.cumsum(sizes[:-1], out=starts[1:])
    words = np.array([half for state in states for half in _halves(state)], dtype=np.uint64)
    table_rows = np.array(rows, dtype=np.int64)
    arguments = (bags.ctypes.data, width, pad, sizes.ctypes.data, starts.ctypes.data, sizes.size, bags_per_table,
                 words.ctypes.data, table_rows.ctypes.data, *_halves(inc))
    _run_kernel(library, "uniform_bags_" + _ID_KERNEL_SUFFIX[str(np.dtype(dtype))], arguments,
                min(_parts(int(sizes.sum()), RANDOM_OPENMP_MIN_WORDS), sizes.size))
    return bags


def id_dtype(rows: int):
    """int32 for the ids of a table of fewer than 2^31 - 1 rows (they and `rows` fit), else int64."""
    return np.int32 if rows < np.iinfo(np.int32).max else np.int64


def _uniform_numpy(out: np.ndarray, first: int, seed: int, low: np.float32, high: np.float32) -> None:
    """uniform_'s elements first .. first + out.size - 1 into the float32 array `out`, with NumPy."""
    w0 = first // 2
    counters = np.arange(w0, (first + out.size + 1) // 2, dtype=np.uint64)
    words = splitmix64(counters * GOLDEN_GAMMA + np.uint64(seed))  # word w: splitmix64(seed + w * gamma), mod 2^64
    if sys.byteorder == "little":  # each word's low 32 bits first
        halves = words.view(np.uint32)
    else:
        halves = np.empty((words.size, 2), dtype=np.uint32)
        halves[:, 0] = words & np.uint64(0xFFFFFFFF)
        halves[:, 1] = words >> np.uint64(32)
    bits = halves.reshape(-1)[first - 2 * w0: first - 2 * w0 + out.size]
    np.right_shift(bits, np.uint32(8), out=bits)
    out[:] = bits
    out *= np.float32(2.0 ** -24)
    out *= np.float32(high - low)
    out += low


def uniform_fillable(tensor: torch.Tensor) -> bool:
    """Whether `uniform_` fills `tensor` in place: a plain contiguous float32 or bfloat16 CPU tensor."""
    return _plain_cpu_tensor(tensor) and tensor.dtype in (torch.float32, torch.bfloat16) and tensor.is_contiguous()


@torch.no_grad()
def uniform_(tensor: torch.Tensor, seed: int, low: float, high: float) -> torch.Tensor:
    """Fills `tensor` (see `uniform_fillable`) with uniform values in [low, high] from the counter-based
    SplitMix64 stream of `seed` (Steele, Lea and Flood, OOPSLA 2014): element e (in memory order) takes 32 bits
    of word e // 2, x, and becomes low + (high - low) * ((x >> 8) * 2^-24) in float32, exactly as `kernels.c`
    documents; bfloat16: that rounded to nearest, which may pass a bound by up to half a bfloat16 step. `high`
    itself arises only through float32 rounding, never for the tables' symmetric ranges (-b, b) (the final
    sum is then exact). The values depend on (seed, low, high, e) alone: the same on any number of threads,
    natively (all cores, at memory speed) or with NumPy (without the kernels: one core, about as fast as
    torch's own `uniform_`).
    ValueError for a tensor it does not fill, a seed that is not an integer in [0, 2^64), or bounds that are
    not finite, with low > high or a difference beyond float32. Returns `tensor`.
    """
    if not uniform_fillable(tensor):
        raise ValueError(f"uniform_ fills plain contiguous float32 or bfloat16 CPU tensors, not this {tensor.dtype} "
                         f"tensor ({type(tensor).__name__}, {tensor.layout}, on {tensor.device}"
                         f"{', not contiguous' if not tensor.is_contiguous() else ''})")
    try:
        if isinstance(seed, bool):
            raise TypeError
        seed = operator.index(seed)
    except TypeError:
        raise ValueError("uniform_: the seed must be an integer") from None
    if not all(isinstance(bound, numbers.Real) and not isinstance(bound, bool) for bound in (low, high)):
        raise ValueError(f"uniform_: bounds must be real numbers, not {low!r} and {high!r}")
    if not 0 <= seed <= _UINT64:
        raise ValueError(f"uniform_: the seed {seed} is outside [0, 2^64)")
    with np.errstate(over="ignore", invalid="ignore"):
        low32, high32 = np.float32(low), np.float32(high)
        width = high32 - low32
    if not (np.isfinite(low32) and np.isfinite(high32) and np.isfinite(width) and low32 <= high32):
        raise ValueError(f"uniform_: bounds [{low}, {high}] are not finite float32 numbers low <= high with a "
                         "finite difference")
    count = tensor.numel()
    if count == 0:
        return tensor
    library, _ = _library()
    suffix = "f32" if tensor.dtype == torch.float32 else "bf16"
    if library is not None:
        parts = _parts(count, UNIFORM_PARALLEL_MIN_ELEMENTS)
        _run_kernel(library, "uniform_fill_" + suffix, (tensor.data_ptr(), count, seed, float(low32), float(high32)),
                    parts)
        return tensor
    flat = tensor.view(-1)
    for start in range(0, count, UNIFORM_NUMPY_CHUNK):  # one thread: NumPy's passes gain nothing from a pool
        stop = min(start + UNIFORM_NUMPY_CHUNK, count)
        values = np.empty(stop - start, dtype=np.float32)
        _uniform_numpy(values, start, seed, low32, high32)
        flat[start:stop] = torch.from_numpy(values)  # to bfloat16: rounded to nearest, as the kernel
    return tensor
