"""--enable-profiling: the PyTorch profiler around the whole run.

Writes a Chrome trace (open it in chrome://tracing or https://ui.perfetto.dev) and prints
the operators that took the most self time. Profile a few batches (--num-batches), not a
whole data set: the trace grows with every operator call.
"""

from __future__ import annotations

import contextlib
import os

import torch


@contextlib.contextmanager
def profiled(enabled: bool, trace_path: str, use_cuda: bool = False, top: int = 20, log=print):
    """Profiles the body when `enabled`; then writes `trace_path` (atomically) and logs the top operators."""
    if not enabled:
        yield None
        return
    activities = [torch.profiler.ProfilerActivity.CPU]
    if use_cuda:
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities, record_shapes=True) as prof:
        yield prof
    sort_by = "self_cuda_time_total" if use_cuda else "self_cpu_time_total"
    log(prof.key_averages().table(sort_by=sort_by, row_limit=top))
    os.makedirs(os.path.dirname(os.path.abspath(trace_path)), exist_ok=True)
    tmp = f"{trace_path}.tmp{os.getpid()}"
    try:
        prof.export_chrome_trace(tmp)
        os.replace(tmp, trace_path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    log(f"Wrote the profiler's Chrome trace to {trace_path}")
