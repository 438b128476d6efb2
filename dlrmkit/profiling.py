"""--enable-profiling: the PyTorch profiler around the whole run.

Writes the original's three files: a Chrome trace (open it in chrome://tracing or
https://ui.perfetto.dev) and two operator tables sorted by self CPU time, one per
operator and input shape (`_shape.prof`) and one per operator (`_total.prof`); it also
prints the operators that took the most self time. Without --profiling-trace-file the files
are the original's `dlrm_s_pytorch<timestamp>.json`, `..._shape.prof` and `..._total.prof`
in the working directory; with it, the trace is that file and the tables lie next to it
(`trace.json` -> `trace_shape.prof`, `trace_total.prof`). In a distributed run every process
profiles itself and writes its own three files, the rank before the extension (`trace.rank1.json`,
`trace.rank1_shape.prof`, ...; the default names all carry rank 0's time stamp); rank 0 prints its top
operators. Profile a few batches (--num-batches), not a whole data set: the trace grows with every
operator call.
"""

from __future__ import annotations

import contextlib
import datetime
import functools
import gzip
import os
import shutil

import torch

from dlrmkit import outputs


def output_paths(trace_path: str = "", now: datetime.datetime | None = None, rank: int | None = None) -> dict:
    """{"trace", "shape", "total"}: the files written for --profiling-trace-file=trace_path
    (empty: the original's names, stamped with the time `now`); `rank`: a distributed process's, in the names."""
    if not trace_path:
        stem = "dlrm_s_pytorch" + str(now or datetime.datetime.now()).replace(" ", "_")
        ext = ".json"
    else:
        stem, ext = os.path.splitext(trace_path)
        if ext.lower() == ".gz":  # trace.json.gz: a gzipped trace, tables trace_shape.prof
            inner_stem, inner_ext = os.path.splitext(stem)
            stem, ext = (inner_stem, inner_ext + ext) if inner_ext.lower() in (".json", ".prof") else (stem, ext)
        elif ext.lower() not in (".json", ".prof"):
            stem, ext = trace_path, ""
    if rank is not None:
        stem += f".rank{rank}"
    trace = stem + (ext or "")
    return {"trace": trace, "shape": stem + "_shape.prof", "total": stem + "_total.prof"}


def _write_atomically(path, write):
    """write(tmp_path), then rename to `path` (an OutputError naming the flag when it cannot)."""
    outputs.write_atomically("--profiling-trace-file", path, write)


def _export_trace(prof, gzipped: bool, path: str):
    """The Chrome trace into `path`, gzip-compressed when `gzipped` (a name ending in .gz: Perfetto and
    chrome://tracing open it as it is)."""
    if not gzipped:
        prof.export_chrome_trace(path)
        return
    plain = path + ".json"
    with outputs.partial_output(plain):
        try:
            prof.export_chrome_trace(plain)
            with open(plain, "rb") as source, gzip.open(path, "wb", compresslevel=6) as target:
                shutil.copyfileobj(source, target)
        finally:
            if os.path.exists(plain):
                os.remove(plain)


@contextlib.contextmanager
def profiled(enabled: bool, trace_path: str = "", use_cuda: bool = False, top: int = 20, log=print,
             rank: int | None = None, now: datetime.datetime | None = None):
    """Profiles the body when `enabled`; then writes the files of output_paths(trace_path, now, rank) and logs
    the top operators (a distributed process: `rank`, and `log` prints on rank 0 only; `now`: the time that
    stamps the default names, the same in every process of a run)."""
    if not enabled:
        yield None
        return
    activities = [torch.profiler.ProfilerActivity.CPU]
    if use_cuda:
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities, record_shapes=True) as prof:
        yield prof
    sort_by = "self_cuda_time_total" if use_cuda else "self_cpu_time_total"
    if not rank:
        log(prof.key_averages().table(sort_by=sort_by, row_limit=top))
    paths = output_paths(trace_path, now, rank)

    def table(group_by_input_shape):
        text = prof.key_averages(group_by_input_shape=group_by_input_shape).table(sort_by="self_cpu_time_total")

        def write(tmp):
            with open(tmp, "w") as f:
                f.write(text)
        return write

    _write_atomically(paths["shape"], table(True))
    _write_atomically(paths["total"], table(False))
    gzipped = paths["trace"].lower().endswith(".gz")
    _write_atomically(paths["trace"], functools.partial(_export_trace, prof, gzipped))
    if not rank:
        others = " (each process its own, named by its rank)" if rank is not None else ""
        log(f"Wrote the profiler's Chrome trace to {paths['trace']} and its operator tables to {paths['shape']}, "
            f"{paths['total']}{others}")
